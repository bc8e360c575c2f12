"""`lcs experiment NAME`: the paper's experiments, each one command writing a table (CSV, Markdown) and a plot.

    baseline-k  LCS against the multi-channel baseline for K AAL labels (paper Figure 2: K = 2 ... 10):
                both trained with the same budget (lr 3e-3, 0.6x deformations: what learns in a few hundred CPU
                steps), paired per-case Dice on held-out subjects (1.5x deformations), Wilcoxon and paired t-tests.
    memory      peak memory of one training step and of one inference, LCS and baseline, K = 1 ... 116
                (the paper's claim: LCS memory does not grow with K). Each figure from a fresh process.

`--scale tiny` runs in a few minutes (the test suite uses it); `--scale small` (4 mm grid, 240 steps per model, K = 2, 6, 10)
is what docs/results.md reports from a 2-core CPU; both are far below the paper's scale (1 mm, long training).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceLoss

from LabelConditionedSegLib.engine import Condition, Engine, resolve_device
from LabelConditionedSegLib.model import LCSNet, ModelConfig

from .baseline import segment_multichannel
from .data import load_atlas, write_colin27_aal
from .evaluate import evaluate
from .plots import plot_memory, plot_paired_dice
from .train import TrainSettings, train

# AAL labels for the K sweep: large to small, both hemispheres, cortex, deep and cerebellar structures.
SWEEP_LABELS = ["Frontal_Sup_L", "Temporal_Mid_R", "Precuneus_L", "Cerebelum_6_R", "Insula_L", "Caudate_R",
                "Hippocampus_L", "Thalamus_R", "Putamen_L", "Amygdala_R"]


@dataclass(frozen=True)
class Scale:
    spacing: float
    depth: int
    steps: int
    subjects: int
    ks: tuple[int, ...]
    memory_ks: tuple[int, ...]


SCALES = {
    "tiny": Scale(spacing=4.0, depth=3, steps=20, subjects=1, ks=(2, 4), memory_ks=(1, 4)),
    "small": Scale(spacing=4.0, depth=3, steps=240, subjects=4, ks=(2, 6, 10), memory_ks=(1, 2, 4, 8, 16, 32, 64, 116)),
}


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
            settings = TrainSettings(data, folder / method, "colin27", spacing=scale.spacing,
                                     model=model_config(scale), labels=labels, steps=scale.steps, lr=3e-3,
                                     strength=0.6, validate_every=scale.steps, validation_subjects=1, device=device,
                                     name=f"{method} K={k}", baseline=method == "baseline")
            models[method] = train(settings)
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


# ---- 2. Memory against the number of classes ----------------------------------------------------------
def memory(data: Path, out: Path, scale: Scale, device: str) -> list[dict]:
    """Peak memory (fresh process each) of a training step and an inference, LCS and baseline, per K."""
    atlas = load_atlas(data, "colin27", scale.spacing, 2**scale.depth)
    labels_npy = out / "atlas_labels.npy"  # the workers read only this, so loading data adds nothing to their peak
    np.save(labels_npy, sitk.GetArrayFromImage(atlas.labels).astype(np.int16))
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


EXPERIMENTS = {"baseline-k": baseline_k, "memory": memory}


def write_table(rows: list[dict], out: Path, name: str) -> None:
    columns = [c for c in rows[0] if not c.endswith("case_dice")]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="which experiment")
    parser.add_argument("--scale", choices=sorted(SCALES), default="small", help="tiny (a minute) or small (docs/results.md)")
    parser.add_argument("--data", type=Path, help="Colin27 + AAL training folder (default: written from mricron-data)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("build/experiments"))


def run(args: argparse.Namespace) -> None:
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
