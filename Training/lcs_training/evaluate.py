"""`lcs evaluate`: a checkpoint against atlas registration on held-out synthetic subjects.

Held-out subjects come from other seeds, stronger deformations than training, and other
grids (spacing, axis order, field of view). Both methods share the same affine
registration, so the comparison isolates what the network adds to label propagation.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.geometry import to_input_grid
from LabelConditionedSegLib.pipeline import Segmenter

from .data import case_files, write_colin27_aal
from .metrics import dice_per_label
from .plots import plot_method_dice
from .synth import Strength, SubjectGenerator, random_grid


def heldout_subjects(data: Path, atlas: str, count: int, strength: float, seed: int):
    """(image, truth) pairs at full resolution on random grids, from the data folder's atlas case."""
    image_path, label_path, mask_path = case_files(data)[atlas]
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    mask = sitk.ReadImage(str(mask_path)) if mask_path else sitk.Cast(labels > 0, sitk.sitkUInt8)
    generator = SubjectGenerator(image, labels, mask)
    for i in range(count):
        rng = np.random.default_rng([seed, 20_000 + i])
        grid = random_grid(image, rng)
        yield generator.sample(rng, Strength().times(strength), grid=grid)


def evaluate(checkpoint_path: Path, data: Path, atlas: str, count: int, strength: float, seed: int, out: Path,
             device: str = "auto") -> dict[str, float]:
    """Mean Dice over labels and subjects for LCS and for affine label propagation; writes CSV and PNG."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.load(checkpoint_path)
    segmenter = Segmenter(checkpoint, device)
    table = checkpoint.label_table
    conditions = segmenter.conditions([str(v) for v in table.values])
    atlas_labels = sitk.ReadImage(str(case_files(data)[atlas][1]))
    rows, seconds = [], {"lcs": [], "propagation": []}
    for i, (image, truth) in enumerate(tqdm(heldout_subjects(data, atlas, count, strength, seed), total=count, desc="held-out subjects")):
        truth_array = sitk.GetArrayFromImage(truth)
        start = time.time()
        prepared = segmenter.prepare(image)
        registered = time.time() - start
        lcs = sitk.GetArrayFromImage(segmenter.segment(prepared, conditions))
        seconds["lcs"].append(time.time() - start)
        start = time.time()
        propagated = sitk.GetArrayFromImage(to_input_grid(atlas_labels, image, prepared.transform))
        seconds["propagation"].append(time.time() - start + registered)
        for method, prediction in (("lcs", lcs), ("propagation", propagated)):
            for value, dice in dice_per_label(prediction, truth_array, table.values).items():
                if value in set(np.unique(truth_array)):
                    rows.append({"subject": i, "method": method, "value": value, "name": table.get(value).name, "dice": round(dice, 4)})
    with open(out / "heldout_dice.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["subject", "method", "value", "name", "dice"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {m: float(np.mean([r["dice"] for r in rows if r["method"] == m])) for m in ("lcs", "propagation")}
    summary.update({f"{m}_seconds": float(np.mean(s)) for m, s in seconds.items()})
    plot_method_dice(rows, ("propagation", "lcs"), summary, out / "heldout_dice.png")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    parser.add_argument("--data", type=Path, help="training-style folder holding the source case (default: Colin27 + AAL)")
    parser.add_argument("--atlas", default="colin27", help="case of --data to generate held-out subjects from")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--strength", type=float, default=1.5, help="deformation strength relative to training (default 1.5)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("build/evaluate"))


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_colin27_aal(Path(tmp) / "colin27")
        s = evaluate(args.checkpoint, data, args.atlas, args.subjects, args.strength, args.seed, args.out, args.device)
    print(f"held-out subjects: {args.subjects}, strength {args.strength}; per-label Dice in {args.out}/heldout_dice.csv, plot heldout_dice.png")
    print(f"mean Dice  LCS {s['lcs']:.3f} ({s['lcs_seconds']:.1f} s/case)  affine propagation {s['propagation']:.3f} "
          f"({s['propagation_seconds']:.1f} s/case)")
    print(f"lcs_dice={s['lcs']:.4f} propagation_dice={s['propagation']:.4f} subjects={args.subjects}")
