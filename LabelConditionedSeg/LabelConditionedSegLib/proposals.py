"""Relabel missing organs: propose the atlas labels a partial segmentation lacks, then accept or reject each.

Proposals go into a new segmentation node "<name> proposals"; the user's segmentation changes only on accept.
Each step is recorded for undo.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from .errors import Cancelled, LCSError
from .geometry import keep_highest
from .jobs import Encodings, Job
from .matching import Match, match_segments
from .mrml import (BINARY, import_labelmap, map_into, new_segmentation, place_beside, place_on, require_image,
                   segment_entries, segment_names, volume_beside)
from .segmenters import Segmenters
from .undo import UndoRecord, few

UNCERTAINTY_TAG = "LCS.uncertainty"  # segment tag of a proposal: its mean uncertainty inside the segment
PROPOSAL_BATCH = 8  # labels proposed at a time: full-size maps are held for these only
PROPOSAL_THRESHOLD = 0.5  # a voxel is proposed where a label's mean probability over the passes reaches this
# Seconds per label and pass of a proposal run (decode, fold, map back to the scan) until a run here measured it, and
# seconds to register (affine) and encode a volume: the demo model on Colin27 (1 mm) on an idle 2-core CPU, since
# decoding within the prior's radius and the coarse winner of the affine fits (docs/results.md, "Speed", proposals).
DECODE_SECONDS = 0.24
PREPARE_SECONDS = 5.1


def uncertainty_meaning(passes: int) -> str:
    """What a proposal's uncertainty figure means, for a reader of the panel."""
    return (f"Uncertainty: how much the label's probability varies over {passes} dropout passes, averaged inside the "
            "proposal (its standard deviation): 0 = every pass agrees, 0.5 = the passes split half and half "
            "between yes and no. A model without dropout decodes once and reports 1 - |2p - 1| instead (0 = sure, "
            "1 = p is 0.5).")


@dataclass
class ProposalJob(Job):
    """A proposal run split by thread like `Job`. `run` proposes the labels a few at a time and folds them as they
    come: a voxel goes to the label whose mean probability is the highest there, if it is at least `threshold`, so
    memory does not grow with the number of labels (unless uncertainty volumes are kept)."""

    segmentationId: str = ""
    passes: int = 8
    keepUncertainty: bool = False
    meanUncertainty: dict[str, float] = field(default_factory=dict)  # per label with voxels, inside them
    empty: list[str] = field(default_factory=list)  # labels proposed nowhere
    uncertainty: dict[str, sitk.Image] = field(default_factory=dict)  # per label with voxels, if keepUncertainty
    labelmap: sitk.Image | None = None  # one proposed label per voxel, on the input grid
    decodeSeconds: float = 0.0  # measured: seconds per label and pass

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report = progress or (lambda f, m: None)
        self._prepare(report, cancel)
        started = time.perf_counter()
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
        passes = self.passes if self.segmenter.engine.dropout_layers else 1
        self.decodeSeconds = (time.perf_counter() - started) / (len(self.conditions) * passes)
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


