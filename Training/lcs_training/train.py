"""`lcs train`: the paper's recipe on a folder of labelled scans.

Every step each sample gets a random subject (a warped, re-imaged copy of a training case),
a random target label that case holds, merged with a second label half the time; the
soft-Dice loss sees only the conditioned label, and, where the case does not annotate it
completely, only the voxels SMILE's weight map keeps (smile.py). Runs on CPU or CUDA (mixed precision), and
on several processes under `torchrun` (DistributedDataParallel).

Learning from fewer labels (issue 13): `init_encoder` starts from `lcs pretrain`'s siamese encoder (pretrain.py),
`loss="dice-bce-schedule"` moves the loss from BCE to soft Dice, and `adversarial` trains against a discriminator
that also lets unlabelled scans teach (adversarial.py).

An output folder holds one run: a new run refuses a folder that holds one (unless `overwrite`), and a resumed run
(`resume`) takes every setting from OUT/state.pt; only steps, minutes, device and workers may change.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import threading
import time
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from LabelConditionedSegLib import distributed
from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.deformable import deformable_prior
from LabelConditionedSegLib.engine import MARGIN, Condition, Engine, decode_box, resolve_device
from LabelConditionedSegLib.errors import Cancelled, LCSError
from LabelConditionedSegLib.files import atomic_path, check_writable, remove_leftovers, write_csv
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.model import LCSNet, ModelConfig
from LabelConditionedSegLib.progress import progress_bar

from .adversarial import Discriminator, DiscriminatorLoss, generator_loss
from .baseline import segment_multichannel
from .data import Case, load_atlas, load_cases, load_unlabelled, normalized
from .metrics import dice_per_label
from .smile import masked_bce_loss, masked_dice_loss, smile_weight
from .synth import Strength, SubjectGenerator
from .tissues import tissue_classes


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
    batch_size: int = 1
    labels_per_subject: int = 4  # labels taught per subject and step, each decoded in its own box
    deformable_share: float = 0.0  # share of subjects conditioned on the demons-warped atlas (the deformable prior)
    contrast_share: float = 0.0  # share of subjects of a random contrast (tissue classes painted: synth.paint)
    subject_reuse: int = 1  # steps each generated subject serves on average (from a pool of this many), new labels each
    lr: float = 1e-4
    merge_probability: float = 0.5
    strength: float = 1.0
    validate_every: int = 200
    validation_subjects: int = 2
    seed: int = 0
    device: str = "auto"
    workers: int = 1
    resume: bool = False  # continue the run saved in out/state.pt, with its settings (see `resumed`)
    overwrite: bool = False  # replace the run that out holds (else a folder holding one is refused)
    init: Path | None = None  # start from this checkpoint's weights (same architecture)
    init_encoder: Path | None = None  # start the encoder from `lcs pretrain`'s encoder.pt
    loss: str = "dice"  # or "dice-bce-schedule": (1 - b) soft Dice + b BCE, b going from bce_start to bce_end
    bce_start: float = 0.6
    bce_end: float = 0.0
    adversarial: bool = False  # train against a discriminator (adversarial.py), on unlabelled scans too
    unlabelled: Path | None = None  # a folder of scans without labels, for adversarial training
    lambda_adv: float = 0.01  # the segmenter's adversarial BCE on labelled crops (Hung et al.'s lambda_adv)
    lambda_unlabelled: float = 0.001  # ... on unlabelled crops, its only loss there (Hung et al.'s lambda_semi_adv)
    unlabelled_after: int = 100  # steps of labelled training (the discriminator learning) before unlabelled crops
    self_training: float = 0.0  # > 0: Hung et al.'s self-training on unlabelled voxels the discriminator trusts above this
    baseline: bool = False  # train the paper's multi-channel baseline (no atlas input, one channel per label)
    name: str = "LCS model"


PRIORS = ("affine", "deformable")
LOSSES = ("dice", "dice-bce-schedule")


@dataclass
class LabelCrop:
    """One training label of a subject: its decoding box (as the engine decodes it) with the atlas condition, the target
    and SMILE's weight map inside it."""

    start: tuple[int, int, int]
    condition: np.ndarray  # the (possibly warped) atlas mask, float32 (1, d, h, w)
    target: np.ndarray | None  # None on an unlabelled scan: nothing supervised comes from it
    weight: np.ndarray | None


