"""Training data: a folder of image / label-map pairs and a label table (layout in
LabelConditionedSegLib.training_folder), brought onto the atlas grid.

One case is the atlas: it fixes the model grid and conditions the network.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.files import atomic_path
from LabelConditionedSegLib.geometry import model_grid, no_finer_than, normalize_intensity, register, to_model_grid
from LabelConditionedSegLib.labels import Label, LabelTable
from LabelConditionedSegLib.training_folder import read_annotated, write_case
from LabelConditionedSegLib.volume import check_volume, inspect_file, label_values, read_image, read_volume

TEMPLATES = Path("/usr/share/mricron/templates")  # Debian's mricron-data; $LCS_TEMPLATES points elsewhere
COLIN27_AAL = ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt", "aal.nii.lut")
INIA19 = ("inia19-t1-brain.nii.gz", "inia19-NeuroMaps.nii.gz")
SUFFIXES = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".hdr", ".img", ".nhdr")
# A label map, a mask and their image share one grid: spacing and direction to 1e-3, origin to 1% of a voxel
# (NIfTI stores them as float32; Slicer and other tools round them a little).
GRID_TOLERANCE = 1e-3


def templates_folder() -> Path:
    """Where the Colin27/AAL (and INIA19) templates are: $LCS_TEMPLATES, else Debian's mricron-data folder."""
    return Path(os.environ.get("LCS_TEMPLATES") or TEMPLATES)


MRICRON = templates_folder()  # as the process started; the functions below read templates_folder() afresh


@dataclass
class Case:
    """One labelled scan on the model grid (raw intensities): the labels its map holds (`present`) and the labels it
    annotates completely (`annotated`; a label present but not annotated is partial, e.g. added by relabeling).
    `mask` is the brain: the case's masks/ file, else estimated from its image (mask_from_image)."""

    name: str
    image: sitk.Image
    labels: sitk.Image
    mask: sitk.Image | None
    present: list[int]
    annotated: list[int]

    @property
    def unlabelled(self) -> bool:
        """A scan without any label (an empty label map, e.g. Slicer's export of a scan with no segments): it
        teaches nothing supervised, but self-supervised pretraining and adversarial training use it."""
        return not self.present and not self.annotated


LAYOUT = "see 'lcs train --help' for the layout (labels.csv, images/CASE.nii.gz, labels/CASE.nii.gz)"


def case_files(folder: Path) -> dict[str, tuple[Path, Path, Path | None]]:
    """Case name -> (image, labels, optional mask) paths, matched by file name; the folder checked whole first
    (check_training_folder, once per folder and content), so that every command reading a training folder
    refuses a malformed one in one line before any work."""
    cases = _listing(folder)
    _check_contents(folder, cases)
    return cases


