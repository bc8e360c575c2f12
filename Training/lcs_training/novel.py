"""Novel fine-grained labels (paper Table 1): a model trained on coarse labels, conditioned on their unseen parts.

The fine parts are drawn on the atlas (here: the original AAL labels that the coarse training set merged)
and given to the model as masks, exactly as a user paints a new sub-region in Slicer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from LabelConditionedSegLib.progress import progress_bar

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.geometry import to_input_grid
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.pipeline import Segmenter

from .data import case_files
from .evaluate import heldout_subjects
from .metrics import dice_per_label

# Coarse AAL labels made by merging gyri that the paper's Table 1 also splits: inferior frontal, cingulate, temporal.
AAL_GROUPS = {f"{coarse}_{side}": [f"{part}_{side}" for part in parts] for side in "LR" for coarse, parts in {
    "Frontal_Inf": ["Frontal_Inf_Oper", "Frontal_Inf_Tri", "Frontal_Inf_Orb"],
    "Cingulum": ["Cingulum_Ant", "Cingulum_Mid", "Cingulum_Post"],
    "Temporal": ["Temporal_Sup", "Temporal_Mid", "Temporal_Inf"]}.items()}


def score_fine_labels(checkpoint_path: Path, fine_data: Path, atlas: str, groups: dict[str, list[str]], count: int,
                      strength: float, seed: int, device: str = "auto") -> list[dict]:
    """Per fine label, mean over held-out subjects: the coarse label's Dice, the naive Dice (coarse prediction
    against the fine truth), the fine Dice (conditioned on the unseen fine atlas mask) and affine propagation's."""
    checkpoint = Checkpoint.load(checkpoint_path)
    segmenter = Segmenter(checkpoint, device)
    fine_table = LabelTable.read_csv(fine_data / "labels.csv")
    fine_atlas = sitk.ReadImage(str(case_files(fine_data)[atlas][1]))
    fine = [fine_table.resolve(part) for parts in groups.values() for part in parts]
    coarse_conditions = segmenter.conditions(list(groups))
    fine_conditions = segmenter.conditions(masks=[(l.name, fine_atlas == l.value, l.color) for l in fine])
    fine_value = {l.value: c.value for l, c in zip(fine, fine_conditions)}  # mask conditions get values of their own
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    for image, truth in progress_bar(heldout_subjects(fine_data, atlas, count, strength, seed), total=count, desc="held-out subjects"):
        prepared = segmenter.prepare(image)
        coarse_prediction = sitk.GetArrayFromImage(segmenter.segment(prepared, coarse_conditions).labelmap)
        fine_prediction = sitk.GetArrayFromImage(segmenter.segment(prepared, fine_conditions).labelmap)
        propagated = sitk.GetArrayFromImage(to_input_grid(fine_atlas, image, prepared.transform))
        truth_array = sitk.GetArrayFromImage(truth)
        for condition, parts in zip(coarse_conditions, groups.values()):
            coarse_mask = coarse_prediction == condition.value
            coarse_truth = np.isin(truth_array, [fine_table.resolve(p).value for p in parts])
            for part in parts:
                value = fine_table.resolve(part).value
                part_truth = truth_array == value
                s = scores.setdefault((condition.name, part), {})
                s.setdefault("coarse_dice", []).append(_dice(coarse_mask, coarse_truth))
                s.setdefault("naive_dice", []).append(_dice(coarse_mask, part_truth))
                s.setdefault("fine_dice", []).append(_dice(fine_prediction == fine_value[value], part_truth))
                s.setdefault("propagation_dice", []).append(_dice(propagated == value, part_truth))
    return [{"coarse_label": coarse, "fine_label": part, **{k: round(float(np.mean(v)), 4) for k, v in s.items()}}
            for (coarse, part), s in scores.items()]


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    return dice_per_label(prediction.astype(np.uint8), truth.astype(np.uint8), [1]).get(1, 0.0)
