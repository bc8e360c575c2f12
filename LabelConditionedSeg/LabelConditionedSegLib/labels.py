"""The atlas label table: value, name, color and optional terminology code per label."""
from __future__ import annotations

import colorsys
import csv
import difflib
import io
import itertools
import re
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


# Label colours must show on Slicer's black background and on the grey brain of the overlay PNG,
# no two labels may share a colour, and left/right partners must be told apart at a glance, also
# by colour-blind readers and in greyscale: partners differ in lightness.
# Source tables often fail all three: the MRIcron AAL palette gives 16 labels 0,0,0, each L/R
# pair one colour, and Precentral_L light grey.
LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114])  # of R, G, B (Rec. 601 luma)
MIN_LUMINANCE = 60.0  # of 255; darker colours vanish on black
MIN_CHROMA = 60.0  # of 255, as max(R, G, B) - min(R, G, B); a colour with less reads as grey on a grey brain
NEAR_DISTANCE = 30.0  # Euclidean RGB distance below which a source colour counts as taken by an earlier label
MIN_DISTANCE = 40.0  # distance a replacement colour keeps from every other colour
PARTNER_LUMINANCE = 70.0  # luminance difference between left/right partners: one clearly lighter than the other
CROWD_LABELS = 150  # above this many labels NEAR and MIN shrink by (CROWD_LABELS / labels) ** (1/3): fewer fit
VARIANT_STEPS = (0.2, 0.3, 0.4)  # HLS lightness steps of a colour's variants, toward mid-lightness first
GOLDEN_ANGLE = 0.381966  # hue step (fraction of the circle) between consecutive generated colours
PALETTE_HUES = 64  # generated hues per (saturation, value) level
PALETTE_LEVELS = tuple((s, v) for v in (1.0, 0.8, 0.6) for s in (1.0, 0.65, 0.35))  # (saturation, value), in order
GRID_STEP = 17  # RGB grid after the generated hues, for crowded tables
SIDES = {"l": "L", "left": "L", "lh": "L", "r": "R", "right": "R", "rh": "R"}  # name parts that say a side

Color = tuple[int, int, int]


def _luminance(color: Color) -> float:
    return float(np.dot(LUMINANCE_WEIGHTS, color))


def _visible(color: Color) -> bool:
    return _luminance(color) >= MIN_LUMINANCE and max(color) - min(color) >= MIN_CHROMA


def _variants(color: Color) -> list[Color]:
    """The colour's hue at other lightnesses (HLS), the steps toward mid-lightness first; none for grey or black."""
    if max(color) == min(color):
        return []
    hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in color))
    toward = 1 if lightness < 0.5 else -1
    shifts = [toward * step for step in VARIANT_STEPS] + [-toward * step for step in VARIANT_STEPS]
    return [tuple(round(255 * x) for x in colorsys.hls_to_rgb(hue, lightness + shift, saturation))
            for shift in shifts if 0 < lightness + shift < 1]


def side(name: str) -> tuple[str, str] | None:
    """(the name without its side, "L" or "R") for a name with one side part (Hippocampus_L, Left-Putamen,
    ctx-lh-insula), else None."""
    parts = re.split(r"([_\-.+ ]+)", name)
    found = [i for i in range(0, len(parts), 2) if parts[i].lower() in SIDES]
    if len(found) != 1:
        return None
    i = found[0]
    rest = parts[:i - 1] + parts[i + 1:] if i else parts[2:]
    return "".join(rest), SIDES[parts[i].lower()]


def partners(names: list[str]) -> dict[int, int]:
    """Index -> index of its left/right partner, for each name whose counterpart is in the list once."""
    by_key: dict[str, dict[str, list[int]]] = {}
    for i, name in enumerate(names):
        if (found := side(name)) is not None:
            by_key.setdefault(found[0].lower(), {"L": [], "R": []})[found[1]].append(i)
    out = {}
    for sides in by_key.values():
        if len(sides["L"]) == len(sides["R"]) == 1:
            (left,), (right,) = sides["L"], sides["R"]
            out[left], out[right] = right, left
    return out


