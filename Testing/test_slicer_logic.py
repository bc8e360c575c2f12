"""SegmentationLogic on a real MRML scene (PyPI's slicer-core), volumes read by Slicer's own readers."""
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.errors import Cancelled, LCSError  # noqa: E402
from LabelConditionedSegLib.logic import SegmentationLogic, volume_to_image  # noqa: E402

from conftest import TINY_LABELS, dice, heldout_subject  # noqa: E402


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    yield scene
    scene.Clear(True)


@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory):
    """Two real files in different orientations and spacings, with their ground truth."""
    folder = tmp_path_factory.mktemp("scans")
    out = []
    for seed, suffix in [(51, ".nrrd"), (52, ".nii.gz")]:
        image, truth = heldout_subject(colin27, seed=seed)
        sitk.WriteImage(image, str(folder / f"scan{seed}{suffix}"))
        out.append((folder / f"scan{seed}{suffix}", truth))
    return out


def load_volume(scene, path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    return node


def segment_ids(*ids):
    array = vtk.vtkStringArray()
    for i in ids:
        array.InsertNextValue(i)
    return array


def read_segment(scene, segmentation, segment_id, volume) -> np.ndarray:
    """A segment exported on the volume's own voxel grid."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, segment_ids(segment_id), labelmap, volume)
    array = slicer.util.arrayFromVolume(labelmap) > 0
    scene.RemoveNode(labelmap)
    return array


def add_segment(scene, segmentation, name, mask, volume) -> str:
    """A user's segment, added as Slicer's import does (slicer-core has no empty-segment converters)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmap.CopyOrientation(volume)
    slicer.util.updateVolumeFromArray(labelmap, mask.astype(np.uint8))
    segments = segmentation.GetSegmentation()
    count = segments.GetNumberOfSegments()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, "")
    scene.RemoveNode(labelmap)
    assert segments.GetNumberOfSegments() == count + 1
    segment_id = segments.GetNthSegmentID(count)
    segments.GetSegment(segment_id).SetName(name)
    return segment_id


def names(segmentation):
    segments = segmentation.GetSegmentation()
    return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]


