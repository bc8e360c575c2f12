"""Issue 27's radiologist's flow in the Logic, on a real MRML scene (PyPI's slicer-core) with the tiny model:
relabelling segments named otherwise, and regions painted on an atlas shared by a fine-tuned model."""
import dataclasses

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.labels import LabelTable  # noqa: E402
from LabelConditionedSegLib.logic import SegmentationLogic  # noqa: E402
from LabelConditionedSegLib.proposals import DECODE_SECONDS, PREPARE_SECONDS  # noqa: E402

from conftest import TINY_LABELS  # noqa: E402
from test_slicer_logic import add_segment, load_volume, names, scans  # noqa: E402, F401 -- a fixture
from test_slicer_logic_review import other_checkpoint, paint_on_atlas, scene  # noqa: E402, F401 -- a fixture


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
