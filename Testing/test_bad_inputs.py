"""The bad-input battery: every refusal of `lcs` is exit code 2, ONE line on stderr ("lcs: error: ..."), no
traceback, the words that say what is wrong, and every file that was there before still byte-identical with no new
file beside it. Then positive controls: what is valid is accepted (scans, masks, DICOM, training folders).

Real files throughout: scans made from Colin27 (heldout_subject), cut in half, sheared, tilted, etc. The
battery shares one folder (`bench`) that holds every input, the checkpoint and an existing output; each case
hashes all of it before and after."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.volume import (EXTRA_BYTES_PER_VOXEL, check_extent, check_volume, memory_needed,
                                           read_volume)
from lcs_training.data import check_training_folder, write_colin27_aal

from conftest import TINY_LABELS, heldout_subject

REPO = Path(__file__).resolve().parents[1]


# ---- real files, good and bad --------------------------------------------------------------------------------------
def write(image: sitk.Image, path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def cut(source: Path, path: Path, fraction: float = 0.5) -> Path:
    """A copy of `source` cut short, as an interrupted download or copy leaves it."""
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def array_image(array: np.ndarray, like: sitk.Image | None = None, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if like is not None:
        image.CopyInformation(like)
    return image


def sheared_nifti(scan: sitk.Image, path: Path, keep_qform: bool) -> Path:
    """A NIfTI-1 file whose sform shears the grid (the second axis leans 0.4 voxel along the first per voxel); with `keep_qform` its
    qform stays a rotation (ITK then reads the qform and drops the sform without a word)."""
    plain = path.with_name("plain_" + path.name)
    sitk.WriteImage(sitk.Cast(scan, sitk.sitkFloat32), str(plain))
    header = bytearray(plain.read_bytes())
    plain.unlink()
    srow = np.array(struct.unpack("<12f", header[280:328])).reshape(3, 4)
    srow[:, 1] += 0.4 * srow[:, 0]  # the second axis leans along the first
    header[280:328] = struct.pack("<12f", *srow.ravel())
    header[254:256] = struct.pack("<h", 2)  # sform_code: aligned
    header[252:254] = struct.pack("<h", 1 if keep_qform else 0)
    path.write_bytes(bytes(header))
    return path


def sheared_nrrd(scan: sitk.Image, path: Path) -> Path:
    """A NRRD whose space directions are not perpendicular (ITK reads it as a non-orthonormal direction matrix)."""
    array = sitk.GetArrayFromImage(sitk.Cast(scan, sitk.sitkFloat32))
    nz, ny, nx = array.shape
    s = scan.GetSpacing()
    header = (f"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: {nx} {ny} {nz}\n"
              f"space directions: ({s[0]},0,0) ({0.4 * s[1]},{s[1]},0) (0,0,{s[2]})\nkinds: domain domain domain\n"
              "endian: little\nencoding: raw\nspace origin: (0,0,0)\n\n")
    path.write_bytes(header.encode() + array.astype("<f4").tobytes())
    return path


def huge_header(path: Path) -> Path:
    """A NIfTI header promising 4096 x 4096 x 2048 float voxels (128 GB): refused from the header, before reading."""
    small = path.with_name("small_" + path.name)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 4, 4), np.float32)), str(small))
    header = bytearray(small.read_bytes())
    small.unlink()
    header[42:48] = struct.pack("<3h", 4096, 4096, 2048)
    path.write_bytes(bytes(header))
    return path


def write_dicom(image: sitk.Image, folder: Path, uid: str, tilt_mm: float = 0.0, skip: int | None = None,
                description: str = "T1") -> Path:
    """A real DICOM series, one file per slice; `tilt_mm` shifts each slice sideways (gantry tilt), `skip` leaves
    one slice out."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(sitk.RescaleIntensity(image, 0, 2000), sitk.sitkInt16)
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k == skip:
            continue
        s = image[:, :, k]
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + np.array([0.0, tilt_mm * k, 0.0])
        for tag, value in [("0008|0060", "MR"), ("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|103e", description),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in position)), ("0020|0013", str(k + 1)),
                           ("0018|0050", f"{image.GetSpacing()[2]:.4f}"),
                           ("0028|0030", f"{image.GetSpacing()[1]:.4f}\\{image.GetSpacing()[0]:.4f}"),
                           ("0008|0018", f"{uid}.{k + 1}")]:
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[-1]}_{k:04d}.dcm"))
        writer.Execute(s)
    return folder


