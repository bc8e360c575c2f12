"""Training: the paper's recipe reaches a Dice bar, label sampling respects annotations, resume, torchrun."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.model import ModelConfig
from lcs_training.data import load_atlas, load_cases
from lcs_training.train import TrainSettings, pick_labels, train

from conftest import TINY_LABELS, heldout_subject

REPO = Path(__file__).resolve().parents[1]


def test_tiny_model_learns_the_labels(tiny):
    """Trained in conftest for 240 steps at 4 mm on six AAL labels of warped Colin27 subjects."""
    assert tiny.provenance["validation_dice"] > 0.45
    assert min(tiny.provenance["validation_dice_per_label"].values()) > 0.25


def test_history_and_plot_are_written(tiny_checkpoint):
    rows = (tiny_checkpoint.parent / "history.csv").read_text().splitlines()
    assert rows[0] == "step,loss,val_dice" and len(rows) == 241
    first, last = [np.mean([float(r.split(",")[1]) for r in chunk]) for chunk in (rows[1:41], rows[-40:])]
    assert last < first - 0.2  # the soft-Dice loss fell
    assert (tiny_checkpoint.parent / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_targets_are_only_labels_the_case_annotates():
    rng = np.random.default_rng(0)
    picks = [pick_labels(rng, [1, 2, 3, 4], [2, 4, 9], 0.5) for _ in range(400)]
    assert all(set(p) <= {2, 4} for p in picks)
    merged = sum(len(p) == 2 for p in picks) / len(picks)
    assert 0.4 < merged < 0.6
    assert pick_labels(rng, [1, 3], [2, 4], 0.5) == []


def test_cases_in_other_geometry_are_registered_and_know_their_labels(colin27, tmp_path):
    """A second case on another grid, lacking one label, joins the atlas grid without that label."""
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        os.symlink(colin27 / sub / "colin27.nii.gz", tmp_path / sub / "colin27.nii.gz")
    (tmp_path / "masks").mkdir()
    os.symlink(colin27 / "masks/colin27.nii.gz", tmp_path / "masks/colin27.nii.gz")
    (tmp_path / "labels.csv").write_text((colin27 / "labels.csv").read_text())
    image, labels = heldout_subject(colin27, seed=8)
    labels = sitk.Mask(labels, labels != 3)  # this case does not annotate Frontal_Sup_L
    sitk.WriteImage(image, str(tmp_path / "images/subject.nrrd"))
    sitk.WriteImage(labels, str(tmp_path / "labels/subject.nrrd"))
    atlas = load_atlas(tmp_path, "colin27", 4.0, 8)
    cases = {c.name: c for c in load_cases(tmp_path, atlas)}
    assert set(cases) == {"colin27", "subject"}
    assert 3 not in cases["subject"].present and 3 in cases["colin27"].present
    assert cases["subject"].image.GetSize() == atlas.image.GetSize()
    on_grid = sitk.GetArrayFromImage(cases["subject"].labels)
    overlap = np.logical_and(on_grid == 85, sitk.GetArrayFromImage(atlas.labels) == 85).sum() / max(1, (on_grid == 85).sum())
    assert overlap > 0.4  # registered onto the atlas, not left where it was


def test_resume_continues_from_the_last_step(colin27, tmp_path):
    settings = dict(data=colin27, out=tmp_path, atlas="colin27", spacing=8.0, model=ModelConfig(4, 2), labels=TINY_LABELS[:2],
                    validate_every=2, validation_subjects=1, device="cpu", workers=0)
    train(TrainSettings(steps=2, **settings))
    train(TrainSettings(steps=4, resume=True, **settings))
    assert Checkpoint.load(tmp_path / "last.lcs").provenance["iterations"] == 4
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 5


def test_torchrun_two_cpu_processes(colin27, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "LabelConditionedSegLib.cli", "train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path),
                          "--spacing", "8", "--depth", "2", "--base-channels", "4", "--labels", "Frontal_Sup_L,Frontal_Sup_R",
                          "--steps", "3", "--validate-every", "3", "--validation-subjects", "1", "--device", "cpu", "--workers", "0"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    checkpoint = Checkpoint.load(tmp_path / "best.lcs")
    assert checkpoint.provenance["processes"] == 2
    assert checkpoint.provenance["batch_size"] == 4
    assert checkpoint.provenance["iterations"] == 3


def test_init_continues_from_a_checkpoint(tiny_checkpoint, tiny, colin27, tmp_path):
    settings = TrainSettings(colin27, tmp_path, "colin27", spacing=4.0, model=tiny.config, labels=TINY_LABELS, steps=242,
                             validate_every=1000, validation_subjects=1, device="cpu", workers=0, init=tiny_checkpoint)
    continued = Checkpoint.load(train(settings))
    assert continued.provenance["iterations"] == 242
    assert continued.provenance["validation_dice"] > 0.3  # the trained weights were used, not a fresh start
    wrong = TrainSettings(colin27, tmp_path / "x", "colin27", spacing=4.0, model=ModelConfig(4, 2), labels=TINY_LABELS,
                          steps=1, device="cpu", workers=0, init=tiny_checkpoint)
    with pytest.raises(LCSError, match="architecture"):
        train(wrong)


def test_the_multichannel_baseline_trains_and_is_refused_by_lcs_segment(tiny_baseline, colin27, tmp_path, capsys):
    """`lcs train --baseline` (conftest): the same budget as the tiny LCS model, one output channel per label."""
    baseline = Checkpoint.load(tiny_baseline)
    assert baseline.config.baseline_labels == len(TINY_LABELS) == len(baseline.label_table)
    assert baseline.provenance["validation_dice"] > 0.15  # learned: an untrained model scores near 0
    from LabelConditionedSegLib.cli import main
    code = main(["segment", str(colin27 / "images/colin27.nii.gz"), "-o", str(tmp_path / "x.seg.nrrd"),
                 "--checkpoint", str(tiny_baseline)])
    assert code == 2 and "multi-channel baseline" in capsys.readouterr().err