def test_segments_have_names_colors_geometry_and_match_ground_truth(scene, scans, tiny, tiny_checkpoint):
    logic = SegmentationLogic(scene)
    for path, truth in scans:
        volume = load_volume(scene, path)
        segmentation = logic.process(volume, TINY_LABELS, checkpointPath=tiny_checkpoint, device="cpu")
        assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
        assert sorted(names(segmentation)) == sorted(TINY_LABELS)
        on_node = sitk.Resample(truth, volume_to_image(volume), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        truth_array = sitk.GetArrayFromImage(on_node)
        segments = segmentation.GetSegmentation()
        scores = []
        for label in tiny.label_table:
            segment_id = segments.GetSegmentIdBySegmentName(label.name)
            assert np.allclose(segments.GetSegment(segment_id).GetColor(), np.array(label.color) / 255, atol=1e-3)
            scores.append(dice(read_segment(scene, segmentation, segment_id, volume), truth_array == label.value))
        assert np.mean(scores) > 0.45, (path.name, scores)
    assert logic.lastDevice == "cpu"


def test_overlapping_requests_are_whole_segments_and_add_no_temporary_nodes(scene, scans, tiny_checkpoint):
    """A label and a union holding it: two segments, each its own mask (they overlap), with their own colours."""
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    alone = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    nodes = scene.GetNumberOfNodes()
    both = logic.process(volume, ["Frontal_Sup_L", "Frontal_Sup_L+Frontal_Sup_R"], checkpointPath=tiny_checkpoint,
                         device="cpu")
    assert scene.GetNumberOfNodes() == nodes + 2  # the segmentation and its display node: nothing temporary left
    assert names(both) == ["Frontal_Sup_L", "Frontal_Sup_L+Frontal_Sup_R"]
    segments = both.GetSegmentation()
    single, union = (read_segment(scene, both, segments.GetNthSegmentID(i), volume) for i in range(2))
    assert (single & union).sum() > 0.95 * single.sum() > 0  # the label inside the union is not erased by it
    assert union.sum() > 1.5 * single.sum()
    first = read_segment(scene, alone, alone.GetSegmentation().GetNthSegmentID(0), volume)
    assert abs(int(first.sum()) - int(single.sum())) <= 0.01 * first.sum()  # the same whatever else was asked
    assert segments.GetNthSegment(0).GetColor() != segments.GetNthSegment(1).GetColor()


def test_user_segments_survive(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    mine = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    mine[10:20, 10:20, 10:20] = True
    for name in ("my tumour", "Frontal_Sup_L"):  # one carries an atlas label's name
        add_segment(scene, segmentation, name, mine, volume)
    SegmentationLogic(scene).process(volume, ["Frontal_Sup_L", "Temporal_Mid_L"], outputSegmentation=segmentation,
                                     checkpointPath=tiny_checkpoint, device="cpu")
    segments = segmentation.GetSegmentation()
    assert names(segmentation)[:2] == ["my tumour", "Frontal_Sup_L"] and len(names(segmentation)) == 4
    for i in range(2):
        assert np.array_equal(read_segment(scene, segmentation, segments.GetNthSegmentID(i), volume), mine)
    assert read_segment(scene, segmentation, segments.GetNthSegmentID(2), volume).sum() > 100


def test_cancel_leaves_the_scene_unchanged(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    before = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        SegmentationLogic(scene).process(volume, TINY_LABELS, checkpointPath=tiny_checkpoint, device="cpu", cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before


def test_another_label_reuses_the_cached_encoding(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[1][0])
    logic = SegmentationLogic(scene)
    start = time.perf_counter()
    segmentation = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    first = time.perf_counter() - start
    start = time.perf_counter()
    logic.process(volume, ["Temporal_Mid_R"], outputSegmentation=segmentation, checkpointPath=tiny_checkpoint, device="cpu")
    second = time.perf_counter() - start
    assert logic.encodings == 1
    assert second < first / 2  # registration and encoding were not repeated
    slicer.util.arrayFromVolume(volume)[0, 0, 0] += 1  # the voxels changed: the cache must not be reused
    slicer.util.arrayFromVolumeModified(volume)
    logic.process(volume, ["Temporal_Mid_R"], outputSegmentation=segmentation, checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.encodings == 2


def test_a_label_painted_on_the_atlas_is_segmented(scene, scans, tiny, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    truth = sitk.GetArrayFromImage(sitk.Resample(scans[0][1], volume_to_image(volume), sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    logic = SegmentationLogic(scene)
    atlas = logic.loadAtlas(tiny_checkpoint)
    assert sorted(names(atlas)) == sorted(TINY_LABELS)
    assert logic.loadAtlas(tiny_checkpoint) is atlas  # loaded once
    atlas_volume = scene.GetFirstNodeByName("LCS atlas image")
    source = read_segment(scene, atlas, atlas.GetSegmentation().GetSegmentIdBySegmentName("Frontal_Sup_L"), atlas_volume)
    painted = source.copy()
    painted[:, : int(np.median(np.nonzero(source)[1])), :] = False  # half of the label: a new sub-region
    painted_id = add_segment(scene, atlas, "frontal part", painted, atlas_volume)
    atlas.GetSegmentation().GetSegment(painted_id).SetColor(0.2, 0.4, 1.0)
    assert logic.paintedSegmentIds(tiny_checkpoint) == [painted_id]  # what the panel lists as painted
    segmentation = logic.process(volume, [painted_id], checkpointPath=tiny_checkpoint, device="cpu")
    assert names(segmentation) == ["frontal part"]
    assert np.allclose(segmentation.GetSegmentation().GetNthSegment(0).GetColor(), (0.2, 0.4, 1.0), atol=0.01)
    found = read_segment(scene, segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), volume)
    assert found.sum() > 50
    assert np.logical_and(found, truth == 3).sum() / found.sum() > 0.4  # on the structure it was painted in
    by_name = logic.process(volume, ["frontal part"], checkpointPath=tiny_checkpoint, device="cpu")  # name, not ID
    assert np.array_equal(read_segment(scene, by_name, by_name.GetSegmentation().GetNthSegmentID(0), volume), found)
    warped = logic.process(volume, [painted_id], checkpointPath=tiny_checkpoint, device="cpu", registration="deformable")
    found = read_segment(scene, warped, warped.GetSegmentation().GetNthSegmentID(0), volume)  # the region warped too
    assert found.sum() > 50 and np.logical_and(found, truth == 3).sum() / found.sum() > 0.4


def test_the_gui_path_runs_in_a_worker_thread_and_cancels_within_a_second(scene, scans, tiny_checkpoint):
    """start() and finish() on the main thread, run() in a worker, as the module's widget does."""
    volume = load_volume(scene, scans[1][0])
    logic = SegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    stop = threading.Event()
    job = logic.start(volume, TINY_LABELS, tiny_checkpoint, "cpu")
    errors = []
    worker = threading.Thread(target=lambda: _run(job, stop.is_set, errors))
    worker.start()
    time.sleep(0.3)
    stop.set()
    asked = time.perf_counter()
    worker.join()
    assert time.perf_counter() - asked < 1.0
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert scene.GetNumberOfNodes() == before and logic.encodings == 0

    job = logic.start(volume, TINY_LABELS, tiny_checkpoint, "cpu")
    worker = threading.Thread(target=lambda: _run(job, lambda: False, errors))
    worker.start()
    while worker.is_alive():  # the main thread stays free while the worker computes
        time.sleep(0.05)
    segmentation = logic.finish(job)
    assert sorted(names(segmentation)) == sorted(TINY_LABELS) and logic.encodings == 1


def _run(job, cancel, errors):
    try:
        job.run(cancel=cancel)
    except Exception as error:  # handed to the main thread, as the widget does
        errors.append(error)


def test_probability_volumes_and_replacing_same_named_segments(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    mine[10:20, 10:20, 10:20] = True
    for name in ("my tumour", "Frontal_Sup_L"):
        add_segment(scene, segmentation, name, mine, volume)
    logic.process(volume, ["Frontal_Sup_L"], outputSegmentation=segmentation, checkpointPath=tiny_checkpoint,
                  device="cpu", keepProbabilities=True, replaceExisting=True)
    assert sorted(names(segmentation)) == ["Frontal_Sup_L", "my tumour"]  # only the same-named one was replaced
    segments = segmentation.GetSegmentation()
    mine_id = segments.GetSegmentIdBySegmentName("my tumour")
    assert np.array_equal(read_segment(scene, segmentation, mine_id, volume), mine)
    new = read_segment(scene, segmentation, segments.GetSegmentIdBySegmentName("Frontal_Sup_L"), volume)
    assert new.sum() > 100 and not np.array_equal(new, mine)
    probability = scene.GetFirstNodeByName(f"{volume.GetName()} Frontal_Sup_L probability")
    p = slicer.util.arrayFromVolume(probability)
    assert p.shape == new.shape and 0 <= p.min() and p.max() <= 1
    assert p[new].mean() > 0.5 > p[~new].mean()


# ---- relabel missing organs ---------------------------------------------------------------------------------------
def partial_segmentation(scene, volume, truth, tiny, present):
    """A user's segmentation holding the true masks of `present` (the first one's name in lower case) and a
    segment with no atlas label's name."""
    on_node = sitk.GetArrayFromImage(sitk.Resample(truth, volume_to_image(volume), sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for i, name in enumerate(present):
        add_segment(scene, segmentation, name.lower() if i == 0 else name, on_node == tiny.label_table.resolve(name).value,
                    volume)
    tumour = np.zeros(on_node.shape, bool)
    tumour[10:20, 10:20, 10:20] = True
    add_segment(scene, segmentation, "my tumour", tumour, volume)
    return segmentation, on_node


def snapshot(scene, segmentation, volume) -> list:
    """Everything a user sees of each segment: ID, name, color, voxels, and the stored labelmap itself."""
    from vtk.util.numpy_support import vtk_to_numpy
    segments = segmentation.GetSegmentation()
    out = []
    for i in range(segments.GetNumberOfSegments()):
        segment_id, segment = segments.GetNthSegmentID(i), segments.GetNthSegment(i)
        stored = segment.GetRepresentation("Binary labelmap")
        out.append((segment_id, segment.GetName(), tuple(segment.GetColor()), segment.GetLabelValue(),
                    read_segment(scene, segmentation, segment_id, volume).tobytes(), tuple(stored.GetExtent()),
                    vtk_to_numpy(stored.GetPointData().GetScalars()).tobytes()))
    return out


def test_missing_labels_are_proposed_then_accepted_or_rejected_without_touching_the_users_segments(
        scene, scans, tiny, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    present = ["Frontal_Sup_L", "Temporal_Mid_R"]
    segmentation, truth = partial_segmentation(scene, volume, scans[0][1], tiny, present)
    logic = SegmentationLogic(scene)
    missing = logic.missingLabels(segmentation, tiny_checkpoint)
    assert missing == [l.name for l in tiny.label_table if l.name not in present]  # in table order, case-insensitive
    before = snapshot(scene, segmentation, volume)

    proposals = logic.proposeMissing(volume, segmentation, tiny_checkpoint, device="cpu", passes=3, keepUncertainty=True)
    assert snapshot(scene, segmentation, volume) == before  # the user's segmentation is bit-for-bit as it was
    assert proposals.GetName() == "mine proposals"
    assert proposals.GetNodeReference(proposals.GetReferenceImageGeometryReferenceRole()).GetID() == volume.GetID()
    assert sorted(names(proposals)) == sorted(missing)  # every large label of the tiny model is found
    masks = {}
    for segment_id, uncertainty in logic.listProposals(proposals):
        segment = proposals.GetSegmentation().GetSegment(segment_id)
        label = tiny.label_table.resolve(segment.GetName())
        assert np.allclose(segment.GetColor(), np.array(label.color) / 255, atol=1e-3)
        assert 0 < uncertainty < 0.5  # Monte Carlo dropout: a standard deviation of probabilities
        masks[segment.GetName()] = read_segment(scene, proposals, segment_id, volume)
        assert dice(masks[segment.GetName()], truth == label.value) > 0.3, segment.GetName()
        doubt = slicer.util.arrayFromVolume(scene.GetFirstNodeByName(f"{segment.GetName()} uncertainty"))
        assert doubt.shape == truth.shape and np.isclose(doubt[masks[segment.GetName()]].mean(), uncertainty, atol=1e-3)
    assert sum(m.astype(int) for m in masks.values()).max() == 1  # one label per voxel

    accepted, rejected, clashing = missing[0], missing[1], missing[2]
    ids = {proposals.GetSegmentation().GetNthSegment(i).GetName(): proposals.GetSegmentation().GetNthSegmentID(i)
           for i in range(len(missing))}
    new_id = logic.acceptProposal(proposals, ids[accepted], segmentation)
    assert names(segmentation) == [n for _, n, *_ in before] + [accepted]
    assert snapshot(scene, segmentation, volume)[:3] == before  # the user's segments are untouched
    assert np.array_equal(read_segment(scene, segmentation, new_id, volume), masks[accepted])
    assert np.allclose(segmentation.GetSegmentation().GetSegment(new_id).GetColor(),
                       np.array(tiny.label_table.resolve(accepted).color) / 255, atol=1e-3)
    logic.rejectProposal(proposals, ids[rejected])
    assert accepted not in names(proposals) and rejected not in names(proposals)
    for name in names(proposals):  # the remaining proposals kept their voxels
        assert np.array_equal(read_segment(scene, proposals, ids[name], volume), masks[name])

    add_segment(scene, segmentation, clashing.upper(), masks[clashing], volume)  # the user segments it meanwhile
    with_clash = snapshot(scene, segmentation, volume)
    with pytest.raises(LCSError, match="already has a segment named"):
        logic.acceptProposal(proposals, ids[clashing], segmentation)
    assert snapshot(scene, segmentation, volume) == with_clash and clashing in names(proposals)
    with pytest.raises(LCSError, match="accepted or rejected already"):
        logic.rejectProposal(proposals, ids[rejected])
    assert logic.missingLabels(segmentation, tiny_checkpoint) == [n for n in missing if n not in (accepted, clashing)]


def test_proposing_reuses_the_encoding_and_cancels_cleanly(scene, scans, tiny, tiny_checkpoint):
    volume = load_volume(scene, scans[1][0])
    segmentation, _ = partial_segmentation(scene, volume, scans[1][1], tiny, TINY_LABELS[:4])
    logic = SegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        logic.proposeMissing(volume, segmentation, tiny_checkpoint, device="cpu", cancel=lambda: True)
    assert scene.GetNumberOfNodes() == before and logic.encodings == 0
    with pytest.raises(LCSError, match="not missing"):
        logic.startProposals(volume, segmentation, tiny_checkpoint, "cpu", labels=["Frontal_Sup_L"])

    logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")  # registers and encodes
    job = logic.startProposals(volume, segmentation, tiny_checkpoint, "cpu", passes=2, labels=[TINY_LABELS[5].lower()])
    assert not job.encoded  # the cached encoding is reused
    errors = []
    worker = threading.Thread(target=lambda: _run(job, lambda: False, errors))
    worker.start()
    worker.join()
    assert not errors
    proposals = logic.finishProposals(job)
    assert names(proposals) == [TINY_LABELS[5]] and logic.encodings == 1
    assert scene.GetFirstNodeByName(f"{TINY_LABELS[5]} uncertainty") is None  # volumes only when asked for


def test_export_for_training_writes_a_case_that_training_reads(scene, scans, tiny, tiny_checkpoint, tmp_path):
    from lcs_training.data import case_files
    from LabelConditionedSegLib.training_folder import read_annotated

    volume = load_volume(scene, scans[0][0])
    present = ["Frontal_Sup_R", "Cerebelum_6_L"]
    segmentation, truth = partial_segmentation(scene, volume, scans[0][1], tiny, present)
    add_segment(scene, segmentation, "Precuneus_R (painted)", truth == tiny.label_table.resolve("Precuneus_R").value, volume)
    before = snapshot(scene, segmentation, volume)
    logic = SegmentationLogic(scene)
    notes = []
    logic.messages = notes.append
    folder = tmp_path / "data"
    path = logic.exportForTraining(volume, segmentation, folder, "case01", tiny_checkpoint)
    assert path == folder / "labels" / "case01.nii.gz"
    assert snapshot(scene, segmentation, volume) == before
    assert notes == ["Not exported (no atlas label of that name, or empty): my tumour, Precuneus_R (painted)."]
    assert list(case_files(folder)) == ["case01"]
    table = tiny.label_table
    assert [l.name for l in type(table).read_csv(folder / "labels.csv")] == [l.name for l in table]
    assert read_annotated(folder, "case01", table) == sorted(table.resolve(n).value for n in present)
    labels, image = sitk.ReadImage(str(path)), sitk.ReadImage(str(folder / "images" / "case01.nii.gz"))
    scan = volume_to_image(volume)
    for written in (labels, image):
        assert written.GetSize() == scan.GetSize()
        assert np.allclose(written.GetSpacing(), scan.GetSpacing()) and np.allclose(written.GetOrigin(), scan.GetOrigin())
        assert np.allclose(written.GetDirection(), scan.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(volume))
    expected = np.where(np.isin(truth, [table.resolve(n).value for n in present]), truth, 0)
    assert np.array_equal(sitk.GetArrayFromImage(labels), expected)

    with pytest.raises(LCSError, match="exists in"):
        logic.exportForTraining(volume, segmentation, folder, "case01", tiny_checkpoint)
    assert logic.exportForTraining(volume, segmentation, folder, "case01", tiny_checkpoint, overwrite=True) == path
    for bad in ("", "../case", "my case", "-x"):
        with pytest.raises(LCSError, match="case name"):
            logic.exportForTraining(volume, segmentation, folder, bad, tiny_checkpoint)
    (folder / "labels.csv").write_text("value,name,r,g,b\n1,Frontal_Sup_R,1,2,3\n")  # a folder of another model
    with pytest.raises(LCSError, match="labels.csv lacks"):
        logic.exportForTraining(volume, segmentation, folder, "case02", tiny_checkpoint)
    assert not logic.caseExists(folder, "case02")


def test_export_of_a_scan_without_segments_writes_an_unlabelled_case(scene, scans, colin27, tiny, tiny_checkpoint,
                                                                    tmp_path):
    """No segmentation, or an empty one: an all-zero label map on the scan's grid and an empty annotated file,
    which training reads as an unlabelled case (for pretraining and adversarial training)."""
    from lcs_training.data import check_training_folder, load_atlas, load_cases

    volume = load_volume(scene, scans[0][0])
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    before = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    logic = SegmentationLogic(scene)
    notes = []
    logic.messages = notes.append
    folder = tmp_path / "data"
    scan = volume_to_image(volume)
    for case, segmentation in (("none", None), ("empty", empty)):
        path = logic.exportForTraining(volume, segmentation, folder, case, tiny_checkpoint)
        labels = sitk.ReadImage(str(path))
        assert labels.GetSize() == scan.GetSize() and not sitk.GetArrayViewFromImage(labels).any()
        assert np.allclose(labels.GetOrigin(), scan.GetOrigin()) and np.allclose(labels.GetSpacing(), scan.GetSpacing())
        assert np.allclose(labels.GetDirection(), scan.GetDirection(), atol=1e-6)
        assert (folder / "annotated" / f"{case}.txt").read_text(encoding="utf-8") == ""
        assert "written unlabelled" in notes.pop()
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before
    assert [l.name for l in type(tiny.label_table).read_csv(folder / "labels.csv")] == [l.name for l in tiny.label_table]
    assert sorted(check_training_folder(folder)) == ["empty", "none"]
    cases = load_cases(folder, load_atlas(colin27, "colin27", 4.0, 8), registration="none")
    assert sorted(c.name for c in cases) == ["empty", "none"] and all(c.unlabelled for c in cases)

    mask = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    mask[10:20, 10:20, 10:20] = True
    add_segment(scene, empty, "my tumour", mask, volume)  # segments, none an atlas label: the user meant to label
    with pytest.raises(LCSError, match="exports as unlabelled"):
        logic.exportForTraining(volume, empty, folder, "tumour", tiny_checkpoint)


def test_the_plausibility_check_reaches_the_panel_and_stays_on_the_segmentation(scene, scans, colin27, tiny_checkpoint,
                                                                                tmp_path):
    """A head turned upside down under registration "none" is flagged in a message and in the output's LCS.check
    attribute (saved with the scene); a held-out head is not."""
    from LabelConditionedSegLib.logic import CHECK

    logic = SegmentationLogic(scene)
    notices = []
    logic.messages = notices.append
    good = logic.process(load_volume(scene, scans[0][0]), TINY_LABELS[:2], checkpointPath=tiny_checkpoint, device="cpu")
    assert good.GetAttribute(CHECK) == "" and not [n for n in notices if "Check failed" in n]
    head = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    upside = sitk.GetImageFromArray(sitk.GetArrayFromImage(head)[::-1].copy())
    upside.CopyInformation(head)
    sitk.WriteImage(upside, str(tmp_path / "upside.nii.gz"))
    volume = load_volume(scene, tmp_path / "upside.nii.gz")
    bad = logic.process(volume, TINY_LABELS[:2], checkpointPath=tiny_checkpoint, device="cpu", registration="none")
    assert bad.GetAttribute(CHECK).startswith("the scan does not match the atlas after registration")
    assert any(n.startswith("Check failed on upside: the scan does not match the atlas") for n in notices), notices
