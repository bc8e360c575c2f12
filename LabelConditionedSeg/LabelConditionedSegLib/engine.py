"""Encode once, decode many labels: the fast path from a normalized model-grid volume to a label map.

Labels are decoded in batches, each label only inside a box around its atlas region
(when the network's normalization makes that exact), and their probabilities are folded
into a running maximum and arg-maximum as they stream, so memory does not grow with
the number of labels.
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import Cancelled, LCSError
from .geometry import Box, keep_highest
from .model import LCSNet, ModelConfig

Progress = Callable[[float, str], None]
MARGIN = 16  # voxels of context around a condition's box that training crops, and the paper's network decodes
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Give the heap pages freed since the last call back to the system (glibc's malloc_trim; nothing elsewhere).

    Each label's decoder activations are freed after it, but glibc keeps their pages, and boxes of other sizes
    fragment them: without this, the peak memory of 116 labels read 1.32x one label's on the benchmark's 1 mm head."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class Condition:
    """What to segment: a binary mask on the atlas (one label, a union, or a painted region).

    The mask is kept cropped to its bounding box (`offset` on the model grid), so holding
    many conditions costs little memory.
    """

    name: str
    value: int  # the value written in the output label map
    mask: np.ndarray  # bool, the atlas region's bounding box on the model grid (z, y, x)
    color: tuple[int, int, int] = (128, 128, 128)
    offset: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, name: str, value: int, mask: np.ndarray, color: tuple[int, int, int] = (128, 128, 128)) -> "Condition":
        """A condition from a whole-grid mask."""
        box = Box.of(mask)
        if box is None:
            return cls(name, value, np.zeros((0, 0, 0), bool), color)
        return cls(name, value, box.mask, color, box.offset)

    def within(self, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """The mask inside the box (start, size) of the model grid."""
        out = np.zeros(tuple(size), bool)
        lo = np.maximum(self.offset, start)
        hi = np.minimum(np.add(self.offset, self.mask.shape), np.add(start, size))
        if np.all(hi > lo):
            out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = \
                self.mask[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, self.offset))]
        return out


@dataclass
class Decoded:
    """Conditions decoded on the model grid, two ways: `labels` gives each voxel to the most probable condition (its
    value, where that probability reaches the threshold, else 0); `masks` holds each condition thresholded on its own
    probability (None where it is nowhere), so conditions may overlap and one does not depend on the others."""

    labels: np.ndarray
    masks: list[Box | None]


@dataclass
class Encoded:
    """A volume's encoder features on the engine's device, reusable for any number of labels; `atlas_image` is the atlas
    image this volume is decoded with when it is not the engine's (an atlas warped onto the volume: a deformable prior)."""

    features: list[torch.Tensor]
    shape: tuple[int, int, int]
    atlas_image: torch.Tensor | None = None


