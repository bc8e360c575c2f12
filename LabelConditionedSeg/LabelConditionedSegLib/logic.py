"""MRML glue: run LCS on a volume node and write named, colored segments (Slicer's MRML/VTK only, no Qt).

    SegmentationLogic().process(inputVolume, ["Hippocampus_L"]) -> vtkMRMLSegmentationNode
    SegmentationLogic().proposeMissing(inputVolume, partialSegmentation) -> proposals to accept or reject
    SegmentationLogic().exportForTraining(inputVolume, segmentation, folder, "case01") -> a training case
    SegmentationLogic().undoLastRun() -> takes back the last Apply, proposal run, accept or reject

Runs inside Slicer and under pytest with PyPI's slicer-core. The encoded volume is cached (CACHE_ENTRIES volumes),
so asking for another label of the same volume costs one decode. Slicer keeps scene undo off, so the logic keeps its
own record of the last change. Call `cleanup()` when done: it removes every observer the logic holds.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import torch
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .checkpoint import BUNDLED, Checkpoint
from .engine import Condition
from .errors import Cancelled, LCSError
from .geometry import Box, keep_highest
from .labels import LabelTable
from .pipeline import Prepared, Segmentation, Segmenter
from .quality import describe
from .training_folder import write_case

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
UNCERTAINTY_TAG = "LCS.uncertainty"  # segment tag of a proposal: its mean uncertainty inside the segment
PROPOSAL_BATCH = 8  # labels proposed at a time: full-size maps are held for these only
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
BUNDLED_MODEL = "bundled"  # what scenes store for the bundled model, so they survive upgrades and other machines
CACHE_ENTRIES = 2  # encoded volumes kept; each holds the scan and its encoder features (on the GPU when there is one)
ATLAS_OF = "LCS.atlasOf"  # attribute of atlas nodes: the content hash of the checkpoint they came from
ATLAS_MODEL = "LCS.atlasModel"  # attribute of atlas nodes: that checkpoint's name, for messages
CHECK = "LCS.check"  # attribute of an output segmentation: what its last run's plausibility check found ('' nothing)
BINARY = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
# Segment list changes; not Source/RepresentationModified, which fire on every paint stroke.
SEGMENT_EVENTS = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)
# Slicer's serialized terminology entry (same format in 5.6 to 5.10), with a label's code as the type.
TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~{}~^^"
               "~Anatomic codes - DICOM master list~^^~^^")


def checkpoint_file(reference: str | Path | None) -> Path:
    """The file a checkpoint reference names: None, "" and BUNDLED_MODEL name the bundled model (so does ".", what
    an empty Path parameter reads as)."""
    text = str(reference or "").strip()
    return BUNDLED if text in ("", ".", BUNDLED_MODEL) else Path(text)


_identities: dict[tuple, str] = {}


def checkpoint_identity(reference: str | Path | None) -> str:
    """The checkpoint file's content hash (16 hex digits): one model whatever its path, another once overwritten."""
    path = checkpoint_file(reference)
    if not path.is_file():
        raise LCSError(f"checkpoint {path} does not exist; give the path of a .lcs file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _identities:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _identities[key] = digest.hexdigest()[:16]
    return _identities[key]


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


def _segment_names(segmentation) -> list[str]:
    segments = segmentation.GetSegmentation()
    return [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]


def _nodes(scene, class_name: str) -> list:
    """The scene's nodes of a class (GetNodesByClass would hand over a collection to free)."""
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def _place_on(segmentation, volume) -> None:
    """Segments on `volume`'s geometry and under its parent transform, so they move with the volume when that
    transform changes later. A segmentation that holds segments already keeps its own transform (its segments stay
    where they are); new segments are mapped into it where the volume is now (see `_transform_between`)."""
    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # sets the reference node too (5.6 to 5.10)


def _transform_between(source, target):
    """The transform from `source`'s coordinates to `target`'s (None when both are under the same transform node)."""
    if source.GetParentTransformNode() is target.GetParentTransformNode():
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source.GetParentTransformNode(),
                                                         target.GetParentTransformNode(), transform)
    return transform


def _into(segmentation, image, source) -> None:
    """Map a labelmap given in `source`'s coordinates into `segmentation`'s (in place)."""
    transform = _transform_between(source, segmentation)
    if transform is not None:
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(image, transform)


def _set_code(segment, code: str) -> None:
    """The label's terminology code ('SCT^value^meaning', or a whole Slicer terminology entry) on its segment."""
    if code:
        entry = code if "~" in code else TERMINOLOGY.format(code)
        segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)


def _add_segment(segmentation, condition: Condition, box: Box, volume, code: str = "") -> str:
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
    _into(segmentation, image, volume)
    segmentId = segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, condition.name,
                                                                        [v / 255 for v in condition.color])
    if not segmentId:
        raise LCSError(f"could not add segment {condition.name!r} to {segmentation.GetName()}")
    _set_code(segmentation.GetSegmentation().GetSegment(segmentId), code)
    return segmentId


def _ijk_to_ras(image: sitk.Image) -> vtk.vtkMatrix4x4:
    """A SimpleITK image's voxel-to-RAS matrix (its geometry is in LPS)."""
    direction = LPS_FROM_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    origin = LPS_FROM_RAS @ np.array(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c] * image.GetSpacing()[c])
        matrix.SetElement(r, 3, origin[r])
    return matrix


