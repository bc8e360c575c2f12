"""`lcs segment` on a cohort: one output per scan, done scans skipped, failures listed at the end, one volumes table,
and torchrun processes sharing the scans."""
import csv
import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from LabelConditionedSegLib.cli import main

from conftest import heldout_subject

REPO = Path(__file__).resolve().parents[1]
LABELS = "Frontal_Sup_L,Temporal_Mid_L"


def lcs(*args) -> tuple[int, str, str, float]:
    """`lcs ARGS` in this process: exit code, stdout, stderr and seconds."""
    out, err = io.StringIO(), io.StringIO()
    began = time.time()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue(), time.time() - began


@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory) -> Path:
    """A folder of three real scans (two NIfTI, one NRRD, each on its own scanner grid) and one unreadable file."""
    folder = tmp_path_factory.mktemp("scans")
    for seed, name in [(51, "s1.nii.gz"), (52, "s2.nrrd"), (53, "s3.nii.gz")]:
        sitk.WriteImage(heldout_subject(colin27, seed=seed)[0], str(folder / name))
    (folder / "broken.nii.gz").write_text("not an image")
    (folder / "notes.txt").write_text("not a scan: ignored")
    return folder


@pytest.fixture(scope="module")
def first_run(scans, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "out"
    return out, lcs("segment", scans, "-o", out, "--checkpoint", tiny_checkpoint, "--labels", LABELS, "--device", "cpu",
                    "--labelmap", "--overlay", "--quiet")


def table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the first run segments three scans (23 s)
def test_a_folder_cohort_segments_each_scan_lists_the_failure_and_writes_one_table(scans, first_run):
    out, (code, stdout, stderr, _) = first_run
    assert code == 2, stderr
    lines = stdout.splitlines()
    for name in ("s1", "s2", "s3"):  # one line per scan, in name order: broken, s1, s2, s3
        assert sum(line.startswith(f"{1 + int(name[1])}/4 {name}: segmented 2 of 2 labels in ") for line in lines) == 1
        seg = sitk.ReadImage(str(out / f"{name}.seg.nrrd"))
        scan = sitk.ReadImage(str(next(scans.glob(f"{name}.*"))))
        assert seg.GetSize() == scan.GetSize() and np.allclose(seg.GetOrigin(), scan.GetOrigin())
        assert {seg.GetMetaData(f"Segment{i}_Name") for i in range(2)} == set(LABELS.split(","))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_labels.nii.gz")))
        assert set(np.unique(labels)) == {0, 3, 85}
        assert Image.open(out / f"{name}_overlay.png").text["Title"].startswith(f"scan: {name}  |  model: tiny test model")
    assert any(line.startswith("1/4 broken: failed: cannot read") for line in lines)
    assert "3 of 4 scans segmented" in lines[-1] and "1 failed" in lines[-1]
    errors = stderr.splitlines()
    assert errors[-2] == "lcs: error: 1 of 4 scans failed:"
    assert errors[-1].startswith(f"lcs:   broken: cannot read {scans / 'broken.nii.gz'}")
    rows = table(out / "volumes.csv")
    assert list(rows[0]) == ["scan", "value", "name", "voxels", "volume_ml", "atlas_ml", "flag"]
    assert [(r["scan"], r["name"]) for r in rows] == [(s, n) for s in ("s1", "s2", "s3") for n in LABELS.split(",")]
    assert all(float(r["volume_ml"]) > 1 for r in rows)
    assert not (out / "broken.seg.nrrd").exists() and not list(out.glob(".*"))  # nothing half-written


@pytest.mark.slow  # the first run segments three scans (23 s)
def test_a_rerun_skips_the_done_scans_and_still_writes_the_whole_table(scans, first_run, tiny_checkpoint):
    out, (_, _, _, first_seconds) = first_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "volumes.csv"}
    (out / "volumes.csv").unlink()
    code, stdout, stderr, seconds = lcs("segment", scans, "-o", out, "--checkpoint", tiny_checkpoint, "--labels",
                                        LABELS, "--device", "cpu", "--labelmap", "--overlay", "--quiet")
    assert code == 2 and "1 of 4 scans failed" in stderr  # the broken file still fails
    assert stdout.count(": skipped, ") == 3 and "0 of 4 scans segmented" in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "volumes.csv"} == before
    assert len(table(out / "volumes.csv")) == 6
    assert seconds < first_seconds / 3, (seconds, first_seconds)


def test_a_csv_list_names_its_scans_and_a_clean_cohort_exits_0(scans, tiny_checkpoint, tmp_path):
    listing = tmp_path / "lists" / "cohort.csv"
    listing.parent.mkdir()
    listing.write_text(f"subject,path,name\nA,../../{scans.name}/s2.nrrd,subject_a\nB,{scans / 's1.nii.gz'},\n")
    assert (listing.parent / ".." / ".." / scans.name).resolve() == scans.resolve()  # a path relative to the CSV
    code, stdout, stderr, _ = lcs("segment", listing, "-o", tmp_path / "out", "--checkpoint", tiny_checkpoint,
                                  "--labels", "Temporal_Mid_L", "--device", "cpu", "--quiet")
    assert code == 0, stderr
    assert stdout.splitlines()[0].startswith("1/2 s1: segmented 1 of 1 labels")
    assert stdout.splitlines()[1].startswith("2/2 subject_a: segmented 1 of 1 labels")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "s1.seg.nrrd", "s1_volumes.csv", "subject_a.seg.nrrd", "subject_a_volumes.csv", "volumes.csv"]
    assert [r["scan"] for r in table(tmp_path / "out" / "volumes.csv")] == ["s1", "subject_a"]


