"""The atlas in the scene and the regions users paint on it.

`load` puts a checkpoint's atlas image and labels into the scene (once per checkpoint), so users can see the atlas
and paint new labels on it; `split` turns the labels a run asks for into trained labels and painted masks. Atlas
nodes record the atlas's content hash (ATLAS_OF, saved with the scene), neither the checkpoint's path nor its weights:
a model fine-tuned from another keeps its atlas, so the regions painted on it stay usable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import hashlib

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .engine import Condition
from .errors import LCSError
from .mrml import (ijk_to_ras, image_to_volume, import_labelmap, labelmap_array, new_segmentation, nodes,
                   place_on)
from .pipeline import Segmenter
from .checkpoint import Checkpoint
from .segmenters import Segmenters, checkpoint_file, checkpoint_version

ATLAS_OF = "LCS.atlasOf"  # attribute of atlas nodes: the content hash of their atlas (atlas_identity)
ATLAS_MODEL = "LCS.atlasModel"  # attribute of atlas nodes: that checkpoint's name, for messages


def atlas_identity(checkpoint: Checkpoint) -> str:
    """The content hash (16 hex digits) of a checkpoint's atlas: image and label voxels, their grid and the label
    table. Checkpoints fine-tuned from one another share it; their weights do not enter it."""
    digest = hashlib.sha256()
    for image in (checkpoint.atlas_image, checkpoint.atlas_labels):
        digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
        digest.update(repr((image.GetSpacing(), image.GetOrigin(), image.GetDirection())).encode())
    digest.update(repr([(l.value, l.name) for l in checkpoint.label_table]).encode())
    return digest.hexdigest()[:16]


def _in_table(table, label: str | int) -> bool:
    """Whether `label` (a name, a value or an 'A+B' union) names trained atlas labels."""
    try:
        table.resolve_union(label)
        return True
    except LCSError:
        return False


def _painted_id(atlas, label: str) -> str | None:
    if atlas is None:
        return None
    segments = atlas.GetSegmentation()
    if segments.GetSegment(label) is not None:
        return label
    return segments.GetSegmentIdBySegmentName(label) or None


def _segment_mask(atlas, segmentId: str, reference: sitk.Image) -> sitk.Image:
    """A painted atlas segment as a binary image on the atlas grid (in the atlas segmentation's coordinates)."""
    grid = slicer.vtkOrientedImageData()
    size = reference.GetSize()
    grid.SetExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
    grid.SetImageToWorldMatrix(ijk_to_ras(reference))
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    merged = slicer.vtkOrientedImageData()
    atlas.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, grid, ids)
    array = labelmap_array(merged, size[::-1])
    if not array.any():
        raise LCSError(f"painted atlas segment {segmentId!r} is empty; paint it on the atlas first")
    mask = sitk.GetImageFromArray(array.astype(np.uint8))
    mask.CopyInformation(reference)
    return mask


