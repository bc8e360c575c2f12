"""Per-label metrics: Dice (SimpleITK), 95th-percentile Hausdorff distance (MONAI), volume difference."""
from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_hausdorff_distance

from LabelConditionedSegLib.geometry import bounding_box


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, values: Iterable[int]) -> dict[int, float]:
    """Dice of each label value present in the truth or the prediction (absent from both: left out)."""
    pred, gt = sitk.GetImageFromArray(prediction.astype(np.int32)), sitk.GetImageFromArray(truth.astype(np.int32))
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(gt, pred)
    present = set(np.unique(prediction)) | set(np.unique(truth))
    out = {}
    for v in values:
        if v in present:
            out[int(v)] = measures.GetDiceCoefficient(int(v)) if v in set(np.unique(truth)) and v in set(np.unique(prediction)) else 0.0
    return out


def label_metrics(prediction: np.ndarray, truth: np.ndarray, values: Iterable[int],
                  spacing_zyx: Sequence[float]) -> dict[int, dict[str, float]]:
    """For each label in the truth: Dice, HD95 in mm (NaN when nothing was predicted), the true and predicted volumes
    in mL and the predicted volume's difference from the true one in percent."""
    dice = dice_per_label(prediction, truth, values)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    out = {}
    for v in values:
        gt = truth == v
        if not gt.any():
            continue
        pred = prediction == v
        hd95 = float("nan")
        if pred.any():
            lo, hi = bounding_box(gt | pred)
            lo, hi = np.maximum(np.array(lo) - 1, 0), np.array(hi) + 1  # room for the border of each mask
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            with warnings.catch_warnings():  # MONAI warns about its own internal arguments
                warnings.simplefilter("ignore", FutureWarning)
                hd95 = float(compute_hausdorff_distance(torch.from_numpy(pred[box])[None, None],
                                                        torch.from_numpy(gt[box])[None, None], include_background=True,
                                                        percentile=95, spacing=list(spacing_zyx)))
        out[int(v)] = {"dice": dice[int(v)], "hd95_mm": hd95, "truth_ml": float(gt.sum()) * voxel_ml,
                       "predicted_ml": float(pred.sum()) * voxel_ml, "volume_diff_pct": 100.0 * (float(pred.sum()) - float(gt.sum())) / float(gt.sum())}
    return out
