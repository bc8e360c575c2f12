"""A pip-installed package carries the demo model: sdist -> wheel -> install, then used from outside the repository.

Builds from a copy of what pyproject.toml packages (setuptools writes build/ and egg-info beside pyproject.toml,
and the working tree stays untouched), offline: the venv's setuptools, no build isolation.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

# A release check (sdist, wheel and pip install: about 20 s on 2 cores): the slow tier, which CI runs too.
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# Everything pyproject.toml builds from; Resources/Models is the package LabelConditionedSegLib.Models.
SOURCES = ["pyproject.toml", "README.md", "LabelConditionedSeg/LabelConditionedSegLib", "Training/lcs_training",
           "Resources/Models"]


def run(args, **kwargs) -> str:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A wheel built from an sdist of this tree, installed with `pip install --target`; returns the folder."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, dist, site = tmp / "src", tmp / "dist", tmp / "site"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
         dist], cwd=src)
    sdist = next(dist.glob("*.tar.gz"))
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("/Resources/Models/demo.lcs") for n in archive.getnames()), "the sdist lacks demo.lcs"
    run([sys.executable, "-m", "pip", "wheel", sdist, "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "-w", dist], cwd=tmp)
    wheel = next(dist.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert "LabelConditionedSegLib/Models/demo.lcs" in archive.namelist(), "the wheel lacks demo.lcs"
        assert "LabelConditionedSegLib/Models/NOTICE.txt" in archive.namelist(), "the wheel lacks the atlas data's notice"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target", site, wheel], cwd=tmp)
    return site


def environment(site: Path, **extra) -> dict:
    """The installed package first on sys.path (ahead of this repository's editable install), no $LCS_CHECKPOINT."""
    return {k: v for k, v in os.environ.items() if k != "LCS_CHECKPOINT"} | {"PYTHONPATH": str(site)} | extra


def python(site: Path, cwd: Path, code: str, **extra) -> list[str]:
    """Run code with this venv's python (torch, numpy, SimpleITK) on the installed package."""
    return run([sys.executable, "-c", code], cwd=cwd, env=environment(site, **extra)).splitlines()


CHECK = """
import LabelConditionedSegLib
from LabelConditionedSegLib.checkpoint import default_checkpoint, Checkpoint
print(LabelConditionedSegLib.__file__)
print(default_checkpoint().resolve())
print(len(Checkpoint.load(default_checkpoint()).label_table))
"""


def test_installed_package_finds_its_demo_model(installed, tmp_path):
    package, checkpoint, labels = python(installed, tmp_path, CHECK)
    # The import comes from the wheel, not from the editable install of this repository.
    assert Path(package).resolve().is_relative_to(installed.resolve()), package
    assert Path(checkpoint) == (installed / "LabelConditionedSegLib" / "Models" / "demo.lcs").resolve()
    assert int(labels) == 116


def test_lcs_labels_outside_the_repository(installed, tmp_path):
    script = installed / "bin" / "lcs"  # the console script pip installed; -m where there is none (Windows)
    command = [sys.executable, script] if script.exists() else [sys.executable, "-m", "LabelConditionedSegLib.cli"]
    lines = run([*command, "labels"], cwd=tmp_path, env=environment(installed)).splitlines()
    assert "116 labels" in lines[0] and f"# file: {(installed / 'LabelConditionedSegLib/Models/demo.lcs').resolve()}" in lines
    rows = lines[lines.index("value\tname") + 1:]  # after the provenance
    assert len(rows) == 116 and "Hippocampus_L" in {row.split("\t")[1] for row in rows}


def test_lcs_checkpoint_overrides_the_default(installed, tmp_path):
    other = tmp_path / "elsewhere" / "mine.lcs"
    other.parent.mkdir()
    shutil.copy2(installed / "LabelConditionedSegLib" / "Models" / "demo.lcs", other)
    package, checkpoint, labels = python(installed, tmp_path, CHECK, LCS_CHECKPOINT=str(other))
    assert Path(package).resolve().is_relative_to(installed.resolve()), package
    assert Path(checkpoint) == other.resolve() and int(labels) == 116


def test_installed_package_ships_the_workflow(installed, tmp_path):
    """`lcs workflow` of a pip-installed package finds its Snakefile and copies out its settings and SLURM profile."""
    command = [sys.executable, "-m", "LabelConditionedSegLib.cli", "workflow"]
    snakefile = Path(run([*command, "--print-path"], cwd=tmp_path, env=environment(installed)).strip())
    assert snakefile == (installed / "LabelConditionedSegLib" / "workflow" / "Snakefile").resolve()
    run([*command, "-o", tmp_path / "mine"], cwd=tmp_path, env=environment(installed))
    assert "input: null" in (tmp_path / "mine" / "config.yaml").read_text(encoding="utf-8")
    assert "executor: slurm" in (tmp_path / "mine" / "slurm" / "config.yaml").read_text(encoding="utf-8")
