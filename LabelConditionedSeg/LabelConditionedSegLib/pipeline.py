"""Any scan in, label map on that scan's own grid out: checkpoint + geometry + engine.

`Segmenter.prepare` registers and encodes a volume once; `Segmenter.segment` then decodes
whatever labels are asked for, so another label costs one decode.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from itertools import count
from typing import Callable, NamedTuple, Sequence

import numpy as np
import SimpleITK as sitk

from .checkpoint import Checkpoint
from .deformable import Prior, deformable_prior
from .engine import Condition, Encoded, Engine, Progress
from .errors import LCSError
from .labels import Label, distinct_colors
from .quality import (EDGE_SCALE_MM, LOW_VALIDATION_DICE, Match, alignment, edges, flag, mirror_image,
                      mirror_ratio, volume_scale)
from .geometry import (Box, box_to_input, labels_to_input, normalize_intensity, register, to_input_grid, to_model_grid,
                       with_margin)
from .volume import check_extent, check_volume


class Registered(NamedTuple):
    """One registration of a scan: its transform, the scan on the model grid as the network sees it, where it shows
    something there, and its check."""

    transform: sitk.Transform
    model_image: np.ndarray
    seen: np.ndarray  # where the scan shows something on the model grid (Segmenter.seen)
    match: Match


@dataclass
class Prepared:
    """A volume registered to the atlas and encoded: reuse it for every label of that volume."""

    reference: sitk.Image  # the input's grid: the output lands here
    transform: sitk.Transform  # atlas (model grid) points -> input points
    model_image: np.ndarray  # normalized, on the model grid (z, y, x)
    encoded: Encoded
    prior: Prior | None = None  # the atlas warped onto this volume (registration "deformable")
    match: Match | None = None  # how the registered volume matches the atlas (Segmenter.match)

    @property
    def check(self) -> str:
        """What looks wrong with the registration (quality.Match.problem), '' when nothing does."""
        return self.match.problem() if self.match is not None else ""

    def conditions(self, conditions: Sequence[Condition]) -> list[Condition]:
        """The conditions as this volume is decoded with them: warped onto it under a deformable prior."""
        return list(conditions) if self.prior is None else [self.prior.warp(c) for c in conditions]


@dataclass
class Segmentation:
    """Requested labels on the input's grid, two ways. `labelmap` gives each voxel to one label, the most probable
    where it reaches the threshold (what --labelmap writes). `masks` hold each label thresholded on its own
    probability (segments in .seg.nrrd and Slicer): labels may overlap, and a label's mask and volume do not depend
    on what else was asked. The masks are mapped back on first use."""

    conditions: list[Condition]
    labelmap: sitk.Image
    model_masks: list[Box | None]  # on the model grid
    to_input: Callable[[Box], Box | None]
    expected_ml: list[float]  # each condition's atlas region, in mL as registration scales it onto the scan
    check: str = ""  # what looks wrong with the registration (Prepared.check)

    @cached_property
    def masks(self) -> list[Box | None]:
        """Each condition's own mask on the input grid (None where it is nowhere), in the order of `conditions`."""
        return [None if box is None else self.to_input(box) for box in self.model_masks]

    def volumes(self) -> list[dict]:
        """Voxel count and volume (mL) of each requested label's own mask, the empty ones included, beside its atlas
        region's (scaled by the registration) and a flag where the two are implausibly far apart (quality.flag)."""
        voxel_ml = float(np.prod(self.labelmap.GetSpacing())) / 1000.0
        counts = [0 if box is None else box.voxels() for box in self.masks]
        return [{"value": c.value, "name": c.name, "voxels": n, "volume_ml": round(n * voxel_ml, 4),
                 "atlas_ml": round(expected, 4), "flag": "; ".join(filter(None, (self.check, flag(n * voxel_ml, expected))))}
                for c, n, expected in zip(self.conditions, counts, self.expected_ml)]

    @property
    def missing(self) -> list[str]:
        """Names of the requested labels found nowhere."""
        return [c.name for c, box in zip(self.conditions, self.masks) if box is None]


@dataclass
class Proposal:
    """A label proposed by Monte Carlo dropout: mean probability and its standard deviation, on the input grid."""

    condition: Condition
    probability: sitk.Image
    uncertainty: sitk.Image


