"""`lcs pretrain`: self-supervised siamese pretraining of the LCS encoder (Dhere and Sivaswamy's proxy task, adapted
to any atlas whose labels come in left/right pairs).

The proxy task: given two crops, each around one side of a paired structure (Hippocampus_L or Hippocampus_R, say) in
some scan, tell whether they show the same side. Every scan is registered to the atlas, so one structure lies at the
atlas label's centroid in every scan: no scan needs annotations. Right-side crops are mirrored, so that the side shows
in the anatomy's shape, not in its orientation or position. Both branches are the LCS encoder with shared weights;
their embeddings (global average pool of the deepest features, then a linear projection) learn by the contrastive
loss with margin 1, and a decoder without skip connections reconstructing the crop regularizes the encoder (the
paper's reconstruction branch). `lcs train --init-encoder encoder.pt` starts from the encoder; the projection and
the reconstruction decoder are discarded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from LabelConditionedSegLib.engine import resolve_device
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.files import atomic_path, check_writable, write_csv
from LabelConditionedSegLib.labels import Label, LabelTable
from LabelConditionedSegLib.model import ConvBlock, LCSNet, ModelConfig
from LabelConditionedSegLib.progress import progress_bar

from .data import check_training_folder, load_atlas, load_cases, load_unlabelled, normalized, read_table

FORMAT = "lcs-encoder/1"
MARGIN = 1.0  # the contrastive loss's margin (the paper's)
EMBEDDING = 32  # length of the projected embedding the contrastive loss compares
VALIDATION_PAIRS = 64  # fixed pairs scored for the proxy accuracy, 16 at a time
SHIFT = 1 / 16  # crops move by up to this share of their edge (2 voxels of 32: a few mm, as registration errs)
ENCODER_OPTIONS = ("base_channels", "depth", "norm")  # what must match between pretraining and training
HISTORY = ("step", "seconds", "loss", "contrastive", "reconstruction", "val_accuracy", "val_loss")
LEFT, RIGHT = 0, 1


@dataclass
class PretrainSettings:
    data: Path
    out: Path
    atlas: str
    unlabelled: Path | None = None  # a folder of scans without labels, registered to the atlas like DATA's cases
    pairs: str | None = None  # "LEFT:RIGHT,..." label names; default: every X_L / X_R pair the atlas holds
    spacing: float = 2.0
    model: ModelConfig = field(default_factory=lambda: ModelConfig(norm="group"))
    crop: int = 32
    steps: int = 2000
    minutes: float | None = None
    batch_size: int = 4  # pairs per step
    lr: float = 1e-3
    weight_decay: float = 1e-2
    reconstruction_weight: float = 1.0
    validate_every: int = 200
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


@dataclass(frozen=True)
class Pair:
    """A structure and its counterpart: the left one is cropped as it is, the right one mirrored."""

    left: Label
    right: Label

    def __str__(self) -> str:
        return f"{self.left.name}:{self.right.name}"


def find_pairs(table: LabelTable, present: Iterable[int], pairs: str | None = None) -> list[Pair]:
    """The paired labels that the atlas holds on its grid (`present`): those named X_L and X_R (any case), or the
    explicit "LEFT:RIGHT,..." list `pairs`. Refuses in one line a list naming an unknown label, a label without a
    voxel on the atlas grid, or no pair at all."""
    present = set(present)
    if pairs is None:
        sides: dict[str, dict[str, Label]] = {}
        for label in table:
            found = re.fullmatch(r"(.+)_([LR])", label.name, re.IGNORECASE)
            if found and label.value in present:
                sides.setdefault(found[1].lower(), {})[found[2].upper()] = label
        found_pairs = [Pair(s["L"], s["R"]) for s in sides.values() if len(s) == 2]
        if not found_pairs:
            raise LCSError("no paired labels: labels.csv names no two labels X_L and X_R that the atlas holds on its "
                           "grid; name the pairs with --pairs LEFT:RIGHT,LEFT:RIGHT")
        return found_pairs
    chosen = []
    for item in (x.strip() for x in pairs.split(",")):
        names = [x.strip() for x in item.split(":")]
        if len(names) != 2 or not all(names):
            raise LCSError(f"--pairs item {item!r} is not LEFT:RIGHT; write e.g. --pairs Hippocampus_L:Hippocampus_R")
        labels = []
        for name in names:
            try:
                labels.append(table.resolve(name))
            except LCSError:
                raise LCSError(f"--pairs names {name!r}, which labels.csv does not list; use the names (or values) "
                               "that labels.csv gives") from None
        left, right = labels
        if left.value == right.value:
            raise LCSError(f"--pairs item {item!r} pairs a label with itself; give a structure and its counterpart")
        for label in (left, right):
            if label.value not in present:
                raise LCSError(f"--pairs names {label.name}, which has no voxel on the atlas grid; leave it out or "
                               "use a finer --spacing")
        chosen.append(Pair(left, right))
    return chosen


def left_right_axis(direction: Sequence[float]) -> int:
    """The array axis (of a (z, y, x) array, as SimpleITK gives it) whose physical direction is most along x, the
    patient's left-right axis: index axis j is array axis 2 - j."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)  # column j: the physical direction of index axis j
    return 2 - int(np.argmax(np.abs(matrix[0])))


