"""The `lcs` command: segment, labels, workflow, train, evaluate, benchmark, demo.

Every user error ends as one line on stderr and exit code 2; nothing existing is
overwritten without --overwrite.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

from .checkpoint import default_checkpoint
from .errors import Cancelled, LCSError, one_line
from .files import check_output, check_writable
from .progress import set_quiet


def _console_progress():
    from .progress import progress_bar
    bar = progress_bar(total=100)

    def update(fraction: float, message: str) -> None:
        bar.set_description_str(message[:48].ljust(48))
        bar.n = int(round(100 * fraction))
        bar.refresh()
    return update, bar


def _say(line: str) -> None:
    """A line on stdout that a live progress bar on the terminal does not garble, flushed at once: under torchrun
    a process may be stopped as soon as another one exits."""
    from tqdm import tqdm
    tqdm.write(line)
    sys.stdout.flush()


def segment(args: argparse.Namespace) -> int:
    from .cohort import list_scans

    if len(args.name) != len(args.condition):
        raise LCSError("give one --name for each --condition mask")
    if not 0 < args.threshold < 1:
        raise LCSError("--threshold must be between 0 and 1")
    scans, cohort = list_scans(args.input)
    return _segment_cohort(args, scans) if cohort else _segment_single(args)


def _segment_single(args: argparse.Namespace) -> int:
    """One scan: -o names its .seg.nrrd; an extra given without a file name is named after it."""
    from .cohort import EXTRAS, extra_paths, input_files, load_model, segment_image
    from .files import check_apart, only_new_files
    from .volume import read_volume

    if not str(args.output).endswith((".seg.nrrd", ".nrrd")):
        raise LCSError(f"-o {args.output}: the segmentation is written as Slicer's .seg.nrrd; end the name with "
                       ".seg.nrrd (-o is a folder only for a cohort: several scans, a folder of scans or a .csv list)")
    named = extra_paths(args.output)
    extras = {key: named[key] if value is True else value for key in EXTRAS if (value := getattr(args, key))}
    check_output(args.output, args.overwrite)
    for key, path in extras.items():
        check_output(path, args.overwrite, folder=key == "probabilities")
    check_apart(input_files(args, args.input[:1]),
                [("-o", args.output), *((f"--{k.replace('_', '-')}", p) for k, p in extras.items() if k != "probabilities")],
                [extras["probabilities"]] if "probabilities" in extras else [])

    started = time.time()
    segmenter, conditions, settings = load_model(args, args.device)
    image = read_volume(args.input[0], series=args.series)
    progress, bar = _console_progress()
    with nullcontext() if args.overwrite else only_new_files():  # another run writing these names meanwhile: lose
        summary = segment_image(segmenter, conditions, settings, image, args.input[0].name, args, args.output, extras,
                                progress)
    progress(1.0, "done")
    bar.close()
    written = [str(path) for key, path in extras.items() if key != "probabilities"]
    if "probabilities" in extras:
        written.append(f"{extras['probabilities']}/ ({len(conditions)} probability maps)")
    print(f"{summary} on {segmenter.device} in {time.time() - started:.1f} s")
    print("wrote " + ", ".join([str(args.output), *written]))
    return 0


COHORT_WAIT = timedelta(hours=24)  # how long a process that has done its share may wait for the others


def _segment_cohort(args: argparse.Namespace, scans: list) -> int:
    """Several scans into the folder -o, the model loaded once per process. Under torchrun process RANK takes
    scans[RANK::WORLD_SIZE] of the sorted list; the processes meet once, at the end, where rank 0 writes
    OUT/volumes.csv and lists every failure. Returns 2 if any scan failed in any process."""
    import torch

    from . import distributed
    from .cohort import check_cohort, check_done, load_model, summarize

    out = check_cohort(args, scans)
    rank, world, local_rank = distributed.ranks()
    device = args.device
    if world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    segmenter, conditions, settings = load_model(args, device)
    check_done(args, scans, settings)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    mine = _run_share(args, segmenter, conditions, settings, scans, rank, world)
    distributed.start("gloo", timeout=COHORT_WAIT)  # gloo even beside GPUs: only small Python objects are exchanged
    try:
        everyone = distributed.gather(mine)
        if rank == 0:
            summarize(out, scans, everyone, time.time() - started, settings)
    except BaseException:
        distributed.finish(wait=False)
        raise
    distributed.finish()
    return 2 if any(failed for _, _, failed in everyone) else 0


def _run_share(args: argparse.Namespace, segmenter, conditions, settings: dict, scans: list, rank: int, world: int):
    """Segment this process's share of the scans, one line each; returns (done names, skipped names,
    [(name, path, reason)] of the failed). A KeyboardInterrupt stops the run (Cancelled)."""
    from .cohort import segment_scan
    from .progress import progress_bar

    where = f" (process {rank} of {world})" if world > 1 else ""
    share = list(enumerate(scans))[rank::world]
    done, skipped, failed = [], [], []
    bar = progress_bar(total=len(share), desc="cohort", disable=rank > 0)
    try:
        for index, scan in share:
            head = f"{index + 1}/{len(scans)} {scan.name}"

            def progress(fraction: float, message: str, name: str = scan.name) -> None:
                bar.set_description_str(f"{name}: {message}"[:48].ljust(48))
                bar.refresh()
            try:
                summary = segment_scan(args, segmenter, conditions, settings, scan, progress)
            except Exception as error:  # noqa: BLE001 - a failing scan is reported and the cohort goes on
                failed.append((scan.name, str(scan.path), one_line(error)))
                _say(f"{head}: failed: {failed[-1][2]}{where}")
            else:
                (done if summary else skipped).append(scan.name)
                _say(f"{head}: {summary or 'skipped, done before (--overwrite segments it again)'}{where}")
            bar.set_description_str("cohort")
            bar.update(1)
    except KeyboardInterrupt:
        raise Cancelled(f"cancelled by the user after {len(done) + len(skipped) + len(failed)} of {len(share)} scans; "
                        f"the finished ones are in {args.output}: run the same command again to go on") from None
    finally:
        bar.close()
    return done, skipped, failed


def labels(args: argparse.Namespace) -> None:
    from .checkpoint import Checkpoint
    checkpoint = Checkpoint.load(args.checkpoint)
    print(f"# {checkpoint.description}")
    print("# (validation Dice: the mean Dice of every label on the synthetic validation subjects training scored, as "
          "the generator left them, unregistered; it ranks checkpoints of one run. How a model does on new scans, "
          "registered as lcs segment does: lcs evaluate, and docs/results.md)")
    print(f"# file: {args.checkpoint}")
    for key, value in checkpoint.provenance.items():
        if key != "validation_dice_per_label":  # one line per label would drown the table
            print(f"# {key}: {value}")
    print("value\tname")
    for label in checkpoint.label_table:
        print(f"{label.value}\t{label.name}")


def atlas(args: argparse.Namespace) -> None:
    from .checkpoint import Checkpoint
    from .outputs import ATLAS_FILES, write_atlas

    for name in ATLAS_FILES.values():
        check_output(args.output / name, args.overwrite)
    written = write_atlas(Checkpoint.load(args.checkpoint), args.output)
    print("wrote " + ", ".join(str(path) for path in written))
    print(f"paint a region on {written[0]} (in Slicer: load it with {written[1].name}, add a segment in Segment Editor, "
          "paint, export it as a label map file), then: lcs segment SCAN -o OUT.seg.nrrd --condition REGION.nii.gz "
          "--name NAME")


WORKFLOW = Path(__file__).resolve().parent / "workflow"  # the Snakemake workflow, package data
WORKFLOW_TEMPLATES = ("config.yaml", "slurm/config.yaml")  # what -o copies out to edit: the settings, the SLURM profile


def workflow(args: argparse.Namespace) -> None:
    """--print-path: the Snakefile, for snakemake -s; -o: copies of its settings and of its SLURM profile to edit."""
    snakefile = WORKFLOW / "Snakefile"
    if args.print_path:
        print(snakefile)
        return
    from .files import write_text

    copies = {args.output / name: WORKFLOW / name for name in WORKFLOW_TEMPLATES}
    for path in copies:
        if path.exists():
            raise LCSError(f"{path} already exists; edit it, or give -o another folder")
        check_writable(path, path.parent)
    for path, template in copies.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(template.read_text(encoding="utf-8"), path)
    config, profile = (shlex.quote(str(path)) for path in copies)
    print(f"wrote {', '.join(map(str, copies))}; set input and output in {config}, then run (pip install snakemake "
          f"first, or the project's 'workflow' extra):\n"
          f"  snakemake -s {shlex.quote(str(snakefile))} --configfile {config} --cores 4\n"
          f"on a SLURM cluster, with your partition and account in {profile}:\n"
          f"  snakemake -s {shlex.quote(str(snakefile))} --configfile {config} --profile {shlex.quote(str(args.output / 'slurm'))}")


def demo(args: argparse.Namespace) -> int:
    try:
        import nilearn  # noqa: F401 - the MNI152 template the demo segments
    except ImportError:
        raise LCSError("the demo segments nilearn's MNI152 template: pip install nilearn, then run lcs demo again") from None
    return _training("demo").main(args.output)


def _training(module: str):
    try:
        return __import__(f"lcs_training.{module}", fromlist=[module])
    except ImportError as error:
        raise LCSError(f"this command needs the training extras ({error.name} is missing): pip install monai scipy "
                       "(or, in a clone of the project, pip install '.[train]')") from None


TRAINING_COMMANDS = {
    "train": ("train a checkpoint on a folder of labelled scans",
              "Train an LCS model. DATA holds labels.csv (value,name,r,g,b), images/CASE.nii.gz and labels/CASE.nii.gz "
              "(any SimpleITK format, same file names), optionally masks/CASE.nii.gz (the brain; estimated from the image "
              "when absent) and annotated/CASE.txt (the labels a partly annotated case annotates; others are ignored "
              "there, not taught as background); --atlas names the atlas case. Several processes: "
              "torchrun --nproc_per_node N -m LabelConditionedSegLib.cli train ..."),
    "pretrain": ("pretrain the encoder without annotations (siamese left/right proxy task)",
                 "Self-supervised pretraining of the LCS encoder (Dhere and Sivaswamy's siamese proxy task): every scan "
                 "of DATA (and of --unlabelled) is registered to the atlas; crops around a structure and its counterpart "
                 "(labels named X_L and X_R in labels.csv, or --pairs), the right-side crop mirrored, teach the encoder "
                 "to tell whether two crops show the same side (contrastive loss, margin 1), regularized by "
                 "reconstructing the crops. Only the atlas's label map is read. Writes -o (e.g. encoder.pt) for "
                 "'lcs train --init-encoder', with the same --base-channels, --depth and --norm."),
    "evaluate": ("Dice of a checkpoint against atlas registration on held-out subjects or labelled test scans",
                 "Generate held-out subjects (other seeds, stronger warps, other grids), or with --folder read real "
                 "labelled test scans (the training layout), segment them with the checkpoint as lcs segment does and "
                 "with affine atlas-label propagation, and write Dice, HD95 and volumes per label and case (CSV) and "
                 "plots."),
    "experiment": ("run one of the paper's experiments (table + plot)",
                   "Reproduce an experiment of the LCS paper on Colin27 + AAL: baseline-k (LCS against the multi-channel "
                   "baseline for K labels, paired Dice), memory (peak memory against K), many (116 labels against "
                   "baselines of <= 10), novel (unseen fine labels), second-atlas (macaque NeuroMaps), incomplete "
                   "(missing annotations: naive, SMILE, LCS), relabel (SMILEr rounds) or few-labels (a few labelled and "
                   "more unlabelled subjects: siamese pretraining, the Dice/BCE schedule, adversarial training). "
                   "--scale tiny runs in minutes; --scale small is what docs/results.md reports."),
    "relabel": ("add the labels partly annotated cases miss (SMILEr rounds)",
                "Propose each label a case does not annotate, keep the least uncertain voxels (a fraction growing over "
                "the rounds), fine-tune on the augmented data, repeat; writes new folders, never the input."),
    "benchmark": ("speed and memory of segmenting all labels of a 1 mm head",
                  "Time and peak memory for all labels, one more label, and the paper's one-network-per-label scheme."),
}


class _ShowDefaults(argparse.HelpFormatter):
    """--help shows an option's default where it has one and its help does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; `command` names the training subcommand whose arguments to load, if any."""
    parser = argparse.ArgumentParser(prog="lcs", description="Label Conditioned Segmentation: one model, any atlas label.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("segment", help="segment atlas labels on a scan or a cohort of scans", description=(
        "Segment atlas labels on a 3D scan (NIfTI, NRRD, MHA, a DICOM folder...). The scan is registered to the "
        "model's atlas, segmented on the model grid and mapped back: outputs lie on the input's own grid. "
        "Example: lcs segment head.nii.gz -o head.seg.nrrd --labels Hippocampus_L,Hippocampus_R --volumes-csv vol.csv. "
        "A cohort (several scans, a folder of image files, a BIDS dataset's T1w scans, or a .csv list with a 'path' "
        "column) goes into the folder "
        "-o: each scan writes OUT/NAME.seg.nrrd, the extras asked for (--labelmap, --overlay, --probabilities, "
        "without file names) and OUT/NAME_volumes.csv, gathered in OUT/volumes.csv. Done scans are skipped, failed "
        "ones listed at the end (exit code 2). Several GPUs or nodes: "
        "torchrun --nproc_per_node N -m LabelConditionedSegLib.cli segment ..."))
    p.add_argument("input", type=Path, nargs="+", help="scan file or DICOM folder; for a cohort several of them, a "
                   "folder of image files, a BIDS dataset (sub-*/[ses-*/]anat/*_T1w.nii.gz), or a .csv with a 'path' "
                   "column (relative to the .csv) and an optional 'name'")
    p.add_argument("-o", "--output", type=Path, required=True, help="segmentation to write (.seg.nrrd, opens in "
                   "Slicer); for a cohort, the folder that receives NAME.seg.nrrd for each scan")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="model (.lcs); default: the bundled demo")
    p.add_argument("--labels", help="comma-separated atlas label names or values; A+B segments the union of A and B")
    p.add_argument("--all", action="store_true", help="every atlas label (the default when no labels or conditions are given)")
    p.add_argument("--condition", type=Path, action="append", default=[], help="binary mask drawn on the atlas image (repeatable)")
    p.add_argument("--name", action="append", default=[], help="segment name for each --condition, in order")
    without = "; given no file name (as a cohort wants), it writes"
    p.add_argument("--labelmap", type=Path, nargs="?", const=True, help="also write a label map (.nii.gz) with one "
                   "label per voxel, the most probable: voxel = label value, 0 background (the .seg.nrrd holds each "
                   f"label's own mask instead){without} NAME_labels.nii.gz beside NAME.seg.nrrd")
    p.add_argument("--probabilities", type=Path, nargs="?", const=True, help="folder for one probability map per "
                   f"label (.nii.gz){without} NAME_probabilities/ beside NAME.seg.nrrd")
    p.add_argument("--volumes-csv", type=Path, nargs="?", const=True, help="CSV of voxel counts and volumes (mL) per "
                   f"label{without} NAME_volumes.csv (a cohort always does, and gathers them in OUT/volumes.csv)")
    p.add_argument("--overlay", type=Path, nargs="?", const=True, help="PNG with three slices of the result over "
                   f"the scan{without} NAME_overlay.png")
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--series", help="in a DICOM folder holding several series, the one to segment: its number in the "
                   "list lcs prints, or its Series Instance UID (default: the largest)")
    p.add_argument("--registration", default="affine", choices=["affine", "deformable", "rigid", "none"],
                   help="how the atlas is aligned to the scan: affine (the paper's); deformable: affine, then a fast "
                        "non-linear warp of the atlas (a few seconds more, for models trained on such priors: lcs labels "
                        "shows them); rigid; none if the scan is already in atlas space (default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability under which a voxel is background")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (in a cohort: segment "
                   "again the scans done before)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=segment, parser=p)

    p = sub.add_parser("labels", help="list the atlas labels of a checkpoint")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="model (.lcs); default: the bundled demo")
    p.set_defaults(run=labels, parser=p)

    p = sub.add_parser("atlas", help="write a model's atlas (image, labels, mask) to paint new regions on", description=(
        "Write the model's atlas into the folder -o: atlas.nii.gz (the image the model is conditioned on), "
        "atlas_labels.seg.nrrd (its labels as named, coloured Slicer segments), atlas_labels.nii.gz (the label map), "
        "atlas_mask.nii.gz and labels.csv. A region painted on atlas.nii.gz and saved as a mask is a --condition "
        "for lcs segment."))
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write the atlas files into")
    p.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="model (.lcs); default: the bundled demo")
    p.add_argument("--overwrite", action="store_true", help="replace atlas files already in the folder")
    p.set_defaults(run=atlas, parser=p)

    p = sub.add_parser("workflow", help="the Snakemake workflow that segments many scans, on one machine or a cluster",
                       description="A Snakemake workflow over lcs segment: one job per scan (locally, or on SLURM with "
                                   "its profile), then OUT/volumes.csv, the table one lcs segment cohort call writes. "
                                   "Input: a folder of scans, a .csv list or a BIDS dataset. Needs snakemake (pip "
                                   "install snakemake; the SLURM profile also snakemake-executor-plugin-slurm).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--print-path", action="store_true", help="print the Snakefile's path (for snakemake -s)")
    what.add_argument("-o", "--output", type=Path, help="folder to write config.yaml (the settings) and slurm/config.yaml "
                      "(the SLURM profile) into, to edit")
    p.set_defaults(run=workflow, parser=p)

    p = sub.add_parser("demo", help="segment a real brain (nilearn's MNI152 template) with the bundled model",
                       description="Write nilearn's MNI152 2009 template into the folder and segment every atlas label "
                                   "on it with the bundled model: a segmentation, a label map, volumes and an overlay "
                                   "PNG (needs nilearn: pip install nilearn).")
    p.add_argument("output", type=Path, nargs="?", default=Path("demo-output"), help="folder for the demo's files")
    p.set_defaults(run=demo, parser=p)

    for name, (summary, description) in TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=description, formatter_class=_ShowDefaults)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(parser=p)
        if name == command:  # only the command being run imports the training extras
            module = _training(name)
            module.add_arguments(p)
            p.set_defaults(run=module.run)

    p = sub.add_parser("demo-data", help="write the Colin27 + AAL training folder from Debian's mricron-data")
    p.add_argument("folder", type=Path, help="folder to write labels.csv, images/, labels/ and masks/ into")
    p.set_defaults(run=lambda a: print(_training("data").write_colin27_aal(a.folder)), parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, unknown = build_parser(argv[0] if argv else None).parse_known_args(argv)
        if unknown:  # a misspelled option: show the usage of the command it was meant for
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        set_quiet(getattr(args, "quiet", False))
        return args.run(args) or 0  # a command returns an exit code, or nothing when all went well
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
