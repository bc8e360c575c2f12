"""From any scan to the model grid and back: register to the atlas, resample, normalize.

The transform returned by register() maps atlas (model grid) points to input points, the
direction sitk.Resample wants for pulling the input onto the model grid; its inverse takes
label maps back onto the input's own grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import Cancelled, LCSError, itk_message

REGISTRATIONS = ("affine", "rigid", "none", "deformable")  # deformable: affine here, then deformable.py
SAMPLING = 0.1  # share of the atlas voxels (of its mask) that mutual information is computed on
# The affine fit's last level samples at least this many voxels, about 10 per bin of the 32 x 32 joint histogram.
# With 12 parameters, scaling among them, a fit on 10 % of a 4 mm atlas's brain mask (about 2,700 voxels) hung on
# which voxels were drawn (atlas-label Dice 0.23 / 0.86 / 0.08 for three sampling seeds); on a 2 mm atlas 10 % is
# already more than this.
AFFINE_SAMPLES = 10_000
AFFINE_MARGIN_MM = 8.0  # the brain and this much of the head around it: the affine step's second mask (_affine)
# The rigid step's search (_rigid): rotations of -20, 0 and 20 degrees about each axis, and shifts along each axis of
# (step in mm, steps each side). NEAR: -15, 0, 15 mm (729 poses), always; WIDE: -20 to 20 mm by 10 (3,375 poses, 4.6
# times the cost), only when the check of the first registration fails (pipeline.Segmenter.prepare).
NEAR, WIDE = (15.0, 1), (10.0, 2)


def bounding_box(array: np.ndarray) -> tuple[list[int], list[int]] | None:
    """(first, one-past-last) index of the non-zero voxels per axis, in array order; None when all zero."""
    nonzero = np.nonzero(array)
    if not nonzero[0].size:
        return None
    return [int(a.min()) for a in nonzero], [int(a.max()) + 1 for a in nonzero]


@dataclass
class Box:
    """A binary mask kept as its bounding box on a grid: `offset` is the box's first voxel (array order z, y, x)."""

    offset: tuple[int, int, int]
    mask: np.ndarray  # bool

    @classmethod
    def of(cls, mask: np.ndarray, offset=(0, 0, 0)) -> "Box | None":
        """The non-zero part of `mask` (itself placed at `offset`); None when it is empty."""
        box = bounding_box(mask)
        if box is None:
            return None
        lo, hi = box
        return cls(tuple(int(o + a) for o, a in zip(offset, lo)), mask[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(bool))

    @property
    def region(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape))

    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))


def keep_highest(best: np.ndarray, winner: np.ndarray, region: tuple[slice, ...], scores: np.ndarray, label: int) -> None:
    """Fold one label's scores over `region` into running maxima: where they beat `best`, `label` wins."""
    better = scores > best[region]
    best[region][better] = scores[better]
    winner[region][better] = label


def model_grid(reference: sitk.Image, spacing: float, factor: int) -> sitk.Image:
    """An empty grid covering `reference` at isotropic `spacing`, each size a multiple of `factor`."""
    extent = np.array(reference.GetSize()) * np.array(reference.GetSpacing())
    size = np.ceil(np.ceil(extent / spacing) / factor).astype(int) * factor
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    center = reference.TransformContinuousIndexToPhysicalPoint((np.array(reference.GetSize()) - 1) / 2.0)
    origin = np.array(center) - direction @ ((size - 1) / 2.0 * spacing)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def normalize_intensity(image: sitk.Image, mask: np.ndarray | None = None, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Percentiles (inside `mask`, or of non-zero voxels) mapped to 0..1, clipped: scanner units stop mattering."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    values = array[mask > 0] if mask is not None else array[array != 0]
    if values.size == 0:
        values = array.ravel()
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        raise LCSError("input has no intensity contrast inside the brain region after registration; is it the right scan?")
    return np.clip((array - lo) / (hi - lo), 0, 1).astype(np.float32)


def register(moving: sitk.Image, fixed: sitk.Image, mode: str = "affine", fixed_mask: sitk.Image | None = None,
             seed: int = 1, cancel: Callable[[], bool] | None = None, wide: bool = False) -> sitk.AffineTransform:
    """Atlas-to-input transform by mutual information: centre of mass, then rigid (see _rigid), then affine.

    `wide` searches the WIDE range of rigid poses instead of the NEAR one: for a scan whose first registration failed.
    `cancel` is polled every optimizer iteration; when it returns True, Cancelled is raised."""
    if mode not in REGISTRATIONS:
        raise LCSError(f"registration must be one of {', '.join(REGISTRATIONS)}, not {mode!r}")
    if mode == "none":
        return sitk.AffineTransform(3)
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = no_finer_than(sitk.Cast(moving, sitk.sitkFloat32), min(fixed.GetSpacing()))
    rigid = _rigid(fixed, moving, fixed_mask, seed, cancel, WIDE if wide else NEAR)
    if mode == "rigid":
        return as_affine(min(rigid, key=lambda fit: fit[1])[0])
    center = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in fixed.GetSize()])
    signal = sitk.Cast(moving != 0, sitk.sitkUInt8)  # neither outside the field of view nor a zeroed slab
    return as_affine(_affine(fixed, moving, [as_affine(t, center) for t, _ in rigid], fixed_mask, signal, seed, cancel))


