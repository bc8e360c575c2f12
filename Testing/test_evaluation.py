"""`lcs evaluate` and `lcs benchmark` run end to end (tiny sizes) and print their machine-readable lines."""
import re

from LabelConditionedSegLib.cli import main


def test_evaluate_compares_lcs_with_affine_propagation(tiny_checkpoint, colin27, tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(colin27), "--subjects", "1",
                 "--strength", "1.0", "--out", str(tmp_path), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    match = re.search(r"lcs_dice=([\d.]+) propagation_dice=([\d.]+) subjects=1", out)
    assert match and 0.2 < float(match[1]) <= 1 and 0.2 < float(match[2]) <= 1
    rows = (tmp_path / "heldout_dice.csv").read_text().splitlines()
    assert rows[0] == "subject,method,value,name,dice" and len(rows) == 1 + 2 * 6
    assert (tmp_path / "heldout_dice.png").read_bytes()[:4] == b"\x89PNG"


def test_benchmark_prints_all_figures(tiny_checkpoint, capsys):
    code = main(["benchmark", "--checkpoint", str(tiny_checkpoint), "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0
    figures = dict(item.split("=") for item in last.split())
    assert set(figures) == {"all_labels_s", "next_label_s", "peak_mb_1", "peak_mb_all", "speedup_vs_naive"}
    assert all(float(v) > 0 for v in figures.values())
