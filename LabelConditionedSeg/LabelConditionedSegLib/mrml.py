"""MRML <-> image: volume nodes as SimpleITK images and back, segments from mask boxes and back as arrays.

Everything here reads or writes one node at a time and keeps no state; the flows (apply, proposals, export, atlas)
build on it. Voxel arrays are in SimpleITK/numpy order (k, j, i); Slicer's geometry is RAS, SimpleITK's LPS.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .engine import Condition
from .errors import LCSError
from .geometry import Box

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
BINARY = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
# Slicer's serialized terminology entry (same format in 5.6 to 5.10), with a label's code as the type.
TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~{}~^^"
               "~Anatomic codes - DICOM master list~^^~^^")


def require_image(volume) -> None:
    if volume is None or volume.GetImageData() is None:
        raise LCSError("select an input volume that holds image data")


def segment_names(segmentation) -> list[str]:
    segments = segmentation.GetSegmentation()
    return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]


def segment_entries(segmentation) -> list[tuple[str, str, str]]:
    """(ID, name, terminology entry or '') of each segment, in order."""
    segments, entry = segmentation.GetSegmentation(), vtk.reference("")
    out = []
    for i in range(segments.GetNumberOfSegments()):
        segment = segments.GetNthSegment(i)
        found = segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        out.append((segments.GetNthSegmentID(i), segment.GetName(), str(entry) if found else ""))
    return out


def nodes(scene, class_name: str) -> list:
    """The scene's nodes of a class (GetNodesByClass would hand over a collection to free)."""
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def place_on(segmentation, volume) -> None:
    """Segments on `volume`'s geometry and under its parent transform, so they move with the volume when that
    transform changes later. A segmentation that holds segments already keeps its own transform (its segments stay
    where they are); new segments are mapped into it where the volume is now (see `_transform_between`). Like
    Segment Editor, the volume's grid becomes the reference geometry (the grid segments are edited on) only of a
    segmentation that has none: the user may have chosen another."""
    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    if not segmentation.GetSegmentation().GetConversionParameter(GEOMETRY):
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # the reference node too (5.6 to 5.10)


def _transform_between(source, target):
    """The transform from `source`'s coordinates to `target`'s (None when both are under the same transform node)."""
    if source.GetParentTransformNode() is target.GetParentTransformNode():
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source.GetParentTransformNode(),
                                                         target.GetParentTransformNode(), transform)
    return transform


def map_into(segmentation, image, source) -> None:
    """Map a labelmap given in `source`'s coordinates into `segmentation`'s (in place)."""
    transform = _transform_between(source, segmentation)
    if transform is not None:
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, transform)


def _set_code(segment, code: str) -> None:
    """The label's terminology code ('SCT^value^meaning', or a whole Slicer terminology entry) on its segment."""
    if code:
        entry = code if "~" in code else TERMINOLOGY.format(code)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)


def add_segment(segmentation, condition: Condition, box: Box, volume, code: str = "") -> str:
    """A segment from a mask box on `volume`'s voxel grid (array order k, j, i), named and colored like the condition;
    no temporary node enters the scene. Returns the segment's ID."""
    image = slicer.vtkOrientedImageData()
    (k, j, i), (nk, nj, ni) = box.offset, box.mask.shape
    image.SetExtent(i, i + ni - 1, j, j + nj - 1, k, k + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = box.mask.ravel()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    map_into(segmentation, image, volume)
    segmentId = segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, condition.name,
                                                                        [v / 255 for v in condition.color])
    if not segmentId:
        raise LCSError(f"could not add segment {condition.name!r} to {segmentation.GetName()}")
    _set_code(segmentation.GetSegmentation().GetSegment(segmentId), code)
    return segmentId


def import_labelmap(labelmap: sitk.Image, conditions: Sequence[Condition], reference, segmentation,
                    codes: dict) -> None:
    """One segment per condition found in `labelmap` (on `reference`'s voxel grid), beside existing ones."""
    array = sitk.GetArrayFromImage(labelmap)
    for condition in conditions:
        box = Box.of(array == condition.value)
        if box is not None:
            add_segment(segmentation, condition, box, reference, codes.get(condition.name, ""))


