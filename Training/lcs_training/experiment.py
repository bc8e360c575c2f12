"""`lcs experiment NAME`: the paper's experiments, each one command writing a table (CSV, Markdown) and a plot.

    baseline-k    LCS against the multi-channel baseline for K AAL labels (paper Figure 2: K = 2 ... 10): paired
                  per-case Dice on held-out subjects, Wilcoxon and paired t-tests.
    memory        peak memory of one training step and of one inference, LCS and baseline, K = 1 ... 116 (the paper's
                  claim: LCS memory does not grow with K). Each figure from a fresh process.
    many          one LCS model on all 116 AAL labels against baselines of at most 10 labels each with the same total
                  steps (paper Figure 3: per-label Dice, sorted), by label size.
    novel         LCS trained on coarse labels (AAL gyri merged), conditioned on their unseen fine parts (paper Table 1):
                  coarse, naive and fine-grained Dice per fine label.
    second-atlas  the INIA19 macaque template with its ~700 NeuroMaps labels: one LCS model against affine propagation.
    incomplete    each label removed from alpha = 50% / 70% of the training subjects: the baseline trained naively and
                  with SMILE's weights, and LCS (which samples only annotated labels), on complete held-out subjects.
    relabel       SMILEr on the alpha = 50% cohort, other atlas labels kept: an LCS model with dropout proposes the
                  removed organs over three rounds; precision and TP/FP of the added voxels, and held-out Dice after
                  each round against the same extra training without relabeling.
    few-labels    a few labelled subjects and more unlabelled ones: LCS plain, with siamese pretraining, with the
                  Dice/BCE schedule, with adversarial training on the unlabelled scans, and all together (2 seeds):
                  validation Dice against steps and seconds, held-out Dice with paired tests against plain.

All train with what learns in a few hundred CPU steps (lr 3e-3, 0.6x deformations) and test on held-out subjects
(1.5x deformations, other grids). `--scale tiny` runs in about a minute each (the test suite uses it); `--scale small`
(4 mm grid, 240 steps per model; 720 in incomplete) is what docs/results.md reports from a 2-core CPU; both are far
below the paper's scale (1 mm, long training).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceLoss

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.engine import Condition, Engine, resolve_device
from LabelConditionedSegLib.files import atomic_path, write_csv, write_image, write_text
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.model import LCSNet, ModelConfig

from .baseline import segment_multichannel
from LabelConditionedSegLib.geometry import model_grid
from LabelConditionedSegLib.training_folder import write_case

from .data import case_files, load_atlas, mask_from_labels, write_colin27_aal, write_inia19_neuromaps, write_merged
from .evaluate import evaluate
from .novel import AAL_GROUPS, score_fine_labels
from .plots import (plot_few_labels, plot_fine_labels, plot_incomplete, plot_memory, plot_method_dice, plot_paired_dice,
                    plot_relabel)
from .relabel import relabel, summary
from .synth import Strength, SubjectGenerator
from .train import TrainSettings, train

# AAL labels for the K sweep: large to small, both hemispheres, cortex, deep and cerebellar structures.
SWEEP_LABELS = ["Frontal_Sup_L", "Temporal_Mid_R", "Precuneus_L", "Cerebelum_6_R", "Insula_L", "Caudate_R",
                "Hippocampus_L", "Thalamus_R", "Putamen_L", "Amygdala_R"]


@dataclass(frozen=True)
class Scale:
    spacing: float
    depth: int
    steps: int  # per model in baseline-k and many (each baseline); many gives LCS the baselines' total
    subjects: int
    ks: tuple[int, ...]
    memory_ks: tuple[int, ...]
    labels: int | None  # many and novel: the first this many labels of the table (None: all)
    long_steps: int  # one LCS model on a whole atlas (novel, second-atlas)
    macaque_spacing: float
    cohort: int  # incomplete and relabel: training subjects besides the atlas
    incomplete_steps: int  # per model in incomplete: a partial cohort needs longer than a complete one
    labelled: int = 1  # few-labels: labelled subjects besides the atlas ...
    unlabelled: int = 2  # ... and unlabelled scans
    few_steps: int = 8  # per model in few-labels
    pretrain_steps: int = 4
    seeds: tuple[int, ...] = (0, 1)


SCALES = {
    "tiny": Scale(spacing=4.0, depth=3, steps=20, subjects=1, ks=(2, 4), memory_ks=(1, 4), labels=12, long_steps=20,
                  macaque_spacing=3.0, cohort=2, incomplete_steps=20, labelled=1, unlabelled=1, seeds=(0,)),
    "small": Scale(spacing=4.0, depth=3, steps=240, subjects=4, ks=(2, 4, 6, 8, 10),
                   memory_ks=(1, 2, 4, 8, 16, 32, 64, 116), labels=None, long_steps=1920, macaque_spacing=2.0, cohort=8,
                   incomplete_steps=720, labelled=2, unlabelled=8, few_steps=240, pretrain_steps=400),
}
BASELINE_MAX_LABELS = 10  # the paper's many-class baseline: several models of at most 10 labels each


def model_config(scale: Scale) -> ModelConfig:
    """The LCS architecture of the experiments; `lcs train --baseline` derives the baseline from it."""
    return ModelConfig(depth=scale.depth, condition_levels="all")


# ---- 1. LCS against the multi-channel baseline ------------------------------------------------------
def baseline_k(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """Train LCS and the baseline on the first K sweep labels for each K; paired per-case Dice."""
    from scipy.stats import ttest_rel, wilcoxon
    table = []
    for k in scale.ks:
        folder = out / f"k{k}"
        labels = SWEEP_LABELS[:k]
        models = {}
        for method in ("lcs", "baseline"):
            models[method] = train(_settings(data, folder / method, scale, device, f"{method} K={k}", labels, scale.steps,
                                             baseline=method == "baseline"))
        evaluate(models["lcs"], data, "colin27", scale.subjects, 1.5, 7, folder, device, [models["baseline"]])
        per_case = _per_case_dice(folder / "heldout_metrics.csv")
        lcs, base = np.array(per_case["lcs"]), np.array(per_case["baseline"])
        paired = len(lcs) > 1 and np.any(lcs != base)
        p = float(wilcoxon(lcs, base).pvalue) if paired else float("nan")
        t = float(ttest_rel(lcs, base).pvalue) if paired else float("nan")  # the paper's test
        table.append({"K": k, "lcs_dice": round(float(lcs.mean()), 4), "lcs_sd": round(float(lcs.std()), 4),
                      "baseline_dice": round(float(base.mean()), 4), "baseline_sd": round(float(base.std()), 4),
                      "wilcoxon_p": round(p, 4), "t_test_p": round(t, 6), "cases": len(lcs), "lcs_case_dice": lcs.round(4).tolist(),
                      "baseline_case_dice": base.round(4).tolist()})
    plot_paired_dice(table, out / "baseline_k.png")
    return table


def _per_case_dice(metrics_csv: Path) -> dict[str, list[float]]:
    """Mean Dice over labels, per case, for each method."""
    scores: dict[str, dict[int, list[float]]] = {}
    with open(metrics_csv) as f:
        for r in csv.DictReader(f):
            scores.setdefault(r["method"], {}).setdefault(int(r["subject"]), []).append(float(r["dice"]))
    return {m: [float(np.mean(v)) for _, v in sorted(cases.items())] for m, cases in scores.items()}


def _settings(data: Path, out: Path, scale: Scale, device: str, name: str, labels: list[str] | None, steps: int,
              baseline: bool = False, **overrides) -> TrainSettings:
    """The experiments' training recipe: what learns in a few hundred CPU steps (lr 3e-3, 0.6x deformations), with the
    paper's samples (two subjects a step, one label each), as the runs in docs/results.md were made."""
    options = dict(atlas="colin27", spacing=scale.spacing, model=model_config(scale), labels=labels, steps=steps, lr=3e-3, strength=0.6,
                   batch_size=2, labels_per_subject=1,
                   validate_every=steps, validation_subjects=1, device=device, name=name, baseline=baseline,
                   overwrite=True)  # a re-run replaces the experiment's own models, as it replaces its tables
    return TrainSettings(data, out, **{**options, **overrides})


