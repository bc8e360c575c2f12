"""Pictures of results: training curves and segmentation overlays (matplotlib, off-screen)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_history(history_csv: Path, png: Path) -> None:
    """Training loss (smoothed) and validation Dice against steps."""
    rows = list(csv.DictReader(open(history_csv)))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 50)
    ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, "valid"), label="soft-Dice loss (smoothed)")
    val = [(int(r["step"]), float(r["val_dice"])) for r in rows if r["val_dice"]]
    if val:
        ax.plot(*zip(*val), "o-", label="validation mean Dice")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_method_dice(rows: list[dict], methods: tuple[str, str], means: dict, png: Path) -> None:
    """Per-label Dice (mean over cases) of two methods, labels sorted by the first method's Dice."""
    per_label = {m: {} for m in methods}
    for r in rows:
        per_label[r["method"]].setdefault(r["value"], []).append(r["dice"])
    order = sorted(per_label[methods[0]], key=lambda v: np.mean(per_label[methods[0]][v]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4))
    for method, color in zip(methods, ("tab:blue", "tab:red")):
        ax.plot([np.mean(per_label[method].get(v, [0])) for v in order], "o", ms=3, color=color,
                label=f"{method} (mean {means[method]:.3f})")
    ax.set_xlabel(f"label, sorted by {methods[0]} Dice")
    ax.set_ylabel("Dice (mean over cases)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