def _affine(fixed, moving, starts, fixed_mask, signal, seed, cancel) -> sitk.Transform:
    """The affine fits from each rigid one, under the brain mask and under the brain with the head around it
    (with_margin), each counting only atlas voxels that land where the scan holds signal: the fit that matches better
    over the brain with the head around it (signal or not) wins. They are fitted at the coarse level (4 mm) and only
    the winner is refined at the finer one.

    Why from each rigid fit: the rigid fits are compared over the brain alone, where a PD head's grey and white
    matter look alike; one such head (the training generator's) was turned the wrong way by the search's start
    (Dice 0.06), and only the affine fits told the two starts apart (0.64).
    Why two masks: in a PD-like scan grey and white matter look nearly alike, and a fit on the brain alone lets twelve
    parameters drift (affine propagation Dice 0.17-0.43 on four such validation heads, 0.55-0.68 with the margin);
    on some strongly augmented T1 heads the margin's fit is the one that drifts (0.27 against 0.49).
    Why only where there is signal: where a field of view is cut, the edge of the black slab pulled the fit off the
    head. Started from the best affine fit of the atlas's labels to the truth, three unlike-generator validation heads
    walked 17-95 mm away from it (Dice 0.00-0.24); with the scan's signal as moving mask they stayed within 3-6 mm
    (Dice 0.63-0.70).
    Why the winner is chosen at the coarse level: on 16 validation heads (both kinds, T1, T2, PD) refining every
    distinct fit and choosing after gave the Dice of refining the coarse winner alone (within 0.002 on 15, 0.0023 on
    one), and the step took 40 % less time (9.6 s to 5.7 s on the unlike kind's T1 heads; docs/results.md, "Faster on
    the CPU")."""
    masks = [fixed_mask] if fixed_mask is None else [fixed_mask, with_margin(fixed_mask)]
    levels = _shrink_factors(fixed, [4.0, 2.0])
    samples = AFFINE_SAMPLES if len(levels) == 1 else 0  # the last level's fit samples enough (AFFINE_SAMPLES)
    fits = [(_optimize(fixed, moving, start, mask, seed, levels[:1], cancel, final_samples=samples,
                       moving_mask=signal)[0], mask) for start in starts for mask in masks]
    method = _method(masks[-1], seed, cancel)
    method.SetMetricUseMovingImageGradientFilter(False)  # a value needs no gradient: 0.2 s less per value at 2 mm

    def mismatch(fit: tuple[sitk.Transform, sitk.Image | None]) -> float:
        method.SetInitialTransform(fit[0], inPlace=False)
        return method.MetricEvaluate(fixed, moving)
    best, mask = min(fits, key=mismatch) if len(fits) > 1 else fits[0]
    if len(levels) == 1:
        return best
    return _optimize(fixed, moving, best, mask, seed, levels[1:], cancel, final_samples=AFFINE_SAMPLES,
                     moving_mask=signal)[0]


def with_margin(mask: sitk.Image | None, margin_mm: float = AFFINE_MARGIN_MM) -> sitk.Image | None:
    """The atlas's brain mask grown by `margin_mm` into the skull and scalp around it: the brain's outline against the
    tissue around it is there in every contrast. The rigid step keeps the brain mask: with the margin, a head whose
    scalp the field of view cuts was turned the wrong way."""
    if mask is None:
        return None
    radius = [max(1, int(round(margin_mm / s))) for s in mask.GetSpacing()]
    return sitk.Cast(sitk.BinaryDilate(sitk.Cast(mask > 0, sitk.sitkUInt8), radius), sitk.sitkUInt8)