def _labelmap_array(image, shape: tuple) -> np.ndarray:
    """A merged labelmap on a reference grid of `shape` (k, j, i) as a boolean array."""
    if image.GetPointData().GetScalars() is None:
        return np.zeros(shape, bool)
    extent = image.GetExtent()
    if tuple(extent[1::2][::-1]) != tuple(s - 1 for s in shape) or any(extent[0::2]):
        raise LCSError(f"a segment came back on extent {extent}, not on the {shape[::-1]} voxels asked for")
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape) > 0


def _segment_array(segmentation, segmentId: str, volume) -> np.ndarray:
    """One segment as a boolean array on `volume`'s voxel grid (k, j, i), whatever grid and transform the segment is
    on; read into a vtkOrientedImageData, so no node enters the scene (ExportSegmentsToLabelmapNode adds a labelmap
    and a colour table node)."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentId)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation, volume, ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged)
    return _labelmap_array(merged, slicer.util.arrayFromVolume(volume).shape)


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
    node.SetIJKToRASMatrix(_ijk_to_ras(image))
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    return node


def _check_table(path: Path, labels) -> None:
    """A training folder's labels.csv, if it has one, must give the exported labels the model's values."""
    if not path.exists():
        return
    theirs = {l.name.lower(): l.value for l in LabelTable.read_csv(path)}
    clash = [l.name for l in labels if theirs.get(l.name.lower()) != l.value]
    if clash:
        raise LCSError(f"{path} lacks {', '.join(clash)} or gives other values than the model; export into a folder "
                       "made with this model's labels")


def _parts(value) -> Iterator:
    """The arrays, tensors and images a cached entry holds (through dataclasses, lists and dicts)."""
    if isinstance(value, (np.ndarray, torch.Tensor, sitk.Image)):
        yield value
    elif is_dataclass(value):
        for f in fields(value):
            yield from _parts(getattr(value, f.name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _parts(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _parts(item)


def _nbytes(part) -> int:
    if isinstance(part, np.ndarray):
        return part.nbytes
    if isinstance(part, torch.Tensor):
        return part.element_size() * part.nelement()
    return part.GetNumberOfPixels() * part.GetNumberOfComponentsPerPixel() * part.GetSizeOfPixelComponent()


def _few(names: Sequence[str], shown: int = 3) -> str:
    """A short list for a one-line message."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@dataclass
class Change:
    """What one Apply, proposal run, accept or reject did to the scene, so that `undo` can take it back: the nodes it
    created, the segments it added, the segments it removed (held here, off the scene) and the state of a
    segmentation it re-placed. Only IDs and segments are held, never nodes, so deleted nodes are not kept alive."""

    description: str
    created: list[str] = field(default_factory=list)  # node IDs
    added: list[tuple[str, str]] = field(default_factory=list)  # (segmentation node ID, segment ID)
    removed: list[tuple[str, int, str, object]] = field(default_factory=list)  # (node ID, index, ID, vtkSegment)
    states: list[tuple] = field(default_factory=list)  # (node ID, transform ID, reference geometry, reference ID)

    def __bool__(self) -> bool:
        return bool(self.created or self.added or self.removed or self.states)

    def nodeIds(self) -> set[str]:
        return {*self.created, *(a[0] for a in self.added), *(r[0] for r in self.removed), *(s[0] for s in self.states)}

    def keep_state(self, segmentation) -> None:
        """An existing segmentation's transform and reference geometry, put back on undo."""
        self.states.append((segmentation.GetID(), segmentation.GetTransformNodeID(),
                            segmentation.GetSegmentation().GetConversionParameter(GEOMETRY),
                            segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole())))

    def take(self, segmentation, segmentId: str):
        """Remove a segment from `segmentation`, holding it (with its own voxels) to put back on undo."""
        segments = segmentation.GetSegmentation()
        segment = segments.GetSegment(segmentId)
        self.removed.append((segmentation.GetID(), segments.GetSegmentIndex(segmentId), segmentId, segment))
        segments.RemoveSegment(segmentId)  # one sharing a layer gets its own voxels first (SeparateSegmentLabelmap)
        return segment

    def undo(self, scene) -> None:
        """Take the change back as far as its nodes are still in the scene."""
        for nodeId, segmentId in self.added:
            node = scene.GetNodeByID(nodeId)
            if node is not None and node.GetSegmentation().GetSegment(segmentId) is not None:
                node.GetSegmentation().RemoveSegment(segmentId)
        for nodeId, index, segmentId, segment in reversed(self.removed):
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                segments = node.GetSegmentation()
                before = segments.GetNthSegmentID(index) if index < segments.GetNumberOfSegments() else ""
                segments.AddSegment(segment, segments.GenerateUniqueSegmentID(segmentId), before)
        for nodeId, transformId, geometry, referenceId in self.states:
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                node.SetAndObserveTransformNodeID(transformId)
                node.GetSegmentation().SetConversionParameter(GEOMETRY, geometry)
                node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), referenceId)
        for nodeId in reversed(self.created):
            node = scene.GetNodeByID(nodeId)
            if node is not None:
                helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
                helpers.append(node.GetStorageNode())
                scene.RemoveNode(node)
                for helper in helpers:  # Slicer may have removed them with the node
                    if helper is not None and scene.IsNodePresent(helper):
                        scene.RemoveNode(helper)


