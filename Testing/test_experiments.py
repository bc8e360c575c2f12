"""Each paper experiment runs end to end at its tiny scale, so none can rot."""
import csv

from LabelConditionedSegLib.cli import main


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
    assert "| K | lcs_dice |" in (folder / "baseline_k.md").read_text() and "| K | lcs_dice |" in capsys.readouterr().out


def test_memory_measures_both_methods_in_both_phases(colin27, tmp_path):
    assert main(["experiment", "memory", "--scale", "tiny", "--data", str(colin27), "--out", str(tmp_path),
                 "--device", "cpu"]) == 0
    rows = read_rows(tmp_path / "memory/memory.csv")
    assert [int(r["K"]) for r in rows] == [1, 4]
    for r in rows:
        for key in ("lcs_train_mb", "lcs_infer_mb", "baseline_train_mb", "baseline_infer_mb"):
            assert float(r[key]) > 0, (key, r)
    assert (tmp_path / "memory/memory.png").read_bytes()[:4] == b"\x89PNG"
