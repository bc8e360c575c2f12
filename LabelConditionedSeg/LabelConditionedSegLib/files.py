"""Writing outputs so that a crash or a kill never leaves a half-written file: each is written under a temporary
name beside its destination, flushed to disk and renamed into place (an atomic replace on one file system), so the
destination holds either the old file or the new one. Every file the package writes goes through `atomic_path`
(Testing/test_atomic.py checks it)."""
from __future__ import annotations

import csv
import errno
import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import SimpleITK as sitk

from .errors import LCSError
from .volume import nifti_cut_short

PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.partial(\.[^/]*)?$")  # what atomic_path names its temporary files
# The files an `only_new_files` block has placed so far (None outside such a block: renames replace).
_placed: ContextVar[list[Path] | None] = ContextVar("placed", default=None)


@contextmanager
def only_new_files() -> Iterator[None]:
    """Within the block, atomic_path never replaces a file: a destination that appeared after the run checked its
    outputs (another run writing the same names) stops it with an LCSError. When the block raises, the files it
    placed are removed again, so that the run that lost leaves the winner's files alone and none of its own."""
    placed: list[Path] = []
    token = _placed.set(placed)
    try:
        yield
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        _placed.reset(token)


def _place(temporary: Path, path: Path) -> None:
    """Rename a finished temporary onto `path`: replacing it, or inside only_new_files never."""
    placed = _placed.get()
    if placed is None:
        os.replace(temporary, path)
        return
    appeared = LCSError(f"{path} appeared while this run was writing it (another run writing the same output?); it "
                        "was left as it is, and this run's other outputs removed; choose another name, or pass --overwrite")
    try:
        os.link(temporary, path)  # a hard link is created only where no file is: the atomic "rename, never replace"
    except FileExistsError:
        raise appeared from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename (a window of microseconds)
            raise appeared from None
        os.replace(temporary, path)
    placed.append(path)


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
        _place(temporary, path)
    except OSError as error:
        if error.filename in (temporary, str(temporary)):
            error.filename = str(path)  # messages name the file asked for, not its temporary
        raise
    finally:
        temporary.unlink(missing_ok=True)


DETACHED = (".mhd", ".nhdr", ".hdr")  # a header naming a second file: two files cannot be replaced at once


def check_writable(path: Path, folder: Path, hint: str = "") -> None:
    """Refuse, before any work, to write `path` when `folder` (or its nearest existing parent) is not a writable folder."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise LCSError(f"cannot write {path}: {probe} is not a writable folder{hint}")


# The default file systems of macOS and Windows ignore letter case: there "A.nii" and "a.nii" are one file.
CASE_INSENSITIVE = sys.platform in ("darwin", "win32")


def file_identity(path: Path) -> tuple:
    """What tells two spellings of one file apart from two files: the device and inode of an existing path (symbolic
    and hard links, `./`, `..`, letter case on case-insensitive disks), else its resolved, normalized spelling."""
    try:
        status = os.stat(path)
        return ("inode", status.st_dev, status.st_ino)
    except OSError:
        real = os.path.normcase(os.path.realpath(path))
        return ("path", real.casefold() if CASE_INSENSITIVE else real)


def check_output(path: Path | None, overwrite: bool, folder: bool = False) -> None:
    """Refuse before any work: an existing output (without --overwrite) or a folder we cannot write."""
    if path is None:
        return
    if not folder and path.is_dir():
        raise LCSError(f"{path} is a folder; give a file name for this output")
    if path.exists() and not overwrite and not (folder and path.is_dir() and not any(path.iterdir())):
        raise LCSError(f"{path} already exists; choose another name or pass --overwrite")
    check_writable(path, path if folder and path.is_dir() else path.parent)


def check_apart(inputs: list[tuple[str, Path]], outputs: list[tuple[str, Path]], folders: list[Path] = ()) -> None:
    """Refuse, before any work, an output that is an input of the run or another of its outputs, however its path is
    spelled (links, ./, letter case on disks that ignore it): --overwrite never covers that. `folders` (of
    probability maps) may hold no input."""
    seen: dict[tuple, tuple[str, Path]] = {}
    for what, path in inputs:
        seen.setdefault(file_identity(path), (what, path))
    for option, path in outputs:
        key = file_identity(path)
        if key in seen:
            what, other = seen[key]
            same = "" if str(other) == str(path) else f" {other}"
            raise LCSError(f"{option} {path} is {what}{same}: an output never replaces an input or another output, "
                           "not even with --overwrite; give it another name")
        seen[key] = (f"the {option} output", path)
    for folder in folders:
        inside = next((p for _, p in inputs if file_identity(p.parent) == file_identity(folder)), None)
        if inside is not None:
            raise LCSError(f"--probabilities {folder} holds the input {inside}; give the probability maps a folder "
                           "of their own")


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """sitk.WriteImage, atomically (but for formats of two files, DETACHED, written in place)."""
    if str(path).lower().endswith(DETACHED):
        sitk.WriteImage(image, str(path), useCompression=compress)
        return
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=compress)
        if str(path).lower().endswith((".nii", ".nii.gz")) and nifti_cut_short(temporary):
            raise OSError(f"writing {path} failed: the file came out short (is the disk full?)")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_csv(rows: Iterable[dict], path: str | Path, fieldnames: Sequence[str]) -> None:
    """A CSV with a header line, atomically."""
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def claim(folder: Path, name: str) -> Iterator[bool]:
    """A lock file FOLDER/.NAME.lock held for the block, so that two runs never write one scan's outputs at once.
    Yields False (and holds nothing) when another live run holds it; the lock of a process that died on this
    machine is taken over."""
    lock = folder / f".{name}.lock"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, _, pid = lock.read_text(errors="replace").strip().partition(" ")
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # let go of between the two calls: try again
                continue
            if (host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))) or (not host and age > 60):
                lock.unlink(missing_ok=True)  # its run died: take it over
                continue
            yield False
            return
        with os.fdopen(descriptor, "w") as f:
            f.write(me)
        try:
            yield True
        finally:
            lock.unlink(missing_ok=True)
        return
    yield False


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
