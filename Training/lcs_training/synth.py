"""Random subjects from one labelled scan: the demo's stand-in for a cohort.

Image and labels go through the same random affine and smooth non-linear warp; the image
then gets a bias field, gamma, blur, lower resolution along one axis, noise, an optional
skull strip and a cut field of view. Strength scales every geometric parameter at once, so
held-out subjects can be made harder than training ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


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
    (a partly annotated scan, whose labels do not outline the brain) subjects are never skull-stripped."""

    def __init__(self, image: sitk.Image, labels: sitk.Image, brain_mask: sitk.Image | None):
        self.image = sitk.Cast(image, sitk.sitkFloat32)
        self.labels = labels
        self.brain_mask = brain_mask

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
               skull_strip_probability: float = 0.3, fov_cut_probability: float = 0.3) -> tuple[sitk.Image, sitk.Image]:
        """One random subject (image, label map) on `grid` (default: the source grid)."""
        grid = self.image if grid is None else grid
        transform = self.random_transform(rng, strength)
        image = sitk.Resample(self.image, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        labels = sitk.Resample(self.labels, grid, transform, sitk.sitkNearestNeighbor, 0, self.labels.GetPixelID())
        array = sitk.GetArrayFromImage(image)
        if rng.random() < skull_strip_probability and self.brain_mask is not None:
            mask = sitk.Resample(self.brain_mask, grid, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            array *= sitk.GetArrayViewFromImage(mask)
        array = self._reimage(array, rng, np.array(grid.GetSpacing())[::-1])
        if rng.random() < fov_cut_probability:
            axis, side, depth = rng.integers(3), rng.integers(2), rng.uniform(0.05, 0.2)
            cut = int(array.shape[axis] * depth)
            index = [slice(None)] * 3
            index[axis] = slice(0, cut) if side == 0 else slice(array.shape[axis] - cut, None)
            array[tuple(index)] = 0
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(grid)
        labels.CopyInformation(grid)
        return out, labels

    @staticmethod
    def _reimage(array: np.ndarray, rng: np.random.Generator, spacing_zyx: np.ndarray) -> np.ndarray:
        """Scanner effects: bias field, gamma, blur, thick slices, noise."""
        top = float(np.percentile(array, 99.5)) or 1.0
        x = np.clip(array / top, 0, None)
        coarse = sitk.GetImageFromArray(rng.normal(0, 0.15, (4, 4, 4)))
        target = sitk.Image([int(s) for s in x.shape[::-1]], sitk.sitkFloat64)
        coarse.SetSpacing([(s - 1) / 3 for s in x.shape[::-1]])
        bias = sitk.GetArrayFromImage(sitk.Resample(coarse, target, sitk.Transform(), sitk.sitkBSpline, 0.0))
        x = x * np.exp(bias).astype(np.float32)
        x = x ** np.exp(rng.normal(0, 0.25))
        image = sitk.GetImageFromArray(x.astype(np.float32))
        image.SetSpacing(spacing_zyx[::-1].tolist())
        sigma = rng.uniform(0, 1.0) * float(spacing_zyx.min())
        if sigma > 0.2:
            image = sitk.SmoothingRecursiveGaussian(image, sigma)
        if rng.random() < 0.5:  # thick slices along one axis
            factor = rng.uniform(1.5, 3.0)
            shrunk_spacing = list(image.GetSpacing())
            axis = int(rng.integers(3))
            shrunk_spacing[axis] *= factor
            shrunk_size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(image.GetSize(), image.GetSpacing(), shrunk_spacing)]
            low = sitk.Resample(image, shrunk_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), shrunk_spacing, image.GetDirection())
            image = sitk.Resample(low, image, sitk.Transform(), sitk.sitkLinear)
        x = sitk.GetArrayFromImage(image)
        x = x + rng.normal(0, rng.uniform(0, 0.04), x.shape).astype(np.float32)
        return np.clip(x, 0, None).astype(np.float32) * top


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
