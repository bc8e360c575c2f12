"""Pictures of results: training curves and segmentation overlays (matplotlib, off-screen)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.files import atomic_path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, png: Path) -> None:
    try:
        fig.tight_layout()
        with atomic_path(png) as temporary:
            fig.savefig(temporary, dpi=100)
    finally:
        _pyplot().close(fig)


def plot_history(history_csv: Path, png: Path) -> None:
    """Training loss (smoothed) and validation Dice against steps."""
    rows = list(csv.DictReader(open(history_csv)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 50)
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label="soft-Dice loss (smoothed)")
    for column, name in (("val_affine", "validation Dice, affine prior"),
                         ("val_deformable", "validation Dice, deformable prior")):
        val = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if val:
            ax.plot(*zip(*val), "o-", label=name)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, png)


def plot_training_speed(runs: dict[str, Path], png: Path, reference: dict[str, list[tuple[float, float]]] = {},
                        goal: float | None = None) -> None:
    """Validation Dice against training minutes (validation time left out) of several runs' history.csv, each prior
    its own line, beside reference points (minutes, Dice) of runs whose history is not kept."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, history_csv in runs.items():
        rows = list(csv.DictReader(open(history_csv)))
        for column, style in (("val_affine", "o-"), ("val_deformable", "s--")):
            val = [(float(r["seconds"]) / 60, float(r[column])) for r in rows if r.get(column)]
            if val:
                ax.plot(*zip(*val), style, ms=4, label=f"{name}, {column[4:]} prior")
    for (name, points), marker in zip(reference.items(), "^vDxP*"):
        ax.plot(*zip(*points), f"k{marker}:", ms=5, label=name)
    if goal is not None:
        ax.axhline(goal, color="grey", lw=0.8)
        ax.axvline(30, color="grey", lw=0.8)
    ax.set_xlabel("training minutes on this 2-core CPU (validation left out)")
    ax.set_ylabel("validation mean Dice (116 labels)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, png)


def plot_method_dice(rows: list[dict], methods: list[str], means: dict, png: Path, metric: str = "dice") -> None:
    """Per-label `metric` (mean over cases) of each method, labels sorted by the first method's value."""
    per_label = {m: {} for m in methods}
    for r in rows:
        if r["method"] in per_label and np.isfinite(r[metric]):
            per_label[r["method"]].setdefault(r["value"], []).append(r[metric])
    order = sorted(per_label[methods[0]], key=lambda v: np.mean(per_label[methods[0]][v]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    for method in methods:
        ax.plot([np.mean(per_label[method].get(v, [np.nan])) for v in order], "o", ms=3,
                label=f"{method} (mean {means[method]:.3f})")
    ax.set_xlabel(f"label, sorted by {methods[0]}")
    ax.set_ylabel(f"{metric} (mean over cases)")
    if metric == "dice":
        ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, png)


def plot_contrast_dice(rows: list[dict], methods: list[str], png: Path) -> None:
    """Mean Dice of each method in each contrast (bars), each case's mean over labels as a dot."""
    contrasts = list(dict.fromkeys(r["contrast"] for r in rows))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(contrasts) * len(methods) ** 0.5), 4.5))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        for i, contrast in enumerate(contrasts):
            cases = {}
            for r in rows:
                if r["method"] == method and r["contrast"] == contrast:
                    cases.setdefault(r["subject"], []).append(r["dice"])
            x = i + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, np.mean([d for case in cases.values() for d in case]), width * 0.9, color=f"C{j}",
                   label=method if i == 0 else None)
            ax.plot([x] * len(cases), [np.mean(case) for case in cases.values()], "k.", ms=3)
    ax.set_xticks(range(len(contrasts)), contrasts)
    ax.set_ylabel("Dice (mean over labels and cases; dots: cases)")
    ax.set_ylim(0, 1.2)  # the legend above the bars
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    _save(fig, png)