def _listing(folder: Path) -> dict[str, tuple[Path, Path, Path | None]]:
    """The folder's cases from file names alone: refuses a missing folder, labels.csv, image or label map."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LCSError(f"training folder {folder} " + ("is a file, not a folder" if folder.exists() else "does not exist")
                       + f"; {LAYOUT}")
    if not any(folder.iterdir()):
        raise LCSError(f"training folder {folder} is empty; {LAYOUT}")
    if not (folder / "labels.csv").is_file():
        raise LCSError(f"training folder {folder} has no labels.csv (a header value,name,r,g,b and one line per label); {LAYOUT}")
    found = sorted((folder / "images").glob("*")) if (folder / "images").is_dir() else []
    names = {p.name for p in found}
    images = {p.name: p for p in found if (p.is_file() or p.is_dir()) and not _companion(p.name, names)}
    if not images:
        raise LCSError(f"{folder}/images holds no images; {LAYOUT}")
    cases = {}
    for file_name, image in images.items():
        stem = _stem(file_name)
        label = folder / "labels" / file_name
        if not label.exists():
            others = sorted(p.name for p in (folder / "labels").glob(f"{stem}.*") if _stem(p.name) == stem) \
                if (folder / "labels").is_dir() else []
            hint = (f" (labels/{others[0]} is there: name the image and its label map alike)" if others else
                    "; add the label map or remove the image")
            raise LCSError(f"case {stem}: images/{file_name} has no label map labels/{file_name}{hint}")
        if stem in cases:
            raise LCSError(f"case {stem} has two images ({cases[stem][0].name} and {file_name}); keep one")
        mask = folder / "masks" / file_name
        cases[stem] = (image, label, mask if mask.exists() else None)
    return cases


def _companion(name: str, names: set[str]) -> bool:
    """Files that belong to another image file (MetaImage .raw, Analyze .img, NRRD detached data) or are hidden."""
    low = name.lower()
    if name.startswith(".") or low.endswith((".raw", ".zraw", ".raw.gz")):
        return True
    return low.endswith((".img", ".img.gz")) and (name[: -len(".img.gz") if low.endswith(".gz") else -4] + ".hdr" in names
                                                   or name[:-7] + ".hdr.gz" in names)


def _stem(file_name: str) -> str:
    for suffix in SUFFIXES:
        if file_name.lower().endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def read_table(folder: Path) -> LabelTable:
    """folder/labels.csv, refused in one line naming the file when it is missing, malformed or empty."""
    path = Path(folder) / "labels.csv"
    if not path.is_file():
        raise LCSError(f"training folder {folder} has no labels.csv (a header value,name,r,g,b and one line per label); {LAYOUT}")
    try:
        table = LabelTable.read_csv(path)
    except LCSError as error:
        raise LCSError(f"{path}: {error}; fix the file (a header value,name,r,g,b and one line per label)") from None
    except (UnicodeDecodeError, ValueError, TypeError) as error:  # a binary file or odd CSV
        raise LCSError(f"{path} is not a label table ({type(error).__name__}); write it as CSV: value,name,r,g,b") from None
    if not len(table):
        raise LCSError(f"{path} lists no labels; add one line value,name,r,g,b per label")
    seen: dict[str, int] = {}
    for label in table:
        if label.name.lower() in seen:
            raise LCSError(f"{path} names {label.name!r} twice (values {seen[label.name.lower()]} and {label.value}); "
                           "give each label its own name")
        seen[label.name.lower()] = label.value
    return table


def check_training_folder(folder: Path, atlas: str | None = None) -> dict[str, tuple[Path, Path, Path | None]]:
    """Refuse a malformed training folder in one line naming the case and what to do: no labels.csv, no images,
    an image without label map, a file that cannot be read, is cut short or holds no usable scan, a label map or
    mask on another grid than its image, label values labels.csv does not list, an annotated/CASE.txt naming
    unknown labels, an empty atlas label map, an atlas case that is not there. Reads every file once (cached
    while the folder's files stay as they are); returns the cases."""
    cases = _listing(Path(folder))
    unlabelled = _check_contents(Path(folder), cases)
    if atlas is not None:
        if atlas not in cases:
            raise LCSError(f"atlas case {atlas!r} is not in {folder}/images (cases: {', '.join(sorted(cases))}); "
                           "give --atlas one of them")
        if atlas in unlabelled:
            raise LCSError(f"case {atlas}: labels/{cases[atlas][1].name} is empty (every voxel 0); the atlas needs "
                           "its labels: give --atlas a labelled case")
    return cases


_CHECKED: dict[Path, tuple[tuple, frozenset]] = {}  # folder -> (its files' sizes and times, cases without labels)


def _signature(folder: Path, cases: dict) -> tuple:
    files = [folder / "labels.csv", *(folder / "annotated").glob("*.txt")]
    files += [p for paths in cases.values() for p in paths if p is not None]
    signature = []
    for path in sorted(files):
        try:
            stat = path.stat()
            signature.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            signature.append((str(path), None, None))
    return tuple(signature)


def _check_contents(folder: Path, cases: dict) -> frozenset:
    """Every file of every case read and checked (see check_training_folder); returns the cases whose label map is
    empty. Done once while the folder's files keep their sizes and times."""
    key, signature = folder.resolve(), _signature(folder, cases)
    if key in _CHECKED and _CHECKED[key][0] == signature:
        return _CHECKED[key][1]
    table = read_table(folder)
    known = set(table.values)
    unlabelled = set()
    for name, (image_path, label_path, mask_path) in cases.items():
        image = _read_case_file(image_path, f"case {name}: images/{image_path.name}")
        check_volume(image, f"case {name}: images/{image_path.name}")
        labels = _read_case_file(label_path, f"case {name}: labels/{label_path.name}")
        _same_grid(image, labels, f"case {name}: labels/{label_path.name}", f"images/{image_path.name}")
        array = sitk.GetArrayViewFromImage(labels)
        if array.dtype.kind == "f" and not (np.isfinite(array).all() and np.array_equal(array, np.round(array))):
            raise LCSError(f"case {name}: labels/{label_path.name} holds non-integer values; a label map holds label "
                           "values (save it with an integer voxel type)")
        present = label_values(labels)
        unlabelled |= set() if present else {name}
        unknown = [v for v in present if v not in known]
        if unknown or (array.size and array.min() < 0):
            unknown = unknown or sorted({int(v) for v in np.unique(array) if v < 0})
            shown = ", ".join(map(str, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise LCSError(f"case {name}: labels/{label_path.name} holds value{'s' * (len(unknown) > 1)} {shown} that "
                           f"{folder}/labels.csv does not list; add them to labels.csv or set them to 0 (background)")
        if mask_path is not None:
            mask = _read_case_file(mask_path, f"case {name}: masks/{mask_path.name}")
            _same_grid(image, mask, f"case {name}: masks/{mask_path.name}", f"images/{image_path.name}")
            if not sitk.GetArrayViewFromImage(mask).any():
                raise LCSError(f"case {name}: masks/{mask_path.name} is empty (every voxel 0); fix or remove the mask "
                               "(without one it is estimated from the image)")
        _declared(folder, name, table)
    _CHECKED[key] = (signature, frozenset(unlabelled))
    return _CHECKED[key][1]


def _read_case_file(path: Path, what: str) -> sitk.Image:
    """An image, label map or mask of a case (a file, or a DICOM folder), refused in one line naming the case."""
    if not path.is_dir():
        return read_image(path, what)
    try:
        return read_image(path, what, messages=lambda message: None)
    except LCSError as error:
        raise LCSError(f"{what}: {error}") from None


def _same_grid(image: sitk.Image, other: sitk.Image, what: str, image_name: str) -> None:
    """Refuse a label map or mask that does not lie voxel for voxel on its image's grid."""
    problem = None
    if other.GetSize() != image.GetSize():
        problem = f"size {_shown(other.GetSize(), '{}')} against {_shown(image.GetSize(), '{}')}"
    elif not np.allclose(other.GetSpacing(), image.GetSpacing(), rtol=GRID_TOLERANCE, atol=0):
        problem = f"spacing {_shown(other.GetSpacing())} mm against {_shown(image.GetSpacing())} mm"
    elif np.abs(np.subtract(other.GetOrigin(), image.GetOrigin())).max() > 0.01 * min(image.GetSpacing()):
        problem = f"origin {_shown(other.GetOrigin())} against {_shown(image.GetOrigin())}"
    elif np.abs(np.subtract(other.GetDirection(), image.GetDirection())).max() > GRID_TOLERANCE:
        problem = "another orientation (direction matrix)"
    if problem:
        raise LCSError(f"{what} lies on another grid than {image_name} ({problem}); resample it onto its image "
                       "(nearest neighbour) or export both again")


def _shown(values, form: str = "{:.4g}") -> str:
    return "x".join(form.format(v) for v in values) if form == "{}" else "(" + ", ".join(form.format(v) for v in values) + ")"


def _declared(folder: Path, name: str, table: LabelTable) -> list[int] | None:
    """read_annotated, with an unknown label named with its case and file."""
    try:
        return read_annotated(folder, name, table)
    except LCSError:
        path = Path(folder) / "annotated" / f"{name}.txt"
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        bad = []
        for line in lines:
            try:
                table.resolve(line)
            except LCSError:
                bad.append(line)
        raise LCSError(f"case {name}: annotated/{name}.txt names {', '.join(map(repr, bad[:5])) or 'labels'}, not in "
                       f"the atlas labels of {folder}/labels.csv; correct the names or add the labels to labels.csv") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LCSError(f"case {name}: cannot read annotated/{name}.txt ({type(error).__name__}); write it as text, "
                       "one label name or value per line") from None


def mask_from_image(image: sitk.Image) -> sitk.Image:
    """The brain, estimated from the image alone: the mask of a case without masks/ (never from its labels, whose
    few structures may outline a hull far smaller than the brain and then ruin the atlas registration;
    docs/results.md, atlas masks). A brain rather than the head, so that a skull-stripped scan and a head normalize
    alike and subjects can be skull-stripped in training.

    The head is the largest component of Otsu's foreground (noise in the background falls below it); inside it,
    tissue brighter than half the head's median loses skull and CSF, and a 6 mm erosion cuts the scalp from the
    brain, the largest component left, grown back. The head itself when nothing survives the erosion. Found at 2 mm
    (the morphology took 15 s on a 1 mm head, 2 s at 2 mm), then brought back onto the image's grid."""
    coarse = no_finer_than(sitk.Cast(image, sitk.sitkFloat32), 2.0)
    close, cut = ([max(1, int(round(mm / s))) for s in coarse.GetSpacing()] for mm in (4.0, 6.0))
    foreground = sitk.OtsuThreshold(sitk.SmoothingRecursiveGaussian(coarse, 2.0), 0, 1, 128)
    head = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(_largest(foreground), close))
    array, inside = sitk.GetArrayViewFromImage(coarse), sitk.GetArrayViewFromImage(head) > 0
    tissue = sitk.GetImageFromArray((inside & (array > 0.5 * np.median(array[inside]))).astype(np.uint8))
    tissue.CopyInformation(coarse)
    core = _largest(sitk.BinaryErode(tissue, cut))
    brain = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(sitk.BinaryDilate(core, cut), close)) \
        if sitk.GetArrayViewFromImage(core).any() else head
    fine = sitk.Resample(sitk.Cast(brain, sitk.sitkFloat32), image, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.Cast(fine >= 0.5, sitk.sitkUInt8)


def _largest(mask: sitk.Image) -> sitk.Image:
    """The largest connected component of a binary mask (UInt8; empty when the mask is)."""
    return sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1, sitk.sitkUInt8)


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
    mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_image(image)
    grid = model_grid(image, spacing, factor)
    identity = sitk.Transform()
    on_grid = sitk.Resample(labels, grid, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
    # labels too small to keep a voxel on the model grid cannot be conditioned on, so they are not the atlas's
    present = label_values(on_grid)
    return Case(name, to_model_grid(image, grid, identity), on_grid, _on_atlas(mask, grid, identity),
                present, _annotated(folder, name, present))


def _annotated(folder: Path, name: str, present: list[int]) -> list[int]:
    declared = _declared(folder, name, read_table(folder))
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
        present = label_values(labels)
        annotated = _annotated(folder, name, present)
        mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_image(image)
        cases.append(Case(name, to_model_grid(image, atlas.image, transform),
                          sitk.Resample(labels, atlas.image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32),
                          _on_atlas(mask, atlas.image, transform), present, annotated))
    return cases


def scan_files(folder: Path) -> dict[str, Path]:
    """Case name -> image path of a folder of unlabelled scans: FOLDER/images/ when it exists, else FOLDER itself."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LCSError(f"unlabelled folder {folder} " + ("is a file, not a folder" if folder.exists() else "does not exist")
                       + "; give a folder of scans (or one with an images/ subfolder)")
    where = folder / "images" if (folder / "images").is_dir() else folder
    found = sorted(where.iterdir())
    names = {p.name for p in found}
    scans: dict[str, Path] = {}
    for path in found:
        if path.name.startswith(".") or _companion(path.name, names) or not (
                path.is_dir() or path.name.lower().endswith(SUFFIXES)):
            continue
        stem = _stem(path.name)
        if stem in scans:
            raise LCSError(f"scan {stem} has two images in {where} ({scans[stem].name} and {path.name}); keep one")
        scans[stem] = path
    if not scans:
        raise LCSError(f"{where} holds no scans (NIfTI, NRRD, MHA, Analyze or DICOM folders); add some or fix the path")
    return scans


def load_unlabelled(folder: Path, atlas: Case, registration: str = "affine") -> list[Case]:
    """Every scan of an unlabelled folder (scan_files) registered to the atlas and resampled onto its grid, as a case
    without labels (Case.unlabelled)."""
    cases = []
    for name, path in scan_files(folder).items():
        image = read_volume(path)
        empty = sitk.Image(atlas.labels.GetSize(), sitk.sitkInt32)
        empty.CopyInformation(atlas.labels)
        transform = register(image, atlas.image, registration, fixed_mask=atlas.mask)
        cases.append(Case(name, to_model_grid(image, atlas.image, transform), empty,
                          _on_atlas(mask_from_image(image), atlas.image, transform), [], []))
    return cases


def _on_atlas(mask: sitk.Image, grid: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """A case's brain mask pulled onto the atlas grid (binary, nearest neighbour)."""
    return sitk.Resample(sitk.Cast(mask > 0, sitk.sitkUInt8), grid, transform, sitk.sitkNearestNeighbor, 0)


def normalized(image: sitk.Image, atlas_mask: sitk.Image) -> np.ndarray:
    """Model-grid intensities as inference computes them: percentiles inside the atlas mask."""
    return normalize_intensity(image, sitk.GetArrayViewFromImage(atlas_mask))


def require_templates(files: Sequence[str] = COLIN27_AAL) -> list[Path]:
    """The template files a command needs, or one line saying what is missing and how to install it."""
    folder = templates_folder()
    paths = [folder / f for f in files]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        where = "$LCS_TEMPLATES" if os.environ.get("LCS_TEMPLATES") else "Debian's mricron-data"
        what = "the INIA19 macaque templates" if set(missing) <= set(INIA19) else "the Colin27/AAL templates"
        raise LCSError(f"this command needs {what}, but {folder} ({where}) lacks {', '.join(missing)}: install them "
                       "as root (sudo apt-get install mricron-data) or set LCS_TEMPLATES to a folder that holds them")
    for path in paths:  # a damaged template fails here, in one line, before the command writes anything
        if path.name.endswith((".nii.gz", ".nii")):
            inspect_file(path, f"template {path} (reinstall mricron-data)")  # a cut-short file fails here
    return paths


_require_mricron = require_templates  # the name the rest of the package used


def check_data(data: Path | None, atlas: str | None = "colin27", templates: Sequence[str] = ()) -> None:
    """What a command needs before it writes anything: the training folder it was given (checked whole), else the
    Colin27/AAL templates it writes one from; and any other templates it reads."""
    if data is None:
        require_templates(tuple(COLIN27_AAL) + tuple(templates))
    else:
        check_training_folder(data, atlas)
        if templates:
            require_templates(templates)


def write_colin27_aal(folder: Path) -> Path:
    """The demo data set: Colin27 head with the 116-label AAL atlas and its brain mask (Debian's mricron-data).
    Files already in `folder` are kept when identical and refused when they differ (nothing is overwritten)."""
    ch2, ch2bet, aal, names, lut = require_templates(COLIN27_AAL)
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="lcs-demo-data-") as tmp:  # written whole, then moved into place
        fresh = Path(tmp)
        write_case(fresh, "colin27", read_image(ch2, f"template {ch2}"), read_image(aal, f"template {aal}"),
                   sitk.Cast(read_image(ch2bet, f"template {ch2bet}") > 0, sitk.sitkUInt8))
        LabelTable.from_mricron(names, lut).write_csv(fresh / "labels.csv")
        written = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
        for relative in written:
            target = folder / relative
            if target.exists() and (not target.is_file() or target.read_bytes() != (fresh / relative).read_bytes()):
                raise LCSError(f"{target} exists and is not the Colin27/AAL file; write the demo data into an empty "
                               "folder, or remove it first")
        for relative in written:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            if not (folder / relative).exists():
                with atomic_path(folder / relative) as temporary:
                    shutil.copyfile(fresh / relative, temporary)
    return folder


def write_inia19_neuromaps(folder: Path) -> Path:
    """The second atlas family: the INIA19 macaque brain (0.5 mm) with its ~700 NeuroMaps labels (mricron-data).
    mricron-data ships no names for them, so each label is named by its value."""
    t1, neuromaps = require_templates(INIA19)
    image, labels = read_image(t1, f"template {t1}"), read_image(neuromaps, f"template {neuromaps}")
    write_case(folder, "inia19", image, labels, sitk.Cast(image > 0, sitk.sitkUInt8))
    values = label_values(labels)
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
        mask = sitk.ReadImage(str(mask_path)) if mask_path else None  # else the copy estimates it as the source does
        write_case(folder, name, read_volume(image_path), out, mask)
    kept = [Label(l.value, coarse.get(l.value, l.name), l.color) for l in table if l.value not in merged or l.value in coarse]
    LabelTable(kept).write_csv(folder / "labels.csv")
    return folder
