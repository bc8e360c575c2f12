"""SMILE (Petit, Thome and Soler 2018): learning from cases that annotate only some labels.

For label k, a case that annotates k teaches it at every voxel. A case that does not teaches it only where the
case labels something (another label, so certainly not k, or voxels of k added by relabeling); every other voxel
is ignored, so an organ nobody drew in that case is never taught as background.
"""
from __future__ import annotations

import numpy as np
import torch
from monai.losses import DiceLoss


def smile_weight(labels: np.ndarray, annotated: bool) -> np.ndarray:
    """The weight map w_k of one label in one case: 1 where the voxel teaches label k, 0 where it is ignored."""
    return np.ones(labels.shape, np.float32) if annotated else (labels > 0).astype(np.float32)


def masked_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Soft Dice per sample and channel over the voxels of weight 1, averaged over the (sample, channel) pairs that
    have any. With every weight 1 it is MONAI's DiceLoss(sigmoid=True)."""
    dice = DiceLoss(reduction="none")(torch.sigmoid(logits) * weight, target * weight).flatten(1)
    used = weight.flatten(2).amax(2) > 0
    return dice[used].mean() if used.any() else (logits * 0).sum()


def masked_bce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the voxels of weight 1 (0 when there are none)."""
    total = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
    return total / weight.sum().clamp(min=1)
