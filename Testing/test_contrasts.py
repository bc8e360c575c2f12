"""Tissue classes of the real Colin27 head, the contrasts painted from them, and the prior that registers any of them."""
from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.errors import LCSError
from lcs_training.contrasts import CONTRASTS, paint, parse_contrasts
from lcs_training.data import read_table
from lcs_training.metrics import dice_per_label
from lcs_training.propagation import ants_propagate
from lcs_training.synth import SubjectGenerator, random_grid
from lcs_training.synth import paint as paint_randomly
from lcs_training.tissues import BACKGROUND, BRIGHT_HEAD, CSF, DARK_HEAD, GREY, NAMES, SOFT_HEAD, WHITE


def test_tissue_classes_of_colin27_follow_its_t1_anatomy(colin27_2mm, colin27):
    image, labels, mask, classes = colin27_2mm
    c, x = sitk.GetArrayFromImage(classes), sitk.GetArrayFromImage(image)
    ml = {name: float((c == i).sum()) * 8 / 1000 for i, name in enumerate(NAMES)}
    assert 550 < ml["grey matter"] < 1100 and 450 < ml["white matter"] < 1000 and 50 < ml["CSF"] < 400, ml
    mean = [float(x[c == k].mean()) for k in (CSF, GREY, WHITE)]
    assert mean == sorted(mean)  # T1: CSF dark, white matter bright
    head = [float(x[c == k].mean()) for k in (DARK_HEAD, DARK_HEAD + 1, DARK_HEAD + 2)]
    assert head == sorted(head)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    assert set(np.unique(c[brain])) <= {CSF, GREY, WHITE} | set(range(DARK_HEAD + 3, len(NAMES)))
    assert not (c[~brain] >= DARK_HEAD + 3).any() and not np.isin(c[~brain], (CSF, GREY, WHITE)).any()
    values = {label.name: label.value for label in read_table(colin27)}
    putamen = np.isin(sitk.GetArrayViewFromImage(labels), [values["Putamen_L"], values["Putamen_R"]]) & brain
    assert putamen.sum() > 500 and (c[putamen] == NAMES.index("Putamen")).all()
    assert 5 < ml["Putamen"] < 25 and not (c == NAMES.index("Putamen"))[~putamen].any()