class Proposals:
    """Missing labels, proposal runs, and the review of their segments."""

    def __init__(self, scene, segmenters: Segmenters, encodings: Encodings, undo: UndoRecord,
                 messages: Callable[[str], None]):
        self.scene = scene
        self._segmenters, self._encodings, self._undo = segmenters, encodings, undo
        self._messages = messages
        self._decodeSeconds: dict[str, float] = {}  # device asked for -> seconds per label and pass, its last run

    def matches(self, segmentationNode, checkpointPath=None) -> list[Match]:
        """The atlas label each segment of `segmentationNode` stands for (matching.match_segments): by name in any
        case, by terminology code, or by a similar name."""
        if segmentationNode is None:
            raise LCSError("select the segmentation whose missing labels to list")
        return match_segments(segment_entries(segmentationNode), self._segmenters.table(checkpointPath))

    def missing(self, segmentationNode, checkpointPath=None) -> list[str]:
        """The checkpoint's atlas labels that no segment of `segmentationNode` stands for (`matches`): what a partial
        segmentation lacks. Segments matching no label (painted regions, a tumour) do not count."""
        present = {m.label for m in self.matches(segmentationNode, checkpointPath)}
        return [l.name for l in self._segmenters.table(checkpointPath) if l.name not in present]

    def estimate(self, labels: int, passes: int, device: str, checkpointPath=None, encoded: bool = False) -> float:
        """About how many seconds proposing `labels` labels takes on `device`: per label and pass (one pass for a
        model without dropout), the last run's measured time there (else DECODE_SECONDS), plus PREPARE_SECONDS
        unless the volume is `encoded` already."""
        if not self._segmenters.get(checkpointPath, "cpu").engine.dropout_layers:
            passes = 1
        return labels * passes * self._decodeSeconds.get(device, DECODE_SECONDS) + (0 if encoded else PREPARE_SECONDS)

    def start(self, inputVolume, segmentationNode, checkpointPath=None, device: str = "auto", passes: int = 8,
              registration: str = "affine", keepUncertainty: bool = False,
              labels: Sequence[str] | None = None) -> ProposalJob:
        """Read what proposing needs from the scene (main thread). `labels`: some of the missing labels (default: all).
        `passes`: Monte Carlo dropout decodes per label (a model without dropout decodes once). `keepUncertainty`
        adds one uncertainty volume per proposal (and holds them in memory until the run finishes)."""
        require_image(inputVolume)
        if passes < 1:
            raise LCSError(f"passes is {passes}; propose with at least 1 pass")
        missing = self.missing(segmentationNode, checkpointPath)
        if labels is not None:
            absent = {name.lower(): name for name in missing}
            other = [str(label) for label in labels if str(label).lower() not in absent]
            if other:
                raise LCSError(f"{', '.join(other)}: not missing from {segmentationNode.GetName()} (a segment has that "
                               "name, or no atlas label does); pick labels from the missing ones")
            missing = [absent[str(label).lower()] for label in labels]
        if not missing:
            raise LCSError(f"{segmentationNode.GetName()} has a segment for every atlas label; nothing to propose")
        conditions = self._segmenters.get(checkpointPath, "cpu").conditions(missing)  # the run's model comes in `run`
        return self._encodings.job(ProposalJob, inputVolume, *self._segmenters.builder(checkpointPath, device),
                                   conditions, registration, threshold=PROPOSAL_THRESHOLD,
                                   segmentationId=segmentationNode.GetID(), passes=passes,
                                   keepUncertainty=keepUncertainty, codes=self._segmenters.codes(checkpointPath))

    def finish(self, job: ProposalJob):
        """Write a finished proposal job into the scene (main thread), recorded for undo: a new segmentation node
        under the input's transform with one segment per proposed label (atlas name and color, its mean uncertainty
        in the UNCERTAINTY_TAG tag), and the uncertainty volumes "<label> uncertainty" if asked for. Labels proposed
        nowhere are reported, not added."""
        segmentation = self.scene.GetNodeByID(job.segmentationId)
        if segmentation is None:
            raise LCSError("the segmentation was removed from the scene while its missing labels were proposed")
        inputVolume = self._encodings.finished(job)
        self._decodeSeconds[job.cacheKey[3][1]] = job.decodeSeconds  # by the device asked for ("auto" too)
        if job.empty:
            self._messages(f"No voxels proposed for {', '.join(job.empty)}.")
        found = [c for c in job.conditions if c.name in job.meanUncertainty]
        if not found:
            raise LCSError(f"the model proposed no voxels for the {len(job.conditions)} missing label(s); is the input "
                           "the anatomy it was trained on?")
        with self._undo.recording(f"proposing {few([c.name for c in found])} for {segmentation.GetName()}") as change:
            proposals = new_segmentation(self.scene, f"{segmentation.GetName()} proposals")
            change.created.append(proposals.GetID())
            place_on(proposals, inputVolume)
            import_labelmap(job.labelmap, found, inputVolume, proposals, job.codes)
            segments = proposals.GetSegmentation()
            for c in found:
                segmentId = segments.GetSegmentIdBySegmentName(c.name)
                segments.GetSegment(segmentId).SetTag(UNCERTAINTY_TAG, f"{job.meanUncertainty[c.name]:.4f}")
                change.added.append((proposals.GetID(), segmentId))
            for name, image in job.uncertainty.items():
                change.created.append(volume_beside(self.scene, image, f"{name} uncertainty", inputVolume).GetID())
        place_beside(self.scene, proposals, inputVolume)
        return proposals

    @staticmethod
    def pending(proposalsNode) -> list[tuple[str, float | None]]:
        """(segment ID, mean uncertainty inside the segment) of each proposal still to review, in order."""
        segments = proposalsNode.GetSegmentation()
        out = []
        for i in range(segments.GetNumberOfSegments()):
            value = vtk.reference("")
            found = segments.GetNthSegment(i).GetTag(UNCERTAINTY_TAG, value)
            out.append((segments.GetNthSegmentID(i), float(str(value)) if found else None))
        return out

    def accept(self, proposalsNode, segmentId: str, segmentationNode) -> str:
        """Move a proposed segment (voxels, name, color, tags) into the user's segmentation, mapped into its
        coordinates if it is under another transform; returns its ID there. Refused when the segmentation has a
        segment of that name already: users' segments are never replaced."""
        name = _proposal(proposalsNode, segmentId).GetName()
        if segmentationNode is None or segmentationNode is proposalsNode:
            raise LCSError("select the segmentation to accept proposals into (not the proposals themselves)")
        if name.lower() in {n.lower() for n in segment_names(segmentationNode)}:
            raise LCSError(f"{segmentationNode.GetName()} already has a segment named {name!r}; rename or delete it "
                           "to accept the proposal")
        with self._undo.recording(f"accepting proposal {name} into {segmentationNode.GetName()}") as change:
            proposal = change.take(proposalsNode, segmentId)
            copy = slicer.vtkSegment()
            copy.DeepCopyMetadata(proposal)
            image = slicer.vtkOrientedImageData()
            image.DeepCopy(proposal.GetRepresentation(BINARY))
            map_into(segmentationNode, image, proposalsNode)
            copy.AddRepresentation(BINARY, image)
            target = segmentationNode.GetSegmentation()
            newId = target.GenerateUniqueSegmentID(segmentId)
            if not target.AddSegment(copy, newId):
                raise LCSError(f"could not copy proposal {name!r} into {segmentationNode.GetName()}")
            change.added.append((segmentationNode.GetID(), newId))
        return newId

    def reject(self, proposalsNode, segmentId: str) -> None:
        """Remove a proposed segment (undo puts it back)."""
        name = _proposal(proposalsNode, segmentId).GetName()
        with self._undo.recording(f"rejecting proposal {name}") as change:
            change.take(proposalsNode, segmentId)


def _proposal(proposalsNode, segmentId: str):
    segment = proposalsNode.GetSegmentation().GetSegment(segmentId) if proposalsNode is not None else None
    if segment is None:
        raise LCSError(f"there is no proposal {segmentId!r} to review; it was accepted or rejected already")
    return segment
