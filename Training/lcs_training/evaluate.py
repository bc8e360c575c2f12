"""`lcs evaluate`: a checkpoint against atlas registration (and multi-channel baselines), on synthetic held-out
subjects or on a folder of real labelled test scans (`--folder`).

Held-out subjects come from other seeds, stronger deformations than training, and other
grids (spacing, axis order, field of view); with `--unlike`, from a second generator whose
every setting lies outside training's (synth.unlike_subject), to see how far a model
generalizes; with `--contrasts`, the same subjects as other MRI sequences show them (contrasts.py), each
method scored per contrast. Test scans are the lab's own: a folder in the training layout, no warping.
Every method starts from the same registration, so the comparison isolates what each adds
to it. Per label and case: Dice, 95th-percentile Hausdorff distance (mm), true and predicted
volumes (mL), volume difference (%) and the method's seconds on the case.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.files import write_csv
from LabelConditionedSegLib.geometry import labels_to_input, to_input_grid
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.pipeline import Prepared, Segmenter, model_input
from LabelConditionedSegLib.progress import progress_bar
from LabelConditionedSegLib.training_folder import read_annotated
from LabelConditionedSegLib.volume import label_values, read_image, read_volume

from .baseline import segment_multichannel
from .contrasts import CONTRASTS, contrast_heads, contrast_subjects, parse_contrasts
from .data import case_files, check_training_folder, read_table, write_colin27_aal
from .metrics import label_metrics
from .plots import plot_contrast_dice, plot_contrast_slices, plot_dice_seconds, plot_method_dice
from .propagation import ants_propagate, bspline_propagate, require_ants
from .synth import Strength, SubjectGenerator, random_grid

FIELDS = ["subject", "contrast", "method", "value", "name", "dice", "hd95_mm", "truth_ml", "predicted_ml", "volume_diff_pct",
          "seconds"]
CHECK_FIELDS = ["subject", "contrast", "registration", "coverage", "alignment", "edges", "mirror_ratio",
                "deformable_alignment", "check"]
# Subject i of a kind is drawn from the seeds [--seed, stream + i]. Held-out subjects are a test set that never picks
# anything; settings and thresholds are chosen on the validation streams (--validation), which share no seed with
# them nor with training's validation ([seed, 10000]).
ANTS = "ants syn propagation"  # the baseline users run instead (--ants)
HELDOUT_STREAMS = {"like": 20_000, "unlike": 30_000}
VALIDATION_STREAMS = {"like": 40_000, "unlike": 50_000}
# What the atlas labels are propagated with, after each registration of `lcs segment --registration`.
PROPAGATION = {"affine": "affine propagation", "deformable": "affine propagation", "rigid": "rigid propagation",
               "none": "unregistered atlas labels"}


def heldout_subjects(data: Path, atlas: str, count: int, strength: float, seed: int, unlike: bool = False,
                     streams: dict[str, int] = HELDOUT_STREAMS):
    """(image, truth) pairs on random grids (0.9-1.6x the source spacing), from the data folder's atlas case; or
    the second generator's, unlike training's in every setting (`strength` is then unused). `streams`:
    VALIDATION_STREAMS gives validation subjects of the same kinds instead."""
    if unlike:
        subjects = contrast_subjects(*contrast_heads(data, atlas, ["t1"]), count, seed, streams["unlike"])
        yield from ((image, truth) for _, image, truth in subjects)
        return
    heads, labels, mask = contrast_heads(data, atlas, ["t1"])
    image = heads["t1"]
    generator = SubjectGenerator(image, labels, mask)
    for i in range(count):
        rng = np.random.default_rng([seed, streams["like"] + i])
        grid = random_grid(image, rng, spacing_range=(0.9 * min(image.GetSpacing()), 1.6 * min(image.GetSpacing())))
        yield generator.sample(rng, Strength().times(strength), grid=grid)


def say(line: str) -> None:
    """A notice for the user on stderr, as lcs segment gives them."""
    print(f"lcs: {line}", file=sys.stderr)


class Scoring:
    """Every method run on one case after another and scored against its truth: the one path of the synthetic
    subjects and of a folder of test scans.

    Methods: "lcs" (segmented as `lcs segment --registration` does), the atlas labels propagated by the same
    registration ("affine propagation"), "bspline propagation" and "ants syn propagation" (ANTs SyN from scratch,
    its own affine included in its seconds) when asked, and "baseline" made of one or more
    multi-channel checkpoints, each label scored by the baseline model that holds it. A checkpoint trained on
    deformable priors is also scored with them ("lcs deformable", its own registration included in its seconds),
    beside the prior alone ("deformable propagation": the atlas labels warped by the same registration).
    """

    def __init__(self, checkpoint: Checkpoint, device: str, atlas_labels: sitk.Image, values: list[int],
                 registration: str = "affine", bspline: bool = False, baselines: list[Path] = (), ants: bool = False):
        self.checkpoint, self.atlas_labels, self.registration, self.bspline = checkpoint, atlas_labels, registration, bspline
        if ants:
            require_ants()  # refused before any case is made when antspyx is missing
        self.ants = ants
        self.segmenter = Segmenter(checkpoint, device, messages=say)  # notices lcs segment gives, e.g. on its prior
        self.conditions = self.segmenter.conditions([str(v) for v in values])
        self.baselines = [Checkpoint.load(p) for p in baselines]
        for b in self.baselines:
            if b.config.conditioned:
                raise LCSError(f"--baseline wants multi-channel baseline checkpoints (lcs train --baseline), not {b.description}")
        self.rows: list[dict] = []
        self.seconds: dict[tuple[str, str], list[float]] = {}  # (contrast, method) -> seconds per case
        self.checks: list[dict] = []  # each registration's plausibility check (quality.Match), as lcs segment's
        self.examples: dict[str, sitk.Image] = {}  # the first image of each contrast

    def score(self, case: str | int, image: sitk.Image, truth: np.ndarray, values: list[int], contrast: str = ""
              ) -> None:
        """Rows for each method and each of `values` (label values of the checkpoint) that `truth` holds; `truth` lies
        on `image`'s grid, which shows the sequence `contrast` ("" where it is not known)."""
        predictions, seconds, prepared = self._predict(image)
        self.examples.setdefault(contrast, image)
        for registration, p in prepared.items():
            m = p.match
            self.checks.append({"subject": case, "contrast": contrast, "registration": registration,
                                "coverage": round(m.coverage, 4), "alignment": round(m.alignment, 4),
                                "edges": round(m.edges, 4), "mirror_ratio": round(m.mirror, 4), "check": p.check,
                                "deformable_alignment": "" if m.deformable is None else round(m.deformable, 4)})
        spacing = image.GetSpacing()[::-1]
        for method, prediction in predictions.items():
            self.seconds.setdefault((contrast, method), []).append(seconds[method])
            parts = prediction if method == "baseline" else [(self.checkpoint, prediction)]
            for model, labelmap in parts:
                held = [v for v in model.label_table.values if v in set(values)]
                for value, m in label_metrics(sitk.GetArrayFromImage(labelmap), truth, held, spacing).items():
                    self.rows.append({"subject": case, "contrast": contrast, "method": method, "value": value,
                                      "name": self.checkpoint.label_table.get(value).name,
                                      **{k: round(v, 4) for k, v in m.items()}, "seconds": round(seconds[method], 2)})

    def _predict(self, image: sitk.Image) -> tuple[dict, dict[str, float], dict[str, Prepared]]:
        """Each method's label map on the image's grid (the baseline's: (model, label map) pairs), its seconds, and
        the registrations made (by mode)."""
        segmenter, predictions, seconds = self.segmenter, {}, {}
        start = time.time()
        prepared = segmenter.prepare(image, self.registration)
        registered = time.time() - start
        predictions["lcs"] = segmenter.segment(prepared, self.conditions).labelmap
        seconds["lcs"] = time.time() - start
        warped, warped_in = (prepared, registered) if prepared.prior is not None else (None, 0.0)
        if warped is None and "deformable" in self.checkpoint.priors:
            start = time.time()
            warped = segmenter.prepare(image, "deformable")
            warped_in = time.time() - start  # the registrations and the encoding
            predictions["lcs deformable"] = segmenter.segment(warped, self.conditions).labelmap
            seconds["lcs deformable"] = time.time() - start
        if warped is not None:
            start = time.time()
            labels = sitk.Resample(self.checkpoint.atlas_labels, self.checkpoint.atlas_image, warped.prior.field,
                                   sitk.sitkNearestNeighbor, 0)
            predictions["deformable propagation"] = labels_to_input(labels, image, warped.transform)
            seconds["deformable propagation"] = time.time() - start + warped_in
        propagation = PROPAGATION[self.registration]
        start = time.time()
        predictions[propagation] = to_input_grid(self.atlas_labels, image, prepared.transform)
        seconds[propagation] = time.time() - start + registered
        if self.bspline:
            start = time.time()
            predictions["bspline propagation"] = bspline_propagate(image, self.checkpoint.atlas_image, self.atlas_labels,
                                                                   prepared.transform, self.checkpoint.atlas_mask, say=say)
            seconds["bspline propagation"] = time.time() - start + registered
        if self.ants:
            start = time.time()
            predictions[ANTS] = ants_propagate(image, self.checkpoint.atlas_image, self.atlas_labels)
            seconds[ANTS] = time.time() - start
        if self.baselines:
            start = time.time()
            predictions["baseline"] = [(b, _baseline_labels(b, prepared, segmenter.device)) for b in self.baselines]
            seconds["baseline"] = time.time() - start + registered
        return predictions, seconds, {self.registration: prepared, **({"deformable": warped} if warped else {})}

    def write(self, out: Path, heads: dict[str, sitk.Image] | None = None) -> dict[str, float]:
        """heldout_metrics.csv and the Dice and HD95 plots in `out`; returns mean Dice, HD95 and seconds per method,
        and the number of cases scored ("cases"). Given the source `heads` of several contrasts: also mean Dice and
        seconds per contrast and method ("t2/lcs", "t2/lcs seconds"), their plot, and a slice of each head and of
        its first subject."""
        rows = self.rows
        methods = list(dict.fromkeys(m for _, m in self.seconds))
        write_csv(rows, out / "heldout_metrics.csv", FIELDS)
        write_csv(self.checks, out / "checks.csv", CHECK_FIELDS)
        summary = {m: float(np.mean([r["dice"] for r in rows if r["method"] == m])) for m in methods}
        summary.update({f"{m} hd95": float(np.nanmean([r["hd95_mm"] for r in rows if r["method"] == m])) for m in methods})
        summary.update({f"{m} seconds": float(np.mean([s for (_, method), times in self.seconds.items()
                                                         if method == m for s in times])) for m in methods})
        summary["cases"] = float(sum(len(times) for (_, m), times in self.seconds.items() if m == "lcs"))
        summary["flagged"] = float(sum(bool(c["check"]) for c in self.checks))
        summary["registrations"] = float(len(self.checks))
        first = PROPAGATION[self.registration]
        order = [first] + [m for m in methods if m != first]
        plot_method_dice(rows, order, summary, out / "heldout_dice.png")
        plot_method_dice(rows, order, {m: summary[f"{m} hd95"] for m in order}, out / "heldout_hd95.png", metric="hd95_mm")
        plot_dice_seconds(rows, order, out / "heldout_seconds.png", halved=ANTS)
        if heads:
            for (contrast, m), times in self.seconds.items():
                summary[f"{contrast}/{m}"] = float(np.mean([r["dice"] for r in rows
                                                            if r["contrast"] == contrast and r["method"] == m]))
                summary[f"{contrast}/{m} seconds"] = float(np.mean(times))
            plot_contrast_dice(rows, order, out / "heldout_contrasts.png")
            plot_contrast_slices({"source head": heads, "subject 0": self.examples}, out / "contrasts.png")
        return summary