class SubjectStream(IterableDataset):
    """Endless (image, atlas image, label crops) samples: a random subject (a warped, re-imaged copy of a training case)
    with `labels_per_subject` random target labels, each cropped to the box the engine decodes it in. The encoder
    runs once per subject and each label decodes only its box, so a step teaches several labels for the cost of about
    one whole-grid pass. With the deformable prior, a share of the subjects is conditioned on the atlas warped onto
    them by the same demons registration that inference runs (`--registration deformable`). Subjects of unlabelled
    cases (Case.unlabelled) get any trained labels as conditions and crops without target or weight. With `reuse`
    R > 1 the last R subjects made are kept and each sample draws one of them, with new labels: a subject serves R
    samples on average, and making subjects (a SimpleITK warp, and the demons registration) costs R times less a step."""

    def __init__(self, cases: list[Case], atlas: Case, labels: list[int], strength: Strength, merge_probability: float,
                 seed: int, labels_per_subject: int = 4, deformable_share: float = 0.0, factor: int = 16,
                 region_invariant: bool = True, reuse: int = 1, tissues: list[sitk.Image | None] | None = None,
                 contrast_share: float = 0.0):
        self.cases, self.atlas, self.labels = cases, atlas, labels
        self.tissues, self.contrast_share = tissues or [None] * len(cases), contrast_share
        self.strength, self.merge_probability, self.seed = strength, merge_probability, seed
        self.labels_per_subject, self.deformable_share, self.factor = labels_per_subject, deformable_share, factor
        self.region_invariant = region_invariant  # else (group or instance norm) the engine decodes the whole grid
        self.reuse = reuse

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        generators = [SubjectGenerator(c.image, c.labels, c.mask, t) for c, t in zip(self.cases, self.tissues)]
        atlas_image = normalized(self.atlas.image, self.atlas.mask)
        atlas_labels = sitk.GetArrayFromImage(self.atlas.labels)
        atlas_mask = sitk.GetArrayFromImage(self.atlas.mask) > 0
        pool, samples = [], 0
        while True:
            if samples % self.reuse == 0:  # a new subject, in place of the oldest
                k = int(rng.integers(len(self.cases)))
                image, labels = generators[k].sample(rng, self.strength, grid=self.atlas.image,
                                                     contrast_probability=self.contrast_share)
                image = normalized(image, self.atlas.mask)
                prior = (deformable_prior(image, atlas_image, self.atlas.image, atlas_mask=atlas_mask)
                         if rng.random() < self.deformable_share else None)
                pool = [*pool, (k, image, sitk.GetArrayFromImage(labels), prior)][-self.reuse:]
            samples += 1
            k, image, values, prior = pool[int(rng.integers(len(pool)))]
            case = self.cases[k]
            labelled = self.labels if case.unlabelled else sorted(set(case.present) | set(case.annotated))
            chosen = [c for c in (pick_labels(rng, self.labels, labelled, self.merge_probability)
                                  for _ in range(self.labels_per_subject)) if c]
            if not chosen:
                continue
            crops = []
            for parts in chosen:
                condition = Condition.of("", 0, np.isin(atlas_labels, parts))
                condition = condition if prior is None else prior.warp(condition)
                start, size = (decode_box(condition.offset, condition.mask.shape, image.shape, MARGIN, self.factor)
                               if self.region_invariant else ((0, 0, 0), image.shape))
                region = tuple(slice(a, a + n) for a, n in zip(start, size))
                truth = None if case.unlabelled else values[region]
                crops.append(LabelCrop(start, condition.within(start, size)[None].astype(np.float32),
                                       None if truth is None else np.isin(truth, parts)[None].astype(np.float32),
                                       None if truth is None else smile_weight(truth, set(parts) <= set(case.annotated))[None]))
            yield image[None], (atlas_image if prior is None else prior.atlas_image)[None], crops


class BaselineStream(IterableDataset):
    """Endless (image, one target channel per label, one SMILE weight map per label) samples for the paper's
    multi-channel baseline, on the whole grid."""

    def __init__(self, cases: list[Case], atlas: Case, labels: list[int], strength: Strength, seed: int):
        self.cases, self.atlas, self.labels, self.strength, self.seed = cases, atlas, labels, strength, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        generators = [SubjectGenerator(c.image, c.labels, c.mask) for c in self.cases]
        while True:
            k = int(rng.integers(len(self.cases)))
            image, labels = generators[k].sample(rng, self.strength, grid=self.atlas.image)
            values = sitk.GetArrayFromImage(labels)
            yield (normalized(image, self.atlas.mask)[None],
                   np.stack([values == v for v in self.labels]).astype(np.float32),
                   np.stack([smile_weight(values, v in self.cases[k].annotated) for v in self.labels]))


