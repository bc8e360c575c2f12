"""MRML glue: run LCS on a volume node and write named, colored segments (Slicer's MRML/VTK only, no Qt).

    SegmentationLogic().process(inputVolume, ["Hippocampus_L"]) -> vtkMRMLSegmentationNode
    SegmentationLogic().proposeMissing(inputVolume, partialSegmentation) -> proposals to accept or reject
    SegmentationLogic().exportForTraining(inputVolume, segmentation, folder, "case01") -> a training case

Runs inside Slicer and under pytest with PyPI's slicer-core. The encoded volume is cached,
so asking for another label of the same volume costs one decode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .checkpoint import Checkpoint, default_checkpoint
from .engine import Condition
from .errors import Cancelled, LCSError
from .geometry import Box, keep_highest
from .labels import LabelTable
from .pipeline import Prepared, Segmentation, Segmenter
from .training_folder import write_case

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
UNCERTAINTY_TAG = "LCS.uncertainty"  # segment tag of a proposal: its mean uncertainty inside the segment
PROPOSAL_BATCH = 8  # labels proposed at a time: full-size maps are held for these only
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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


def _set_reference(segmentation, volume) -> None:
    """Segments on `volume`'s geometry, and the reference that Slicer shows for it."""
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())


def _add_segment(segmentation, condition: Condition, box: Box, volume) -> str:
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
    segmentId = segmentation.AddSegmentFromBinaryLabelmapRepresentation(image, condition.name,
                                                                        [v / 255 for v in condition.color])
    if not segmentId:
        raise LCSError(f"could not add segment {condition.name!r} to {segmentation.GetName()}")
    return segmentId


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


