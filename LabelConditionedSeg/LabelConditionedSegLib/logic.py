"""MRML glue: run LCS on a volume node and write named, colored segments (Slicer's MRML/VTK only, no Qt).

    SegmentationLogic().process(inputVolume, ["Hippocampus_L"]) -> vtkMRMLSegmentationNode

Runs inside Slicer and under pytest with PyPI's slicer-core. The encoded volume is cached,
so asking for another label of the same volume costs one decode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .checkpoint import Checkpoint, default_checkpoint
from .engine import Condition
from .errors import Cancelled, LCSError
from .pipeline import Prepared, Segmenter

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def volume_to_image(volume) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the same physical geometry (RAS -> LPS)."""
    if volume is None or volume.GetImageData() is None:
        raise LCSError("select an input volume that holds image data")
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
    direction = LPS_FROM_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
        matrix.SetElement(r, 3, (LPS_FROM_RAS @ np.array(image.GetOrigin()))[r])
    node.SetIJKToRASMatrix(matrix)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


class SegmentationLogic:
    """LCS on MRML nodes, GUI-free: the Slicer module's Logic and scripts call `process`."""

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._segmenters: dict[tuple, Segmenter] = {}
        self._prepared: dict[tuple, Prepared] = {}
        self.encodings = 0  # how many volumes were registered and encoded (the cache's misses)
        self.lastDevice = ""
        self.messages: Callable[[str], None] = lambda text: None
        self.atlasSegmentation = None

    # ---- model and atlas ----------------------------------------------------------------
    def segmenter(self, checkpointPath: str | Path | None = None, device: str = "auto") -> Segmenter:
        key = (str(checkpointPath or default_checkpoint()), device)
        if key not in self._segmenters:
            self._segmenters[key] = Segmenter(Checkpoint.load(key[0]), device, messages=lambda m: self.messages(m))
        return self._segmenters[key]

    def loadAtlas(self, checkpointPath: str | Path | None = None):
        """The atlas image and its labels as nodes (once), so users can see the atlas and paint new labels on it."""
        if self.atlasSegmentation is not None and self.scene.IsNodePresent(self.atlasSegmentation):
            return self.atlasSegmentation
        checkpoint = self.segmenter(checkpointPath, "cpu").checkpoint
        image = image_to_volume(checkpoint.atlas_image, self.scene, "LCS atlas image")
        self.atlasSegmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LCS atlas labels")
        self.atlasSegmentation.CreateDefaultDisplayNodes()
        self.atlasSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(image)
        conditions = [Condition(l.name, l.value, np.zeros((0, 0, 0), bool), l.color) for l in checkpoint.label_table]
        self._import(checkpoint.atlas_labels, conditions, image, self.atlasSegmentation)
        return self.atlasSegmentation

    # ---- segmentation -------------------------------------------------------------------
    def process(self, inputVolume, labels: Sequence[str | int], outputSegmentation=None, checkpointPath=None,
                device: str = "auto", registration: str = "affine", progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None, threshold: float = 0.5):
        """Segment `labels` (atlas names or values, or segment IDs of the painted atlas segmentation) on
        `inputVolume`; new segments go into `outputSegmentation` (created when None). Existing
        segments are never replaced; a cancelled run leaves the scene as it was."""
        segmenter = self.segmenter(checkpointPath, device)
        prepared = self.prepare(inputVolume, segmenter, registration, progress)
        names, masks = self._split_labels(labels, segmenter)
        conditions = segmenter.conditions(names, masks)
        report = progress or (lambda f, m: None)
        labelmap = segmenter.segment(prepared, conditions, threshold, progress=lambda f, m: report(0.3 + 0.7 * f, m),
                                     cancel=cancel)
        if cancel is not None and cancel():
            raise Cancelled()
        self.lastDevice = segmenter.device
        self.scene.SaveStateForUndo()
        if outputSegmentation is None:
            outputSegmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} LCS")
            outputSegmentation.CreateDefaultDisplayNodes()
        outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        outputSegmentation.SetNodeReferenceID(outputSegmentation.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        self._import(labelmap, conditions, inputVolume, outputSegmentation)
        self._place_beside(outputSegmentation, inputVolume)
        report(1.0, f"done on {segmenter.device}")
        return outputSegmentation

    def prepare(self, inputVolume, segmenter: Segmenter, registration: str, progress=None) -> Prepared:
        """Registered, encoded volume from the cache, or computed and cached (keyed on the voxels' state)."""
        matrix = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(matrix)
        key = (inputVolume.GetID(), inputVolume.GetImageData().GetMTime() if inputVolume.GetImageData() else 0,
               tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), id(segmenter), registration)
        if key not in self._prepared:
            report = progress or (lambda f, m: None)
            self._prepared = {k: v for k, v in self._prepared.items() if k[0] != key[0]}  # one cached state per volume
            self._prepared[key] = segmenter.prepare(volume_to_image(inputVolume), registration,
                                                    lambda f, m: report(0.3 * f, m))
            self.encodings += 1
        return self._prepared[key]

    def _split_labels(self, labels, segmenter: Segmenter):
        """Atlas names/values stay names; IDs of segments painted on the atlas become masks."""
        names, masks = [], []
        painted = self.atlasSegmentation.GetSegmentation() if self.atlasSegmentation is not None else None
        for label in labels:
            segment = painted.GetSegment(str(label)) if painted is not None else None
            if segment is None:
                names.append(label)
                continue
            masks.append((segment.GetName(), self._segment_mask(str(label), segmenter.checkpoint.atlas_image)))
        return names, masks

    def _segment_mask(self, segmentId: str, reference: sitk.Image) -> sitk.Image:
        """A painted atlas segment as a binary image on the atlas grid."""
        grid = image_to_volume(reference, self.scene, "__lcs_reference__")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lcs_painted__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(self.atlasSegmentation, ids, labelmap, grid)
            mask = volume_to_image(labelmap)
        finally:
            self.scene.RemoveNode(labelmap)
            self.scene.RemoveNode(grid)
        if not sitk.GetArrayViewFromImage(mask).any():
            raise LCSError(f"painted atlas segment {segmentId!r} is empty; paint it on the atlas first")
        return mask

    def _import(self, labelmap: sitk.Image, conditions: Sequence[Condition], reference, segmentation) -> None:
        """One segment per condition found in `labelmap`, named and colored, added beside existing ones."""
        colors = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__lcs_colors__")
        node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lcs_result__")
        try:
            top = max(c.value for c in conditions)
            colors.SetTypeToUser()
            colors.SetNumberOfColors(top + 1)
            colors.SetColor(0, "background", 0, 0, 0, 0)
            for c in conditions:
                colors.SetColor(c.value, c.name, *(v / 255 for v in c.color), 1.0)
            node.CopyOrientation(reference)
            array = sitk.GetArrayFromImage(labelmap).astype(np.int32)
            array[~np.isin(array, [c.value for c in conditions])] = 0
            slicer.util.updateVolumeFromArray(node, array)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(node, segmentation, ""):
                raise LCSError("could not add the result to the segmentation")
        finally:
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(colors)

    def _place_beside(self, segmentation, volume) -> None:
        """Put the result under the input's study (or patient) in subject hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        volume_item, segmentation_item = hierarchy.GetItemByDataNode(volume), hierarchy.GetItemByDataNode(segmentation)
        if volume_item and segmentation_item:  # items exist once Slicer's subject hierarchy plugins saw the nodes
            hierarchy.SetItemParent(segmentation_item, hierarchy.GetItemParent(volume_item))
