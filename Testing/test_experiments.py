"""Each paper experiment runs end to end at its tiny scale, so none can rot (the slow tier: make test-slow)."""
import csv

import pytest

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.cli import main

pytestmark = pytest.mark.slow


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_baseline_k_trains_both_models_and_pairs_their_dice(colin27, tmp_path, capsys):
    assert main(["experiment", "baseline-k", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    folder = tmp_path / "baseline-k"
    rows = read_rows(folder / "baseline_k.csv")
    assert [int(r["K"]) for r in rows] == [2, 4]
    for r in rows:
        assert 0 <= float(r["lcs_dice"]) <= 1 and 0 <= float(r["baseline_dice"]) <= 1 and int(r["cases"]) == 1
        k = int(r["K"])
        assert (folder / f"k{k}/lcs/best.lcs").is_file() and (folder / f"k{k}/baseline/best.lcs").is_file()
        methods = {m["method"] for m in read_rows(folder / f"k{k}/heldout_metrics.csv")}
        assert {"lcs", "baseline", "affine propagation"} <= methods
    assert (folder / "baseline_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "| K | lcs_dice |" in (folder / "baseline_k.md").read_text(encoding="utf-8") and "| K | lcs_dice |" in capsys.readouterr().out


def test_memory_measures_both_methods_in_both_phases(colin27, tmp_path):
    assert main(["experiment", "memory", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    rows = read_rows(tmp_path / "memory/memory.csv")
    assert [int(r["K"]) for r in rows] == [1, 4]
    for r in rows:
        for key in ("lcs_train_mb", "lcs_infer_mb", "baseline_train_mb", "baseline_infer_mb"):
            assert float(r[key]) > 0, (key, r)
    assert (tmp_path / "memory/memory.png").read_bytes()[:4] == b"\x89PNG"


def test_many_classes_splits_the_baseline_into_models_of_at_most_ten_labels(colin27, tmp_path):
    assert main(["experiment", "many", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    folder = tmp_path / "many"
    rows = {r["method"]: r for r in read_rows(folder / "many.csv")}
    assert set(rows) == {"lcs", "baseline", "affine propagation"}
    assert rows["baseline"]["models"] == "2" and rows["lcs"]["models"] == "1"
    assert rows["lcs"]["steps"] == rows["baseline"]["steps"] == "40"  # the same total training budget
    assert all(int(r["labels"]) == 12 for r in rows.values())  # every label scored by exactly one baseline model
    for i in (1, 2):
        assert (folder / f"baseline{i}/best.lcs").is_file()
    for r in rows.values():
        assert 0 <= float(r["small_third_dice"]) <= 1 and 0 <= float(r["mean_dice"]) <= 1
    assert (folder / "many_classes.png").read_bytes()[:4] == b"\x89PNG"


def test_novel_labels_scores_unseen_fine_parts_of_coarse_training_labels(colin27, tmp_path):
    from lcs_training.novel import AAL_GROUPS
    from LabelConditionedSegLib.checkpoint import Checkpoint
    assert main(["experiment", "novel", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    folder = tmp_path / "novel"
    trained = [l.name for l in Checkpoint.load(folder / "lcs/best.lcs").label_table]
    assert sorted(trained) == sorted(AAL_GROUPS)  # the model never saw a fine label
    rows = read_rows(folder / "novel.csv")
    assert [r["fine_label"] for r in rows] == [part for parts in AAL_GROUPS.values() for part in parts]
    for r in rows:
        assert r["coarse_label"] in AAL_GROUPS
        for key in ("coarse_dice", "naive_dice", "fine_dice", "propagation_dice"):
            assert 0 <= float(r[key]) <= 1
        assert float(r["propagation_dice"]) > 0.3  # the fine truth is where registration puts the fine atlas label
    assert (folder / "novel_labels.png").read_bytes()[:4] == b"\x89PNG"


def test_second_atlas_trains_on_the_macaque_neuromaps_labels(tmp_path):
    assert main(["experiment", "second-atlas", "--scale", "tiny", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = {r["method"]: r for r in read_rows(tmp_path / "second-atlas/second_atlas.csv")}
    assert set(rows) == {"lcs", "affine propagation"}
    assert int(rows["lcs"]["labels"]) > 200  # hundreds of classes from one single-channel model
    assert float(rows["affine propagation"]["large_third_dice"]) > float(rows["affine propagation"]["small_third_dice"])
    assert (tmp_path / "second-atlas/heldout_dice.png").read_bytes()[:4] == b"\x89PNG"


def test_few_labels_trains_every_recipe_on_the_same_cohort_and_pairs_them_with_plain(colin27, tmp_path):
    from lcs_training.experiment import FEW_RECIPES
    assert main(["experiment", "few-labels", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    folder = tmp_path / "few-labels"
    rows = {r["model"]: r for r in read_rows(folder / "few_labels.csv")}
    assert list(rows) == list(FEW_RECIPES)
    for name, r in rows.items():
        assert 0 <= float(r["heldout_dice"]) <= 1 and int(r["cases"]) == 1
        provenance = Checkpoint.load(folder / f"seed0/{name}/best.lcs").provenance
        assert (provenance["init_encoder"] is not None) == (name in ("pretrained", "all"))
        assert (provenance["adversarial"] is not None) == (name in ("adversarial", "all"))
        assert provenance["loss"].startswith("dice-bce-schedule") == (name in ("dice-bce", "all"))
    assert (folder / "seed0/encoder.pt").is_file() and len(list((folder / "unlabelled-data/images").iterdir())) == 1
    assert (folder / "few_labels.png").read_bytes()[:4] == b"\x89PNG"