def ijk_to_ras(image: sitk.Image) -> vtk.vtkMatrix4x4:
    """A SimpleITK image's voxel-to-RAS matrix (its geometry is in LPS)."""
    direction = LPS_FROM_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    origin = LPS_FROM_RAS @ np.array(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
        matrix.SetElement(r, 3, origin[r])
    return matrix


def labelmap_array(image, shape: tuple) -> np.ndarray:
    """A merged labelmap on a reference grid of `shape` (k, j, i) as a boolean array."""
    if image.GetPointData().GetScalars() is None:
        return np.zeros(shape, bool)
    extent = image.GetExtent()
    if tuple(extent[1::2][::-1]) != tuple(s - 1 for s in shape) or any(extent[0::2]):
        raise LCSError(f"a segment came back on extent {extent}, not on the {shape[::-1]} voxels asked for")
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape) > 0


def segment_array(segmentation, segmentId: str, volume) -> np.ndarray:
    """One segment as a boolean array on `volume`'s voxel grid (k, j, i), whatever grid and transform the segment is
    on; read into a vtkOrientedImageData, so no node enters the scene (ExportSegmentsToLabelmapNode adds a labelmap
    and a colour table node)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation, volume, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged)
    # The call returns nothing (void in 5.6 to 5.10). On the reference extent even an empty segment gets voxels
    # (all 0), so no voxels at all is a failed merge (no binary labelmap), not an empty segment.
    if merged.GetPointData().GetScalars() is None:
        name = segmentation.GetSegmentation().GetSegment(segmentId).GetName()
        raise LCSError(f"segment {name!r} of {segmentation.GetName()} could not be read as voxels on "
                       f"{volume.GetName()}; open it in Segment Editor once, then try again")
    return labelmap_array(merged, slicer.util.arrayFromVolume(volume).shape)


def require_binary_labelmap(segmentation, volume) -> None:
    """Give `segmentation` a binary labelmap representation if it lacks one (imported from models, STL or
    RTSTRUCT, its segments are closed surfaces), on `volume`'s grid when it has no reference geometry yet: what
    Segment Editor and Slicer's own labelmap export do."""
    segments = segmentation.GetSegmentation()
    if segments.GetNumberOfSegments() == 0 or segments.ContainsRepresentation(BINARY):
        return
    if not segments.GetConversionParameter(GEOMETRY):
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    if not segments.CreateRepresentation(BINARY):
        raise LCSError(f"the segments of {segmentation.GetName()} ({segments.GetSourceRepresentationName()}) could "
                       "not be converted to a binary labelmap; convert them in the Segmentations module, then try "
                       "again")


def volume_to_image(volume) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the same physical geometry (RAS -> LPS)."""
    require_image(volume)
    array = slicer.util.arrayFromVolume(volume)
    if array.ndim != 3:
        raise LCSError(f"{volume.GetName()} has {array.ndim - 3} extra components per voxel; select a grayscale volume")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    spacing = np.array(volume.GetSpacing())
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_FROM_RAS @ (m[:3, :3] / spacing)).ravel().tolist())
    image.SetOrigin((LPS_FROM_RAS @ m[:3, 3]).tolist())
    return image


def image_to_volume(image: sitk.Image, scene, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A SimpleITK image as a new volume node in `scene` (LPS -> RAS)."""
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(ijk_to_ras(image))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


def volume_beside(scene, image: sitk.Image, name: str, inputVolume):
    """A volume on the input's grid, under the input's transform like the segments."""
    node = image_to_volume(image, scene, name)
    node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
    return node


def new_segmentation(scene, name: str):
    """An empty segmentation node with its display nodes."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    return segmentation


def remove_node(scene, node) -> None:
    """Remove a node with its display and storage nodes (a table node has no display nodes)."""
    displayed = node.IsA("vtkMRMLDisplayableNode")
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes() if displayed else 0)]
    helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:  # Slicer may have removed them with the node
        if helper is not None and scene.IsNodePresent(helper):
            scene.RemoveNode(helper)


def place_beside(scene, segmentation, volume) -> None:
    """Put the result under the input's study (or patient) in subject hierarchy."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volume_item, segmentation_item = hierarchy.GetItemByDataNode(volume), hierarchy.GetItemByDataNode(segmentation)
    if volume_item and segmentation_item:  # items exist once Slicer's subject hierarchy plugins saw the nodes
        hierarchy.SetItemParent(segmentation_item, hierarchy.GetItemParent(volume_item))
