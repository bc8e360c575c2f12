"""Batches from the panel's logic on a real MRML scene (PyPI's slicer-core): every scan volume of a scene, or every
scan of a folder, in one background job (jobs.Worker, as the panel runs it), with Cancel and a summary table."""
import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.cli import main  # noqa: E402
from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.jobs import Worker  # noqa: E402
from LabelConditionedSegLib.logic import CHECK, TABLE_NAME, SegmentationLogic  # noqa: E402

from conftest import heldout_subject  # noqa: E402
from test_slicer_logic import add_segment, load_volume, names, read_segment, scene  # noqa: E402,F401

LABELS = ["Frontal_Sup_L", "Temporal_Mid_L"]


@pytest.fixture(scope="module")
def folder(colin27, tmp_path_factory) -> Path:
    """Three real scans on their own grids, and a file that is no image (it fails; the others go on)."""
    folder = tmp_path_factory.mktemp("batch")
    for seed, name in [(61, "a.nii.gz"), (62, "b.nrrd"), (63, "c.nii.gz")]:
        sitk.WriteImage(heldout_subject(colin27, seed=seed)[0], str(folder / name))
    (folder / "d_broken.nii.gz").write_text("not an image")
    return folder


def run_in_worker(job, cancel_when=lambda message: False):
    """job.run in a worker thread, as the panel runs it; Cancel once a progress message matches. Returns the messages
    and the seconds from Cancel to the end of the work (None without Cancel)."""
    messages, cancel, cancelled_at = [], threading.Event(), []

    def progress(fraction, message):
        messages.append(message)
        if not cancel.is_set() and cancel_when(message):
            cancelled_at.append(time.time())
            cancel.set()
    worker = Worker(lambda: job.run(progress, cancel.is_set))
    while worker.running:
        time.sleep(0.02)
    result, failure = worker.take()
    assert failure is None, failure and failure.details
    return messages, (time.time() - cancelled_at[0]) if cancelled_at else None


def table_rows(table) -> list[dict]:
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetCellText(r, c) for c, name in enumerate(columns)} for r in range(table.GetNumberOfRows())]


def segmentations(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def test_a_scene_batch_segments_every_scan_in_one_job_and_leaves_the_users_segmentations(scene, folder,
                                                                                          tiny_checkpoint):
    volumes = [load_volume(scene, folder / name) for name in ("a.nii.gz", "b.nrrd")]
    logic = SegmentationLogic(scene)
    logic.loadAtlas(tiny_checkpoint)  # its image is no scan: not segmented
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "a LCS")  # the user's, with an output's name
    mask = np.zeros(slicer.util.arrayFromVolume(volumes[0]).shape, bool)
    mask[10:20, 10:20, 10:20] = True
    add_segment(scene, mine, "Frontal_Sup_L", mask, volumes[0])
    assert logic.sceneScans() == volumes

    job = logic.startSceneBatch(LABELS, tiny_checkpoint, "cpu")
    messages, _ = run_in_worker(job)
    assert any(m.startswith("scan 1 of 2: a: ") for m in messages) and any(m.startswith("scan 2 of 2: b: ") for m in messages)
    table = logic.finishBatch(job)

    assert names(mine) == ["Frontal_Sup_L"]
    assert np.array_equal(read_segment(scene, mine, mine.GetSegmentation().GetNthSegmentID(0), volumes[0]), mask)
    outputs = [s for s in segmentations(scene) if s is not mine and s is not logic.atlasFor(tiny_checkpoint)]
    assert [s.GetName() for s in outputs] == ["a LCS", "b LCS"]
    rows = table_rows(table)
    assert table.GetName() == TABLE_NAME and scene.GetNodeByID(table.GetID()) is table and not table.GetHideFromEditors()
    assert [r["scan"] for r in rows] == ["a", "b"]
    for output, volume, row in zip(outputs, volumes, rows):
        assert sorted(names(output)) == sorted(LABELS) and output.GetAttribute(CHECK) == row["check"] == ""
        assert row["labels found"] == "2 of 2"
        voxel_ml = np.prod(volume.GetSpacing()) / 1000
        for segment_id, label in zip(output.GetSegmentation().GetSegmentIDs(), names(output)):
            voxels = read_segment(scene, output, segment_id, volume).sum()
            assert voxels > 100 and float(row[f"{label} (mL)"]) == pytest.approx(voxels * voxel_ml, rel=1e-3)
    # one undo step takes the whole batch back, the user's segmentation stays
    logic.undoLastRun()
    assert [s.GetName() for s in segmentations(scene) if s is not logic.atlasFor(tiny_checkpoint)] == ["a LCS"]
    assert scene.GetNodeByID(table.GetID()) is None and names(mine) == ["Frontal_Sup_L"]


def test_cancel_stops_a_scene_batch_within_its_scan_and_keeps_the_scans_finished_before(scene, folder,
                                                                                          tiny_checkpoint):
    for name in ("a.nii.gz", "b.nrrd", "c.nii.gz"):
        load_volume(scene, folder / name)
    logic = SegmentationLogic(scene)
    job = logic.startSceneBatch(LABELS, tiny_checkpoint, "cpu")
    messages, stopped_after = run_in_worker(job, lambda m: m.startswith("scan 2 of 3"))
    assert stopped_after < 1.5  # within the scan under way, not at its end
    assert not any(m.startswith("scan 3 of 3") for m in messages)
    table = logic.finishBatch(job)
    assert [s.GetName() for s in segmentations(scene)] == ["a LCS"]  # the finished scan; b left nothing
    assert sorted(names(segmentations(scene)[0])) == sorted(LABELS)
    assert [r["scan"] for r in table_rows(table)] == ["a"]


