"""A cohort for `lcs segment`: which scans, under which names, the checks before any work, each scan segmented and
written, and the one volumes table that gathers them. The CLI (a cohort, or one scan) and a Slicer folder batch
(batch.py) take these same steps.

Each scan writes OUT/<name>.seg.nrrd, last, and OUT/<name>_volumes.csv beside it, so a re-run, or another process
of a torchrun job, tells a done scan from its files alone, and the cohort table is rebuilt from those files."""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import LCSError
from .files import check_apart, check_output, write_text

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


def input_files(args: argparse.Namespace, scans: list[Path]) -> list[tuple[str, Path]]:
    """Every file the run reads, with what it is: the scans (each file of a DICOM folder), the .csv lists, the
    checkpoint and the painted masks."""
    named = [*(("the scan", p) for p in scans), *(("the list", p) for p in args.input if p.suffix.lower() == ".csv"),
             ("the checkpoint", args.checkpoint), *(("the --condition mask", p) for p in args.condition)]
    return [(what, f) for what, p in named for f in (sorted(p.iterdir()) if p.is_dir() else [p])]


def load_model(args: argparse.Namespace, device: str):
    """The checkpoint loaded once, its Segmenter on `device`, the conditions asked for (the same for every scan) and
    the settings each result records (record.run_settings)."""
    from .checkpoint import Checkpoint
    from .pipeline import Segmenter
    from .record import run_settings
    from .volume import read_volume

    checkpoint = Checkpoint.load(args.checkpoint)
    segmenter = Segmenter(checkpoint, device, messages=lambda m: print(f"lcs: {m}", file=sys.stderr))
    masks = [(name, read_volume(path, mask=True)) for name, path in zip(args.name, args.condition)]
    names = [x for x in (args.labels or "").split(",") if x.strip()]
    if args.labels is not None and not names:
        raise LCSError(f"--labels {args.labels!r} names no label; give names or values separated by commas, or use --all")
    if args.all or (not names and not masks):
        names = [str(label.value) for label in checkpoint.label_table]
    conditions = segmenter.conditions(names, masks)
    return segmenter, conditions, run_settings(args.checkpoint, conditions, args.registration, args.threshold)


def segment_image(segmenter, conditions, settings: dict, image, image_name: str, args: argparse.Namespace,
                  seg: Path, extras: dict[str, Path], progress, cancel=None) -> str:
    """Segment one image and write its outputs, the .seg.nrrd last: a cohort takes that file as the sign that the
    scan is done. Returns the summary ("segmented 5 of 6 labels (found nowhere: X)"). `cancel()` true stops the
    computation (Cancelled), before anything is written."""
    from .files import write_image
    from .outputs import write_labelmap, write_overlay_png, write_seg_nrrd, write_volumes_csv
    from .quality import describe

    prepared = segmenter.prepare(image, args.registration, lambda f, m: progress(0.3 * f, m), cancel)
    on_probability = None
    if "probabilities" in extras:
        folder = extras["probabilities"]
        folder.mkdir(parents=True, exist_ok=True)

        def on_probability(condition, probability):
            safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", condition.name)
            write_image(probability, folder / f"{condition.value}_{safe}.nii.gz")

    result = segmenter.segment(prepared, conditions, args.threshold, on_probability,
                               lambda f, m: progress(0.3 + 0.7 * f, m), cancel)
    missing = result.missing
    summary = f"segmented {len(conditions) - len(missing)} of {len(conditions)} labels" + (
        f" (found nowhere: {', '.join(missing)})" if missing else "")
    if check := describe(result.check, result.volumes()):
        summary += f"; CHECK FAILED: {check}"
        print(f"lcs: warning: {image_name}: {check}. Look at it with --overlay and do not use these volumes unchecked",
              file=sys.stderr, flush=True)
    seg.parent.mkdir(parents=True, exist_ok=True)
    if "labelmap" in extras:
        write_labelmap(result.labelmap, max(c.value for c in conditions), extras["labelmap"])
    if "volumes_csv" in extras:
        write_volumes_csv(result, extras["volumes_csv"])
    if "overlay" in extras:
        write_overlay_png(image, result.labelmap, conditions, extras["overlay"], title=summary, scan=image_name,
                          model=segmenter.checkpoint.provenance.get("name"), registration=args.registration)
    write_seg_nrrd(result, seg, settings)
    return summary


