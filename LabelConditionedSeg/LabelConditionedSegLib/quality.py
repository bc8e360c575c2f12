"""Plausibility of a result: does the registered scan match the atlas, and are label volumes near the atlas's?

A scan the model cannot handle (a failed registration, not a head, a deformable prior gone astray on a contrast or a
skull strip the atlas lacks, a barely trained model) is flagged, and the run says so instead of a clean "segmented N
of N". Thresholds set on validation subjects of every contrast (docs/results.md, "Plausibility check"). The first
three are read only where the registered scan shows something (inside its field of view and not a zeroed slab):
- coverage: the share of the atlas's brain the scan shows after registration;
- alignment: normalized mutual information of the registered scan and the atlas over the brain and the head around
  it (geometry.with_margin), after the affine step and, in deformable mode, with the warped atlas (which must not
  match worse than the affine one);
- edges: whether the scan's edges inside the brain lie where the atlas's do (normalized gradient fields);
- mirror: where the atlas differs from its mirror image, how much better the mirror image matches the scan (a scan
  whose left and right are swapped matches it better);
- each label's volume against its atlas region's, scaled by the registration's change of volume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from .geometry import on_grid


# Found volume / expected volume beyond which a label is implausible. On validation subjects (Colin27 under the
# training generator's warps, other seeds and grids; the demo model, all 116 labels) the ratios spanned 0.83-1.08
# (3 subjects, affine) and 0.57-1.68 (2 subjects, deformable); the limits leave a factor of about 3 beyond them.
PLAUSIBLE = (0.2, 5.0)
# Alignment (normalized mutual information over the brain and 8 mm around it, 1 = unrelated) below which the affine
# registration failed. Validation heads in T1, T2, PD and FLAIR (the training generator, 1x and 1.5x its
# deformation) scored 1.034-1.069; heads turned upside down or front to back under --registration none, a cylinder
# of noise, a 12-slice slab and PD heads whose affine step drifted (Dice 0.17-0.43) 1.015-1.028. Validation heads of
# the unlike generator (lcs evaluate --validation, 3 in each contrast): the 4 registered 1.035-1.042, the 8 failed
# (Dice 0.004-0.20) 1.006-1.019. Since the affine step searches shifts and reads only the scan's signal
# (geometry._rigid), 5 of each contrast, read where the scan shows something: the 18 registered (Dice 0.50-0.70)
# 1.040-1.057, the 2 failed (PD, 0.16-0.19) 1.016-1.022; over the whole brain, the black of a field of view cut by a
# quarter had pulled 3 registered heads to 1.024-1.029. Failed cases 1.012-1.024 (a ball of noise 1.039: its edges
# flag it).
MIN_ALIGNMENT = 1.03
# Edge agreement inside the brain below which the scan is not the atlas's anatomy where the registration put it.
# Validation heads 0.095-0.162 (PD lowest); a ball and a cylinder of noise 0.029-0.065, the failed cases above
# 0.072-0.086 (one partly failed PD head 0.095). Unlike-generator validation heads: registered 0.093-0.131, failed
# 0.061-0.078; after the affine step's change (edges read 4 mm away from where the scan's signal ends), registered
# 0.092-0.147, failed 0.074-0.079.
MIN_EDGES = 0.09
# Where the atlas and its mirror image differ by more than ASYMMETRY (normalized intensity), how much better the mirror
# image may match the scan than the atlas, (mirror - 1) / (alignment - 1), before its left and right look swapped.
# Validation heads (unlike generator T1/T2/PD/FLAIR and the training generator's T1 at 1.5x; 3 each), registered
# right: 0.59-0.83; the same heads mirrored: 1.19-2.09 (5 whose registration failed: flagged for that first);
# Colin27 mirrored 5.4-7.0; MNI152 2009, a template made symmetric (its mirror image is itself), 1.05 as it is and
# mirrored. Over the whole brain and head instead, the same heads gave 0.83-0.93 against 1.07-1.30 and MNI152 1.03:
# the symmetric voxels match both alike and only dilute the difference. A brain's asymmetries are its own: a scan of
# another person mirrored is caught only as far as its asymmetries follow the atlas's.
ASYMMETRY = 0.1
MAX_MIRROR = 1.12
MIN_COVERAGE = 0.5  # share of the atlas's brain the scan shows, below which most labels lie outside what it shows
LOW_VALIDATION_DICE = 0.1  # a model whose own validation Dice is below this is barely trained
EDGE_SCALE_MM = 2.0  # edges are read at this scale, whatever the atlas's grid


@dataclass(frozen=True)
class Match:
    """How a registered scan matches the atlas (see the module's docstring); `deformable` with the warped atlas."""

    coverage: float
    alignment: float
    edges: float
    mirror: float  # how much better the atlas's mirror image matches than the atlas (mirror_ratio)
    deformable: float | None = None

    def problem(self) -> str:
        """What looks wrong with the registration, in one clause; '' when nothing does."""
        if failed := self.misregistered():
            return failed
        if self.mirror > MAX_MIRROR:
            return (f"the scan matches the atlas's mirror image better than the atlas ({times(self.mirror)} as well "
                    f"where the two differ; heads score <= {MAX_MIRROR}): its left and right look swapped; check the "
                    "orientation in its header, or whether it was flipped")
        if self.deformable is not None and self.deformable < self.alignment:
            return (f"the deformable prior matches the scan worse than the affine step (alignment "
                    f"{self.deformable:.3f} < {self.alignment:.3f}): use --registration affine")
        return ""

    def misregistered(self) -> str:
        """What says the registration itself failed (what a search from farther poses may mend), '' nothing."""
        if self.coverage < MIN_COVERAGE:
            return (f"the scan holds only {self.coverage:.0%} of the atlas's brain after registration: the registration "
                    "failed (try another registration mode), or the field of view is too small to register")
        if self.alignment < MIN_ALIGNMENT or self.edges < MIN_EDGES:
            return (f"the scan does not match the atlas after registration (alignment {self.alignment:.3f}, edges "
                    f"{self.edges:.3f}; heads score >= {MIN_ALIGNMENT} and >= {MIN_EDGES}): the registration failed "
                    "(try another registration mode), or this is not a head")
        return ""


def mirror_ratio(image: np.ndarray, atlas_image: np.ndarray, mirror: np.ndarray, mask: np.ndarray) -> float:
    """How much better the atlas's mirror image (mirror_image) matches a registered scan than the atlas, where the two
    differ (inside `mask`): (alignment with the mirror - 1) / (alignment with the atlas - 1), below 1 for a scan the
    right way round; 1 where it cannot tell."""
    asymmetric = mask & (np.abs(atlas_image - mirror) > ASYMMETRY)
    straight = alignment(image, atlas_image, asymmetric)
    return (alignment(image, mirror, asymmetric) - 1) / (straight - 1) if straight > 1 else 1.0


def mirror_image(atlas_image: sitk.Image, atlas_mask: sitk.Image) -> np.ndarray:
    """The atlas image mirrored left to right about the plane through its brain's centre (array, model grid): what a
    scan whose left and right are swapped looks like once registered, since a registration cannot mirror."""
    brain = np.argwhere(sitk.GetArrayViewFromImage(atlas_mask) > 0).mean(0)[::-1]
    mirror = sitk.AffineTransform(3)
    mirror.SetMatrix([-1.0, 0, 0, 0, 1, 0, 0, 0, 1])  # x is left-right in every patient frame (LPS, RAS)
    mirror.SetCenter(atlas_image.TransformContinuousIndexToPhysicalPoint(brain.tolist()))
    return sitk.GetArrayFromImage(sitk.Resample(atlas_image, atlas_image, mirror, sitk.sitkLinear, 0.0))


def volume_scale(transform: sitk.Transform, grid: sitk.Image) -> float:
    """How much the registration enlarges volumes from the atlas to the scan: |det| of the transform's Jacobian at the
    atlas grid's centre (finite differences of 1 mm; exact for affine transforms)."""
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid.GetSize()]))
    at = np.array(transform.TransformPoint(centre.tolist()))
    jacobian = np.stack([np.array(transform.TransformPoint((centre + step).tolist())) - at for step in np.eye(3)], 1)
    return abs(float(np.linalg.det(jacobian)))


