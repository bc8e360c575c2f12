"""Writing outputs so that a crash or a kill never leaves a half-written file: each is written under a temporary
name beside its destination, flushed to disk and renamed into place (an atomic replace on one file system), so the
destination holds either the old file or the new one. Every file the package writes goes through `atomic_path`
(Testing/test_atomic.py checks it)."""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import SimpleITK as sitk

PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial(\.[^/]*)?$")  # what atomic_path names its temporary files


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` with the same suffixes (writers pick the format from them): `.NAME.PID.partial`
    + suffixes; flushed and renamed onto `path` when the block ends, removed when it raises. A symbolic link is
    written through (its target is replaced); a destination that is not a regular file (/dev/stdout, a pipe) is
    written in place, as nothing can be renamed onto it."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        yield path
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial{''.join(path.suffixes)}")
    try:
        yield temporary
        with open(temporary, "rb+") as written:  # on disk before the rename: a power cut leaves old or new, too
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.filename in (temporary, str(temporary)):
            error.filename = str(path)  # messages name the file asked for, not its temporary
        raise
    finally:
        temporary.unlink(missing_ok=True)


DETACHED = (".mhd", ".nhdr", ".hdr")  # a header naming a second file: two files cannot be replaced at once


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """sitk.WriteImage, atomically (but for formats of two files, DETACHED, written in place)."""
    if str(path).lower().endswith(DETACHED):
        sitk.WriteImage(image, str(path), useCompression=compress)
        return
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress)
        if str(path).lower().endswith((".nii", ".nii.gz")) and not _nifti_complete(temporary):
            raise OSError(f"writing {path} failed: the file came out short (is the disk full?)")


def _nifti_complete(path: Path) -> bool:
    """Whether a NIfTI file holds every voxel its header announces: ITK's NIfTI writer reports a failed write (a full
    disk) on stderr only and returns, leaving a short file that reads back padded with zeros."""
    try:
        with gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb") as f:
            header, length = f.read(540), f.seek(0, io.SEEK_END)
    except (OSError, EOFError):  # EOFError: a gzip stream cut short
        return False
    layouts = {348: (("8h", 40), ("h", 72), ("f", 108)),  # NIfTI-1: dim[8], bitpix, vox_offset at these bytes
               540: (("8q", 16), ("h", 14), ("q", 168))}  # NIfTI-2
    for order in "<>":
        size = struct.unpack_from(order + "i", header)[0] if len(header) >= 348 else 0
        if size in layouts and len(header) >= size:
            (dims, (bits,), (offset,)) = (struct.unpack_from(order + f, header, at) for f, at in layouts[size])
            return 1 <= dims[0] <= 7 and length >= int(offset) + math.prod(dims[1:1 + dims[0]]) * bits // 8
    return False


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_csv(rows: Iterable[dict], path: str | Path, fieldnames: Sequence[str]) -> None:
    """A CSV with a header line, atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed processes left in `folder` (those of a live process stay); returns them."""
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        match = PARTIAL.match(entry.name)
        if match and entry.is_file() and not _alive(int(match["pid"])):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:  # gone already, or held open (Windows): some other process's business
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing in the background: a file of its own pid is a dead namesake's
    if os.name == "nt":
        return False  # os.kill would end it; a file a live process writes cannot be deleted there anyway
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
