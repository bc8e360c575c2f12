"""`lcs relabel`: SMILEr (Petit, Thome and Soler 2018) on a data set whose cases miss some labels.

Each round t of T: the current model proposes every label a case does not annotate (Monte Carlo dropout, or its
own confidence when it has no dropout); of the proposed voxels that no label holds yet, the fraction
gamma_t = t / T * gamma_max with the lowest uncertainty joins that case's label map; the model is then fine-tuned
on the augmented data (SMILE weights: the added voxels teach their label, the rest of a missing organ stays
unknown). Every round writes a new data folder; the input folder is never written to.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from LabelConditionedSegLib.progress import progress_bar

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.files import atomic_path, write_csv
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.training_folder import read_annotated, write_case
from LabelConditionedSegLib.pipeline import Segmenter
from LabelConditionedSegLib.volume import label_values, read_volume

from .data import case_files
from .train import TrainSettings, train


def propose_missing(segmenter: Segmenter, image: sitk.Image, labels: np.ndarray, missing: list[int], passes: int,
                    fraction: float) -> np.ndarray:
    """`labels` plus, for each missing label, the `fraction` of its proposed voxels (mean probability >= 0.5, the
    highest of the proposals, not labelled yet) with the lowest uncertainty."""
    prepared = segmenter.prepare(image)
    proposals = segmenter.propose(prepared, segmenter.conditions(missing), passes)
    mean = np.stack([sitk.GetArrayFromImage(p.probability) for p in proposals])
    doubt = np.stack([sitk.GetArrayFromImage(p.uncertainty) for p in proposals])
    winner = mean.argmax(0)
    candidate = (mean.max(0) >= 0.5) & (labels == 0)
    out = labels.copy()
    for i, value in enumerate(missing):
        voxels = candidate & (winner == i)
        if not voxels.any() or fraction <= 0:
            continue
        limit = np.quantile(doubt[i][voxels], min(fraction, 1.0))
        out[voxels & (doubt[i] <= limit)] = value
    return out


def relabel(data: Path, checkpoint: Path, out: Path, rounds: int = 3, gamma_max: float = 1.0, passes: int = 8,
            steps: int = 200, truth: Path | None = None, device: str = "auto") -> list[dict]:
    """Run the rounds; returns per round and label the voxels added so far and, with `truth`, how many are right."""
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        raise LCSError(f"-o {out} would write inside the data folder {data}; choose a folder outside it")
    first = Checkpoint.load(checkpoint)
    data_table = LabelTable.read_csv(data / "labels.csv")
    table = LabelTable(l for l in first.label_table if l.value in data_table.values)  # what the model and data share
    files = case_files(data)
    annotated = {}  # everything a case annotates, also labels the model does not know: the sidecars keep them
    for name, (_, label_path, _) in files.items():
        declared = read_annotated(data, name, data_table)
        annotated[name] = declared if declared is not None else label_values(sitk.ReadImage(str(label_path)))
    rows, current, model = [], data, checkpoint
    for t in range(1, rounds + 1):
        fraction = t / rounds * gamma_max
        folder = out / f"round{t}"
        segmenter = Segmenter(Checkpoint.load(model), device)
        with atomic_path(_fresh(folder) / "labels.csv") as temporary:
            shutil.copyfile(data / "labels.csv", temporary)
        added: dict[int, list[int]] = {}
        for name, (image_path, _, mask_path) in progress_bar(files.items(), desc=f"round {t} of {rounds}: proposing"):
            labels_image = sitk.ReadImage(str(case_files(current)[name][1]))
            labels = sitk.GetArrayFromImage(labels_image)
            missing = [v for v in table.values if v not in annotated[name]]
            image = read_volume(image_path)
            new = propose_missing(segmenter, image, labels, missing, passes, fraction) if missing else labels
            result = sitk.GetImageFromArray(new.astype(np.int32))
            result.CopyInformation(labels_image)
            write_case(folder, name, image, result, sitk.ReadImage(str(mask_path)) if mask_path else None,
                       annotated=[data_table.get(v).name for v in annotated[name] if v in data_table.values])
            if missing:
                _score(rows, t, name, new, missing, truth, added)
        steps_so_far = int(Checkpoint.load(model).provenance.get("iterations", 0))
        p = first.provenance
        settings = TrainSettings(folder, folder / "model", p.get("atlas_case", ""), spacing=float(p.get("spacing_mm", 2.0)),
                                 model=first.config, labels=[str(v) for v in table.values], steps=steps_so_far + steps,
                                 lr=float(p.get("lr", 1e-4)), strength=float(p.get("augmentation_strength", 1.0)),
                                 batch_size=int(p.get("batch_size", 2)), labels_per_subject=int(p.get("labels_per_subject", 1)),
                                 validate_every=steps_so_far + steps, validation_subjects=1, device=device, init=model,
                                 name=f"{p.get('name', 'LCS model')}, relabeled round {t}")
        model, current = train(settings), folder
        dice = Checkpoint.load(model).provenance.get("validation_dice")
        for row in rows:
            if row["round"] == t:
                row["validation_dice"] = "" if dice is None else round(dice, 4)
    _write(rows, out)
    return rows


def _fresh(folder: Path) -> Path:
    if folder.exists():
        raise LCSError(f"{folder} exists already; relabel into an empty output folder")
    folder.mkdir(parents=True)
    return folder


def _score(rows: list[dict], round_: int, case: str, labels: np.ndarray, missing: list[int], truth: Path | None,
           added: dict) -> None:
    """Voxels added so far per missing label; true and false positives against complete labels when known."""
    truth_array = None
    if truth is not None:
        path = case_files(truth)[case][1] if (truth / "images").is_dir() else next(truth.glob(f"{case}.*"), None)
        if path is None:
            raise LCSError(f"--truth {truth} has no label map for case {case!r}")
        truth_array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    for value in missing:
        mine = labels == value
        row = {"round": round_, "case": case, "value": value, "added_voxels": int(mine.sum())}
        if truth_array is not None:
            tp = int((mine & (truth_array == value)).sum())
            row.update(true_positives=tp, false_positives=int(mine.sum()) - tp,
                       precision=round(tp / mine.sum(), 4) if mine.any() else "",
                       recall=round(tp / max(1, int((truth_array == value).sum())), 4))
        rows.append(row)


def summary(rows: list[dict]) -> list[dict]:
    """Per round, over cases and labels: voxels added, and true/false positives when scored."""
    out = []
    for t in sorted({r["round"] for r in rows}):
        mine = [r for r in rows if r["round"] == t]
        row = {"round": t, "added_voxels": sum(r["added_voxels"] for r in mine),
               "validation_dice": mine[0].get("validation_dice", "")}
        if mine and "true_positives" in mine[0]:
            tp, fp = sum(r["true_positives"] for r in mine), sum(r["false_positives"] for r in mine)
            row.update(true_positives=tp, false_positives=fp, precision=round(tp / max(1, tp + fp), 4),
                       tp_fp_ratio=round(tp / fp, 2) if fp else float("inf"),
                       recall=round(float(np.mean([r["recall"] for r in mine])), 4))
        out.append(row)
    return out


def _write(rows: list[dict], out: Path) -> None:
    for name, table in (("relabel_labels.csv", rows), ("relabel_rounds.csv", summary(rows))):
        if table:
            write_csv(table, out / name, list(table[0]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="training folder whose cases miss labels (annotated/CASE.txt or absent)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="LCS model trained on that folder (lcs train)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="new folder: round1/, round2/, ... and CSVs")
    parser.add_argument("--rounds", type=int, default=3, help="T: rounds of propose, add, retrain")
    parser.add_argument("--gamma-max", type=float, default=1.0, help="fraction of proposed voxels kept in the last round")
    parser.add_argument("--passes", type=int, default=8, help="Monte Carlo dropout passes per proposal")
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps per round")
    parser.add_argument("--truth", type=Path, help="complete label maps (a training folder or CASE.nii.gz files) to "
                                                   "count true and false positives of the added labels")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")


def run(args: argparse.Namespace) -> None:
    from .data import check_training_folder; check_training_folder(args.data)  # a malformed folder: one line, nothing written
    rows = relabel(args.data, args.checkpoint, args.out, args.rounds, args.gamma_max, args.passes, args.steps,
                   args.truth, args.device)
    start = Checkpoint.load(args.checkpoint).provenance.get("validation_dice")
    print(f"round=0 validation_dice={'' if start is None else round(start, 4)} (the model given)")
    for r in summary(rows):
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    print(f"augmented data in {args.out}/round*/, per label in {args.out}/relabel_labels.csv. Fine-tuning on relabeled "
          "organs can make a model over-segment (docs/results.md): compare validation Dice with round 0 before use.")