def _check_table(path: Path, labels) -> None:
    """A training folder's labels.csv, if it has one, must give the exported labels the model's values."""
    if not path.exists():
        return
    theirs = {l.name.lower(): l.value for l in LabelTable.read_csv(path)}
    clash = [l.name for l in labels if theirs.get(l.name.lower()) != l.value]
    if clash:
        raise LCSError(f"{path} lacks {', '.join(clash)} or gives other values than the model; export into a folder "
                       "made with this model's labels")


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

    def _table(self, checkpointPath: str | Path | None = None) -> LabelTable:
        """The checkpoint's atlas labels (its model is loaded on the CPU once, like the atlas)."""
        return self.segmenter(checkpointPath, "cpu").checkpoint.label_table

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
        trained = {l.name for l in self._table(checkpointPath)}
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
        return self._job(Job, inputVolume, segmenter, conditions, registration, threshold=threshold,
                         keepProbabilities=keepProbabilities)

    def _job(self, kind: type[Job], inputVolume, segmenter: Segmenter, conditions: list[Condition], registration: str,
             **options) -> Job:
        """A job of `kind` that reuses the volume's cached encoding, or carries the volume's voxels to encode them."""
        key = self._cache_key(inputVolume, segmenter, registration)
        prepared = self._prepared.get(key)
        return kind(inputVolume.GetID(), key, segmenter, conditions, registration,
                    image=None if prepared else volume_to_image(inputVolume), prepared=prepared, **options)

    def _finished(self, job: Job):
        """The job's input volume, once it is known to be still there; caches the job's encoding."""
        inputVolume = self.scene.GetNodeByID(job.volumeId)
        if inputVolume is None:
            raise LCSError("the input volume was removed from the scene while it was being segmented")
        if job.encoded:
            self._prepared = {k: v for k, v in self._prepared.items() if k[0] != job.volumeId}  # one state per volume
            self._prepared[job.cacheKey] = job.prepared
            self.encodings += 1
        self.lastDevice = job.segmenter.device
        return inputVolume

    def finish(self, job: Job, outputSegmentation=None, replaceExisting: bool = False):
        """Write a finished job's segments (and probability volumes) into the scene as one undo step (main thread)."""
        inputVolume = self._finished(job)
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
        for condition, box in zip(job.result.conditions, job.result.masks):  # each on its own: they may overlap
            if box is not None:
                _add_segment(outputSegmentation, condition, box, inputVolume)
        if job.result.missing:
            self.messages(f"Found nowhere: {', '.join(job.result.missing)}.")
        for condition, probability in job.probabilities:
            image_to_volume(probability, self.scene, f"{inputVolume.GetName()} {condition.name} probability")
        self._place_beside(outputSegmentation, inputVolume)
        return outputSegmentation

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
                         segmentationId=segmentationNode.GetID(), passes=passes, keepUncertainty=keepUncertainty)

    def finishProposals(self, job: ProposalJob):
        """Write a finished proposal job into the scene as one undo step (main thread): a new segmentation node with
        one segment per proposed label (atlas name and color, its mean uncertainty in the UNCERTAINTY_TAG tag), and
        the uncertainty volumes "<label> uncertainty" if asked for. Labels proposed nowhere are reported, not added."""
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
        self.scene.SaveStateForUndo()
        proposals = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{segmentation.GetName()} proposals")
        proposals.CreateDefaultDisplayNodes()
        _set_reference(proposals, inputVolume)
        self._import(job.labelmap, found, inputVolume, proposals)
        segments = proposals.GetSegmentation()
        for c in found:
            segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(c.name))
            segment.SetTag(UNCERTAINTY_TAG, f"{job.meanUncertainty[c.name]:.4f}")
        for name, image in job.uncertainty.items():
            image_to_volume(image, self.scene, f"{name} uncertainty")
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
        """Move a proposed segment (voxels, name, color) into the user's segmentation as one undo step; returns its
        ID there. Refused when the segmentation has a segment of that name already: users' segments are never replaced."""
        name = self._proposal(proposalsNode, segmentId).GetName()
        if segmentationNode is None or segmentationNode is proposalsNode:
            raise LCSError("select the segmentation to accept proposals into (not the proposals themselves)")
        if name.lower() in {n.lower() for n in _segment_names(segmentationNode)}:
            raise LCSError(f"{segmentationNode.GetName()} already has a segment named {name!r}; rename or delete it "
                           "to accept the proposal")
        self.scene.SaveStateForUndo()
        target = segmentationNode.GetSegmentation()
        if not target.CopySegmentFromSegmentation(proposalsNode.GetSegmentation(), segmentId, True):
            raise LCSError(f"could not copy proposal {name!r} into {segmentationNode.GetName()}")
        return target.GetSegmentIdBySegmentName(name)

    def rejectProposal(self, proposalsNode, segmentId: str) -> None:
        """Remove a proposed segment (one undo step)."""
        self._proposal(proposalsNode, segmentId)
        self.scene.SaveStateForUndo()
        proposalsNode.GetSegmentation().RemoveSegment(segmentId)

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
        unknown rather than background. Other segments are left out and named through `messages`."""
        _require_image(inputVolume)
        if segmentationNode is None:
            raise LCSError("select the segmentation to export")
        if not str(folder).strip():
            raise LCSError("choose the training folder to export the case into")
        if not CASE_NAME.fullmatch(caseName or ""):
            raise LCSError(f"case name {caseName!r} cannot name files; use letters, digits, '_', '-' and '.'")
        folder = Path(folder)
        if self.caseExists(folder, caseName) and not overwrite:
            raise LCSError(f"case {caseName!r} exists in {folder} already; choose another name or allow overwriting")
        table = self._table(checkpointPath)
        by_name = {l.name.lower(): l for l in table}
        segments = segmentationNode.GetSegmentation()
        labels = np.zeros(slicer.util.arrayFromVolume(inputVolume).shape, np.int32)
        written, skipped = {}, []
        for i in range(segments.GetNumberOfSegments()):
            segmentId, name = segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName()
            label = by_name.get(name.lower())
            mask = self._segment_array(segmentationNode, segmentId, inputVolume) if label else None
            if mask is None or not mask.any():
                skipped.append(name)
                continue
            labels[mask] = label.value
            written[label.value] = label
        if not written:
            raise LCSError(f"no segment of {segmentationNode.GetName()} is named like an atlas label (or they are "
                           "empty); name segments as in the atlas label list")
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
        return folder / "labels" / f"{caseName}.nii.gz"

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
        try:
            array = self._segment_array(self.atlasSegmentation, segmentId, grid)
        finally:
            self.scene.RemoveNode(grid)
        if not array.any():
            raise LCSError(f"painted atlas segment {segmentId!r} is empty; paint it on the atlas first")
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(reference)
        return mask

    def _segment_array(self, segmentation, segmentId: str, volume) -> np.ndarray:
        """One segment as a boolean array on `volume`'s voxel grid (k, j, i), whatever grid the segment is on."""
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__lcs_segment__")
        try:
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, volume)
            return slicer.util.arrayFromVolume(labelmap) > 0
        finally:
            self.scene.RemoveNode(labelmap)

    @staticmethod
    def _import(labelmap: sitk.Image, conditions: Sequence[Condition], reference, segmentation) -> None:
        """One segment per condition found in `labelmap` (on `reference`'s voxel grid), beside existing ones."""
        array = sitk.GetArrayFromImage(labelmap)
        for condition in conditions:
            box = Box.of(array == condition.value)
            if box is not None:
                _add_segment(segmentation, condition, box, reference)

    def _place_beside(self, segmentation, volume) -> None:
        """Put the result under the input's study (or patient) in subject hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        volume_item, segmentation_item = hierarchy.GetItemByDataNode(volume), hierarchy.GetItemByDataNode(segmentation)
        if volume_item and segmentation_item:  # items exist once Slicer's subject hierarchy plugins saw the nodes
            hierarchy.SetItemParent(segmentation_item, hierarchy.GetItemParent(volume_item))
