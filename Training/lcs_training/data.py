"""Training data: a folder of image / label-map pairs and a label table (layout in
LabelConditionedSegLib.training_folder), brought onto the atlas grid.

One case is the atlas: it fixes the model grid and conditions the network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.geometry import model_grid, normalize_intensity, register, to_model_grid
from LabelConditionedSegLib.labels import Label, LabelTable
from LabelConditionedSegLib.training_folder import read_annotated, write_case
from LabelConditionedSegLib.volume import read_volume

MRICRON = Path("/usr/share/mricron/templates")


@dataclass
class Case:
    """One labelled scan on the model grid (raw intensities): the labels its map holds (`present`) and the labels it
    annotates completely (`annotated`; a label present but not annotated is partial, e.g. added by relabeling).
    `mask` is None for a partly annotated case without a mask file: its labels do not outline the brain."""

    name: str
    image: sitk.Image
    labels: sitk.Image
    mask: sitk.Image | None
    present: list[int]
    annotated: list[int]


def case_files(folder: Path) -> dict[str, tuple[Path, Path, Path | None]]:
    """Case name -> (image, labels, optional mask) paths, matched by file name."""
    images = {p.name: p for p in sorted((folder / "images").glob("*")) if p.is_file() or p.is_dir()}
    if not images:
        raise LCSError(f"{folder}/images holds no images; see 'lcs train --help' for the folder layout")
    cases = {}
    for file_name, image in images.items():
        label = folder / "labels" / file_name
        if not label.exists():
            raise LCSError(f"{image} has no label map at {label}")
        mask = folder / "masks" / file_name
        cases[_stem(file_name)] = (image, label, mask if mask.exists() else None)
    return cases


def _stem(file_name: str) -> str:
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd"):
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def mask_from_labels(labels: sitk.Image) -> sitk.Image:
    """Foreground from the label map: labelled voxels, closed and hole-filled."""
    mask = sitk.Cast(labels > 0, sitk.sitkUInt8)
    radius = [max(1, int(round(6.0 / s))) for s in labels.GetSpacing()]
    return sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(mask, radius))


def load_atlas(folder: Path, name: str, spacing: float, factor: int) -> Case:
    """The atlas case resampled onto a fresh model grid at `spacing` (multiples of `factor`)."""
    files = case_files(folder)
    if name not in files:
        raise LCSError(f"atlas case {name!r} is not in {folder}/images (cases: {', '.join(sorted(files))})")
    image_path, label_path, mask_path = files[name]
    image, labels = read_volume(image_path), sitk.ReadImage(str(label_path))
    mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_labels(labels)
    grid = model_grid(image, spacing, factor)
    identity = sitk.Transform()
    on_grid = sitk.Resample(labels, grid, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    # labels too small to keep a voxel on the model grid cannot be conditioned on, so they are not the atlas's
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(on_grid)) if v)
    return Case(name, to_model_grid(image, grid, identity), on_grid,
                sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), grid, identity, sitk.sitkNearestNeighbor, 0),
                present, _annotated(folder, name, present))


def _annotated(folder: Path, name: str, present: list[int]) -> list[int]:
    declared = read_annotated(folder, name, LabelTable.read_csv(folder / "labels.csv"))
    return present if declared is None else declared


def load_cases(folder: Path, atlas: Case, registration: str = "affine") -> list[Case]:
    """Every case registered to the atlas and resampled onto its grid, as inference will see it."""
    cases = []
    for name, (image_path, label_path, mask_path) in case_files(folder).items():
        if name == atlas.name:
            cases.append(atlas)
            continue
        image, labels = read_volume(image_path), sitk.ReadImage(str(label_path))
        transform = register(image, atlas.image, registration, fixed_mask=atlas.mask)
        present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v)
        annotated = _annotated(folder, name, present)
        if mask_path:
            mask = sitk.ReadImage(str(mask_path))
        elif set(atlas.present) <= set(annotated):
            mask = mask_from_labels(labels)
        else:
            mask = None
        cases.append(Case(name, to_model_grid(image, atlas.image, transform),
                          sitk.Resample(labels, atlas.image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32),
                          None if mask is None else sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), atlas.image,
                                                                  transform, sitk.sitkNearestNeighbor, 0),
                          present, annotated))
    return cases


def normalized(image: sitk.Image, atlas_mask: sitk.Image) -> np.ndarray:
    """Model-grid intensities as inference computes them: percentiles inside the atlas mask."""
    return normalize_intensity(image, sitk.GetArrayViewFromImage(atlas_mask))


def _require_mricron(files: list[str]) -> list[Path]:
    paths = [MRICRON / f for f in files]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise LCSError(f"missing {missing[0]}; install Debian's mricron-data (apt-get install mricron-data)")
    return paths


def write_colin27_aal(folder: Path) -> Path:
    """The demo data set: Colin27 head with the 116-label AAL atlas and its brain mask (Debian's mricron-data)."""
    ch2, ch2bet, aal, names, lut = _require_mricron(["ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt", "aal.nii.lut"])
    write_case(folder, "colin27", sitk.ReadImage(str(ch2)), sitk.ReadImage(str(aal)),
                sitk.Cast(sitk.ReadImage(str(ch2bet)) > 0, sitk.sitkUInt8))
    LabelTable.from_mricron(names, lut).write_csv(folder / "labels.csv")
    return folder


def write_inia19_neuromaps(folder: Path) -> Path:
    """The second atlas family: the INIA19 macaque brain (0.5 mm) with its ~700 NeuroMaps labels (mricron-data).
    mricron-data ships no names for them, so each label is named by its value."""
    t1, neuromaps = _require_mricron(["inia19-t1-brain.nii.gz", "inia19-NeuroMaps.nii.gz"])
    image, labels = sitk.ReadImage(str(t1)), sitk.ReadImage(str(neuromaps))
    write_case(folder, "inia19", image, labels, sitk.Cast(image > 0, sitk.sitkUInt8))
    values = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v > 0)
    colors = np.random.default_rng(19).integers(40, 256, (len(values), 3))
    LabelTable(Label(v, f"NeuroMaps_{v}", tuple(int(c) for c in rgb)) for v, rgb in zip(values, colors)).write_csv(folder / "labels.csv")
    return folder


def write_merged(source: Path, folder: Path, groups: dict[str, list[str]]) -> Path:
    """A copy of a training folder whose label maps merge each group of labels into one coarse label, named by the
    group and keeping its first member's value and color (the coarse training set of the novel-label experiment)."""
    table = LabelTable.read_csv(source / "labels.csv")
    merged = {table.resolve(member).value: table.resolve(members[0]) for members in groups.values() for member in members}
    coarse = {table.resolve(members[0]).value: name for name, members in groups.items()}
    for name, (image_path, label_path, mask_path) in case_files(source).items():
        labels = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(labels)
        for fine, first in merged.items():
            array[array == fine] = first.value
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(labels)
        mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_labels(labels)
        write_case(folder, name, read_volume(image_path), out, mask)
    kept = [Label(l.value, coarse.get(l.value, l.name), l.color) for l in table if l.value not in merged or l.value in coarse]
    LabelTable(kept).write_csv(folder / "labels.csv")
    return folder