def evaluate(checkpoint_path: Path, data: Path, atlas: str, count: int, strength: float, seed: int, out: Path,
             device: str = "auto", baselines: list[Path] = (), bspline: bool = False, unlike: bool = False,
             registration: str = "affine", contrasts: list[str] = (), ants: bool = False,
             streams: dict[str, int] = HELDOUT_STREAMS) -> dict[str, float]:
    """Mean Dice per method (see Scoring) over labels and synthetic held-out subjects (and seconds per case); writes
    CSV and PNGs to `out`. The atlas labels propagated are the data folder's atlas case, at its own resolution.
    `contrasts` (of contrasts.CONTRASTS): `count` subjects of the unlike generator in each, scored per contrast.
    `streams`: VALIDATION_STREAMS scores validation subjects instead of held-out ones."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.load(checkpoint_path)
    values = checkpoint.label_table.values
    scoring = Scoring(checkpoint, device, sitk.ReadImage(str(case_files(data)[atlas][1])), values, registration,
                      bspline, baselines, ants)
    heads = None
    if contrasts:
        heads, labels, mask = contrast_heads(data, atlas, list(contrasts))
        subjects = contrast_subjects(heads, labels, mask, count, seed, streams["unlike"])
    else:
        subjects = (("t1", *subject) for subject in heldout_subjects(data, atlas, count, strength, seed, unlike, streams))
    total = count * max(1, len(contrasts))
    for i, (contrast, image, truth) in enumerate(progress_bar(subjects, total=total, desc="subjects")):
        scoring.score(i % count, image, sitk.GetArrayFromImage(truth), values, contrast)
    return scoring.write(out, heads)


def matched_labels(folder_table: LabelTable, model_table: LabelTable) -> tuple[dict[int, int], list[str]]:
    """Folder label value -> the model's value for the label of the same name (case-insensitive; values are not
    compared, two atlases may number alike labels differently), and the names of the folder's labels the model lacks."""
    by_name = {label.name.lower(): label.value for label in model_table}
    matched = {label.value: by_name[label.name.lower()] for label in folder_table if label.name.lower() in by_name}
    return matched, [label.name for label in folder_table if label.value not in matched]


