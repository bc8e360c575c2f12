"""The Snakemake workflow over `lcs segment` (lcs workflow): its templates, BIDS and CSV inputs, a job per scan with
memory from the header, a failing scan that fails only its job, reruns that do nothing, and the cohort's own table."""
import csv
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LabelConditionedSegLib.cli import WORKFLOW, main
from LabelConditionedSegLib.cohort import list_scans
from LabelConditionedSegLib.volume import PROCESS_BYTES, memory_needed

from conftest import heldout_subject

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = WORKFLOW / "Snakefile"
LABELS = "Frontal_Sup_L,Temporal_Mid_L"
# One thread per job and per process, so that the workflow and one lcs segment call compute alike.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}


def lcs(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def snakemake(folder: Path, *args, **config) -> subprocess.CompletedProcess:
    """`snakemake -s SNAKEFILE --cores 2 ARGS --config KEY=VALUE...` run in `folder` (its .snakemake/ goes there);
    its report (stdout and stderr together) is .stdout."""
    settings = [f"{key}={value}" for key, value in config.items()]
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--cores", "2", *map(str, args),
                           *(["--config", *settings] if settings else [])], cwd=folder, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **ONE_THREAD}, timeout=600)


def jobs(output: str) -> dict[str, int]:
    """The job counts of snakemake's table ("segment 3", "table 1", ...)."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(segment|table|all)\s+(\d+)$", output, re.M)}


def image(size, spacing=1.0) -> sitk.Image:
    """A real volume (random tissue-like values) of `size` voxels."""
    values = np.random.default_rng(0).uniform(0, 100, size[::-1]).astype(np.float32)
    volume = sitk.GetImageFromArray(values)
    volume.SetSpacing([spacing] * 3)
    return volume


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    """A BIDS dataset: sub-01 without sessions, sub-02 with two (one with two runs); beside them files not to segment."""
    root = tmp_path_factory.mktemp("bids")
    (root / "dataset_description.json").write_text('{"Name": "test", "BIDSVersion": "1.9.0"}')
    scans = {"sub-01/anat/sub-01_T1w.nii.gz": (40, 48, 40), "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": (40, 48, 40),
             "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii.gz": (80, 96, 80),
             "sub-02/ses-2/anat/sub-02_ses-2_run-2_T1w.nii.gz": (40, 48, 40),
             "sub-01/anat/sub-01_T2w.nii.gz": (40, 48, 40), "sub-01/func/sub-01_task-rest_bold.nii.gz": (40, 48, 40),
             "derivatives/lcs/sub-01/anat/sub-01_T1w.nii.gz": (40, 48, 40)}
    for name, size in scans.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image(size), str(root / name))
    return root


T1W = ["sub-01_T1w", "sub-02_ses-1_T1w", "sub-02_ses-2_run-1_T1w", "sub-02_ses-2_run-2_T1w"]


def test_a_bids_dataset_is_a_cohort_of_its_t1w_scans_named_with_their_entities(bids):
    scans, cohort = list_scans([bids])
    assert cohort and [s.name for s in scans] == T1W
    assert scans[2].path == bids / "sub-02/ses-2/anat/sub-02_ses-2_run-1_T1w.nii.gz"


def test_lcs_workflow_prints_the_snakefile_and_writes_templates_it_never_overwrites(tmp_path):
    code, stdout, _ = lcs("workflow", "--print-path")
    assert code == 0 and Path(stdout.strip()) == SNAKEFILE and SNAKEFILE.is_file()
    code, stdout, _ = lcs("workflow", "-o", tmp_path)
    assert code == 0 and f"--profile {tmp_path / 'slurm'}" in stdout
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == (WORKFLOW / "config.yaml").read_text(encoding="utf-8")
    assert (tmp_path / "slurm/config.yaml").read_text(encoding="utf-8") == (WORKFLOW / "slurm/config.yaml").read_text(encoding="utf-8")
    (tmp_path / "config.yaml").write_text("input: my-scans/\n")  # the user's edits
    code, _, stderr = lcs("workflow", "-o", tmp_path)
    assert code == 2 and stderr.strip() == f"lcs: error: {tmp_path / 'config.yaml'} already exists; edit it, or give " \
                                          "-o another folder"
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == "input: my-scans/\n"


@pytest.mark.slow  # snakemake runs (5-10 s each on 2 cores): the slow tier, which CI runs too
def test_a_dry_run_lists_a_job_per_bids_scan_with_memory_from_its_header(bids, tmp_path):
    out = tmp_path / "out"
    done = snakemake(tmp_path, "--dry-run", input=bids, output=out, labels=LABELS, gpus=1, threads=2,
                     extras="labelmap,overlay")
    assert done.returncode == 0, done.stdout
    assert jobs(done.stdout) == {"segment": 4, "table": 1, "all": 1}
    assert f"output: {out}/sub-02_ses-1_T1w.seg.nrrd, {out}/sub-02_ses-1_T1w_volumes.csv, " \
           f"{out}/sub-02_ses-1_T1w_labels.nii.gz, {out}/sub-02_ses-1_T1w_overlay.png\n" in done.stdout
    listed = {name: (threads, dict(re.findall(r"(\w+)=([^,]+)", resources))) for name, threads, resources in
              re.findall(r"wildcards: name=(\S+)\n\s+threads: (\d+)\n\s+resources: (.*)", done.stdout)}
    sizes = [(40, 48, 40), (40, 48, 40), (80, 96, 80), (40, 48, 40)]  # float32 voxels
    assert {name: (threads, resources["mem_mb"], resources["gpu"]) for name, (threads, resources) in listed.items()} == \
        {name: ("2", str(-(-(PROCESS_BYTES + memory_needed(size, 4)) // 2**20)), "1") for name, size in zip(T1W, sizes)}
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.slow  # snakemake runs (5-10 s each on 2 cores): the slow tier, which CI runs too
def test_the_workflow_says_what_to_set_or_fix(bids, tmp_path):
    done = snakemake(tmp_path, "--dry-run", output=tmp_path / "out")
    assert done.returncode != 0
    assert "the workflow needs 'input': set it in your --configfile (lcs workflow -o DIR writes one to edit) or give " \
           "--config input=PATH" in done.stdout, done.stdout
    done = snakemake(tmp_path, "--dry-run", input=bids, output=tmp_path / "out", extras="[overlay,masks]")
    assert done.returncode != 0
    assert "extras: masks unknown; choose among labelmap, overlay, probabilities" in done.stdout, done.stdout


# ---- end to end, with the tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory) -> Path:
    """Four real scans, each on its own scanner grid, and one unreadable file; two CSV lists of them."""
    folder = tmp_path_factory.mktemp("workflow_scans")
    for seed, name in [(61, "s1.nii.gz"), (62, "s2.nrrd"), (63, "s3.nii.gz"), (64, "s4.nii.gz")]:
        sitk.WriteImage(heldout_subject(colin27, seed=seed)[0], str(folder / name))
    (folder / "broken.nii.gz").write_text("not an image")
    good = ["s1.nii.gz", "s2.nrrd", "s3.nii.gz", "s4.nii.gz"]
    (folder / "all.csv").write_text("path\n" + "".join(f"{name}\n" for name in ["broken.nii.gz", *good]))
    (folder / "good.csv").write_text("path\n" + "".join(f"{name}\n" for name in good))
    return folder


@pytest.fixture(scope="module")
def first_run(scans, tiny_checkpoint, tmp_path_factory):
    """The workflow on the four scans and the unreadable one, going on past the failure; returns its folder."""
    folder = tmp_path_factory.mktemp("workflow")
    (folder / "config.yaml").write_text(f"input: {scans / 'all.csv'}\noutput: out\ncheckpoint: {tiny_checkpoint}\n"
                                        f"labels: {LABELS}\nextras: [labelmap]\nthreads: 1\n")
    return folder, snakemake(folder, "--configfile", "config.yaml", "--keep-going")


def table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_failing_scan_fails_its_job_and_the_others_finish(first_run):
    folder, done = first_run
    out = folder / "out"
    assert done.returncode != 0 and "Error in rule segment" in done.stdout
    assert jobs(done.stdout)["segment"] == 5
    for name in ("s1", "s2", "s3", "s4"):
        assert (out / f"{name}.seg.nrrd").is_file() and (out / f"{name}_labels.nii.gz").is_file()
        assert [row["name"] for row in table(out / f"{name}_volumes.csv")] == LABELS.split(",")
    assert (out / "logs/broken.log").read_text(encoding="utf-8").startswith("lcs: error: cannot read ")
    assert not list(out.glob("broken*")) and not (out / "volumes.csv").exists()  # the table waits for every scan


@pytest.mark.slow
def test_without_the_failing_scan_a_rerun_only_gathers_the_table_then_does_nothing(first_run, scans):
    folder, _ = first_run
    done = snakemake(folder, "--configfile", "config.yaml", input=scans / "good.csv")
    assert done.returncode == 0, done.stdout
    assert jobs(done.stdout) == {"table": 1, "all": 1}  # no scan segmented again
    assert [row["scan"] for row in table(folder / "out/volumes.csv")] == [s for s in ("s1", "s2", "s3", "s4") for _ in (0, 1)]
    again = snakemake(folder, "--configfile", "config.yaml", input=scans / "good.csv")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout, again.stdout


@pytest.mark.slow
def test_the_workflow_writes_the_volumes_table_of_one_lcs_segment_call(first_run, scans, tiny_checkpoint, tmp_path):
    folder, _ = first_run
    snakemake(folder, "--configfile", "config.yaml", input=scans / "good.csv")
    cohort = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", scans / "good.csv", "-o",
                             tmp_path, "--checkpoint", tiny_checkpoint, "--labels", LABELS, "--labelmap", "--quiet"],
                            capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=600)
    assert cohort.returncode == 0, cohort.stderr
    assert (folder / "out/volumes.csv").read_text(encoding="utf-8") == (tmp_path / "volumes.csv").read_text(encoding="utf-8")
    assert len(table(tmp_path / "volumes.csv")) == 8
    for name in ("s1", "s2", "s3", "s4"):
        ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / f"{name}_labels.nii.gz")))
                        for f in (folder / "out", tmp_path))
        assert np.array_equal(ours, theirs)