def plot_dice_seconds(rows: list[dict], methods: list[str], png: Path, halved: str = "") -> None:
    """Each method's mean Dice against its mean seconds per case (one point per contrast, when there are several):
    what a method costs beside what it gives. With the method `halved` among them, half its seconds as a line."""
    contrasts = list(dict.fromkeys(r.get("contrast", "") for r in rows))
    markers = dict(zip(contrasts, "osD^vP*X"))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seconds_of = {}
    for j, method in enumerate(methods):
        ax.plot([], [], "s", color=f"C{j}", label=method)
        for contrast, marker in markers.items():
            mine = [r for r in rows if r["method"] == method and r.get("contrast", "") == contrast]
            if mine:
                seconds = np.mean(list({r["subject"]: r["seconds"] for r in mine}.values()))
                seconds_of.setdefault(method, []).append(seconds)
                ax.plot(seconds, np.mean([r["dice"] for r in mine]), marker, color=f"C{j}", ms=7)
    for contrast, marker in markers.items() if len(markers) > 1 else ():
        ax.plot([], [], marker, color="grey", label=contrast)
    if halved in seconds_of:
        ax.axvline(np.mean(seconds_of[halved]) / 2, color="grey", ls="--", lw=0.8, label=f"half the seconds of {halved}")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds per case (mean)")
    ax.set_ylabel("Dice (mean over labels and cases)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, png)


def plot_contrast_slices(rows: dict[str, dict[str, sitk.Image]], png: Path) -> None:
    """The middle axial slice of each image, in radiological view: one row per title, one column per contrast."""
    plt = _pyplot()
    columns = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.4 * columns, 2.7 * len(rows)), squeeze=False)
    for row, (title, images) in zip(axes, rows.items()):
        for ax, (name, image) in zip(row, images.items()):
            image = sitk.DICOMOrient(image, "LPS")  # rows anterior to posterior, columns right to left, slices upward
            array = sitk.GetArrayViewFromImage(image)
            x, y = image.GetSpacing()[:2]
            ax.imshow(array[array.shape[0] // 2], cmap="gray", aspect=y / x, vmin=0, vmax=np.percentile(array, 99.5))
            ax.set_title(f"{name}, {title}", fontsize=8)
        for ax in row:
            ax.axis("off")
    _save(fig, png)


def plot_paired_dice(table: list[dict], png: Path) -> None:
    """Per-case Dice of the baseline and LCS side by side for each K, pairs joined (the paper's Figure 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(table):
        for a, b in zip(row["baseline_case_dice"], row["lcs_case_dice"]):
            ax.plot([i - 0.15, i + 0.15], [a, b], color="0.7", lw=0.8)
        ax.plot([i - 0.15] * row["cases"], row["baseline_case_dice"], "o", color="tab:red", ms=4,
                label="baseline" if i == 0 else None)
        ax.plot([i + 0.15] * row["cases"], row["lcs_case_dice"], "o", color="tab:blue", ms=4, label="LCS" if i == 0 else None)
    ax.set_xticks(range(len(table)), [f"K={r['K']}\nt-test p={float(r['t_test_p']):.2g}" for r in table])
    ax.set_ylabel("Dice per held-out case (mean over labels)")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, png)


def plot_memory(table: list[dict], device: str, png: Path) -> None:
    """Peak memory of training and inference against the number of labels, LCS and baseline."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in [("lcs_train_mb", "-o"), ("lcs_infer_mb", "--o"), ("baseline_train_mb", "-s"), ("baseline_infer_mb", "--s")]:
        ax.plot([r["K"] for r in table], [r[key] for r in table], style, label=key.replace("_mb", "").replace("_", " "))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of labels K")
    ax.set_ylabel(f"peak memory, MB ({device})")
    ax.legend()
    _save(fig, png)


def plot_fine_labels(table: list[dict], png: Path) -> None:
    """Per fine label: the naive Dice (coarse prediction), LCS conditioned on the unseen fine label, and affine
    propagation of the fine atlas label (the paper's Table 1 as bars)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(table))
    for i, (key, label) in enumerate([("naive_dice", "naive (coarse prediction)"), ("fine_dice", "LCS, unseen fine label"),
                                      ("propagation_dice", "affine propagation")]):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in table], 0.27, label=label)
    ax.set_xticks(x, [r["fine_label"] for r in table], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("Dice (mean over held-out cases)")
    ax.set_ylim(0, 1)
    ax.legend()
    _save(fig, png)


def plot_incomplete(table: list[dict], png: Path) -> None:
    """Per-case Dice of each method at each fraction alpha of missing annotations."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    methods = [("affine", "affine propagation"), ("baseline_naive", "baseline, naive"),
               ("baseline_smile", "baseline, SMILE"), ("lcs", "LCS")]
    for i, row in enumerate(table):
        for j, (key, label) in enumerate(methods):
            x = i + (j - 1.5) * 0.2
            ax.bar(x, row[f"{key}_dice"], 0.18, color=f"C{j}", label=label if i == 0 else None)
            ax.plot([x] * len(row[f"{key}_case_dice"]), row[f"{key}_case_dice"], "k.", ms=3)
    ax.set_xticks(range(len(table)), [f"alpha = {r['alpha']:.0%} missing" for r in table])
    ax.set_ylabel("Dice on complete held-out subjects")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    _save(fig, png)


def plot_relabel(table: list[dict], png: Path) -> None:
    """SMILEr: precision and recall of the voxels added by each round, and held-out Dice of each stage's model."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rounds = [r for r in table if r["precision"] != ""]
    x = np.arange(len(rounds))
    for j, key in enumerate(("precision", "recall")):
        left.bar(x + (j - 0.5) * 0.35, [float(r[key]) for r in rounds], 0.33, color=f"C{j}", label=key)
    left.set_xticks(x, [f"{r['stage']}\ngamma {r['gamma']}" for r in rounds])
    left.set_ylim(0, 1.15)
    left.set_title("added voxels against the complete labels")
    left.legend(fontsize=8, ncol=2, loc="upper center")
    right.bar(range(len(table)), [r["lcs_dice"] for r in table], color="C2", label="LCS")
    right.axhline(table[0]["affine_dice"], color="k", ls="--", lw=1, label="affine propagation")
    right.set_xticks(range(len(table)), [r["stage"].replace(" ", "\n", 1) for r in table], fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("Dice on complete held-out subjects")
    right.legend(fontsize=8)
    _save(fig, png)


def plot_few_labels(curves: dict[str, list[list[tuple[float, float, float]]]], table: list[dict], png: Path) -> None:
    """The few-labels experiment in one figure: validation Dice against steps and against training seconds (mean over
    seeds; pretraining's seconds counted), and each model's held-out Dice per (seed, case) joined to plain's."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (name, runs), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        length = min(len(run) for run in runs)
        mean = np.mean([[point for point in run[:length]] for run in runs], axis=0)  # (points, (step, seconds, dice))
        axes[0].plot(mean[:, 0], mean[:, 2], "-o", ms=3, color=color, label=name)
        axes[1].plot(mean[:, 1], mean[:, 2], "-o", ms=3, color=color, label=name)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training seconds (pretraining included)")
    for ax in axes[:2]:
        ax.set_ylabel(f"validation Dice (mean of {len(next(iter(curves.values())))} seeds)")
        ax.legend(fontsize=8)
    plain = table[0]["case_dice"]
    for i, row in enumerate(table):
        for a, b in zip(plain, row["case_dice"]):
            axes[2].plot([0, i], [a, b], color="0.85", lw=0.6) if i else None
        axes[2].plot([i] * len(row["case_dice"]), row["case_dice"], "o", ms=4)
    axes[2].set_xticks(range(len(table)), [f"{r['model']}\np={r['wilcoxon_p']}" if i else r["model"]
                                           for i, r in enumerate(table)], fontsize=8)
    axes[2].set_ylabel("held-out Dice per (seed, case), mean over labels")
    _save(fig, png)
