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
