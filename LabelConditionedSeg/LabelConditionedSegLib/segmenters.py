"""Checkpoints as the panel names them ("bundled" or a path), and their models, loaded once per device."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from .checkpoint import BUNDLED, Checkpoint
from .errors import LCSError
from .labels import LabelTable
from .pipeline import Segmenter

BUNDLED_MODEL = "bundled"  # what scenes store for the bundled model, so they survive upgrades and other machines


def checkpoint_file(reference: str | Path | None) -> Path:
    """The file a checkpoint reference names: None, "" and BUNDLED_MODEL name the bundled model (so does ".", what
    an empty Path parameter reads as)."""
    text = str(reference or "").strip()
    return BUNDLED if text in ("", ".", BUNDLED_MODEL) else Path(text)


def checkpoint_reference(path: str | Path | None) -> str:
    """What to store for a checkpoint (in the parameter node, hence in saved scenes): BUNDLED_MODEL for the
    bundled model, so a scene keeps working after an upgrade or on another machine; other paths unchanged."""
    file = checkpoint_file(path)
    return BUNDLED_MODEL if file.resolve() == BUNDLED.resolve() else str(path)


_identities: dict[tuple, str] = {}


def checkpoint_identity(reference: str | Path | None) -> str:
    """The checkpoint file's content hash (16 hex digits): one model whatever its path, another once overwritten."""
    path = checkpoint_file(reference)
    if not path.is_file():
        raise LCSError(f"checkpoint {path} does not exist; give the path of a .lcs file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _identities:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _identities[key] = digest.hexdigest()[:16]
    return _identities[key]


class Segmenters:
    """Each checkpoint's model, loaded once per device; `messages` gets what the models have to say."""

    def __init__(self, messages: Callable[[str], None]):
        self._messages = messages
        self._loaded: dict[tuple, Segmenter] = {}

    def get(self, checkpointPath: str | Path | None = None, device: str = "auto") -> Segmenter:
        """The checkpoint's model on `device`, loaded once. checkpointPath: a path, or None / "" / BUNDLED_MODEL."""
        key = (str(checkpoint_file(checkpointPath)), device)
        if key not in self._loaded:
            self._loaded[key] = Segmenter(Checkpoint.load(key[0]), device, messages=self._messages)
        return self._loaded[key]

    def table(self, checkpointPath: str | Path | None = None) -> LabelTable:
        """The checkpoint's atlas labels (its model is loaded on the CPU once, like the atlas)."""
        return self.get(checkpointPath, "cpu").checkpoint.label_table

    def codes(self, checkpointPath) -> dict[str, str]:
        """Terminology codes of the checkpoint's labels that have one, by name."""
        return {l.name: l.code for l in self.table(checkpointPath) if l.code}

    def clear(self) -> None:
        self._loaded.clear()