def centroids(labels: np.ndarray, values: Iterable[int]) -> dict[int, np.ndarray]:
    """Each label's centroid in array indices (the structure's place in every scan registered to the atlas)."""
    return {v: np.argwhere(labels == v).mean(0) for v in values}


def crop_cube(volume: np.ndarray, center: Sequence[float], size: int, shift: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The size**3 cube whose centre is nearest `center` (array indices), moved by `shift` voxels; zero where it
    leaves the volume."""
    start = [int(np.floor(c - (size - 1) / 2 + 0.5)) + s for c, s in zip(center, shift)]
    out = np.zeros((size,) * 3, dtype=volume.dtype)
    source = tuple(slice(max(a, 0), min(a + size, n)) for a, n in zip(start, volume.shape))
    if all(s.stop > s.start for s in source):
        out[tuple(slice(s.start - a, s.stop - a) for s, a in zip(source, start))] = volume[source]
    return out


def side_crop(volume: np.ndarray, center: Sequence[float], size: int, side: int, axis: int,
              shift: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The crop of one side of a pair: a right-side crop (side 1) is cut from the volume mirrored along the
    left-right `axis`, at the mirrored centre, so that the mirror image of a right structure and its left
    counterpart in a symmetric volume give the same crop, voxel for voxel."""
    if side == RIGHT:
        volume = np.flip(volume, axis)
        center = list(center)
        center[axis] = volume.shape[axis] - 1 - center[axis]
    return crop_cube(volume, center, size, shift)


@dataclass(frozen=True)
class Sample:
    """One proxy pair: a paired structure, a scan and a side for each branch, their shifts, and the label `same`
    (1: both crops show the same side, 0: opposite sides)."""

    pair: int
    scans: tuple[int, int]
    sides: tuple[int, int]
    shifts: tuple[tuple[int, ...], tuple[int, ...]]
    same: int


def draw_sample(rng: np.random.Generator, pairs: int, scans: int, max_shift: int) -> Sample:
    """A random proxy pair: the label first (same or opposite sides, half the time each), then the sides that give
    it; the two crops come from two different scans when there are several."""
    same = int(rng.random() < 0.5)
    first = int(rng.integers(2))
    a = int(rng.integers(scans))
    b = a if scans == 1 else int(rng.choice([k for k in range(scans) if k != a]))
    shifts = tuple(tuple(int(s) for s in rng.integers(-max_shift, max_shift + 1, 3)) for _ in range(2))
    return Sample(int(rng.integers(pairs)), (a, b), (first, first if same else 1 - first), shifts, same)


def sample_crops(sample: Sample, volumes: list[np.ndarray], centers: list[tuple[np.ndarray, np.ndarray]], size: int,
                 axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The two crops of a sample; centers[pair] holds the (left, right) centroids."""
    return tuple(side_crop(volumes[scan], centers[sample.pair][side], size, side, axis, shift)
                 for scan, side, shift in zip(sample.scans, sample.sides, sample.shifts))


def embedding_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between the two branches' embeddings, one per pair."""
    return torch.linalg.vector_norm(a - b, dim=1)


def contrastive_loss(distance: torch.Tensor, same: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    """Per pair: y d**2 + (1 - y) max(0, m - d)**2: same-side embeddings pulled together, opposite-side ones pushed
    at least the margin apart."""
    return same * distance**2 + (1 - same) * torch.clamp(margin - distance, min=0) ** 2


class Siamese(nn.Module):
    """Both branches of the proxy task: the LCS encoder (an LCSNet's `down` blocks, used through `encode`), an
    embedding head and, with `reconstruct`, the paper's reconstruction decoder (transposed convolutions back to the
    crop size, no skip connections). Only `net.down` is kept after pretraining."""

    def __init__(self, config: ModelConfig, reconstruct: bool = True):
        super().__init__()
        self.net = LCSNet(config)
        channels = [block[0].out_channels for block in self.net.down]
        self.project = nn.Linear(channels[-1], EMBEDDING)
        layers = []
        for level in reversed(range(config.depth)):
            layers += [nn.ConvTranspose3d(channels[level + 1], channels[level], 2, stride=2),
                       ConvBlock(channels[level], channels[level], config.norm)]
        self.reconstruct = nn.Sequential(*layers, nn.Conv3d(channels[0], 1, 1)) if reconstruct else None

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        deepest = self.net.encode(crops)[-1]
        embedding = self.project(deepest.mean((2, 3, 4)))
        return embedding, None if self.reconstruct is None else self.reconstruct(deepest)

    def parameters_trained(self) -> list[nn.Parameter]:
        """The encoder, the projection and the reconstruction decoder (not the LCS decoder, which sees no data)."""
        modules = [self.net.down, self.project] + ([self.reconstruct] if self.reconstruct is not None else [])
        return [p for m in modules for p in m.parameters()]

    def encoder_weights(self) -> dict[str, torch.Tensor]:
        """The encoder's entries of LCSNet.state_dict() ("down.0.0.weight", ...), on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items() if k.startswith("down.")}


def history_path(out: Path) -> Path:
    """encoder.pt -> encoder_history.csv, beside it."""
    return out.with_name(f"{out.stem}_history.csv")


def check_settings(s: PretrainSettings) -> None:
    """Refuse, in one line and before any work, options that cannot run and an output that would be overwritten."""
    factor = s.model.factor
    if s.crop < 2 * factor or s.crop % factor:
        raise LCSError(f"--crop {s.crop} must be a multiple of 2**depth = {factor} (--depth {s.model.depth}) and at "
                       f"least {2 * factor}, so that the deepest features keep more than one voxel; use e.g. "
                       f"--crop {max(2 * factor, -(-s.crop // factor) * factor)}")
    for name, value in (("--steps", s.steps), ("--batch-size", s.batch_size), ("--validate-every", s.validate_every),
                        ("--lr", s.lr), ("--spacing", s.spacing)):
        if not value > 0:
            raise LCSError(f"{name} must be positive, not {value}")
    if s.weight_decay < 0 or s.reconstruction_weight < 0:
        raise LCSError("--weight-decay and --reconstruction-weight must not be negative")
    if s.out.is_dir():
        raise LCSError(f"-o {s.out} is a folder; give a file name such as {s.out / 'encoder.pt'}")
    for path in (s.out, history_path(s.out)):
        if path.exists() and not s.overwrite:
            raise LCSError(f"{path} already exists; choose another -o or pass --overwrite")
    check_writable(s.out, s.out.parent, "; choose another -o")


def validate(model: Siamese, crops: tuple[torch.Tensor, torch.Tensor], same: torch.Tensor, batch: int = 16
             ) -> tuple[float, float]:
    """(proxy accuracy, mean contrastive loss) on fixed pairs; a pair counts as same-side when d < margin / 2."""
    model.eval()
    distances = []
    with torch.no_grad():
        for k in range(0, len(same), batch):
            a, b = crops[0][k:k + batch], crops[1][k:k + batch]
            embedding, _ = model(torch.cat([a, b]))
            distances.append(embedding_distance(embedding[:len(a)], embedding[len(a):]))
    model.train()
    distance = torch.cat(distances)
    accuracy = ((distance < MARGIN / 2).float() == same).float().mean().item()
    return accuracy, contrastive_loss(distance, same).mean().item()


def pretrain(s: PretrainSettings) -> Path:
    """Run the proxy task and write the encoder (s.out) and its history; returns s.out."""
    check_settings(s)
    check_training_folder(s.data, s.atlas)
    device = resolve_device(s.device)
    atlas = load_atlas(s.data, s.atlas, s.spacing, s.model.factor)
    pairs = find_pairs(read_table(s.data), atlas.present, s.pairs)
    cases = load_cases(s.data, atlas) + (load_unlabelled(s.unlabelled, atlas) if s.unlabelled is not None else [])
    volumes = [normalized(case.image, atlas.mask) for case in cases]
    where = centroids(sitk.GetArrayViewFromImage(atlas.labels), [v for p in pairs for v in (p.left.value, p.right.value)])
    centers = [(where[p.left.value], where[p.right.value]) for p in pairs]
    axis = left_right_axis(atlas.image.GetDirection())
    max_shift = int(s.crop * SHIFT)
    s.out.parent.mkdir(parents=True, exist_ok=True)

    def batch_of(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        crops = [sample_crops(x, volumes, centers, s.crop, axis) for x in samples]
        a, b = (torch.from_numpy(np.stack([c[k] for c in crops])[:, None]).to(device) for k in (0, 1))
        return a, b, torch.tensor([x.same for x in samples], dtype=torch.float32, device=device)

    rng = np.random.default_rng([s.seed, 10_000])  # the validation pairs: their own seed, the same every run
    check_a, check_b, check_same = batch_of([draw_sample(rng, len(pairs), len(volumes), max_shift)
                                             for _ in range(VALIDATION_PAIRS)])
    torch.manual_seed(s.seed)
    model = Siamese(s.model, reconstruct=s.reconstruction_weight > 0).to(device)
    optimizer = torch.optim.Adam(model.parameters_trained(), lr=s.lr, weight_decay=s.weight_decay)
    rng = np.random.default_rng(s.seed)
    history: list[dict] = []
    accuracy = validation_loss = None
    start = time.time()
    bar = progress_bar(total=s.steps, desc="pretraining")
    for step in range(1, s.steps + 1):
        a, b, same = batch_of([draw_sample(rng, len(pairs), len(volumes), max_shift) for _ in range(s.batch_size)])
        crops = torch.cat([a, b])
        embedding, rebuilt = model(crops)
        contrastive = contrastive_loss(embedding_distance(embedding[:len(a)], embedding[len(a):]), same).mean()
        reconstruction = F.mse_loss(rebuilt, crops) if rebuilt is not None else torch.zeros((), device=device)
        loss = contrastive + s.reconstruction_weight * reconstruction
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {"step": step, "seconds": round(time.time() - start, 2), "loss": loss.item(),
               "contrastive": contrastive.item(), "reconstruction": reconstruction.item(), "val_accuracy": "",
               "val_loss": ""}
        out_of_time = s.minutes is not None and time.time() - start > 60 * s.minutes
        if step % s.validate_every == 0 or step == s.steps or out_of_time:
            accuracy, validation_loss = validate(model, (check_a, check_b), check_same)
            row.update(val_accuracy=accuracy, val_loss=validation_loss)
            write_csv(history + [row], history_path(s.out), HISTORY)
        history.append(row)
        bar.set_postfix(loss=f"{loss.item():.3f}", proxy_accuracy="-" if accuracy is None else f"{accuracy:.2f}")
        bar.update(1)
        if out_of_time:
            break
    bar.close()
    seconds = round(time.time() - start, 1)
    provenance = {
        "data": str(s.data), "atlas": s.atlas, "unlabelled": None if s.unlabelled is None else str(s.unlabelled),
        "pairs": [str(p) for p in pairs], "scans": [case.name for case in cases], "steps": len(history),
        "seconds": seconds, "proxy_accuracy": accuracy, "validation_loss": validation_loss,
        "validation_pairs": VALIDATION_PAIRS, "left_right_axis": axis,
        "settings": {"spacing_mm": s.spacing, "crop": s.crop, "batch_size": s.batch_size, "lr": s.lr,
                     "weight_decay": s.weight_decay, "reconstruction_weight": s.reconstruction_weight,
                     "margin": MARGIN, "embedding": EMBEDDING, "max_shift": max_shift, "seed": s.seed,
                     "device": str(device)},
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    contents = {"format": FORMAT, "config": json.dumps(s.model.to_dict()), "weights": model.encoder_weights(),
                "provenance": json.dumps(provenance)}
    with atomic_path(s.out) as temporary:
        torch.save(contents, str(temporary))
    print(f"proxy accuracy {accuracy:.3f} on {VALIDATION_PAIRS} fixed pairs (contrastive loss {validation_loss:.3f}) "
          f"after {len(history)} steps in {seconds:.0f} s on {len(cases)} scans, {len(pairs)} label pairs")
    return s.out


def load_encoder(path: str | Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The pretrained `down.*` weights of `path` for an LCSNet of `config` (load with strict=False). Refuses in one
    line a missing, damaged or foreign file, one holding pickled objects (never unpickled: they could run code), and
    an encoder pretrained with other --base-channels, --depth or --norm."""
    path = Path(path)
    hint = "give the encoder.pt that 'lcs pretrain' wrote, or pretrain again"
    if not path.is_file():
        raise LCSError(f"encoder {path} does not exist; {hint}")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # pickle refusals, zip errors, truncation
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise LCSError(f"{path} holds a pickled Python object ({found[1]}), which lcs does not load (it could run "
                           f"code); {hint}") from None
        reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else type(error).__name__
        raise LCSError(f"{path} is damaged, cut short or not a torch file ({reason}); {hint}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise LCSError(f"{path} is not an encoder of lcs pretrain (no '{FORMAT}' marker); {hint}")
    try:
        saved = json.loads(raw["config"])
        weights = dict(raw["weights"])
    except (KeyError, TypeError, ValueError) as error:
        raise LCSError(f"{path} is a damaged encoder ({type(error).__name__}); {hint}") from None
    for option in ENCODER_OPTIONS:
        if saved.get(option) != getattr(config, option):
            flag = "--" + option.replace("_", "-")
            raise LCSError(f"{path} was pretrained with {flag} {saved.get(option)}; train with {flag} "
                           f"{saved.get(option)} or pretrain with {flag} {getattr(config, option)}")
    expected = {k: v.shape for k, v in LCSNet(config).state_dict().items() if k.startswith("down.")}
    if set(weights) != set(expected) or any(not torch.is_tensor(weights[k]) or weights[k].shape != shape
                                            for k, shape in expected.items()):
        raise LCSError(f"{path} is a damaged encoder (its weights do not fit the encoder of its settings); {hint}")
    return weights


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", type=Path, metavar="DATA",
                        help="training folder (labels.csv, images/, labels/): every case is a scan to pretrain on; of "
                             "the label maps only the atlas's is read, to locate the structures")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="the encoder file to write (e.g. encoder.pt); OUT_history.csv is written beside it")
    parser.add_argument("--atlas", required=True, help="name of the atlas case in DATA/images (its file name without extension)")
    parser.add_argument("--unlabelled", type=Path,
                        help="folder of scans without labels (FOLDER/images/ or FOLDER itself), pretrained on too")
    parser.add_argument("--pairs", help="comma-separated LEFT:RIGHT label names (default: every pair of labels named "
                                        "X_L and X_R that the atlas holds)")
    parser.add_argument("--spacing", type=float, default=2.0, help="model grid spacing in mm")
    parser.add_argument("--base-channels", type=int, default=8, help="as lcs train's (they must match)")
    parser.add_argument("--depth", type=int, default=4, help="as lcs train's (they must match)")
    parser.add_argument("--norm", default="group", choices=["batch", "instance", "group", "none"],
                        help="as lcs train's (they must match; the paper's group norm by default, so train with "
                             "--norm group)")
    parser.add_argument("--crop", type=int, default=32,
                        help="edge of the cubic crops in voxels, a multiple of 2**depth")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--minutes", type=float, help="stop after this many minutes even if steps remain")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="crop pairs per step (the paper's batch of one pair was a memory limit of its large crops)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (the paper's)")
    parser.add_argument("--weight-decay", type=float, default=1e-2, help="Adam weight decay (the paper's)")
    parser.add_argument("--reconstruction-weight", type=float, default=1.0,
                        help="weight of the reconstruction branch's MSE (0: off). The paper adds the branch without "
                             "a stated weight; 1 keeps it next to the contrastive loss, which starts near 0.5, while "
                             "the MSE of 0..1 intensities is smaller: a regularizer, not the task (default %(default)s)")
    parser.add_argument("--validate-every", type=int, default=200,
                        help="steps between proxy-accuracy measurements on the fixed validation pairs")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights and pairs (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing -o and its history")


def run(args: argparse.Namespace) -> None:
    if args.depth < 1 or args.base_channels < 1:
        raise LCSError(f"--depth {args.depth} and --base-channels {args.base_channels} must be positive")
    config = ModelConfig(base_channels=args.base_channels, depth=args.depth, norm=args.norm)
    out = pretrain(PretrainSettings(
        data=args.data, out=args.out, atlas=args.atlas, unlabelled=args.unlabelled, pairs=args.pairs,
        spacing=args.spacing, model=config, crop=args.crop, steps=args.steps, minutes=args.minutes,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        reconstruction_weight=args.reconstruction_weight, validate_every=args.validate_every, seed=args.seed,
        device=args.device, overwrite=args.overwrite))
    print(f"wrote {out} and {history_path(out)}; train from it with: lcs train {args.data} --atlas {args.atlas} "
          f"--init-encoder {out} --base-channels {config.base_channels} --depth {config.depth} --norm {config.norm}")
