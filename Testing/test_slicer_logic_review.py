"""Issue 14, the Logic side, on a real MRML scene (PyPI's slicer-core): no temporary nodes, a real undo, transformed
volumes, observer bookkeeping, a bounded encoding cache, atlases tied to their checkpoint, the bundled model by name,
and terminology codes."""
import dataclasses
import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from LabelConditionedSegLib.checkpoint import BUNDLED, Checkpoint  # noqa: E402
from LabelConditionedSegLib.errors import LCSError  # noqa: E402
from LabelConditionedSegLib.labels import LabelTable  # noqa: E402
from LabelConditionedSegLib.logic import (ATLAS_OF, BUNDLED_MODEL, CACHE_ENTRIES, UNCERTAINTY_TAG,  # noqa: E402
                                          SegmentationLogic)

from test_slicer_logic import (add_segment, load_volume, names, partial_segmentation, read_segment,  # noqa: E402
                               scans)  # noqa: F401 -- a fixture

Segmentations = slicer.vtkSlicerSegmentationsModuleLogic


@pytest.fixture
def scene():
    """A scene with a subject hierarchy node, as Slicer's always has (so node lists compare like in Slicer)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    yield scene
    scene.Clear(True)


def nodes(scene) -> list:
    """Every node of the scene, as (ID, class)."""
    return [(scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetClassName()) for i in range(scene.GetNumberOfNodes())]


def stored(segmentation, segment_id, world: bool):
    """A segment's stored labelmap, read without the logic: (image, its voxels as a boolean array), in the
    segmentation's own coordinates or (`world`) through its parent transforms."""
    image = slicer.vtkOrientedImageData()
    assert Segmentations.GetSegmentBinaryLabelmapRepresentation(segmentation, segment_id, image, world)
    e = image.GetExtent()
    if e[1] < e[0]:
        return image, np.zeros((0, 0, 0), bool)
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    return image, array == segmentation.GetSegmentation().GetSegment(segment_id).GetLabelValue()


def voxels(segmentation, segment_id, shape) -> np.ndarray:
    """A segment's voxels on the grid it was written on (the volume's)."""
    image, array = stored(segmentation, segment_id, False)
    out = np.zeros(shape, bool)
    e = image.GetExtent()
    out[e[4]:e[4] + array.shape[0], e[2]:e[2] + array.shape[1], e[0]:e[0] + array.shape[2]] = array
    return out


def state(scene, segmentation, shape) -> list:
    """What a user sees of a segmentation: each segment's ID, name, colour, tags that matter, and voxels."""
    segments = segmentation.GetSegmentation()
    out = []
    for i in range(segments.GetNumberOfSegments()):
        segment_id, segment = segments.GetNthSegmentID(i), segments.GetNthSegment(i)
        tag = vtk.reference("")
        segment.GetTag(UNCERTAINTY_TAG, tag)
        out.append((segment_id, segment.GetName(), tuple(np.round(segment.GetColor(), 4)), str(tag),
                    voxels(segmentation, segment_id, shape).tobytes()))
    return out


def world_centroid(segmentation, segment_id) -> np.ndarray:
    """Where a segment's voxels are in world space (through the segmentation's parent transforms)."""
    image, array = stored(segmentation, segment_id, True)
    e = image.GetExtent()
    k, j, i = np.nonzero(array)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return _apply(matrix, np.stack([i + e[0], j + e[2], k + e[4]], 1)).mean(0)


def expected_centroid(volume, mask) -> np.ndarray:
    """Where a mask on the volume's grid is in world space (through the volume's parent transforms)."""
    k, j, i = np.nonzero(mask)
    ijk_to_ras, to_world = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    if volume.GetParentTransformNode() is not None:
        volume.GetParentTransformNode().GetMatrixTransformToWorld(to_world)
    return _apply(to_world, _apply(ijk_to_ras, np.stack([i, j, k], 1))).mean(0)


def _apply(matrix, points) -> np.ndarray:
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    return points @ m[:3, :3].T + m[:3, 3]


def rotation_and_shift(scene, degrees, shift):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    set_matrix(transform, degrees, shift)
    return transform


def set_matrix(transform, degrees, shift) -> None:
    t = vtk.vtkTransform()
    t.Translate(*shift)
    t.RotateZ(degrees)
    transform.SetMatrixTransformToParent(t.GetMatrix())


