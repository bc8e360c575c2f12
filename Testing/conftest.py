"""Shared real objects: the Colin27 + AAL folder, and tiny trained models kept in Testing/models (see tiny_settings)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.model import ModelConfig
from lcs_training.data import read_table, write_colin27_aal
from lcs_training.synth import Strength, SubjectGenerator, random_grid
from lcs_training.tissues import tissue_classes
from lcs_training.train import TrainSettings

# Large AAL labels that a tiny model learns in a minute at 4 mm.
TINY_LABELS = ["Frontal_Sup_L", "Frontal_Sup_R", "Temporal_Mid_L", "Temporal_Mid_R", "Cerebelum_6_L", "Precuneus_R"]

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def colin27(tmp_path_factory) -> Path:
    return write_colin27_aal(tmp_path_factory.mktemp("colin27"))


@pytest.fixture(scope="session")
def colin27_2mm(colin27):
    """Colin27's image, labels, brain mask and tissue classes at 2 mm (fast enough for the fast tier)."""
    def read(kind: str, interpolator: int) -> sitk.Image:
        image = sitk.ReadImage(str(colin27 / f"{kind}/colin27.nii.gz"))
        size = [s // 2 for s in image.GetSize()]
        return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [2.0] * 3,
                             image.GetDirection())
    image, labels, mask = read("images", sitk.sitkLinear), read("labels", sitk.sitkNearestNeighbor), \
        read("masks", sitk.sitkNearestNeighbor)
    return image, labels, mask, tissue_classes(image, mask, labels, read_table(colin27))


MODELS = Path(__file__).resolve().parent / "models"  # tiny trained models, made by Testing/make_test_models.py


def tiny_settings(data: Path, out: Path, baseline: bool = False) -> TrainSettings:
    """The tiny test models: 4 mm, six large AAL labels, 240 steps of two subjects with one label each (about 2
    minutes each on 2 CPU cores).

    LCS with the atlas at every decoder scale and dropout (for the uncertainty tests); the paper's multi-channel
    baseline with the same labels, grid and budget."""
    model = ModelConfig(base_channels=8, depth=3) if baseline else \
        ModelConfig(base_channels=8, depth=3, condition_levels="all", dropout=0.1)
    return TrainSettings(data, out, "colin27", spacing=4.0, model=model, labels=TINY_LABELS, steps=240, lr=3e-3,
                         batch_size=2, labels_per_subject=1, strength=0.6, validate_every=120, validation_subjects=2, seed=0,
                         device="cpu", workers=1,
                         name="tiny test baseline" if baseline else "tiny test model", baseline=baseline)


def _committed(name: str) -> Path:
    path = MODELS / f"{name}.lcs"
    if not path.is_file():
        pytest.fail(f"{path} is missing: re-create the test models with .venv/bin/python Testing/make_test_models.py")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """The committed tiny LCS model (the slow tier trains the same settings anew: test_training.py)."""
    return _committed("tiny")


@pytest.fixture(scope="session")
def tiny_baseline() -> Path:
    """The committed tiny multi-channel baseline, with the tiny model's labels, grid and training budget."""
    return _committed("tiny_baseline")


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


def contrast_subject(colin27: Path, contrast: str, index: int = 0):
    """(image, truth): Colin27 painted as `contrast` (lcs_training.contrasts: "pd", "t2", "flair") and made a subject
    by the training generator with validation seed [7, 20000 + index], as the diagnostics in docs/results.md were."""
    from lcs_training.contrasts import contrast_heads
    heads, labels, mask = contrast_heads(colin27, "colin27", [contrast])
    rng = np.random.default_rng([7, 20_000 + index])
    head = heads[contrast]
    return SubjectGenerator(head, labels, mask).sample(rng, Strength(), grid=random_grid(head, rng, spacing_range=(1.5, 2.5)))


def mean_label_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the labels `truth` holds."""
    return float(np.mean([dice(prediction == v, truth == v) for v in np.unique(truth) if v]))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))