@dataclass
class Job:
    """One run, split by thread: `SegmentationLogic.start` reads MRML (main thread), `run` only computes
    (any thread: a GUI runs it in a worker), `SegmentationLogic.finish` writes MRML (main thread)."""

    volumeId: str
    cacheKey: tuple
    segmenter: Segmenter
    conditions: list[Condition]
    registration: str
    threshold: float = 0.5
    keepProbabilities: bool = False
    image: sitk.Image | None = None  # None when the volume's encoding is cached
    prepared: Prepared | None = None
    result: Segmentation | None = None
    probabilities: list[tuple[Condition, sitk.Image]] = field(default_factory=list)
    codes: dict[str, str] = field(default_factory=dict)  # terminology codes of the checkpoint's labels, by name

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report = progress or (lambda f, m: None)
        self._prepare(report, cancel)
        keep = (lambda c, p: self.probabilities.append((c, p))) if self.keepProbabilities else None
        self.result = self.segmenter.segment(self.prepared, self.conditions, self.threshold, keep,
                                             lambda f, m: report(0.3 + 0.7 * f, m), cancel)
        self.result.masks  # mapped back here, off the main thread
        if cancel is not None and cancel():
            raise Cancelled()

    def _prepare(self, report: Callable[[float, str], None], cancel: Callable[[], bool] | None) -> None:
        """Register and encode the volume (the first 30% of the progress) unless the cache had it."""
        if self.prepared is None:
            self.prepared = self.segmenter.prepare(self.image, self.registration, lambda f, m: report(0.3 * f, m), cancel)

    @property
    def encoded(self) -> bool:
        """Whether this job registered and encoded the volume itself (a cache miss)."""
        return self.image is not None


@dataclass
class ProposalJob(Job):
    """`SegmentationLogic.startProposals` split by thread like `Job`. `run` proposes the labels a few at a time and
    folds them as they come: a voxel goes to the label whose mean probability is the highest there, if it is at least
    `threshold`, so memory does not grow with the number of labels (unless uncertainty volumes are kept)."""

    segmentationId: str = ""
    passes: int = 8
    keepUncertainty: bool = False
    meanUncertainty: dict[str, float] = field(default_factory=dict)  # per label with voxels, inside them
    empty: list[str] = field(default_factory=list)  # labels proposed nowhere
    uncertainty: dict[str, sitk.Image] = field(default_factory=dict)  # per label with voxels, if keepUncertainty
    labelmap: sitk.Image | None = None  # one proposed label per voxel, on the input grid

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report = progress or (lambda f, m: None)
        self._prepare(report, cancel)
        reference = self.prepared.reference
        shape = reference.GetSize()[::-1]
        best, winner, doubt = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, np.float32)
        everywhere = (slice(None),) * 3
        batches = [self.conditions[i:i + PROPOSAL_BATCH] for i in range(0, len(self.conditions), PROPOSAL_BATCH)]
        for b, batch in enumerate(batches):
            step = lambda f, m, b=b: report(0.3 + 0.7 * (b + f) / len(batches), m)
            for proposal in self.segmenter.propose(self.prepared, batch, self.passes, step, cancel):
                value = proposal.condition.value
                keep_highest(best, winner, everywhere, sitk.GetArrayViewFromImage(proposal.probability), value)
                won = winner == value  # each label is folded once: where it won just now
                doubt[won] = sitk.GetArrayViewFromImage(proposal.uncertainty)[won]
                if self.keepUncertainty:
                    self.uncertainty[proposal.condition.name] = proposal.uncertainty
            if cancel is not None and cancel():
                raise Cancelled()
        winner[best < self.threshold] = 0
        counts = np.bincount(winner.ravel())
        sums = np.bincount(winner.ravel(), weights=doubt.ravel())
        for c in self.conditions:
            if c.value < len(counts) and counts[c.value]:
                self.meanUncertainty[c.name] = float(sums[c.value] / counts[c.value])
            else:
                self.empty.append(c.name)
                self.uncertainty.pop(c.name, None)
        self.labelmap = sitk.GetImageFromArray(winner)
        self.labelmap.CopyInformation(reference)