def paint_on_atlas(scene, logic, checkpoint, name="frontal part"):
    """A region painted on the checkpoint's atlas: half of Frontal_Sup_L. Returns (atlas, segment ID, mask)."""
    atlas = logic.loadAtlas(checkpoint)
    image = atlas.GetNodeReference(atlas.GetReferenceImageGeometryReferenceRole())
    source = voxels(atlas, atlas.GetSegmentation().GetSegmentIdBySegmentName("Frontal_Sup_L"),
                    slicer.util.arrayFromVolume(image).shape)
    painted = source.copy()
    painted[:, : int(np.median(np.nonzero(source)[1])), :] = False
    return atlas, add_segment(scene, atlas, name, painted, image), painted


def other_checkpoint(tiny_checkpoint, folder: Path, **changes) -> Path:
    """Another checkpoint: the tiny model with other provenance (or labels), saved elsewhere."""
    checkpoint = Checkpoint.load(tiny_checkpoint)
    provenance = {**checkpoint.provenance, "name": "retrained tiny"}
    checkpoint = dataclasses.replace(checkpoint, provenance=provenance, **changes)
    path = folder / "other.lcs"
    checkpoint.save(path)
    return path


# ---- 3: no temporary nodes ----------------------------------------------------------------------------------------
def test_reading_segments_adds_no_node(scene, scans, tiny, tiny_checkpoint, tmp_path):
    """Exporting segments and reading a painted atlas region leave the scene's nodes as they were (the old
    ExportSegmentsToLabelmapNode route left a colour table node behind each time)."""
    volume = load_volume(scene, scans[0][0])
    segmentation, truth = partial_segmentation(scene, volume, scans[0][1], tiny, ["Frontal_Sup_R", "Cerebelum_6_L"])
    logic = SegmentationLogic(scene)
    before = nodes(scene)
    path = logic.exportForTraining(volume, segmentation, tmp_path / "data", "case01", tiny_checkpoint)
    assert nodes(scene) == before
    values = [tiny.label_table.resolve(n).value for n in ("Frontal_Sup_R", "Cerebelum_6_L")]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), np.where(np.isin(truth, values), truth, 0))

    _, painted_id, painted = paint_on_atlas(scene, logic, tiny_checkpoint)
    before = nodes(scene)
    job = logic.start(volume, [painted_id], tiny_checkpoint, "cpu")
    assert nodes(scene) == before
    condition = job.conditions[0]
    assert np.array_equal(condition.within((0, 0, 0), painted.shape), painted)  # read on the atlas grid, exactly


