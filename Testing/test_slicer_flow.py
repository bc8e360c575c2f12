"""Issue 27's radiologist's flow in the Logic, on a real MRML scene (PyPI's slicer-core) with the tiny model: regions
painted on an atlas shared by a fine-tuned model."""
import dataclasses

import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.logic import SegmentationLogic  # noqa: E402

from test_slicer_logic import load_volume, names, scans  # noqa: E402, F401 -- a fixture
from test_slicer_logic_review import paint_on_atlas, scene  # noqa: E402, F401 -- a fixture


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