def flag(found_ml: float, expected_ml: float) -> str:
    """'' for a plausible volume (or a label found nowhere: the "found nowhere" list names it), else why not."""
    if found_ml <= 0 or expected_ml <= 0 or PLAUSIBLE[0] <= found_ml / expected_ml <= PLAUSIBLE[1]:
        return ""
    return f"implausible volume: {times(found_ml / expected_ml)} the atlas's"


def times(ratio: float) -> str:
    """A ratio as people read it: "0.05x", "12x", "540x" (not "5.4e+02x")."""
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def describe(check: str, rows: Sequence[dict], shown: int = 3) -> str:
    """A registration check (Match.problem) and the flagged rows of Segmentation.volumes() in words: "...; 2
    label volumes implausible (Hippocampus_L 12x, Amygdala_R 0.05x the atlas's)"; '' when nothing is flagged."""
    flagged = sorted((r for r in rows if "implausible volume" in r["flag"]),
                     key=lambda r: -abs(np.log(max(r["volume_ml"], 1e-6) / r["atlas_ml"])))
    listed = ", ".join(f"{r['name']} {times(r['volume_ml'] / r['atlas_ml'])}" for r in flagged[:shown])
    volumes = f"{len(flagged)} label volumes implausible ({listed}{', ...' if len(flagged) > shown else ''} the atlas's)"
    return "; ".join(filter(None, (check, volumes if flagged else "")))


