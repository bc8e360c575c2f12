"""Issue 27's faults that live in the Logic, each on a real MRML scene (PyPI's slicer-core) with the tiny model."""
import dataclasses
import shutil
import time
import weakref
from functools import partial

import numpy as np
import pytest
import SimpleITK as sitk
import torch

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.jobs import Worker  # noqa: E402
from LabelConditionedSegLib.logic import ATLAS_MODEL, SegmentationLogic  # noqa: E402

from conftest import TINY_LABELS  # noqa: E402
from test_slicer_logic import (add_segment, load_volume, names, partial_segmentation, read_segment,  # noqa: E402
                               scans)  # noqa: F401 -- a fixture
from test_slicer_logic_review import scene  # noqa: E402, F401 -- a fixture


def outcome(worker: Worker):
    while worker.running:
        time.sleep(0.01)
    return worker.take()


# ---- 1: a finished job is freed -----------------------------------------------------------------------------------
def _fail(fraction, message):
    raise RuntimeError("the disk is full")


def test_a_finished_failed_or_cancelled_job_is_freed_while_its_worker_is_held(scene, scans, tiny_checkpoint):
    """In Slicer, PythonQt holds the panel's Background (and so its Worker) by a reference the cycle collector cannot
    see; a Worker that ran a job must therefore hold nothing of it once its outcome is taken. Freed by reference
    counting alone, without gc.collect."""
    volume = load_volume(scene, scans[1][0])
    logic = SegmentationLogic(scene)
    job = logic.start(volume, TINY_LABELS, tiny_checkpoint, "cpu", keepProbabilities=True)
    worker = Worker(job.run)
    result, failure = outcome(worker)
    assert result is None and failure is None
    logic.finish(job)
    freed = [weakref.ref(o) for o in (job, job.result, job.probabilities[0][1])]
    del job
    assert [r() for r in freed] == [None, None, None]
    assert logic.cacheSize() == 1  # the encoding is the cache's to keep (CACHE_ENTRIES), not the job's

    for kwargs, cancelled, message in (({"cancel": lambda: True}, True, "cancelled by the user; nothing was changed"),
                                       ({"progress": _fail}, False, "the disk is full")):
        logic.clearCache()  # the job encodes the volume itself, so its frames hold the scan and the features
        job = logic.start(volume, TINY_LABELS, tiny_checkpoint, "cpu")
        worker = Worker(partial(job.run, **kwargs))
        result, failure = outcome(worker)
        assert (failure.cancelled, failure.message) == (cancelled, message)
        assert "Traceback" in failure.details and not isinstance(failure.details, BaseException)
        freed = weakref.ref(job)
        del job
        assert freed() is None, "the worker keeps the failed job alive"