def small_training_folder(colin27: Path, folder: Path) -> Path:
    """Colin27 + AAL at 4 mm (real anatomy, small files): the atlas case and one more subject."""
    image = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    labels = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    mask = sitk.ReadImage(str(colin27 / "masks/colin27.nii.gz"))
    grid = sitk.Resample(image, [s // 4 for s in image.GetSize()], sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         [4.0] * 3, image.GetDirection())
    for sub, volume, interpolation in (("images", image, sitk.sitkLinear), ("labels", labels, sitk.sitkNearestNeighbor),
                                       ("masks", mask, sitk.sitkNearestNeighbor)):
        (folder / sub).mkdir(parents=True)
        write(sitk.Resample(volume, grid, sitk.Transform(), interpolation, 0), folder / sub / "colin27.nii.gz", True)
    subject, truth = heldout_subject(colin27, seed=5)
    write(subject, folder / "images/subject.nii.gz", True)
    write(truth, folder / "labels/subject.nii.gz", True)
    shutil.copy(colin27 / "labels.csv", folder / "labels.csv")
    return folder


def broken_copy(valid: Path, folder: Path, change) -> Path:
    shutil.copytree(valid, folder)
    change(folder)
    return folder


def relabeled(value: int, new: int):
    def change(folder: Path) -> None:
        path = folder / "labels/subject.nii.gz"
        labels = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(labels)
        array[array == value] = new
        write(array_image(array, labels), path, True)
    return change


def regridded(sub: str):
    def change(folder: Path) -> None:
        path = folder / sub / "colin27.nii.gz"
        volume = sitk.ReadImage(str(path))
        volume.SetOrigin([o + 3.0 for o in volume.GetOrigin()])  # 3 mm off its image: another grid
        write(volume, path, True)
    return change


@pytest.fixture(scope="module")
def bench(colin27, tiny_checkpoint, tmp_path_factory):
    """Every input of the battery in one folder, built once: (folder, dict of named paths)."""
    root = tmp_path_factory.mktemp("bench")
    p: dict[str, Path] = {}
    p["checkpoint"] = Path(shutil.copy(tiny_checkpoint, root / "model.lcs"))
    scan, _ = heldout_subject(colin27, seed=31)
    p["scan"] = write(scan, root / "scan.nrrd")
    atlas = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    noise = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    p["flat"] = write(array_image(noise[0]), root / "flat.nii.gz")
    p["4d"] = write(sitk.JoinSeries([scan, scan, scan]), root / "series4d.nii.gz")
    p["rgb"] = write(array_image(np.stack([noise] * 3, -1), vector=True), root / "rgb.nrrd")
    p["zeros"] = write(array_image(np.zeros_like(noise)), root / "zeros.nii.gz")
    p["constant"] = write(array_image(np.full_like(noise, 7)), root / "constant.nii.gz")
    p["nan"] = write(array_image(np.full_like(noise, np.nan)), root / "nan.mha")
    p["inf"] = write(array_image(np.full_like(noise, np.inf)), root / "inf.nii.gz", True)  # ITK alone reads zeros
    p["text"] = root / "notes.nii.gz"
    p["text"].write_text("not an image")
    p["tiny"] = write(sitk.Shrink(scan, [max(1, s // 5) for s in scan.GetSize()])[:5, :5, :5], root / "five.nii.gz")
    whole = {ext: write(scan, root / f"whole{ext}", compress) for ext, compress in
             ((".nii.gz", True), (".nii", False), (".nrrd", True), (".mha", False))}
    for ext, path in whole.items():
        p["cut" + ext.replace(".", "_")] = cut(path, root / f"cut{ext}")
        path.unlink()
    p["sheared_sform"] = sheared_nifti(scan, root / "sheared_sform.nii", keep_qform=False)
    p["sheared_both"] = sheared_nifti(scan, root / "sheared_both.nii", keep_qform=True)
    p["sheared_nrrd"] = sheared_nrrd(scan, root / "sheared.nrrd")
    p["huge"] = huge_header(root / "huge.nii")
    p["dicom_empty"] = root / "dicom_empty"
    p["dicom_empty"].mkdir()
    p["dicom_none"] = root / "dicom_none"
    p["dicom_none"].mkdir()
    (p["dicom_none"] / "readme.txt").write_text("no DICOM here")
    stack = sitk.Shrink(sitk.ReadImage(str(colin27 / "images/colin27.nii.gz")), [4, 4, 4])  # 45 slices of 4 mm
    p["dicom_tilted"] = write_dicom(stack, root / "dicom_tilted", "1.2.826.0.1.3680043.2.1125.7.1", tilt_mm=0.4)
    p["dicom_gap"] = write_dicom(stack, root / "dicom_gap", "1.2.826.0.1.3680043.2.1125.7.2", skip=20)
    # painted masks on the atlas grid
    region = sitk.GetArrayFromImage(atlas) == 3
    p["mask_nan"] = write(array_image(np.full(region.shape, np.nan, np.float32), atlas), root / "mask_nan.nrrd", True)
    p["mask_zero"] = write(array_image(np.zeros(region.shape, np.uint8), atlas), root / "mask_zero.nii.gz", True)
    far = array_image(region.astype(np.uint8), atlas)
    far.SetOrigin([o + 1000.0 for o in atlas.GetOrigin()])
    p["mask_far"] = write(far, root / "mask_far.nii.gz", True)
    mask = array_image(region.astype(np.uint8), atlas)
    p["mask_4d"] = write(sitk.JoinSeries([mask, mask]), root / "mask_4d.nii.gz", True)
    p["mask_cut"] = cut(write(mask, root / "mask_whole.nii.gz", True), root / "mask_cut.nii.gz")
    (root / "mask_whole.nii.gz").unlink()
    # checkpoints
    p["ck_cut"] = cut(p["checkpoint"], root / "cut.lcs")
    p["ck_garbage"] = root / "garbage.lcs"
    p["ck_garbage"].write_bytes(np.random.default_rng(1).bytes(5000))
    p["pwned"] = root / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(p["pwned"]), "w"))

    p["ck_hostile"] = root / "hostile.lcs"
    torch.save({"format": "label-conditioned-segmentation", "version": 1, "x": Payload()}, p["ck_hostile"])
    raw = torch.load(p["checkpoint"], map_location="cpu", weights_only=True)
    p["ck_version"] = root / "version2.lcs"
    torch.save({**raw, "version": 2}, p["ck_version"])
    p["ck_foreign"] = root / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, p["ck_foreign"])
    # outputs that exist already
    p["existing"] = root / "existing.seg.nrrd"
    p["existing"].write_text("keep me")
    p["existing_csv"] = root / "existing.csv"
    p["existing_csv"].write_text("keep me too")
    p["scan_link"] = root / "link.seg.nrrd"  # -o spelled as a link to the scan
    p["scan_link"].symlink_to(p["scan"].name)
    p["scan_hardlink"] = root / "hard.nii.gz"  # another name of the scan's own bytes
    os.link(p["scan"], p["scan_hardlink"])
    p["clash"] = root / "clash"  # a cohort where one scan's label map would be another scan
    p["clash"].mkdir()
    write(scan, p["clash"] / "a.nrrd")
    write(scan, p["clash"] / "a_labels.nii.gz")
    p["clash_list"] = p["clash"] / "list.csv"  # a list of scans, segmented into the scans' own folder
    p["clash_list"].write_text("path\na.nrrd\na_labels.nii.gz\n")
    p["folder_out"] = root / "folder.seg.nrrd"
    p["folder_out"].mkdir()
    (p["folder_out"] / "inside.txt").write_text("a folder named like an output")
    # training folders: one valid, and one broken copy per defect
    valid = small_training_folder(colin27, root / "train_valid")
    p["train_valid"] = valid
    p["train_no_csv"] = broken_copy(valid, root / "train_no_csv", lambda f: (f / "labels.csv").unlink())
    p["train_empty"] = root / "train_empty"
    p["train_empty"].mkdir()
    p["train_missing"] = root / "train_missing"
    p["train_no_label"] = broken_copy(valid, root / "train_no_label", lambda f: (f / "labels/subject.nii.gz").unlink())
    p["train_off_grid"] = broken_copy(valid, root / "train_off_grid", regridded("labels"))
    p["train_mask_off_grid"] = broken_copy(valid, root / "train_mask_off_grid", regridded("masks"))
    p["train_unknown"] = broken_copy(valid, root / "train_unknown", relabeled(3, 200))
    p["train_annotated"] = broken_copy(valid, root / "train_annotated", lambda f: (
        (f / "annotated").mkdir(), (f / "annotated/subject.txt").write_text("Frontal_Sup_L\nNot_A_Label\n")))
    p["train_truncated"] = broken_copy(valid, root / "train_truncated", lambda f: cut(
        f / "images/subject.nii.gz", f / "images/subject.nii.gz", 0.3))
    p["train_bad_csv"] = broken_copy(valid, root / "train_bad_csv", lambda f: (f / "labels.csv").write_text(
        "value;name\n3;Frontal_Sup_L\n"))
    p["no_templates"] = root / "no_templates"
    p["no_templates"].mkdir()
    p["out"] = root / "out"  # never created: every case checks that
    return root, p


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256) and folder under root: what must not change when a command refuses."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[str(path.relative_to(root))] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# (id, argv with {names} for bench paths, words the one line must hold, environment)
SEGMENT = ["segment", "{scan}", "-o", "{out}/o.seg.nrrd", "--checkpoint", "{checkpoint}", "--device", "cpu", "--quiet"]


def segment(*changes, **replace):
    """SEGMENT with its input, -o or --checkpoint replaced (replace=) and options added (changes)."""
    argv = list(SEGMENT)
    for key, value in replace.items():
        argv[{"input": 1, "output": 3, "checkpoint": 5}[key]] = value
    return argv + list(changes)


NO_CUDA_DEVICE = "cuda:7" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
CASES = [
    # scans
    ("2D image", segment(input="{flat}"), ["2D"]),
    ("4D series", segment(input="{4d}"), ["4D", "split"]),
    ("RGB / vector image", segment(input="{rgb}"), ["values per voxel", "single-channel"]),
    ("all-zero scan", segment(input="{zeros}"), ["empty"]),
    ("constant scan", segment(input="{constant}"), ["constant"]),
    ("every voxel NaN", segment(input="{nan}"), ["no finite voxel", "NaN"]),
    ("every voxel infinite (NIfTI)", segment(input="{inf}"), ["no finite voxel", "infinite"]),
    ("text file named .nii.gz", segment(input="{text}"), ["cannot read"]),
    ("scan that does not exist", segment(input="{out}/nowhere.nii.gz"), ["does not exist"]),
    ("truncated .nii.gz", segment(input="{cut_nii_gz}"), ["truncated", "promises"]),
    ("truncated .nii", segment(input="{cut_nii}"), ["truncated", "promises"]),
    ("truncated gzip .nrrd", segment(input="{cut_nrrd}"), ["truncated"]),
    ("truncated .mha", segment(input="{cut_mha}"), ["truncated"]),
    ("5x5x5 voxels", segment(input="{tiny}"), ["at least 8"]),
    ("sheared NIfTI sform, no qform", segment(input="{sheared_sform}"), ["sheared", "resample"]),
    ("sheared NIfTI sform beside a qform", segment(input="{sheared_both}"), ["sheared NIfTI sform", "qform"]),
    ("sheared NRRD grid", segment(input="{sheared_nrrd}"), ["sheared", "resample"]),
    ("too large for memory", segment(input="{huge}"), ["4096x4096x2048", "available", "downsample"]),
    ("empty DICOM folder", segment(input="{dicom_empty}"), ["is empty"]),
    ("folder without DICOM", segment(input="{dicom_none}"), ["holds no DICOM"]),
    ("DICOM with gantry tilt", segment(input="{dicom_tilted}"), ["tilted", "dcm2niix"]),
    ("DICOM with a missing slice", segment(input="{dicom_gap}"), ["unevenly spaced"]),
    # label names and unions
    ("unknown label", segment("--labels", "Hippocampus_Q"), ["Hippocampus_Q", "not in the atlas"]),
    ("misspelled label", segment("--labels", "frontal_sup_ll"), ["frontal_sup_ll", "did you mean Frontal_Sup_L"]),
    ("$LCS_CHECKPOINT naming no file", segment(checkpoint="{out}/env.lcs"), ["does not exist", "$LCS_CHECKPOINT"]),
    ("union with an unknown label", segment("--labels", "Frontal_Sup_L+Nope"), ["Nope", "not in the atlas"]),
    ("labels naming nothing", segment("--labels", ","), ["names no label"]),
    # painted masks
    ("mask without --name", segment("--condition", "{text}"), ["give one --name"]),
    ("mask of NaN only", segment("--condition", "{mask_nan}", "--name", "m"), ["no finite voxel"]),
    ("all-zero mask", segment("--condition", "{mask_zero}", "--name", "m"), ["empty"]),
    ("mask off the atlas", segment("--condition", "{mask_far}", "--name", "m"), ["does not overlap"]),
    ("4D mask", segment("--condition", "{mask_4d}", "--name", "m"), ["4D"]),
    ("truncated mask", segment("--condition", "{mask_cut}", "--name", "m"), ["truncated"]),
    # checkpoints
    ("checkpoint that does not exist", segment(checkpoint="{out}/none.lcs"), ["does not exist"]),
    ("truncated checkpoint", segment(checkpoint="{ck_cut}"), ["not a valid LCS checkpoint"]),
    ("hostile pickle, reason cut at a word", segment(checkpoint="{ck_hostile}"), ["not a valid LCS checkpoint", " ...)"]),
    ("garbage checkpoint", segment(checkpoint="{ck_garbage}"), ["not a valid LCS checkpoint"]),
    ("hostile pickle", segment(checkpoint="{ck_hostile}"), ["not a valid LCS checkpoint"]),
    ("other format version", segment(checkpoint="{ck_version}"), ["version 2"]),
    ("torch file of something else", segment(checkpoint="{ck_foreign}"), ["not an LCS checkpoint"]),
    # devices
    ("CUDA device that is not there", segment("--device", NO_CUDA_DEVICE), [NO_CUDA_DEVICE if not torch.cuda.is_available() else "does not exist"]),
    ("unknown device", segment("--device", "gpu"), ["not known"]),
    # thresholds
    ("threshold above 1", segment("--threshold", "1.5"), ["threshold"]),
    ("threshold 0", segment("--threshold", "0"), ["threshold"]),
    ("threshold NaN", segment("--threshold", "nan"), ["threshold"]),
    # output paths
    ("existing output", segment(output="{existing}"), ["already exists"]),
    ("existing --volumes-csv", segment("--volumes-csv", "{existing_csv}"), ["already exists"]),
    ("output named like a folder that exists", segment(output="{folder_out}"), ["is a folder"]),
    ("output under a file", segment(output="{text}/sub/x.seg.nrrd"), ["not a writable folder"]),
    ("--labelmap under a file", segment("--labelmap", "{text}/l.nii.gz"), ["not a writable folder"]),
    ("wrong output extension", segment(output="{out}/x.png"), [".seg.nrrd"]),
    # an output that is an input or another output, however spelled: refused even with --overwrite
    ("--labelmap is the scan", segment("--labelmap", "{scan}", "--overwrite"), ["is the scan", "never replaces"]),
    ("-o is a link to the scan", segment("--overwrite", output="{scan_link}"), ["is the scan", "scan.nrrd"]),
    ("--labelmap is a hard link to the scan", segment("--labelmap", "{scan_hardlink}", "--overwrite"), ["is the scan"]),
    ("--volumes-csv is the checkpoint", segment("--volumes-csv", "{checkpoint}", "--overwrite"), ["is the checkpoint"]),
    ("--overlay is the painted mask", segment("--condition", "{mask_zero}", "--name", "m", "--overlay", "{mask_zero}",
                                              "--overwrite"), ["is the --condition mask"]),
    ("two outputs, one file", segment("--volumes-csv", "{out}/v.csv", "--overlay", "{out}/./sub/../v.csv"),
     ["--overlay", "is the --volumes-csv output"]),
    ("-o is the --labelmap", segment("--labelmap", "{out}/o.seg.nrrd"), ["is the -o output"]),
    ("--probabilities holds the scan", segment("--probabilities", "{root}", "--overwrite"), ["holds the input"]),
    ("cohort: a scan's output is another scan", ["segment", "{clash_list}", "-o", "{clash}", "--checkpoint",
                                                 "{checkpoint}", "--labelmap", "--overwrite"], ["output of scan a", "is the scan"]),
    # training folders
    ("train: folder without labels.csv", ["train", "{train_no_csv}", "-o", "{out}", "--atlas", "colin27"], ["labels.csv", "train --help"]),
    ("train: empty folder", ["train", "{train_empty}", "-o", "{out}", "--atlas", "colin27"], ["is empty"]),
    ("train: folder that does not exist", ["train", "{train_missing}", "-o", "{out}", "--atlas", "colin27"], ["does not exist"]),
    ("train: image without label map", ["train", "{train_no_label}", "-o", "{out}", "--atlas", "colin27"], ["case subject", "no label map"]),
    ("train: label map off its image's grid", ["train", "{train_off_grid}", "-o", "{out}", "--atlas", "colin27"], ["case colin27", "another grid", "origin"]),
    ("train: mask off its image's grid", ["train", "{train_mask_off_grid}", "-o", "{out}", "--atlas", "colin27"], ["masks/colin27", "another grid"]),
    ("train: label values labels.csv lacks", ["train", "{train_unknown}", "-o", "{out}", "--atlas", "colin27"], ["case subject", "200", "does not list"]),
    ("train: annotated names an unknown label", ["train", "{train_annotated}", "-o", "{out}", "--atlas", "colin27"], ["case subject", "Not_A_Label"]),
    ("train: truncated image", ["train", "{train_truncated}", "-o", "{out}", "--atlas", "colin27"], ["case subject", "truncated"]),
    ("train: labels.csv without its columns", ["train", "{train_bad_csv}", "-o", "{out}", "--atlas", "colin27"], ["labels.csv", "value,name,r,g,b"]),
    ("train: atlas case not in the folder", ["train", "{train_valid}", "-o", "{out}", "--atlas", "mni152"], ["mni152", "colin27, subject"]),
    ("relabel: folder without labels.csv", ["relabel", "{train_no_csv}", "--checkpoint", "{checkpoint}", "-o", "{out}", "--device", "cpu"], ["labels.csv"]),
    ("relabel: label values labels.csv lacks", ["relabel", "{train_unknown}", "--checkpoint", "{checkpoint}", "-o", "{out}", "--device", "cpu"], ["200"]),
    ("evaluate: label map off its image's grid", ["evaluate", "--data", "{train_off_grid}", "--checkpoint", "{checkpoint}", "--out", "{out}", "--subjects", "1", "--device", "cpu"], ["another grid"]),
    ("evaluate: empty folder", ["evaluate", "--data", "{train_empty}", "--checkpoint", "{checkpoint}", "--out", "{out}", "--subjects", "1", "--device", "cpu"], ["is empty"]),
    ("evaluate --folder: image without label map", ["evaluate", "--folder", "{train_no_label}", "--checkpoint", "{checkpoint}", "--out", "{out}", "--device", "cpu"], ["case subject", "no label map"]),
    ("evaluate --folder: label values labels.csv lacks", ["evaluate", "--folder", "{train_unknown}", "--checkpoint", "{checkpoint}", "--out", "{out}", "--device", "cpu"], ["case subject", "200", "does not list"]),
    ("evaluate --folder with --unlike", ["evaluate", "--folder", "{train_valid}", "--unlike", "--checkpoint", "{checkpoint}", "--out", "{out}", "--device", "cpu"], ["--folder", "--unlike"]),
    # the Colin27/AAL templates missing (LCS_TEMPLATES pointing to an empty folder)
    ("benchmark without templates", ["benchmark", "--checkpoint", "{checkpoint}", "--device", "cpu"], ["mricron-data", "LCS_TEMPLATES"]),
    ("evaluate without templates", ["evaluate", "--checkpoint", "{checkpoint}", "--out", "{out}", "--subjects", "1", "--device", "cpu"], ["mricron-data", "ch2.nii.gz"]),
    ("experiment without templates", ["experiment", "memory", "--scale", "tiny", "--out", "{out}", "--device", "cpu"], ["mricron-data"]),
    ("demo-data without templates", ["demo-data", "{out}"], ["mricron-data", "sudo apt-get install"]),
]
if hasattr(os, "geteuid") and os.geteuid() != 0:  # root may write anywhere; the permission case needs a plain user
    CASES.append(("output in a read-only folder", segment(output="{readonly}/x.seg.nrrd"), ["not a writable folder"]))


def test_the_battery_is_large_enough():
    assert len(CASES) >= 35
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_exit_2_and_changes_nothing(bench, name, argv, words, capsys, monkeypatch):
    root, paths = bench
    names = {**paths, "readonly": root / "readonly", "root": root}
    if "{readonly}" in " ".join(argv):
        names["readonly"].mkdir(exist_ok=True)
        names["readonly"].chmod(0o555)
    argv = [a.format(**{k: str(v) for k, v in names.items()}) if "{" in a else a for a in argv]
    monkeypatch.setenv("LCS_TEMPLATES", str(paths["no_templates"]))
    monkeypatch.setenv("LCS_CHECKPOINT", str(root / "out" / "env.lcs"))  # only the case naming this path mentions it
    before = snapshot(root)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert err.startswith("lcs: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(root) == before  # every file byte-identical, none added (outputs go to {out}, never created)
    assert not paths["out"].exists() and not paths["pwned"].exists()


# ---- through the console script: what C++ code prints on stderr counts too --------------------------------------------
DRIVER = """
import json, os, sys
from LabelConditionedSegLib.cli import main
results = []
for i, argv in enumerate(json.loads(sys.argv[1])):
    path = f"stderr{i}.txt"
    sys.stderr.flush()
    saved, sink = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(sink, 2)  # the real file descriptor: what C++ code prints lands here too
    try:
        code = main(argv)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
    results.append([code, open(path).read()])
print(json.dumps(results))
"""


def test_commands_say_what_is_missing_in_one_line_at_the_file_descriptor(bench, tmp_path):
    """In a fresh process, with stderr caught at file descriptor 2 (where C++ code prints too): benchmark, which
    used to end in a SimpleITK traceback without the templates, demo-data, and a truncated MetaImage (MetaIO
    prints "data not read completely" on stderr itself) each give exactly one line."""
    root, paths = bench
    commands = [["benchmark", "--checkpoint", str(paths["checkpoint"]), "--device", "cpu"],
                ["demo-data", str(tmp_path / "demo")],
                ["segment", str(paths["cut_mha"]), "-o", str(tmp_path / "x.seg.nrrd"), "--checkpoint",
                 str(paths["checkpoint"]), "--device", "cpu"]]
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "LCS_TEMPLATES": str(paths["no_templates"])})
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    for (code, err), words in zip(outcomes, (["mricron-data", "LCS_TEMPLATES"], ["sudo apt-get install mricron-data"],
                                             ["truncated"])):
        assert code == 2 and err.startswith("lcs: error:") and err.count("\n") == 1, err
        assert all(word in err for word in words), err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "x.seg.nrrd").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_data_without_templates_says_how_to_install_them(tmp_path):
    empty = tmp_path / "templates"
    empty.mkdir()
    result = subprocess.run(["make", "-s", "-C", str(REPO), "data", f"LCS_TEMPLATES={empty}"], capture_output=True, text=True)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and "LCS_TEMPLATES" in ours[0] and "mricron-data" in ours[0], result.stderr
    result = subprocess.run(["make", "-s", "-C", str(REPO), "data", "LCS_TEMPLATES=/usr/share/mricron/templates"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---- positive controls ------------------------------------------------------------------------------------------------------
def test_a_valid_scan_and_a_valid_mask_are_segmented(bench, colin27, tmp_path, capsys):
    root, paths = bench
    atlas = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    region = array_image((sitk.GetArrayFromImage(atlas) == 3).astype(np.uint8), atlas)
    mask = write(region, tmp_path / "painted.nii.gz", True)
    code = main(["segment", str(paths["scan"]), "-o", str(tmp_path / "ok.seg.nrrd"), "--checkpoint", str(paths["checkpoint"]),
                 "--labels", ",".join(TINY_LABELS[:2]), "--condition", str(mask), "--name", "painted",
                 "--volumes-csv", str(tmp_path / "ok.csv"), "--device", "cpu", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "ok.seg.nrrd").is_file() and "segmented 3 of 3 labels" in out
    assert "painted" in (tmp_path / "ok.csv").read_text(encoding="utf-8")


def test_complete_files_of_every_format_read_exactly(bench, tmp_path):
    """The truncation checks refuse nothing whole: each format, compressed or not, reads back voxel for voxel."""
    scan = read_volume(bench[1]["scan"])
    expected = sitk.GetArrayFromImage(scan)
    for name, compress in (("a.nii.gz", True), ("a.nii", False), ("a.nrrd", True), ("b.nrrd", False), ("a.mha", False),
                           ("b.mha", True), ("a.mhd", False), ("a.hdr", False)):
        read = read_volume(write(scan, tmp_path / name, compress))
        assert np.array_equal(sitk.GetArrayFromImage(read), expected), name
        assert read.GetSize() == scan.GetSize()
    for name in ("a.hdr", "a.nii"):  # and what ITK alone would read zero-filled is refused
        data = tmp_path / ("a.img" if name == "a.hdr" else name)
        cut(data, data, 0.6)
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name))).shape == expected.shape  # ITK: no error
        with pytest.raises(LCSError, match="truncated"):
            read_volume(tmp_path / name)


