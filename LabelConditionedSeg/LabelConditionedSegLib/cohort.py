"""A cohort for `lcs segment`: which scans, under which names, and the one volumes table that gathers them.

Each scan writes OUT/<name>.seg.nrrd, last, and OUT/<name>_volumes.csv beside it, so a re-run, or another process
of a torchrun job, tells a done scan from its files alone, and the cohort table is rebuilt from those files."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import LCSError
from .files import write_text

# Image files that make a folder a cohort (a folder without any is read as one DICOM series).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".mnc")
# A BIDS dataset's T1-weighted scans; their names keep every BIDS entity (sub-01_ses-2_run-1_T1w).
BIDS_SCANS = [f"sub-*/{session}anat/sub-*_T1w.{ext}" for session in ("", "ses-*/") for ext in ("nii.gz", "nii")]
LIST_COLUMN = "path"  # the column of a cohort .csv holding the scans; an optional "name" column names the outputs
# What each optional output is called beside NAME.seg.nrrd (in a cohort, or when its option is given no file name).
EXTRAS = {"labelmap": "_labels.nii.gz", "volumes_csv": "_volumes.csv", "overlay": "_overlay.png",
          "probabilities": "_probabilities"}
TABLE = "volumes.csv"
TABLE_FIELDS = ["scan", "value", "name", "voxels", "volume_ml", "atlas_ml", "flag"]


@dataclass(frozen=True)
class Scan:
    name: str  # its outputs are OUT/<name>.seg.nrrd, OUT/<name>_volumes.csv, ...
    path: Path


def scan_name(path: Path) -> str:
    """A file's name without its extension (scan.nii.gz -> scan); a folder (a DICOM series) keeps its whole name."""
    return path.name if path.is_dir() else Path(path.name.removesuffix(".gz")).stem


def extra_paths(seg: Path) -> dict[str, Path]:
    """The optional outputs named after a segmentation: out/scan.seg.nrrd -> out/scan_labels.nii.gz, ..."""
    stem = seg.name.removesuffix(".nrrd").removesuffix(".seg")
    return {key: seg.with_name(stem + suffix) for key, suffix in EXTRAS.items()}


def folder_scans(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted (not segmentations, not hidden or partly written files)."""
    def is_scan(path: Path) -> bool:
        name = path.name.lower()
        return name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd") and not name.startswith(".")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_scan(p))


def bids_scans(root: Path) -> list[Path]:
    """The T1-weighted scans of a BIDS dataset (sub-*/[ses-*/]anat/*_T1w.nii[.gz]), sorted."""
    return sorted(p for pattern in BIDS_SCANS for p in root.glob(pattern) if p.is_file())


def read_list(path: Path) -> list[Scan]:
    """The scans of a CSV list: a `path` column (relative to the CSV's folder, or absolute), an optional `name`."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as error:
        raise LCSError(f"cannot read {path} as a CSV list of scans ({error})") from None
    if LIST_COLUMN not in columns:
        raise LCSError(f"{path} has no '{LIST_COLUMN}' column (columns: {', '.join(columns) or 'none'}); "
                       f"list the scans under a header '{LIST_COLUMN}', one per row")
    scans = []
    for line, row in enumerate(rows, start=2):
        value = (row[LIST_COLUMN] or "").strip()
        if not value:
            raise LCSError(f"{path} line {line}: no path")
        scan = Path(value).expanduser()
        scan = scan if scan.is_absolute() else path.parent / scan
        scans.append(Scan((row.get("name") or "").strip() or scan_name(scan), scan))
    if not scans:
        raise LCSError(f"{path} lists no scans")
    return scans


def list_scans(inputs: Sequence[Path]) -> tuple[list[Scan], bool]:
    """The scans that `lcs segment INPUT...` names, sorted by name, and whether they are a cohort: several inputs,
    a .csv list, a folder of image files, or a BIDS dataset (a folder without either is one DICOM series)."""
    scans, cohort = [], len(inputs) > 1
    for path in inputs:
        if path.suffix.lower() == ".csv":
            if not path.is_file():
                raise LCSError(f"input {path} does not exist")
            scans += read_list(path)
            cohort = True
        elif path.is_dir() and (files := folder_scans(path) or bids_scans(path)):
            scans += [Scan(scan_name(f), f) for f in files]
            cohort = True
        else:
            scans.append(Scan(scan_name(path), path))
    if cohort:
        _check_names(scans)
    return sorted(scans, key=lambda s: s.name), cohort


def _check_names(scans: Sequence[Scan]) -> None:
    """Refuse names that would make two scans write the same files, or write outside the output folder."""
    seen: dict[str, Path] = {}
    for scan in scans:
        if not scan.name or scan.name.startswith(".") or any(c in scan.name for c in "/\\"):
            raise LCSError(f"{scan.path}: {scan.name!r} cannot name output files; give it a plain name")
        if scan.name in seen:
            raise LCSError(f"{seen[scan.name]} and {scan.path} would both write {scan.name}.seg.nrrd; rename one, "
                           f"or name them in a 'name' column of a CSV list")
        seen[scan.name] = scan.path


def write_table(folder: Path, scans: Sequence[Scan]) -> int:
    """FOLDER/volumes.csv: the per-scan volumes files of `scans` (those that have one) in one table with a `scan`
    column; returns its number of rows."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TABLE_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    rows = 0
    for scan in scans:
        own = folder / f"{scan.name}{EXTRAS['volumes_csv']}"
        if own.is_file():
            with open(own, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    writer.writerow({"scan": scan.name, **row})
                    rows += 1
    write_text(text.getvalue(), folder / TABLE)
    return rows
