"""Shared real objects: the Colin27 + AAL folder, and a tiny LCS model trained once per test session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.model import ModelConfig
from lcs_training.data import write_colin27_aal
from lcs_training.synth import Strength, SubjectGenerator, random_grid
from lcs_training.train import TrainSettings, train

# Large AAL labels that a tiny model learns in a minute at 4 mm.
TINY_LABELS = ["Frontal_Sup_L", "Frontal_Sup_R", "Temporal_Mid_L", "Temporal_Mid_R", "Cerebelum_6_L", "Precuneus_R"]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def colin27(tmp_path_factory) -> Path:
    return write_colin27_aal(tmp_path_factory.mktemp("colin27"))


@pytest.fixture(scope="session")
def tiny_checkpoint(colin27, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_model")
    settings = TrainSettings(colin27, out, "colin27", spacing=4.0,
                             model=ModelConfig(base_channels=8, depth=3, condition_levels="all", dropout=0.1),
                             labels=TINY_LABELS, steps=240, lr=3e-3, strength=0.6, validate_every=120,
                             validation_subjects=2, seed=0, device="cpu", workers=1, name="tiny test model")
    return train(settings)


@pytest.fixture(scope="session")
def tiny_baseline(colin27, tmp_path_factory) -> Path:
    """The paper's multi-channel baseline with the tiny model's labels, grid and training budget."""
    out = tmp_path_factory.mktemp("tiny_baseline")
    settings = TrainSettings(colin27, out, "colin27", spacing=4.0, model=ModelConfig(base_channels=8, depth=3),
                             labels=TINY_LABELS, steps=240, lr=3e-3, strength=0.6, validate_every=120,
                             validation_subjects=2, seed=0, device="cpu", workers=1, name="tiny test baseline",
                             baseline=True)
    return train(settings)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint) -> Checkpoint:
    return Checkpoint.load(tiny_checkpoint)


def heldout_subject(colin27: Path, seed: int, strength: float = 0.6, grid: str = "random"):
    """(image, truth) from Colin27 on a random scanner grid (other spacing, axes, field of view)."""
    image = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    labels = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    mask = sitk.ReadImage(str(colin27 / "masks/colin27.nii.gz"))
    rng = np.random.default_rng([seed, 99])
    target = random_grid(image, rng, spacing_range=(1.5, 2.5)) if grid == "random" else None
    return SubjectGenerator(image, labels, mask).sample(rng, Strength().times(strength), grid=target,
                                                        skull_strip_probability=0, fov_cut_probability=0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))