def test_some_nan_or_infinite_voxels_are_read_as_0_with_a_warning_naming_the_file(bench, tmp_path):
    """ITK's NIfTI reader zeroes NaN/Inf without a word; every format now does the same, and says so."""
    scan = read_volume(bench[1]["scan"])
    array = sitk.GetArrayFromImage(scan)
    array[:2] = np.nan  # e.g. FSL's NaN outside the brain
    array[5, 5, 5] = np.inf
    broken = array_image(array, scan)
    for name, compress in (("nan.nii.gz", True), ("nan.nii", False), ("nan.mha", False), ("nan.nrrd", True)):
        said = []
        read = read_volume(write(broken, tmp_path / name, compress), messages=said.append)
        repaired = sitk.GetArrayFromImage(read)
        assert np.isfinite(repaired).all() and (repaired[:2] == 0).all() and repaired[5, 5, 5] == 0, name
        assert said == [f"{tmp_path / name}: {2 * array[0].size + 1} NaN or infinite voxels "
                        f"({100 * (2 * array[0].size + 1) / array.size:.1f}%) read as 0"], said
    with pytest.raises(LCSError, match="NaN or infinite"):  # an image already in memory (Slicer) is refused instead
        check_volume(broken, "input")


def test_oblique_4d_single_volume_and_integer_scans_are_accepted(bench, tmp_path):
    scan = read_volume(bench[1]["scan"])
    oblique = sitk.Image(scan)
    angle = np.radians(25)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique.SetDirection((rotation @ np.array(scan.GetDirection()).reshape(3, 3)).ravel().tolist())
    for name in ("oblique.nii.gz", "oblique.nrrd"):
        assert np.allclose(read_volume(write(oblique, tmp_path / name, True)).GetDirection(), oblique.GetDirection(), atol=1e-5)
    single = read_volume(write(sitk.JoinSeries([scan]), tmp_path / "one_timepoint.nii.gz", True))
    assert single.GetDimension() == 3 and single.GetSize() == scan.GetSize()
    read_volume(write(sitk.Cast(sitk.RescaleIntensity(scan, 0, 1000), sitk.sitkInt16), tmp_path / "int16.nii.gz", True))


