"""The deformable atlas prior (`--registration deformable`): after the affine step, the atlas is warped onto the scan
by a fast non-linear registration, so that the network refines a close prior instead of bridging the whole deformation.

The registration is SimpleITK's symmetric-forces demons on the model grid (coarse to fine), between the scan and the
atlas as the network sees them (normalized). Demons compares intensities, so the atlas is first painted in the scan's
contrast: each of its intensities becomes the scan's median intensity where the registered atlas has it, read again
after each level as the two come closer (after Guimond et al. 2001). A T2, PD or FLAIR scan is matched as a T1 is,
which histogram matching (the ordering of the atlas's intensities kept) could not do. It is deterministic and takes a
few seconds whatever the scan's resolution, since it runs on the model grid.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .engine import Condition
from .errors import Cancelled
from .geometry import Box, bounding_box, on_grid

# (shrink factor of the model grid, demons iterations), coarse to fine. Chosen on the 3 validation subjects of the demo
# recipe (docs/results.md): the coarse levels are cheap and carry the large deformations; 40/40/10 at 1.5 voxels was 0.73.
LEVELS = ((4, 300), (2, 150), (1, 30))
SMOOTHING_VOXELS = 1.25  # Gaussian regularization of the displacement field, in voxels of each level
# A scan that barely tells the brain's tissues apart under its noise (PD: grey and white matter alike) gets a smoother
# field: demons there follows noise, and the prior lost to the affine one on the 3 registered PD validation heads of
# the unlike kind (-0.02 to -0.04; with 2.0 voxels +0.01 to +0.02; on 2 PD heads of the training kind 2.0 voxels cost
# 0.00 and 0.02). Such a scan is one where the atlas painted in its contrast varies by less than FLAT_BRAIN inside
# the brain (standard deviation, normalized intensities): validation PD heads 0.010-0.025, T2 0.035-0.064, FLAIR
# 0.054-0.080, T1 0.053-0.104 (docs/results.md, "The deformable prior on PD").
FLAT_BRAIN = 0.03
FLAT_SMOOTHING_VOXELS = 2.0
# A scan is skull-stripped when more than STRIPPED_SHARE of the atlas's head tissue (normalized atlas intensity above
# HEAD_TISSUE) farther than STRIP_MARGIN_MM from its brain mask is DARK in it (normalized). Chosen on Colin27 with and
# without skull, MNI152 and subjects of both generators with seeds of their own (docs/results.md, "Skull-stripped
# scans"): 0.97 and more skull-stripped, 0.73 and less whole; not on the held-out set.
HEAD_TISSUE = 0.3
STRIP_MARGIN_MM = 6.0
DARK = 0.1
STRIPPED_SHARE = 0.9
# The atlas is painted in the scan's contrast from a joint histogram of BINS x BINS intensities (normalized 0..1); a
# bin's median needs MIN_VOXELS voxels.
BINS = 64
MIN_VOXELS = 20
# The levels of shrink factor CROP_SHRINK and finer run only on the box of the atlas's brain grown by CROP_MARGIN_MM
# (when the brain mask is given); outside it the field stays the coarser levels'. The finest level is the costliest
# (30 iterations on the whole model grid); on 13 validation heads (both generators, T1/T2/PD/FLAIR) its crop left the
# field in the brain as it was (mean change <= 0.01 mm), propagation Dice within 0.0004, and took the demons step from
# 10.2 s to 8.5 s. Cropping the middle level too (7.6 s) moved the brain's field by up to 8 mm on one head: not kept.
CROP_SHRINK = 1
CROP_MARGIN_MM = 8.0


@dataclass
class Prior:
    """The atlas warped onto one scan's model-grid image. `field` maps scan points to atlas points (both on the model
    grid), the direction sitk.Resample pulls the atlas through."""

    field: sitk.DisplacementFieldTransform
    atlas_image: np.ndarray  # the normalized atlas image, warped (z, y, x)
    grid: sitk.Image
    reach: int  # the largest displacement, in voxels (rounded up): how far a warped mask can move

    def warp(self, condition: Condition) -> Condition:
        """The condition's atlas mask warped onto the scan (linear interpolation, half covered or more), computed only
        in its box grown by the field's reach."""
        if not condition.mask.any():
            return condition
        grid_size = np.array(self.grid.GetSize()[::-1])
        start = np.clip(np.array(condition.offset) - self.reach - 1, 0, grid_size)
        end = np.clip(np.array(condition.offset) + condition.mask.shape + self.reach + 1, 0, grid_size)
        source = sitk.GetImageFromArray(np.pad(condition.mask, 1).astype(np.float32))
        _place(source, self.grid, np.array(condition.offset) - 1)
        region = sitk.Image([int(v) for v in (end - start)[::-1]], sitk.sitkFloat32)
        _place(region, self.grid, start)
        warped = sitk.GetArrayFromImage(sitk.Resample(source, region, self.field, sitk.sitkLinear, 0.0)) >= 0.5
        box = Box.of(warped, start)
        if box is None:
            return replace(condition, mask=np.zeros((0, 0, 0), bool), offset=(0, 0, 0))
        return replace(condition, mask=box.mask, offset=box.offset)


