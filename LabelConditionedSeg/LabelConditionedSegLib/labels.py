"""The atlas label table: value, name, color and optional terminology code per label."""
from __future__ import annotations

import colorsys
import csv
import difflib
import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import LCSError
from .files import write_csv


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    code: str = ""  # terminology, e.g. "SCT^12345^Precentral gyrus"; empty when unknown


# Label colours must show on Slicer's black background and in the overlay PNG, and no two
# labels (left/right partners above all) may share a colour. Source tables often fail both:
# the MRIcron AAL palette gives 16 labels 0,0,0 and each L/R pair one colour.
MIN_LUMINANCE = 60.0  # of 255, as 0.299 R + 0.587 G + 0.114 B; darker colours vanish on black
NEAR_DISTANCE = 30.0  # Euclidean RGB distance below which a source colour counts as taken by an earlier label
MIN_DISTANCE = 40.0  # distance a replacement colour keeps from every other colour
CROWD_LABELS = 150  # above this many labels both distances shrink by (CROWD_LABELS / labels) ** (1/3): fewer fit
VARIANT_MIXES = (0.35, -0.3, 0.6, -0.5)  # variants of a label's own colour: > 0 mixes toward white, < 0 toward black
GOLDEN_ANGLE = 0.381966  # hue step (fraction of the circle) between consecutive generated colours
PALETTE_HUES = 64  # generated hues per (saturation, value) level
PALETTE_LEVELS = tuple((s, v) for v in (1.0, 0.8, 0.6) for s in (1.0, 0.65, 0.35))  # (saturation, value), in order
GRID_STEP = 17  # RGB grid after the generated hues, for crowded tables

Color = tuple[int, int, int]


def _luminance(color: Color) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _variants(color: Color) -> list[Color]:
    """Lighter and darker versions of a colour with a hue (none for grey or black)."""
    if max(color) == min(color):
        return []
    return [tuple(round(c + m * (255 - c)) if m > 0 else round(c * (1 + m)) for c in color) for m in VARIANT_MIXES]


# Deterministic replacement colours, visible ones only: golden-angle hues at a few saturation/value levels, then a grid.
PALETTE = tuple(c for c in [tuple(round(255 * x) for x in colorsys.hsv_to_rgb(i * GOLDEN_ANGLE % 1, s, v))
                            for s, v in PALETTE_LEVELS for i in range(PALETTE_HUES)]
                + list(itertools.product(range(0, 256, GRID_STEP), repeat=3)) if _luminance(c) >= MIN_LUMINANCE)


def distinct_colors(labels: list[Label]) -> list[Label]:
    """The labels with visible, distinct colours, keeping every source colour that already is.

    A label keeps its source colour when its luminance is at least MIN_LUMINANCE and it is at
    least NEAR_DISTANCE from the colours kept for earlier labels. Each other label gets the
    first visible lighter/darker variant of its own colour (so L/R partners stay related),
    else the first PALETTE colour, that is MIN_DISTANCE from every colour given so far, else
    the PALETTE colour farthest from them. Both distances shrink for tables of more than
    CROWD_LABELS labels. Deterministic, and a no-op on its own result (as long as replacements
    fit), so tables saved with fixed colours load unchanged, and subsets of them up to
    CROWD_LABELS labels too.
    """
    crowd = min(1.0, CROWD_LABELS / max(len(labels), 1)) ** (1 / 3)
    near, far = NEAR_DISTANCE * crowd, MIN_DISTANCE * crowd
    palette = np.array(PALETTE, float)
    gap = np.full(len(palette), np.inf)  # each palette colour's distance to the nearest colour given so far
    used: list[Color] = []

    def free(color: Color, distance: float) -> bool:
        return not used or np.linalg.norm(np.subtract(used, color), axis=1).min() >= distance

    def use(color: Color) -> Color:
        nonlocal gap
        used.append(color)
        gap = np.minimum(gap, np.linalg.norm(palette - color, axis=1))
        return color

    keep = []
    for label in labels:
        keep.append(_luminance(label.color) >= MIN_LUMINANCE and free(label.color, near))
        if keep[-1]:
            use(label.color)
    out = []
    for label, kept in zip(labels, keep):
        if not kept:
            variant = next((c for c in _variants(label.color) if _luminance(c) >= MIN_LUMINANCE and free(c, far)), None)
            index = int(np.argmax(gap >= far)) if (gap >= far).any() else int(np.argmax(gap))
            label = replace(label, color=use(variant or PALETTE[index]))
        out.append(label)
    return out


class LabelTable:
    """Ordered labels with lookup by name (case-insensitive) or value; colours made visible and distinct."""

    def __init__(self, labels: Iterable[Label]):
        self.labels = distinct_colors(list(labels))
        self._by_value = {label.value: label for label in self.labels}
        self._by_name = {label.name.lower(): label for label in self.labels}
        if len(self._by_value) != len(self.labels) or 0 in self._by_value:
            raise LCSError("label table values must be unique and non-zero (0 is background)")

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        return iter(self.labels)

    @property
    def values(self) -> list[int]:
        return [label.value for label in self.labels]

    def get(self, value: int) -> Label:
        return self._by_value[value]

    def resolve(self, name_or_value: str | int) -> Label:
        """A label from its name or its value, or a clear error naming what to use instead."""
        key = str(name_or_value).strip()
        if key.lower() in self._by_name:
            return self._by_name[key.lower()]
        if key.lstrip("-").isdigit() and int(key) in self._by_value:
            return self._by_value[int(key)]
        close = difflib.get_close_matches(key.lower(), list(self._by_name), n=3, cutoff=0.75)
        guess = f"did you mean {' or '.join(self._by_name[name].name for name in close)}? " if close else ""
        raise LCSError(f"label {key!r} is not in the atlas; {guess}run 'lcs labels' to list the {len(self)} labels")

    def resolve_union(self, item: str | int) -> list[Label]:
        """The labels of one item: a name or value, or several joined by '+' (their union)."""
        return [self.resolve(part) for part in str(item).split("+")]

    def to_rows(self) -> list[dict]:
        return [{"value": l.value, "name": l.name, "r": l.color[0], "g": l.color[1], "b": l.color[2], "code": l.code} for l in self.labels]

    @classmethod
    def from_rows(cls, rows: Iterable[dict]) -> "LabelTable":
        try:
            return cls(Label(int(r["value"]), str(r["name"]), (int(r["r"]), int(r["g"]), int(r["b"])), str(r.get("code") or "")) for r in rows)
        except (KeyError, ValueError) as error:
            raise LCSError(f"label table rows need value,name,r,g,b columns ({error})") from None

    def write_csv(self, path: str | Path) -> None:
        write_csv(self.to_rows(), path, ["value", "name", "r", "g", "b", "code"])

    @classmethod
    def read_csv(cls, path: str | Path) -> "LabelTable":
        """CSV with a header: value,name,r,g,b[,code]."""
        try:
            with open(path, newline="") as f:
                return cls.from_rows(csv.DictReader(f))
        except OSError as error:
            raise LCSError(f"cannot read label table {path}: {error.strerror}") from None

    @classmethod
    def from_mricron(cls, names_txt: str | Path, lut: str | Path) -> "LabelTable":
        """MRIcron's atlas files: '<value> <name> ...' lines and a 768-byte RRR..GGG..BBB palette."""
        palette = Path(lut).read_bytes()
        labels = []
        for line in Path(names_txt).read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) > 0:
                v = int(fields[0])
                labels.append(Label(v, fields[1], (palette[v % 256], palette[256 + v % 256], palette[512 + v % 256])))
        return cls(labels)