def test_masks_may_be_binary_constant_and_small(tmp_path):
    ones = write(sitk.GetImageFromArray(np.ones((4, 6, 5), np.uint8)), tmp_path / "box.nii.gz")  # a cropped painted box
    assert read_volume(ones, mask=True).GetSize() == (5, 6, 4)
    check_volume(sitk.ReadImage(str(ones)), "condition mask 'box'")  # as the Segmenter checks a mask
    with pytest.raises(LCSError, match="constant"):
        read_volume(write(sitk.GetImageFromArray(np.ones((10, 10, 10), np.uint8)), tmp_path / "ones.nii.gz"))
    with pytest.raises(LCSError, match="empty"):
        read_volume(write(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.uint8)), tmp_path / "zero.nii.gz"), mask=True)


def test_dicom_several_series_takes_the_largest_says_so_and_can_pick_another(bench, colin27, tmp_path):
    image = sitk.Shrink(sitk.ReadImage(str(colin27 / "images/colin27.nii.gz")), [4, 4, 4])
    folder = write_dicom(image, tmp_path / "two", "1.2.826.0.1.3680043.2.1125.9.1", description="MPRAGE")
    write_dicom(image[:, :, 10:22], folder, "1.2.826.0.1.3680043.2.1125.9.2", description="localizer")
    said = []
    read = read_volume(folder, messages=said.append)
    assert read.GetSize() == image.GetSize()
    assert len(said) == 1 and "2 DICOM series" in said[0] and "largest" in said[0] and "MPRAGE" in said[0]
    assert "--series" in said[0] and "2: 1.2.826.0.1.3680043.2.1125.9.2 (12 files, localizer)" in said[0]
    assert read_volume(folder, series="2", messages=said.append).GetSize()[2] == 12
    assert read_volume(folder, series="1.2.826.0.1.3680043.2.1125.9.2", messages=said.append).GetSize()[2] == 12
    assert len(said) == 1  # a series picked is read without a word
    with pytest.raises(LCSError, match="series '3' is not in .*localizer"):
        read_volume(folder, series="3")
    one = write_dicom(image, tmp_path / "one", "1.2.826.0.1.3680043.2.1125.9.3")
    assert read_volume(one, messages=said.append).GetSize() == image.GetSize() and len(said) == 1


