"""Any scan in, label map on that scan's own grid out: checkpoint + geometry + engine.

`Segmenter.prepare` registers and encodes a volume once; `Segmenter.segment` then decodes
whatever labels are asked for, so another label costs one decode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .checkpoint import Checkpoint
from .engine import Condition, Encoded, Engine, Progress
from .errors import LCSError
from .geometry import labels_to_input, normalize_intensity, register, to_input_grid, to_model_grid
from .volume import check_volume


@dataclass
class Prepared:
    """A volume registered to the atlas and encoded: reuse it for every label of that volume."""

    reference: sitk.Image  # the input's grid: the output lands here
    transform: sitk.Transform  # atlas (model grid) points -> input points
    model_image: np.ndarray  # normalized, on the model grid (z, y, x)
    encoded: Encoded


@dataclass
class Proposal:
    """A label proposed by Monte Carlo dropout: mean probability and its standard deviation, on the input grid."""

    condition: Condition
    probability: sitk.Image
    uncertainty: sitk.Image


def model_input(checkpoint: Checkpoint, image: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """A registered scan as the network sees it: on the checkpoint's model grid, intensity-normalized."""
    moved = to_model_grid(image, checkpoint.atlas_image, transform)
    mask = sitk.GetArrayFromImage(checkpoint.atlas_mask) > 0
    if not sitk.GetArrayViewFromImage(moved)[mask].any():
        raise LCSError("the input does not overlap the atlas after registration; is it the anatomy this model was trained on?")
    n = checkpoint.normalization
    return normalize_intensity(moved, mask, n["low"], n["high"])


class Segmenter:
    """Segments volumes with one checkpoint on one device."""

    def __init__(self, checkpoint: Checkpoint, device: str = "auto", messages: Callable[[str], None] | None = None,
                 memory_budget_mb: float | None = None):
        if not checkpoint.config.conditioned:
            raise LCSError(f"{checkpoint.provenance.get('name', 'this checkpoint')} is a multi-channel baseline (for "
                           "lcs evaluate), not an LCS model; segment with an LCS checkpoint")
        self.checkpoint = checkpoint
        self.atlas_labels = sitk.GetArrayFromImage(checkpoint.atlas_labels)
        self.engine = Engine(checkpoint.build_model(), sitk.GetArrayFromImage(checkpoint.atlas_image), device,
                             memory_budget_mb=memory_budget_mb, messages=messages)

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def prepare(self, image: sitk.Image, registration: str = "affine", progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None) -> Prepared:
        check_volume(image)
        step = progress or (lambda fraction, message: None)
        step(0.0, f"registering to the atlas ({registration})")
        transform = register(image, self.checkpoint.atlas_image, registration, fixed_mask=self.checkpoint.atlas_mask,
                             cancel=cancel)
        model_image = model_input(self.checkpoint, image, transform)
        step(0.5, f"encoding on {self.device}")
        return Prepared(image, transform, model_image, self.engine.encode(model_image))

    def conditions(self, labels: Sequence[str | int] = (), masks: Sequence[tuple] = ()) -> list[Condition]:
        """Atlas labels by name or value ('A+B' for a union) and masks drawn on the atlas, as conditions.

        masks: (name, image) or (name, image, (r, g, b)); without a color one is drawn at random."""
        table = self.checkpoint.label_table
        out = []
        for item in labels:
            parts = table.resolve_union(item)
            mask = np.isin(self.atlas_labels, [p.value for p in parts])
            out.append(Condition.of("+".join(p.name for p in parts), parts[0].value, mask, parts[0].color))
        next_value = max(table.values) + 1
        for i, (name, image, *color) in enumerate(masks):
            check_volume(image, f"condition mask {name!r}")
            on_grid = sitk.Resample(sitk.Cast(image != 0, sitk.sitkFloat32), self.checkpoint.atlas_image,
                                    sitk.Transform(), sitk.sitkLinear, 0.0)
            mask = sitk.GetArrayFromImage(on_grid) >= 0.5
            if not mask.any():
                raise LCSError(f"condition mask {name!r} does not overlap the atlas grid; draw it on the atlas image")
            color = tuple(int(c) for c in (color[0] if color else np.random.default_rng(next_value + i).integers(40, 256, 3)))
            out.append(Condition.of(name, next_value + i, mask, color))
        if not out:
            raise LCSError("no labels to segment; name some with --labels, use --all, or give --condition masks")
        return out

    def segment(self, prepared: Prepared, conditions: Sequence[Condition], threshold: float = 0.5,
                on_probability: Callable[[Condition, sitk.Image], None] | None = None,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> sitk.Image:
        """Label map on the input's grid (values of the conditions, 0 background)."""
        def back(condition: Condition, probability: np.ndarray) -> None:
            on_probability(condition, self.to_input(prepared, probability))

        labels = self.engine.segment(prepared.encoded, conditions, threshold,
                                     back if on_probability is not None else None, progress, cancel)
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(self.checkpoint.atlas_image)
        return labels_to_input(image, prepared.reference, prepared.transform)

    def propose(self, prepared: Prepared, conditions: Sequence[Condition], passes: int = 8,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> list[Proposal]:
        """Labels proposed with a measure of doubt, on the input grid: for proposing what a scan lacks.

        A model with dropout decodes each condition `passes` times with dropout on (Monte Carlo dropout): the mean
        probability, and its standard deviation as the uncertainty (0 to 0.5). A model without dropout decodes once,
        and the uncertainty is 1 - |2p - 1| (0 where the model is sure either way, 1 at p = 0.5)."""
        passes = passes if self.engine.dropout_layers else 1
        total = {id(c): np.zeros(prepared.encoded.shape, np.float64) for c in conditions}
        squares = {id(c): np.zeros(prepared.encoded.shape, np.float64) for c in conditions}

        def add(condition: Condition, probability: np.ndarray) -> None:
            total[id(condition)] += probability
            squares[id(condition)] += probability.astype(np.float64) ** 2

        with self.engine.sampling():
            for i in range(passes):
                step = (lambda f, m, i=i: progress((i + f) / passes, f"pass {i + 1} of {passes}: {m}")) if progress else None
                self.engine.segment(prepared.encoded, conditions, on_probability=add, progress=step, cancel=cancel)
        out = []
        for c in conditions:
            mean = total[id(c)] / passes
            spread = np.sqrt(np.maximum(squares[id(c)] / passes - mean**2, 0)) if passes > 1 else 1 - np.abs(2 * mean - 1)
            out.append(Proposal(c, self.to_input(prepared, mean.astype(np.float32)),
                                self.to_input(prepared, spread.astype(np.float32))))
        return out

    def to_input(self, prepared: Prepared, probability: np.ndarray) -> sitk.Image:
        """A model-grid probability map mapped onto the input's grid (linear interpolation)."""
        image = sitk.GetImageFromArray(probability)
        image.CopyInformation(self.checkpoint.atlas_image)
        return to_input_grid(image, prepared.reference, prepared.transform, sitk.sitkLinear)