def evaluate_folder(checkpoint_path: Path, folder: Path, out: Path, device: str = "auto", baselines: list[Path] = (),
                    bspline: bool = False, registration: str = "affine", ants: bool = False) -> dict[str, float]:
    """Mean Dice per method (see Scoring) over the labelled test scans of a training-style folder (and seconds per
    case); writes CSV and PNGs to `out`. Each scan is segmented as `lcs segment` does and scored on its own grid
    against its label map, on the labels it annotates (annotated/CASE.txt, else those its map holds) that the model
    has, matched by name. The atlas labels propagated are the checkpoint's, on its model grid."""
    cases = check_training_folder(folder)
    checkpoint = Checkpoint.load(checkpoint_path)
    table = read_table(folder)
    matched, lacking = matched_labels(table, checkpoint.label_table)
    if not matched:
        raise LCSError(f"no label of {folder}/labels.csv is a label of {checkpoint.description} (matched by name); "
                       "name the labels as 'lcs labels' lists them")
    if lacking:
        say(f"{len(lacking)} label{'s' * (len(lacking) > 1)} of {folder}/labels.csv not in the model, not scored: "
            + ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else ""))
    scored = {}  # case -> the folder's label values to score there
    for name, (_, label_path, _) in cases.items():
        annotated = read_annotated(folder, name, table)
        held = label_values(_read_labels(name, label_path))
        scored[name] = [v for v in (held if annotated is None else annotated) if v in matched and v in held]
        if not scored[name]:
            say(f"case {name}: its label map holds no label of the model that it annotates; not scored")
    if not any(scored.values()):
        raise LCSError(f"no case of {folder} holds a label of the model to score; check the label maps and labels.csv")
    out.mkdir(parents=True, exist_ok=True)
    scoring = Scoring(checkpoint, device, checkpoint.atlas_labels, sorted({matched[v] for v in matched}), registration,
                      bspline, baselines, ants)
    for name in progress_bar([n for n in cases if scored[n]], desc="test scans"):
        image_path, label_path, _ = cases[name]
        labels = sitk.GetArrayFromImage(_read_labels(name, label_path))
        truth = np.zeros(labels.shape, np.int32)
        for value in scored[name]:
            truth[labels == value] = matched[value]
        scoring.score(name, read_volume(image_path), truth, [matched[v] for v in scored[name]])
    return scoring.write(out)


