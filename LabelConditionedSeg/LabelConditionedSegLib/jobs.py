"""Segmentation jobs, the worker thread they run in, and the encoded-volume cache.

A job is one run split by thread: the logic reads the scene (main thread), `Job.run` only computes (any thread: a
GUI runs it in a `Worker`), the logic writes the result (main thread). The encoded volume is cached (CACHE_ENTRIES
volumes), so asking for another label of the same volume costs one decode.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import vtk

from .engine import Condition
from .errors import Cancelled, LCSError
from .mrml import volume_to_image
from .pipeline import Prepared, Segmentation, Segmenter

CACHE_ENTRIES = 2  # encoded volumes kept; each holds the scan and its encoder features (on the GPU when there is one)


@dataclass
class Job:
    """One run: what `SegmentationLogic.start` read from the scene, then what `run` computed. `run` also gets the
    run's model (`build`), so that a GUI's worker thread, not its main thread, loads it and starts CUDA."""

    volumeId: str
    cacheKey: tuple
    build: Callable[[], Segmenter] | None  # None once `run` has the model
    conditions: list[Condition]
    registration: str
    segmenter: Segmenter | None = None  # set by `run`
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
        """Build the model, then register and encode the volume (the first 30% of the progress) unless the cache
        had it."""
        if self.segmenter is None:
            self.segmenter, self.build = self.build(), None
        if self.prepared is None:
            self.prepared = self.segmenter.prepare(self.image, self.registration, lambda f, m: report(0.3 * f, m), cancel)

    @property
    def encoded(self) -> bool:
        """Whether this job registered and encoded the volume itself (a cache miss)."""
        return self.image is not None


@dataclass(frozen=True)
class Failure:
    """Why work failed, as text: an exception would hold the worker's frames, and through them the job."""

    message: str
    details: str  # the traceback
    cancelled: bool = False


class Worker:
    """`work()` in a daemon thread; the main thread polls `running`, then takes the outcome once with `take`. From
    then on the worker holds nothing of the work (result, closure, exception), so whoever still holds the worker
    (in Slicer, PythonQt holds what a QTimer calls, out of the cycle collector's sight) holds no job."""

    def __init__(self, work: Callable[[], object]):
        self._result: object = None
        self._failure: Failure | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)  # drops `work` when it ends
        self._thread.start()

    def _run(self, work: Callable[[], object]) -> None:
        try:
            self._result = work()
        except Exception as error:
            self._failure = Failure(str(error), traceback.format_exc(), isinstance(error, Cancelled))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def take(self) -> tuple[object, Failure | None]:
        """(result, None) or (None, failure), once the work is over; the worker lets go of the result."""
        result, self._result = self._result, None
        return result, self._failure


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


class Encodings:
    """The encoded-volume cache (least recently used first), filled by finished jobs."""

    def __init__(self, scene):
        self.scene = scene
        self._prepared: dict[tuple, Prepared] = {}
        self.encodings = 0  # how many volumes were registered and encoded (the cache's misses)
        self.lastDevice = ""

    def job(self, kind: type[Job], inputVolume, model: tuple, build: Callable[[], Segmenter],
            conditions: list[Condition], registration: str, **options) -> Job:
        """A job of `kind` that reuses the volume's cached encoding, or carries the volume's voxels to encode them.
        `model` names the model `build` gives (the checkpoint file's version and the device)."""
        key = self._key(inputVolume, model, registration)
        prepared = self._prepared.pop(key, None)
        if prepared is not None:
            self._prepared[key] = prepared  # now the most recently used
        return kind(inputVolume.GetID(), key, build, conditions, registration,
                    image=None if prepared else volume_to_image(inputVolume), prepared=prepared, **options)

    def cached(self, inputVolume, model: tuple, registration: str) -> bool:
        """Whether the volume's encoding for this model and registration is cached."""
        return self._key(inputVolume, model, registration) in self._prepared

    def finished(self, job: Job):
        """The job's input volume, once it is known to be still there; caches the job's encoding."""
        inputVolume = self.scene.GetNodeByID(job.volumeId)
        if inputVolume is None:
            raise LCSError("the input volume was removed from the scene while it was being segmented")
        if job.encoded:
            self.forget(job.volumeId)  # one state per volume
            self._prepared[job.cacheKey] = job.prepared
            self.release(list(self._prepared)[:-CACHE_ENTRIES])
            self.encodings += 1
        self.lastDevice = job.segmenter.device
        return inputVolume

    def size(self) -> int:
        """How many encoded volumes are cached (at most CACHE_ENTRIES)."""
        return len(self._prepared)

    def describe(self) -> str:
        """One line: the cached volumes and about how much memory they hold."""
        if not self._prepared:
            return "No encoded volume cached."
        names = [node.GetName() if (node := self.scene.GetNodeByID(k[0])) is not None else k[0] for k in self._prepared]
        mb = sum(_nbytes(p) for entry in self._prepared.values() for p in _parts(entry)) / 2**20
        return f"{len(names)} encoded volume(s) cached ({', '.join(names)}): about {mb:.0f} MB."

    def clear(self) -> None:
        """Release every cached encoding (GPU memory included)."""
        self.release(list(self._prepared))

    def forget(self, volumeId: str) -> None:
        """Release a volume's encodings (it left the scene)."""
        self.release([k for k in self._prepared if k[0] == volumeId])

    def release(self, keys: Sequence[tuple]) -> None:
        """Drop cached encodings; memory they held on a GPU goes back to the driver."""
        devices = {p.device.type for k in keys for p in _parts(self._prepared.pop(k)) if isinstance(p, torch.Tensor)}
        if "cuda" in devices:
            torch.cuda.empty_cache()
        if "mps" in devices:
            torch.mps.empty_cache()

    @staticmethod
    def _key(inputVolume, model: tuple, registration: str) -> tuple:
        """Identifies a volume's voxels and geometry, the model and the registration mode."""
        matrix = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(matrix)
        return (inputVolume.GetID(), inputVolume.GetImageData().GetMTime(),
                tuple(matrix.GetElement(r, c) for r in range(4) for c in range(4)), model, registration)
