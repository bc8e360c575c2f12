"""`lcs train`: the paper's recipe on a folder of labelled scans.

Every step each sample gets a random subject (a warped, re-imaged copy of a training case),
a random target label that case holds, merged with a second label half the time; the
soft-Dice loss sees only the conditioned label, and, where the case does not annotate it
completely, only the voxels SMILE's weight map keeps (smile.py). Runs on CPU or CUDA (mixed precision), and
on several processes under `torchrun` (DistributedDataParallel).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.engine import Condition, Engine, resolve_device
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.model import LCSNet, ModelConfig

from .baseline import segment_multichannel
from .data import Case, load_atlas, load_cases, normalized
from .metrics import dice_per_label
from .smile import masked_dice_loss, smile_weight
from .synth import Strength, SubjectGenerator


@dataclass
class TrainSettings:
    data: Path
    out: Path
    atlas: str
    spacing: float = 2.0
    model: ModelConfig = field(default_factory=ModelConfig)
    labels: list[str] | None = None  # restrict training to these label names/values
    steps: int = 2000
    minutes: float | None = None  # stop after this wall time, whichever comes first
    batch_size: int = 2
    lr: float = 1e-4
    merge_probability: float = 0.5
    strength: float = 1.0
    validate_every: int = 200
    validation_subjects: int = 2
    seed: int = 0
    device: str = "auto"
    workers: int = 1
    resume: bool = False
    init: Path | None = None  # start from this checkpoint's weights (same architecture)
    baseline: bool = False  # train the paper's multi-channel baseline (no atlas input, one channel per label)
    name: str = "LCS model"


class SubjectStream(IterableDataset):
    """Endless (image, atlas mask, target, SMILE weight) samples drawn from random subjects of the training cases.

    For the multi-channel baseline: (image, nothing, one target channel per label, one weight map per label).
    """

    def __init__(self, cases: list[Case], atlas: Case, labels: list[int], strength: Strength, merge_probability: float,
                 seed: int, baseline: bool = False):
        self.cases, self.atlas, self.labels = cases, atlas, labels
        self.strength, self.merge_probability, self.seed, self.baseline = strength, merge_probability, seed, baseline
        self.atlas_labels = sitk.GetArrayFromImage(atlas.labels)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        generators = [SubjectGenerator(c.image, c.labels, c.mask) for c in self.cases]
        while True:
            k = int(rng.integers(len(self.cases)))
            case = self.cases[k]
            if self.baseline:
                image, labels = generators[k].sample(rng, self.strength, grid=self.atlas.image)
                values = sitk.GetArrayFromImage(labels)
                yield (normalized(image, self.atlas.mask)[None], np.zeros(0, np.float32),
                       np.stack([values == v for v in self.labels]).astype(np.float32),
                       np.stack([smile_weight(values, v in case.annotated) for v in self.labels]))
                continue
            chosen = pick_labels(rng, self.labels, sorted(set(case.present) | set(case.annotated)), self.merge_probability)
            if not chosen:
                continue
            image, labels = generators[k].sample(rng, self.strength, grid=self.atlas.image)
            values = sitk.GetArrayFromImage(labels)
            yield (normalized(image, self.atlas.mask)[None], np.isin(self.atlas_labels, chosen)[None].astype(np.float32),
                   np.isin(values, chosen)[None].astype(np.float32),
                   smile_weight(values, set(chosen) <= set(case.annotated))[None])


def pick_labels(rng: np.random.Generator, trained: list[int], labelled: list[int], merge_probability: float) -> list[int]:
    """A random target among the labels this case annotates or partly holds, merged with a second one half the time."""
    choices = [v for v in trained if v in set(labelled)]
    if not choices:
        return []
    chosen = [int(rng.choice(choices))]
    if len(choices) > 1 and rng.random() < merge_probability:
        chosen.append(int(rng.choice([v for v in choices if v != chosen[0]])))
    return chosen


def validation_subjects(cases: list[Case], atlas: Case, count: int, strength: Strength, seed: int):
    """Fixed held-out subjects (their own seeds) for validation Dice: (image, truth, the labels the truth annotates),
    from the most completely annotated cases first."""
    rng = np.random.default_rng([seed, 10_000])
    ranked = sorted(cases, key=lambda c: -len(c.annotated))
    out = []
    for i in range(count):
        case = ranked[i % len(ranked)]
        image, labels = SubjectGenerator(case.image, case.labels, case.mask).sample(rng, strength, grid=atlas.image)
        out.append((normalized(image, atlas.mask), sitk.GetArrayFromImage(labels), set(case.annotated)))
    return out


def validate(model: LCSNet, atlas_image: np.ndarray, atlas_labels: np.ndarray, table: LabelTable, subjects, device) -> dict[int, float]:
    """Mean Dice per label over the validation subjects, all labels decoded together as at inference. A subject
    scores only the labels its case annotates: a missing or partly relabeled organ has no truth to compare with."""
    engine = Engine(model, atlas_image, device) if model.config.conditioned else None
    conditions = [Condition.of(l.name, l.value, atlas_labels == l.value) for l in table]
    scores: dict[int, list[float]] = {}
    for image, truth, annotated in subjects:
        if engine is None:
            prediction = segment_multichannel(model, image, table.values, device)
        else:
            prediction = engine.segment(engine.encode(image), conditions)
        for value, dice in dice_per_label(prediction, truth, [v for v in table.values if v in annotated]).items():
            scores.setdefault(value, []).append(dice)
    model.train()
    return {v: float(np.mean(d)) for v, d in scores.items()}


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(s: TrainSettings) -> Path:
    """Train, validating every `validate_every` steps; returns the path of the best checkpoint."""
    rank, world, local_rank = _distributed()
    device = resolve_device(s.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    torch.manual_seed(s.seed + rank)
    s.out.mkdir(parents=True, exist_ok=True)

    table_path = s.data / "labels.csv"
    table = LabelTable.read_csv(table_path)
    atlas = load_atlas(s.data, s.atlas, s.spacing, s.model.factor)
    table = LabelTable([l for l in table if l.value in set(atlas.present)])
    if s.labels:
        table = LabelTable(table.resolve(x) for x in s.labels)
    cases = load_cases(s.data, atlas)
    atlas_image = normalized(atlas.image, atlas.mask)
    atlas_labels = sitk.GetArrayFromImage(atlas.labels)
    strength = Strength().times(s.strength)

    config = replace(s.model, baseline_labels=len(table)) if s.baseline else s.model
    model = LCSNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    step, best, history = 0, -1.0, []
    if s.init is not None:
        initial = Checkpoint.load(s.init)
        if initial.config != config:
            raise LCSError(f"--init {s.init} has architecture {initial.config}, not {config}; match the model options")
        model.load_state_dict(initial.weights)
        step = int(initial.provenance.get("iterations", 0))
    state_path = s.out / "state.pt"
    if s.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), float(state["best"])
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    stream = SubjectStream(cases, atlas, table.values, strength, s.merge_probability, s.seed * 1000 + rank * 100 + step,
                           s.baseline)
    loader = iter(DataLoader(stream, batch_size=s.batch_size, num_workers=s.workers, persistent_workers=s.workers > 0))
    subjects = validation_subjects(cases, atlas, s.validation_subjects, strength, s.seed) if rank == 0 else []
    atlas_t = torch.from_numpy(atlas_image)[None, None].to(device).expand(s.batch_size, -1, -1, -1, -1)

    def save(path: Path, dice: dict[int, float]) -> None:
        provenance = {
            "name": s.name, "dataset": str(s.data), "atlas_case": s.atlas, "cases": [c.name for c in cases],
            "labels_trained": len(table), "iterations": step, "batch_size": s.batch_size * world, "lr": s.lr,
            "spacing_mm": s.spacing, "augmentation_strength": s.strength, "seed": s.seed,
            "validation_dice": float(np.mean(list(dice.values()))) if dice else None,
            "validation_dice_per_label": {str(k): round(v, 4) for k, v in dice.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "processes": world,
        }
        image = sitk.GetImageFromArray(atlas_image)
        image.CopyInformation(atlas.image)
        Checkpoint(config, {k: v.cpu() for k, v in model.state_dict().items()}, image, atlas.labels, atlas.mask,
                   table, provenance=provenance).save(path)

    last_dice: dict[int, float] = {}

    def checkpoint_now() -> float:
        """Validate, write last.lcs (and best.lcs when better) and the resume state; rank 0 only."""
        nonlocal best, last_dice
        last_dice = validate(model, atlas_image, atlas_labels, table, subjects, device)
        mean = float(np.mean(list(last_dice.values())))
        save(s.out / "last.lcs", last_dice)
        if mean > best:
            best = mean
            save(s.out / "best.lcs", last_dice)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}, state_path)
        return mean

    start_time = time.time()
    bar = tqdm(total=s.steps, initial=step, desc="training", disable=rank != 0, dynamic_ncols=True)
    net.train()
    while step < s.steps and (s.minutes is None or time.time() - start_time < s.minutes * 60):
        image, mask, target, weight = (t.to(device, non_blocking=True) for t in next(loader))
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = net(image) if s.baseline else net(image, atlas_t[: len(image)], mask)
            loss = masked_dice_loss(logits.float(), target, weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{np.mean(list(last_dice.values())):.3f}" if last_dice else "-")
        row = {"step": step, "loss": loss.item(), "val_dice": ""}
        if step % s.validate_every == 0 or step == s.steps:
            if rank == 0:
                row["val_dice"] = checkpoint_now()
            if world > 1:
                dist.barrier()
        history.append(row)
    bar.close()
    if rank == 0:
        if not history or history[-1]["val_dice"] == "":  # stopped by --minutes between validations
            mean = checkpoint_now()
            if history:
                history[-1]["val_dice"] = mean
        _append_history(s.out, history)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return s.out / "best.lcs"


def _append_history(out: Path, rows: list[dict]) -> None:
    """history.csv grows across resumed runs; history.png plots loss and validation Dice."""
    path = out / "history.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "val_dice"])
        if new:
            writer.writeheader()
        writer.writerows(rows)
    from .plots import plot_history
    plot_history(path, out / "history.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, help="folder with labels.csv, images/ and labels/ (see module docs)")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder: best.lcs, last.lcs, history.csv/png")
    parser.add_argument("--atlas", required=True, help="name of the case that serves as the atlas (file name without extension)")
    parser.add_argument("--spacing", type=float, default=2.0, help="model grid spacing in mm (default 2)")
    parser.add_argument("--labels", help="comma-separated label names or values to train on (default: all in the atlas)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, help="stop after this many minutes even if steps remain")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--depth", type=int, default=4, help="number of 2x poolings (paper: 4, bottleneck at 1/16)")
    parser.add_argument("--norm", default="batch", choices=["batch", "instance", "group", "none"])
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout in the decoder (e.g. 0.1): lets lcs relabel and Slicer measure uncertainty")
    parser.add_argument("--condition-levels", default="bottleneck", choices=["bottleneck", "all"],
                        help="where the atlas enters the decoder: the paper's bottleneck only, or every scale")
    parser.add_argument("--strength", type=float, default=1.0, help="scale of the random subject deformations")
    parser.add_argument("--validate-every", type=int, default=200)
    parser.add_argument("--validation-subjects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=1, help="processes generating subjects")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    parser.add_argument("--init", type=Path, help="start from the weights of this checkpoint (e.g. to continue the demo model)")
    parser.add_argument("--name", default="LCS model", help="model name stored in the checkpoint")
    parser.add_argument("--baseline", action="store_true",
                        help="train the paper's multi-channel baseline instead: the same U-Net without the atlas, "
                             "one output channel per label (for lcs evaluate and the experiments)")


def run(args: argparse.Namespace) -> None:
    config = ModelConfig(base_channels=args.base_channels, depth=args.depth, norm=args.norm,
                         condition_levels=args.condition_levels, dropout=args.dropout)
    settings = TrainSettings(data=args.data, out=args.out, atlas=args.atlas, spacing=args.spacing, model=config,
                             labels=args.labels.split(",") if args.labels else None, steps=args.steps, minutes=args.minutes,
                             batch_size=args.batch_size, lr=args.lr, strength=args.strength,
                             validate_every=args.validate_every, validation_subjects=args.validation_subjects,
                             seed=args.seed, device=args.device, workers=args.workers, resume=args.resume, init=args.init,
                             name=args.name, baseline=args.baseline)
    best = train(settings)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {best}")