def _read_labels(case: str, path: Path) -> sitk.Image:
    """A test case's label map (a file or a DICOM folder), already checked with its folder."""
    return read_image(path, f"case {case}: labels/{path.name}", messages=lambda message: None)


def _baseline_labels(model: Checkpoint, prepared, device: str) -> sitk.Image:
    """A multi-channel baseline's label map on the input grid, from the same registration as LCS."""
    image = model_input(model, prepared.reference, prepared.transform)
    labels = sitk.GetImageFromArray(segment_multichannel(model.build_model(), image, model.label_table.values, device))
    labels.CopyInformation(model.atlas_image)
    return labels_to_input(labels, prepared.reference, prepared.transform)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="LCS model (.lcs) to score")
    parser.add_argument("--folder", type=Path, help="score the real labelled test scans of this folder, in the "
                        "training layout (labels.csv, images/CASE, labels/CASE, optional annotated/CASE.txt), instead "
                        "of synthetic subjects; labels are matched to the model's by name")
    parser.add_argument("--data", type=Path, help="training-style folder holding the source case (default: Colin27 + AAL)")
    parser.add_argument("--atlas", default="colin27", help="case of --data to generate held-out subjects from")
    parser.add_argument("--subjects", type=int, default=6, help="held-out subjects to generate and segment")
    parser.add_argument("--strength", type=float, default=1.5, help="deformation strength relative to training")
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out subjects (training uses others)")
    parser.add_argument("--baseline", type=Path, nargs="+", default=[],
                        help="multi-channel baseline checkpoints (lcs train --baseline) to score beside LCS")
    parser.add_argument("--bspline", action="store_true", help="also score affine + B-spline atlas propagation (slower)")
    parser.add_argument("--ants", action="store_true", help="also score ANTs SyN atlas propagation (30-80 s a case on "
                        "2 cores; needs antspyx: pip install antspyx)")
    parser.add_argument("--unlike", action="store_true",
                        help="subjects of a second generator unlike training's in every setting (B-spline warps, coarse "
                             "grids, contrast curves, strong bias, thick slices, Rician noise; --strength unused)")
    parser.add_argument("--contrasts", type=parse_contrasts, default=[], metavar="LIST",
                        help=f"the --unlike subjects (implied) as these sequences show them, --subjects of each, scored "
                             f"per contrast: a comma-separated list of {', '.join(CONTRASTS)}")
    parser.add_argument("--validation", action="store_true",
                        help="score validation subjects of the same kind (other seeds) instead of the held-out ones: "
                             "choose settings and thresholds on these, and report the held-out figures")
    parser.add_argument("--registration", default="affine", choices=list(PROPAGATION),
                        help="registration of 'lcs' and of the atlas propagation, as in lcs segment")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, default=Path("build/evaluate"),
                        help="folder for heldout_metrics.csv, checks.csv and the plots")