def decode_box(offset: Sequence[int], size: Sequence[int], grid: Sequence[int], margin: int, factor: int
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(start, size) of the region decoded for a condition whose mask box is (offset, size): the box plus `margin`
    voxels, aligned to the pooling grid (`factor`) and kept inside `grid`. Training crops the same boxes."""
    shape = np.array(grid)
    lo = np.clip((np.array(offset) - margin) // factor * factor, 0, None)
    hi = np.minimum(-(-(np.array(offset) + np.array(size) + margin) // factor) * factor, shape)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo)


def decode_margin(config: ModelConfig) -> int:
    """Voxels decoded around a condition's box. A network with an atlas prior (prior_weight w) starts each voxel
    farther than prior_radius from the atlas mask at logit -w, a sure "not this label" its corrections do not
    overturn there: its boxes grow by that radius only (then outward to the pooling grid, 0 to 15 voxels more). On
    validation heads the demo model's label maps kept all but 26-45 voxels (under 0.01 %) and every mean Dice to 4
    decimals, decoded 2.5 times faster (docs/results.md, "Faster on the CPU"). The paper's network decides alone:
    MARGIN."""
    return config.prior_radius if config.conditioned and config.prior_weight > 0 else MARGIN


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA, else Apple MPS, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'; a clear error if absent."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise LCSError("device 'mps' is not available on this machine; use --device auto or cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LCSError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device auto or cpu")
        index = int(name.split(":")[1]) if ":" in name and name.split(":")[1].isdigit() else 0
        if ":" in name and not name.split(":")[1].isdigit():
            raise LCSError(f"device {name!r} is not valid; write cuda:0, cuda:1, ...")
        if index >= torch.cuda.device_count():
            raise LCSError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(f"cuda:{index}")
    raise LCSError(f"device {name!r} is not known; use auto, cpu, cuda, cuda:N or mps")


class Engine:
    """Runs an LCSNet over conditions; `messages` receives notices such as a fallback to the CPU."""

    def __init__(self, model: LCSNet, atlas_image: np.ndarray, device: str | torch.device = "auto",
                 memory_budget_mb: float | None = None, margin: int | None = None,
                 messages: Callable[[str], None] | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.eval().to(self.device)
        self.atlas_image = torch.from_numpy(np.ascontiguousarray(atlas_image, dtype=np.float32))[None, None]
        self.memory_budget_mb = memory_budget_mb
        self.margin = decode_margin(model.config) if margin is None else margin
        self.messages = messages or (lambda text: None)
        self.factor = model.config.factor

    # ---- encoding -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: np.ndarray, atlas_image: np.ndarray | None = None) -> Encoded:
        """Encoder features of a normalized model-grid volume (z, y, x); `atlas_image`, when given, replaces the
        engine's atlas image for this volume (the atlas warped onto it)."""
        if any(s % self.factor for s in image.shape):
            raise LCSError(f"model grid {image.shape} is not a multiple of {self.factor}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        features = self._run(lambda dev: self.model.encode(x.to(dev)))
        atlas = None if atlas_image is None else torch.from_numpy(np.ascontiguousarray(atlas_image, dtype=np.float32))[None, None]
        return Encoded(features, tuple(image.shape), atlas)

    @property
    def dropout_layers(self) -> list[torch.nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, torch.nn.Dropout3d)]

    @contextmanager
    def sampling(self):
        """Dropout on during inference (Monte Carlo dropout), everything else in evaluation mode: repeated decodes
        then differ, and their spread measures the model's doubt."""
        layers = self.dropout_layers
        for layer in layers:
            layer.train()
        try:
            yield
        finally:
            for layer in layers:
                layer.eval()

    # ---- decoding -------------------------------------------------------------------------
    @torch.no_grad()
    def segment(self, encoded: Encoded, conditions: Sequence[Condition], threshold: float = 0.5,
                on_probability: Callable[[Condition, np.ndarray], None] | None = None,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> Decoded:
        """The conditions' label map and own masks on the model grid (see Decoded).

        on_probability, when given, receives each condition's full probability map, one at a time.
        """
        best = np.zeros(encoded.shape, np.float32)
        winner = np.full(encoded.shape, -1, np.int32)
        index_of = {id(c): i for i, c in enumerate(conditions)}
        masks: list[Box | None] = [None] * len(conditions)
        done = 0
        for batch, boxes in self._batches(conditions, encoded.shape):
            if cancel is not None and cancel():
                raise Cancelled()
            probabilities = self._decode_batch(encoded, batch, boxes)
            for i, (condition, box) in enumerate(zip(batch, boxes)):
                region = tuple(slice(s, s + n) for s, n in zip(box[0], box[1]))
                p = probabilities[i]
                keep_highest(best, winner, region, p, index_of[id(condition)])
                masks[index_of[id(condition)]] = Box.of(p >= threshold, box[0])
                if on_probability is not None:
                    full = np.zeros(encoded.shape, np.float32)
                    full[region] = p
                    on_probability(condition, full)
            done += len(batch)
            release_freed_memory()
            if progress is not None:
                progress(done / len(conditions), f"decoded {done} of {len(conditions)} labels")
        values = np.array([c.value for c in conditions] + [0], np.int32)
        return Decoded(np.where(best >= threshold, values[winner], 0).astype(np.int32), masks)

    def _batches(self, conditions: Sequence[Condition], encoded_shape: tuple[int, int, int]):
        """Conditions grouped by similar box size, each group no larger than the memory budget allows."""
        boxes = {id(c): self._box(c, encoded_shape) for c in conditions}
        order = sorted(conditions, key=lambda c: -int(np.prod(boxes[id(c)][1])))
        start = 0
        while start < len(order):
            size = np.array(boxes[id(order[start])][1])
            n = max(1, min(len(order) - start, self._batch_size(int(np.prod(size)))))
            group = order[start:start + n]
            size = np.max([boxes[id(c)][1] for c in group], axis=0)
            yield group, [self._place(boxes[id(c)], size) for c in group]
            start += n

    def _box(self, condition: Condition, grid: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(start, size) of the decoding box: atlas region plus margin, aligned to the pooling grid."""
        if not self.model.config.region_invariant or not condition.mask.any():
            return (0, 0, 0), tuple(int(s) for s in grid)
        return decode_box(condition.offset, condition.mask.shape, grid, self.margin, self.factor)

    @staticmethod
    def _place(box, size) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A box of `size` holding `box`, shifted inside the grid (sizes and grid are multiples of the factor)."""
        start, own = np.array(box[0]), np.array(box[1])
        grid_end = start + own  # never beyond the grid
        begin = np.maximum(0, np.minimum(start, grid_end - size))
        return tuple(int(v) for v in begin), tuple(int(v) for v in size)

    def _batch_size(self, voxels: int) -> int:
        """How many boxes of `voxels` fit in the memory budget (decoder activations, float32)."""
        per_voxel = 4 * (7 * self.model.config.base_channels + 6)
        budget = self.memory_budget_mb
        if budget is None:
            if self.device.type == "cuda":
                budget = torch.cuda.mem_get_info(self.device)[0] / 2**20 * 0.5
            else:  # batching gains no speed on a CPU (measured); keep peak memory near one label's
                budget = 32
        return max(1, int(budget * 2**20 // (per_voxel * voxels)))

    def _decode_batch(self, encoded: Encoded, batch: Sequence[Condition], boxes) -> np.ndarray:
        def crop(t: torch.Tensor, level: int, box) -> torch.Tensor:
            s = 2**level
            return t[..., box[0][0] // s:(box[0][0] + box[1][0]) // s,
                     box[0][1] // s:(box[0][1] + box[1][1]) // s, box[0][2] // s:(box[0][2] + box[1][2]) // s]

        def run(dev: torch.device) -> torch.Tensor:
            features = [torch.cat([crop(f, level, b) for b in boxes]).to(dev) for level, f in enumerate(encoded.features)]
            atlas_image = self.atlas_image if encoded.atlas_image is None else encoded.atlas_image
            atlas = torch.cat([crop(atlas_image, 0, b) for b in boxes]).to(dev)
            mask = torch.cat([torch.from_numpy(c.within(*b).astype(np.float32))[None, None] for c, b in zip(batch, boxes)]).to(dev)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=dev.type == "cuda"):
                return torch.sigmoid(self.model.decode(features, atlas, mask).float())[:, 0]

        split = (lambda: self._split(encoded, batch, boxes)) if len(batch) > 1 else None
        return self._run(run, split).cpu().numpy()

    def _split(self, encoded, batch, boxes) -> torch.Tensor:
        """Out of memory with several boxes: decode them in halves."""
        half = len(batch) // 2
        return torch.from_numpy(np.concatenate([self._decode_batch(encoded, batch[:half], boxes[:half]),
                                                self._decode_batch(encoded, batch[half:], boxes[half:])]))

    def _run(self, work, split=None):
        """Run on the engine's device; on CUDA out-of-memory, split the batch, then fall back to the CPU."""
        try:
            return work(self.device)
        except torch.OutOfMemoryError:
            if self.device.type != "cuda":
                raise LCSError("out of memory on the CPU; close other programs or use a smaller volume") from None
            torch.cuda.empty_cache()
        if split is not None:
            self.messages("GPU out of memory: decoding fewer labels at a time")
            return split()
        self.messages(f"GPU out of memory on {self.device}: continuing on the CPU (slower)")
        self.device = torch.device("cpu")
        self.model.to(self.device)
        return work(self.device)
