"""The `lcs` command: segment, labels, train, evaluate, benchmark, demo.

Every user error ends as one line on stderr and exit code 2; nothing existing is
overwritten without --overwrite.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from .checkpoint import default_checkpoint
from .errors import Cancelled, LCSError

def _writable(path: Path | None, overwrite: bool, folder: bool = False) -> None:
    """Refuse before any work: an existing output (without --overwrite) or a folder we cannot write."""
    if path is None:
        return
    if path.exists() and not overwrite and not (folder and path.is_dir() and not any(path.iterdir())):
        raise LCSError(f"{path} already exists; choose another name or pass --overwrite")
    parent = path if folder and path.is_dir() else path.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise LCSError(f"cannot write {path}: {probe} is not a writable folder")


def _console_progress(enabled: bool):
    from tqdm import tqdm
    bar = tqdm(total=100, disable=not enabled, bar_format="{desc} {bar} {percentage:3.0f}%", file=sys.stderr)

    def update(fraction: float, message: str) -> None:
        bar.set_description_str(message[:48].ljust(48))
        bar.n = int(round(100 * fraction))
        bar.refresh()
    return update, bar


def segment(args: argparse.Namespace) -> None:
    import SimpleITK as sitk

    from .checkpoint import Checkpoint
    from .outputs import segment_volumes, write_overlay_png, write_seg_nrrd, write_volumes_csv
    from .pipeline import Segmenter
    from .volume import read_volume

    if not str(args.output).endswith((".seg.nrrd", ".nrrd")):
        raise LCSError(f"-o {args.output}: the segmentation is written as Slicer's .seg.nrrd; end the name with .seg.nrrd")
    if len(args.name) != len(args.condition):
        raise LCSError("give one --name for each --condition mask")
    if not 0 < args.threshold < 1:
        raise LCSError("--threshold must be between 0 and 1")
    for path, folder in [(args.output, False), (args.labelmap, False), (args.volumes_csv, False),
                         (args.overlay, False), (args.probabilities, True)]:
        _writable(path, args.overwrite, folder)

    started = time.time()
    checkpoint = Checkpoint.load(args.checkpoint)
    image = read_volume(args.input)
    segmenter = Segmenter(checkpoint, args.device, messages=lambda m: print(f"lcs: {m}", file=sys.stderr))
    masks = [(name, read_volume(path)) for name, path in zip(args.name, args.condition)]
    names = [x for x in (args.labels or "").split(",") if x.strip()]
    if args.all or (not names and not masks):
        names = [str(label.value) for label in checkpoint.label_table]
    conditions = segmenter.conditions(names, masks)

    progress, bar = _console_progress(not args.quiet)
    prepared = segmenter.prepare(image, args.registration, lambda f, m: progress(0.3 * f, m))
    on_probability = None
    if args.probabilities:
        args.probabilities.mkdir(parents=True, exist_ok=True)

        def on_probability(condition, probability):
            safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", condition.name)
            sitk.WriteImage(probability, str(args.probabilities / f"{condition.value}_{safe}.nii.gz"), useCompression=True)

    labelmap = segmenter.segment(prepared, conditions, args.threshold, on_probability,
                                 lambda f, m: progress(0.3 + 0.7 * f, m))
    progress(1.0, "done")
    bar.close()

    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_seg_nrrd(labelmap, conditions, args.output)
    written = [str(args.output)]
    if args.labelmap:
        sitk.WriteImage(sitk.Cast(labelmap, sitk.sitkInt32 if max(c.value for c in conditions) > 32767 else sitk.sitkInt16),
                        str(args.labelmap), useCompression=True)
        written.append(str(args.labelmap))
    if args.volumes_csv:
        write_volumes_csv(labelmap, conditions, args.volumes_csv)
        written.append(str(args.volumes_csv))
    if args.overlay:
        write_overlay_png(image, labelmap, conditions, args.overlay)
        written.append(str(args.overlay))
    if args.probabilities:
        written.append(f"{args.probabilities}/ ({len(conditions)} probability maps)")
    found = sum(1 for row in segment_volumes(labelmap, conditions) if row["voxels"])
    print(f"segmented {found} of {len(conditions)} labels on {segmenter.device} in {time.time() - started:.1f} s")
    print("wrote " + ", ".join(written))


def labels(args: argparse.Namespace) -> None:
    from .checkpoint import Checkpoint
    checkpoint = Checkpoint.load(args.checkpoint)
    print(f"# {checkpoint.description}")
    print("value\tname")
    for label in checkpoint.label_table:
        print(f"{label.value}\t{label.name}")


def _training(module: str):
    try:
        return __import__(f"lcs_training.{module}", fromlist=[module])
    except ImportError as error:
        raise LCSError(f"this command needs the training extras ({error.name} is missing): pip install 'lcs[train]'") from None


TRAINING_COMMANDS = {
    "train": ("train a checkpoint on a folder of labelled scans",
              "Train an LCS model. DATA holds labels.csv (value,name,r,g,b), images/CASE.nii.gz and labels/CASE.nii.gz "
              "(any SimpleITK format, same file names), optionally masks/CASE.nii.gz and annotated/CASE.txt (the labels "
              "a partly annotated case annotates; others are ignored there, not taught as background); --atlas names the "
              "atlas case. Several processes: torchrun --nproc_per_node N -m LabelConditionedSegLib.cli train ..."),
    "evaluate": ("Dice of a checkpoint against atlas registration on held-out subjects",
                 "Generate held-out subjects (other seeds, stronger warps, other grids), segment them with the checkpoint "
                 "and with affine atlas-label propagation, and write per-label Dice (CSV) and a plot."),
    "experiment": ("run one of the paper's experiments (table + plot)",
                   "Reproduce an experiment of the LCS paper on Colin27 + AAL: baseline-k (LCS against the multi-channel "
                   "baseline for K labels, paired Dice), memory (peak memory against K), many (116 labels against "
                   "baselines of <= 10), novel (unseen fine labels), second-atlas (macaque NeuroMaps) or incomplete "
                   "(missing annotations: naive, SMILE, LCS). --scale tiny runs in a minute; --scale small is what "
                   "docs/results.md reports."),
    "relabel": ("add the labels partly annotated cases miss (SMILEr rounds)",
                "Propose each label a case does not annotate, keep the least uncertain voxels (a fraction growing over "
                "the rounds), fine-tune on the augmented data, repeat; writes new folders, never the input."),
    "benchmark": ("speed and memory of segmenting all labels of a 1 mm head",
                  "Time and peak memory for all labels, one more label, and the paper's one-network-per-label scheme."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; `command` names the training subcommand whose arguments to load, if any."""
    parser = argparse.ArgumentParser(prog="lcs", description="Label Conditioned Segmentation: one model, any atlas label.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment atlas labels on a scan", description=(
        "Segment atlas labels on a 3D scan (NIfTI, NRRD, MHA, a DICOM folder...). The scan is registered to the "
        "model's atlas, segmented on the model grid and mapped back: outputs lie on the input's own grid. "
        "Example: lcs segment head.nii.gz -o head.seg.nrrd --labels Hippocampus_L,Hippocampus_R --volumes-csv vol.csv"))
    p.add_argument("input", type=Path, help="scan file or DICOM folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="segmentation to write (.seg.nrrd, opens in Slicer)")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="model (.lcs); default: the bundled demo")
    p.add_argument("--labels", help="comma-separated atlas label names or values; A+B segments the union of A and B")
    p.add_argument("--all", action="store_true", help="every atlas label (the default when no labels or conditions are given)")
    p.add_argument("--condition", type=Path, action="append", default=[], help="binary mask drawn on the atlas image (repeatable)")
    p.add_argument("--name", action="append", default=[], help="segment name for each --condition, in order")
    p.add_argument("--labelmap", type=Path, help="also write a label map (e.g. .nii.gz): voxel = atlas label value, 0 background")
    p.add_argument("--probabilities", type=Path, help="folder for one probability map per label (.nii.gz)")
    p.add_argument("--volumes-csv", type=Path, help="CSV of voxel counts and volumes (mL) per label")
    p.add_argument("--overlay", type=Path, help="PNG with three slices of the result over the scan")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--registration", default="affine", choices=["affine", "rigid", "none"],
                   help="how the scan is aligned to the atlas; 'none' if it is already in atlas space")
    p.add_argument("--threshold", type=float, default=0.5, help="probability under which a voxel is background")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=segment)

    p = sub.add_parser("labels", help="list the atlas labels of a checkpoint")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint())
    p.set_defaults(run=labels)

    for name, (summary, description) in TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description)
        if name == command:  # only the command being run imports the training extras
            module = _training(name)
            module.add_arguments(p)
            p.set_defaults(run=module.run)

    p = sub.add_parser("demo-data", help="write the Colin27 + AAL training folder from Debian's mricron-data")
    p.add_argument("folder", type=Path)
    p.set_defaults(run=lambda a: print(_training("data").write_colin27_aal(a.folder)))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        args.run(args)
        return 0
    except Cancelled as error:
        print(f"lcs: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("lcs: cancelled by the user; nothing was written", file=sys.stderr)
        return 130
    except LCSError as error:
        print(f"lcs: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:  # a disk full or a path that turned out unwritable while writing
        print(f"lcs: error: {error.strerror or error} ({error.filename or 'output'}); check the output path and free space", file=sys.stderr)
        return 2
    except MemoryError:
        print("lcs: error: out of memory; close other programs or use a smaller volume", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