# ---- 3. Many classes ------------------------------------------------------------------------------------
def many_classes(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """One LCS model on every label against baselines of at most 10 labels each, given the same total steps;
    per-label Dice sorted by the baseline's (paper Figure 3)."""
    labels = [l.name for l in load_atlas_table(data, scale)][: scale.labels]
    groups = np.array_split(labels, -(-len(labels) // BASELINE_MAX_LABELS))
    baselines = [train(_settings(data, out / f"baseline{i + 1}", scale, device, f"baseline {i + 1} of {len(groups)}",
                                 list(group), scale.steps, baseline=True)) for i, group in enumerate(groups)]
    lcs = train(_settings(data, out / "lcs", scale, device, f"LCS, {len(labels)} labels", labels, scale.steps * len(groups)))
    evaluate(lcs, data, "colin27", scale.subjects, 1.5, 7, out, device, baselines)
    rows = _metric_rows(out / "heldout_metrics.csv")
    sizes = _atlas_sizes(lcs)
    plot_method_dice(rows, ["baseline", "lcs"], _means(rows), out / "many_classes.png")
    table = _method_table(rows, sizes)
    trained = {"lcs": 1, "baseline": len(groups)}
    for r in table:
        r.update(models=trained.get(r["method"], "-"), steps=scale.steps * len(groups) if r["method"] in trained else "-")
    return table


def load_atlas_table(data: Path, scale: Scale) -> LabelTable:
    """The label table restricted to the labels the atlas keeps on the experiment's model grid."""
    atlas = load_atlas(data, "colin27", scale.spacing, 2**scale.depth)
    return LabelTable(l for l in LabelTable.read_csv(data / "labels.csv") if l.value in set(atlas.present))


def _metric_rows(metrics_csv: Path) -> list[dict]:
    with open(metrics_csv) as f:
        return [{**r, "value": int(r["value"]), "dice": float(r["dice"]), "hd95_mm": float(r["hd95_mm"])}
                for r in csv.DictReader(f)]


def _means(rows: list[dict]) -> dict[str, float]:
    return {m: float(np.mean([r["dice"] for r in rows if r["method"] == m])) for m in {r["method"] for r in rows}}


def _atlas_sizes(checkpoint_path: Path) -> dict[int, int]:
    """Voxels of each label on the checkpoint's atlas grid."""
    atlas_labels = Checkpoint.load(checkpoint_path).atlas_labels  # a named image: an array view must not outlive it
    values, counts = np.unique(sitk.GetArrayViewFromImage(atlas_labels), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v}


def _method_table(rows: list[dict], sizes: dict[int, int]) -> list[dict]:
    """Per method: mean and median Dice, mean HD95, and mean Dice over the smallest, middle and largest third of
    the labels (by atlas volume), where the paper saw LCS gain most on small structures."""
    order = sorted(sizes, key=sizes.get)
    thirds = [set(t) for t in np.array_split(order, 3)]
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        per_label = {}
        for r in mine:
            per_label.setdefault(r["value"], []).append(r["dice"])
        label_dice = {v: float(np.mean(d)) for v, d in per_label.items()}
        row = {"method": method, "labels": len(label_dice), "mean_dice": round(float(np.mean([r["dice"] for r in mine])), 4),
               "median_dice": round(float(np.median(list(label_dice.values()))), 4),
               "mean_hd95_mm": round(float(np.nanmean([r["hd95_mm"] for r in mine])), 2)}
        for name, third in zip(("small", "medium", "large"), thirds):
            row[f"{name}_third_dice"] = round(float(np.mean([d for v, d in label_dice.items() if v in third] or [np.nan])), 4)
        table.append(row)
    return table


# ---- 4. Novel fine-grained labels ------------------------------------------------------------------------
def novel_labels(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """Train on coarse labels (AAL gyri merged), segment their unseen fine parts from atlas masks (paper Table 1)."""
    coarse = write_merged(data, out / "coarse-data", AAL_GROUPS)
    labels = list(AAL_GROUPS) if scale.labels else None  # tiny: only the coarse labels
    lcs = train(_settings(coarse, out / "lcs", scale, device, "LCS on coarse AAL labels", labels, scale.long_steps))
    table = score_fine_labels(lcs, data, "colin27", AAL_GROUPS, scale.subjects, 1.5, 7, device)
    plot_fine_labels(table, out / "novel_labels.png")
    return table


# ---- Second atlas family: the macaque brain with ~700 NeuroMaps labels ------------------------------------
MACAQUE_SIZE = 0.5  # a macaque brain is about half a human's: deformations and held-out grids scale with it


def second_atlas(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """LCS on every NeuroMaps label of the INIA19 macaque template, against affine propagation on held-out subjects."""
    macaque = write_inia19_neuromaps(out / "inia19-data")
    lcs = train(_settings(macaque, out / "lcs", scale, device, "LCS INIA19 NeuroMaps", None, scale.long_steps,
                          atlas="inia19", spacing=scale.macaque_spacing, strength=0.6 * MACAQUE_SIZE))
    summary = evaluate(lcs, macaque, "inia19", scale.subjects, 1.5 * MACAQUE_SIZE, 7, out, device)
    table = _method_table(_metric_rows(out / "heldout_metrics.csv"), _atlas_sizes(lcs))
    for r in table:
        r["seconds_per_case"] = round(summary[f"{r['method']} seconds"], 1)
    return table


# ---- Incomplete annotations: naive baseline, SMILE baseline, LCS -------------------------------------------
INCOMPLETE_LABELS = SWEEP_LABELS[:4]
ALPHAS = (0.5, 0.7)


def incomplete(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """Each label removed from a random alpha of the training subjects; the baseline trained naively (missing labels
    taught as background) and with SMILE's weights, and LCS, scored on complete held-out subjects."""
    table = []
    for alpha in ALPHAS:
        folder = out / f"alpha{int(alpha * 100)}"
        views = {view: write_partial_cohort(data, folder / f"{view}-data", INCOMPLETE_LABELS, scale.cohort, alpha,
                                            seed=1, claim_complete=view == "naive")
                 for view in ("naive", "smile")}
        models = {name: train(_settings(views[view], folder / name, scale, device, f"{name}, alpha {alpha}",
                                        INCOMPLETE_LABELS, scale.incomplete_steps,
                                        baseline=name.startswith("baseline")))
                  for name, view in (("baseline-naive", "naive"), ("baseline-smile", "smile"), ("lcs", "smile"))}
        row = {"alpha": alpha}
        for name in ("baseline-naive", "baseline-smile"):
            evaluate(models["lcs"], data, "colin27", scale.subjects, 1.5, 7, folder / f"eval-{name}", device, [models[name]])
            per_case = _per_case_dice(folder / f"eval-{name}/heldout_metrics.csv")
            row.setdefault("lcs_case_dice", np.round(per_case["lcs"], 4).tolist())
            row.setdefault("affine_case_dice", np.round(per_case["affine propagation"], 4).tolist())
            row[f"{name.replace('-', '_')}_case_dice"] = np.round(per_case["baseline"], 4).tolist()
        for key in ("baseline_naive", "baseline_smile", "lcs", "affine"):
            row[f"{key}_dice"] = round(float(np.mean(row[f"{key}_case_dice"])), 4)
        table.append(row)
    plot_incomplete(table, out / "incomplete.png")
    return [{k: v for k, v in r.items() if not k.endswith("case_dice")} | {k: v for k, v in r.items() if k.endswith("case_dice")}
            for r in table]


RELABEL_ROUNDS = 3


def relabeling(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """SMILEr rounds from an LCS model with dropout trained on the alpha = 50% cohort, scored against the complete
    cohort; each round's model, and the first model trained as long again without relabeling, on held-out subjects.
    The cohort keeps every other atlas label, so SMILE's weights teach background around a relabeled organ."""
    partial, truth = (write_partial_cohort(data, out / f"{name}-data", INCOMPLETE_LABELS, scale.cohort, alpha, seed=1,
                                           claim_complete=False, keep_others=True)
                      for name, alpha in (("partial", 0.5), ("truth", 0.0)))
    with_dropout = replace(model_config(scale), dropout=0.1)  # Monte Carlo dropout measures the proposals' doubt
    first = train(_settings(partial, out / "lcs", scale, device, "LCS with dropout, alpha 0.5", INCOMPLETE_LABELS,
                            scale.steps, model=with_dropout))
    round_steps = scale.steps // 2
    rows = summary(relabel(partial, first, out / "relabel", RELABEL_ROUNDS, passes=8, steps=round_steps, truth=truth,
                           device=device))
    control = train(_settings(partial, out / "control", scale, device, "LCS with dropout, no relabeling",
                              INCOMPLETE_LABELS, scale.steps + RELABEL_ROUNDS * round_steps,
                              model=with_dropout, init=first))
    stages = [("before relabeling", "", {}, first)]
    stages += [(f"round {r['round']}", round(r["round"] / RELABEL_ROUNDS, 2), r,
                out / f"relabel/round{r['round']}/model/best.lcs") for r in rows]
    stages += [("no relabeling", "", {}, control)]
    table = []
    for stage, gamma, added, model in stages:
        held_out = evaluate(model, data, "colin27", scale.subjects, 1.5, 7, out / f"eval-{stage.replace(' ', '-')}", device)
        table.append({"stage": stage, "gamma": gamma, "steps": int(Checkpoint.load(model).provenance["iterations"])}
                     | {k: added.get(k, "") for k in ("added_voxels", "precision", "tp_fp_ratio", "recall")}
                     | {"lcs_dice": round(held_out["lcs"], 4), "affine_dice": round(held_out["affine propagation"], 4)})
    plot_relabel(table, out / "relabel.png")
    return table


def write_partial_cohort(source: Path, folder: Path, labels: list[str], count: int, alpha: float, seed: int,
                         claim_complete: bool, keep_others: bool = False) -> Path:
    """The atlas case (complete) and `count` random subjects of it, keeping `labels` (and with `keep_others` every
    other atlas label, always annotated), each of `labels` removed from round(alpha * count) random subjects. Each
    case lists what it annotates (annotated/CASE.txt); the naive view (claim_complete) says every case annotates
    every label, so a removed organ reads as background."""
    table = LabelTable.read_csv(source / "labels.csv")
    chosen = [table.resolve(name) for name in labels]
    others = [l for l in table if l not in chosen] if keep_others else []
    image_path, label_path, mask_path = case_files(source)["colin27"]
    image, full, mask = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path)), sitk.ReadImage(str(mask_path))
    rng, removal = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])  # same subjects for any alpha
    removed = {l.value: set(removal.choice(count, int(round(alpha * count)), replace=False).tolist()) for l in chosen}

    def keep(labelmap: sitk.Image, values: list[int]) -> sitk.Image:
        array = sitk.GetArrayFromImage(labelmap)
        out = sitk.GetImageFromArray(np.where(np.isin(array, values), array, 0).astype(np.int16))
        out.CopyInformation(labelmap)
        return out

    write_case(folder, "colin27", image, keep(full, [l.value for l in chosen + others]), mask,
               annotated=[l.name for l in chosen + others])
    generator, grid = SubjectGenerator(image, full, mask), model_grid(image, 2.0, 1)
    for i in range(count):
        subject, subject_labels = generator.sample(rng, Strength().times(0.6), grid=grid)
        drawn = [l for l in chosen if i not in removed[l.value]] + others
        write_case(folder, f"subject{i}", subject, keep(subject_labels, [l.value for l in drawn]),
                   mask_from_labels(subject_labels), annotated=[l.name for l in (chosen + others if claim_complete else drawn)])
    LabelTable(chosen + others).write_csv(folder / "labels.csv")
    return folder


# ---- 2. Memory against the number of classes ----------------------------------------------------------
def memory(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """Peak memory (fresh process each) of a training step and an inference, LCS and baseline, per K."""
    atlas = load_atlas(data, "colin27", scale.spacing, 2**scale.depth)
    labels_npy = out / "atlas_labels.npy"  # the workers read only this, so loading data adds nothing to their peak
    with atomic_path(labels_npy) as temporary:
        np.save(temporary, sitk.GetArrayFromImage(atlas.labels).astype(np.int16))
    table = []
    for k in scale.memory_ks:
        row = {"K": k}
        for method in ("lcs", "baseline"):
            for phase in ("train", "infer"):
                result = subprocess.run([sys.executable, "-m", "lcs_training.experiment", "--memory-worker",
                                         json.dumps([method, phase, k, str(labels_npy), scale.depth, device])],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"memory worker {method} {phase} K={k} failed: {result.stderr.strip()[-400:]}")
                row[f"{method}_{phase}_mb"] = round(json.loads(result.stdout.strip().splitlines()[-1]), 1)
        table.append(row)
    plot_memory(table, device, out / "memory.png")
    return table


def memory_worker(method: str, phase: str, k: int, labels_npy: str, depth: int, device: str) -> float:
    """Peak memory in MB above the process's idle state (CPU: resident set; CUDA: allocator peak)."""
    atlas_labels = torch.from_numpy(np.load(labels_npy).astype(np.int32))
    values = [int(v) for v in torch.unique(atlas_labels) if v > 0][:k]
    shape = tuple(atlas_labels.shape)
    dev = resolve_device(device)
    model = LCSNet(ModelConfig(depth=depth, condition_levels="all", baseline_labels=0 if method == "lcs" else k)).to(dev)
    image = torch.rand((2, 1) + shape, device=dev)
    idle = _start_peak(dev)
    if phase == "train":  # LCS: one label per sample, whatever K is; the baseline: K target channels
        model.train()
        if method == "lcs":
            mask = (atlas_labels == values[0]).float()[None, None].expand(2, -1, -1, -1, -1).to(dev)
            logits, target = model(image, image, mask), mask
        else:
            logits = model(image)
            target = torch.stack([atlas_labels == v for v in values]).float()[None].expand(2, -1, -1, -1, -1).to(dev)
        DiceLoss(sigmoid=True)(logits, target).backward()
    elif method == "lcs":  # the engine: encode once, decode label by label into a running max
        engine = Engine(model, image[0, 0].cpu().numpy(), dev)
        conditions = [Condition.of(str(v), v, (atlas_labels == v).numpy()) for v in values]
        engine.segment(engine.encode(image[0, 0].cpu().numpy()), conditions)
    else:
        segment_multichannel(model, image[0, 0].cpu().numpy(), values, dev)
    return _peak(dev) - idle


def _start_peak(device: torch.device) -> float:
    """Forget the peak so far and return the memory in use now, in MB. On the CPU the kernel's peak resident
    set (VmHWM) is reset (Linux clear_refs), so what loading touched does not hide the measured step."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    if Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mb("VmRSS")
    return _peak(device)  # not Linux: the lifetime peak, so the figure is a lower bound


def _peak(device: torch.device) -> float:
    """The peak memory since _start_peak, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if Path("/proc/self/status").exists():
        return _proc_status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(field: str) -> float:
    lines = Path("/proc/self/status").read_text().splitlines()
    return float(next(line.split()[1] for line in lines if line.startswith(field + ":"))) / 1024.0


# ---- Learning from fewer labels: siamese pretraining, the Dice/BCE schedule, adversarial training ---------------
FEW_LABELS = [f"{name}_{side}" for name in ("Frontal_Sup", "Temporal_Mid", "Precuneus", "Caudate", "Thalamus",
                                            "Hippocampus") for side in "LR"]  # left/right pairs: pretraining's proxy
FEW_RECIPES = {  # what each model adds to plain LCS training
    "plain": {}, "pretrained": {"pretrain": True}, "dice-bce": {"loss": "dice-bce-schedule"},
    "adversarial": {"adversarial": True}, "all": {"pretrain": True, "loss": "dice-bce-schedule", "adversarial": True}}


def few_labels(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """A few labelled subjects and more unlabelled scans, all other settings equal: each recipe of FEW_RECIPES for
    each seed, then held-out Dice paired against plain over (seed, held-out case). The models use GroupNorm, as
    the pretraining paper does, so that the pretrained encoder fits every model alike."""
    from scipy.stats import ttest_rel, wilcoxon
    from LabelConditionedSegLib.cli import main
    cohort = write_partial_cohort(data, out / "labelled-data", FEW_LABELS, scale.labelled, 0.0, seed=2,
                                  claim_complete=True)
    scans = out / "unlabelled-data" / "images"
    image_path, label_path, mask_path = case_files(data)["colin27"]
    generator = SubjectGenerator(sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path)),
                                 sitk.ReadImage(str(mask_path)))
    rng = np.random.default_rng([3, 0])  # other subjects than the labelled ones (seed 2) and held-out ones
    scans.mkdir(parents=True, exist_ok=True)
    for i in range(scale.unlabelled):
        image, _ = generator.sample(rng, Strength().times(0.6), grid=model_grid(generator.image, 2.0, 1))
        write_image(image, scans / f"scan{i}.nii.gz", compress=False)
    config = replace(model_config(scale), norm="group")
    curves: dict[str, list] = {}
    per_case: dict[str, list[float]] = {}
    final: dict[str, list[float]] = {}
    for seed in scale.seeds:
        encoder = out / f"seed{seed}" / "encoder.pt"
        encoder.parent.mkdir(parents=True, exist_ok=True)
        code = main(["pretrain", str(cohort), "--atlas", "colin27", "--unlabelled", str(scans.parent), "-o", str(encoder),
                     "--spacing", str(scale.spacing), "--depth", str(scale.depth), "--norm", "group", "--steps",
                     str(scale.pretrain_steps), "--seed", str(seed), "--device", device, "--overwrite", "--quiet"])
        if code:
            raise RuntimeError(f"lcs pretrain failed (exit code {code})")
        pretrain_seconds = json.loads(torch.load(encoder, weights_only=True)["provenance"])["seconds"]
        for name, recipe in FEW_RECIPES.items():
            folder = out / f"seed{seed}" / name
            options = {k: v for k, v in recipe.items() if k != "pretrain"}
            if recipe.get("pretrain"):
                options["init_encoder"] = encoder
            if recipe.get("adversarial"):
                options["unlabelled"] = scans.parent
                options["unlabelled_after"] = scale.few_steps // 4
            model = train(_settings(cohort, folder, scale, device, f"{name}, seed {seed}", FEW_LABELS, scale.few_steps,
                                    model=config, seed=seed, validate_every=max(1, scale.few_steps // 6),
                                    validation_subjects=2, **options))
            offset = pretrain_seconds if recipe.get("pretrain") else 0.0
            curves.setdefault(name, []).append(
                [(int(r["step"]), float(r["seconds"]) + offset, float(r["val_dice"]))
                 for r in csv.DictReader(open(folder / "history.csv")) if r["val_dice"]])
            final.setdefault(name, []).append(curves[name][-1][-1][2])
            evaluate(model, data, "colin27", scale.subjects, 1.5, 7, folder / "evaluate", device)
            per_case.setdefault(name, []).extend(_per_case_dice(folder / "evaluate" / "heldout_metrics.csv")["lcs"])
    table = []
    plain = np.array(per_case["plain"])
    for name in FEW_RECIPES:
        mine = np.array(per_case[name])
        paired = name != "plain" and len(mine) > 1 and np.any(mine != plain)
        table.append({"model": name, "seeds": len(scale.seeds), "cases": len(mine),
                      "heldout_dice": round(float(mine.mean()), 4), "sd": round(float(mine.std()), 4),
                      "vs_plain": round(float((mine - plain).mean()), 4), "better_pairs": int((mine > plain).sum()),
                      "wilcoxon_p": round(float(wilcoxon(mine, plain).pvalue), 4) if paired else "",
                      "t_test_p": round(float(ttest_rel(mine, plain).pvalue), 4) if paired else "",
                      "final_val_dice": round(float(np.mean(final[name])), 4),
                      "train_seconds": round(float(np.mean([run[-1][1] for run in curves[name]])), 1),
                      "case_dice": mine.round(4).tolist()})
    plot_few_labels(curves, table, out / "few_labels.png")
    return table


EXPERIMENTS = {"baseline-k": baseline_k, "memory": memory, "many": many_classes, "novel": novel_labels,
               "second-atlas": second_atlas, "incomplete": incomplete, "relabel": relabeling, "few-labels": few_labels}


def write_table(rows: list[dict], out: Path, name: str) -> None:
    columns = [c for c in rows[0] if not c.endswith("case_dice")]
    write_csv(rows, out / f"{name}.csv", list(rows[0]))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    write_text("\n".join(lines) + "\n", out / f"{name}.md")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="tiny (a minute) or small (docs/results.md)")
    parser.add_argument("--data", type=Path, help="Colin27 + AAL training folder (default: written from mricron-data)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--out", type=Path, default=Path("build/experiments"),
                        help="the experiment's table (.csv, .md) and plot go to OUT/NAME/")


def run(args: argparse.Namespace) -> None:
    from .data import INIA19, check_data; check_data(args.data, "colin27", INIA19 if args.name == "second-atlas" else ())
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or write_colin27_aal(Path(tmp) / "colin27")
        rows = EXPERIMENTS[args.name](data, out, SCALES[args.scale], args.device)
    write_table(rows, out, args.name.replace("-", "_"))
    print(f"table and plot in {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--memory-worker", required=True)
    print(json.dumps(memory_worker(*json.loads(p.parse_args().memory_worker))))