# ---- 4: undo ------------------------------------------------------------------------------------------------------
def test_undo_after_apply_removes_the_new_segmentation(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    assert not logic.canUndo()
    before = nodes(scene)
    logic.process(volume, ["Frontal_Sup_L", "Temporal_Mid_L"], checkpointPath=tiny_checkpoint, device="cpu",
                  keepProbabilities=True)
    assert len(nodes(scene)) == len(before) + 4  # segmentation, its display node, two probability volumes
    assert logic.canUndo()
    assert logic.undoLastRun() == f"Undid segmenting Frontal_Sup_L, Temporal_Mid_L on {volume.GetName()}."
    assert nodes(scene) == before
    assert not logic.canUndo()
    with pytest.raises(LCSError, match="nothing to undo"):
        logic.undoLastRun()


def test_undo_after_apply_with_replace_restores_the_replaced_segments(scene, scans, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    shape = slicer.util.arrayFromVolume(volume).shape
    logic = SegmentationLogic(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    mine = np.zeros(shape, bool)
    mine[10:20, 10:20, 10:20] = True
    for name in ("my tumour", "Frontal_Sup_L", "Temporal_Mid_L"):
        add_segment(scene, segmentation, name, mine, volume)
    before, segments_before = nodes(scene), state(scene, segmentation, shape)
    geometry = segmentation.GetSegmentation().GetConversionParameter("Reference image geometry")
    reference = segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole())
    logic.process(volume, ["Frontal_Sup_L", "Cerebelum_6_L"], outputSegmentation=segmentation,
                  checkpointPath=tiny_checkpoint, device="cpu", replaceExisting=True)
    assert names(segmentation) == ["my tumour", "Temporal_Mid_L", "Frontal_Sup_L", "Cerebelum_6_L"]
    logic.undoLastRun()
    assert state(scene, segmentation, shape) == segments_before  # same IDs, order, names, colours and voxels
    assert nodes(scene) == before
    assert segmentation.GetSegmentation().GetConversionParameter("Reference image geometry") == geometry
    assert segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()) == reference


def test_undo_after_proposals_accept_and_reject(scene, scans, tiny, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    shape = slicer.util.arrayFromVolume(volume).shape
    segmentation, _ = partial_segmentation(scene, volume, scans[0][1], tiny, ["Frontal_Sup_L", "Temporal_Mid_R"])
    logic = SegmentationLogic(scene)
    before = nodes(scene)
    logic.proposeMissing(volume, segmentation, tiny_checkpoint, device="cpu", passes=2, keepUncertainty=True)
    assert logic.undoLastRun().startswith("Undid proposing")
    assert nodes(scene) == before

    proposals = logic.proposeMissing(volume, segmentation, tiny_checkpoint, device="cpu", passes=2)
    mine, theirs = state(scene, segmentation, shape), state(scene, proposals, shape)
    ids = [segment_id for segment_id, _ in logic.listProposals(proposals)]
    accepted = logic.acceptProposal(proposals, ids[1], segmentation)
    assert names(segmentation)[-1] == theirs[1][1] and segmentation.GetSegmentation().GetSegment(accepted) is not None
    assert logic.undoLastRun() == f"Undid accepting proposal {theirs[1][1]} into mine."
    assert state(scene, segmentation, shape) == mine and state(scene, proposals, shape) == theirs  # back in its place

    logic.rejectProposal(proposals, ids[0])
    assert len(names(proposals)) == len(theirs) - 1
    assert logic.undoLastRun() == f"Undid rejecting proposal {theirs[0][1]}."
    assert state(scene, proposals, shape) == theirs

    with logic.undoGroup("accepting 2 proposals"):  # what the panel's Accept does with several selected
        for segment_id in ids[:2]:
            logic.acceptProposal(proposals, segment_id, segmentation)
    assert logic.undoLastRun() == "Undid accepting 2 proposals."
    assert state(scene, segmentation, shape) == mine and state(scene, proposals, shape) == theirs

    logic.acceptProposal(proposals, ids[2], segmentation)  # then the user deletes the proposals
    scene.RemoveNode(proposals)
    assert logic.canUndo()
    logic.undoLastRun()
    assert state(scene, segmentation, shape) == mine


def test_undo_survives_deleted_nodes_and_a_closed_scene(scene, scans, tiny_checkpoint):
    logic = SegmentationLogic(scene)
    for closing in (True, False):
        volume = load_volume(scene, scans[0][0])
        segmentation = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
        if closing:  # File > Close scene, and the next scene's nodes get the same IDs again
            old_id = segmentation.GetID()
            scene.Clear(0)
            assert scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "the next scene's").GetID() == old_id
        else:  # the user deletes the output
            scene.RemoveNode(segmentation)
        assert not logic.canUndo()
        with pytest.raises(LCSError, match="nothing to undo"):
            logic.undoLastRun()


# ---- 5: transformed volumes ---------------------------------------------------------------------------------------
def test_segments_of_a_transformed_volume_lie_on_its_voxels(scene, scans, tiny, tiny_checkpoint):
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    plain = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    mask = read_segment(scene, plain, plain.GetSegmentation().GetNthSegmentID(0), volume)
    transform = rotation_and_shift(scene, 20, (15, -10, 5))
    volume.SetAndObserveTransformNodeID(transform.GetID())

    moved = logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu",
                          keepProbabilities=True)
    assert moved.GetTransformNodeID() == transform.GetID()
    segment_id = moved.GetSegmentation().GetNthSegmentID(0)
    assert np.allclose(world_centroid(moved, segment_id), expected_centroid(volume, mask), atol=0.5)
    probability = scene.GetFirstNodeByName(f"{volume.GetName()} Frontal_Sup_L probability")
    assert probability.GetTransformNodeID() == transform.GetID()
    set_matrix(transform, -10, (0, 30, 0))  # the transform changes later: the segment moves with the volume
    assert np.allclose(world_centroid(moved, segment_id), expected_centroid(volume, mask), atol=0.5)

    segmentation, _ = partial_segmentation(scene, volume, scans[0][1], tiny, ["Temporal_Mid_R"])
    proposals = logic.proposeMissing(volume, segmentation, tiny_checkpoint, device="cpu", passes=1,
                                     labels=["Frontal_Sup_L"])
    assert proposals.GetTransformNodeID() == transform.GetID()

    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine, not transformed")
    add_segment(scene, mine, "my tumour", mask, volume)
    logic.process(volume, ["Frontal_Sup_L"], outputSegmentation=mine, checkpointPath=tiny_checkpoint, device="cpu")
    assert mine.GetTransformNodeID() is None  # its segments stay where they are...
    new_id = mine.GetSegmentation().GetSegmentIdBySegmentName("Frontal_Sup_L")
    assert np.allclose(world_centroid(mine, new_id), expected_centroid(volume, mask), atol=0.5)  # ...the new one too
    proposal_id = proposals.GetSegmentation().GetNthSegmentID(0)
    where = world_centroid(proposals, proposal_id)
    accepted = logic.acceptProposal(proposals, proposal_id, segmentation)  # into a segmentation under no transform
    assert segmentation.GetTransformNodeID() is None
    assert np.allclose(world_centroid(segmentation, accepted), where, atol=0.01)