def alignment(image: np.ndarray, atlas_image: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """How well a registered scan matches the atlas inside `mask`: normalized mutual information of the two (both
    normalized to 0..1 on the model grid), from 1 (unrelated) to 2 (one determines the other). Mutual information
    does not assume the atlas's contrast, so a T2 head that lies right scores like a T1 head."""
    joint, _, _ = np.histogram2d(image[mask], atlas_image[mask], bins=bins, range=[[0, 1], [0, 1]])
    p = joint / max(joint.sum(), 1)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())
    joint_entropy = entropy(p)
    return (entropy(p.sum(0)) + entropy(p.sum(1))) / joint_entropy if joint_entropy > 0 else 1.0


def edges(image: np.ndarray, atlas_image: np.ndarray, mask: np.ndarray, grid: sitk.Image) -> float:
    """Whether the scan's edges lie where the atlas's do inside `mask`: the mean squared cosine of the angle between
    the two images' gradients, each damped where it is weaker than its mean (normalized gradient fields, Haber and
    Modersitzki 2006). About 0.03 for unrelated images. Why beside alignment: in a PD head grey and white matter look
    nearly alike and mutual information inside the brain says little, but ventricles, sulci and the brain's outline
    still have edges where the atlas has them; a ball of noise placed over the head has none."""
    def unit_gradients(array: np.ndarray) -> np.ndarray:
        smooth = sitk.SmoothingRecursiveGaussian(on_grid(array, grid), EDGE_SCALE_MM)
        gradient = np.stack([sitk.GetArrayFromImage(sitk.Derivative(smooth, axis)) for axis in range(3)])
        magnitude = np.sqrt((gradient ** 2).sum(0))
        damping = magnitude[mask].mean() if mask.any() else 1.0
        return gradient / np.sqrt(magnitude ** 2 + damping ** 2 + 1e-12)
    return float(((unit_gradients(image) * unit_gradients(atlas_image)).sum(0) ** 2)[mask].mean()) if mask.any() else 0.0
