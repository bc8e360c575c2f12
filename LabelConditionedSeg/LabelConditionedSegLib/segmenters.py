"""Checkpoints as the panel names them ("bundled" or a path), and their models, loaded once per device."""
from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Callable

from .checkpoint import BUNDLED, Checkpoint
from .errors import LCSError
from .files import file_identity
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


def checkpoint_version(reference: str | Path | None) -> tuple:
    """Which file a checkpoint reference names and which version of it: the file's identity (files.file_identity:
    one file whatever its spelling) with its modification time and size, which a rewrite in place changes (a
    rewrite by rename, as `lcs train` saves, changes the identity itself)."""
    path = checkpoint_file(reference)
    if not path.is_file():
        raise LCSError(f"checkpoint {path} does not exist; give the path of a .lcs file")
    stat = path.stat()
    return file_identity(path), stat.st_mtime_ns, stat.st_size


class Segmenters:
    """Each checkpoint's model, loaded once per device and again when its file is rewritten; `messages` gets what the
    models have to say."""

    def __init__(self, messages: Callable[[str], None]):
        self._messages = messages
        self._loaded: dict[tuple, tuple[tuple, Segmenter]] = {}  # (file identity, device) -> (version, model)
        self._lock = threading.Lock()  # jobs build their models in worker threads

    def get(self, checkpointPath: str | Path | None = None, device: str = "auto") -> Segmenter:
        """The checkpoint's model on `device`, loaded once per version of the file (models of an older version, on
        any device, are dropped). checkpointPath: a path, or None / "" / BUNDLED_MODEL."""
        version = checkpoint_version(checkpointPath)
        with self._lock:
            known = self._loaded.get((version[0], device))
            if known is not None and known[0] == version:
                return known[1]
            for key in [k for k, (v, _) in self._loaded.items() if k[0] == version[0] and v != version]:
                del self._loaded[key]
        segmenter = Segmenter(Checkpoint.load(checkpoint_file(checkpointPath)), device, messages=self._messages)
        with self._lock:
            self._loaded[(version[0], device)] = (version, segmenter)
        return segmenter

    def builder(self, checkpointPath: str | Path | None, device: str) -> tuple[tuple, Callable[[], Segmenter]]:
        """(what names the model: the file's version and the device, a call that gets the model) for a job, which
        gets it in its own thread."""
        return (checkpoint_version(checkpointPath), device), partial(self.get, checkpointPath, device)

    def table(self, checkpointPath: str | Path | None = None) -> LabelTable:
        """The checkpoint's atlas labels (its model is loaded on the CPU once, like the atlas)."""
        return self.get(checkpointPath, "cpu").checkpoint.label_table

    def codes(self, checkpointPath) -> dict[str, str]:
        """Terminology codes of the checkpoint's labels that have one, by name."""
        return {l.name: l.code for l in self.table(checkpointPath) if l.code}

    def clear(self) -> None:
        self._loaded.clear()
