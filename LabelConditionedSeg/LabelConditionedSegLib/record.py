"""What a result was made with (model, labels, registration, threshold), recorded in its .seg.nrrd.

A cohort rerun reads it back to tell a scan done with this run's settings (skipped) from one done with others
(refused, or segmented again with --overwrite), and the cohort table gathers only scans made with this run's settings.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from .engine import Condition

FIELD = "LCS_settings"  # the NRRD header field holding the record (Slicer keeps fields it does not know)
COMPARED = ("model", "labels", "conditions", "registration", "threshold")  # in the order a difference is named


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's SHA-256: a model's identity, whatever its file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_settings(checkpoint: Path, conditions: Sequence[Condition], registration: str, threshold: float) -> dict:
    """The settings a result depends on. `conditions` hashes every condition's name, value and atlas mask, so that a
    painted region redrawn under the same name counts as a change."""
    masks = hashlib.sha256()
    for c in conditions:
        masks.update(f"{c.name}\0{c.value}\0{c.offset}\0{c.mask.shape}\0".encode())
        masks.update(c.mask.tobytes())
    return {"model": f"{checkpoint.name} (sha256 {file_digest(checkpoint)})",
            "labels": ",".join(c.name for c in conditions), "conditions": masks.hexdigest()[:16],
            "registration": registration, "threshold": f"{threshold:g}"}


def recorded(seg: Path) -> dict | None:
    """The settings recorded in a .seg.nrrd's header; None when it has none (written by another tool or an older lcs)
    or cannot be read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(seg))
    try:
        reader.ReadImageInformation()
        return json.loads(reader.GetMetaData(FIELD)) if reader.HasMetaDataKey(FIELD) else None
    except (RuntimeError, ValueError):
        return None


def _compared(key: str, value) -> object:
    """What of a setting is compared: a model by its digest alone, so that a copied or renamed model is the same."""
    if key == "model" and (digest := re.search(r"sha256 ([0-9a-f]+)", str(value))):
        return digest[1]
    return value


def difference(old: dict | None, new: dict) -> str | None:
    """How `old` differs from `new`, in words ("labels Hippocampus_L, now Amygdala_L"), or None when they agree."""
    if old is None:
        return "no record of its settings (written by another tool or an older lcs)"
    for key in COMPARED:
        if _compared(key, old.get(key)) != _compared(key, new[key]):
            if key == "conditions" and old.get("labels") == new["labels"]:
                return "other painted masks under the same names"
            shown = (lambda text: text if len(text) <= 80 else text[:77] + "...")
            return f"{key} {shown(str(old.get(key)))}, now {shown(new[key])}"
    return None