class SegmentationLogic:
    """LCS on MRML nodes, GUI-free: the Slicer module's Logic and scripts call `process`."""

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self._segmenters: dict[tuple, Segmenter] = {}
        self._prepared: dict[tuple, Prepared] = {}  # least recently used first
        self.encodings = 0  # how many volumes were registered and encoded (the cache's misses)
        self.lastDevice = ""
        self.messages: Callable[[str], None] = lambda text: None
        self._atlasModel: str | Path | None = None  # the checkpoint of the last loadAtlas
        self._undo: Change | None = None
        self._group: Change | None = None
        self._observed: dict[str, list[tuple[Callable, list[int]]]] = {}  # node ID -> (callback, observer tags)
        self._sceneTags = [self.scene.AddObserver(self.scene.NodeRemovedEvent, self._onNodeRemoved),
                           self.scene.AddObserver(self.scene.EndCloseEvent, self._onSceneClosed)]

    # ---- model and atlas ----------------------------------------------------------------
    @staticmethod
    def checkpointReference(path: str | Path | None) -> str:
        """What to store for a checkpoint (in the parameter node, hence in saved scenes): BUNDLED_MODEL for the
        bundled model, so a scene keeps working after an upgrade or on another machine; other paths unchanged."""
        file = checkpoint_file(path)
        return BUNDLED_MODEL if file.resolve() == BUNDLED.resolve() else str(path)

    def segmenter(self, checkpointPath: str | Path | None = None, device: str = "auto") -> Segmenter:
        """The checkpoint's model on `device`, loaded once. checkpointPath: a path, or None / "" / BUNDLED_MODEL."""
        key = (str(checkpoint_file(checkpointPath)), device)
        if key not in self._segmenters:
            self._segmenters[key] = Segmenter(Checkpoint.load(key[0]), device, messages=lambda m: self.messages(m))
        return self._segmenters[key]

    def _table(self, checkpointPath: str | Path | None = None) -> LabelTable:
        """The checkpoint's atlas labels (its model is loaded on the CPU once, like the atlas)."""
        return self.segmenter(checkpointPath, "cpu").checkpoint.label_table

    def _codes(self, checkpointPath) -> dict[str, str]:
        """Terminology codes of the checkpoint's labels that have one, by name."""
        return {l.name: l.code for l in self._table(checkpointPath) if l.code}

    def atlasFor(self, checkpointPath: str | Path | None = None):
        """This checkpoint's atlas labels in the scene (a segmentation node), None until `loadAtlas`. Atlas nodes
        record the checkpoint's content hash (attribute ATLAS_OF, saved with the scene), not its path."""
        identity = checkpoint_identity(checkpointPath)
        return next((n for n in self._atlases() if n.GetAttribute(ATLAS_OF) == identity), None)

    @property
    def atlasSegmentation(self):
        """The atlas of the last `loadAtlas` call, if still in the scene (prefer `atlasFor(checkpointPath)`)."""
        return self.atlasFor(self._atlasModel) if self._atlasModel is not None else None

    def _atlases(self) -> list:
        return [n for n in _nodes(self.scene, "vtkMRMLSegmentationNode") if n.GetAttribute(ATLAS_OF)]

    def loadAtlas(self, checkpointPath: str | Path | None = None):
        """The checkpoint's atlas image and labels as nodes (once per checkpoint), so users can see the atlas and
        paint new labels on it. Both nodes record which checkpoint they came from."""
        self._atlasModel = checkpointPath
        atlas = self.atlasFor(checkpointPath)
        if atlas is not None:
            return atlas
        checkpoint = self.segmenter(checkpointPath, "cpu").checkpoint
        model = checkpoint.provenance.get("name") or checkpoint_file(checkpointPath).name
        image = image_to_volume(checkpoint.atlas_image, self.scene, "LCS atlas image")
        atlas = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LCS atlas labels")
        atlas.CreateDefaultDisplayNodes()
        for node in (image, atlas):
            node.SetAttribute(ATLAS_OF, checkpoint_identity(checkpointPath))
            node.SetAttribute(ATLAS_MODEL, model)
        _place_on(atlas, image)
        conditions = [Condition(l.name, l.value, np.zeros((0, 0, 0), bool), l.color) for l in checkpoint.label_table]
        self._import(checkpoint.atlas_labels, conditions, image, atlas, self._codes(checkpointPath))
        return atlas

    def paintedSegmentIds(self, checkpointPath: str | Path | None = None) -> list[str]:
        """IDs of this checkpoint's atlas segments that are not trained labels: the regions users painted."""
        atlas = self.atlasFor(checkpointPath)
        if atlas is None:
            return []
        trained = {l.name for l in self._table(checkpointPath)}
        segments = atlas.GetSegmentation()
        ids = [segments.GetNthSegmentID(i) for i in range(segments.GetNumberOfSegments())]
        return [i for i in ids if segments.GetSegment(i).GetName() not in trained]

    # ---- segmentation -------------------------------------------------------------------
    def process(self, inputVolume, labels: Sequence[str | int], outputSegmentation=None, checkpointPath=None,
                device: str = "auto", registration: str = "affine", progress: Callable[[float, str], None] | None = None,
                cancel: Callable[[], bool] | None = None, threshold: float = 0.5, keepProbabilities: bool = False,
                replaceExisting: bool = False):
        """Segment `labels` (atlas names or values, or IDs or names of segments painted on this checkpoint's atlas)
        on `inputVolume`; new segments go into `outputSegmentation` (created when None). Existing segments
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
        conditions = segmenter.conditions(*self._split_labels(labels, segmenter, checkpointPath))
        return self._job(Job, inputVolume, segmenter, conditions, registration, threshold=threshold,
                         keepProbabilities=keepProbabilities, codes=self._codes(checkpointPath))

    def _job(self, kind: type[Job], inputVolume, segmenter: Segmenter, conditions: list[Condition], registration: str,
             **options) -> Job:
        """A job of `kind` that reuses the volume's cached encoding, or carries the volume's voxels to encode them."""
        key = self._cache_key(inputVolume, segmenter, registration)
        prepared = self._prepared.pop(key, None)
        if prepared is not None:
            self._prepared[key] = prepared  # now the most recently used
        return kind(inputVolume.GetID(), key, segmenter, conditions, registration,
                    image=None if prepared else volume_to_image(inputVolume), prepared=prepared, **options)

    def _finished(self, job: Job):
        """The job's input volume, once it is known to be still there; caches the job's encoding."""
        inputVolume = self.scene.GetNodeByID(job.volumeId)
        if inputVolume is None:
            raise LCSError("the input volume was removed from the scene while it was being segmented")
        if job.encoded:
            self._release([k for k in self._prepared if k[0] == job.volumeId])  # one state per volume
            self._prepared[job.cacheKey] = job.prepared
            self._release(list(self._prepared)[:-CACHE_ENTRIES])
            self.encodings += 1
        self.lastDevice = job.segmenter.device
        return inputVolume

    def finish(self, job: Job, outputSegmentation=None, replaceExisting: bool = False):
        """Write a finished job's segments (and probability volumes) into the scene (main thread); `undoLastRun`
        takes them back. The output is placed under the input volume's parent transform (see `_place_on`)."""
        inputVolume = self._finished(job)
        names = [c.name for c, box in zip(job.result.conditions, job.result.masks) if box is not None]
        with self._recording(f"segmenting {_few(names) or 'nothing'} on {inputVolume.GetName()}") as change:
            if outputSegmentation is None:
                outputSegmentation = self._new_segmentation(f"{inputVolume.GetName()} LCS", change)
            else:
                change.keep_state(outputSegmentation)
            _place_on(outputSegmentation, inputVolume)
            if replaceExisting:
                segments = outputSegmentation.GetSegmentation()
                for condition in job.conditions:
                    while segments.GetSegmentIdBySegmentName(condition.name):
                        change.take(outputSegmentation, segments.GetSegmentIdBySegmentName(condition.name))
            for condition, box in zip(job.result.conditions, job.result.masks):  # each on its own: they may overlap
                if box is not None:
                    code = job.codes.get(condition.name, "")
                    change.added.append((outputSegmentation.GetID(),
                                         _add_segment(outputSegmentation, condition, box, inputVolume, code)))
            for condition, probability in job.probabilities:
                name = f"{inputVolume.GetName()} {condition.name} probability"
                change.created.append(self._volume(probability, name, inputVolume).GetID())
        if job.result.missing:
            self.messages(f"Found nowhere: {', '.join(job.result.missing)}.")
        check = describe(job.result.check, job.result.volumes())
        outputSegmentation.SetAttribute(CHECK, check)
        if check:
            self.messages(f"Check failed on {inputVolume.GetName()}: {check}. Look at the segments over the scan "
                          "before using them.")
        self._place_beside(outputSegmentation, inputVolume)
        return outputSegmentation

    def _new_segmentation(self, name: str, change: Change):
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        change.created.append(segmentation.GetID())
        return segmentation

    def _volume(self, image: sitk.Image, name: str, inputVolume):
        """A volume on the input's grid, under the input's transform like the segments."""
        node = image_to_volume(image, self.scene, name)
        node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        return node

    # ---- undo ---------------------------------------------------------------------------
    def canUndo(self) -> bool:
        """Whether `undoLastRun` has something to take back (a node of the last change is still in the scene)."""
        return self._undo is not None and any(self.scene.GetNodeByID(i) is not None for i in self._undo.nodeIds())

    def undoLastRun(self) -> str:
        """Take back what the last Apply (finish), proposal run, accept or reject added, and put back what it
        replaced or removed, as far as those nodes are still in the scene; one level. Edits made since to the
        segments it added go with them. Returns one line saying what was undone."""
        change, self._undo = self._undo, None
        if change is None or not any(self.scene.GetNodeByID(i) is not None for i in change.nodeIds()):
            raise LCSError("there is nothing to undo: the last run, accept or reject was undone already, or its "
                           "nodes were deleted")
        change.undo(self.scene)
        return f"Undid {change.description}."

    @contextmanager
    def undoGroup(self, description: str):
        """Record everything done inside as one undo step (e.g. accepting several proposals at once)."""
        self._group = Change(description)
        try:
            yield
        finally:
            group, self._group = self._group, None
            if group:
                self._undo = group

    @contextmanager
    def _recording(self, description: str):
        """A change to fill in; it becomes the undo step (also when an error stops it half-way), or joins the
        open undoGroup."""
        change = self._group if self._group is not None else Change(description)
        try:
            yield change
        finally:
            if change is not self._group and change:
                self._undo = change

    # ---- proposing the labels a segmentation lacks ----------------------------------------
    def missingLabels(self, segmentationNode, checkpointPath=None) -> list[str]:
        """The checkpoint's atlas labels that no segment of `segmentationNode` is named after (in any case): what
        a partial segmentation lacks. Segments with other names (painted regions, a tumour) do not count."""
        if segmentationNode is None:
            raise LCSError("select the segmentation whose missing labels to list")
        present = {name.lower() for name in _segment_names(segmentationNode)}
        return [l.name for l in self._table(checkpointPath) if l.name.lower() not in present]

    def proposeMissing(self, inputVolume, segmentationNode, checkpointPath=None, device: str = "auto", passes: int = 8,
                       registration: str = "affine", keepUncertainty: bool = False, labels: Sequence[str] | None = None,
                       progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None):
        """Propose the labels missing from `segmentationNode` on `inputVolume`, in a new segmentation node
        "<name> proposals" for the user to accept or reject; `segmentationNode` itself is not modified."""
        job = self.startProposals(inputVolume, segmentationNode, checkpointPath, device, passes, registration,
                                  keepUncertainty, labels)
        job.run(progress, cancel)
        return self.finishProposals(job)

    def startProposals(self, inputVolume, segmentationNode, checkpointPath=None, device: str = "auto", passes: int = 8,
                       registration: str = "affine", keepUncertainty: bool = False,
                       labels: Sequence[str] | None = None) -> ProposalJob:
        """Read what proposing needs from the scene (main thread). `labels`: some of the missing labels (default: all).
        `passes`: Monte Carlo dropout decodes per label (a model without dropout decodes once). `keepUncertainty`
        adds one uncertainty volume per proposal (and holds them in memory until the run finishes)."""
        _require_image(inputVolume)
        if passes < 1:
            raise LCSError(f"passes is {passes}; propose with at least 1 pass")
        missing = self.missingLabels(segmentationNode, checkpointPath)
        if labels is not None:
            absent = {name.lower(): name for name in missing}
            other = [str(label) for label in labels if str(label).lower() not in absent]
            if other:
                raise LCSError(f"{', '.join(other)}: not missing from {segmentationNode.GetName()} (a segment has that "
                               "name, or no atlas label does); pick labels from the missing ones")
            missing = [absent[str(label).lower()] for label in labels]
        if not missing:
            raise LCSError(f"{segmentationNode.GetName()} has a segment for every atlas label; nothing to propose")
        segmenter = self.segmenter(checkpointPath, device)
        return self._job(ProposalJob, inputVolume, segmenter, segmenter.conditions(missing), registration,
                         segmentationId=segmentationNode.GetID(), passes=passes, keepUncertainty=keepUncertainty,
                         codes=self._codes(checkpointPath))

    def finishProposals(self, job: ProposalJob):
        """Write a finished proposal job into the scene (main thread; `undoLastRun` removes it): a new segmentation
        node under the input's transform with one segment per proposed label (atlas name and color, its mean
        uncertainty in the UNCERTAINTY_TAG tag), and the uncertainty volumes "<label> uncertainty" if asked for.
        Labels proposed nowhere are reported, not added."""
        segmentation = self.scene.GetNodeByID(job.segmentationId)
        if segmentation is None:
            raise LCSError("the segmentation was removed from the scene while its missing labels were proposed")
        inputVolume = self._finished(job)
        if job.empty:
            self.messages(f"No voxels proposed for {', '.join(job.empty)}.")
        found = [c for c in job.conditions if c.name in job.meanUncertainty]
        if not found:
            raise LCSError(f"the model proposed no voxels for the {len(job.conditions)} missing label(s); is the input "
                           "the anatomy it was trained on?")
        with self._recording(f"proposing {_few([c.name for c in found])} for {segmentation.GetName()}") as change:
            proposals = self._new_segmentation(f"{segmentation.GetName()} proposals", change)
            _place_on(proposals, inputVolume)
            self._import(job.labelmap, found, inputVolume, proposals, job.codes)
            segments = proposals.GetSegmentation()
            for c in found:
                segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(c.name))
                segment.SetTag(UNCERTAINTY_TAG, f"{job.meanUncertainty[c.name]:.4f}")
            for name, image in job.uncertainty.items():
                change.created.append(self._volume(image, f"{name} uncertainty", inputVolume).GetID())
        self._place_beside(proposals, inputVolume)
        return proposals

    def listProposals(self, proposalsNode) -> list[tuple[str, float | None]]:
        """(segment ID, mean uncertainty inside the segment) of each proposal still to review, in order."""
        segments = proposalsNode.GetSegmentation()
        out = []
        for i in range(segments.GetNumberOfSegments()):
            value = vtk.reference("")
            found = segments.GetNthSegment(i).GetTag(UNCERTAINTY_TAG, value)
            out.append((segments.GetNthSegmentID(i), float(str(value)) if found else None))
        return out

    def acceptProposal(self, proposalsNode, segmentId: str, segmentationNode) -> str:
        """Move a proposed segment (voxels, name, color, tags) into the user's segmentation, mapped into its
        coordinates if it is under another transform; returns its ID there (`undoLastRun` moves it back). Refused
        when the segmentation has a segment of that name already: users' segments are never replaced."""
        name = self._proposal(proposalsNode, segmentId).GetName()
        if segmentationNode is None or segmentationNode is proposalsNode:
            raise LCSError("select the segmentation to accept proposals into (not the proposals themselves)")
        if name.lower() in {n.lower() for n in _segment_names(segmentationNode)}:
            raise LCSError(f"{segmentationNode.GetName()} already has a segment named {name!r}; rename or delete it "
                           "to accept the proposal")
        with self._recording(f"accepting proposal {name} into {segmentationNode.GetName()}") as change:
            proposal = change.take(proposalsNode, segmentId)
            copy = slicer.vtkSegment()
            copy.DeepCopyMetadata(proposal)
            image = slicer.vtkOrientedImageData()
            image.DeepCopy(proposal.GetRepresentation(BINARY))
            _into(segmentationNode, image, proposalsNode)
            copy.AddRepresentation(BINARY, image)
            target = segmentationNode.GetSegmentation()
            newId = target.GenerateUniqueSegmentID(segmentId)
            if not target.AddSegment(copy, newId):
                raise LCSError(f"could not copy proposal {name!r} into {segmentationNode.GetName()}")
            change.added.append((segmentationNode.GetID(), newId))
        return newId

    def rejectProposal(self, proposalsNode, segmentId: str) -> None:
        """Remove a proposed segment (`undoLastRun` puts it back)."""
        name = self._proposal(proposalsNode, segmentId).GetName()
        with self._recording(f"rejecting proposal {name}") as change:
            change.take(proposalsNode, segmentId)

    @staticmethod
    def _proposal(proposalsNode, segmentId: str):
        segment = proposalsNode.GetSegmentation().GetSegment(segmentId) if proposalsNode is not None else None
        if segment is None:
            raise LCSError(f"there is no proposal {segmentId!r} to review; it was accepted or rejected already")
        return segment

    # ---- export for training --------------------------------------------------------------
    @staticmethod
    def caseExists(folder: str | Path, caseName: str) -> bool:
        """Whether the training folder has files of this case already."""
        return any((Path(folder) / sub / f"{caseName}{suffix}").exists()
                   for sub, suffix in (("images", ".nii.gz"), ("labels", ".nii.gz"), ("masks", ".nii.gz"),
                                       ("annotated", ".txt")))

    def exportForTraining(self, inputVolume, segmentationNode, folder: str | Path, caseName: str, checkpointPath=None,
                          overwrite: bool = False) -> Path:
        """Write the scan and its segments as one case of a training folder (layout in training_folder.py); returns
        the label map's path. Each segment named like an atlas label gets that label's value (where segments overlap,
        the later one wins) and annotated/CASE.txt lists those labels, so training treats the case's other labels as
        unknown rather than background. Other segments are left out and named through `messages`. A scan with no
        segments (`segmentationNode` None or empty) is written unlabelled: an all-zero label map and an empty
        annotated/CASE.txt, a scan for pretraining and adversarial training that supervised training skips."""
        _require_image(inputVolume)
        if not str(folder).strip():
            raise LCSError("choose the training folder to export the case into")
        if not CASE_NAME.fullmatch(caseName or ""):
            raise LCSError(f"case name {caseName!r} cannot name files; use letters, digits, '_', '-' and '.'")
        folder = Path(folder)
        if self.caseExists(folder, caseName) and not overwrite:
            raise LCSError(f"case {caseName!r} exists in {folder} already; choose another name or allow overwriting")
        table = self._table(checkpointPath)
        by_name = {l.name.lower(): l for l in table}
        segments = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        count = segments.GetNumberOfSegments() if segments is not None else 0
        labels = np.zeros(slicer.util.arrayFromVolume(inputVolume).shape, np.int32)
        written, skipped = {}, []
        for i in range(count):
            segmentId, name = segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName()
            label = by_name.get(name.lower())
            mask = _segment_array(segmentationNode, segmentId, inputVolume) if label else None
            if mask is None or not mask.any():
                skipped.append(name)
                continue
            labels[mask] = label.value
            written[label.value] = label
        if count and not written:  # segments drawn but none kept: the user meant to label, not to export unlabelled
            raise LCSError(f"no segment of {segmentationNode.GetName()} is named like an atlas label (or they are "
                           "empty); name segments as in the atlas label list (a scan with no segments exports as "
                           "unlabelled)")
        _check_table(folder / "labels.csv", written.values())
        image = volume_to_image(inputVolume)
        labelmap = sitk.GetImageFromArray(labels)
        labelmap.CopyInformation(image)
        (folder / "masks" / f"{caseName}.nii.gz").unlink(missing_ok=True)  # an overwritten case's mask is not this scan's
        write_case(folder, caseName, image, labelmap, annotated=[l.name for l in written.values()])
        if not (folder / "labels.csv").exists():
            table.write_csv(folder / "labels.csv")
        if skipped:
            self.messages(f"Not exported (no atlas label of that name, or empty): {', '.join(skipped)}.")
        if not count:
            self.messages(f"Case {caseName} has no segments, so it was written unlabelled: lcs pretrain and "
                          "lcs train --adversarial use it; supervised training skips it.")
        return folder / "labels" / f"{caseName}.nii.gz"

    # ---- the encoded-volume cache ----------------------------------------------------------
    def cacheSize(self) -> int:
        """How many encoded volumes are cached (at most CACHE_ENTRIES)."""
        return len(self._prepared)

    def cacheDescription(self) -> str:
        """One line: the cached volumes and about how much memory they hold."""
        if not self._prepared:
            return "No encoded volume cached."
        names = [node.GetName() if (node := self.scene.GetNodeByID(k[0])) is not None else k[0] for k in self._prepared]
        mb = sum(_nbytes(p) for entry in self._prepared.values() for p in _parts(entry)) / 2**20
        return f"{len(names)} encoded volume(s) cached ({', '.join(names)}): about {mb:.0f} MB."

    def clearCache(self) -> None:
        """Release every cached encoding (GPU memory included)."""
        self._release(list(self._prepared))

    def _release(self, keys: Sequence[tuple]) -> None:
        """Drop cached encodings; memory they held on a GPU goes back to the driver."""
        devices = {p.device.type for k in keys for p in _parts(self._prepared.pop(k)) if isinstance(p, torch.Tensor)}
        if "cuda" in devices:
            torch.cuda.empty_cache()
        if "mps" in devices:
            torch.mps.empty_cache()

    def _cache_key(self, inputVolume, segmenter: Segmenter, registration: str) -> tuple:
        """Identifies a volume's voxels and geometry, the model and the registration mode."""
        matrix = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(matrix)
        return (inputVolume.GetID(), inputVolume.GetImageData().GetMTime(),
                tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), id(segmenter), registration)

    # ---- observers --------------------------------------------------------------------------
    def observeSegments(self, segmentationNode, callback: Callable[[object], None]) -> None:
        """Call `callback(segmentationNode)` when one of its segments is added, removed, renamed, recoloured or
        retagged (vtkSegmentation's SegmentAdded/Removed/Modified, forwarded by the node), not on paint strokes
        (those fire SourceRepresentationModified and RepresentationModified). Observing the same node with the same
        callback again does nothing. The observers go on the node's removal, on scene close, with
        `stopObservingSegments` and `cleanup`; the logic keeps only the node's ID, so it never keeps a deleted node
        alive (`callback` must not hold the node either)."""
        watched = self._observed.setdefault(segmentationNode.GetID(), [])
        if any(known == callback for known, _ in watched):
            return
        changed = lambda caller, event: callback(caller)  # noqa: E731 -- the caller is the node
        watched.append((callback, [segmentationNode.AddObserver(event, changed) for event in SEGMENT_EVENTS]))

    def stopObservingSegments(self, segmentationNode=None) -> None:
        """Stop observing `segmentationNode` (every observed segmentation when None)."""
        ids = list(self._observed) if segmentationNode is None else [segmentationNode.GetID()]
        for nodeId in ids:
            self._unobserve(nodeId, segmentationNode or self.scene.GetNodeByID(nodeId))

    def _unobserve(self, nodeId: str, node) -> None:
        for _, tags in self._observed.pop(nodeId, []):
            for tag in tags if node is not None else ():
                node.RemoveObserver(tag)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, scene, event, node) -> None:
        """A removed node leaves the observers and the cache."""
        nodeId = node.GetID() if node is not None else None
        if nodeId in self._observed:
            self._unobserve(nodeId, node)
        self._release([k for k in self._prepared if k[0] == nodeId])

    def _onSceneClosed(self, scene, event) -> None:
        """A closed scene leaves nothing behind: cache, undo record and observer bookkeeping go."""
        self.clearCache()
        self._observed.clear()  # the nodes were removed one by one (vtkMRMLScene::Clear), so were their observers
        self._undo = None

    def cleanup(self) -> None:
        """Remove every observer the logic holds (scene ones included) and release the cache and models; call when
        the module closes."""
        self.stopObservingSegments()
        for tag in self._sceneTags:
            self.scene.RemoveObserver(tag)
        self._sceneTags = []
        self.clearCache()
        self._segmenters.clear()

    # ---- reading segments -------------------------------------------------------------------
    def _split_labels(self, labels, segmenter: Segmenter, checkpointPath):
        """Trained atlas labels stay names; segments painted on this checkpoint's atlas (by ID or name) become
        (name, mask, color) for Segmenter.conditions. A region painted on another checkpoint's atlas is refused."""
        names, painted = [], []
        table = segmenter.checkpoint.label_table
        atlas = self.atlasFor(checkpointPath)
        for label in labels:
            if _in_table(table, label):
                names.append(label)
                continue
            segmentId = self._painted_id(atlas, str(label))
            if segmentId is None:
                self._refuse_other_atlas(str(label), checkpointPath)
                names.append(label)  # unknown names fail in Segmenter.conditions with a clear message
                continue
            segment = atlas.GetSegmentation().GetSegment(segmentId)
            color = tuple(int(round(255 * c)) for c in segment.GetColor())
            painted.append((segment.GetName(), self._segment_mask(atlas, segmentId, segmenter.checkpoint.atlas_image),
                            color))
        return names, painted

    def _refuse_other_atlas(self, label: str, checkpointPath) -> None:
        """A region painted on another checkpoint's atlas would be read on the wrong atlas: say so."""
        identity = checkpoint_identity(checkpointPath)
        for atlas in self._atlases():
            segmentId = self._painted_id(atlas, label)
            if atlas.GetAttribute(ATLAS_OF) != identity and segmentId is not None:
                name = atlas.GetSegmentation().GetSegment(segmentId).GetName()
                raise LCSError(f"{name!r} was painted on the atlas of {atlas.GetAttribute(ATLAS_MODEL)!r}, not on the "
                               "chosen model's atlas; choose that model, or paint the region on this model's atlas")

    @staticmethod
    def _painted_id(atlas, label: str) -> str | None:
        if atlas is None:
            return None
        segments = atlas.GetSegmentation()
        if segments.GetSegment(label) is not None:
            return label
        return segments.GetSegmentIdBySegmentName(label) or None

    @staticmethod
    def _segment_mask(atlas, segmentId: str, reference: sitk.Image) -> sitk.Image:
        """A painted atlas segment as a binary image on the atlas grid (in the atlas segmentation's coordinates)."""
        grid = slicer.vtkOrientedImageData()
        size = reference.GetSize()
        grid.SetExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
        grid.SetImageToWorldMatrix(_ijk_to_ras(reference))
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        merged = slicer.vtkOrientedImageData()
        atlas.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, grid, ids)
        array = _labelmap_array(merged, size[::-1])
        if not array.any():
            raise LCSError(f"painted atlas segment {segmentId!r} is empty; paint it on the atlas first")
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(reference)
        return mask

    @staticmethod
    def _import(labelmap: sitk.Image, conditions: Sequence[Condition], reference, segmentation, codes: dict) -> None:
        """One segment per condition found in `labelmap` (on `reference`'s voxel grid), beside existing ones."""
        array = sitk.GetArrayFromImage(labelmap)
        for condition in conditions:
            box = Box.of(array == condition.value)
            if box is not None:
                _add_segment(segmentation, condition, box, reference, codes.get(condition.name, ""))

    def _place_beside(self, segmentation, volume) -> None:
        """Put the result under the input's study (or patient) in subject hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        volume_item, segmentation_item = hierarchy.GetItemByDataNode(volume), hierarchy.GetItemByDataNode(segmentation)
        if volume_item and segmentation_item:  # items exist once Slicer's subject hierarchy plugins saw the nodes
            hierarchy.SetItemParent(segmentation_item, hierarchy.GetItemParent(volume_item))
