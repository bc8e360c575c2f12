"""Batch: one job segments many scans, every scan volume of the scene or every scan of a folder, and one table sums
them up.

Like a single run, a batch is read on the main thread (`start_scene`, `start_folder`), computes in any thread
(`run`), and is written on the main thread (`Batch.finish`). A scene batch gives each volume a new segmentation of its
own (Apply.finish: named "<volume> LCS", with the run's check); a folder batch writes exactly what
`lcs segment FOLDER -o OUT` writes, through the CLI's own cohort steps. A scan that fails is listed in the table and
the batch goes on. Cancel stops within the scan under way (at the model's next step, about a second): that scan
leaves nothing, the scans finished before it are kept (written into the scene by `finish`, or already in OUT, whose
volumes.csv then lists them), so a rerun of a folder goes on where it stopped.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import vtk

from .apply import Apply
from .atlas import Atlases
from .cohort import EXTRAS, check_cohort, check_done, list_scans, load_model, segment_scan, summarize
from .errors import Cancelled, LCSError, one_line
from .jobs import CACHE_ENTRIES, Job
from .quality import describe
from .segmenters import Segmenters, checkpoint_file
from .undo import UndoRecord

TABLE_NAME = "LCS batch"  # the summary table node's name (made unique in the scene)


@dataclass
class Outcome:
    """One scan's row of the summary table."""

    scan: str
    rows: list[dict] = field(default_factory=list)  # Segmentation.volumes() rows: name, voxels, volume_ml, ...
    check: str = ""  # what the plausibility check found (quality.describe), '' nothing
    failed: str = ""  # why the scan failed, '' when it did not


@dataclass
class SceneBatch:
    """Scene volumes: one Job per volume, read from the scene at the start, run one after the other."""

    jobs: list[tuple[str, Job]]  # (volume name, its job)
    closes: int = 0  # how many times the scene had been closed at the start (Batch.closes)
    outcomes: list[Outcome] = field(default_factory=list)
    done: list[Job] = field(default_factory=list)  # the finished jobs, for `finish` to write
    cancelled: bool = False

    @property
    def segmenter(self):
        """The model of the batch's first run (what a panel names the device by)."""
        return next((job.segmenter for _, job in self.jobs if job.segmenter is not None), None)

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report, stop = progress or (lambda f, m: None), cancel or (lambda: False)
        for i, (name, job) in enumerate(self.jobs):  # Job.run checks Cancel from its first step on
            head = f"scan {i + 1} of {len(self.jobs)}: {name}"
            try:
                job.run(lambda f, m: report((i + f) / len(self.jobs), f"{head}: {m}"), stop)
            except Cancelled:
                self.cancelled = True
                return
            except Exception as error:  # noqa: BLE001 - a failing scan is listed and the batch goes on
                self.outcomes.append(Outcome(name, failed=one_line(error)))
                continue
            self.done.append(job)
            for earlier in self.done[:-CACHE_ENTRIES]:  # encodings (on the GPU when there is one) beyond what the
                earlier.image = earlier.prepared = None  # cache keeps go now, not at the batch's end
            rows = job.result.volumes()
            self.outcomes.append(Outcome(name, rows, describe(job.result.check, rows)))


@dataclass
class FolderBatch:
    """Scans of a folder into an output folder, as `lcs segment FOLDER -o OUT` with these options does."""

    args: object  # the argparse.Namespace of that command
    scans: list
    outcomes: list[Outcome] = field(default_factory=list)
    segmenter: object = None
    cancelled: bool = False

    def run(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None) -> None:
        report, stop = progress or (lambda f, m: None), cancel or (lambda: False)
        report(0.0, "loading the model")
        self.segmenter, conditions, settings = load_model(self.args, self.args.device)
        check_done(self.args, self.scans, settings)
        self.args.output.mkdir(parents=True, exist_ok=True)
        started, done, skipped, failed = time.time(), [], [], []
        for i, scan in enumerate(self.scans):
            if stop():
                self.cancelled = True
                break
            head = f"scan {i + 1} of {len(self.scans)}: {scan.name}"
            try:
                summary = segment_scan(self.args, self.segmenter, conditions, settings, scan,
                                      lambda f, m: report((i + f) / len(self.scans), f"{head}: {m}"), stop)
            except Cancelled:
                self.cancelled = True
                break
            except Exception as error:  # noqa: BLE001 - as lcs segment: the scan is listed and the cohort goes on
                failed.append((scan.name, str(scan.path), one_line(error)))
                self.outcomes.append(Outcome(scan.name, failed=failed[-1][2]))
                continue
            (done if summary else skipped).append(scan.name)
            self.outcomes.append(_read_outcome(self.args.output, scan.name))
        summarize(self.args.output, self.scans, [(done, skipped, failed)], time.time() - started, settings)


def _read_outcome(out: Path, name: str) -> Outcome:
    """A written scan's row, from its OUT/<name>_volumes.csv (so a scan done by an earlier run is listed too)."""
    with open(out / f"{name}{EXTRAS['volumes_csv']}", newline="", encoding="utf-8") as f:
        rows = [{**row, "voxels": int(row["voxels"]), "volume_ml": float(row["volume_ml"]),
                 "atlas_ml": float(row["atlas_ml"])} for row in csv.DictReader(f)]
    # Each row's flag is the registration check and the row's own volume flag, joined by "; " (pipeline.volumes).
    check = next((part for row in rows for part in row["flag"].split("; ")
                  if part and not part.startswith("implausible volume")), "")
    return Outcome(name, rows, describe(check, rows))


