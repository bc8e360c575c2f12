"""The atlas label table: value, name, color and optional terminology code per label."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import LCSError


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    code: str = ""  # terminology, e.g. "SCT^12345^Precentral gyrus"; empty when unknown


class LabelTable:
    """Ordered labels with lookup by name (case-insensitive) or value."""

    def __init__(self, labels: Iterable[Label]):
        self.labels = list(labels)
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
        raise LCSError(f"label {key!r} is not in the atlas; run 'lcs labels' to list the {len(self)} labels")

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
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["value", "name", "r", "g", "b", "code"])
            writer.writeheader()
            writer.writerows(self.to_rows())

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