# Deterministic replacement colours, visible ones only: golden-angle hues at a few saturation/value levels, then a grid.
PALETTE = tuple(c for c in [tuple(round(255 * x) for x in colorsys.hsv_to_rgb(i * GOLDEN_ANGLE % 1, s, v))
                            for s, v in PALETTE_LEVELS for i in range(PALETTE_HUES)]
                + list(itertools.product(range(0, 256, GRID_STEP), repeat=3)) if _visible(c))


def distinct_colors(labels: list[Label]) -> list[Label]:
    """The labels with visible, distinct colours, keeping every source colour that already is.

    A label keeps its source colour when it is visible (MIN_LUMINANCE, MIN_CHROMA), at least
    NEAR_DISTANCE from the colours kept for earlier labels and, when its left/right partner
    came earlier and kept its colour, PARTNER_LUMINANCE lighter or darker than that. Each
    other label gets the first visible variant (the same hue, lighter or darker) of its
    partner's colour, else of its own, else the first PALETTE colour, that is MIN_DISTANCE
    from every colour given so far and PARTNER_LUMINANCE from its partner's; else the PALETTE
    colour farthest from them. NEAR and MIN shrink for tables of more than CROWD_LABELS labels.
    Deterministic, and a no-op on its own result (as long as replacements fit), so tables
    saved with fixed colours load unchanged, and subsets of them up to CROWD_LABELS labels too.
    """
    crowd = min(1.0, CROWD_LABELS / max(len(labels), 1)) ** (1 / 3)
    near, far = NEAR_DISTANCE * crowd, MIN_DISTANCE * crowd
    partner = partners([label.name for label in labels])
    palette = np.array(PALETTE, float)
    gap = np.full(len(palette), np.inf)  # each palette colour's distance to the nearest colour given so far
    given: dict[int, Color] = {}

    def free(color: Color, distance: float) -> bool:
        return not given or np.linalg.norm(np.subtract(list(given.values()), color), axis=1).min() >= distance

    def apart(i: int, color: Color) -> bool:
        return partner.get(i) not in given or abs(_luminance(given[partner[i]]) - _luminance(color)) >= PARTNER_LUMINANCE

    def give(i: int, color: Color) -> None:
        nonlocal gap
        given[i] = color
        gap = np.minimum(gap, np.linalg.norm(palette - color, axis=1))

    for i, label in enumerate(labels):
        if _visible(label.color) and free(label.color, near) and apart(i, label.color):
            give(i, label.color)
    for i, label in enumerate(labels):
        if i in given:
            continue
        related = (_variants(given[partner[i]]) if partner.get(i) in given else []) + _variants(label.color)
        variant = next((c for c in related if _visible(c) and free(c, far) and apart(i, c)), None)
        fits = gap >= far
        if partner.get(i) in given:
            fits &= np.abs(palette @ LUMINANCE_WEIGHTS - _luminance(given[partner[i]])) >= PARTNER_LUMINANCE
        index = int(np.argmax(fits)) if fits.any() else int(np.argmax(gap))
        give(i, variant or PALETTE[index])
    return [replace(label, color=given[i]) for i, label in enumerate(labels)]


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
            with open(path, newline="", encoding="utf-8") as f:
                text = f.read()
        except OSError as error:
            raise LCSError(f"cannot read label table {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise LCSError(f"label table {path} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in a spreadsheet)") from None
        return cls.from_rows(csv.DictReader(io.StringIO(text, newline="")))

    @classmethod
    def from_mricron(cls, names_txt: str | Path, lut: str | Path) -> "LabelTable":
        """MRIcron's atlas files: '<value> <name> ...' lines and a 768-byte RRR..GGG..BBB palette."""
        palette = Path(lut).read_bytes()
        labels = []
        for line in Path(names_txt).read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].isdigit() and int(fields[0]) > 0:
                v = int(fields[0])
                labels.append(Label(v, fields[1], (palette[v % 256], palette[256 + v % 256], palette[512 + v % 256])))
        return cls(labels)