def _brain_region(atlas_mask: np.ndarray, grid: sitk.Image, shrink: int, level: sitk.Image
                  ) -> tuple[list[int], list[int]] | None:
    """(size, index) of the atlas brain's box grown by CROP_MARGIN_MM on a level's grid (x, y, z), or None if it
    covers the whole level (or there is no brain)."""
    box = bounding_box(atlas_mask)
    if box is None:
        return None
    lo, hi = box
    margin = int(np.ceil(CROP_MARGIN_MM / min(grid.GetSpacing())))
    size = np.array(level.GetSize())
    start = np.maximum((np.array(lo[::-1]) - margin) // shrink, 0)
    end = np.minimum(-(-(np.array(hi[::-1]) + margin) // shrink), size)
    if (start == 0).all() and (end == size).all():
        return None
    return [int(v) for v in end - start], [int(v) for v in start]


def _place(image: sitk.Image, grid: sitk.Image, offset_zyx) -> None:
    """Give `image` the geometry of the part of `grid` that starts at `offset_zyx`."""
    image.SetSpacing(grid.GetSpacing())
    image.SetDirection(grid.GetDirection())
    image.SetOrigin(grid.TransformIndexToPhysicalPoint([int(v) for v in np.asarray(offset_zyx)[::-1]]))


def skull_stripped(image: np.ndarray, atlas_image: np.ndarray, atlas_mask: np.ndarray, grid: sitk.Image) -> bool:
    """Whether a scan (normalized and affinely registered on the model grid `grid`) has had its skull removed:
    nearly all the atlas's head tissue around the brain (scalp, muscle, fat: bright in the atlas, beyond a margin of
    its brain mask) is dark in it. A whole head read as stripped would lose its scalp's guidance: the bar is high."""
    mask = sitk.GetImageFromArray(atlas_mask.astype(np.uint8))
    mask.CopyInformation(grid)
    margin = int(np.ceil(STRIP_MARGIN_MM / min(grid.GetSpacing())))
    near_brain = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, [margin] * 3)) > 0
    around = (atlas_image > HEAD_TISSUE) & ~near_brain
    return bool(around.any() and np.mean(image[around] < DARK) > STRIPPED_SHARE)


def flat_brain(painted: np.ndarray, atlas_mask: np.ndarray | None, seen: np.ndarray | None) -> bool:
    """Whether the atlas painted in a scan's contrast (in_scan_contrast) barely varies inside its brain, where the
    scan shows it: the scan barely tells grey matter, white matter and CSF apart."""
    inside = np.ones(painted.shape, bool) if atlas_mask is None else atlas_mask.astype(bool)
    if seen is not None:
        inside = inside & seen
    return bool(inside.any() and painted[inside].std() < FLAT_BRAIN)


def contrast_table(atlas: np.ndarray, scan: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(2, BINS): the scan's median intensity where the registered atlas has each intensity bin, outside the brain
    (regions 0) and inside it (1) apart: the atlas's tissues read in the scan's contrast, whatever it is (T2's
    inverted order included), as long as the scan tells those tissues apart. A bin seen on too few voxels takes its
    neighbours' value. The median, not the mean: voxels that misregistration puts in another tissue do not pull it."""
    index = _bins(atlas) + BINS * regions
    joint = np.bincount((index * BINS + _bins(scan)).ravel(), minlength=2 * BINS * BINS).reshape(2, BINS, BINS)
    counts = joint.sum(2)
    median = ((np.cumsum(joint, 2) < counts[..., None] / 2).sum(2) + 0.5) / BINS
    table = np.zeros((2, BINS))
    for region in range(2):
        seen = np.flatnonzero(counts[region] >= MIN_VOXELS)
        if seen.size:
            table[region] = np.interp(np.arange(BINS), seen, median[region, seen])
    return table


def _bins(x: np.ndarray) -> np.ndarray:
    return np.minimum((np.clip(x, 0, 1) * BINS).astype(np.int64), BINS - 1)


def in_scan_contrast(atlas: np.ndarray, regions: np.ndarray, scan: np.ndarray, grid: sitk.Image,
                     to_atlas: sitk.Transform | None = None, seen: np.ndarray | None = None) -> sitk.Image:
    """The atlas (normalized, on the model grid) painted in the scan's contrast (contrast_table), its tissues read
    where the warp `to_atlas` (field_on_grid) puts them, or where the affine step did; only where the scan holds
    signal (`seen`), when given."""
    seen_atlas, seen_regions = atlas, regions
    if to_atlas is not None:
        seen_atlas, seen_regions = (pulled(a, to_atlas, grid, interpolator) for a, interpolator in
                                    ((atlas, sitk.sitkLinear), (regions.astype(np.float32), sitk.sitkNearestNeighbor)))
    if seen is not None:
        seen_atlas, scan, seen_regions = seen_atlas[seen], scan[seen], seen_regions[seen]
    table = contrast_table(seen_atlas, scan, seen_regions.astype(np.int64))
    return on_grid(table.ravel()[_bins(atlas) + BINS * regions], grid)


def field_on_grid(field: sitk.Image, grid: sitk.Image) -> sitk.Transform:
    """A displacement field of any level's grid as a transform on the model grid (scan points -> atlas points)."""
    return sitk.DisplacementFieldTransform(
        sitk.Resample(field, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64))


def pulled(array: np.ndarray, to_atlas: sitk.Transform, grid: sitk.Image, interpolator: int = sitk.sitkLinear
           ) -> np.ndarray:
    """An array of the model grid pulled through the warp `to_atlas` (field_on_grid)."""
    return sitk.GetArrayFromImage(sitk.Resample(on_grid(array, grid), grid, to_atlas, interpolator, 0.0))


def deformable_prior(image: np.ndarray, atlas_image: np.ndarray, grid: sitk.Image,
                     cancel: Callable[[], bool] | None = None, atlas_mask: np.ndarray | None = None,
                     seen: np.ndarray | None = None) -> Prior:
    """Demons registration of the atlas to a scan, both normalized on the model grid `grid` (z, y, x arrays).

    Demons pulls edges onto edges: the atlas's scalp would drag its brain into the black surroundings of a
    skull-stripped scan. So when `atlas_mask` (the atlas's brain) is given and the scan is skull-stripped, the atlas is
    stripped with it before it is matched and registered; the network still gets the whole atlas, warped.
    Where the scan holds no signal (`seen` False: outside its field of view, a slab zeroed by defacing or a cut), the
    atlas stands in for it, painted and warped as it is, so it pulls nothing there: otherwise the edge where the
    scan's signal ends drags the atlas's head across it.
    With `atlas_mask`, the finest level refines only the brain's box and CROP_MARGIN_MM around it: the brain's field
    as on the whole grid, in less time.
    `cancel` is polled every demons iteration (a few tens of milliseconds); when it returns True, Cancelled is raised."""
    fixed, atlas = on_grid(image, grid), on_grid(atlas_image, grid)
    seen = None if seen is None or seen.all() else seen
    source = atlas_image
    if atlas_mask is not None and skull_stripped(image, atlas_image, atlas_mask, grid):
        source = np.where(atlas_mask, atlas_image, 0)
    regions = np.zeros(atlas_image.shape, np.int64) if atlas_mask is None else atlas_mask.astype(np.int64)
    moving = in_scan_contrast(source, regions, image, grid, seen=seen)  # demons compares intensities: comparable
    smoothing = FLAT_SMOOTHING_VOXELS if flat_brain(sitk.GetArrayViewFromImage(moving), atlas_mask, seen) else \
        SMOOTHING_VOXELS
    field = to_atlas = None
    for shrink, iterations in LEVELS:
        if seen is not None:  # where the scan shows nothing, the atlas as warped so far stands in for it
            painted = sitk.GetArrayViewFromImage(moving)
            warped_so_far = painted if to_atlas is None else pulled(painted, to_atlas, grid)
            fixed = on_grid(np.where(seen, image, warped_so_far), grid)
        level_fixed, level_moving = (sitk.Shrink(i, [shrink] * 3) if shrink > 1 else i for i in (fixed, moving))
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetStandardDeviations(smoothing)
        if cancel is not None:
            demons.AddCommand(sitk.sitkIterationEvent, lambda d=demons: cancel() and d.StopRegistration())
        if field is None:
            field = demons.Execute(level_fixed, level_moving)
        else:
            start = sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            region = None if atlas_mask is None or shrink > CROP_SHRINK else \
                _brain_region(atlas_mask, grid, shrink, level_fixed)
            if region is None:
                field = demons.Execute(level_fixed, level_moving, start)
            else:  # refine the brain's box; the rest keeps the coarser levels' field
                box = [sitk.RegionOfInterest(i, *region) for i in (level_fixed, level_moving, start)]
                field = sitk.Paste(start, demons.Execute(*box), region[0], [0, 0, 0], region[1])
        if cancel is not None and cancel():
            raise Cancelled()
        if shrink > 1:  # read the atlas's tissues in the scan again, now that they lie closer to the scan's
            to_atlas = field_on_grid(field, grid)
            moving = in_scan_contrast(source, regions, image, grid, to_atlas, seen)
    field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    reach = int(np.ceil(np.sqrt((sitk.GetArrayViewFromImage(field) ** 2).sum(-1)).max() / min(grid.GetSpacing())))
    transform = sitk.DisplacementFieldTransform(field)  # takes the field over: read it before
    warped = sitk.Resample(atlas, fixed, transform, sitk.sitkLinear, 0.0)
    return Prior(transform, sitk.GetArrayFromImage(warped), grid, reach)