def check_cohort(args: argparse.Namespace, scans: list) -> Path:
    """Refuse, before any work, what a cohort cannot do; returns the output folder."""
    out = args.output
    if args.series:
        raise LCSError("--series picks a series of one DICOM folder; it does not apply to a cohort")
    if out.name.lower().endswith(VOLUME_SUFFIXES) or out.is_file():
        raise LCSError(f"-o {out}: {len(scans)} scans are segmented into a folder; give -o a folder "
                       "(each scan writes FOLDER/<name>.seg.nrrd)")
    for key, suffix in EXTRAS.items():
        if getattr(args, key) not in (None, True):
            also = f", and {out}/{TABLE} gathers them" if key == "volumes_csv" else ""
            raise LCSError(f"--{key.replace('_', '-')} {getattr(args, key)}: in a cohort this option takes no file "
                           f"name; each scan writes {out}/<name>{suffix}{also}")
    if out.resolve() in {p.resolve() for p in args.input if p.is_dir()}:
        raise LCSError(f"-o {out} is the folder of the scans; write the results into another folder")
    check_output(out, overwrite=True, folder=True)
    outputs = [("the cohort table", out / TABLE)]
    for scan in scans:
        named = _outputs(args, scan)
        outputs += [(f"output of scan {scan.name}", path) for key, path in named.items() if key != "probabilities"]
    check_apart(input_files(args, [scan.path for scan in scans]), outputs,
                [out / f"{scan.name}{EXTRAS['probabilities']}" for scan in scans] if args.probabilities else [])
    return out


def _outputs(args: argparse.Namespace, scan) -> dict[str, Path]:
    """A cohort scan's outputs: OUT/NAME.seg.nrrd ("seg"), its volumes CSV and the extras asked for."""
    seg = args.output / f"{scan.name}.seg.nrrd"
    return {"seg": seg, **{key: path for key, path in extra_paths(seg).items() if key == "volumes_csv" or getattr(args, key)}}


def check_done(args: argparse.Namespace, scans: list, settings: dict) -> None:
    """Refuse, before any work, a rerun into a folder whose done scans were made with other settings (labels, model,
    registration, threshold): skipping them would give old results, and the table would mix them. --overwrite
    segments them again."""
    from .record import difference, recorded

    if args.overwrite:
        return
    for scan in scans:
        seg = _outputs(args, scan)["seg"]
        if seg.is_file() and (change := difference(recorded(seg), settings)):
            raise LCSError(f"{seg} was segmented with {change}; segment into another folder, or pass --overwrite "
                           f"to segment the scans of {args.output} again")


def segment_scan(args: argparse.Namespace, segmenter, conditions, settings: dict, scan, progress,
                 cancel=None) -> str | None:
    """One scan of a cohort into OUT/<name>.seg.nrrd and the extras asked for: its summary with the time it took,
    or None when a previous run did it with these settings (the .seg.nrrd is written last, so its presence means
    done). The scan's lock keeps a second run off its files meanwhile."""
    from .files import claim
    from .record import difference, recorded
    from .volume import read_volume

    extras = _outputs(args, scan)
    seg = extras.pop("seg")
    with claim(args.output, scan.name) as mine:
        if not mine:
            raise LCSError(f"another run is segmenting it into {args.output} now (lock {args.output}/.{scan.name}.lock; "
                           "delete that file if no run is)")
        if seg.exists() and not args.overwrite:
            if change := difference(recorded(seg), settings):  # another run finished it meanwhile
                raise LCSError(f"{seg} was segmented meanwhile with {change}; pass --overwrite to segment it again")
            if all(path.exists() for path in extras.values()):
                return None
            # done with these settings, but without an output asked for now: segment it again
        began = time.time()
        summary = segment_image(segmenter, conditions, settings, read_volume(scan.path), scan.name, args, seg, extras,
                                progress, cancel)
    return f"{summary} in {time.time() - began:.1f} s"


def summarize(out: Path, scans: list, everyone: list, seconds: float, settings: dict) -> None:
    """Rank 0, once every process is done: the cohort table (the scans done with this run's settings only), a
    summary line and the failures of all processes."""
    from .record import difference, recorded

    done, skipped, failed = ([x for part in everyone for x in part[i]] for i in range(3))
    current = [s for s in scans if difference(recorded(out / f"{s.name}.seg.nrrd"), settings) is None]
    rows = write_table(out, current)
    older = sum((out / f"{s.name}.seg.nrrd").is_file() for s in scans) - len(current)
    left_out = f"; {older} scans with results of other settings left out of it" if older else ""
    rate = f" ({60 * len(done) / seconds:.2f} scans per minute)" if done else ""
    print(f"{len(done)} of {len(scans)} scans segmented in {seconds:.1f} s{rate}, {len(skipped)} skipped (done "
          f"before), {len(failed)} failed; wrote {out / TABLE} ({rows} rows{left_out})", flush=True)
    if failed:
        print(f"lcs: error: {len(failed)} of {len(scans)} scans failed:", file=sys.stderr)
        for name, path, reason in failed:
            print(f"lcs:   {name}: {reason}" + ("" if path in reason else f" ({path})"), file=sys.stderr, flush=True)