class Atlases:
    """Each checkpoint's atlas nodes in the scene."""

    def __init__(self, scene, segmenters: Segmenters):
        self.scene = scene
        self._segmenters = segmenters
        self.lastModel: str | Path | None = None  # the checkpoint of the last `load`
        self._identities: dict[tuple, str] = {}  # checkpoint file version -> atlas_identity

    def identity(self, checkpointPath: str | Path | None = None) -> str:
        """The checkpoint's atlas_identity, computed once per version of the file."""
        version = checkpoint_version(checkpointPath)
        if version not in self._identities:
            self._identities[version] = atlas_identity(self._segmenters.get(checkpointPath, "cpu").checkpoint)
        return self._identities[version]

    def of(self, checkpointPath: str | Path | None = None):
        """This checkpoint's atlas labels in the scene (a segmentation node), None until `load`."""
        identity = self.identity(checkpointPath)
        return next((n for n in self._all() if n.GetAttribute(ATLAS_OF) == identity), None)

    def _all(self) -> list:
        return [n for n in nodes(self.scene, "vtkMRMLSegmentationNode") if n.GetAttribute(ATLAS_OF)]

    def node_ids(self) -> list[str]:
        """IDs of every atlas node (images and labels, of any checkpoint): not the user's scans or outputs."""
        return [n.GetID() for n in nodes(self.scene, "vtkMRMLNode") if n.GetAttribute(ATLAS_OF)]

    def scans(self) -> list:
        """The scene's scans: its scalar volumes that are no label maps and no atlas images, in the scene's order."""
        return [n for n in nodes(self.scene, "vtkMRMLScalarVolumeNode")
                if n.GetClassName() == "vtkMRMLScalarVolumeNode" and not n.GetAttribute(ATLAS_OF)]

    def first_scan(self):
        """The first scan (see `scans`): a panel's default input, None if none."""
        return next(iter(self.scans()), None)

    def load(self, checkpointPath: str | Path | None = None):
        """The checkpoint's atlas image and labels as nodes (once per checkpoint); both record which checkpoint they
        came from."""
        self.lastModel = checkpointPath
        atlas = self.of(checkpointPath)
        if atlas is not None:
            return atlas
        checkpoint = self._segmenters.get(checkpointPath, "cpu").checkpoint
        model = checkpoint.provenance.get("name") or checkpoint_file(checkpointPath).name
        image = image_to_volume(checkpoint.atlas_image, self.scene, "LCS atlas image")
        atlas = new_segmentation(self.scene, "LCS atlas labels")
        for node in (image, atlas):
            node.SetAttribute(ATLAS_OF, self.identity(checkpointPath))
            node.SetAttribute(ATLAS_MODEL, model)
        place_on(atlas, image)
        conditions = [Condition(l.name, l.value, np.zeros((0, 0, 0), bool), l.color) for l in checkpoint.label_table]
        import_labelmap(checkpoint.atlas_labels, conditions, image, atlas, self._segmenters.codes(checkpointPath))
        return atlas

    def painted(self, checkpointPath: str | Path | None = None) -> list[str]:
        """IDs of this checkpoint's atlas segments that are not trained labels: the regions users painted."""
        atlas = self.of(checkpointPath)
        if atlas is None:
            return []
        trained = {l.name for l in self._segmenters.table(checkpointPath)}
        segments = atlas.GetSegmentation()
        ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
        return [i for i in ids if segments.GetSegment(i).GetName() not in trained]

    def split(self, labels: Sequence[str | int], segmenter: Segmenter, checkpointPath):
        """Trained atlas labels stay names; segments painted on this checkpoint's atlas (by ID or name) become
        (name, mask, color) for Segmenter.conditions. A region painted on another checkpoint's atlas is refused."""
        names, painted = [], []
        table = segmenter.checkpoint.label_table
        atlas = self.of(checkpointPath)
        for label in labels:
            if _in_table(table, label):
                names.append(label)
                continue
            segmentId = _painted_id(atlas, str(label))
            if segmentId is None:
                self._refuse_other_atlas(str(label), checkpointPath)
                names.append(label)  # unknown names fail in Segmenter.conditions with a clear message
                continue
            segment = atlas.GetSegmentation().GetSegment(segmentId)
            color = tuple(int(round(255 * c)) for c in segment.GetColor())
            painted.append((segment.GetName(), _segment_mask(atlas, segmentId, segmenter.checkpoint.atlas_image),
                            color))
        return names, painted

    def _refuse_other_atlas(self, label: str, checkpointPath) -> None:
        """A region painted on another atlas would be read on the wrong atlas: say so."""
        identity = self.identity(checkpointPath)
        for atlas in self._all():
            segmentId = _painted_id(atlas, label)
            if atlas.GetAttribute(ATLAS_OF) != identity and segmentId is not None:
                name = atlas.GetSegmentation().GetSegment(segmentId).GetName()
                raise LCSError(f"{name!r} was painted on the atlas of {atlas.GetAttribute(ATLAS_MODEL)!r}, not on the "
                               "chosen model's atlas; choose that model, or paint the region on this model's atlas")