def test_memory_is_estimated_from_the_header_before_reading(bench):
    head = (181, 217, 181)  # a 1 mm head: far from any limit
    assert memory_needed(head, 4) == np.prod(head) * (4 + EXTRA_BYTES_PER_VOXEL) < 2**30
    with pytest.raises(LCSError, match="crop it"):
        read_volume(bench[1]["huge"])  # a 352-byte file: refused from its header alone


def test_a_scan_far_smaller_than_the_atlas_is_refused_against_the_model_atlas(tiny, bench):
    scan = read_volume(bench[1]["scan"])
    check_extent(scan, tiny.atlas_image)
    small = sitk.Image(scan)
    small.SetSpacing([0.2] * 3)  # the same voxels, 2 cm across
    with pytest.raises(LCSError, match="far less than the model's atlas"):
        check_extent(small, tiny.atlas_image)


def test_a_valid_training_folder_is_accepted(bench, tmp_path):
    valid = bench[1]["train_valid"]
    assert sorted(check_training_folder(valid, "colin27")) == ["colin27", "subject"]
    other = shutil.copytree(valid, tmp_path / "other")  # a case in another format, a mask-less case: both fine
    sitk.WriteImage(sitk.ReadImage(str(other / "images/subject.nii.gz")), str(other / "images/subject2.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(other / "labels/subject.nii.gz")), str(other / "labels/subject2.nrrd"))
    (other / "annotated").mkdir()
    (other / "annotated/subject2.txt").write_text("Frontal_Sup_L\n85\n")
    assert sorted(check_training_folder(other, "colin27")) == ["colin27", "subject", "subject2"]


def test_demo_data_keeps_identical_files_and_refuses_to_replace_others(tmp_path):
    folder = write_colin27_aal(tmp_path / "demo")
    before = snapshot(folder)
    write_colin27_aal(folder)  # again: nothing changes
    assert snapshot(folder) == before
    (folder / "labels.csv").write_text("value,name,r,g,b\n1,mine,1,2,3\n")
    with pytest.raises(LCSError, match="labels.csv exists and is not the Colin27/AAL file"):
        write_colin27_aal(folder)
    assert (folder / "labels.csv").read_text(encoding="utf-8").startswith("value,name,r,g,b\n1,mine")
