"""What `lcs segment` writes never costs a user data: a rerun with other settings is refused rather than answered
with old results, two runs writing the same names never mix their files, and an output is never an input (that
last one is in the bad-input battery, test_bad_inputs.py)."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import SimpleITK as sitk

from LabelConditionedSegLib import files
from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.files import file_identity, only_new_files, write_text
from LabelConditionedSegLib.record import FIELD, recorded

from conftest import heldout_subject


def lcs(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def table_names(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(row["scan"], row["name"]) for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("safety_scans")
    for seed in (61, 62):
        sitk.WriteImage(heldout_subject(colin27, seed=seed)[0], str(folder / f"s{seed}.nii.gz"))
    return folder


def test_file_identity_sees_one_file_in_every_spelling(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    scan = tmp_path / "Scan.nii.gz"
    scan.write_bytes(b"x")
    (tmp_path / "link.nii.gz").symlink_to(scan)
    os.link(scan, tmp_path / "hard.nii.gz")
    for spelling in (tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz", tmp_path / "sub" / ".." / "Scan.nii.gz"):
        assert file_identity(spelling) == file_identity(scan)
    assert file_identity(tmp_path / "new.csv") == file_identity(tmp_path / "." / "sub" / ".." / "new.csv")
    assert file_identity(tmp_path / "New.csv") != file_identity(tmp_path / "new.csv")  # Linux disks tell case apart
    monkeypatch.setattr(files, "CASE_INSENSITIVE", True)  # macOS and Windows disks do not
    assert file_identity(tmp_path / "New.csv") == file_identity(tmp_path / "new.csv")


@pytest.mark.slow
def test_a_cohort_rerun_with_other_settings_is_refused_and_the_table_never_mixes_them(scans, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    common = ["segment", scans, "-o", out, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--quiet"]
    code, _, err = lcs(*common, "--labels", "Frontal_Sup_L")
    assert code == 0, err
    assert recorded(out / "s61.seg.nrrd")["labels"] == "Frontal_Sup_L"
    before = hashes(out)
    for change, words in ((["--labels", "Temporal_Mid_L"], "labels Frontal_Sup_L, now Temporal_Mid_L"),
                          (["--labels", "Frontal_Sup_L", "--threshold", "0.4"], "threshold 0.5, now 0.4"),
                          (["--labels", "Frontal_Sup_L", "--registration", "rigid"], "registration affine, now rigid")):
        code, stdout, err = lcs(*common, *change)
        assert code == 2 and err.count("\n") == 1 and words in err and "--overwrite" in err, err
        assert hashes(out) == before  # nothing skipped as done, nothing written
    # the model is known by its content: a copy under another name is the same model, a changed one is not
    shutil.copy(tiny_checkpoint, tmp_path / "copy.lcs")
    code, stdout, err = lcs(*common, "--labels", "Frontal_Sup_L", "--checkpoint", tmp_path / "copy.lcs")
    assert code == 0 and "2 skipped" in stdout, err
    other = Checkpoint.load(tiny_checkpoint)
    other.provenance["name"] = "another model"
    other.save(tmp_path / "other.lcs")
    code, stdout, err = lcs(*common, "--labels", "Frontal_Sup_L", "--checkpoint", tmp_path / "other.lcs")
    assert code == 2 and "was segmented with model tiny.lcs (sha256 " in err and ", now other.lcs" in err, err
    # the same labels with an output not asked for before: segmented again, since nothing of other settings is lost
    code, stdout, err = lcs(*common, "--labels", "Frontal_Sup_L", "--overlay")
    assert code == 0 and "2 of 2 scans segmented" in stdout, err
    assert (out / "s61_overlay.png").is_file() and (out / "s62_overlay.png").is_file()
    code, stdout, err = lcs(*common, "--labels", "Frontal_Sup_L", "--overlay")
    assert code == 0 and "2 skipped" in stdout, err
    # --overwrite segments the scans again; one of them unreadable now keeps its old result, left out of the table
    (scans / "s62.nii.gz").rename(scans / "s62.keep")
    (scans / "s62.nii.gz").write_text("no longer an image")
    try:
        code, stdout, err = lcs(*common, "--labels", "Temporal_Mid_L", "--overwrite")
    finally:
        (scans / "s62.keep").replace(scans / "s62.nii.gz")
    assert code == 2 and "1 scans with results of other settings left out" in stdout, (stdout, err)
    assert table_names(out / "volumes.csv") == [("s61", "Temporal_Mid_L")]
    assert recorded(out / "s62.seg.nrrd")["labels"] == "Frontal_Sup_L"


def test_a_seg_nrrd_records_what_it_was_made_with_and_slicer_fields_stay(scans, tiny_checkpoint, tmp_path):
    seg = tmp_path / "one.seg.nrrd"
    code, _, err = lcs("segment", scans / "s61.nii.gz", "-o", seg, "--checkpoint", tiny_checkpoint, "--device", "cpu",
                       "--labels", "Frontal_Sup_L+Frontal_Sup_R", "--quiet")
    assert code == 0, err
    record = recorded(seg)
    assert record["labels"] == "Frontal_Sup_L+Frontal_Sup_R" and record["registration"] == "affine"
    assert record["model"].startswith("tiny.lcs (sha256 ") and record["threshold"] == "0.5"
    header = sitk.ReadImage(str(seg))
    assert header.HasMetaDataKey(FIELD) and header.GetMetaData("Segment0_Name") == "Frontal_Sup_L+Frontal_Sup_R"


@pytest.mark.slow  # a whole batch / two whole runs: 8-9 s
def test_a_scan_another_live_run_holds_is_left_to_it_and_a_dead_run_s_lock_is_taken_over(scans, tiny_checkpoint,
                                                                                         tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".s61.lock").write_text(f"{socket.gethostname()} {holder.pid}")
        common = ["segment", scans, "-o", out, "--checkpoint", tiny_checkpoint, "--device", "cpu", "--labels",
                  "Frontal_Sup_L", "--quiet"]
        code, stdout, err = lcs(*common)
        assert code == 2 and "s61: failed: another run is segmenting it" in stdout, (stdout, err)
        assert (out / "s62.seg.nrrd").is_file() and not (out / "s61.seg.nrrd").exists()
        assert (out / ".s61.lock").read_text(encoding="utf-8") == f"{socket.gethostname()} {holder.pid}"  # still the other run's
    finally:
        holder.kill()
        holder.wait()
    code, stdout, err = lcs(*common)  # its run is gone: the lock is taken over
    assert code == 0 and "1 of 2 scans segmented" in stdout, (stdout, err)
    assert (out / "s61.seg.nrrd").is_file() and not list(out.glob(".*"))


def test_a_file_that_appears_meanwhile_is_never_replaced_and_the_loser_removes_its_own(tmp_path):
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    with pytest.raises(LCSError, match="appeared while this run was writing it"):
        with only_new_files():
            write_text("mine", first)
            second.write_text("the other run's")  # another run placed it after this one checked its outputs
            write_text("mine", second)
    assert second.read_text(encoding="utf-8") == "the other run's" and not first.exists() and not list(tmp_path.glob(".*"))
    write_text("old", first)
    write_text("new", first)  # outside the block files are replaced, as --overwrite asks
    assert first.read_text(encoding="utf-8") == "new"


@pytest.mark.slow
def test_two_runs_writing_the_same_outputs_never_mix_their_files(scans, tiny_checkpoint, tmp_path):
    """Two processes started together, asking for different labels into the same names: one wins, the other exits
    2 and leaves the winner's files whole, so the segmentation and its table come from one run."""
    seg, table = tmp_path / "x.seg.nrrd", tmp_path / "x.csv"
    runs = [subprocess.Popen([sys.executable, "-m", "LabelConditionedSegLib.cli", "segment", str(scans / "s61.nii.gz"),
                              "-o", str(seg), "--volumes-csv", str(table), "--checkpoint", str(tiny_checkpoint),
                              "--device", "cpu", "--labels", label, "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for label in ("Frontal_Sup_L", "Temporal_Mid_L")]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "appeared while this run was writing it" in loser or "already exists" in loser, loser
    with open(table, newline="") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    assert names == [recorded(seg)["labels"]] == [sitk.ReadImage(str(seg)).GetMetaData("Segment0_Name")]
    assert not list(tmp_path.glob(".*"))