class CropLoss(torch.nn.Module):
    """The LCS network's training loss on label crops: encode each subject once, decode each label in its box (the
    crop of every feature map, as the engine decodes), soft Dice over SMILE's weights, or (1 - bce) soft Dice + bce
    BCE. Returns the loss and every crop's logits (the adversarial losses judge them); crops without a target
    (unlabelled scans) add nothing to the loss. A module, so that DistributedDataParallel wraps the whole step."""

    def __init__(self, model: LCSNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, atlas_images: torch.Tensor, crops: list[list[LabelCrop]],
                bce: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features = self.model.encode(images)
        losses, outputs = [], []
        for b, subject in enumerate(crops):
            for crop in subject:
                box = crop_box(crop)
                boxes = [tuple(slice(r.start // 2**level, r.stop // 2**level) for r in box) for level in range(len(features))]
                cropped = [f[(slice(b, b + 1), slice(None), *region)] for f, region in zip(features, boxes)]
                condition = torch.as_tensor(crop.condition, device=images.device)[None]
                logits = self.model.decode(cropped, atlas_images[(slice(b, b + 1), slice(None), *box)], condition).float()
                outputs.append(logits)
                if crop.target is not None:
                    target, weight = (torch.as_tensor(a, device=images.device)[None] for a in (crop.target, crop.weight))
                    loss = masked_dice_loss(logits, target, weight)
                    losses.append((1 - bce) * loss + bce * masked_bce_loss(logits, target, weight) if bce else loss)
        loss = torch.stack(losses).mean() if losses else sum(o.sum() for o in outputs) * 0
        return loss, outputs


def crop_box(crop: LabelCrop) -> tuple[slice, slice, slice]:
    """The crop's region of the model grid."""
    return tuple(slice(a, a + n) for a, n in zip(crop.start, crop.condition.shape[1:]))


def bce_share(settings: TrainSettings, step: int) -> float:
    """The BCE weight of step `step` (0 for the paper's soft Dice): from bce_start at step 0 to bce_end at the last
    step, linearly (the self-supervised kidney paper's schedule: 0.6 BCE + 0.4 Dice at the start, the BCE weight
    handed to Dice as training goes)."""
    if settings.loss == "dice":
        return 0.0
    progress = min(1.0, step / max(1, settings.steps - 1))
    return settings.bce_start + (settings.bce_end - settings.bce_start) * progress


def _collate(samples: list) -> tuple:
    """Subjects stacked, their label crops kept as lists (their boxes differ in size)."""
    images, atlases, crops = zip(*samples)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(atlases)), list(crops)


@dataclass
class Judged:
    """A step's crops as the discriminator sees them, each a list over crops: (image crops, logits, conditions,
    weights) of the labelled and of the unlabelled crops, and (image crops, logits, targets, conditions, weights) of
    the labelled ones for the discriminator's own loss."""

    labelled: tuple
    unlabelled: tuple | None
    for_discriminator: tuple


def _judged(images: torch.Tensor, crops: list[list[LabelCrop]], logits: list[torch.Tensor], device) -> Judged:
    parts: dict[bool, list] = {True: [], False: []}
    flat = [(b, crop) for b, subject in enumerate(crops) for crop in subject]
    for (b, crop), logit in zip(flat, logits):
        image = images[(slice(b, b + 1), slice(None), *crop_box(crop))]
        condition = torch.as_tensor(crop.condition, device=device)[None]
        labelled = crop.target is not None
        target = torch.as_tensor(crop.target, device=device)[None] if labelled else None
        weight = torch.as_tensor(crop.weight, device=device)[None] if labelled else torch.ones_like(condition)
        parts[labelled].append((image, logit, condition, weight, target))
    columns = {k: [list(c) for c in zip(*v)] if v else None for k, v in parts.items()}
    labelled, unlabelled = columns[True], columns[False]
    return Judged(tuple(labelled[:4]), tuple(unlabelled[:4]) if unlabelled else None,
                  (labelled[0], labelled[1], labelled[4], labelled[2], labelled[3]))


def _joined(labelled: tuple, unlabelled: tuple | None) -> tuple:
    """One batch of labelled then unlabelled subjects, so that one forward (one DDP step) decodes them all."""
    if unlabelled is None:
        return labelled
    return (torch.cat([labelled[0], unlabelled[0]]), torch.cat([labelled[1], unlabelled[1]]), labelled[2] + unlabelled[2])


def pick_labels(rng: np.random.Generator, trained: list[int], labelled: list[int], merge_probability: float) -> list[int]:
    """A random target among the labels this case annotates or partly holds, merged with a second one half the time."""
    choices = [v for v in trained if v in set(labelled)]
    if not choices:
        return []
    chosen = [int(rng.choice(choices))]
    if len(choices) > 1 and rng.random() < merge_probability:
        chosen.append(int(rng.choice([v for v in choices if v != chosen[0]])))
    return chosen


def validation_subjects(cases: list[Case], atlas: Case, count: int, strength: Strength, seed: int,
                        tissues: list[sitk.Image | None] | None = None):
    """Fixed held-out subjects (their own seeds) for validation Dice: (image, truth, the labels the truth annotates),
    from the most completely annotated cases first. With tissue classes (a contrast-agnostic run), every second
    subject has a random contrast."""
    rng = np.random.default_rng([seed, 10_000])
    order = sorted(range(len(cases)), key=lambda k: -len(cases[k].annotated))
    tissues = tissues or [None] * len(cases)
    out = []
    for i in range(count):
        case, classes = cases[order[i % len(order)]], tissues[order[i % len(order)]]
        image, labels = SubjectGenerator(case.image, case.labels, case.mask, classes).sample(
            rng, strength, grid=atlas.image, contrast_probability=float(i % 2))
        out.append((normalized(image, atlas.mask), sitk.GetArrayFromImage(labels), set(case.annotated)))
    return out


def validate(model: LCSNet, atlas_image: np.ndarray, atlas_labels: np.ndarray, table: LabelTable, subjects, device,
             priors: list | None = None) -> dict[int, float]:
    """Mean Dice per label over the validation subjects, all labels decoded together as at inference. A subject
    scores only the labels its case annotates: a missing or partly relabeled organ has no truth to compare with.
    `priors` (one deformable_prior per subject) decodes each subject with the atlas warped onto it."""
    engine = Engine(model, atlas_image, device) if model.config.conditioned else None
    conditions = [Condition.of(l.name, l.value, atlas_labels == l.value) for l in table]
    scores: dict[int, list[float]] = {}
    for i, (image, truth, annotated) in enumerate(subjects):
        prior = priors[i] if priors else None
        if engine is None:
            prediction = segment_multichannel(model, image, table.values, device)
        elif prior is None:
            prediction = engine.segment(engine.encode(image), conditions).labels
        else:
            prediction = engine.segment(engine.encode(image, prior.atlas_image), [prior.warp(c) for c in conditions]).labels
        for value, dice in dice_per_label(prediction, truth, [v for v in table.values if v in annotated]).items():
            scores.setdefault(value, []).append(dice)
    model.train()
    return {v: float(np.mean(d)) for v, d in scores.items()}


RUN_FILES = ("best.lcs", "last.lcs", "state.pt", "history.csv")  # a folder holding any of these holds a run
SAVED = ("data", "atlas", "spacing", "model", "labels", "steps", "batch_size", "labels_per_subject", "deformable_share",
         "contrast_share",
         "subject_reuse", "lr", "merge_probability", "strength",
         "validate_every", "validation_subjects", "seed", "baseline", "name", "init", "init_encoder", "loss", "bce_start",
         "bce_end", "adversarial", "unlabelled", "lambda_adv", "lambda_unlabelled", "unlabelled_after",
         "self_training")  # in state.pt, with the weights
CHANGEABLE = ("steps", "minutes", "device", "workers")  # what a resumed run may change


def _settings_json(s: TrainSettings) -> str:
    return json.dumps({name: _comparable(name, getattr(s, name)) for name in SAVED})


def _comparable(name: str, value):
    """A setting as JSON keeps it: paths absolute, the model a dict, labels a list of strings."""
    if name in ("data", "init", "init_encoder", "unlabelled"):
        return None if value is None else str(Path(value).resolve())
    if name == "model":
        return value.to_dict()
    if name == "labels":
        return [str(x).strip() for x in value] if value else None
    if name in ("spacing", "lr", "merge_probability", "strength", "deformable_share", "contrast_share", "bce_start", "bce_end", "lambda_adv",
                "lambda_unlabelled", "self_training"):
        return float(value)
    return value


def _read_state(out: Path, map_location="cpu") -> dict:
    """The resume state of the run in `out` (tensors and plain values only: never unpickles objects)."""
    path = out / "state.pt"
    if not path.is_file():
        raise LCSError(f"--resume: {out} holds no state.pt to continue; leave out --resume to start a new run there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated, not a torch file, or holding objects weights_only refuses
        reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__
        raise LCSError(f"{path} cannot be read ({reason}); start a new run with --overwrite or another -o") from None
    if not isinstance(state, dict) or not isinstance(state.get("settings"), str):
        raise LCSError(f"{path} was written by an older lcs without the run's settings, so resuming cannot keep them; "
                       "start a new run with --overwrite or another -o")
    return state


def saved_settings(out: Path) -> TrainSettings:
    """The settings of the run saved in out/state.pt (resume=True)."""
    text = _read_state(out)["settings"]
    try:
        saved = json.loads(text)
        values = {name: saved[name] for name in SAVED if name in saved}
        values["data"] = Path(values["data"])
        values["model"] = ModelConfig(**values["model"])
        for name in ("init", "init_encoder", "unlabelled"):
            values[name] = None if values.get(name) is None else Path(values[name])
        return TrainSettings(out=out, resume=True, **values)
    except (ValueError, KeyError, TypeError) as error:
        raise LCSError(f"{out / 'state.pt'} holds settings this lcs cannot read ({error}); start a new run with "
                       "--overwrite or another -o") from None


def resumed(s: TrainSettings) -> TrainSettings:
    """The run saved in s.out/state.pt with s's steps, minutes, device and workers: what `train` continues.

    Every other setting comes from the saved run; one that `s` sets to another value than both TrainSettings' default
    and the saved one (data and atlas always count as set) is refused, as is `overwrite`."""
    if s.overwrite:
        raise LCSError(f"--resume continues the run in {s.out} and --overwrite replaces it; pass only one of them")
    saved = saved_settings(s.out)
    for f in fields(TrainSettings):
        if f.name not in SAVED or f.name in CHANGEABLE:
            continue
        value, kept = (_comparable(f.name, v) for v in (getattr(s, f.name), getattr(saved, f.name)))
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if value != kept and (default is MISSING or value != _comparable(f.name, default)):
            raise LCSError(f"{f.name} {_shown(value)} differs from {_shown(kept)} of the run saved in {s.out}; a resumed "
                           "run keeps its settings: leave it out, or start a new run in another folder")
    return replace(saved, out=s.out, **{name: getattr(s, name) for name in CHANGEABLE})


def _shown(value) -> str:
    return "(not set)" if value is None else ",".join(value) if isinstance(value, list) else str(value)


def _check_recipe(s: TrainSettings) -> None:
    """Options that cannot go together, refused in one line before any work."""
    if s.loss not in LOSSES:
        raise LCSError(f"--loss {s.loss} is not one of {', '.join(LOSSES)}")
    if not (0 <= s.bce_start <= 1 and 0 <= s.bce_end <= 1):
        raise LCSError("--bce-start and --bce-end are BCE weights between 0 and 1 (Dice gets the rest)")
    if s.unlabelled is not None and not s.adversarial:
        raise LCSError("--unlabelled scans teach only through the discriminator; add --adversarial")
    if s.baseline and (s.adversarial or s.init_encoder is not None):
        raise LCSError("--baseline trains the paper's multi-channel baseline; --adversarial and --init-encoder are for "
                       "LCS models")
    if s.init is not None and s.init_encoder is not None:
        raise LCSError("--init starts from a whole checkpoint and --init-encoder from a pretrained encoder; pass only one")
    if not (0 <= s.contrast_share <= 1 and 0 <= s.deformable_share <= 1):
        raise LCSError("--contrast-share and --deformable-share are shares of the subjects, between 0 and 1")
    if s.subject_reuse < 1:
        raise LCSError(f"--subject-reuse {s.subject_reuse}: give the number of steps a generated subject serves, 1 or more")
    if s.lambda_adv < 0 or s.lambda_unlabelled < 0 or not 0 <= s.self_training < 1:
        raise LCSError("--lambda-adv and --lambda-unlabelled must not be negative, --self-training is a threshold in [0, 1)")


def _check_out(s: TrainSettings) -> None:
    """Before any work: a new run refuses a folder holding a run (unless overwrite); the folder must be writable."""
    if s.out.exists() and not s.out.is_dir():
        raise LCSError(f"-o {s.out} is a file, not a folder; choose another -o")
    found = [name for name in RUN_FILES if (s.out / name).exists()]
    if found and not s.resume and not s.overwrite:
        raise LCSError(f"{s.out} already holds a training run ({', '.join(found)}); pass --resume to continue it, "
                       "--overwrite to replace it, or choose another -o")
    check_writable(s.out, s.out, "; choose another -o")


def train(s: TrainSettings) -> Path:
    """Train, validating every `validate_every` steps; returns the path of the best checkpoint.

    Refuses an output folder that holds a run unless `resume` (continue it, with its saved settings: `resumed`) or
    `overwrite` (replace it). Nothing is written before the first validation: a failed start leaves no folder behind,
    and the run it would replace intact. Ctrl-C saves the last completed step (last.lcs unvalidated, state.pt, the
    history) and raises Cancelled saying where --resume continues."""
    if s.resume:
        s = resumed(s)
    _check_recipe(s)
    _check_out(s)
    rank, world, local_rank = distributed.start()
    device = resolve_device(s.device)
    if device.type == "cuda" and world > 1:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    torch.manual_seed(s.seed + rank)

    table_path = s.data / "labels.csv"
    full_table = LabelTable.read_csv(table_path)  # also names the deep grey structures of the tissue classes
    atlas = load_atlas(s.data, s.atlas, s.spacing, s.model.factor)
    table = LabelTable([l for l in full_table if l.value in set(atlas.present)])
    if s.labels:
        table = LabelTable(table.resolve(x) for x in s.labels)
    cases = load_cases(s.data, atlas)
    unlabelled = [c for c in cases if c.unlabelled] + (load_unlabelled(s.unlabelled, atlas) if s.unlabelled else [])
    cases = [c for c in cases if not c.unlabelled]
    tissues = [tissue_classes(c.image, c.mask, c.labels, full_table) if s.contrast_share > 0 and c.mask is not None
               else None for c in cases]
    atlas_image = normalized(atlas.image, atlas.mask)
    atlas_labels = sitk.GetArrayFromImage(atlas.labels)
    strength = Strength().times(s.strength)

    config = replace(s.model, baseline_labels=len(table)) if s.baseline else s.model
    model = LCSNet(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr)
    step, best, history = 0, -1.0, []
    if s.init is not None and not s.resume:  # a resumed run has its weights in state.pt
        initial = Checkpoint.load(s.init)
        if initial.config != config:
            raise LCSError(f"--init {s.init} has architecture {initial.config}, not {config}; match the model options")
        model.load_state_dict(initial.weights)
        step = int(initial.provenance.get("iterations", 0))
    if s.init_encoder is not None and not s.resume:
        from .pretrain import load_encoder
        model.load_state_dict(load_encoder(s.init_encoder, config), strict=False)
    discriminator = DiscriminatorLoss(Discriminator()).to(device) if s.adversarial else None
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=s.lr) if discriminator else None
    state_path = s.out / "state.pt"
    if s.resume:
        state = _read_state(s.out, device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = int(state["step"]), max(float(state["best"]), _best_saved(s.out))
        history = _saved_history(state)
        if discriminator is not None:
            discriminator.load_state_dict(state["discriminator"])
            discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        if rank == 0:
            remove_leftovers(s.out)  # temporary files of a run killed while saving
    step_loss = model if s.baseline else CropLoss(model)
    net = torch.nn.parallel.DistributedDataParallel(step_loss) if world > 1 else step_loss
    judge = torch.nn.parallel.DistributedDataParallel(discriminator) if discriminator and world > 1 else discriminator
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    judge_scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    seed = s.seed * 1000 + rank * 100 + step
    if s.baseline:
        stream, collate = BaselineStream(cases, atlas, table.values, strength, seed), None
    else:
        stream, collate = SubjectStream(cases, atlas, table.values, strength, s.merge_probability, seed,
                                        s.labels_per_subject, s.deformable_share, config.factor,
                                        config.region_invariant, s.subject_reuse, tissues, s.contrast_share), _collate

    def batches(stream: IterableDataset, collate):
        return iter(DataLoader(stream, batch_size=s.batch_size, num_workers=s.workers, persistent_workers=s.workers > 0,
                               collate_fn=collate))

    loader = batches(stream, collate)
    unlabelled_loader = batches(SubjectStream(unlabelled, atlas, table.values, strength, s.merge_probability, seed + 50,
                                              s.labels_per_subject, s.deformable_share, config.factor,
                                              config.region_invariant), _collate) if s.adversarial and unlabelled else None
    subjects = validation_subjects(cases, atlas, s.validation_subjects, strength, s.seed, tissues) if rank == 0 else []
    priors = ["affine"] + (["deformable"] if s.deformable_share > 0 and not s.baseline else [])
    brain = sitk.GetArrayFromImage(atlas.mask) > 0
    warped = [deformable_prior(image, atlas_image, atlas.image, atlas_mask=brain) for image, _, _ in subjects
              if "deformable" in priors]
    elapsed = float(history[-1]["seconds"] or 0) if history else 0.0  # training seconds before this process (0: not kept)
    paused = 0.0  # seconds spent validating and saving, left out of the history's training seconds

    def save(path: Path, dice: dict[int, float], by_prior: dict[str, float], score: float | None) -> None:
        provenance = {
            "name": s.name, "dataset": str(s.data), "atlas_case": s.atlas, "cases": [c.name for c in cases],
            "labels_trained": len(table), "iterations": step, "batch_size": s.batch_size * world, "lr": s.lr,
            "spacing_mm": s.spacing, "augmentation_strength": s.strength, "seed": s.seed,
            "labels_per_subject": s.labels_per_subject, "priors": priors, "deformable_share": s.deformable_share,
            "contrasts": "any (random share {:g})".format(s.contrast_share) if s.contrast_share > 0 else "the cases' own",
            "subject_reuse": s.subject_reuse,
            "loss": s.loss if s.loss == "dice" else f"{s.loss} (BCE {s.bce_start} to {s.bce_end})",
            "init_encoder": None if s.init_encoder is None else str(s.init_encoder),
            "adversarial": {"lambda_adv": s.lambda_adv, "lambda_unlabelled": s.lambda_unlabelled,
                            "unlabelled_after": s.unlabelled_after, "self_training": s.self_training,
                            "unlabelled_scans": [c.name for c in unlabelled]} if s.adversarial else None,
            "validation_dice": score, "validation_dice_by_prior": {k: round(v, 4) for k, v in by_prior.items()},
            "validation_dice_per_label": {str(k): round(v, 4) for k, v in dice.items()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "processes": world,
        }
        image = sitk.GetImageFromArray(atlas_image)
        image.CopyInformation(atlas.image)
        Checkpoint(config, {k: v.cpu() for k, v in model.state_dict().items()}, image, atlas.labels, atlas.mask,
                   table, provenance=provenance).save(path)

    last_score = None
    validated: tuple = (None, {}, {}, None)  # (step, Dice per label, Dice per prior, mean) of the last validation
    saved = step if s.resume else None  # the step of the state.pt in s.out
    written = 0  # history rows in history.csv
    first = True  # first checkpoint: make the folder, remove an overwritten run's files and leftover temporary files

    def checkpoint_now() -> None:
        """Validate, then write the run (`write_run`); rank 0 only."""
        nonlocal last_score, validated, paused
        began = time.time()
        dice = validate(model, atlas_image, atlas_labels, table, subjects, device)
        by_prior = {"affine": float(np.mean(list(dice.values())))}
        if warped:
            by_prior["deformable"] = float(np.mean(list(validate(model, atlas_image, atlas_labels, table, subjects, device,
                                                                 warped).values())))
        mean = last_score = float(np.mean(list(by_prior.values())))  # the checkpoint is chosen on every prior trained
        if history:
            history[-1].update(val_dice=mean, **{f"val_{k}": v for k, v in by_prior.items()})
        validated = (step, dice, by_prior, mean)
        write_run(dice, by_prior, mean)
        paused += time.time() - began

    def write_run(dice: dict[int, float], by_prior: dict[str, float], score: float | None) -> None:
        """Write last.lcs (and best.lcs when `score` beats it; None: not validated), the resume state and the history
        so far.

        Each file is replaced atomically (files.atomic_path): the checkpoints, then state.pt with the history, then
        history.csv. A run killed at any instant resumes from the previous state.pt or this one, with its history."""
        nonlocal best, written, first, saved
        if first:
            s.out.mkdir(parents=True, exist_ok=True)
            for name in (*RUN_FILES, "history.png") if s.overwrite else ():
                (s.out / name).unlink(missing_ok=True)
            remove_leftovers(s.out)
            first = False
        save(s.out / "last.lcs", dice, by_prior, score)
        if score is not None and score > best:
            save(s.out / "best.lcs", dice, by_prior, score)
            best = score  # after best.lcs: a save cut short leaves `best` what best.lcs holds
        with atomic_path(state_path) as temporary:  # the history rides along: a kill before history.csv loses none
            adversary = {"discriminator": discriminator.state_dict(),
                         "discriminator_optimizer": discriminator_optimizer.state_dict()} if discriminator else {}
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best,
                        "settings": _settings_json(s), "history": _history_tensor(history), **adversary}, temporary)
        saved = step
        _write_history(s.out, history)  # after the state: history.csv never runs ahead of it
        written = len(history)

    start_time = time.time()
    bar = progress_bar(total=s.steps, initial=step, desc="training", disable=rank != 0)
    net.train()
    begun = step
    try:
        while step < s.steps and (s.minutes is None or time.time() - start_time < s.minutes * 60):
            batch = next(loader)
            if unlabelled_loader is not None and step >= s.unlabelled_after:
                batch = _joined(batch, next(unlabelled_loader))
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                if s.baseline:
                    image, target, weight = (t.to(device, non_blocking=True) for t in batch)
                    loss = masked_dice_loss(net(image).float(), target, weight)
                else:
                    images = batch[0].to(device)
                    loss, logits = net(images, batch[1].to(device), batch[2], bce_share(s, step))
                    if discriminator is not None:
                        judged = _judged(images, batch[2], logits, device)
                        loss = loss + generator_loss(discriminator.discriminator, *judged.labelled, scale=s.lambda_adv)
                        if judged.unlabelled:
                            loss = loss + generator_loss(discriminator.discriminator, *judged.unlabelled,
                                                         scale=s.lambda_unlabelled, self_training=s.self_training)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            with _holding_ctrl_c():
                scaler.step(optimizer)
                scaler.update()
                if discriminator is not None:  # the discriminator learns from the labelled crops only
                    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                        judge_loss = judge(*judged.for_discriminator)
                    discriminator_optimizer.zero_grad(set_to_none=True)
                    judge_scaler.scale(judge_loss).backward()
                    judge_scaler.step(discriminator_optimizer)
                    judge_scaler.update()
                step += 1
                history.append({"step": step, "seconds": round(elapsed + time.time() - start_time - paused, 2),
                                "loss": loss.item(), **{name: "" for name in HISTORY[3:]}})
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_dice=f"{last_score:.3f}" if last_score is not None else "-")
            if step % s.validate_every == 0 or step == s.steps:
                if rank == 0:
                    checkpoint_now()
                if world > 1:
                    dist.barrier()
    except KeyboardInterrupt:  # Ctrl-C: save the last completed step (without validating it), so --resume loses nothing
        bar.close()
        if rank == 0 and step > begun and saved != step:
            with _holding_ctrl_c(deliver=False):  # a few seconds: no validation
                write_run(*validated[1:]) if validated[0] == step else write_run({}, {}, None)
        raise _cancelled(s.out, step, saved if rank == 0 else step) from None
    bar.close()
    if rank == 0:
        if not history or history[-1]["val_dice"] == "":  # stopped by --minutes between validations
            checkpoint_now()
        if written < len(history):  # resumed at its last step: history.csv may lag behind state.pt
            _write_history(s.out, history)
        if history:  # --steps 0 (or a run already at its steps) trains nothing to plot
            from .plots import plot_history
            plot_history(s.out / "history.csv", s.out / "history.png")
    distributed.finish()
    return s.out / "best.lcs"


@contextlib.contextmanager
def _holding_ctrl_c(deliver: bool = True):
    """Holds back Ctrl-C (SIGINT) until the block ends, then delivers it (or, `deliver` False, drops it). Around a
    training step's update (the optimizers, the step count, its history row), so that it is applied whole or not at
    all; around the save Ctrl-C makes, so that it ends (torchrun passes the Ctrl-C on to its processes a second time)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # only the main thread handles signals; None: a handler set outside Python, left alone
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and deliver:
            signal.raise_signal(signal.SIGINT)  # as the previous handler would have had it (KeyboardInterrupt, or ignored)


def _cancelled(out: Path, step: int, kept: int | None) -> Cancelled:
    """Ctrl-C's one line: the step the run stopped at and the one `--resume` continues from (`kept`, None: no run)."""
    if kept is None:
        return Cancelled(f"cancelled by the user at step {step}; nothing was saved in {out}")
    return Cancelled(f"cancelled by the user at step {step}; {out} holds step {kept}: `lcs train -o {out} --resume` "
                     f"continues from step {kept}")


HISTORY = ("step", "seconds", "loss", "val_dice", "val_affine", "val_deformable")  # val_dice: the mean of the priors


def _write_history(out: Path, rows: list[dict]) -> None:
    """history.csv, rewritten whole (atomically) at every checkpoint; it grows across resumed runs (history.png plots
    it at the end)."""
    write_csv(rows, out / "history.csv", HISTORY)


def _history_tensor(rows: list[dict]) -> torch.Tensor:
    """The history as state.pt keeps it: one row of HISTORY per step, NaN where a validation is blank."""
    return torch.tensor([[math.nan if r.get(k, "") == "" else r[k] for k in HISTORY] for r in rows],
                        dtype=torch.float64).reshape(-1, len(HISTORY))


def _saved_history(state: dict) -> list[dict]:
    """The history of the run up to the step of its state.pt, which keeps it (history.csv may lag one checkpoint).
    A state.pt of an lcs before 'seconds' and the per-prior Dice held (step, loss, val_dice): those columns are blank."""
    columns = HISTORY if state["history"].shape[1] == len(HISTORY) else ("step", "loss", "val_dice")
    return [{**{k: "" for k in HISTORY}, **{k: int(v) if k == "step" else "" if math.isnan(v) else v
                                            for k, v in zip(columns, row)}} for row in state["history"].tolist()]


def _best_saved(out: Path) -> float:
    """The validation Dice of OUT/best.lcs (-1 without one): a run killed after writing best.lcs but before state.pt
    must not replace that model with a worse one when it resumes."""
    try:
        dice = Checkpoint.load(out / "best.lcs").provenance.get("validation_dice")
    except LCSError:
        return -1.0
    return -1.0 if dice is None else float(dice)


class _Given(argparse.Action):
    """Stores an option's value and notes that the user gave it, so that --resume tells it from a default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given_options = getattr(namespace, "given_options", frozenset()) | {self.dest}


class _GivenFlag(_Given):
    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, True, option_string)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`lcs train`'s options; each notes that it was given (args.given_options), so that --resume keeps the saved
    value of every option left out and refuses one given with another value."""
    def add(*names, flag=False, **options):
        parser.add_argument(*names, action=_GivenFlag if flag else _Given, **options)

    parser.set_defaults(given_options=frozenset())
    parser.add_argument("data", type=Path, nargs="?", metavar="DATA",
                        help="folder with labels.csv, images/ and labels/ (see above); with --resume: the saved run's")
    add("-o", "--out", type=Path, required=True,
        help="output folder: best.lcs, last.lcs, state.pt (to resume), history.csv/png; one run per folder")
    add("--atlas", help="name of the case that serves as the atlas (its file name in DATA/images without extension); "
                        "required, except with --resume")
    add("--spacing", type=float, default=2.0, help="model grid spacing in mm (default %(default)s)")
    add("--labels", help="comma-separated label names or values to train on (default: every label of the atlas)")
    add("--steps", type=int, default=2000,
        help="train until this step, counting those of a resumed or --init run (default %(default)s; "
             "with --resume: the saved run's)")
    add("--minutes", type=float, help="stop after this many minutes even if steps remain (default: no limit)")
    add("--batch-size", type=int, default=1, help="subjects per step and process (default %(default)s)")
    add("--labels-per-subject", type=int, default=4,
        help="labels taught per subject and step, each decoded only in its box as at inference (default %(default)s)")
    add("--deformable-share", type=float, default=0.0,
        help="share of subjects conditioned on the atlas warped onto them by the demons registration of "
             "--registration deformable (0: the paper's affine prior only; e.g. 0.5 trains for both) (default %(default)s)")
    add("--contrast-share", type=float, default=0.0,
        help="share of subjects given a random contrast (each tissue class of the case a random intensity, as SynthSeg "
             "trains), so that the model segments T2, PD, FLAIR... too; 0: the cases' own contrast (default %(default)s)")
    add("--subject-reuse", type=int, default=1,
        help="R > 1: keep the last R generated subjects (with their demons priors) and draw each step's subject among "
             "them, so each serves R steps on average with other labels: fewer CPU-seconds spent making subjects "
             "(default %(default)s: a new subject every step)")
    add("--lr", type=float, default=1e-4, help="Adam learning rate (default %(default)s)")
    add("--base-channels", type=int, default=8,
        help="feature channels at full resolution, doubled at each pooling (default %(default)s)")
    add("--depth", type=int, default=4, help="number of 2x poolings (paper: 4, bottleneck at 1/16; default %(default)s)")
    add("--norm", default="batch", choices=["batch", "instance", "group", "none"],
        help="normalization after each convolution (default %(default)s)")
    add("--dropout", type=float, default=0.0,
        help="dropout in the decoder (e.g. 0.1): lets lcs relabel and Slicer measure uncertainty (default %(default)s)")
    add("--prior-weight", type=float, default=0.0,
        help="w > 0: the network outputs its atlas prior (w * (2 * mask - 1) added to its logits, w learned) and "
             "learns what to change in it; 0: the paper's network (default %(default)s)")
    add("--prior-radius", type=int, default=1,
        help="r > 1 grades the prior by depth: w / r on the atlas mask's boundary voxels up to w at r voxels from it "
             "(chessboard distance), so the network's corrections flip boundary voxels easily (default %(default)s: "
             "w everywhere)")
    add("--condition-levels", default="bottleneck", choices=["bottleneck", "all"],
        help="where the atlas enters the decoder: the paper's bottleneck only, or every scale (default %(default)s)")
    add("--strength", type=float, default=1.0, help="scale of the random subject deformations (default %(default)s)")
    add("--validate-every", type=int, default=200,
        help="steps between validations, each writing last.lcs, best.lcs and state.pt (default %(default)s)")
    add("--validation-subjects", type=int, default=2,
        help="fixed held-out subjects the validation Dice is measured on (default %(default)s)")
    add("--seed", type=int, default=0, help="random seed of the subjects, labels and weights (default %(default)s)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N (default %(default)s)")
    add("--workers", type=int, default=1, help="processes generating subjects; 0: the training process (default %(default)s)")
    add("--resume", flag=True, help="continue the run in OUT (from OUT/state.pt) with its saved settings; only --steps, "
                                    "--minutes, --device and --workers may change")
    add("--overwrite", flag=True, help="replace the run that OUT holds (its checkpoints, state and history)")
    add("--init", type=Path, help="start from the weights and step count of this checkpoint, e.g. to continue the demo "
                                  "model (same model options; default: random weights)")
    add("--init-encoder", type=Path, help="start the encoder from this encoder.pt of lcs pretrain (same --base-channels, "
                                          "--depth and --norm); the decoder starts from random weights")
    add("--loss", default="dice", choices=LOSSES,
        help="dice: soft Dice (the LCS paper); dice-bce-schedule: (1 - b) soft Dice + b BCE, the BCE weight b going "
             "linearly from --bce-start to --bce-end over --steps (the self-supervised kidney paper) (default %(default)s)")
    add("--bce-start", type=float, default=0.6, help="BCE weight at the first step of dice-bce-schedule (default %(default)s)")
    add("--bce-end", type=float, default=0.0, help="BCE weight at the last step of dice-bce-schedule (default %(default)s)")
    add("--adversarial", flag=True,
        help="train against a fully convolutional discriminator of (image, prediction, atlas label): it learns ground "
             "truth against predictions on labelled crops, and the network adds --lambda-adv x its adversarial loss; "
             "unlabelled scans (--unlabelled, and cases of DATA whose label map is empty) teach through it alone")
    add("--unlabelled", type=Path, help="folder of scans without labels (FOLDER/images/ or FOLDER itself), registered to "
                                        "the atlas like DATA's; needs --adversarial")
    add("--lambda-adv", type=float, default=0.01, help="weight of the adversarial loss on labelled crops (default %(default)s)")
    add("--lambda-unlabelled", type=float, default=0.001,
        help="weight of the adversarial loss on unlabelled crops, their only loss (default %(default)s)")
    add("--unlabelled-after", type=int, default=100,
        help="steps in which the discriminator learns on labelled crops before unlabelled ones join (default %(default)s)")
    add("--self-training", type=float, default=0.0,
        help="T > 0: on unlabelled crops, also learn the thresholded prediction where the discriminator's confidence "
             "exceeds T (Hung et al. 2018, who use 0.2); 0: off (default %(default)s)")
    add("--name", default="LCS model", help="model name stored in the checkpoint (default: %(default)s)")
    add("--baseline", flag=True,
        help="train the paper's multi-channel baseline instead: the same U-Net without the atlas, "
             "one output channel per label (for lcs evaluate and the experiments)")


_MODEL_OPTIONS = ("base_channels", "depth", "norm", "dropout", "condition_levels", "prior_weight", "prior_radius")
# what --resume takes from state.pt: every saved setting but those a resumed run may change, the model as its options
_SAVED_OPTIONS = (*(name for name in SAVED if name not in ("model", *CHANGEABLE)), *_MODEL_OPTIONS)


def _given(args: argparse.Namespace) -> set[str]:
    """The options the user gave, recorded by _Given (so `--spacing 2` counts although 2 is the default)."""
    return set(args.given_options) | ({"data"} if args.data is not None else set())


def _labels(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",")] if text else None


def _option(dest: str) -> str:
    return "DATA" if dest == "data" else "--" + dest.replace("_", "-")


def _resumed_from_args(args: argparse.Namespace) -> TrainSettings:
    """The saved run, refusing an option the user gave with another value than the saved one."""
    if args.overwrite:
        raise LCSError(f"--resume continues the run in {args.out} and --overwrite replaces it; pass only one of them")
    saved = saved_settings(args.out)
    given = _given(args)
    for dest in _SAVED_OPTIONS:
        if dest not in given:
            continue
        value = _labels(args.labels) if dest == "labels" else getattr(args, dest)
        kept = getattr(saved.model, dest) if dest in _MODEL_OPTIONS else getattr(saved, dest)
        if _comparable(dest, value) != _comparable(dest, kept):
            conflict = (f"the run saved in {args.out} was trained without {_option(dest)}" if isinstance(kept, bool) else
                        f"{_option(dest)} {getattr(args, dest)} differs from {_shown(_comparable(dest, kept))} of the run "
                        f"saved in {args.out}")
            raise LCSError(f"{conflict}; a resumed run keeps its settings: leave out {_option(dest)}, or start a new run "
                           "in another -o")
    return replace(saved, steps=args.steps if "steps" in given else saved.steps, minutes=args.minutes, device=args.device,
                   workers=args.workers)


def run(args: argparse.Namespace) -> None:
    from .data import check_training_folder; check_training_folder(args.data, args.atlas) if args.data is not None and not args.resume else None
    if args.resume:
        settings = _resumed_from_args(args)
    else:
        if args.data is None:
            raise LCSError("give DATA, the training folder (labels.csv, images/, labels/); see 'lcs train --help'")
        if args.atlas is None:
            raise LCSError("--atlas is required: the name of the case in DATA/images that serves as the atlas")
        try:
            config = ModelConfig(**{name: getattr(args, name) for name in _MODEL_OPTIONS})
        except ValueError as error:  # its message names fields, which are the options' names
            raise LCSError(f"model options: {str(error).replace('_', '-')}") from None
        options = {f.name: getattr(args, f.name) for f in fields(TrainSettings) if hasattr(args, f.name)}  # same names
        settings = TrainSettings(**{**options, "labels": _labels(args.labels), "model": config})
    best = train(settings)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {best}")
