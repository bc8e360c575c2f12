"""`lcs evaluate` and `lcs benchmark` run end to end (tiny sizes) and print their machine-readable lines."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.labels import Label, LabelTable
from LabelConditionedSegLib.training_folder import write_case
from conftest import TINY_LABELS, heldout_subject
from lcs_training.contrasts import contrast_subjects
from lcs_training.evaluate import FIELDS, HELDOUT_STREAMS, VALIDATION_STREAMS
from lcs_training.metrics import label_metrics
from lcs_training import propagation
from lcs_training.propagation import bspline_propagate
from lcs_training.synth import SubjectGenerator, unlike_subject


@pytest.mark.slow  # 30-50 s on 2 cores (B-spline, deformable, baseline); the metrics test below stays fast
def test_evaluate_scores_lcs_registration_and_the_baseline(tiny, tiny_baseline, colin27, tmp_path, capsys):
    """Every method, and both priors of a model recorded as trained on them (the tiny model, so relabeled: what is
    checked is that evaluate scores each prior a checkpoint records, and the deformable prior alone beside it)."""
    tiny.provenance["priors"] = ["affine", "deformable"]
    tiny.save(tmp_path / "both.lcs")
    tiny.provenance.pop("priors")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "both.lcs"), "--data", str(colin27), "--subjects", "1",
                 "--strength", "1.0", "--out", str(tmp_path), "--device", "cpu", "--bspline", "--baseline", str(tiny_baseline)])
    out = capsys.readouterr().out
    assert code == 0
    figures = dict(item.split("=") for item in out.strip().splitlines()[-1].split())
    methods = ["lcs", "lcs_deformable", "deformable_propagation", "affine_propagation", "bspline_propagation", "baseline"]
    assert set(figures) == {f"{m}_dice" for m in methods} | {"subjects"}
    assert all(0.2 < float(figures[f"{m}_dice"]) <= 1 for m in methods), figures
    with open(tmp_path / "heldout_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS
    assert sorted({r["method"] for r in rows}) == sorted(m.replace("_", " ") for m in methods) and len(rows) == 6 * 6
    for r in rows:
        if float(r["dice"]) > 0.5:  # a fair overlap lies within a few voxels of the truth
            assert 0 < float(r["hd95_mm"]) < 30 and abs(float(r["volume_diff_pct"])) < 100
    for png in ("heldout_dice.png", "heldout_hd95.png", "heldout_seconds.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_the_unlike_generator_makes_other_scans_on_coarser_grids_the_same_from_the_same_seed(colin27_2mm):
    """The second held-out generator: coarser grids than any training subject, the same subject from the same seed."""
    image, labels, mask, _ = colin27_2mm
    first = unlike_subject(SubjectGenerator(image, labels, mask), np.random.default_rng([7, 30_000]))
    again = unlike_subject(SubjectGenerator(image, labels, mask), np.random.default_rng([7, 30_000]))
    assert min(first[0].GetSpacing()) >= 1.2 * min(image.GetSpacing())
    assert all(np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)) for a, b in zip(first, again))


def test_validation_subjects_are_other_subjects_than_the_held_out_ones(colin27_2mm, tmp_path, capsys):
    """`lcs evaluate --validation` draws subjects that settings may be chosen on: never a held-out one (which stay
    the default), never training's own validation seed; real test scans have no validation set to switch to."""
    image, labels, mask, _ = colin27_2mm
    held, default, validation = (next(contrast_subjects({"t1": image}, labels, mask, 1, 7, *stream))[1]
                                 for stream in ([HELDOUT_STREAMS["unlike"]], [], [VALIDATION_STREAMS["unlike"]]))
    assert np.array_equal(sitk.GetArrayViewFromImage(held), sitk.GetArrayViewFromImage(default))
    assert held.GetSize() != validation.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(held),
                                                                         sitk.GetArrayViewFromImage(validation))
    starts = sorted([*HELDOUT_STREAMS.values(), *VALIDATION_STREAMS.values()])
    assert 10_000 < starts[0] and all(b - a >= 10_000 for a, b in zip(starts, starts[1:]))  # room for 10000 subjects
    code = main(["evaluate", "--folder", str(tmp_path), "--validation", "--checkpoint", "missing.lcs",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--validation" in err, err


@pytest.mark.slow  # lcs evaluate end to end: 15-20 s on 2 cores; the folder evaluation below keeps it in the fast tier
def test_the_unlike_generator_s_labels_move_with_the_image(tiny_checkpoint, colin27, tmp_path, capsys):
    """`lcs evaluate --unlike`: the truth labels move with the image (affine registration of the atlas recovers them
    well above chance)."""
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(colin27), "--subjects", "1",
                 "--unlike", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "unlike training's" in out
    figures = dict(item.split("=") for item in out.strip().splitlines()[-1].split())
    assert float(figures["affine_propagation_dice"]) > 0.3 and float(figures["lcs_dice"]) > 0.2, figures  # 0.45, 0.31 measured
    with open(tmp_path / "checks.csv", newline="") as f:  # the held-out head's check: silent, the right way round
        checks = list(csv.DictReader(f))
    assert checks and all(c["check"] == "" and float(c["mirror_ratio"]) < 1 for c in checks), checks


def test_metrics_match_known_shapes():
    truth = np.zeros((40, 40, 40), int)
    truth[10:20, 10:20, 10:20] = 1
    truth[25:30, 25:30, 25:30] = 2
    prediction = np.zeros_like(truth)
    prediction[12:22, 10:20, 10:20] = 1  # shifted two voxels along z, where voxels are 2 mm
    prediction[26:29, 26:29, 26:29] = 2  # shrunk by one voxel on each side
    m = label_metrics(prediction, truth, [1, 2, 3], (2.0, 1.0, 1.0))
    assert set(m) == {1, 2}  # label 3 is in neither
    assert m[1] == {"dice": pytest.approx(0.8), "hd95_mm": pytest.approx(4.0), "truth_ml": 2.0, "predicted_ml": 2.0,
                    "volume_diff_pct": 0.0}  # 1000 voxels of 2 mm^3
    assert (m[2]["truth_ml"], m[2]["predicted_ml"]) == (pytest.approx(0.25), pytest.approx(0.054))
    assert m[2]["volume_diff_pct"] == pytest.approx(100 * (27 - 125) / 125)
    largest = sitk.HausdorffDistanceImageFilter()  # SimpleITK's maximum distance, an independent bound
    images = [sitk.GetImageFromArray((a == 2).astype(np.uint8)) for a in (prediction, truth)]
    for image in images:
        image.SetSpacing((1.0, 1.0, 2.0))
    largest.Execute(*images)
    assert 2.0 <= m[2]["hd95_mm"] <= largest.GetHausdorffDistance() + 1e-6  # z faces lie 2 mm apart, corners further
    empty = label_metrics(np.zeros_like(truth), truth, [1], (1.0, 1.0, 1.0))[1]
    assert empty["dice"] == 0 and np.isnan(empty["hd95_mm"]) and empty["volume_diff_pct"] == -100


@pytest.mark.slow  # two B-spline fits, 20-60 s on 2 cores
def test_bspline_propagation_moves_labels_within_its_bound(tiny, monkeypatch):
    """The B-spline moves some labels beyond the affine's; bounded near zero, it moves (almost) none: the bound that
    keeps the warp fold-free reaches the optimiser."""
    told = []
    shift = sitk.TranslationTransform(3, (4.3, -2.6, 1.7))  # off half-voxel ties of nearest neighbour
    affine = sitk.GetArrayFromImage(sitk.Resample(tiny.atlas_labels, tiny.atlas_image, shift.GetInverse(),
                                                  sitk.sitkNearestNeighbor, 0))

    def changed() -> float:
        warped = bspline_propagate(tiny.atlas_image, tiny.atlas_image, tiny.atlas_labels, shift, tiny.atlas_mask,
                                   say=told.append)
        return float((sitk.GetArrayViewFromImage(warped) != affine).mean())

    free = changed()
    monkeypatch.setattr(propagation, "FOLD_FREE", 1e-4)
    bounded = changed()
    assert not told and 0.005 < free < 0.1 and bounded < 0.001, (free, bounded)


def test_bspline_propagation_falls_back_to_the_affine_when_itk_gives_up(tiny):
    """A registration ITK cannot start (the affine sends every sample outside the atlas, as a runaway optimiser step
    did once on CI) gives the affine's labels and says so, instead of ending an hour of evaluation."""
    told = []
    far = sitk.TranslationTransform(3, (1000.0, 0.0, 0.0))
    labels = bspline_propagate(tiny.atlas_image, tiny.atlas_image, tiny.atlas_labels, far, tiny.atlas_mask, say=told.append)
    assert len(told) == 1 and "B-spline registration failed" in told[0] and "affine" in told[0], told
    assert labels.GetSize() == tiny.atlas_image.GetSize() and not sitk.GetArrayViewFromImage(labels).any()


@pytest.fixture(scope="module")
def test_scans(colin27, tmp_path_factory) -> Path:
    """Two labelled test scans in the training layout (real Colin27 + AAL on other grids, warped): the AAL table with
    Frontal_Sup_L renumbered 1003 (labels are matched by name, not value); the second annotates two labels only."""
    folder = tmp_path_factory.mktemp("test_scans")
    table = LabelTable.read_csv(colin27 / "labels.csv")
    LabelTable(Label(1003 if label.name == "Frontal_Sup_L" else label.value, label.name, label.color)
               for label in table).write_csv(folder / "labels.csv")
    for i in range(2):
        image, truth = heldout_subject(colin27, seed=40 + i)
        truth = sitk.ChangeLabel(sitk.Cast(truth, sitk.sitkInt16), changeMap={3: 1003})
        write_case(folder, f"scan{i}", image, truth, annotated=["Frontal_Sup_L", "Temporal_Mid_R"] if i else None)
    return folder


@pytest.mark.slow  # 13 s: registers and scores two scans three ways
def test_evaluate_scores_a_folder_of_labelled_test_scans(tiny_checkpoint, test_scans, tmp_path, capsys):
    """Each scan segmented as lcs segment does and scored on its own grid, beside affine propagation: one row per case,
    method and label the model has (by name), only the annotated ones where a case says; the rest reported once."""
    code = main(["evaluate", "--folder", str(test_scans), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path),
                 "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("not in the model") == 1 and "110 labels" in err and "Precentral_L" in err, err
    figures = dict(item.split("=") for item in out.strip().splitlines()[-1].split())
    assert figures["cases"] == "2" and float(figures["lcs_dice"]) > 0.5 and float(figures["affine_propagation_dice"]) > 0.5
    with open(tmp_path / "heldout_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS
    methods = ("lcs", "affine propagation")
    assert sorted((r["subject"], r["method"], r["name"]) for r in rows) == sorted(
        [("scan0", m, name) for m in methods for name in TINY_LABELS]
        + [("scan1", m, name) for m in methods for name in ("Frontal_Sup_L", "Temporal_Mid_R")])
    assert {r["value"] for r in rows if r["name"] == "Frontal_Sup_L"} == {"3"}  # the model's value
    truth = sitk.ReadImage(str(test_scans / "labels/scan0.nii.gz"))
    voxel_ml = np.prod(truth.GetSpacing()) / 1000
    for r in rows:
        assert 0.3 < float(r["dice"]) <= 1 and 0 < float(r["hd95_mm"]) < 20 and float(r["seconds"]) > 0, r
        truth_ml, predicted_ml = float(r["truth_ml"]), float(r["predicted_ml"])
        assert float(r["volume_diff_pct"]) == pytest.approx(100 * (predicted_ml - truth_ml) / truth_ml, abs=0.01)
        if r["subject"] == "scan0" and r["name"] == "Frontal_Sup_L":
            voxels = int((sitk.GetArrayViewFromImage(truth) == 1003).sum())
            assert truth_ml == pytest.approx(voxels * voxel_ml, abs=1e-3)
    for png in ("heldout_dice.png", "heldout_hd95.png", "heldout_seconds.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_a_folder_whose_labels_the_model_lacks(tiny_checkpoint, test_scans, tmp_path, capsys):
    folder = Path(shutil.copytree(test_scans, tmp_path / "renamed", ignore=shutil.ignore_patterns("annotated")))
    table = LabelTable.read_csv(folder / "labels.csv")
    LabelTable(Label(label.value, f"x_{label.name}", label.color) for label in table).write_csv(folder / "labels.csv")
    code = main(["evaluate", "--folder", str(folder), "--checkpoint", str(tiny_checkpoint), "--out",
                 str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "matched by name" in err and "'lcs labels'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # about 20 s on 2 cores: a speed report, not a check a newcomer needs each run
def test_benchmark_prints_all_figures(tiny_checkpoint, capsys):
    code = main(["benchmark", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"all_labels_s", "next_label_s", "peak_mb_1", "peak_mb_all", "speedup_vs_naive",
                            "one_label_s", "naive_one_label_s", "deformable_s", "deformable_prepare_s",
                            "peak_mb_deformable"}
    assert all(float(v) > 0 for v in figures.values())