def test_single_scan_extras_without_a_file_name_are_named_after_the_output(scans, tiny_checkpoint, tmp_path):
    code, stdout, stderr, _ = lcs("segment", scans / "s2.nrrd", "-o", tmp_path / "one.seg.nrrd", "--checkpoint",
                                  tiny_checkpoint, "--labels", "Temporal_Mid_L", "--device", "cpu", "--quiet",
                                  "--volumes-csv", "--labelmap", tmp_path / "mine.nii.gz")
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.nii.gz", "one.seg.nrrd", "one_volumes.csv"]
    written = ", ".join(str(tmp_path / name) for name in ("one.seg.nrrd", "mine.nii.gz", "one_volumes.csv"))
    assert stdout.splitlines()[-1] == f"wrote {written}"


def test_cohort_misuse_gets_one_line_and_writes_nothing(scans, tiny_checkpoint, tmp_path):
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.nii.gz", "a.nrrd"):
        (twins / name).write_bytes((scans / "s2.nrrd").read_bytes())
    nameless = tmp_path / "nameless.csv"
    nameless.write_text("file\ns1.nii.gz\n")
    cases = [
        ([scans, "-o", tmp_path / "cohort.seg.nrrd"], "give -o a folder"),
        ([scans / "s1.nii.gz", scans / "s2.nrrd", "-o", tmp_path / "x.nrrd"], "2 scans are segmented into a folder"),
        ([scans, "-o", tmp_path / "o", "--labelmap", tmp_path / "l.nii.gz"], "each scan writes"),
        ([scans, "-o", tmp_path / "o", "--volumes-csv", tmp_path / "v.csv"], "volumes.csv gathers them"),
        ([twins, "-o", tmp_path / "o"], "would both write a.seg.nrrd"),
        ([nameless, "-o", tmp_path / "o"], "no 'path' column"),
        ([tmp_path / "missing.csv", "-o", tmp_path / "o"], "does not exist"),
        ([scans, "-o", scans], "is the folder of the scans"),
    ]
    for args, message in cases:
        code, _, err, _ = lcs("segment", *args, "--checkpoint", tiny_checkpoint, "--quiet")
        assert code == 2 and err.startswith("lcs: error:") and err.count("\n") == 1, (args, err)
        assert message in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nameless.csv", "twins"]
    assert not list(scans.glob("*.seg.nrrd"))


def test_ctrl_c_stops_the_cohort_with_exit_130_and_keeps_the_finished_scans(scans, tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    import LabelConditionedSegLib.volume as volume
    read = volume.read_volume

    def interrupted_at_s2(path, *args, **kwargs):
        if Path(path).name == "s2.nrrd":
            raise KeyboardInterrupt
        return read(path, *args, **kwargs)

    monkeypatch.setattr(volume, "read_volume", interrupted_at_s2)
    code, stdout, stderr, _ = lcs("segment", scans, "-o", tmp_path, "--checkpoint", tiny_checkpoint, "--labels",
                                  "Temporal_Mid_L", "--device", "cpu", "--quiet")
    assert code == 130 and "cancelled by the user after 2 of 4 scans" in stderr, stderr
    assert "2/4 s1: segmented" in stdout and " s2:" not in stdout  # (the folder's own name may hold "s2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.seg.nrrd", "s1_volumes.csv"]


@pytest.mark.slow
def test_torchrun_processes_share_the_scans_and_rank_0_writes_the_table(scans, tiny_checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "LabelConditionedSegLib.cli", "segment", str(scans), "-o", str(tmp_path),
                             "--checkpoint", str(tiny_checkpoint), "--labels", LABELS, "--device", "cpu", "--quiet"],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=REPO,
                            timeout=600)
    assert result.returncode != 0  # the unreadable file failed in one process: the job fails
    lines = result.stdout.splitlines()
    expected = {"1/4 broken: failed": 0, "2/4 s1: segmented": 1, "3/4 s2: segmented": 0, "4/4 s3: segmented": 1}
    for start, rank in expected.items():  # every scan done once, by process (index in the sorted list) % 2
        [line] = [line for line in lines if line.startswith(start.split(":")[0] + ":")]
        assert line.startswith(start) and line.endswith(f"(process {rank} of 2)"), lines
    summaries = [line for line in lines if " scans segmented in " in line]
    assert len(summaries) == 1 and summaries[0].startswith("3 of 4 scans segmented") and "1 failed" in summaries[0]
    assert result.stderr.count("lcs: error: 1 of 4 scans failed:") == 1, result.stderr[-3000:]
    assert [r["scan"] for r in table(tmp_path / "volumes.csv")] == ["s1", "s1", "s2", "s2", "s3", "s3"]
    for name in ("s1", "s2", "s3"):
        assert sitk.ReadImage(str(tmp_path / f"{name}.seg.nrrd")).GetMetaData("Segment0_Name") == "Frontal_Sup_L"