# ---- 2: export of segments imported as closed surfaces (models, STL, RTSTRUCT) -------------------------------------
def surface_segmentation(scene, name: str, center, radius: float):
    """A segmentation as a model, STL or RTSTRUCT import leaves it: one sphere, closed surface only."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*center)
    sphere.SetRadius(radius)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    assert segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "Frontal_Sup_L", [1, 0, 0])
    return segmentation


def test_a_segmentation_of_closed_surfaces_exports_its_voxels(scene, scans, tiny, tiny_checkpoint, tmp_path):
    """Fault 2. Slicer registers its converters when it starts (qSlicerSegmentationsModule::setup); slicer-core does
    not: a segmentation made before the rule is registered cannot be converted, which must be an error, not an
    "all segments empty"."""
    volume = load_volume(scene, scans[0][0])
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    logic = SegmentationLogic(scene)
    unconvertible = surface_segmentation(scene, "no converter", center, 15.0)
    with pytest.raises(LCSError, match=r"segments of no converter \(Closed surface\) could not be converted to a "
                                       "binary labelmap"):
        logic.exportForTraining(volume, unconvertible, tmp_path / "data", "case00", tiny_checkpoint)

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rule = slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()
    factory.RegisterConverterRule(rule)
    try:
        imported = surface_segmentation(scene, "imported", center, 15.0)
    finally:
        factory.UnregisterConverterRule(rule)
    path = logic.exportForTraining(volume, imported, tmp_path / "data", "case01", tiny_checkpoint)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    value = tiny.label_table.resolve("Frontal_Sup_L").value
    assert set(np.unique(labels)) == {0, value}
    sphere_ml = 4 / 3 * np.pi * 15.0 ** 3 / 1000
    found_ml = (labels == value).sum() * np.prod(volume.GetSpacing()) / 1000
    assert abs(found_ml - sphere_ml) / sphere_ml < 0.1, (found_ml, sphere_ml)


# ---- 4: a rewritten checkpoint is reloaded ------------------------------------------------------------------------
def test_a_checkpoint_rewritten_at_the_same_path_gives_its_new_weights_and_atlas(scene, scans, tiny, tiny_checkpoint,
                                                                                 tmp_path):
    """As after `lcs train` saved best.lcs again (by rename), then after a copy over it (in place)."""
    path = tmp_path / "best.lcs"
    shutil.copyfile(tiny_checkpoint, path)
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    first = logic.segmenter(path, "cpu")
    old_atlas = logic.loadAtlas(path)
    logic.process(volume, ["Frontal_Sup_L"], checkpointPath=path, device="cpu")
    assert logic.encodings == 1

    atlas = sitk.GetArrayFromImage(tiny.atlas_image)
    weights = {k: -v if v.is_floating_point() else v for k, v in tiny.weights.items()}
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(atlas[:, :, ::-1]))
    flipped.CopyInformation(tiny.atlas_image)
    dataclasses.replace(tiny, weights=weights, atlas_image=flipped,
                        provenance={**tiny.provenance, "name": "retrained"}).save(path)
    second = logic.segmenter(path, "cpu")
    assert second is not first and second.checkpoint.provenance["name"] == "retrained"
    assert all(torch.equal(second.checkpoint.weights[k], weights[k]) for k in weights)
    assert logic.atlasFor(path) is None  # the old atlas is the old file's
    new_atlas = logic.loadAtlas(path)
    assert new_atlas is not old_atlas and new_atlas.GetAttribute(ATLAS_MODEL) == "retrained"
    image = new_atlas.GetNodeReference(new_atlas.GetReferenceImageGeometryReferenceRole())
    assert np.allclose(slicer.util.arrayFromVolume(image), atlas[:, :, ::-1], atol=1e-2)  # stored as float16
    job = logic.start(volume, ["Frontal_Sup_L"], path, "cpu")
    assert job.encoded  # the old model's encoding of the volume is not reused
    job.run()
    logic.finish(job)
    assert job.segmenter is second and logic.encodings == 2

    shutil.copyfile(tiny_checkpoint, path)  # in place: the same file, another modification time and size
    assert logic.segmenter(path, "cpu").checkpoint.provenance["name"] == tiny.provenance["name"]
    assert logic.atlasFor(path) is old_atlas  # the same content as at first


# ---- 5: the run's model is built off the main thread -----------------------------------------------------------------
def test_the_runs_model_is_built_by_the_job_in_its_worker_thread(scene, scans, tiny_checkpoint):
    """The panel loads the CPU model in the background (labels, atlas); the model for the run's device, whose
    loading starts CUDA, must come in the worker thread too, not in `start` on the main thread."""
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    listed = logic.segmenter(tiny_checkpoint, "cpu")  # what the panel's loader loads
    for start in (lambda: logic.start(volume, ["Frontal_Sup_L"], tiny_checkpoint, "auto"),
                  lambda: logic.startProposals(volume, scene.AddNewNodeByClass("vtkMRMLSegmentationNode"),
                                               tiny_checkpoint, "auto", passes=1, labels=["Frontal_Sup_L"])):
        job = start()
        assert job.segmenter is None  # start, on the main thread, built no model
        assert outcome(Worker(job.run)) == (None, None)
        assert job.segmenter is logic.segmenter(tiny_checkpoint, "auto") and job.segmenter is not listed


# ---- 8: a deleted checkpoint file ------------------------------------------------------------------------------------
def test_a_deleted_checkpoint_is_one_clear_error_everywhere_the_panel_asks(scene, scans, tiny_checkpoint, tmp_path):
    """Whatever the panel asks about a model whose file was deleted after it was loaded, the answer is the one
    LCSError that it shows (never a stale model, nor another exception in an observer callback)."""
    path = tmp_path / "model.lcs"
    shutil.copyfile(tiny_checkpoint, path)
    volume = load_volume(scene, scans[0][0])
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic = SegmentationLogic(scene)
    logic.segmenter(path, "cpu")
    logic.loadAtlas(path)
    path.unlink()
    calls = {"checkpointVersion": lambda: logic.checkpointVersion(path),
             "segmenter": lambda: logic.segmenter(path, "cpu"),
             "atlasFor": lambda: logic.atlasFor(path),
             "loadAtlas": lambda: logic.loadAtlas(path),
             "paintedSegmentIds": lambda: logic.paintedSegmentIds(path),
             "missingLabels": lambda: logic.missingLabels(segmentation, path),
             "start": lambda: logic.start(volume, ["Frontal_Sup_L"], path, "cpu"),
             "startProposals": lambda: logic.startProposals(volume, segmentation, path, "cpu"),
             "exportForTraining": lambda: logic.exportForTraining(volume, segmentation, tmp_path, "case01", path)}
    said = {}
    for name, call in calls.items():
        with pytest.raises(LCSError) as error:
            call()
        said[name] = str(error.value)
    assert set(said.values()) == {f"checkpoint {path} does not exist; give the path of a .lcs file"}, said
    shutil.copyfile(tiny_checkpoint, path)  # put back: loaded again
    assert len(logic.missingLabels(segmentation, path)) == len(logic.segmenter(path, "cpu").checkpoint.label_table)


# ---- 7: undo takes back only what the run added ------------------------------------------------------------------
def test_undo_keeps_a_new_segmentation_that_holds_segments_added_since(scene, scans, tiny, tiny_checkpoint):
    """Undo last run took away the whole segmentation an Apply (or a proposal run) had created, with the segments the
    user had added to it since; now it takes the run's segments only."""
    volume = load_volume(scene, scans[0][0])
    tumour = np.zeros(slicer.util.arrayFromVolume(volume).shape, bool)
    tumour[10:20, 10:20, 10:20] = True
    logic = SegmentationLogic(scene)
    output = logic.process(volume, ["Frontal_Sup_L", "Temporal_Mid_L"], checkpointPath=tiny_checkpoint, device="cpu")
    add_segment(scene, output, "my tumour", tumour, volume)
    assert logic.undoLastRun() == (f"Undid segmenting Frontal_Sup_L, Temporal_Mid_L on {volume.GetName()}. "
                                   f"Kept {output.GetName()}: it holds segments added since.")
    assert scene.IsNodePresent(output) and names(output) == ["my tumour"]

    partial, _ = partial_segmentation(scene, volume, scans[0][1], tiny, ["Frontal_Sup_L"])
    proposals = logic.proposeMissing(volume, partial, tiny_checkpoint, device="cpu", passes=1,
                                     labels=["Temporal_Mid_L", "Cerebelum_6_L"])
    add_segment(scene, proposals, "noted", tumour, volume)
    assert logic.undoLastRun().endswith(f"Kept {proposals.GetName()}: it holds segments added since.")
    assert scene.IsNodePresent(proposals) and names(proposals) == ["noted"]


