"""Apply: segment atlas labels (or painted regions) on a volume and write them as segments.

`start` reads the scene (main thread), the job computes (any thread), `finish` writes the segments, probability
volumes and the run's plausibility check (main thread), recorded for undo.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .atlas import Atlases
from .jobs import Encodings, Job
from .mrml import add_segment, new_segmentation, place_beside, place_on, require_image, volume_beside
from .quality import describe
from .segmenters import Segmenters
from .undo import UndoRecord, few

CHECK = "LCS.check"  # attribute of an output segmentation: what its last run's plausibility check found ('' nothing)


class Apply:
    """Segmentation runs: atlas labels or painted regions in, named and colored segments out."""

    def __init__(self, scene, segmenters: Segmenters, atlases: Atlases, encodings: Encodings, undo: UndoRecord,
                 messages: Callable[[str], None]):
        self.scene = scene
        self._segmenters, self._atlases, self._encodings, self._undo = segmenters, atlases, encodings, undo
        self._messages = messages

    def start(self, inputVolume, labels: Sequence[str | int], checkpointPath=None, device: str = "auto",
              registration: str = "affine", threshold: float = 0.5, keepProbabilities: bool = False) -> Job:
        """Everything a run needs from the scene, read now (main thread)."""
        require_image(inputVolume)
        labelled = self._segmenters.get(checkpointPath, "cpu")  # the labels and atlas; the run's model comes in `run`
        conditions = labelled.conditions(*self._atlases.split(labels, labelled, checkpointPath))
        return self._encodings.job(Job, inputVolume, *self._segmenters.builder(checkpointPath, device), conditions,
                                   registration, threshold=threshold, keepProbabilities=keepProbabilities,
                                   codes=self._segmenters.codes(checkpointPath))

    def finish(self, job: Job, outputSegmentation=None, replaceExisting: bool = False):
        """Write a finished job's segments (and probability volumes) into the scene (main thread), recorded for undo;
        the output is placed under the input volume's parent transform (see `place_on`)."""
        inputVolume = self._encodings.finished(job)
        names = [c.name for c, box in zip(job.result.conditions, job.result.masks) if box is not None]
        with self._undo.recording(f"segmenting {few(names) or 'nothing'} on {inputVolume.GetName()}") as change:
            if outputSegmentation is None:
                outputSegmentation = new_segmentation(self.scene, f"{inputVolume.GetName()} LCS")
                change.created.append(outputSegmentation.GetID())
            else:
                change.keep_state(outputSegmentation)
            place_on(outputSegmentation, inputVolume)
            if replaceExisting:
                segments = outputSegmentation.GetSegmentation()
                for condition in job.conditions:
                    while segments.GetSegmentIdBySegmentName(condition.name):
                        change.take(outputSegmentation, segments.GetSegmentIdBySegmentName(condition.name))
            for condition, box in zip(job.result.conditions, job.result.masks):  # each on its own: they may overlap
                if box is not None:
                    code = job.codes.get(condition.name, "")
                    change.added.append((outputSegmentation.GetID(),
                                         add_segment(outputSegmentation, condition, box, inputVolume, code)))
            for condition, probability in job.probabilities:
                name = f"{inputVolume.GetName()} {condition.name} probability"
                change.created.append(volume_beside(self.scene, probability, name, inputVolume).GetID())
        if job.result.missing:
            self._messages(f"Found nowhere: {', '.join(job.result.missing)}.")
        check = describe(job.result.check, job.result.volumes())
        outputSegmentation.SetAttribute(CHECK, check)
        if check:
            self._messages(f"Check failed on {inputVolume.GetName()}: {check}. Look at the segments over the scan "
                           "before using them.")
        place_beside(self.scene, outputSegmentation, inputVolume)
        return outputSegmentation
