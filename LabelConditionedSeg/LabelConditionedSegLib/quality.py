"""Plausibility of a result: does the registered scan match the atlas, and are label volumes near the atlas's?

A scan the model cannot handle (a failed registration, not a head, a deformable prior gone astray on a contrast or a
skull strip the atlas lacks, a barely trained model) is flagged, and the run says so instead of a clean "segmented N
of N". Two measures, thresholds set on validation subjects (docs/results.md, "Plausibility check"):
- alignment: normalized mutual information of the registered scan and the atlas inside the atlas's brain mask, after
  the affine step and, in deformable mode, with the warped atlas (which must not match worse than the affine one);
- each label's volume against its atlas region's, scaled by the registration's change of volume.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


# Found volume / expected volume beyond which a label is implausible. On validation subjects (Colin27 under the
# training generator's warps, other seeds and grids; the demo model, all 116 labels) the ratios spanned 0.83-1.08
# (3 subjects, affine) and 0.57-1.68 (2 subjects, deformable); the limits leave a factor of about 3 beyond them.
PLAUSIBLE = (0.2, 5.0)
# Alignment (normalized mutual information, 1 = unrelated) below which the affine registration failed. Validation
# subjects (the training generator, 6 seeds at 1x and 6 at 1.5x its deformation; noise, bias, blur, skull strip)
# scored 1.019-1.044; heads turned upside down or front to back under --registration none, a cylinder of noise and a
# 12-slice slab 1.004-1.013: the limit lies between. A thin margin: see docs/results.md, "Plausibility check".
MIN_ALIGNMENT = 1.015
LOW_VALIDATION_DICE = 0.1  # a model whose own validation Dice is below this is barely trained


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
    return f"implausible volume: {found_ml / expected_ml:.2g}x the atlas's"


def registration_check(affine: float, deformable: float | None = None) -> str:
    """What looks wrong with a registration, from its alignment after the affine step and with the deformable prior;
    '' when nothing does. On every validation subject the deformable prior matched better (1.16-1.22 against
    1.03-1.04 after the affine step); one that matches worse has gone astray."""
    if affine < MIN_ALIGNMENT:
        return (f"the scan does not match the atlas after registration (alignment {affine:.3f}, heads score "
                f">= {MIN_ALIGNMENT}): the registration failed, or this is not a head")
    if deformable is not None and deformable < affine:
        return (f"the deformable prior matches the scan worse than the affine step (alignment {deformable:.3f} < "
                f"{affine:.3f}): use --registration affine")
    return ""


def describe(check: str, rows: Sequence[dict], shown: int = 3) -> str:
    """A registration check (registration_check) and the flagged rows of Segmentation.volumes() in words: "...; 2
    label volumes implausible (Hippocampus_L 12x, Amygdala_R 0.05x the atlas's)"; '' when nothing is flagged."""
    flagged = sorted((r for r in rows if "implausible volume" in r["flag"]),
                     key=lambda r: -abs(np.log(max(r["volume_ml"], 1e-6) / r["atlas_ml"])))
    listed = ", ".join(f"{r['name']} {r['volume_ml'] / r['atlas_ml']:.2g}x" for r in flagged[:shown])
    volumes = f"{len(flagged)} label volumes implausible ({listed}{', ...' if len(flagged) > shown else ''} the atlas's)"
    return "; ".join(filter(None, (check, volumes if flagged else "")))


def alignment(image: np.ndarray, atlas_image: np.ndarray, mask: np.ndarray, bins: int = 32) -> float:
    """How well a registered scan matches the atlas inside the atlas's brain mask: normalized mutual information of
    the two (both normalized to 0..1 on the model grid), from 1 (unrelated) to 2 (one determines the other). Mutual
    information does not assume the atlas's contrast, so a T2 head that lies right scores like a T1 head."""
    joint, _, _ = np.histogram2d(image[mask], atlas_image[mask], bins=bins, range=[[0, 1], [0, 1]])
    p = joint / max(joint.sum(), 1)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())
    joint_entropy = entropy(p)
    return (entropy(p.sum(0)) + entropy(p.sum(1))) / joint_entropy if joint_entropy > 0 else 1.0
