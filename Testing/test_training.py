"""Training: the paper's recipe reaches a Dice bar, label sampling respects annotations, resume, torchrun."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.labels import LabelTable
from LabelConditionedSegLib.model import ModelConfig
from lcs_training.data import load_atlas, load_cases
from lcs_training.data import normalized
from lcs_training.smile import masked_dice_loss
from lcs_training.synth import Strength, SubjectGenerator
from lcs_training.tissues import tissue_classes
from lcs_training.train import (CropLoss, SubjectStream, TrainSettings, add_arguments, pick_labels, train,
                                validation_subjects)
from LabelConditionedSegLib.engine import Condition, Engine

from conftest import TINY_LABELS, dice, heldout_subject, tiny_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_now(colin27, tmp_path_factory) -> Path:
    """The tiny test model's recipe (conftest.tiny_settings), trained from scratch with today's code."""
    return train(tiny_settings(colin27, tmp_path_factory.mktemp("tiny_model")))


@pytest.mark.slow
def test_the_tiny_recipe_learns_the_labels(trained_now):
    """240 steps at 4 mm on six AAL labels of warped Colin27 subjects reach a Dice bar, and the loss falls."""
    trained = Checkpoint.load(trained_now)
    assert trained.provenance["validation_dice"] > 0.45
    assert min(trained.provenance["validation_dice_per_label"].values()) > 0.25
    rows = (trained_now.parent / "history.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "step,seconds,loss,val_dice,val_affine,val_deformable" and len(rows) == 241
    first, last = [np.mean([float(r.split(",")[2]) for r in chunk]) for chunk in (rows[1:41], rows[-40:])]
    assert last < first - 0.2  # the soft-Dice loss fell
    assert (trained_now.parent / "history.png").read_bytes()[:4] == b"\x89PNG"


def test_the_committed_test_models_follow_the_recipe_and_learned(tiny, tiny_baseline, colin27, tmp_path):
    """Testing/models holds what Testing/make_test_models.py makes today; else re-create them with it."""
    for path, baseline in ((None, False), (tiny_baseline, True)):
        model = tiny if path is None else Checkpoint.load(path)
        recipe = tiny_settings(colin27, tmp_path, baseline)
        assert model.provenance["name"] == recipe.name and model.provenance["lr"] == recipe.lr
        assert model.provenance["spacing_mm"] == recipe.spacing and model.provenance["iterations"] in (120, 240)
        assert [l.name for l in model.label_table] == TINY_LABELS
        assert model.config.to_dict() == {**recipe.model.to_dict(), **({"baseline_labels": 6} if baseline else {})}
    assert tiny.provenance["validation_dice"] > 0.45


def test_a_history_saved_before_the_seconds_column_resumes_in_the_right_columns():
    """state.pt of an earlier lcs kept (step, loss, val_dice) per step; its loss must not be read as seconds."""
    from lcs_training.train import _saved_history
    rows = _saved_history({"history": torch.tensor([[1, 0.9, float("nan")], [2, 0.8, 0.31]], dtype=torch.float64)})
    assert rows[1] == {"step": 2, "seconds": "", "loss": 0.8, "val_dice": 0.31, "val_affine": "", "val_deformable": ""}
    assert rows[0]["val_dice"] == "" and rows[0]["loss"] == 0.9


def test_targets_are_only_labels_the_case_annotates():
    rng = np.random.default_rng(0)
    picks = [pick_labels(rng, [1, 2, 3, 4], [2, 4, 9], 0.5) for _ in range(400)]
    assert all(set(p) <= {2, 4} for p in picks)
    merged = sum(len(p) == 2 for p in picks) / len(picks)
    assert 0.4 < merged < 0.6
    assert pick_labels(rng, [1, 3], [2, 4], 0.5) == []


def test_a_step_teaches_each_label_in_the_box_the_engine_decodes_it_in(colin27, tiny):
    """A training subject carries several labels, each cropped to the box that inference decodes (atlas region plus
    the engine's margin), and the step's loss is the soft Dice of what the engine would output there (checked with
    the network in evaluation mode, where a crop decodes exactly as the engine does)."""
    atlas = load_atlas(colin27, "colin27", 4.0, tiny.config.factor)
    values = [tiny.label_table.resolve(name).value for name in TINY_LABELS]
    stream = iter(SubjectStream([atlas], atlas, values, Strength(), 0.5, seed=2, labels_per_subject=3,
                                factor=tiny.config.factor))
    image, atlas_image, crops = next(stream)
    assert len(crops) == 3 and np.array_equal(atlas_image[0], normalized(atlas.image, atlas.mask))  # affine prior
    model = tiny.build_model()
    engine = Engine(model, atlas_image[0], "cpu")
    encoded = engine.encode(image[0])
    expected = []
    for crop in crops:
        region = tuple(slice(a, a + n) for a, n in zip(crop.start, crop.target.shape[1:]))
        whole = np.zeros(image.shape[1:], bool)
        whole[region] = crop.condition[0] > 0
        condition = Condition.of("label", 1, whole)
        assert engine._box(condition, image.shape[1:]) == (crop.start, crop.target.shape[1:])
        maps = []
        engine.segment(encoded, [condition], on_probability=lambda c, p: maps.append(p))
        logits = torch.logit(torch.from_numpy(maps[0][region]).clamp(1e-6, 1 - 1e-6))[None, None]
        expected.append(masked_dice_loss(logits, torch.from_numpy(crop.target)[None], torch.from_numpy(crop.weight)[None]))
    with torch.no_grad():
        loss, logits = CropLoss(model.eval())(torch.from_numpy(image)[None], torch.from_numpy(atlas_image)[None], [crops])
    assert [l.shape[2:] for l in logits] == [c.target.shape[1:] for c in crops]
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), abs=1e-4)
    warped = iter(SubjectStream([atlas], atlas, values, Strength(), 0.5, seed=2, labels_per_subject=3,
                                deformable_share=1.0, factor=tiny.config.factor))
    same_subject, warped_atlas, warped_crops = next(warped)  # the same draws, now with the deformable prior
    assert np.array_equal(same_subject, image) and not np.array_equal(warped_atlas, atlas_image)

    for plain, moved in zip(crops, warped_crops):  # each condition warped onto the subject: closer to its target
        conditions = [_on_grid(c, c.condition, image.shape[1:]) for c in (plain, moved)]
        target = _on_grid(plain, plain.target, image.shape[1:])
        assert np.array_equal(target, _on_grid(moved, moved.target, image.shape[1:]))
        assert dice(conditions[1], target) > dice(conditions[0], target)


def test_with_subject_reuse_a_subject_is_made_every_r_samples_and_drawn_from_the_last_r(colin27, monkeypatch):
    """--subject-reuse R: the stream makes a new subject (SimpleITK warp and re-imaging) only every R samples and
    draws each sample's subject among the last R made, with its own labels; R = 1 makes one per sample."""
    atlas = load_atlas(colin27, "colin27", 4.0, 16)
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(atlas.labels)) if v)
    made = []
    real_sample = SubjectGenerator.sample

    def counted(self, *args, **kwargs):
        made.append(real_sample(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(SubjectGenerator, "sample", counted)
    for reuse in (1, 3):
        made.clear()
        stream = iter(SubjectStream([atlas], atlas, values, Strength(), 0.0, seed=4, labels_per_subject=2, factor=16,
                                    reuse=reuse))
        samples = [next(stream) for _ in range(9)]
        assert len(made) == 9 // reuse
        images = [normalized(image, atlas.mask) for image, _ in made]
        drawn = [next(k for k, image in enumerate(images) if np.array_equal(image, sample[0][0])) for sample in samples]
        assert all(k <= n // reuse and k > n // reuse - reuse for n, k in enumerate(drawn))  # among the last R made
        labels = {tuple(c.condition.sum() for c in sample[2]) for sample in samples}
        assert len(labels) == 9  # every sample teaches its own labels


def _on_grid(crop, array: np.ndarray, shape) -> np.ndarray:
    """A crop's mask (condition or target) placed on the whole model grid."""
    out = np.zeros(shape, bool)
    out[tuple(slice(a, a + n) for a, n in zip(crop.start, crop.target.shape[1:]))] = array[0] > 0
    return out


def test_cases_in_other_geometry_are_registered_and_know_their_labels(colin27, tmp_path):
    """A second case on another grid, lacking one label, joins the atlas grid without that label."""
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
        os.symlink(colin27 / sub / "colin27.nii.gz", tmp_path / sub / "colin27.nii.gz")
    (tmp_path / "masks").mkdir()
    os.symlink(colin27 / "masks/colin27.nii.gz", tmp_path / "masks/colin27.nii.gz")
    (tmp_path / "labels.csv").write_text((colin27 / "labels.csv").read_text(encoding="utf-8"))
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


@pytest.mark.slow  # test_an_interrupted_run_resumes_with_its_whole_history resumes the same run in the fast tier
def test_resume_continues_from_the_last_step(colin27, tmp_path):
    settings = dict(data=colin27, out=tmp_path, atlas="colin27", spacing=8.0, model=ModelConfig(4, 2), labels=TINY_LABELS[:2],
                    validate_every=2, validation_subjects=1, device="cpu", workers=0)
    train(TrainSettings(steps=2, **settings))
    train(TrainSettings(steps=4, resume=True, **settings))
    assert Checkpoint.load(tmp_path / "last.lcs").provenance["iterations"] == 4
    assert len((tmp_path / "history.csv").read_text(encoding="utf-8").splitlines()) == 5


TINY_RUN = ["--spacing", "8", "--depth", "2", "--base-channels", "4", "--labels", "Frontal_Sup_L,Frontal_Sup_R",
            "--validate-every", "2", "--validation-subjects", "1", "--device", "cpu", "--workers", "0"]


def _tiny(colin27, out, **more):
    return TrainSettings(colin27, out, "colin27", spacing=8.0, model=ModelConfig(4, 2), labels=TINY_LABELS[:2],
                         validate_every=2, validation_subjects=1, device="cpu", workers=0, **more)


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _history_steps(folder):
    return [int(row.split(",")[0]) for row in (folder / "history.csv").read_text(encoding="utf-8").splitlines()[1:]]


def test_a_folder_holding_a_run_is_refused_unless_overwritten(colin27, tmp_path):
    train(_tiny(colin27, tmp_path, steps=2))
    before = _files(tmp_path)
    with pytest.raises(LCSError, match="already holds a training run.*--resume to continue it, --overwrite to replace it"):
        train(_tiny(colin27, tmp_path, steps=2, seed=1))
    with pytest.raises(LCSError, match="only one of them"):
        train(_tiny(colin27, tmp_path, steps=4, resume=True, overwrite=True))
    assert _files(tmp_path) == before  # nothing touched, byte for byte
    train(_tiny(colin27, tmp_path, steps=2, seed=1, overwrite=True))
    assert _history_steps(tmp_path) == [1, 2]  # a new history, not the old one with restarted steps appended
    assert Checkpoint.load(tmp_path / "best.lcs").provenance["seed"] == 1
    assert _files(tmp_path)["state.pt"] != before["state.pt"]


def test_resume_needs_a_saved_state_with_its_settings(colin27, tmp_path, capsys):
    with pytest.raises(LCSError, match="holds no state.pt"):
        train(_tiny(colin27, tmp_path / "new", steps=2, resume=True))
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"model": {}, "optimizer": {}, "step": 2, "best": 0.5}, old / "state.pt")  # before settings were saved
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(old), "--resume", *TINY_RUN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without the run's settings" in err[0], err


@pytest.mark.slow
def test_the_cli_resumes_a_run_with_its_saved_settings(colin27, tmp_path, capsys):
    """`lcs train -o OUT --resume` continues a 8 mm run on its 8 mm grid; an option given with another value is refused,
    even when that value is the option's default."""
    out = tmp_path / "run"
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(out), "--steps", "2", *TINY_RUN]) == 0
    capsys.readouterr()
    before = _files(out)
    assert main(["train", "-o", str(out), "--resume", "--steps", "4", "--spacing", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--spacing 2.0 differs from 8.0" in err[0], err
    assert _files(out) == before
    assert main(["train", "-o", str(out), "--resume", "--steps", "4", "--depth", "2", "--device", "cpu", "--workers", "0"]) == 0
    last = Checkpoint.load(out / "last.lcs")
    assert last.provenance["iterations"] == 4 and last.provenance["spacing_mm"] == 8.0
    assert last.atlas_image.GetSpacing() == pytest.approx((8.0, 8.0, 8.0))
    assert last.config == ModelConfig(4, 2) and len(last.label_table) == 2
    assert _history_steps(out) == [1, 2, 3, 4]


def test_an_interrupted_run_resumes_with_its_whole_history(colin27, tmp_path, monkeypatch):
    """history.csv is written at each checkpoint, so a run stopped between two continues without a gap; a Python caller
    of resume gets the saved settings too."""
    import lcs_training.train as training
    losses = []

    def power_cut_at_step_4(*args, **kwargs):
        losses.append(1)
        if len(losses) == 4:
            raise RuntimeError("power cut")
        return step_loss(*args, **kwargs)

    step_loss = training.CropLoss.forward
    monkeypatch.setattr(training.CropLoss, "forward", power_cut_at_step_4)
    with pytest.raises(RuntimeError, match="power cut"):
        train(_tiny(colin27, tmp_path, steps=6))
    monkeypatch.undo()
    assert _history_steps(tmp_path) == [1, 2]  # as far as state.pt, saved at step 2
    train(TrainSettings(colin27, tmp_path, "colin27", steps=6, device="cpu", workers=0, resume=True))
    assert _history_steps(tmp_path) == [1, 2, 3, 4, 5, 6]
    last = Checkpoint.load(tmp_path / "last.lcs")
    assert last.provenance["iterations"] == 6 and last.provenance["spacing_mm"] == 8.0
    with pytest.raises(LCSError, match="spacing 4.0 differs from 8.0"):
        train(TrainSettings(colin27, tmp_path, "colin27", spacing=4.0, steps=8, device="cpu", workers=0, resume=True))


def test_a_failed_start_leaves_no_output_folder(colin27, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, wrong in {"unknown_label": [str(colin27), "--atlas", "colin27", "--labels", "Nowhere_L"],
                        "missing_atlas": [str(colin27), "--atlas", "nobody"],
                        "no_data": [str(tmp_path / "nothing"), "--atlas", "colin27"],
                        "bad_init": [str(colin27), "--atlas", "colin27", "--init", str(tmp_path / "none.lcs")]}.items():
        code = main(["train", *wrong, "-o", str(runs / name), "--spacing", "8", "--depth", "2", "--device", "cpu",
                     "--workers", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (name, err)
        assert not runs.exists(), name


def test_every_train_option_has_a_help_text_and_shows_its_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert all(action.help for action in parser._actions)
    text = " ".join(parser.format_help().split())
    for shown in ("(default 2000;", "(default 0.0001)", "(default 200)", "--overwrite"):
        assert shown in text


@pytest.mark.slow
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
    assert checkpoint.provenance["batch_size"] == 2  # one subject a step in each process (the default)
    assert checkpoint.provenance["iterations"] == 3


def test_init_continues_from_a_checkpoint(tiny_checkpoint, tiny, colin27, tmp_path):
    settings = TrainSettings(colin27, tmp_path, "colin27", spacing=4.0, model=tiny.config, labels=TINY_LABELS, steps=241,
                             validate_every=1000, validation_subjects=1, device="cpu", workers=0, init=tiny_checkpoint)
    continued = Checkpoint.load(train(settings))
    assert continued.provenance["iterations"] == 241  # one step on from the tiny model's 240
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
    code = main(["segment", str(colin27 / "images/colin27.nii.gz"), "-o", str(tmp_path / "x.seg.nrrd"),
                 "--checkpoint", str(tiny_baseline)])
    assert code == 2 and "multi-channel baseline" in capsys.readouterr().err


def test_a_contrast_agnostic_run_paints_every_second_validation_subject_and_records_its_contrasts(colin27, tmp_path,
                                                                                                  capsys):
    atlas = load_atlas(colin27, "colin27", 8.0, 4)
    cases = load_cases(colin27, atlas)
    tissues = [tissue_classes(c.image, c.mask, c.labels, LabelTable.read_csv(colin27 / "labels.csv")) for c in cases]
    plain = validation_subjects(cases, atlas, 2, Strength(), seed=3)
    painted = validation_subjects(cases, atlas, 2, Strength(), seed=3, tissues=tissues)
    assert np.array_equal(plain[0][0], painted[0][0]) and np.array_equal(plain[1][1], painted[1][1])
    assert not np.allclose(plain[1][0], painted[1][0])  # same head and labels, another contrast
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path), *TINY_RUN, "--steps", "2",
                 "--contrast-share", "1"]) == 0
    assert Checkpoint.load(tmp_path / "last.lcs").provenance["contrasts"] == "any (random share 1)"
    assert main(["train", str(colin27), "--atlas", "colin27", "-o", str(tmp_path), "--resume", "--steps", "4",
                 "--contrast-share", "0.5"]) == 2
    assert "--contrast-share 0.5 differs" in capsys.readouterr().err