# ---- 10: the output's reference geometry is set only when it has none ---------------------------------------------
def test_apply_keeps_the_reference_geometry_an_output_segmentation_has(scene, scans, tiny_checkpoint):
    """The reference geometry is the grid Segment Editor edits segments on; a user's segmentation keeps its own (here
    another scan's grid), as Segment Editor leaves it. One without a geometry gets the input's."""
    volume, other = load_volume(scene, scans[0][0]), load_volume(scene, scans[1][0])
    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine.SetReferenceImageGeometryParameterFromVolumeNode(other)
    role = mine.GetReferenceImageGeometryReferenceRole()
    geometry = mine.GetSegmentation().GetConversionParameter("Reference image geometry")
    logic = SegmentationLogic(scene)
    logic.process(volume, ["Frontal_Sup_L"], outputSegmentation=mine, checkpointPath=tiny_checkpoint, device="cpu")
    assert mine.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry
    assert mine.GetNodeReferenceID(role) == other.GetID()
    fresh = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    assert fresh.GetNodeReferenceID(role) == volume.GetID()
    assert fresh.GetSegmentation().GetConversionParameter("Reference image geometry") != geometry
    segment = lambda node: read_segment(scene, node, node.GetSegmentation().GetNthSegmentID(0), volume)  # noqa: E731
    assert np.array_equal(segment(mine), segment(fresh))  # the same voxels of the input either way


# ---- 9: one parameter-node wrapper across scene closes -------------------------------------------------------------
def test_the_modules_parameter_node_outlives_a_scene_close_with_its_observers(scene):
    """What the panel's binding relies on (the Qt part is checked in test_slicer_module): File > Close scene resets
    the module's singleton parameter node, but it is the same node, and observers on it stay; so a new wrapper bound
    at every close would add observers for good."""
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetSingletonTag("LabelConditionedSeg")  # as ScriptedLoadableModuleLogic.createParameterNode makes it
    node.SetParameter("device", "cpu")
    scene.AddNode(node)
    modified = []
    tag = node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: modified.append(event))
    scene.Clear(0)
    assert scene.GetSingletonNode("LabelConditionedSeg", "vtkMRMLScriptedModuleNode") is node
    assert node.GetParameterNames() == () and modified and node.HasObserver(vtk.vtkCommand.ModifiedEvent)
    node.RemoveObserver(tag)