def model_input(checkpoint: Checkpoint, image: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """A registered scan as the network sees it: on the checkpoint's model grid, intensity-normalized."""
    return normalized_input(checkpoint, to_model_grid(image, checkpoint.atlas_image, transform))


def normalized_input(checkpoint: Checkpoint, moved: sitk.Image) -> np.ndarray:
    """A scan already on the model grid (to_model_grid), intensity-normalized as the network sees it."""
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
        self.messages = messages or (lambda text: None)
        dice = checkpoint.provenance.get("validation_dice")
        if dice is not None and dice < LOW_VALIDATION_DICE:
            self.messages(f"{checkpoint.provenance.get('name', 'this model')} reached validation Dice {dice:.2f} only: "
                          "it is barely trained and its results are unreliable; train it longer")
        self.atlas_labels = sitk.GetArrayFromImage(checkpoint.atlas_labels)
        self.engine = Engine(checkpoint.build_model(), sitk.GetArrayFromImage(checkpoint.atlas_image), device,
                             memory_budget_mb=memory_budget_mb, messages=messages)

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def prepare(self, image: sitk.Image, registration: str = "affine", progress: Progress | None = None,
                cancel: Callable[[], bool] | None = None) -> Prepared:
        """Register the volume (once more from farther poses when the check says the first try failed), warp the
        atlas onto it (deformable), encode it, and check the result."""
        check_volume(image)
        check_extent(image, self.checkpoint.atlas_image)
        step = progress or (lambda fraction, message: None)
        step(0.0, f"registering to the atlas ({registration})")
        found = self._registered(image, registration, cancel)
        if registration != "none" and found.match.misregistered():  # a second try from farther poses (geometry.WIDE)
            step(0.15, "registration looks wrong: trying farther poses")
            wider = self._registered(image, registration, cancel, wide=True)
            if not wider.match.misregistered() or wider.match.alignment > found.match.alignment:
                found = wider
        transform, model_image, seen, match = found
        brain = sitk.GetArrayViewFromImage(self.checkpoint.atlas_mask) > 0
        atlas = sitk.GetArrayViewFromImage(self.checkpoint.atlas_image)
        prior = None
        if registration == "deformable":
            if "deformable" not in self.checkpoint.priors:
                self.messages(f"{self.checkpoint.provenance.get('name', 'this model')} was not trained on deformable "
                              "priors; its results may be worse than with --registration affine")
            step(0.3, "warping the atlas onto the volume (deformable)")
            prior = deformable_prior(model_image, atlas, self.checkpoint.atlas_image, cancel, brain, seen)
            match = self.warped_match(match, model_image, seen, prior)
        step(0.5, f"encoding on {self.device}")
        encoded = self.engine.encode(model_image, None if prior is None else prior.atlas_image)
        return Prepared(image, transform, model_image, encoded, prior, match)

    def _registered(self, image: sitk.Image, registration: str, cancel: Callable[[], bool] | None, wide: bool = False
                    ) -> Registered:
        transform = register(image, self.checkpoint.atlas_image, registration, fixed_mask=self.checkpoint.atlas_mask,
                             cancel=cancel, wide=wide)
        model_image = normalized_input(self.checkpoint, to_model_grid(image, self.checkpoint.atlas_image, transform))
        seen = self.seen(image, transform)
        return Registered(transform, model_image, seen, self.match(model_image, seen))

    @cached_property
    def _around_brain(self) -> np.ndarray:
        """The atlas's brain and the head around it (geometry.with_margin) on the model grid: the same for every scan,
        read by every check."""
        return sitk.GetArrayFromImage(with_margin(self.checkpoint.atlas_mask)) > 0

    @cached_property
    def _mirror(self) -> np.ndarray:
        """The atlas's mirror image (quality.mirror_image), which a scan with left and right swapped matches best."""
        return mirror_image(self.checkpoint.atlas_image, self.checkpoint.atlas_mask)

    def seen(self, image: sitk.Image, transform: sitk.Transform) -> np.ndarray:
        """Where the registered scan shows something on the model grid: inside its field of view and not a zeroed
        slab. Only there can it match the atlas, and only there does it guide the deformable prior."""
        return sitk.GetArrayFromImage(sitk.Resample(image != 0, self.checkpoint.atlas_image, transform,
                                                    sitk.sitkNearestNeighbor, 0)) > 0

    def match(self, model_image: np.ndarray, seen: np.ndarray) -> Match:
        """How the registered scan matches the atlas (quality.Match), where it shows something (`seen`): what the
        check of every run reads."""
        grid = self.checkpoint.atlas_image
        atlas = sitk.GetArrayViewFromImage(grid)
        brain = sitk.GetArrayViewFromImage(self.checkpoint.atlas_mask) > 0
        around = self._around_brain
        # Edges only away from where the signal ends: that edge is the scan's, not anatomy the atlas could share.
        radius = [int(np.ceil(2 * EDGE_SCALE_MM / s)) for s in grid.GetSpacing()]
        clear = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(seen.astype(np.uint8)), radius)) > 0
        return Match(coverage=float((seen & brain).sum() / max(brain.sum(), 1)),
                     alignment=alignment(model_image, atlas, around & seen), edges=edges(model_image, atlas, brain & clear, grid),
                     mirror=mirror_ratio(model_image, atlas, self._mirror, around & seen))

    def warped_match(self, match: Match, model_image: np.ndarray, seen: np.ndarray, prior: Prior) -> Match:
        """`match` (Segmenter.match) with how well the atlas warped onto the scan by `prior` matches it."""
        return replace(match, deformable=alignment(model_image, prior.atlas_image, self._around_brain & seen))

    def conditions(self, labels: Sequence[str | int] = (), masks: Sequence[tuple] = ()) -> list[Condition]:
        """Atlas labels by name or value ('A+B' for a union) and masks drawn on the atlas, as conditions.

        masks: (name, image) or (name, image, (r, g, b)); without a color one is drawn at random."""
        table = self.checkpoint.label_table
        unions = list({frozenset(p.value for p in parts): parts for parts in map(table.resolve_union, labels)}.values())
        singles = {parts[0].value for parts in unions if len(parts) == 1}
        fresh = count(max(table.values) + 1)  # output values beyond the atlas's, for what has no value of its own
        out, used = [], set()
        for parts in unions:  # a label keeps its atlas value; a union its first label's, unless another request has it
            value = parts[0].value if len(parts) == 1 or parts[0].value not in singles | used else next(fresh)
            used.add(value)
            mask = np.isin(self.atlas_labels, [p.value for p in parts])
            out.append(Condition.of("+".join(p.name for p in parts), value, mask, parts[0].color))
        for name, image, *color in masks:
            check_volume(image, f"condition mask {name!r}")
            on_grid = sitk.Resample(sitk.Cast(image != 0, sitk.sitkFloat32), self.checkpoint.atlas_image,
                                    sitk.Transform(), sitk.sitkLinear, 0.0)
            mask = sitk.GetArrayFromImage(on_grid) >= 0.5
            if not mask.any():
                raise LCSError(f"condition mask {name!r} does not overlap the atlas grid; draw it on the atlas image")
            value = next(fresh)
            color = tuple(int(c) for c in (color[0] if color else np.random.default_rng(value).integers(40, 256, 3)))
            out.append(Condition.of(name, value, mask, color))
        if not out:
            raise LCSError("no labels to segment; name some with --labels, use --all, or give --condition masks")
        colors = distinct_colors([Label(c.value, c.name, c.color) for c in out])  # a union beside its label: 2 colours
        return [replace(c, color=label.color) for c, label in zip(out, colors)]

    def segment(self, prepared: Prepared, conditions: Sequence[Condition], threshold: float = 0.5,
                on_probability: Callable[[Condition, sitk.Image], None] | None = None,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> Segmentation:
        """The conditions on the input's grid: a label map (values of the conditions, 0 background) and their own masks."""
        decoded_as = prepared.conditions(conditions)
        original = {id(d): c for d, c in zip(decoded_as, conditions)}

        def back(condition: Condition, probability: np.ndarray) -> None:
            on_probability(original[id(condition)], self.to_input(prepared, probability))

        decoded = self.engine.segment(prepared.encoded, decoded_as, threshold,
                                      back if on_probability is not None else None, progress, cancel)
        grid = self.checkpoint.atlas_image
        image = sitk.GetImageFromArray(decoded.labels)
        image.CopyInformation(grid)
        atlas_ml = float(np.prod(grid.GetSpacing())) / 1000.0 * volume_scale(prepared.transform, grid)
        return Segmentation(list(conditions), labels_to_input(image, prepared.reference, prepared.transform),
                            decoded.masks, lambda box: box_to_input(box, grid, prepared.reference, prepared.transform),
                            [float(c.mask.sum()) * atlas_ml for c in conditions], prepared.check)

    def propose(self, prepared: Prepared, conditions: Sequence[Condition], passes: int = 8,
                progress: Progress | None = None, cancel: Callable[[], bool] | None = None) -> list[Proposal]:
        """Labels proposed with a measure of doubt, on the input grid: for proposing what a scan lacks.

        A model with dropout decodes each condition `passes` times with dropout on (Monte Carlo dropout): the mean
        probability, and its standard deviation as the uncertainty (0 to 0.5). A model without dropout decodes once,
        and the uncertainty is 1 - |2p - 1| (0 where the model is sure either way, 1 at p = 0.5)."""
        passes = passes if self.engine.dropout_layers else 1
        total = {id(c): np.zeros(prepared.encoded.shape, np.float64) for c in conditions}
        squares = {id(c): np.zeros(prepared.encoded.shape, np.float64) for c in conditions}

        decoded_as = prepared.conditions(conditions)
        original = {id(d): c for d, c in zip(decoded_as, conditions)}

        def add(condition: Condition, probability: np.ndarray) -> None:
            total[id(original[id(condition)])] += probability
            squares[id(original[id(condition)])] += probability.astype(np.float64) ** 2

        with self.engine.sampling():
            for i in range(passes):
                step = (lambda f, m, i=i: progress((i + f) / passes, f"pass {i + 1} of {passes}: {m}")) if progress else None
                self.engine.segment(prepared.encoded, decoded_as, on_probability=add, progress=step, cancel=cancel)
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