# ---- 6: observers -------------------------------------------------------------------------------------------------
def test_segment_observers_follow_list_changes_not_strokes_and_go_away(scene, scans):
    volume = load_volume(scene, scans[0][0])
    shape = slicer.util.arrayFromVolume(volume).shape
    scene_events = (slicer.vtkMRMLScene.NodeRemovedEvent, slicer.vtkMRMLScene.EndCloseEvent)
    assert not any(scene.HasObserver(e) for e in scene_events)
    logic = SegmentationLogic(scene)
    assert all(scene.HasObserver(e) for e in scene_events)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "watched")
    calls = []
    logic.observeSegments(segmentation, calls.append)
    logic.observeSegments(segmentation, calls.append)  # twice: still one set of observers
    mask = np.zeros(shape, bool)
    mask[10:20, 10:20, 10:20] = True
    segment_id = add_segment(scene, segmentation, "region", mask, volume)  # added, then renamed
    assert calls and all(c is segmentation for c in calls)
    calls.clear()
    stroke = slicer.vtkOrientedImageData()  # a paint stroke, as Segment Editor applies it
    stroke.SetExtent(0, 4, 0, 4, 0, 4)
    stroke.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    stroke.GetPointData().GetScalars().Fill(1)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    stroke.SetImageToWorldMatrix(matrix)
    assert Segmentations.SetBinaryLabelmapToSegment(stroke, segmentation, segment_id, Segmentations.MODE_MERGE_MASK)
    assert calls == []
    segmentation.GetSegmentation().GetSegment(segment_id).SetName("renamed")
    segmentation.GetSegmentation().GetSegment(segment_id).SetColor(0.1, 0.2, 0.3)
    segmentation.GetSegmentation().RemoveSegment(segment_id)
    assert calls == [segmentation] * 3

    logic.stopObservingSegments(segmentation)
    assert not segmentation.HasObserver(slicer.vtkSegmentation.SegmentModified)
    segmentation.GetSegmentation().AddEmptySegment("", "quiet")
    assert calls == [segmentation] * 3

    deleted = []
    for name in ("removed", "closed"):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        logic.observeSegments(node, calls.append)
        node.AddObserver(vtk.vtkCommand.DeleteEvent, lambda *unused, name=name: deleted.append(name))
        if name == "removed":  # the user deletes it: the logic lets go, so the node is freed
            scene.RemoveNode(node)
        else:  # File > Close scene
            scene.Clear(0)
        assert not node.HasObserver(slicer.vtkSegmentation.SegmentAdded)
        del node
        gc.collect()
        assert deleted[-1] == name

    kept = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "kept")
    logic.observeSegments(kept, calls.append)
    alive = weakref.ref(logic)
    logic.cleanup()
    assert not kept.HasObserver(slicer.vtkSegmentation.SegmentAdded)
    assert not any(scene.HasObserver(e) for e in scene_events)
    del logic
    gc.collect()
    assert alive() is None  # nothing in the scene holds the logic any more


