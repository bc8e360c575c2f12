"""Plausibility of a result: label volumes against the atlas's.

A scan the model cannot handle (a failed registration, not a head, a barely trained model) tends to give labels
many times larger or smaller than the atlas's. Each label's volume is compared with its atlas region's, scaled by the
registration's change of volume (the scan's head may be larger or smaller than the atlas's); a label outside the
range seen on validation subjects is flagged, and the run says so instead of a clean "segmented N of N".
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk


# Found volume / expected volume beyond which a label is implausible. On 3 validation subjects (Colin27 under the
# training generator's warps, other seeds and grids; the demo model, all 116 labels, affine registration) the ratios
# spanned VALIDATION_RANGE; the limits leave a factor 2 beyond them (docs/results.md, "Plausibility check").
VALIDATION_RANGE = (0.25, 2.5)
PLAUSIBLE = (0.2, 5.0)
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


def describe(rows: Sequence[dict], shown: int = 3) -> str:
    """The flagged rows of Segmentation.volumes() in words: "2 label volumes implausible (Hippocampus_L 12x, Amygdala_R
    0.05x the atlas's)"; '' when none is flagged."""
    flagged = sorted((r for r in rows if r["flag"]), key=lambda r: -abs(np.log(max(r["volume_ml"], 1e-6) / r["atlas_ml"])))
    if not flagged:
        return ""
    listed = ", ".join(f"{r['name']} {r['volume_ml'] / r['atlas_ml']:.2g}x" for r in flagged[:shown])
    return f"{len(flagged)} label volumes implausible ({listed}{', ...' if len(flagged) > shown else ''} the atlas's)"


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
