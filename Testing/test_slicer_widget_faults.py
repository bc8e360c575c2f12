"""Issue 27's panel faults whose cause lives outside Qt (faults 6, 11 and 14), on a real MRML scene (PyPI's
slicer-core) with the tiny model; test_slicer_module.py checks the Qt side statically."""
import re
from pathlib import Path

import pytest
import torch

slicer = pytest.importorskip("slicer")

from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.logic import SegmentationLogic  # noqa: E402
from LabelConditionedSegLib.torch_version import MINIMUM, installed_torch_problem, torch_version_problem  # noqa: E402

from test_slicer_logic import load_volume, partial_segmentation, scans  # noqa: E402, F401 -- a fixture
from test_slicer_logic_review import scene  # noqa: E402, F401 -- a fixture

ROOT = Path(__file__).resolve().parents[1]


# ---- 6: export checks that the segmentation is the chosen volume's ------------------------------------------------
def test_export_refuses_a_segmentation_drawn_on_another_volume(scene, scans, tiny, tiny_checkpoint, tmp_path):
    """The panel's Export used the Relabel section's segmentation with whatever Input volume was chosen: a
    segmentation of one scan was written as the labels of another. Its reference volume must be the scan."""
    first, second = load_volume(scene, scans[0][0]), load_volume(scene, scans[1][0])
    segmentation, _ = partial_segmentation(scene, first, scans[0][1], tiny, ["Frontal_Sup_R"])
    logic = SegmentationLogic(scene)
    folder = tmp_path / "data"
    with pytest.raises(LCSError, match=f"mine was drawn on {first.GetName()}, not on {second.GetName()}; choose "
                                       f"{first.GetName()} as the input volume"):
        logic.exportForTraining(second, segmentation, folder, "wrong", tiny_checkpoint)
    assert not logic.caseExists(folder, "wrong")
    atlas = logic.loadAtlas(tiny_checkpoint)  # the atlas labels lie on the atlas image, not on a scan
    with pytest.raises(LCSError, match="LCS atlas labels was drawn on LCS atlas image"):
        logic.exportForTraining(first, atlas, folder, "atlas", tiny_checkpoint)
    assert logic.exportForTraining(first, segmentation, folder, "right", tiny_checkpoint).exists()


# ---- 11: atlas nodes stay out of the panel's scan and output selectors ---------------------------------------------
def test_atlas_nodes_are_named_and_never_the_default_input(scene, scans, tiny_checkpoint):
    """Loading the atlas into an empty scene made its image the first volume, so the panel chose it as Input volume;
    the panel hides these IDs from its own selectors."""
    logic = SegmentationLogic(scene)
    assert logic.defaultInputVolume() is None and logic.atlasNodeIds() == []
    atlas = logic.loadAtlas(tiny_checkpoint)
    image = atlas.GetNodeReference(atlas.GetReferenceImageGeometryReferenceRole())
    assert logic.defaultInputVolume() is None  # the atlas image is no scan
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "a label map")  # not what the input selector lists
    volume = load_volume(scene, scans[0][0])
    assert logic.defaultInputVolume() is volume
    assert sorted(logic.atlasNodeIds()) == sorted([image.GetID(), atlas.GetID()])
    output = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    assert output.GetID() not in logic.atlasNodeIds()


# ---- 14: the installed PyTorch's version is checked before it is used ----------------------------------------------
@pytest.mark.parametrize("version, ok", [("2.2.2", False), ("2.3.1+cpu", False), ("1.13.1", False), ("2.4.0", True),
                                        ("2.6.0+cu124", True), ("2.10.1", True), ("3.0.0", True),
                                        ("unknown", False)])
def test_the_torch_version_check(version, ok):
    problem = torch_version_problem(version)
    assert (problem == "") == ok
    if not ok:
        assert problem.startswith(f"PyTorch {version} is installed, but LCS needs PyTorch 2.4 or newer: update it")
        assert "\n" not in problem and "Intel Mac" in problem and "2.2.2" in problem


def test_the_version_check_agrees_with_pyproject_and_passes_the_installed_torch():
    (pinned,) = re.findall(r'"torch>=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert tuple(map(int, pinned)) == MINIMUM
    assert installed_torch_problem() == "" and not torch_version_problem(torch.__version__)