class Batch:
    """Batches on a scene: start them on the main thread, `run` them anywhere, `finish` them on the main thread."""

    def __init__(self, scene, segmenters: Segmenters, atlases: Atlases, apply: Apply, undo: UndoRecord):
        self.scene = scene
        self._segmenters, self._atlases, self._apply, self._undo = segmenters, atlases, apply, undo
        self.closes = 0  # scene closes so far: a scene batch started before one has no volumes to write on

    def closed(self) -> None:
        self.closes += 1

    def scene_scans(self) -> list:
        """The scene's scan volumes: every scalar volume that is no label map and no atlas image."""
        return self._atlases.scans()

    def start_scene(self, labels: Sequence[str | int], checkpointPath=None, device: str = "auto",
                    registration: str = "affine", threshold: float = 0.5) -> SceneBatch:
        """Every scan volume of the scene, read now (their voxels are copied: the volumes may change meanwhile)."""
        volumes = self.scene_scans()
        if not volumes:
            raise LCSError("the scene has no scan volume to segment; load scans first (an atlas image does not count)")
        return SceneBatch([(v.GetName(), self._apply.start(v, labels, checkpointPath, device, registration, threshold))
                           for v in volumes], self.closes)

    def start_folder(self, folder: str | Path, output: str | Path, labels: Sequence[str | int], checkpointPath=None,
                     device: str = "auto", registration: str = "affine", threshold: float = 0.5,
                     overwrite: bool = False) -> FolderBatch:
        """The scans of `folder` (image files, a BIDS dataset or a .csv list, as lcs segment reads them) into
        `output`; refuses now (LCSError) what lcs segment would refuse before any work."""
        from .cli import build_parser

        folder, output = Path(str(folder or "")), Path(str(output or ""))
        if not str(folder).strip(".") or not (folder.is_dir() or folder.suffix.lower() == ".csv"):
            raise LCSError(f"{folder} is no folder of scans; choose the folder (or .csv list) of the scans to segment")
        if not str(output).strip("."):
            raise LCSError("choose an output folder for the batch's files")
        names, painted = self._atlases.split(labels, self._segmenters.get(checkpointPath, "cpu"), checkpointPath)
        if painted:
            raise LCSError("a folder batch segments atlas labels only; segment painted regions on scene volumes, or "
                           "save them as masks for lcs segment --condition")
        argv = ["segment", str(folder), "-o", str(output), "--labels", ",".join(str(n) for n in names),
                "--checkpoint", str(checkpoint_file(checkpointPath)), "--device", device, "--registration",
                registration, "--threshold", str(threshold)] + (["--overwrite"] if overwrite else [])
        args = build_parser().parse_args(argv)
        scans, cohort = list_scans(args.input)
        if not cohort:
            raise LCSError(f"{folder} holds no image files (nor a BIDS dataset's T1w scans); choose a folder of scans")
        check_cohort(args, scans)
        return FolderBatch(args, scans)

    def finish(self, batch: SceneBatch | FolderBatch):
        """Write a batch's results (main thread): a scene batch's segmentations (one undo step), then the summary
        table node of the scans the batch got to. Returns the table node."""
        if isinstance(batch, SceneBatch) and batch.closes != self.closes:
            raise LCSError("the scene was closed while the batch ran, so its segmentations were not added; load the "
                           "scans again and run the batch again")
        with self._undo.group(f"a batch of {len(batch.outcomes)} scans"):
            if isinstance(batch, SceneBatch):
                for job, outcome in zip(batch.done, [o for o in batch.outcomes if not o.failed]):
                    if self.scene.GetNodeByID(job.volumeId) is None:
                        outcome.failed = "the volume was removed from the scene while the batch ran"
                        continue
                    self._apply.finish(job)  # a new segmentation named after the volume, with the run's CHECK
            with self._undo.recording("the batch table") as change:
                table = summary_table(self.scene, batch.outcomes)
                change.created.append(table.GetID())
        return table


def summary_table(scene, outcomes: Sequence[Outcome]):
    """A table node: one row per scan (its name, how many labels were found, each label's volume in mL, what the
    check found or why the scan failed)."""
    labels = list(dict.fromkeys(row["name"] for outcome in outcomes for row in outcome.rows))
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(TABLE_NAME))
    table.SetUseColumnTitleAsColumnHeader(True)

    def column(kind, name: str, values: list):
        array = kind()
        array.SetName(name)
        for value in values:
            array.InsertNextValue(value)
        table.AddColumn(array)

    column(vtk.vtkStringArray, "scan", [o.scan for o in outcomes])
    column(vtk.vtkStringArray, "labels found",
           ["" if o.failed else f"{sum(r['voxels'] > 0 for r in o.rows)} of {len(o.rows)}" for o in outcomes])
    for label in labels:
        column(vtk.vtkDoubleArray, f"{label} (mL)",
               [next((r["volume_ml"] for r in o.rows if r["name"] == label), float("nan")) for o in outcomes])
    column(vtk.vtkStringArray, "check", [f"failed: {o.failed}" if o.failed else o.check for o in outcomes])
    return table