def test_paint_gives_each_tissue_class_a_random_intensity_seeded_by_the_generator(colin27_2mm):
    classes = sitk.GetArrayFromImage(colin27_2mm[3])
    first, again = paint_randomly(classes, np.random.default_rng(3)), paint_randomly(classes, np.random.default_rng(3))
    assert np.array_equal(first, again) and first.shape == classes.shape
    means = [[float(p[classes == k].mean()) for k in (CSF, GREY, WHITE)]
             for p in (paint_randomly(classes, np.random.default_rng(seed)) for seed in range(8))]
    assert len({tuple(np.argsort(m)) for m in means}) >= 3  # the tissues' order changes: not one contrast
    assert float(first[classes == BACKGROUND].mean()) < 0.06  # the background stays dark
    cut = classes[classes.shape[0] // 2:]  # a field of view that loses classes (the deep grey ones, not the brain)
    assert set(np.unique(cut)) < set(np.unique(classes))
    part = paint_randomly(cut, np.random.default_rng(3))
    for k in (CSF, GREY, WHITE):  # each class kept the intensity and spread it had in the whole head
        assert float(part[cut == k].mean()) == pytest.approx(float(first[classes == k].mean()), abs=0.003)
        assert float(part[cut == k].std()) == pytest.approx(float(first[classes == k].std()), abs=0.003)


def test_a_subject_of_random_contrast_keeps_the_anatomy_and_labels_of_the_same_draw(colin27_2mm):
    image, labels, mask, classes = colin27_2mm
    generator = SubjectGenerator(image, labels, mask, classes)
    plain, plain_labels = generator.sample(np.random.default_rng(11), skull_strip_probability=0, fov_cut_probability=0)
    painted, painted_labels = generator.sample(np.random.default_rng(11), skull_strip_probability=0,
                                               fov_cut_probability=0, contrast_probability=1.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(plain_labels), sitk.GetArrayViewFromImage(painted_labels))
    a, b = sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(painted)
    head = a > 0.05 * a.max()
    assert (b[head] > 0).mean() > 0.99 and abs(np.corrcoef(a[head], b[head])[0, 1]) < 0.9  # same head, other contrast
    unpainted = SubjectGenerator(image, labels, mask).sample(np.random.default_rng(11), skull_strip_probability=0,
                                                             fov_cut_probability=0, contrast_probability=1.0)[0]
    assert np.array_equal(sitk.GetArrayViewFromImage(unpainted), a)  # no classes: the head's own contrast, same stream


def test_each_sequence_shows_the_tissues_of_real_colin27_in_its_own_order(colin27_2mm):
    """Painted from the real head, each sequence orders CSF, grey and white matter and the head tissues as the MRI
    literature does, keeps the T1 texture inside a class (a scan, not a painted label map) and blurs class borders."""
    image, _, _, classes = colin27_2mm
    c, t1 = sitk.GetArrayFromImage(classes), sitk.GetArrayFromImage(image)
    orders = {"t1-spgr": (CSF, GREY, WHITE), "t2": (WHITE, GREY, CSF), "pd": (WHITE, GREY, CSF),
              "flair": (CSF, WHITE, GREY)}  # darkest first
    assert set(orders) == set(CONTRASTS) - {"t1"}

    def means(x: np.ndarray, order) -> list[float]:
        return [float(x[c == k].mean()) for k in order]

    for contrast, order in orders.items():
        x = sitk.GetArrayFromImage(paint(image, classes, contrast))
        assert x.shape == t1.shape and x.max() > 0.5 * t1.max()
        brain = means(x, order)
        assert brain == sorted(brain) and brain[2] - brain[0] > 0.1 * x.max(), (contrast, brain)
        head = means(x, (DARK_HEAD, SOFT_HEAD, BRIGHT_HEAD))  # bone and air dark, fat bright in all four
        assert head == sorted(head), (contrast, head)
        grey = c == GREY
        texture = np.corrcoef(x[grey], t1[grey])[0, 1]
        assert x[grey].std() > 0.02 * x.max() and texture > 0.5, (contrast, texture)
        assert x[c == NAMES.index("background")].mean() < 0.05 * x.max()
    spgr, t1_means = means(sitk.GetArrayFromImage(paint(image, classes, "t1-spgr")), (GREY, WHITE)), means(t1, (GREY, WHITE))
    assert (spgr[1] - spgr[0]) / sum(spgr) < 0.8 * (t1_means[1] - t1_means[0]) / sum(t1_means)  # weaker grey/white


def test_contrasts_are_parsed_or_refused_in_one_line():
    assert parse_contrasts("T1, t2,pd,t2") == ["t1", "t2", "pd"]
    for wrong in ("t1,dwi", " , "):
        with pytest.raises(LCSError, match="--contrasts: unknown contrast .*t1, t1-spgr, t2, pd, flair"):
            parse_contrasts(wrong)


@pytest.mark.slow  # one ANTs SyN registration, about 20 s on 2 cores
def test_ants_propagation_lies_on_the_scans_grid_and_finds_its_labels(colin27_2mm, tiny):
    """The T2 head on another scanner's grid (axes permuted and flipped, other spacing and origin): the labels ANTs
    SyN brings from the tiny model's T1 atlas share that grid and overlap the truth (a geometry mistake in the
    conversion to and from ANTs gives Dice near 0)."""
    image, labels, _, classes = colin27_2mm
    grid = random_grid(image, np.random.default_rng(3), spacing_range=(2.5, 3.5), crop=0.1)
    assert np.abs(np.array(grid.GetDirection()) - np.array(image.GetDirection())).max() > 0.5  # axes really moved
    scan = sitk.Resample(paint(image, classes, "t2"), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    truth = sitk.GetArrayFromImage(sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    warped = ants_propagate(scan, tiny.atlas_image, tiny.atlas_labels)
    assert (warped.GetSize(), warped.GetSpacing(), warped.GetOrigin(), warped.GetDirection()) == \
        (scan.GetSize(), scan.GetSpacing(), scan.GetOrigin(), scan.GetDirection())
    dice = dice_per_label(sitk.GetArrayFromImage(warped), truth, tiny.label_table.values)
    assert len(dice) == 6 and min(dice.values()) > 0.4 and np.mean(list(dice.values())) > 0.6, dice


def test_evaluate_ants_without_antspyx_is_refused_before_any_work(tiny_checkpoint, colin27, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setitem(sys.modules, "ants", None)  # what an install without the evaluate extra gives: ImportError
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(colin27), "--subjects", "1",
                 "--ants", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "--ants needs antspyx" in err and len(err.strip().splitlines()) == 1
    assert "pip install antspyx" in err and "label-conditioned-seg[" not in err  # no package index has the project
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "pip install antspyx" in help_text and "conditioned-seg[" not in help_text
    assert not (tmp_path / "out" / "heldout_metrics.csv").exists()


@pytest.mark.slow  # two held-out subjects, each with ANTs SyN: 2-3 minutes on 2 cores
def test_evaluate_scores_every_method_per_contrast_with_ants(tiny_checkpoint, colin27, tmp_path, capsys):
    """`lcs evaluate --contrasts t1,t2 --ants`: the same held-out subject in each contrast (same truth), every method
    scored per contrast in the CSV, the printed table and the machine line, ANTs SyN well above chance in both."""
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(colin27), "--subjects", "1",
                 "--contrasts", "t1,t2", "--ants", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "each as t1, t2" in out
    figures = dict(item.split("=") for item in out.strip().splitlines()[-1].split())
    methods = ["lcs", "affine_propagation", "ants_syn_propagation"]
    assert set(figures) == {f"{c}{m}_dice" for c in ("", "t1_", "t2_") for m in methods} | {"subjects"}
    assert min(float(figures[f"{c}_ants_syn_propagation_dice"]) for c in ("t1", "t2")) > 0.5, figures  # 0.67, 0.74
    assert "  t2: lcs " in out and "ants syn propagation" in out
    with open(tmp_path / "heldout_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["subject", "contrast", "method"] and {r["contrast"] for r in rows} == {"t1", "t2"}
    truth = {c: {(r["method"], r["value"]): r["truth_ml"] for r in rows if r["contrast"] == c} for c in ("t1", "t2")}
    assert truth["t1"] == truth["t2"] and len(truth["t1"]) == 3 * 6  # one anatomy, two contrasts
    for png in ("heldout_dice.png", "heldout_contrasts.png", "heldout_seconds.png", "contrasts.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