def _rigid(fixed, moving, fixed_mask, seed, cancel, shifts: tuple[float, int] = NEAR
           ) -> list[tuple[sitk.Transform, float]]:
    """The rigid fits (and their metric) from the centres of mass and from the best of the poses about them (NEAR or
    WIDE: rotations of -20, 0 and 20 degrees about each axis, `shifts` along each), scored at 4 mm.

    Why a search: from the centres of mass alone, the descent stays in a local optimum on a head turned 20 degrees
    or more (affine propagation Dice 0.17 instead of 0.64 on one such held-out scan). Why shifts, at 4 mm: where the
    field of view is cut, the centre of mass lies 20-30 mm off the brain's. The search of rotations alone (at 8 mm)
    left 12 of 20 unlike-generator validation heads (5 heads x 4 contrasts) failed (Dice 0.004-0.20); with shifts,
    the signal mask and affine fits from both rigid fits (_affine), 2 (PD, flagged). WIDE rescued one more, at 4.6
    times the cost (a registration on the tests' 4 mm atlas took 12.4 s against 3.7 s): hence only as a second try;
    WIDE at 8 mm left 2 failed and lost 0.19 on a T2 head."""
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    levels = _shrink_factors(fixed, [8.0, 4.0])
    search = _method(fixed_mask, seed, cancel, sampling=0.2)
    shift_mm, steps = shifts
    search.SetOptimizerAsExhaustive([1] * 3 + [steps] * 3, stepLength=1.0)
    search.SetOptimizerScales([np.radians(20.0)] * 3 + [shift_mm] * 3)  # each parameter's step
    search.SetShrinkFactorsPerLevel(levels[-1:])
    search.SetSmoothingSigmasPerLevel([levels[-1] / 2])
    search.SetInitialTransform(start, inPlace=False)
    found = _execute(search, fixed, moving, cancel)
    fits = [_optimize(fixed, moving, s, fixed_mask, seed, levels, cancel) for s in (start, found)]
    return fits[:1] if _same_pose(fits[0][0], fits[1][0], fixed) else fits


def _same_pose(a: sitk.Transform, b: sitk.Transform, grid: sitk.Image, tolerance_mm: float = 2.0) -> bool:
    """Whether two transforms move every corner of `grid` to within `tolerance_mm` of each other: fits that converged
    to one pose need not be refined twice."""
    corners = [grid.TransformIndexToPhysicalPoint([int(c * (n - 1)) for c, n in zip(corner, grid.GetSize())])
               for corner in np.ndindex(2, 2, 2)]
    return max(np.linalg.norm(np.subtract(a.TransformPoint(p), b.TransformPoint(p))) for p in corners) < tolerance_mm


def no_finer_than(image: sitk.Image, spacing: float) -> sitk.Image:
    """Voxels averaged down to about `spacing`: the atlas grid sees no finer detail, and each pyramid level
    then smooths a small image (registration gets faster and stops sooner when cancelled)."""
    factors = [max(1, int(spacing / s)) for s in image.GetSpacing()]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _shrink_factors(fixed: sitk.Image, resolutions_mm: list[float]) -> list[int]:
    """Pyramid levels at about the given physical resolutions, whatever the atlas spacing."""
    factors = [max(1, int(round(mm / min(fixed.GetSpacing())))) for mm in resolutions_mm]
    return sorted(set(factors), reverse=True)


def _method(fixed_mask, seed, cancel, sampling: float = SAMPLING, moving_mask=None) -> sitk.ImageRegistrationMethod:
    """Mattes mutual information on a random `sampling` share of the atlas voxels (of its mask, of those landing in
    `moving_mask`), polling `cancel`."""
    method = sitk.ImageRegistrationMethod()
    if cancel is not None:
        method.AddCommand(sitk.sitkIterationEvent, lambda: cancel() and method.StopRegistration())
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(sampling, seed)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return method


def _optimize(fixed, moving, initial, fixed_mask, seed, shrink, cancel=None, final_samples: int = 0, moving_mask=None
              ) -> tuple[sitk.Transform, float]:
    """The transform fitted from `initial` over the pyramid levels `shrink`, and its metric at the last level, which
    samples at least `final_samples` voxels (all of them if there are fewer)."""
    method = _method(fixed_mask, seed, cancel, moving_mask=moving_mask)
    voxels = (np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)) if fixed_mask is not None
              else np.prod(fixed.GetSize())) / shrink[-1] ** 3
    if final_samples > SAMPLING * voxels:
        method.SetMetricSamplingPercentagePerLevel([SAMPLING] * (len(shrink) - 1) + [min(1.0, final_samples / voxels)],
                                                   seed)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2 for s in shrink])
    method.SetInitialTransform(initial, inPlace=False)
    return _execute(method, fixed, moving, cancel), method.GetMetricValue()


def _execute(method: sitk.ImageRegistrationMethod, fixed, moving, cancel) -> sitk.Transform:
    try:
        transform = method.Execute(fixed, moving)
    except RuntimeError as error:
        if cancel is not None and cancel():
            raise Cancelled() from None
        raise LCSError(f"registration to the atlas failed ({itk_message(error)}); "
                       "try --registration rigid or none") from None
    if cancel is not None and cancel():
        raise Cancelled()
    return transform


