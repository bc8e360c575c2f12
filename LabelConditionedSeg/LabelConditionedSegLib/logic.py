"""MRML glue: run LCS on a volume node and write named, colored segments (Slicer's MRML/VTK only, no Qt).

    SegmentationLogic().process(inputVolume, ["Hippocampus_L"]) -> vtkMRMLSegmentationNode
    SegmentationLogic().proposeMissing(inputVolume, partialSegmentation) -> proposals to accept or reject
    SegmentationLogic().exportForTraining(inputVolume, segmentation, folder, "case01") -> a training case
    SegmentationLogic().undoLastRun() -> takes back the last Apply, proposal run, accept or reject
    SegmentationLogic().startSceneBatch(labels) / startFolderBatch(folder, out, labels) -> job; finishBatch(job) -> table

Runs inside Slicer and under pytest with PyPI's slicer-core. SegmentationLogic is a thin facade over the modules
that do the work, one per flow: mrml (node <-> image), segmenters (models), jobs (jobs and the encoded-volume
cache), apply, batch, proposals, export, atlas (the atlas and painted regions), undo, observers. Call `cleanup()` when
done: it removes every observer the logic holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import slicer
import vtk

from .apply import CHECK, OUTLINE_OF, VOLUMES, Apply, check_warning, run_volumes
from .atlas import ATLAS_MODEL, ATLAS_OF, Atlases
from .batch import TABLE_NAME, Batch, FolderBatch, SceneBatch
from .export import case_exists, export_case
from .jobs import CACHE_ENTRIES, Encodings, Job
from .matching import Match
from .mrml import image_to_volume, volume_to_image
from .observers import SegmentObservers, WeakCallback
from .pipeline import Segmenter
from .proposals import PROPOSAL_THRESHOLD, UNCERTAINTY_TAG, ProposalJob, Proposals, uncertainty_meaning
from .segmenters import BUNDLED_MODEL, Segmenters, checkpoint_file, checkpoint_reference, checkpoint_version
from .undo import UndoRecord

__all__ = ["ATLAS_MODEL", "ATLAS_OF", "BUNDLED_MODEL", "CACHE_ENTRIES", "CHECK", "OUTLINE_OF", "PROPOSAL_THRESHOLD",
           "TABLE_NAME", "UNCERTAINTY_TAG", "VOLUMES", "FolderBatch", "Job", "Match", "ProposalJob", "SceneBatch",
           "SegmentationLogic", "checkpoint_file", "image_to_volume", "uncertainty_meaning", "volume_to_image"]


class SegmentationLogic:
    """LCS on MRML nodes, GUI-free: the Slicer module's Logic and scripts call `process`."""

    def __init__(self, scene=None):
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.messages: Callable[[str], None] = lambda text: None
        say = lambda text: self.messages(text)  # noqa: E731 -- whatever `messages` is at the time
        self._segmenters = Segmenters(say)
        self._encodings = Encodings(self.scene)
        self._undo = UndoRecord(self.scene)
        self._atlases = Atlases(self.scene, self._segmenters)
        self._apply = Apply(self.scene, self._segmenters, self._atlases, self._encodings, self._undo, say)
        self._batch = Batch(self.scene, self._segmenters, self._atlases, self._apply, self._undo)
        self._proposals = Proposals(self.scene, self._segmenters, self._encodings, self._undo, say)
        self._observers = SegmentObservers(self.scene)
        self._sceneTags = [self.scene.AddObserver(self.scene.NodeRemovedEvent, WeakCallback(self._onNodeRemoved)),
                           self.scene.AddObserver(self.scene.EndCloseEvent, WeakCallback(self._onSceneClosed))]

    # ---- model and atlas (segmenters.py, atlas.py) -----------------------------------------
    @staticmethod
    def checkpointReference(path: str | Path | None) -> str:
        """What to store for a checkpoint: BUNDLED_MODEL for the bundled model, other paths unchanged."""
        return checkpoint_reference(path)

    @staticmethod
    def checkpointVersion(checkpointPath: str | Path | None) -> tuple:
        """Which file the checkpoint is and which version of it (LCSError when there is no such file): what a panel
        keys what it knows of a model by, so that a rewritten or deleted file is noticed."""
        return checkpoint_version(checkpointPath)

    def segmenter(self, checkpointPath: str | Path | None = None, device: str = "auto") -> Segmenter:
        """The checkpoint's model on `device`, loaded once. checkpointPath: a path, or None / "" / BUNDLED_MODEL."""
        return self._segmenters.get(checkpointPath, device)

    def atlasIdentity(self, checkpointPath: str | Path | None = None) -> str:
        """The content hash of the checkpoint's atlas (image, labels, label table; not the weights): what atlas nodes
        are matched by, so a fine-tuned model finds the regions painted on its base model's atlas."""
        return self._atlases.identity(checkpointPath)

    def atlasFor(self, checkpointPath: str | Path | None = None):
        """This checkpoint's atlas labels in the scene (a segmentation node), None until `loadAtlas`."""
        return self._atlases.of(checkpointPath)

    @property
    def atlasSegmentation(self):
        """The atlas of the last `loadAtlas` call, if still in the scene (prefer `atlasFor(checkpointPath)`)."""
        model = self._atlases.lastModel
        return self._atlases.of(model) if model is not None else None

    def loadAtlas(self, checkpointPath: str | Path | None = None):
        """The checkpoint's atlas image and labels as nodes (once per checkpoint), to see the atlas and paint on it."""
        return self._atlases.load(checkpointPath)

    def atlasNodeIds(self) -> list[str]:
        """IDs of every atlas image and atlas labels node in the scene, to keep out of a panel's scan and output
        selectors."""
        return self._atlases.node_ids()

    def defaultInputVolume(self):
        """The scan a panel starts with: the first scalar volume that is no atlas image (None when there is none)."""
        return self._atlases.first_scan()

    def paintedSegmentIds(self, checkpointPath: str | Path | None = None) -> list[str]:
        """IDs of this checkpoint's atlas segments that are not trained labels: the regions users painted."""
        return self._atlases.painted(checkpointPath)

    # ---- segmentation (apply.py) ------------------------------------------------------------
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
        """Everything a run needs from the scene, read now (main thread); `job.run` computes in any thread."""
        return self._apply.start(inputVolume, labels, checkpointPath, device, registration, threshold,
                                 keepProbabilities)

    def finish(self, job: Job, outputSegmentation=None, replaceExisting: bool = False):
        """Write a finished job's segments (and probability volumes) into the scene (main thread); `undoLastRun`
        takes them back."""
        return self._apply.finish(job, outputSegmentation, replaceExisting)

    @staticmethod
    def checkWarning(segmentationNode) -> str:
        """The warning to show beside a result whose plausibility check failed (the CHECK attribute); ''."""
        return check_warning(segmentationNode)

    @staticmethod
    def runVolumes(segmentationNode) -> list[dict]:
        """The volumes (mL) Apply measured of the segments still in `segmentationNode`, beside their atlas regions'
        and the plausibility flag: the panel's volume table."""
        return run_volumes(segmentationNode)

    def canShowRegisteredAtlas(self, segmentationNode) -> bool:
        """Whether `segmentationNode` is the last Apply's output, whose registration `showRegisteredAtlas` draws."""
        last = self._apply.last
        return segmentationNode is not None and last is not None and last.outputId == segmentationNode.GetID()

    def showRegisteredAtlas(self, segmentationNode):
        """The atlas brain outline where the last Apply's registration put it on the scan: one segmentation node,
        replaced by the next, removed by `undoLastRun` and with the scene."""
        return self._apply.show_registered_atlas(segmentationNode)

    # ---- batches (batch.py) ------------------------------------------------------------------
    def sceneScans(self) -> list:
        """The volumes a scene batch segments: every scalar volume that is no label map and no atlas image."""
        return self._batch.scene_scans()

    def startSceneBatch(self, labels: Sequence[str | int], checkpointPath=None, device: str = "auto",
                        registration: str = "affine", threshold: float = 0.5) -> SceneBatch:
        """One job for every scan volume of the scene (read now, main thread); `job.run(progress, cancel)` computes
        them one after the other in any thread, `finishBatch` writes them."""
        return self._batch.start_scene(labels, checkpointPath, device, registration, threshold)

    def startFolderBatch(self, folder: str | Path, output: str | Path, labels: Sequence[str | int],
                         checkpointPath=None, device: str = "auto", registration: str = "affine",
                         threshold: float = 0.5, overwrite: bool = False) -> FolderBatch:
        """One job for the scans of `folder`, written into `output` as `lcs segment FOLDER -o OUTPUT` writes them
        (atlas labels only); refuses now what that command would refuse before any work."""
        return self._batch.start_folder(folder, output, labels, checkpointPath, device, registration, threshold,
                                        overwrite)

    def finishBatch(self, job: SceneBatch | FolderBatch):
        """Main thread: a scene batch's segmentations (one per volume; one undo step), and for either batch the
        summary table node (scan, labels found, mL per label, check). Also after Cancel: the finished scans."""
        return self._batch.finish(job)

    # ---- undo (undo.py) ---------------------------------------------------------------------
    def canUndo(self) -> bool:
        """Whether `undoLastRun` has something to take back (a node of the last change is still in the scene)."""
        return self._undo.canUndo()

    def undoLastRun(self) -> str:
        """Take back what the last Apply (finish), proposal run, accept or reject added, and put back what it
        replaced or removed, as far as those nodes are still in the scene; one level. Edits made since to the
        segments it added go with them. Returns one line saying what was undone."""
        return self._undo.undo()

    def undoGroup(self, description: str):
        """Record everything done inside as one undo step (e.g. accepting several proposals at once)."""
        return self._undo.group(description)

    # ---- proposing the labels a segmentation lacks (proposals.py) ----------------------------
    def missingLabels(self, segmentationNode, checkpointPath=None) -> list[str]:
        """The checkpoint's atlas labels that no segment of `segmentationNode` stands for (see `matchedSegments`)."""
        return self._proposals.missing(segmentationNode, checkpointPath)

    def matchedSegments(self, segmentationNode, checkpointPath=None) -> list[Match]:
        """The atlas label each segment stands for: the same name in any case, its terminology code, or a similar
        name ("Left hippocampus" for Hippocampus_L); the panel shows the last two for confirmation."""
        return self._proposals.matches(segmentationNode, checkpointPath)

    def proposalSeconds(self, labels: int, passes: int, device: str, inputVolume=None, checkpointPath=None,
                        registration: str = "affine") -> float:
        """About how long proposing `labels` labels takes (from the last measured run on `device`, else the
        documented figure), registration and encoding included unless `inputVolume`'s encoding is cached."""
        encoded = inputVolume is not None and self._encodings.cached(inputVolume, self._segmenters.builder(
            checkpointPath, device)[0], registration)
        return self._proposals.estimate(labels, passes, device, checkpointPath, encoded)

    def proposeMissing(self, inputVolume, segmentationNode, checkpointPath=None, device: str = "auto", passes: int = 8,
                       registration: str = "affine", keepUncertainty: bool = False, labels: Sequence[str] | None = None,
                       progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None):
        """Propose the labels missing from `segmentationNode` on `inputVolume`, in a new segmentation node
        "<name> proposals" for the user to accept or reject; `segmentationNode` itself is not modified."""
        job = self.startProposals(inputVolume, segmentationNode, checkpointPath, device, passes, registration,
                                  keepUncertainty, labels)
        job.run(progress, cancel)
        return self.finishProposals(job)

    @property
    def proposalThreshold(self) -> float:
        """A label is proposed where its mean probability over the passes reaches this."""
        return PROPOSAL_THRESHOLD

    @staticmethod
    def uncertaintyMeaning(passes: int) -> str:
        """What a proposal's uncertainty figure means, in words for the panel."""
        return uncertainty_meaning(passes)

    def startProposals(self, inputVolume, segmentationNode, checkpointPath=None, device: str = "auto", passes: int = 8,
                       registration: str = "affine", keepUncertainty: bool = False,
                       labels: Sequence[str] | None = None) -> ProposalJob:
        """Read what proposing needs from the scene (main thread); `labels`: some of the missing ones (default: all)."""
        return self._proposals.start(inputVolume, segmentationNode, checkpointPath, device, passes, registration,
                                     keepUncertainty, labels)

    def finishProposals(self, job: ProposalJob):
        """Write a finished proposal job into the scene (main thread; `undoLastRun` removes it)."""
        return self._proposals.finish(job)

    def listProposals(self, proposalsNode) -> list[tuple[str, float | None]]:
        """(segment ID, mean uncertainty inside the segment) of each proposal still to review, in order."""
        return self._proposals.pending(proposalsNode)

    def acceptProposal(self, proposalsNode, segmentId: str, segmentationNode) -> str:
        """Move a proposed segment into the user's segmentation; returns its ID there (`undoLastRun` moves it back)."""
        return self._proposals.accept(proposalsNode, segmentId, segmentationNode)

    def rejectProposal(self, proposalsNode, segmentId: str) -> None:
        """Remove a proposed segment (`undoLastRun` puts it back)."""
        self._proposals.reject(proposalsNode, segmentId)

    # ---- export for training (export.py) ------------------------------------------------------
    @staticmethod
    def caseExists(folder: str | Path, caseName: str) -> bool:
        """Whether the training folder has files of this case already."""
        return case_exists(folder, caseName)

    def exportForTraining(self, inputVolume, segmentationNode, folder: str | Path, caseName: str, checkpointPath=None,
                          overwrite: bool = False) -> Path:
        """Write the scan and its segments named like the checkpoint's atlas labels as one case of a training folder
        (none: an unlabelled case); returns the label map's path."""
        return export_case(inputVolume, segmentationNode, folder, caseName, self._segmenters.table(checkpointPath),
                           overwrite, self.messages)

    # ---- the encoded-volume cache (jobs.py) -------------------------------------------------
    @property
    def encodings(self) -> int:
        """How many volumes were registered and encoded (the cache's misses)."""
        return self._encodings.encodings

    @property
    def lastDevice(self) -> str:
        """The device of the last finished job."""
        return self._encodings.lastDevice

    def cacheSize(self) -> int:
        """How many encoded volumes are cached (at most CACHE_ENTRIES)."""
        return self._encodings.size()

    def cacheDescription(self) -> str:
        """One line: the cached volumes and about how much memory they hold."""
        return self._encodings.describe()

    def clearCache(self) -> None:
        """Release every cached encoding (GPU memory included)."""
        self._encodings.clear()

    # ---- observers (observers.py) -------------------------------------------------------------
    def observeSegments(self, segmentationNode, callback: Callable[[object], None]) -> None:
        """Call `callback(segmentationNode)` when one of its segments is added, removed, renamed, recoloured or
        retagged (vtkSegmentation's SegmentAdded/Removed/Modified, forwarded by the node), not on paint strokes
        (those fire SourceRepresentationModified and RepresentationModified). Observing the same node with the same
        callback again does nothing. The observers go on the node's removal, on scene close, with
        `stopObservingSegments` and `cleanup`; the logic keeps only the node's ID, so it never keeps a deleted node
        alive (`callback` must not hold the node either)."""
        self._observers.observe(segmentationNode, callback)

    def stopObservingSegments(self, segmentationNode=None) -> None:
        """Stop observing `segmentationNode` (every observed segmentation when None)."""
        self._observers.stop(segmentationNode)

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _onNodeRemoved(self, scene, event, node) -> None:
        """A removed node leaves the observers and the cache."""
        self._observers.removed(node)
        self._encodings.forget(node.GetID() if node is not None else None)

    def _onSceneClosed(self, scene, event) -> None:
        """A closed scene leaves nothing behind: cache, undo record and observer bookkeeping go; a scene batch
        started before it writes nothing."""
        self.clearCache()
        self._observers.forget()
        self._undo.clear()
        self._apply.last = None
        self._batch.closed()

    def cleanup(self) -> None:
        """Remove every observer the logic holds (scene ones included) and release the cache and models; call when
        the module closes."""
        self.stopObservingSegments()
        for tag in self._sceneTags:
            self.scene.RemoveObserver(tag)
        self._sceneTags = []
        self.clearCache()
        self._segmenters.clear()
