"""MRML glue: run LCS on a volume node and write named, colored segments (Slicer's MRML/VTK only, no Qt).

    SegmentationLogic().process(inputVolume, ["Hippocampus_L"]) -> vtkMRMLSegmentationNode

Runs inside Slicer and under pytest with PyPI's slicer-core. The encoded volume is cached,
so asking for another label of the same volume costs one decode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


def _in_table(table, label: str | int) -> bool:
    """Whether `label` (a name, a value or an 'A+B' union) names trained atlas labels."""
    try:
        table.resolve_union(label)
        return True
    except LCSError:
        return False


def _require_image(volume) -> None:
    if volume is None or volume.GetImageData() is None:
        raise LCSError("select an input volume that holds image data")


def _set_reference(segmentation, volume) -> None:
    """Segments on `volume`'s geometry, and the reference that Slicer shows for it."""
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())


def volume_to_image(volume) -> sitk.Image:
    """A scalar volume node as a SimpleITK image with the same physical geometry (RAS -> LPS)."""
    _require_image(volume)
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


@dataclass
class Job:
    """One run, split by thread: `SegmentationLogic.start` reads MRML (main thread), `run` only computes
    (any thread: a GUI runs it in a worker), `SegmentationLogic.finish` writes MRML (main thread)."""

    volumeId: str
    cacheKey: tuple
    segmenter: Segmenter
    conditions: list[Condition]
    registration: str
    threshold: float
    keepProbabilities: bool
    image: sitk.Image | None = None  # None when the volume's encoding is cached
    prepared: Prepared | None = None
    labelmap: sitk.Image | None = None
    probabilities: list[tuple[Condition, sitk.Image]] = field(default_factory=list)

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report = progress or (lambda f, m: None)
        if self.prepared is None:
            self.prepared = self.segmenter.prepare(self.image, self.registration, lambda f, m: report(0.3 * f, m), cancel)
        keep = (lambda c, p: self.probabilities.append((c, p))) if self.keepProbabilities else None
        self.labelmap = self.segmenter.segment(self.prepared, self.conditions, self.threshold, keep,
                                               lambda f, m: report(0.3 + 0.7 * f, m), cancel)
        if cancel is not None and cancel():
            raise Cancelled()

    @property
    def encoded(self) -> bool:
        """Whether this job registered and encoded the volume itself (a cache miss)."""
        return self.image is not None


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
        _set_reference(self.atlasSegmentation, image)
        conditions = [Condition(l.name, l.value, np.zeros((0, 0, 0), bool), l.color) for l in checkpoint.label_table]
        self._import(checkpoint.atlas_labels, conditions, image, self.atlasSegmentation)
        return self.atlasSegmentation

    def paintedSegmentIds(self, checkpointPath: str | Path | None = None) -> list[str]:
        """IDs of the atlas segments that are not trained labels: the regions users painted."""
        if self.atlasSegmentation is None or not self.scene.IsNodePresent(self.atlasSegmentation):
            return []
        trained = {l.name for l in self.segmenter(checkpointPath, "cpu").checkpoint.label_table}
        segments = self.atlasSegmentation.GetSegmentation()
        ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
        return [i for i in ids if segments.GetSegment(i).GetName() not in trained]

    # ---- segmentation -------------------------------------------------------------------
    def process(self, inputVolume, labels: Sequence[str | int], outputSegmentation=None, checkpointPath=None,
                device: str = "auto", registration: str = "affine", progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None, threshold: float = 0.5, keepProbabilities: bool = False,
                replaceExisting: bool = False):
        """Segment `labels` (atlas names or values, or IDs or names of segments painted on the atlas) on
        `inputVolume`; new segments go into `outputSegmentation` (created when None). Existing segments
        are kept unless `replaceExisting` (then only same-named ones go); a cancelled run leaves the scene
        as it was. `keepProbabilities` adds one probability volume per label."""
        job = self.start(inputVolume, labels, checkpointPath, device, registration, threshold, keepProbabilities)
        job.run(progress, cancel)
        return self.finish(job, outputSegmentation, replaceExisting)

    def start(self, inputVolume, labels: Sequence[str | int], checkpointPath=None, device: str = "auto",
              registration: str = "affine", threshold: float = 0.5, keepProbabilities: bool = False) -> Job:
        """Everything a run needs from the scene, read now (main thread)."""
        _require_image(inputVolume)
        segmenter = self.segmenter(checkpointPath, device)
        conditions = segmenter.conditions(*self._split_labels(labels, segmenter))
        key = self._cache_key(inputVolume, segmenter, registration)
        prepared = self._prepared.get(key)
        return Job(inputVolume.GetID(), key, segmenter, conditions, registration, threshold, keepProbabilities,
                   image=None if prepared else volume_to_image(inputVolume), prepared=prepared)

    def finish(self, job: Job, outputSegmentation=None, replaceExisting: bool = False):
        """Write a finished job's segments (and probability volumes) into the scene as one undo step (main thread)."""
        inputVolume = self.scene.GetNodeByID(job.volumeId)
        if inputVolume is None:
            raise LCSError("the input volume was removed from the scene while it was being segmented")
        if job.encoded:
            self._prepared = {k: v for k, v in self._prepared.items() if k[0] != job.volumeId}  # one state per volume
            self._prepared[job.cacheKey] = job.prepared
            self.encodings += 1
        self.lastDevice = job.segmenter.device
        self.scene.SaveStateForUndo()
        if outputSegmentation is None:
            outputSegmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{inputVolume.GetName()} LCS")
            outputSegmentation.CreateDefaultDisplayNodes()
        _set_reference(outputSegmentation, inputVolume)
        if replaceExisting:
            segments = outputSegmentation.GetSegmentation()
            for condition in job.conditions:
                while segments.GetSegmentIdBySegmentName(condition.name):
                    segments.RemoveSegment(segments.GetSegmentIdBySegmentName(condition.name))
        self._import(job.labelmap, job.conditions, inputVolume, outputSegmentation)
        for condition, probability in job.probabilities:
            image_to_volume(probability, self.scene, f"{inputVolume.GetName()} {condition.name} probability")
        self._place_beside(outputSegmentation, inputVolume)
        return outputSegmentation

    def _cache_key(self, inputVolume, segmenter: Segmenter, registration: str) -> tuple:
        """Identifies a volume's voxels and geometry, the model and the registration mode."""
        matrix = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(matrix)
        return (inputVolume.GetID(), inputVolume.GetImageData().GetMTime(),
                tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), id(segmenter), registration)

    def _split_labels(self, labels, segmenter: Segmenter):
        """Trained atlas labels stay names; segments painted on the atlas (by ID or name) become
        (name, mask, color) for Segmenter.conditions."""
        names, painted = [], []
        table = segmenter.checkpoint.label_table
        segments = self.atlasSegmentation.GetSegmentation() if self.atlasSegmentation is not None else None
        for label in labels:
            segmentId = self._painted_id(segments, str(label)) if not _in_table(table, label) else None
            if segmentId is None:
                names.append(label)  # unknown names fail in Segmenter.conditions with a clear message
                continue
            segment = segments.GetSegment(segmentId)
            color = tuple(int(round(255 * c)) for c in segment.GetColor())
            painted.append((segment.GetName(), self._segment_mask(segmentId, segmenter.checkpoint.atlas_image), color))
        return names, painted

    @staticmethod
    def _painted_id(segments, label: str) -> str | None:
        if segments is None:
            return None
        if segments.GetSegment(label) is not None:
            return label
        return segments.GetSegmentIdBySegmentName(label) or None

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