def as_affine(transform: sitk.Transform, center=(0.0, 0.0, 0.0)) -> sitk.AffineTransform:
    """Any linear transform (possibly composite) flattened into one AffineTransform about `center`."""
    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], float) * 100.0
    mapped = np.array([transform.TransformPoint(p.tolist()) for p in points])
    matrix = (mapped[1:] - mapped[0]).T / 100.0
    affine = sitk.AffineTransform(3)
    affine.SetCenter(list(center))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation((mapped[0] + matrix @ np.array(center) - np.array(center)).tolist())
    return affine


def on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A float array (z, y, x) as an image placed on `grid`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    return image


def to_model_grid(image: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """The input pulled onto the model grid (linear interpolation, zero outside its field of view)."""
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def to_input_grid(model_image: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                  interpolator: int = sitk.sitkNearestNeighbor, pixel_type: int | None = None) -> sitk.Image:
    """A model-grid image pushed back onto the input's grid (size, spacing, origin, direction kept)."""
    pixel_type = model_image.GetPixelID() if pixel_type is None else pixel_type
    out = sitk.Image(reference.GetSize(), pixel_type)
    out.CopyInformation(reference)
    region, begin = to_input_region(model_image, reference, transform, interpolator, pixel_type)
    return out if region is None else sitk.Paste(out, region, region.GetSize(), [0, 0, 0], begin)


def to_input_region(model_image: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                    interpolator: int = sitk.sitkNearestNeighbor, pixel_type: int | None = None
                    ) -> tuple[sitk.Image | None, list[int]]:
    """The part of the input grid that the image's non-zero voxels map to, resampled, and its start index.

    Resampling only that box keeps mapping one small label back cheap on a large scan;
    (None, []) when nothing is non-zero or it falls outside the input.
    """
    pixel_type = model_image.GetPixelID() if pixel_type is None else pixel_type
    box = bounding_box(sitk.GetArrayViewFromImage(model_image))
    if box is None:
        return None, []
    lo = [v - 1 for v in box[0][::-1]]
    hi = [v for v in box[1][::-1]]
    corners = [model_image.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)])
               for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    inside = np.array([reference.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(c)) for c in corners])
    begin = np.clip(np.floor(inside.min(0)).astype(int) - 2, 0, np.array(reference.GetSize()))
    end = np.clip(np.ceil(inside.max(0)).astype(int) + 3, 0, np.array(reference.GetSize()))
    if np.any(end <= begin):
        return None, []
    region = sitk.Image([int(v) for v in end - begin], pixel_type)
    region.SetSpacing(reference.GetSpacing())
    region.SetDirection(reference.GetDirection())
    region.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in begin]))
    return sitk.Resample(model_image, region, as_affine(transform).GetInverse(), interpolator, 0, pixel_type), [int(v) for v in begin]


def coverage_on_input(mask: np.ndarray, offset: Sequence[int], grid: sitk.Image, reference: sitk.Image,
                      transform: sitk.Transform) -> tuple[np.ndarray, tuple[slice, ...]] | None:
    """How much of each input voxel a binary mask covers (0..1, linear interpolation), and where on the input grid.

    The mask is a box of `grid` whose first voxel is `offset` (array order); only the part of the input it maps to is
    resampled. None when it maps outside the input."""
    image = sitk.GetImageFromArray(np.pad(mask, 1).astype(np.float32))
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    image.SetOrigin(grid.TransformIndexToPhysicalPoint([int(o) - 1 for o in offset[::-1]]))
    region, begin = to_input_region(image, reference, transform, sitk.sitkLinear, sitk.sitkFloat32)
    if region is None:
        return None
    coverage = sitk.GetArrayFromImage(region)
    return coverage, tuple(slice(b, b + n) for b, n in zip(begin[::-1], coverage.shape))


def box_to_input(box: Box, grid: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> Box | None:
    """A model-grid mask on the input grid: the input voxels it covers at least half of."""
    covered = coverage_on_input(box.mask, box.offset, grid, reference, transform)
    return None if covered is None else Box.of(covered[0] >= 0.5, [s.start for s in covered[1]])


def labels_to_input(labels: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """A model-grid label map on the input grid with smooth boundaries.

    Each label's mask is interpolated linearly inside its own box; the most covered label wins
    where it covers more than the background does (1 - all labels' coverage), as a label-aware
    interpolator would, at a fraction of its cost.
    """
    shape = reference.GetSize()[::-1]
    best = np.zeros(shape, np.float32)
    covered = np.zeros(shape, np.float32)
    out = np.zeros(shape, np.int32)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkInt32))
    array = sitk.GetArrayViewFromImage(labels)
    for value in stats.GetLabels():
        x, y, z, sx, sy, sz = stats.GetBoundingBox(value)
        mapped = coverage_on_input(array[z:z + sz, y:y + sy, x:x + sx] == value, (z, y, x), labels, reference, transform)
        if mapped is None:
            continue
        coverage, target = mapped
        keep_highest(best, out, target, coverage, value)
        covered[target] += coverage
    out[best <= 1 - covered] = 0
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image
