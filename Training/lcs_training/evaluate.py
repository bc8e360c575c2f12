"""`lcs evaluate`: a checkpoint against atlas registration (and multi-channel baselines) on held-out subjects.

Held-out subjects come from other seeds, stronger deformations than training, and other
grids (spacing, axis order, field of view); with `--unlike`, from a second generator whose
every setting lies outside training's (synth.unlike_subject), to see how far a model
generalizes. Every method starts from the same affine
registration, so the comparison isolates what each adds to it. Per label and case: Dice,
95th-percentile Hausdorff distance (mm) and volume difference (%).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from LabelConditionedSegLib.progress import progress_bar

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.files import write_csv
from LabelConditionedSegLib.geometry import labels_to_input, to_input_grid
from LabelConditionedSegLib.pipeline import Segmenter, model_input

from .baseline import segment_multichannel
from .data import case_files, mask_from_image, write_colin27_aal
from .metrics import label_metrics
from .plots import plot_method_dice
from .propagation import bspline_propagate
from .synth import Strength, SubjectGenerator, random_grid, unlike_subject

FIELDS = ["subject", "method", "value", "name", "dice", "hd95_mm", "volume_diff_pct"]


def heldout_subjects(data: Path, atlas: str, count: int, strength: float, seed: int, unlike: bool = False):
    """(image, truth) pairs on random grids (0.9-1.6x the source spacing), from the data folder's atlas case; or
    the second generator's, unlike training's in every setting (`strength` is then unused)."""
    image_path, label_path, mask_path = case_files(data)[atlas]
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_image(image)
    generator = SubjectGenerator(image, labels, mask)
    for i in range(count):
        if unlike:
            yield unlike_subject(generator, np.random.default_rng([seed, 30_000 + i]))
        else:
            rng = np.random.default_rng([seed, 20_000 + i])
            grid = random_grid(image, rng, spacing_range=(0.9 * min(image.GetSpacing()), 1.6 * min(image.GetSpacing())))
            yield generator.sample(rng, Strength().times(strength), grid=grid)


def evaluate(checkpoint_path: Path, data: Path, atlas: str, count: int, strength: float, seed: int, out: Path,
             device: str = "auto", baselines: list[Path] = (), bspline: bool = False, unlike: bool = False
             ) -> dict[str, float]:
    """Mean Dice per method over labels and subjects (and seconds per case); writes CSV and PNGs to `out`.

    Methods: "lcs", "affine propagation", "bspline propagation" (when asked), and "baseline" made of one or
    more multi-channel checkpoints, each label scored by the baseline model that holds it. A checkpoint trained on
    deformable priors is also scored with them ("lcs deformable", its own registration included in its seconds),
    beside the prior alone ("deformable propagation": the atlas labels warped by the same registration).
    """
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.load(checkpoint_path)
    segmenter = Segmenter(checkpoint, device)
    table = checkpoint.label_table
    conditions = segmenter.conditions([str(v) for v in table.values])
    baseline_models = [Checkpoint.load(p) for p in baselines]
    for b in baseline_models:
        if b.config.conditioned:
            raise SystemExit(f"--baseline wants multi-channel baseline checkpoints (lcs train --baseline), not {b.description}")
    atlas_labels = sitk.ReadImage(str(case_files(data)[atlas][1]))
    rows, seconds = [], {}
    for i, (image, truth) in enumerate(progress_bar(heldout_subjects(data, atlas, count, strength, seed, unlike), total=count, desc="held-out subjects")):
        truth_array = sitk.GetArrayFromImage(truth)
        predictions = {}
        start = time.time()
        prepared = segmenter.prepare(image)
        registered = time.time() - start
        predictions["lcs"] = segmenter.segment(prepared, conditions).labelmap
        seconds.setdefault("lcs", []).append(time.time() - start)
        if "deformable" in checkpoint.priors:
            start = time.time()
            warped = segmenter.prepare(image, "deformable")
            prepared_in = time.time() - start  # the registrations and the encoding
            predictions["lcs deformable"] = segmenter.segment(warped, conditions).labelmap
            seconds.setdefault("lcs deformable", []).append(time.time() - start)
            start = time.time()
            labels = sitk.Resample(checkpoint.atlas_labels, checkpoint.atlas_image, warped.prior.field,
                                   sitk.sitkNearestNeighbor, 0)
            predictions["deformable propagation"] = labels_to_input(labels, image, warped.transform)
            seconds.setdefault("deformable propagation", []).append(time.time() - start + prepared_in)
        start = time.time()
        predictions["affine propagation"] = to_input_grid(atlas_labels, image, prepared.transform)
        seconds.setdefault("affine propagation", []).append(time.time() - start + registered)
        if bspline:
            start = time.time()
            predictions["bspline propagation"] = bspline_propagate(image, checkpoint.atlas_image, atlas_labels,
                                                                   prepared.transform, checkpoint.atlas_mask)
            seconds.setdefault("bspline propagation", []).append(time.time() - start + registered)
        if baseline_models:
            start = time.time()
            predictions["baseline"] = [(b, _baseline_labels(b, prepared, segmenter.device)) for b in baseline_models]
            seconds.setdefault("baseline", []).append(time.time() - start + registered)
        spacing = image.GetSpacing()[::-1]
        for method, prediction in predictions.items():
            parts = prediction if method == "baseline" else [(checkpoint, prediction)]
            for model, labelmap in parts:
                values = [v for v in model.label_table.values if v in set(table.values)]
                for value, m in label_metrics(sitk.GetArrayFromImage(labelmap), truth_array, values, spacing).items():
                    rows.append({"subject": i, "method": method, "value": value, "name": table.get(value).name,
                                 **{k: round(v, 4) for k, v in m.items()}})
    write_csv(rows, out / "heldout_metrics.csv", FIELDS)
    methods = list(seconds)
    summary = {m: float(np.mean([r["dice"] for r in rows if r["method"] == m])) for m in methods}
    summary.update({f"{m} hd95": float(np.nanmean([r["hd95_mm"] for r in rows if r["method"] == m])) for m in methods})
    summary.update({f"{m} seconds": float(np.mean(s)) for m, s in seconds.items()})
    order = ["affine propagation"] + [m for m in methods if m != "affine propagation"]
    plot_method_dice(rows, order, summary, out / "heldout_dice.png")
    plot_method_dice(rows, order, {m: summary[f"{m} hd95"] for m in order}, out / "heldout_hd95.png", metric="hd95_mm")
    return summary


def _baseline_labels(model: Checkpoint, prepared, device: str) -> sitk.Image:
    """A multi-channel baseline's label map on the input grid, from the same registration as LCS."""
    image = model_input(model, prepared.reference, prepared.transform)
    labels = sitk.GetImageFromArray(segment_multichannel(model.build_model(), image, model.label_table.values, device))
    labels.CopyInformation(model.atlas_image)
    return labels_to_input(labels, prepared.reference, prepared.transform)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="LCS model (.lcs) to score")
    parser.add_argument("--data", type=Path, help="training-style folder holding the source case (default: Colin27 + AAL)")
    parser.add_argument("--atlas", default="colin27", help="case of --data to generate held-out subjects from")
    parser.add_argument("--subjects", type=int, default=6, help="held-out subjects to generate and segment")
    parser.add_argument("--strength", type=float, default=1.5, help="deformation strength relative to training")
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out subjects (training uses others)")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="multi-channel baseline checkpoints (lcs train --baseline) to score beside LCS")
    parser.add_argument("--bspline", action="store_true", help="also score affine + B-spline atlas propagation (slower)")
    parser.add_argument("--unlike", action="store_true",
                        help="subjects of a second generator unlike training's in every setting (B-spline warps, coarse "
                             "grids, contrast curves, strong bias, thick slices, Rician noise; --strength unused)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, default=Path("build/evaluate"),
                        help="folder for heldout_metrics.csv, heldout_dice.png and heldout_hd95.png")


def run(args: argparse.Namespace) -> None:
    from .data import check_data; check_data(args.data, args.atlas)  # --data checked whole, else the templates
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_colin27_aal(Path(tmp) / "colin27")
        s = evaluate(args.checkpoint, data, args.atlas, args.subjects, args.strength, args.seed, args.out, args.device,
                     args.baseline, args.bspline, args.unlike)
    methods = [k for k in s if not k.endswith((" seconds", " hd95"))]
    kind = "unlike training's" if args.unlike else f"strength {args.strength}"
    print(f"held-out subjects: {args.subjects}, {kind}; per label and case in "
          f"{args.out}/heldout_metrics.csv, plots heldout_dice.png and heldout_hd95.png")
    for m in methods:
        print(f"  {m:20s} mean Dice {s[m]:.3f}  HD95 {s[m + ' hd95']:.1f} mm  {s[m + ' seconds']:.1f} s/case")
    print(" ".join(f"{m.replace(' ', '_')}_dice={s[m]:.4f}" for m in methods) + f" subjects={args.subjects}")