def test_a_scene_batch_writes_nothing_into_a_scene_closed_and_reloaded_meanwhile(scene, folder, tiny_checkpoint):
    """After a close, a new volume may take a batch volume's node ID: writing there would put a segmentation of one
    scan on another."""
    load_volume(scene, folder / "a.nii.gz")
    logic = SegmentationLogic(scene)
    job = logic.startSceneBatch(LABELS, tiny_checkpoint, "cpu")
    run_in_worker(job)
    scene.Clear(False)
    other = load_volume(scene, folder / "b.nrrd")
    assert other.GetID() == job.jobs[0][1].volumeId
    with pytest.raises(LCSError, match="the scene was closed while the batch ran"):
        logic.finishBatch(job)
    assert segmentations(scene) == [] and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


@pytest.mark.slow  # a whole batch / two whole runs: 8-9 s
def test_a_volume_deleted_during_a_scene_batch_is_listed_as_failed(scene, folder, tiny_checkpoint):
    volumes = [load_volume(scene, folder / name) for name in ("a.nii.gz", "b.nrrd")]
    logic = SegmentationLogic(scene)
    job = logic.startSceneBatch(LABELS, tiny_checkpoint, "cpu")
    run_in_worker(job)
    scene.RemoveNode(volumes[0])
    rows = table_rows(logic.finishBatch(job))
    assert [s.GetName() for s in segmentations(scene)] == ["b LCS"]
    assert rows[0]["check"] == "failed: the volume was removed from the scene while the batch ran"
    assert rows[1]["check"] == "" and rows[1]["labels found"] == "2 of 2"


def test_a_scene_without_scans_is_refused(scene, tiny_checkpoint):
    logic = SegmentationLogic(scene)
    logic.loadAtlas(tiny_checkpoint)
    with pytest.raises(LCSError, match="no scan volume"):
        logic.startSceneBatch(LABELS, tiny_checkpoint, "cpu")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_folder_batch_writes_what_lcs_segment_writes_and_goes_on_after_cancel(scene, folder, tiny_checkpoint,
                                                                               tmp_path):
    assert main(["segment", str(folder), "-o", str(tmp_path / "cli"), "--checkpoint", str(tiny_checkpoint),
                 "--labels", ",".join(LABELS), "--device", "cpu", "--quiet"]) == 2  # the broken file fails
    logic = SegmentationLogic(scene)
    out = tmp_path / "panel"

    job = logic.startFolderBatch(folder, out, LABELS, tiny_checkpoint, "cpu")
    _, stopped_after = run_in_worker(job, lambda m: m.startswith("scan 2 of 4"))
    assert stopped_after < 1.5
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "a_volumes.csv", "volumes.csv"]  # no lock left
    assert [r["scan"] for r in read_csv(out / "volumes.csv")] == ["a", "a"]
    assert [r["scan"] for r in table_rows(logic.finishBatch(job))] == ["a"]

    job = logic.startFolderBatch(folder, out, LABELS, tiny_checkpoint, "cpu")  # goes on: a is skipped
    messages, _ = run_in_worker(job)
    assert not any(m.startswith("scan 1 of 4: a: ") for m in messages)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert read_csv(out / "volumes.csv") == read_csv(tmp_path / "cli" / "volumes.csv")
    for name in ("a", "b", "c"):
        panel, cli = (sitk.ReadImage(str(o / f"{name}.seg.nrrd")) for o in (out, tmp_path / "cli"))
        assert np.array_equal(sitk.GetArrayFromImage(panel), sitk.GetArrayFromImage(cli))
    rows = table_rows(logic.finishBatch(job))
    assert [r["scan"] for r in rows] == ["a", "b", "c", "d_broken"]
    assert rows[3]["check"].startswith("failed: ") and rows[3]["labels found"] == ""
    for row, written in zip(rows, [read_csv(out / f"{n}_volumes.csv") for n in "abc"]):
        assert {f"{w['name']} (mL)": float(w["volume_ml"]) for w in written} == {
            k: float(v) for k, v in row.items() if k.endswith("(mL)")}


def test_a_folder_batch_refuses_before_any_work(scene, folder, tiny_checkpoint, tmp_path):
    logic = SegmentationLogic(scene)
    with pytest.raises(LCSError, match="is the folder of the scans"):
        logic.startFolderBatch(folder, folder, LABELS, tiny_checkpoint, "cpu")
    with pytest.raises(LCSError, match="no folder of scans"):
        logic.startFolderBatch(tmp_path / "nowhere", tmp_path / "out", LABELS, tiny_checkpoint, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LCSError, match="holds no image files"):
        logic.startFolderBatch(tmp_path / "empty", tmp_path / "out", LABELS, tiny_checkpoint, "cpu")
    assert not (tmp_path / "out").exists()