def run(args: argparse.Namespace) -> None:
    if args.folder is not None:
        if args.data is not None or args.unlike or args.contrasts or args.validation:
            raise LCSError("--folder scores real test scans; --data, --unlike, --contrasts and --validation are for "
                           "synthetic subjects: drop them")
        s = evaluate_folder(args.checkpoint, args.folder, args.out, args.device, args.baseline, args.bspline,
                            args.registration, args.ants)
        what, count = f"test scans of {args.folder}: {s['cases']:.0f} scored", f"cases={s['cases']:.0f}"
    else:
        from .data import check_data; check_data(args.data, args.atlas)  # --data checked whole, else the templates
        with tempfile.TemporaryDirectory() as tmp:
            data = args.data or write_colin27_aal(Path(tmp) / "colin27")
            s = evaluate(args.checkpoint, data, args.atlas, args.subjects, args.strength, args.seed, args.out,
                         args.device, args.baseline, args.bspline, args.unlike, args.registration, args.contrasts,
                         args.ants, VALIDATION_STREAMS if args.validation else HELDOUT_STREAMS)
        kind = "unlike training's" if args.unlike or args.contrasts else f"strength {args.strength}"
        if args.contrasts:
            kind += f", each as {', '.join(args.contrasts)}"
        what = f"{'validation' if args.validation else 'held-out'} subjects: {args.subjects}, {kind}"
        count = f"subjects={args.subjects}"
    methods = [k for k in s if k not in ("cases", "flagged", "registrations") and "/" not in k
               and not k.endswith((" seconds", " hd95"))]
    plots = "heldout_dice.png, heldout_hd95.png, heldout_seconds.png" + (
        ", heldout_contrasts.png, contrasts.png" if args.contrasts else "")
    print(f"{what}; per label and case in {args.out}/heldout_metrics.csv, plots {plots}")
    for m in methods:
        print(f"  {m:25s} mean Dice {s[m]:.3f}  HD95 {s[m + ' hd95']:.1f} mm  {s[m + ' seconds']:.1f} s/case")
    for contrast in args.contrasts:
        print(f"  {contrast}: " + ", ".join(f"{m} {s[f'{contrast}/{m}']:.3f} ({s[f'{contrast}/{m} seconds']:.0f} s)"
                                            for m in methods))
    print(f"  the check flagged {s['flagged']:.0f} of {s['registrations']:.0f} registrations (checks.csv)")
    per_contrast = [f"{c}_{m.replace(' ', '_')}_dice={s[f'{c}/{m}']:.4f}" for c in args.contrasts for m in methods]
    print(" ".join([f"{m.replace(' ', '_')}_dice={s[m]:.4f}" for m in methods] + per_contrast) + f" {count}")