# ---- 7: the encoded-volume cache ----------------------------------------------------------------------------------
@pytest.mark.slow  # 5-8 s on 2 cores: the fast tier stays under 5 minutes; CI runs both
def test_the_encoding_cache_is_bounded_and_emptied(scene, scans, tiny_checkpoint):
    logic = SegmentationLogic(scene)
    assert logic.cacheSize() == 0 and logic.cacheDescription() == "No encoded volume cached."
    volumes = [load_volume(scene, scans[i % 2][0]) for i in range(3)]
    for i, volume in enumerate(volumes):
        volume.SetName(f"volume{i}")
    for volume in volumes:
        logic.process(volume, ["Frontal_Sup_L"], checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.encodings == 3 and logic.cacheSize() == CACHE_ENTRIES == 2
    description = logic.cacheDescription()
    assert volumes[1].GetName() in description and volumes[2].GetName() in description
    scans_mb = sum(slicer.util.arrayFromVolume(v).nbytes for v in volumes[1:]) / 2**20
    assert float(description.split("about ")[1].split(" MB")[0]) >= scans_mb  # at least the two scans themselves
    logic.process(volumes[1], ["Temporal_Mid_L"], checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.encodings == 3  # still cached, and now the most recently used
    logic.process(volumes[0], ["Temporal_Mid_L"], checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.encodings == 4  # the oldest went out
    logic.process(volumes[1], ["Temporal_Mid_R"], checkpointPath=tiny_checkpoint, device="cpu")
    assert logic.encodings == 4
    scene.RemoveNode(volumes[1])
    assert logic.cacheSize() == 1 and volumes[1].GetName() not in logic.cacheDescription()
    scene.Clear(0)
    assert logic.cacheSize() == 0


# ---- 8: the atlas belongs to its checkpoint -----------------------------------------------------------------------
def test_the_atlas_is_the_chosen_checkpoints_and_foreign_paintings_are_refused(scene, scans, tiny_checkpoint, tmp_path):
    volume = load_volume(scene, scans[0][0])
    logic = SegmentationLogic(scene)
    atlas, painted_id, _ = paint_on_atlas(scene, logic, tiny_checkpoint)
    assert atlas.GetAttribute(ATLAS_OF) == logic.atlasIdentity(tiny_checkpoint)
    copy = tmp_path / "copy.lcs"
    shutil.copy(tiny_checkpoint, copy)
    assert logic.loadAtlas(copy) is atlas  # the same model under another path: its content decides
    assert logic.paintedSegmentIds(copy) == [painted_id]

    tiny = Checkpoint.load(tiny_checkpoint)
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(tiny.atlas_image)[:, :, ::-1]))
    mirrored.CopyInformation(tiny.atlas_image)
    other = other_checkpoint(tiny_checkpoint, tmp_path, atlas_image=mirrored)  # another atlas
    assert logic.paintedSegmentIds(other) == []
    other_atlas = logic.loadAtlas(other)
    assert other_atlas is not atlas and other_atlas.GetAttribute(ATLAS_OF) == logic.atlasIdentity(other)
    assert logic.atlasFor(tiny_checkpoint) is atlas and logic.atlasFor(other) is other_atlas
    for label in (painted_id, "frontal part"):
        with pytest.raises(LCSError, match="'frontal part' was painted on the atlas of 'tiny test model', not on the "
                                           "chosen model's atlas; choose that model"):
            logic.process(volume, [label], checkpointPath=other, device="cpu")
    found = logic.process(volume, [painted_id], checkpointPath=tiny_checkpoint, device="cpu")
    assert names(found) == ["frontal part"]


# ---- 11: the bundled model by name --------------------------------------------------------------------------------
def test_the_bundled_model_is_stored_by_name(scene, tiny_checkpoint):
    logic = SegmentationLogic(scene)
    widget_path = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "demo.lcs"  # the panel's default
    for path in (BUNDLED, str(BUNDLED), widget_path, None, "", BUNDLED_MODEL):
        assert SegmentationLogic.checkpointReference(path) == BUNDLED_MODEL
    assert SegmentationLogic.checkpointReference(str(tiny_checkpoint)) == str(tiny_checkpoint)
    bundled = logic.segmenter(BUNDLED_MODEL, "cpu")
    assert all(logic.segmenter(path, "cpu") is bundled for path in (None, "", str(BUNDLED)))
    assert len(logic.missingLabels(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), BUNDLED_MODEL)) == 116


# ---- 12: terminology ----------------------------------------------------------------------------------------------
def test_label_codes_become_segment_terminology(scene, scans, tiny, tiny_checkpoint, tmp_path):
    code = "SCT^9999999^Superior frontal gyrus (test code)"
    table = LabelTable([dataclasses.replace(label, code=code if label.name == "Frontal_Sup_L" else "")
                        for label in tiny.label_table])
    coded = other_checkpoint(tiny_checkpoint, tmp_path, label_table=table)
    volume = load_volume(scene, scans[0][0])
    segmentation = SegmentationLogic(scene).process(volume, ["Frontal_Sup_L", "Temporal_Mid_L"], checkpointPath=coded,
                                                    device="cpu")
    segments = segmentation.GetSegmentation()
    entry = vtk.reference("")
    segments.GetSegment(segments.GetSegmentIdBySegmentName("Frontal_Sup_L")).GetTag("TerminologyEntry", entry)
    assert str(entry) == ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
                          f"{code}~^^~Anatomic codes - DICOM master list~^^~^^")
    segments.GetSegment(segments.GetSegmentIdBySegmentName("Temporal_Mid_L")).GetTag("TerminologyEntry", entry)
    assert "Tissue" in str(entry)  # no code: Slicer's default stays
