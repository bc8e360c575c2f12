"""Apply: segment atlas labels (or painted regions) on a volume and write them as segments.

`start` reads the scene (main thread), the job computes (any thread), `finish` writes the segments, probability
volumes and the run's plausibility check (main thread), recorded for undo.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .atlas import Atlases
from .engine import Condition
from .errors import LCSError
from .geometry import labels_to_input
from .jobs import Encodings, Job
from .mrml import (add_segment, import_labelmap, new_segmentation, nodes, place_beside, place_on, remove_node,
                   require_image, segment_names, volume_beside, volume_to_image)
from .quality import describe
from .segmenters import Segmenters
from .undo import UndoRecord, few

CHECK = "LCS.check"  # attribute of an output segmentation: what its last run's plausibility check found ('' nothing)
OUTLINE_OF = "LCS.registeredAtlasOf"  # attribute of the registered atlas outline node: the output segmentation's ID
VOLUMES = "LCS.volumes"  # attribute of an output segmentation: its runs' label volumes (JSON, by segment name)
OUTLINE = Condition("Registered atlas brain", 1, np.zeros((0, 0, 0), bool), (255, 255, 0))


def check_warning(segmentation) -> str:
    """The warning the panel shows beside a result whose plausibility check failed ('' when it passed)."""
    check = segmentation.GetAttribute(CHECK) if segmentation is not None else None
    return (f"Check failed: {check}. Show the registered atlas over the scan and look at the segments before using "
            "them.") if check else ""


def run_volumes(segmentation) -> list[dict]:
    """The volumes the runs measured of the segments still in `segmentation` (name, volume_ml, atlas_ml: the
    atlas region's as registration scales it, flag: quality.flag's verdict, '' when plausible), in segment order."""
    stored = json.loads((segmentation.GetAttribute(VOLUMES) if segmentation is not None else None) or "{}")
    return [{"name": name, **stored[name]} for name in segment_names(segmentation) if name in stored] if stored else []


@dataclass(frozen=True)
class Registration:
    """Where the last run put the atlas on its volume: enough to draw the atlas brain over the scan later."""

    outputId: str
    volumeId: str
    transform: sitk.Transform  # atlas (model grid) points -> input points
    atlasMask: sitk.Image


class Apply:
    """Segmentation runs: atlas labels or painted regions in, named and colored segments out."""

    def __init__(self, scene, segmenters: Segmenters, atlases: Atlases, encodings: Encodings, undo: UndoRecord,
                 messages: Callable[[str], None]):
        self.scene = scene
        self._segmenters, self._atlases, self._encodings, self._undo = segmenters, atlases, encodings, undo
        self._messages = messages
        self.last: Registration | None = None  # the last finished run's registration

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
        rows = job.result.volumes()
        stored = json.loads(outputSegmentation.GetAttribute(VOLUMES) or "{}")
        stored.update({r["name"]: {k: r[k] for k in ("volume_ml", "atlas_ml", "flag")} for r in rows if r["voxels"]})
        outputSegmentation.SetAttribute(VOLUMES, json.dumps(stored))
        check = describe(job.result.check, rows)
        outputSegmentation.SetAttribute(CHECK, check)
        if check:
            self._messages(f"Check failed on {inputVolume.GetName()}: {check}. Look at the segments over the scan "
                           "before using them.")
        self._drop_outlines(outputSegmentation.GetID())  # they show an earlier run's registration
        self.last = Registration(outputSegmentation.GetID(), job.volumeId, job.prepared.transform,
                                 job.segmenter.checkpoint.atlas_mask)
        place_beside(self.scene, outputSegmentation, inputVolume)
        return outputSegmentation

    def show_registered_atlas(self, outputSegmentation):
        """The atlas's brain mask where the last run's registration put it on the scan, drawn as an outline in a
        segmentation node of its own (one per output: an earlier one goes), recorded for undo. Under registration
        "deformable" it shows the affine step, which the deformable prior starts from."""
        run = self.last
        if outputSegmentation is None or run is None or run.outputId != outputSegmentation.GetID():
            raise LCSError("the registration is known for the last Apply's output only; select that output, or Apply")
        inputVolume = self.scene.GetNodeByID(run.volumeId)
        if inputVolume is None:
            raise LCSError("the scan of the last Apply was removed from the scene; Apply again")
        mask = sitk.Cast(run.atlasMask > 0, sitk.sitkUInt8)
        onScan = labels_to_input(mask, volume_to_image(inputVolume), run.transform)
        self._drop_outlines(run.outputId)
        with self._undo.recording(f"showing the registered atlas on {inputVolume.GetName()}") as change:
            outline = new_segmentation(self.scene, f"{inputVolume.GetName()} registered atlas")
            change.created.append(outline.GetID())
            outline.SetAttribute(OUTLINE_OF, run.outputId)
            place_on(outline, inputVolume)
            import_labelmap(onScan, [OUTLINE], inputVolume, outline, {})
            change.added.extend((outline.GetID(), outline.GetSegmentation().GetNthSegmentID(i))
                                for i in range(outline.GetSegmentation().GetNumberOfSegments()))
            display = outline.GetDisplayNode()
            if display is not None:
                display.SetVisibility2DFill(False)  # an outline over the scan, the segments stay readable
                display.SetVisibility3D(False)
        return outline

    def _drop_outlines(self, outputId: str) -> None:
        for node in nodes(self.scene, "vtkMRMLSegmentationNode"):
            if node.GetAttribute(OUTLINE_OF) == outputId:
                remove_node(self.scene, node)
