"""Issue 27's radiologist's flow in the Logic, on a real MRML scene (PyPI's slicer-core) with the tiny model: the
registration check beside the result and the registered atlas over the scan, relabelling segments named otherwise,
the run's volumes, and regions painted on an atlas shared by a fine-tuned model."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.checkpoint import Checkpoint  # noqa: E402
from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.labels import LabelTable  # noqa: E402
from LabelConditionedSegLib.logic import OUTLINE_OF, SegmentationLogic, volume_to_image  # noqa: E402
from LabelConditionedSegLib.proposals import DECODE_SECONDS, PREPARE_SECONDS  # noqa: E402

from conftest import TINY_LABELS  # noqa: E402
from test_slicer_logic import add_segment, load_volume, names, read_segment, scans  # noqa: E402, F401 -- a fixture
from test_slicer_logic_review import other_checkpoint, paint_on_atlas, scene  # noqa: E402, F401 -- a fixture


def upside_down(colin27, folder):
    """Colin27 turned upside down: under registration "none" the registration check fails."""
    head = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    upside = sitk.GetImageFromArray(sitk.GetArrayFromImage(head)[::-1].copy())
    upside.CopyInformation(head)
    sitk.WriteImage(upside, str(folder / "upside.nii.gz"))
    return folder / "upside.nii.gz"


def outlines(scene) -> list:
    """The registered atlas outline nodes; fails when one left a display node behind."""
    nodes = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    displays = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationDisplayNode")
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationDisplayNode"))]
    assert len(displays) == len(nodes)
    return [n for n in nodes if n.GetAttribute(OUTLINE_OF)]


def test_a_failed_registration_is_the_warning_beside_the_result_and_the_atlas_shows_where_it_went(
        scene, scans, colin27, tiny_checkpoint, tmp_path):
    logic = SegmentationLogic(scene)
    volume = load_volume(scene, scans[0][0])
    good = logic.process(volume, TINY_LABELS[:2], checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.checkWarning(good) == ""
    outline = logic.showRegisteredAtlas(good)
    assert names(outline) == ["Registered atlas brain"] and not outline.GetDisplayNode().GetVisibility2DFill()
    brain = read_segment(scene, outline, outline.GetSegmentation().GetNthSegmentID(0), volume)
    truth = sitk.GetArrayFromImage(sitk.Resample(scans[0][1], volume_to_image(volume), sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, 0)) > 0
    assert brain[truth].mean() > 0.85  # the atlas brain lies over the scan's brain: its labels fall inside (0.92)
    again = logic.showRegisteredAtlas(good)
    assert outlines(scene) == [again] and not scene.IsNodePresent(outline)  # one node, never a leftover

    bad = logic.process(load_volume(scene, upside_down(colin27, tmp_path)), TINY_LABELS[:2],
                        checkpointPath=tiny_checkpoint, device="cpu", registration="none")
    assert logic.checkWarning(bad).startswith("Check failed: the scan does not match the atlas after registration "
                                              "(alignment ")
    assert logic.checkWarning(good) == ""  # each result keeps its own check
    assert outlines(scene) == [again]  # the outline of another output stays
    assert not logic.canShowRegisteredAtlas(good) and logic.canShowRegisteredAtlas(bad)
    with pytest.raises(LCSError, match="the registration is known for the last Apply's output only"):
        logic.showRegisteredAtlas(good)
    shown = logic.showRegisteredAtlas(bad)
    assert logic.undoLastRun().startswith("Undid showing the registered atlas on upside")
    assert not scene.IsNodePresent(shown) and outlines(scene) == [again]
    logic.process(volume, TINY_LABELS[2:3], outputSegmentation=good, checkpointPath=tiny_checkpoint, device="cpu")
    assert outlines(scene) == []  # a new run on `good`: its earlier registration's outline goes
    scene.Clear(False)
    assert not logic.canShowRegisteredAtlas(good)


def with_terminology(segmentation, segmentId: str, code: str) -> None:
    entry = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
             f"{code}~^^~Anatomic codes - DICOM master list~^^~^^")
    segmentation.GetSegmentation().GetSegment(segmentId).SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)


def test_relabel_takes_segments_named_otherwise_or_coded_for_their_labels_and_says_how_long(
        scene, scans, tiny, tiny_checkpoint, tmp_path):
    code = "SCT^9999999^Superior frontal gyrus (test code)"
    table = LabelTable([dataclasses.replace(l, code=code if l.name == "Frontal_Sup_R" else "") for l in tiny.label_table])
    coded = other_checkpoint(tiny_checkpoint, tmp_path, label_table=table)
    volume = load_volume(scene, scans[0][0])
    shape = slicer.util.arrayFromVolume(volume).shape
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    box = np.zeros(shape, bool)
    box[20:30, 20:30, 20:30] = True
    add_segment(scene, mine, "left superior frontal gyrus", box, volume)
    with_terminology(mine, add_segment(scene, mine, "Segment_2", box, volume), code)
    add_segment(scene, mine, "my tumour", box, volume)
    logic = SegmentationLogic(scene)

    assert [(m.segmentName, m.label, m.how) for m in logic.matchedSegments(mine, coded)] == [
        ("left superior frontal gyrus", "Frontal_Sup_L", "similar name"), ("Segment_2", "Frontal_Sup_R", "code")]
    missing = logic.missingLabels(mine, coded)
    assert missing == [n for n in TINY_LABELS if n not in ("Frontal_Sup_L", "Frontal_Sup_R")]
    with pytest.raises(LCSError, match="Frontal_Sup_L: not missing from mine"):
        logic.startProposals(volume, mine, coded, "cpu", labels=["Frontal_Sup_L"])
    # the tiny model has dropout: each label is decoded once per pass; nothing measured yet, nothing cached
    assert logic.proposalSeconds(4, 8, "cpu", volume, coded) == pytest.approx(4 * 8 * DECODE_SECONDS + PREPARE_SECONDS)

    job = logic.startProposals(volume, mine, coded, "cpu", passes=2, labels=missing[:2])
    job.run()
    logic.finishProposals(job)
    assert 0 < job.decodeSeconds < 60
    assert logic.proposalSeconds(4, 8, "cpu", volume, coded) == pytest.approx(4 * 8 * job.decodeSeconds)  # cached
    assert logic.proposalSeconds(4, 8, "cpu", None, coded) == pytest.approx(4 * 8 * job.decodeSeconds +
                                                                            PREPARE_SECONDS)


def test_the_runs_volumes_with_their_flag_follow_the_segments(scene, scans, colin27, tiny_checkpoint, tmp_path):
    logic = SegmentationLogic(scene)
    volume = load_volume(scene, scans[0][0])
    output = logic.process(volume, TINY_LABELS[:2], checkpointPath=tiny_checkpoint, device="cpu")
    logic.process(volume, TINY_LABELS[2:3], outputSegmentation=output, checkpointPath=tiny_checkpoint, device="cpu")
    rows = logic.runVolumes(output)
    assert [r["name"] for r in rows] == names(output) == TINY_LABELS[:3]
    voxel_ml = float(np.prod(volume.GetSpacing())) / 1000
    segments = output.GetSegmentation()
    for row in rows:
        found = read_segment(scene, output, segments.GetSegmentIdBySegmentName(row["name"]), volume).sum() * voxel_ml
        assert row["volume_ml"] == pytest.approx(found, rel=1e-3) and row["atlas_ml"] > 0 and row["flag"] == ""
    segments.RemoveSegment(segments.GetSegmentIdBySegmentName(TINY_LABELS[0]))
    assert [r["name"] for r in logic.runVolumes(output)] == TINY_LABELS[1:3]

    bad = logic.process(load_volume(scene, upside_down(colin27, tmp_path)), TINY_LABELS[:2],
                        checkpointPath=tiny_checkpoint, device="cpu", registration="none")
    assert all(r["flag"].startswith("the scan does not match the atlas") for r in logic.runVolumes(bad))


def test_a_fine_tuned_model_keeps_the_regions_painted_on_its_atlas(scene, scans, tiny, tiny_checkpoint, tmp_path):
    """Atlas nodes are the atlas's (its content), not one checkpoint file's: a model fine-tuned from the tiny one has
    other weights and the same atlas."""
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    atlas, painted_id, _ = paint_on_atlas(scene, logic, tiny_checkpoint)
    weights = {k: v * 0.9 if v.is_floating_point() else v for k, v in tiny.weights.items()}
    tuned = tmp_path / "fine-tuned.lcs"
    dataclasses.replace(tiny, weights=weights, provenance={**tiny.provenance, "name": "fine-tuned"}).save(tuned)
    assert logic.atlasFor(tuned) is atlas and logic.loadAtlas(tuned) is atlas
    assert logic.paintedSegmentIds(tuned) == [painted_id]
    found = logic.process(volume, [painted_id], checkpointPath=tuned, device="cpu")
    assert names(found) == ["frontal part"]
    assert logic.segmenter(tuned, "cpu").checkpoint.provenance["name"] == "fine-tuned"
