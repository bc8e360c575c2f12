"""Overlap metrics from SimpleITK, per label."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import SimpleITK as sitk


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
