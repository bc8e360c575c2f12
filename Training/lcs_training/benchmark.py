"""`lcs benchmark`: time and memory of segmenting all atlas labels on a 1 mm head.

Each figure comes from a fresh process of its own (so peak memory is that run's alone),
all in one invocation. The naive scheme is the paper's inference: the whole network,
encoder included, once per label on the full grid.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.pipeline import Segmenter
from LabelConditionedSegLib.volume import read_volume

from .data import MRICRON
from .synth import Strength, SubjectGenerator


def make_head(path: Path, seed: int) -> Path:
    """A 1 mm synthetic subject from the Colin27 head (not the atlas itself)."""
    image = sitk.ReadImage(str(MRICRON / "ch2.nii.gz"))
    labels = sitk.ReadImage(str(MRICRON / "aal.nii.gz"))
    mask = sitk.Cast(sitk.ReadImage(str(MRICRON / "ch2bet.nii.gz")) > 0, sitk.sitkUInt8)
    head, _ = SubjectGenerator(image, labels, mask).sample(np.random.default_rng(seed), Strength(), skull_strip_probability=0,
                                                           fov_cut_probability=0)
    sitk.WriteImage(head, str(path))
    return path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(mode: str, scan: Path, checkpoint_path: Path, device: str) -> dict:
    """One measurement in this process: 'one' label, 'all' labels (+ one more), 'deformable' (all labels with
    --registration deformable), or 'naive'."""
    start = time.time()
    checkpoint = Checkpoint.load(checkpoint_path)
    segmenter = Segmenter(checkpoint, device)
    values = [str(v) for v in checkpoint.label_table.values]
    image = read_volume(scan)
    if mode == "naive":
        prepared = segmenter.prepare(image)
        model, engine = segmenter.engine.model, segmenter.engine
        x = torch.from_numpy(prepared.model_image)[None, None].to(engine.device)
        atlas = engine.atlas_image.to(engine.device)
        begin = time.time()
        with torch.no_grad():
            for c in segmenter.conditions(values):
                full = c.within((0, 0, 0), prepared.model_image.shape).astype(np.float32)
                torch.sigmoid(model(x, atlas, torch.from_numpy(full)[None, None].to(engine.device)))
        return {"naive_network_s": time.time() - begin}
    conditions = segmenter.conditions(values[:1] if mode == "one" else values)
    begin = time.time()
    prepared = segmenter.prepare(image, "deformable" if mode == "deformable" else "affine")
    prepare_s = time.time() - begin
    segmenter.segment(prepared, conditions).masks  # the label map and each label's own mask (the .seg.nrrd's segments)
    result = {f"{mode}_s": time.time() - start, f"peak_mb_{mode}": _peak_mb(), "device": segmenter.device,
              f"prepare_{mode}_s": prepare_s}
    if mode == "deformable":
        return result
    begin = time.time()
    segmenter.engine.segment(segmenter.engine.encode(prepared.model_image), conditions)
    result[f"network_{mode}_s"] = time.time() - begin
    if mode == "all":
        begin = time.time()
        segmenter.segment(prepared, segmenter.conditions(values[-1:])).masks
        result["next_label_s"] = time.time() - begin
    return result


def benchmark(checkpoint: Path, device: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        scan = make_head(Path(tmp) / "head_1mm.nii.gz", seed)
        figures = {}
        for mode in ("one", "all", "deformable", "naive"):
            out = subprocess.run([sys.executable, "-m", "lcs_training.benchmark", "--worker", mode, "--scan", str(scan),
                                  "--checkpoint", str(checkpoint), "--device", device], capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"benchmark worker '{mode}' failed: {out.stderr.strip()[-500:]}")
            figures.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, default=default_checkpoint(), help="LCS model (.lcs) to time")
    parser.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=3, help="seed of the synthetic 1 mm head")


def run(args: argparse.Namespace) -> None:
    from .data import require_templates; require_templates()  # the Colin27/AAL templates, or one line saying how to get them
    f = benchmark(args.checkpoint, args.device, args.seed)
    labels = len(Checkpoint.load(args.checkpoint).label_table)
    speedup = f["naive_network_s"] / f["network_all_s"]
    naive_one = f["naive_network_s"] / labels  # the paper's scheme runs the same whole network for every label
    print(f"device: {f['device']}, {torch.get_num_threads()} threads; 1 mm synthetic head; {labels} labels")
    print(f"all labels, end to end (load, read, register, encode, decode, map back): {f['all_s']:.1f} s")
    print(f"  network part: {f['network_all_s']:.1f} s; paper scheme (whole network per label): {f['naive_network_s']:.1f} s "
          f"-> speed-up {speedup:.1f}x")
    print(f"one label alone, network part: {f['network_one_s']:.2f} s; paper scheme: {naive_one:.2f} s per label")
    print(f"one more label on the encoded volume: {f['next_label_s']:.2f} s")
    print(f"all labels with --registration deformable: {f['deformable_s']:.1f} s (registration and atlas warp "
          f"{f['prepare_deformable_s']:.1f} s against {f['prepare_all_s']:.1f} s affine), peak {f['peak_mb_deformable']:.0f} MB")
    print(f"peak memory: 1 label {f['peak_mb_one']:.0f} MB, all labels {f['peak_mb_all']:.0f} MB "
          f"(ratio {f['peak_mb_all'] / f['peak_mb_one']:.2f})")
    print(f"all_labels_s={f['all_s']:.2f} next_label_s={f['next_label_s']:.3f} "
          f"peak_mb_1={f['peak_mb_one']:.0f} peak_mb_all={f['peak_mb_all']:.0f} speedup_vs_naive={speedup:.2f} "
          f"one_label_s={f['network_one_s']:.3f} naive_one_label_s={naive_one:.3f} deformable_s={f['deformable_s']:.2f} "
          f"deformable_prepare_s={f['prepare_deformable_s']:.2f} peak_mb_deformable={f['peak_mb_deformable']:.0f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=["one", "all", "deformable", "naive"])
    p.add_argument("--scan", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    print(json.dumps(worker(a.worker, a.scan, a.checkpoint, a.device)))
