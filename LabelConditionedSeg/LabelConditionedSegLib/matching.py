"""Which atlas label each of a user's segments stands for: by terminology code, else by a tolerant name match.

Users name segments "Left hippocampus", "hippocampus-l" or leave Slicer's terminology to name them; atlas labels are
named like "Hippocampus_L". A name matches when the two have the same words in any order and case, whatever the
separators, with sides (left/right/L/R/lh/rh) and the atlas's abbreviations (Sup, Mid, Inf, ...) read alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .labels import SIDES, Label, LabelTable

# The atlas's abbreviations (AAL) and spellings, read as the words users write.
WORDS = {"sup": "superior", "mid": "middle", "inf": "inferior", "med": "medial", "ant": "anterior",
         "post": "posterior", "orb": "orbital", "oper": "opercular", "tri": "triangular", "lat": "lateral",
         "cerebellum": "cerebelum", "supp": "supplementary"}
FILLERS = {"of", "the", "gyrus"}  # words that do not tell labels apart


@dataclass(frozen=True)
class Match:
    """A segment taken for an atlas label; `how`: "name" (the same name in another case), "code" (terminology) or
    "similar name" (the tolerant match): the last two are shown for confirmation."""

    segmentId: str
    segmentName: str
    label: str
    how: str


def name_key(name: str) -> tuple[tuple[str, ...], str]:
    """(the name's words, sorted, abbreviations spelled out, fillers left out; its side "L", "R" or "")."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)  # LeftHippocampus -> Left Hippocampus
    words = [w for w in re.split(r"[^0-9a-z]+", spaced.lower()) if w]
    sides = {SIDES[w] for w in words if w in SIDES}
    rest = sorted(WORDS.get(w, w) for w in words if w not in SIDES and w not in FILLERS)
    return tuple(rest), (sides.pop() if len(sides) == 1 else "")


def _coded(entry: str) -> tuple[str, str]:
    """(the type's "scheme^value", its modifier's) of a terminology entry or a bare "SCT^value^meaning" code."""
    parts = entry.split("~")
    kind, modifier = (parts[2], parts[3]) if len(parts) > 3 else (parts[0], "")

    def code(part: str) -> str:
        scheme, value = (part.split("^") + ["", ""])[:2]
        return f"{scheme}^{value}" if value else ""
    return code(kind), code(modifier)


def _by_code(entry: str, name: str, labels: Sequence[Label]) -> Label | None:
    """The one label whose code the segment's terminology entry carries (its side, or its name's, settles a code
    shared by left and right)."""
    kind, modifier = _coded(entry)
    if not kind:
        return None
    found = [l for l in labels if l.code and _coded(l.code)[0] == kind and _coded(l.code)[1] in ("", modifier)]
    if len(found) > 1:
        meaning = (entry.split("~")[3] if entry.count("~") > 3 else "").split("^")[-1]
        side = name_key(meaning)[1] or name_key(name)[1]
        found = [l for l in found if name_key(l.name)[1] == side]
    return found[0] if len(found) == 1 else None


def match_segments(segments: Sequence[tuple[str, str, str]], table: LabelTable) -> list[Match]:
    """The atlas label each segment (ID, name, terminology entry) stands for, where one does: the same name (any
    case), else the label whose terminology code it carries, else the one label with the same name_key. Segments
    matching no label (a tumour, a painted region) are left out."""
    labels = list(table)
    exact = {l.name.lower(): l for l in labels}
    keys: dict[tuple, list[Label]] = {}
    for l in labels:
        keys.setdefault(name_key(l.name), []).append(l)
    out = []
    for segmentId, name, entry in segments:
        if name.lower() in exact:
            out.append(Match(segmentId, name, exact[name.lower()].name, "name"))
        elif (label := _by_code(entry, name, labels)) is not None:
            out.append(Match(segmentId, name, label.name, "code"))
        elif len(similar := keys.get(name_key(name), [])) == 1 and name_key(name)[0]:
            out.append(Match(segmentId, name, similar[0].name, "similar name"))
    return out
