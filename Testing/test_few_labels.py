"""Learning from fewer labels (issue 13): the Dice/BCE schedule, the adversarial phases, unlabelled scans."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.model import LCSNet, ModelConfig
from lcs_training.adversarial import Discriminator, DiscriminatorLoss, generator_loss
from lcs_training.data import load_atlas, load_cases, load_unlabelled, normalized
from lcs_training.smile import masked_bce_loss, masked_dice_loss
from lcs_training.synth import Strength, SubjectGenerator
from lcs_training.train import CropLoss, SubjectStream, TrainSettings, _collate, _joined, _judged, bce_share

from conftest import heldout_subject

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Frontal_Sup_L", "Frontal_Sup_R", "Precuneus_L"]
SMALL = ["--spacing", "8", "--depth", "2", "--base-channels", "4", "--labels", ",".join(LABELS), "--validation-subjects",
         "1", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory) -> Path:
    """A folder of two unlabelled scans (warped, re-imaged Colin27 on their own grids, 3-5 mm: the models here train
    at 8 mm)."""
    folder = tmp_path_factory.mktemp("unlabelled")
    (folder / "images").mkdir()
    for seed in (1, 2):
        image, _ = heldout_subject(colin27, seed)
        sitk.WriteImage(sitk.BinShrink(image, [2] * 3), str(folder / "images" / f"scan{seed}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def batches(colin27, scans):
    """A labelled batch (the atlas case, 2 labels) and an unlabelled one, on the 8 mm grid, and a fresh small model."""
    atlas = load_atlas(colin27, "colin27", 8.0, 4)
    unlabelled = load_unlabelled(scans, atlas)
    values = [1, 2, 3]
    labelled = _collate([next(iter(SubjectStream([atlas], atlas, values, Strength(), 0.0, 1, labels_per_subject=2,
                                                 factor=4)))])
    free = _collate([next(iter(SubjectStream(unlabelled, atlas, values, Strength(), 0.0, 2, labels_per_subject=2,
                                             factor=4)))])
    torch.manual_seed(0)
    return labelled, free, LCSNet(ModelConfig(base_channels=4, depth=2))


def test_the_dice_bce_schedule_hands_the_bce_weight_to_dice(tmp_path):
    """0.6 BCE at the first step, 0 at the last, linearly in between (the kidney paper's schedule); plain Dice is 0."""
    s = TrainSettings(tmp_path, tmp_path, "a", steps=101, loss="dice-bce-schedule")
    assert [bce_share(s, step) for step in (0, 50, 100)] == pytest.approx([0.6, 0.3, 0.0])
    assert bce_share(replace(s, bce_start=0.8, bce_end=0.2), 25) == pytest.approx(0.65)
    assert bce_share(replace(s, loss="dice"), 0) == 0.0


def test_the_scheduled_loss_is_the_weighted_sum_of_dice_and_bce(batches):
    labelled, _, model = batches
    images, atlases, crops = labelled
    with torch.no_grad():
        dice_only, logits = CropLoss(model.eval())(images, atlases, crops)
        mixed, _ = CropLoss(model)(images, atlases, crops, bce=0.25)
    parts = [(masked_dice_loss(l, torch.from_numpy(c.target)[None], torch.from_numpy(c.weight)[None]),
              masked_bce_loss(l, torch.from_numpy(c.target)[None], torch.from_numpy(c.weight)[None]))
             for l, c in zip(logits, crops[0])]
    assert float(dice_only) == pytest.approx(float(np.mean([d for d, _ in parts])), abs=1e-6)
    assert float(mixed) == pytest.approx(float(np.mean([0.75 * d + 0.25 * b for d, b in parts])), abs=1e-6)


def test_an_unlabelled_scan_never_contributes_a_supervised_loss(batches, colin27, tmp_path):
    """Unlabelled crops carry a condition but no target; joined to a labelled batch they leave its supervised loss as it
    was and get no gradient from it. In DATA, a case with an empty label map is unlabelled."""
    labelled, free, model = batches
    assert all(c.target is None and c.weight is None and c.condition.any() for c in free[2][0])
    model.eval()  # per-sample normalization statistics: the two subjects do not mix
    images, atlases, crops = _joined(labelled, free)
    images.requires_grad_(True)
    joined, logits = CropLoss(model)(images, atlases, crops)
    alone, _ = CropLoss(model)(*labelled)
    assert len(logits) == len(labelled[2][0]) + len(free[2][0])
    assert joined.item() == pytest.approx(alone.item(), abs=1e-6)
    joined.backward()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0
    nothing, _ = CropLoss(model)(*free)
    assert nothing.item() == 0.0

    data = tmp_path / "data"
    shutil.copytree(colin27, data)
    empty = sitk.ReadImage(str(data / "labels/colin27.nii.gz")) * 0
    image, _ = heldout_subject(colin27, 3)
    sitk.WriteImage(image, str(data / "images/blank.nii.gz"))
    sitk.WriteImage(sitk.Resample(empty, image), str(data / "labels/blank.nii.gz"))
    atlas = load_atlas(data, "colin27", 8.0, 4)
    assert [c.name for c in load_cases(data, atlas) if c.unlabelled] == ["blank"]


def test_a_group_norm_model_learns_on_the_whole_grid_the_engine_decodes(colin27):
    """GroupNorm (the pretraining paper's) depends on the decoded region, so the engine decodes such a model on the
    whole grid; its training crops are the whole grid too."""
    atlas = load_atlas(colin27, "colin27", 8.0, 4)
    image, _, crops = next(iter(SubjectStream([atlas], atlas, [1, 2], Strength(), 0.0, 1, labels_per_subject=2, factor=4,
                                              region_invariant=False)))
    assert all(c.start == (0, 0, 0) and c.target.shape[1:] == image.shape[1:] for c in crops)


def _grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_each_adversarial_phase_trains_only_its_own_network(batches):
    """The segmenter's adversarial losses (labelled: lambda_adv, unlabelled: lambda_unlabelled alone) reach the
    segmenter and leave the discriminator without gradient; the discriminator's loss (ground truth real, predictions
    fake) reaches the discriminator only, and comes from labelled crops only."""
    labelled, free, model = batches
    model.train()
    torch.manual_seed(1)
    judge = DiscriminatorLoss(Discriminator(4))
    images, atlases, crops = _joined(labelled, free)
    for phase in ("labelled", "unlabelled", "discriminator"):
        model.zero_grad(set_to_none=True)
        judge.zero_grad(set_to_none=True)
        _, logits = CropLoss(model)(images, atlases, crops)
        judged = _judged(images, crops, logits, "cpu")
        assert len(judged.labelled[0]) == 2 and len(judged.unlabelled[0]) == 2 and len(judged.for_discriminator[0]) == 2
        if phase == "discriminator":
            judge(*judged.for_discriminator).backward()
            assert all(_grads(judge)) and not any(p.grad is not None for p in model.parameters())
        else:
            parts = judged.labelled if phase == "labelled" else judged.unlabelled
            generator_loss(judge.discriminator, *parts, scale=0.5, self_training=0.2 * (phase == "unlabelled")).backward()
            assert all(p.grad is None for p in judge.parameters()) and any(_grads(model))
            assert all(p.requires_grad for p in judge.parameters())  # unfrozen again for its own phase
    # a partly annotated crop (SMILE's weight not 1 everywhere) has incomplete truth: the discriminator leaves it out
    images_, logits_, targets, conditions, weights = (list(c) for c in judged.for_discriminator)
    partial = [w.clone() for w in weights]
    partial[0][..., : partial[0].shape[-1] // 2] = 0
    flipped = [1 - targets[0]] + targets[1:]
    with torch.no_grad():
        assert float(judge(images_, logits_, flipped, conditions, partial)) == pytest.approx(
            float(judge(images_, logits_, targets, conditions, partial)), abs=1e-6)
        assert float(judge(images_, logits_, flipped, conditions, weights)) != pytest.approx(
            float(judge(images_, logits_, targets, conditions, weights)), abs=1e-6)
    # the segmenter's adversarial loss is scale x the BCE of "ground truth" on the discriminator's verdict
    _, logits = CropLoss(model)(images, atlases, crops)
    judged = _judged(images, crops, logits, "cpu")
    image, logit, condition, weight = (column[0] for column in judged.labelled)
    verdict = judge.discriminator(image, torch.sigmoid(logit), condition)
    expected = 0.5 * masked_bce_loss(verdict, torch.ones_like(verdict), weight)
    one = generator_loss(judge.discriminator, *(column[:1] for column in judged.labelled), scale=0.5)
    assert float(one) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.slow  # two training runs and a segmentation; the phases above keep the adversarial losses in the fast tier
def test_adversarial_training_with_unlabelled_scans_resumes_and_segments(colin27, scans, tmp_path):
    """lcs train --adversarial --unlabelled --loss dice-bce-schedule end to end: the checkpoint records the recipe and
    segments like any other; state.pt keeps the discriminator, so a resumed run continues it."""
    out = tmp_path / "run"
    args = ["train", str(colin27), "--atlas", "colin27", "-o", str(out), *SMALL, "--steps", "4", "--validate-every", "2",
            "--adversarial", "--unlabelled", str(scans), "--unlabelled-after", "1", "--self-training", "0.2",
            "--loss", "dice-bce-schedule"]
    assert main(args) == 0
    provenance = Checkpoint.load(out / "last.lcs").provenance
    assert provenance["adversarial"]["unlabelled_scans"] == ["scan1", "scan2"]
    assert provenance["loss"] == "dice-bce-schedule (BCE 0.6 to 0.0)"
    state = torch.load(out / "state.pt", weights_only=True)
    before = {k: v.clone() for k, v in state["discriminator"].items()}
    assert main(["train", "-o", str(out), "--resume", "--steps", "6", "--workers", "0"]) == 0
    after = torch.load(out / "state.pt", weights_only=True)
    assert after["step"] == 6 and any(not torch.equal(before[k], after["discriminator"][k]) for k in before)
    image, _ = heldout_subject(colin27, 4)
    sitk.WriteImage(image, str(tmp_path / "scan.nii.gz"))
    assert main(["segment", str(tmp_path / "scan.nii.gz"), "-o", str(tmp_path / "scan.seg.nrrd"), "--checkpoint",
                 str(out / "last.lcs"), "--quiet"]) == 0


def test_init_encoder_starts_the_encoder_from_lcs_pretrain(colin27, scans, tmp_path, capsys):
    """A run of 0 steps writes the starting weights: the encoder is exactly the pretrained one; the decoder is not
    touched by it. An encoder of another architecture is refused in one line."""
    encoder = tmp_path / "encoder.pt"
    assert main(["pretrain", str(colin27), "--atlas", "colin27", "--unlabelled", str(scans), "-o", str(encoder),
                 "--spacing", "8", "--depth", "2", "--base-channels", "4", "--crop", "8", "--steps", "2", "--quiet"]) == 0
    weights = torch.load(encoder, weights_only=True)["weights"]
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path / "run"), *SMALL, "--steps", "0",
                 "--norm", "group", "--init-encoder", str(encoder)]) == 0
    started = Checkpoint.load(tmp_path / "run" / "last.lcs")
    assert started.provenance["init_encoder"] == str(encoder)
    assert {k for k in started.weights if k.startswith("down.")} == set(weights)
    assert all(torch.equal(started.weights[k], v) for k, v in weights.items())
    capsys.readouterr()
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path / "other"), *SMALL, "--steps", "1",
                 "--init-encoder", str(encoder)]) == 2
    error = capsys.readouterr().err.strip()
    assert "--norm group" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--unlabelled", "FOLDER"], "add --adversarial"),
    (["--adversarial", "--baseline"], "are for LCS models"),
    (["--init", "a.lcs", "--init-encoder", "e.pt"], "pass only one"),
    (["--loss", "dice-bce-schedule", "--bce-start", "1.5"], "between 0 and 1"),
    (["--subject-reuse", "0"], "1 or more"),
    (["--prior-weight", "6", "--prior-radius", "0"], "prior-radius must be positive"),
])
def test_options_that_cannot_go_together_are_refused_in_one_line(colin27, scans, tmp_path, capsys, extra, message):
    extra = [str(scans) if x == "FOLDER" else x for x in extra]
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path / "x"), *SMALL, *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_torchrun_with_the_discriminator(colin27, scans, tmp_path):
    """Two processes, each with its own labelled and unlabelled subjects: the segmenter and the discriminator are
    both DistributedDataParallel modules, and the run ends (a mismatch of their collective calls would hang or fail)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "LabelConditionedSegLib.cli", "train", str(colin27), "--atlas", "colin27", "-o",
                          str(tmp_path), *SMALL, "--steps", "3", "--validate-every", "3", "--adversarial",
                          "--unlabelled", str(scans), "--unlabelled-after", "1"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    checkpoint = Checkpoint.load(tmp_path / "best.lcs")
    assert checkpoint.provenance["processes"] == 2 and checkpoint.provenance["adversarial"]["unlabelled_scans"]
