"""Random subjects from one labelled scan: the demo's stand-in for a cohort.

Image and labels go through the same random affine and smooth non-linear warp; the image
then gets a bias field, gamma, blur, lower resolution along one axis, noise, an optional
skull strip and a cut field of view. Strength scales every geometric parameter at once, so
held-out subjects can be made harder than training ones. With the head's tissue classes
(tissues.py), a share of subjects gets a random contrast instead of the head's own: each class
painted with a random intensity (SynthSeg's generative model), then the same scanner effects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .tissues import BACKGROUND, CLASSES


@dataclass(frozen=True)
class Strength:
    rotation_deg: float = 10.0
    scale: float = 0.08
    translation_mm: float = 8.0
    warp_mm: float = 3.0       # std of the smooth displacement field
    warp_spacing_mm: float = 40.0  # distance between random displacement samples

    def times(self, k: float) -> "Strength":
        return Strength(self.rotation_deg * k, self.scale * k, self.translation_mm * k, self.warp_mm * k, self.warp_spacing_mm)


class SubjectGenerator:
    """Makes warped, re-imaged copies of (image, labels, brain mask) on any output grid. Without a brain mask
    subjects are never skull-stripped; without tissue classes they all keep the image's contrast."""

    def __init__(self, image: sitk.Image, labels: sitk.Image, brain_mask: sitk.Image | None,
                 tissues: sitk.Image | None = None):
        self.image = sitk.Cast(image, sitk.sitkFloat32)
        self.labels = labels
        self.brain_mask = brain_mask
        self.tissues = tissues

    def random_transform(self, rng: np.random.Generator, strength: Strength) -> sitk.Transform:
        """Output-grid points -> source points: affine about the centre, then a smooth random displacement."""
        size = np.array(self.image.GetSize())
        center = self.image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist())
        affine = sitk.AffineTransform(3)
        affine.SetCenter(center)
        angles = np.deg2rad(rng.uniform(-1, 1, 3) * strength.rotation_deg)
        rotation = sitk.Euler3DTransform(center, *angles.tolist())
        scale = np.diag(1 + rng.uniform(-1, 1, 3) * strength.scale)
        affine.SetMatrix((np.array(rotation.GetMatrix()).reshape(3, 3) @ scale).ravel().tolist())
        affine.SetTranslation((rng.uniform(-1, 1, 3) * strength.translation_mm).tolist())
        transform = sitk.CompositeTransform(affine)
        if strength.warp_mm > 0:
            transform.AddTransform(self._random_displacement(rng, strength))
        return transform

    def _random_displacement(self, rng: np.random.Generator, strength: Strength) -> sitk.Transform:
        extent = size_mm = np.array(self.image.GetSize()) * np.array(self.image.GetSpacing())
        coarse_size = np.maximum(2, np.ceil(size_mm / strength.warp_spacing_mm).astype(int) + 1)
        coarse = sitk.GetImageFromArray(rng.normal(0, strength.warp_mm, (*coarse_size[::-1], 3)), isVector=True)
        coarse.SetSpacing((extent / (coarse_size - 1)).tolist())
        coarse.SetDirection(self.image.GetDirection())
        coarse.SetOrigin(self.image.GetOrigin())
        field_grid = sitk.Image([int(s) for s in np.ceil(extent / 4.0).astype(int) + 1], sitk.sitkVectorFloat64, 3)
        field_grid.SetSpacing([4.0] * 3)
        field_grid.SetDirection(self.image.GetDirection())
        field_grid.SetOrigin(self.image.GetOrigin())
        smooth = sitk.Resample(coarse, field_grid, sitk.Transform(), sitk.sitkBSpline, 0.0, sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(smooth)

    def sample(self, rng: np.random.Generator, strength: Strength = Strength(), grid: sitk.Image | None = None,
               skull_strip_probability: float = 0.3, fov_cut_probability: float = 0.3,
               contrast_probability: float = 0.0) -> tuple[sitk.Image, sitk.Image]:
        """One random subject (image, label map) on `grid` (default: the source grid); with `contrast_probability`
        (and tissue classes), of a random contrast."""
        grid = self.image if grid is None else grid
        transform = self.random_transform(rng, strength)
        array, labels = self.warp(grid, transform, sitk.sitkLinear, rng.random() < skull_strip_probability)
        if contrast_probability > 0 and self.tissues is not None and rng.random() < contrast_probability:
            tissues = sitk.Resample(self.tissues, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            array = np.where(array > 0, paint(sitk.GetArrayFromImage(tissues), rng), 0).astype(np.float32)
        array = self._reimage(array, rng, np.array(grid.GetSpacing())[::-1])
        if rng.random() < fov_cut_probability:
            _cut_field_of_view(array, rng, (0.05, 0.2))
        return _on_grid(array, grid), labels

    def warp(self, grid: sitk.Image, transform: sitk.Transform, interpolator: int, skull_strip: bool
             ) -> tuple[np.ndarray, sitk.Image]:
        """The source image (as an array) and labels pulled onto `grid` through `transform`, the image
        skull-stripped when asked and a brain mask is known."""
        image = sitk.Resample(self.image, grid, transform, interpolator, 0.0, sitk.sitkFloat32)
        labels = sitk.Resample(self.labels, grid, transform, sitk.sitkNearestNeighbor, 0, self.labels.GetPixelID())
        array = sitk.GetArrayFromImage(image)
        if skull_strip and self.brain_mask is not None:
            mask = sitk.Resample(self.brain_mask, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            array *= sitk.GetArrayViewFromImage(mask)
        return array, labels

    @staticmethod
    def _reimage(array: np.ndarray, rng: np.random.Generator, spacing_zyx: np.ndarray) -> np.ndarray:
        """Scanner effects: bias field, gamma, blur, thick slices, noise."""
        top = float(np.percentile(array, 99.5)) or 1.0
        x = np.clip(array / top, 0, None) * _bias_field(array.shape, rng, knots=4, std=0.15)
        x = x ** np.exp(rng.normal(0, 0.25))
        image = sitk.GetImageFromArray(x.astype(np.float32))
        image.SetSpacing(spacing_zyx[::-1].tolist())
        sigma = rng.uniform(0, 1.0) * float(spacing_zyx.min())
        if sigma > 0.2:
            image = sitk.SmoothingRecursiveGaussian(image, sigma)
        if rng.random() < 0.5:
            factor = rng.uniform(1.5, 3.0)
            image = _thick_slices(image, int(rng.integers(3)), factor)
        x = sitk.GetArrayFromImage(image)
        x = x + rng.normal(0, rng.uniform(0, 0.04), x.shape).astype(np.float32)
        return np.clip(x, 0, None).astype(np.float32) * top


def paint(tissues: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random contrast (SynthSeg's generative model): every tissue class a Gaussian of random mean and spread, the
    background dark as in every MR sequence. TorchIO's RandomLabelsToImage does the same 23x slower (2.9 s against
    0.13 s for a 2 mm head on this 2-core machine): a cost every training subject would pay. Every class gets its
    draws, present or not, so a class's intensity does not depend on which others a field of view keeps."""
    means, spreads = rng.uniform(0.05, 1.0, CLASSES), rng.uniform(0.0, 0.08, CLASSES)
    means[BACKGROUND] = rng.uniform(0.0, 0.05)
    return means[tissues].astype(np.float32) + spreads[tissues].astype(np.float32) * rng.standard_normal(
        tissues.shape, dtype=np.float32)


def random_grid(reference: sitk.Image, rng: np.random.Generator, spacing_range: tuple[float, float] = (0.9, 1.6),
                crop: float = 0.15) -> sitk.Image:
    """Another scanner's grid over the same head: anisotropic spacing, permuted/flipped axes, cut field of view."""
    permutation = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)[:, None]
    direction = np.array(reference.GetDirection()).reshape(3, 3) @ permutation.T
    extent = np.abs(permutation) @ (np.array(reference.GetSize()) * np.array(reference.GetSpacing()))
    keep = 1 - rng.uniform(0, crop, 3)
    spacing = rng.uniform(*spacing_range, 3)
    size = np.maximum(8, np.round(extent * keep / spacing)).astype(int)
    center = np.array(reference.TransformContinuousIndexToPhysicalPoint(((np.array(reference.GetSize()) - 1) / 2).tolist()))
    center = center + direction @ (rng.uniform(-0.5, 0.5, 3) * extent * (1 - keep))
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((center - direction @ ((size - 1) / 2 * spacing)).tolist())
    return grid


def unlike_subject(source: SubjectGenerator, rng: np.random.Generator) -> tuple[sitk.Image, sitk.Image]:
    """A held-out subject unlike every training subject, to check how a model generalizes (never to train on).

    Each setting lies outside training's: a B-spline warp on a 25 mm control grid (training: a field interpolated
    from 40 mm samples), rotations up to 20 degrees and scaling up to 12 %, a coarser scanner grid (1.2-2.4x the
    source spacing, up to 30 % of the field of view gone), B-spline image interpolation, a random monotone contrast
    curve, a bias field twice as strong and as fine, slices 3-5x thicker along one axis, Rician noise, and the field
    of view always cut by 5-20 % on one side.
    """
    image = source.image
    spacing = min(image.GetSpacing())
    grid = random_grid(image, rng, spacing_range=(1.2 * spacing, 2.4 * spacing), crop=0.3)
    transform = source.random_transform(rng, Strength(rotation_deg=20.0, scale=0.12, translation_mm=12.0, warp_mm=0.0))
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    warp = sitk.BSplineTransformInitializer(image, [int(n) for n in np.ceil(extent / 25.0)])
    warp.SetParameters(rng.normal(0, 7.0, warp.GetNumberOfParameters()).tolist())
    transform.AddTransform(warp)
    array, labels = source.warp(grid, transform, sitk.sitkBSpline, rng.random() < 0.5)
    top = float(np.percentile(array, 99.5)) or 1.0
    curve = np.concatenate([[0.0], np.cumsum(rng.dirichlet(np.full(5, 10.0)))])
    x = np.interp(np.clip(array / top, 0, None), np.linspace(0, 1, 6), curve) * _bias_field(array.shape, rng, 8, 0.3)
    x = sitk.GetArrayFromImage(_thick_slices(_on_grid(x, grid), int(rng.integers(3)), rng.uniform(3.0, 5.0)))
    sigma = rng.uniform(0.02, 0.06)
    x = np.hypot(x + rng.normal(0, sigma, x.shape), rng.normal(0, sigma, x.shape)).astype(np.float32)
    _cut_field_of_view(x, rng, (0.05, 0.2))
    return _on_grid(x * top, grid), labels


def _bias_field(shape: tuple[int, ...], rng: np.random.Generator, knots: int, std: float) -> np.ndarray:
    """A smooth multiplicative field: exp of normal samples on a knots^3 lattice, B-spline interpolated."""
    coarse = sitk.GetImageFromArray(rng.normal(0, std, (knots,) * 3))
    coarse.SetSpacing([(s - 1) / (knots - 1) for s in shape[::-1]])
    target = sitk.Image([int(s) for s in shape[::-1]], sitk.sitkFloat64)
    return np.exp(sitk.GetArrayFromImage(sitk.Resample(coarse, target, sitk.Transform(), sitk.sitkBSpline, 0.0))).astype(np.float32)


def _thick_slices(image: sitk.Image, axis: int, factor: float) -> sitk.Image:
    """Slices `factor` times thicker along `axis` (x, y, z), brought back to the image's grid."""
    spacing = list(image.GetSpacing())
    spacing[axis] *= factor
    size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(image.GetSize(), image.GetSpacing(), spacing)]
    low = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection())
    return sitk.Resample(low, image, sitk.Transform(), sitk.sitkLinear)


def _cut_field_of_view(array: np.ndarray, rng: np.random.Generator, depth: tuple[float, float]) -> None:
    """Zeroes a slab of random depth (a share of the axis) on one side of a random axis, in place."""
    axis, side, share = rng.integers(3), rng.integers(2), rng.uniform(*depth)
    cut = int(array.shape[axis] * share)
    index = [slice(None)] * 3
    index[axis] = slice(0, cut) if side == 0 else slice(array.shape[axis] - cut, None)
    array[tuple(index)] = 0


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(grid)
    return image
