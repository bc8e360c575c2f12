"""Reading a scan and refusing the ones LCS cannot segment, with a reason the user can act on.

What is checked before ITK reads the voxels (from the header): dimension and values per voxel, the memory the
scan would need, a NIfTI file cut short (ITK zero-fills it silently) and a sheared NIfTI sform (ITK drops it
silently or refuses the file). After reading: empty or constant volumes, too few voxels, a direction matrix that
is not a rotation (a sheared NRRD/MHA grid), and for DICOM a tilted or unevenly spaced stack of slices.
NaN/Inf voxels are read as 0 with a warning naming the file (ITK's NIfTI reader zeroes them anyway; the same
for every format), and a volume with no finite voxel is refused. check_volume, for volumes already in memory
(Slicer), refuses NaN/Inf.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import LCSError

MIN_VOXELS = 8  # along each axis: fewer cannot be registered to an atlas (a 5x5x5 volume holds no anatomy)
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I|: float32 NIfTI quaternions and 6-digit DICOM cosines stay far below
# Peak bytes per voxel of segmenting a scan beyond its own voxels: the float32 copy that registration and
# resampling make (4), the isfinite check (1), the label map and a segment layer on the input grid (2 + 1), a
# probability map mapped back (4), the writers' copies (4). Measured (lcs segment, 6 labels, every output, Colin27
# at 1 mm and at 0.5 mm: 7.1 and 56.9 million float32 voxels): the peak grows by 13 to 17 bytes per voxel in all,
# under the 4 + 16 estimated. The model's own memory (under 1 GB) comes on top and is not counted.
EXTRA_BYTES_PER_VOXEL = 16
# What an `lcs segment` process holds besides that: Python, torch, the model and its atlas. Measured: 0.89 GB peak
# resident for Colin27 at 1 mm, all 116 labels of the demo model on CPU, of which memory_needed counts 0.12 GB; the
# rest leaves room for CUDA's own host memory on a GPU node.
PROCESS_BYTES = 2 << 30


def read_volume(path: str | Path, series: str | None = None, messages: Callable[[str], None] | None = None,
                mask: bool = False) -> sitk.Image:
    """A scan to segment (or, with `mask`, a binary mask drawn on the atlas, which may be constant or small): any
    file SimpleITK reads, or a folder holding DICOM series, refused in one line when LCS cannot use it (see
    read_image and check_volume). In a folder of several series the largest is read unless `series` picks
    another: its number in the listing the message gives, or its Series Instance UID. NaN/Inf voxels are read as
    0. `messages` receives what the user should know (which series was read, how many voxels were NaN); by
    default it is printed on stderr as "lcs: ..."."""
    image = read_image(path, str(path), series, messages)
    check_volume(image, str(path), mask=mask)
    return image


def read_image(path: str | Path, what: str | None = None, series: str | None = None,
               messages: Callable[[str], None] | None = None) -> sitk.Image:
    """One image file or DICOM folder, refused before its voxels are read when it is not 3D single-channel, would
    not fit in memory, or is a cut-short or sheared NIfTI; a DICOM stack that is tilted or misses slices is
    refused after. The voxels themselves are not checked (check_volume does that)."""
    path = Path(path)
    what = what or str(path)
    if not path.exists():
        raise LCSError(f"input {path} does not exist" if what == str(path) else f"{what} does not exist")
    if path.is_dir():
        say = messages or (lambda message: print(f"lcs: {message}", file=sys.stderr))
        image = _read_dicom(path, series, say)
        _check_shape(image.GetNumberOfComponentsPerPixel(), image.GetDimension(), image.GetSize(), what)
        return _finite(image, what, 0, say)
    if series is not None:
        raise LCSError(f"a series is picked only in a DICOM folder; {path} is a file")
    reader, nonfinite = inspect_file(path, what)
    image = _itk(reader.Execute, what)
    image = image[:, :, :, 0] if image.GetDimension() == 4 else image
    return _finite(image, what, nonfinite, messages)


def _finite(image: sitk.Image, what: str, zeroed: int, messages: Callable[[str], None] | None) -> sitk.Image:
    """NaN and infinite voxels become 0, as ITK's NIfTI reader already makes them (`zeroed`), with a warning naming
    the file; a volume with no finite voxel at all is refused."""
    array = sitk.GetArrayViewFromImage(image)
    bad = zeroed
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            bad += int(finite.size - np.count_nonzero(finite))
            repaired = sitk.GetImageFromArray(np.where(finite, array, 0).astype(array.dtype))
            repaired.CopyInformation(image)
            image = repaired
    if bad:
        total = int(np.prod(image.GetSize(), dtype=np.int64))
        if bad >= total:
            raise LCSError(f"{what} has no finite voxel (every voxel is NaN or infinite); check that the right file was given")
        say = messages or (lambda message: print(f"lcs: {message}", file=sys.stderr))
        say(f"{what}: {bad} NaN or infinite voxels ({100 * bad / total:.1f}%) read as 0")
    return image


def inspect_file(path: str | Path, what: str | None = None) -> tuple[sitk.ImageFileReader, int]:
    """The checks made before ITK reads the voxels: from the header, 3D and one value per voxel and the memory
    segmenting it would need; for NIfTI, from the raw file, a sheared sform and a file cut short (which ITK would
    drop or zero-fill silently). Returns the reader, ready to read, and the NaN/Inf voxels a float NIfTI holds
    (ITK reads them as 0)."""
    path = Path(path)
    what = what or str(path)
    if not path.is_file():
        raise LCSError(f"{what} does not exist" if not path.exists() else f"{what} is not a file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _itk(reader.ReadImageInformation, what)
    size = reader.GetSize()
    _check_shape(reader.GetNumberOfComponents(), len(size), size, what)
    check_memory(size[:3], _bytes_per_component(reader.GetPixelID()) * reader.GetNumberOfComponents(), what)
    return reader, _check_nifti(path, what) if _is_nifti(path) else 0


def label_values(labels: sitk.Image) -> list[int]:
    """The non-zero values a label map holds, sorted."""
    return [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v]


def check_volume(image: sitk.Image, what: str = "input", mask: bool | None = None) -> None:
    """Refuse what is not a single-channel, finite, non-constant 3D volume of at least MIN_VOXELS per axis on
    an orthonormal grid. A mask (`mask`, or `what` starting "condition mask") may be constant and small."""
    mask = what.startswith("condition mask") if mask is None else mask
    _check_shape(image.GetNumberOfComponentsPerPixel(), image.GetDimension(), image.GetSize(), what)
    if image.GetDimension() != 3:  # a 4D image of one volume, in memory: read_image takes the 3D volume out of a file
        raise LCSError(f"{what} is 4D ({_times(image.GetSize())}); give its 3D volume (image[:, :, :, 0])")
    if not mask and min(image.GetSize()) < MIN_VOXELS:
        raise LCSError(f"{what} is only {_times(image.GetSize())} voxels; LCS needs at least {MIN_VOXELS} along each "
                       "axis (a 3D scan of the whole anatomy)")
    check_direction(image.GetDirection(), what)
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise LCSError(f"{what} has {bad} NaN or infinite voxels; replace them (e.g. by 0) or mask them before segmenting")
    low, high = array.min(), array.max()
    if high == low == 0:
        raise LCSError(f"{what} is empty (every voxel is 0); check that the right file was given")
    if high == low and not mask:
        raise LCSError(f"{what} is constant (every voxel is {low}); it holds no image to segment")


def check_direction(direction, what: str, grid: str = "grid") -> None:
    """Refuse a direction matrix that is not a rotation (or reflection): a sheared grid, which ITK's resampling
    and every output written on the input's grid would misplace."""
    d = np.asarray(direction, float).reshape(3, 3)
    error = float(np.abs(d.T @ d - np.eye(3)).max())
    if not np.isfinite(error) or error > ORTHONORMAL_TOLERANCE:
        cosine = max(abs(float(d[:, i] @ d[:, j])) / max(1e-12, float(np.linalg.norm(d[:, i]) * np.linalg.norm(d[:, j])))
                     for i, j in ((0, 1), (0, 2), (1, 2)))
        angle = math.degrees(math.acos(min(1.0, cosine))) if np.isfinite(cosine) else 0.0
        raise LCSError(f"{what} has a sheared {grid} (axes {angle:.0f} degrees apart, not 90); LCS writes outputs on "
                       "the input's grid, which cannot be sheared: resample it onto a non-sheared grid first (e.g. "
                       "Slicer's Resample Scalar Volume, or FSL flirt -applyxfm)")


def check_extent(image: sitk.Image, atlas: sitk.Image, what: str = "input", fraction: float = 0.25) -> None:
    """Refuse a scan whose largest physical side is under `fraction` of the atlas's smallest side: far smaller than
    the anatomy the model segments (a 2 cm cube against a head), which registration cannot place."""
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    atlas_extent = np.array(atlas.GetSize()) * np.array(atlas.GetSpacing())
    if extent.max() < fraction * atlas_extent.min():
        raise LCSError(f"{what} covers only {_times(extent, '{:.0f}')} mm, far less than the model's atlas "
                       f"({_times(atlas_extent, '{:.0f}')} mm); give a scan of the whole anatomy (at least "
                       f"{fraction * atlas_extent.min():.0f} mm across)")


# ---- memory -------------------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, lowered by a cgroup (container) limit; None if unknown."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            return None
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                available = min(available, max(0, int(limit) - int(usage)))
            break
        except (OSError, ValueError):
            continue
    return available


def memory_needed(size, bytes_per_voxel: int) -> int:
    """Estimated peak bytes of reading, registering, resampling and mapping back a scan of this size."""
    return int(np.prod([int(s) for s in size], dtype=np.float64) * (bytes_per_voxel + EXTRA_BYTES_PER_VOXEL))


def job_memory(path: str | Path) -> int:
    """Peak bytes of `lcs segment` on the scan at `path`, from its header alone (a DICOM folder: its first file's slice
    times its number of files): what a cluster job asks for. A scan whose header cannot be read gets the process's
    share only; its job fails with the reason."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(str(files[0]))
        _quietly(reader.ReadImageInformation)
    except (IndexError, RuntimeError):
        return PROCESS_BYTES
    size = [*reader.GetSize()[:2], len(files)] if path.is_dir() else reader.GetSize()[:3]
    return PROCESS_BYTES + memory_needed(size, _bytes_per_component(reader.GetPixelID()) * reader.GetNumberOfComponents())


def check_memory(size, bytes_per_voxel: int, what: str) -> None:
    """Refuse, before reading the voxels, a scan whose segmentation would not fit in the memory available.
    Refused rather than resampled: LCS promises outputs on the input's own grid, and a scan cropped or
    downsampled by the user is one they know about."""
    needed, available = memory_needed(size, bytes_per_voxel), available_memory()
    if available is None or needed <= available:
        return
    factor = math.ceil((needed / max(available, 1)) ** (1 / 3) * 10) / 10
    raise LCSError(f"{what} is {_times(size)} voxels ({_gb(np.prod([int(s) for s in size], dtype=np.float64) * bytes_per_voxel)} "
                   f"in memory); segmenting it needs about {_gb(needed)} but {_gb(available)} is available: crop it to "
                   f"the anatomy or downsample it (voxels {factor:g}x larger or more) first")


# ---- NIfTI: cut-short files and sheared sforms (ITK reads the first zero-filled, and drops the second) ------------
def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz"))


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _nifti_header(path: Path) -> dict | None:
    """The fields of a NIfTI-1/2 (or Analyze) header that say how many bytes follow and where the grid lies."""
    header_path = path
    if path.name.lower().endswith((".img", ".img.gz")):
        header_path = path.with_name(path.name[: -len(".img.gz")] + ".hdr.gz" if path.name.lower().endswith(".gz")
                                     else path.name[:-4] + ".hdr")
    with _open(header_path) as f:
        raw = f.read(540)
    for endian in "<>":
        if len(raw) >= 348 and struct.unpack(endian + "i", raw[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", raw[40:56])
            return {"version": 1, "endian": endian, "datatype": struct.unpack(endian + "h", raw[70:72])[0],
                    "dims": dims[1: 1 + max(0, min(dims[0], 7))], "bitpix": struct.unpack(endian + "h", raw[72:74])[0],
                    "vox_offset": int(struct.unpack(endian + "f", raw[108:112])[0]),
                    "sform_code": struct.unpack(endian + "h", raw[254:256])[0],
                    "qform_code": struct.unpack(endian + "h", raw[252:254])[0],
                    "srow": np.array(struct.unpack(endian + "12f", raw[280:328]), float).reshape(3, 4),
                    "pair": raw[344:347] == b"ni1" or header_path != path or path.name.lower().endswith((".hdr", ".hdr.gz"))}
        if len(raw) >= 540 and struct.unpack(endian + "i", raw[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", raw[16:80])
            return {"version": 2, "endian": endian, "datatype": struct.unpack(endian + "h", raw[12:14])[0],
                    "dims": dims[1: 1 + max(0, min(dims[0], 7))], "bitpix": struct.unpack(endian + "h", raw[14:16])[0],
                    "vox_offset": struct.unpack(endian + "q", raw[168:176])[0],
                    "qform_code": struct.unpack(endian + "i", raw[344:348])[0],
                    "sform_code": struct.unpack(endian + "i", raw[348:352])[0],
                    "srow": np.array(struct.unpack(endian + "12d", raw[400:496]), float).reshape(3, 4),
                    "pair": raw[4:7] == b"ni2" or header_path != path or path.name.lower().endswith((".hdr", ".hdr.gz"))}
    return None


def _check_nifti(path: Path, what: str) -> int:
    """Refuse a sheared sform or a file cut short; returns how many NaN/Inf voxels a float NIfTI holds (ITK's
    NIfTI reader turns them into 0 without a word)."""
    try:
        header = _nifti_header(path)
    except (OSError, EOFError, zlib.error, struct.error):
        return 0  # ITK has read the header already; what it cannot parse it reports itself
    if header is None:
        return 0
    if header["sform_code"] > 0:
        srow = header["srow"][:, :3]
        norms = np.linalg.norm(srow, axis=0)
        if np.all(norms > 0):
            # with a valid qform too, ITK silently uses the qform: the outputs would lie elsewhere than tools
            # reading the sform place the scan
            check_direction((srow / norms).ravel(), what, "NIfTI sform" + (" (ITK would silently use its qform)"
                                                                          if header["qform_code"] > 0 else ""))
    data, start, expected = _voxel_bytes(path, header)
    if not data.is_file():
        raise LCSError(f"{what}: its voxel file {data.name} is missing; keep the .hdr and .img files together")
    floats = {16: "f4", 64: "f8"}.get(header["datatype"])  # complex and RGB types are refused elsewhere
    dtype = np.dtype(header["endian"] + floats) if floats else None
    present, nonfinite = _scan_voxels(data, start, expected, dtype)
    if present < expected:
        raise LCSError(f"{what} is truncated: its header promises {expected} bytes of voxels but only {present} "
                       f"({100 * present / max(expected, 1):.0f}%) are there; copy or export the file again")
    return nonfinite


def _voxel_bytes(path: Path, header: dict) -> tuple[Path, int, int]:
    """Where a NIfTI's voxels are (the file, the offset into it) and how many bytes its header promises."""
    expected = int(np.prod([max(1, int(d)) for d in header["dims"]], dtype=np.int64)) * max(1, header["bitpix"]) // 8
    if header["pair"]:
        data = path if path.name.lower().endswith((".img", ".img.gz")) else \
            path.with_name(path.name[: -len(".hdr.gz")] + ".img.gz" if path.name.lower().endswith(".gz") else path.name[:-4] + ".img")
        return data, max(0, header["vox_offset"]), expected  # the offset into the .img file
    return path, max(header["vox_offset"], 352 if header["version"] == 1 else 544), expected


def nifti_cut_short(path: Path) -> bool:
    """Whether a single-file NIfTI holds fewer voxel bytes than its header promises (or no header at all): ITK's
    writer reports a failed write (a full disk) on stderr only and returns, and its reader zero-fills what is missing."""
    try:
        header = _nifti_header(path)
        if header is None:
            return True
        data, start, expected = _voxel_bytes(path, header)
        return _scan_voxels(data, start, expected, None)[0] < expected
    except (OSError, EOFError, zlib.error, struct.error):
        return True


def _scan_voxels(path: Path, start: int, expected: int, dtype: np.dtype | None) -> tuple[int, int]:
    """(voxel bytes present, up to `expected`; NaN/Inf values among them when `dtype` is a float type). Fewer
    bytes than expected means the file is cut short; a gzip stream is decompressed to know."""
    compressed = path.name.lower().endswith(".gz")
    if dtype is None and not compressed:
        return max(0, min(path.stat().st_size, start + expected) - start), 0
    present, nonfinite, skip, carry = 0, 0, start, b""
    inflate = zlib.decompressobj(wbits=31) if compressed else None

    def take(block: bytes) -> None:
        nonlocal present, nonfinite, skip, carry
        if skip:
            dropped = min(skip, len(block))
            block, skip = block[dropped:], skip - dropped
        block = block[: expected - present]
        present += len(block)
        if dtype is not None and block:
            block = carry + block
            whole = len(block) - len(block) % dtype.itemsize
            values = np.frombuffer(block[:whole], dtype)
            nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
            carry = block[whole:]

    try:
        with open(path, "rb") as f:
            while present < expected:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                if inflate is None:
                    take(chunk)
                    continue
                while chunk and present < expected:
                    take(inflate.decompress(chunk))
                    chunk = b""
                    if inflate.eof:  # a gzip file may hold several members, one after the other
                        chunk, inflate = inflate.unused_data, zlib.decompressobj(wbits=31)
    except zlib.error:  # damaged from here on: what came out before counts
        pass
    return present, nonfinite


# ---- DICOM ----------------------------------------------------------------------------------------------------------
def _read_dicom(path: Path, series: str | None, say: Callable[[str], None]) -> sitk.Image:
    ids = list(_quietly(sitk.ImageSeriesReader.GetGDCMSeriesIDs, str(path)) or [])
    if not ids:
        entries = list(path.iterdir())
        if not entries:
            raise LCSError(f"folder {path} is empty: it holds no DICOM series; give a scan file or a folder of DICOM files")
        folders = [e.name for e in entries if e.is_dir()]
        hint = (f" (subfolders are not searched: give the one that holds the DICOM files, e.g. {path / folders[0]})"
                if folders else "; give a file or a DICOM folder")
        raise LCSError(f"folder {path} holds no DICOM series{hint}")
    listing = sorted(((uid, _quietly(sitk.ImageSeriesReader.GetGDCMSeriesFileNames, str(path), uid)) for uid in ids),
                     key=lambda item: -len(item[1]))

    def described(i: int) -> str:
        uid, files = listing[i]
        text = _description(files[0])
        return f"{i + 1}: {uid} ({len(files)} files{', ' + text if text else ''})"

    if series is None:
        index = 0
        if len(listing) > 1:
            others = "; ".join(described(i) for i in range(1, len(listing)))
            say(f"{path} holds {len(listing)} DICOM series; reading the largest, {described(0)}; pick another with "
                f"--series NUMBER or UID ({others})")
    else:
        matches = [i for i, (uid, _) in enumerate(listing) if str(series) == uid or str(series) == str(i + 1)]
        if not matches:
            raise LCSError(f"series {series!r} is not in {path}; it holds " + "; ".join(described(i) for i in range(len(listing))))
        index = matches[0]
    files = listing[index][1]
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    try:
        _quietly(first.ReadImageInformation)
        check_memory([*first.GetSize()[:2], len(files)], _bytes_per_component(first.GetPixelID()) * first.GetNumberOfComponents(),
                     f"the DICOM series in {path}")
    except RuntimeError:
        pass  # the series reader below says what is wrong with it
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = _itk(reader.Execute, f"DICOM series {listing[index][0]} in {path}")
    if image.GetDimension() == 3 and len(files) > 2:
        _check_slices(reader, image, len(files), f"the DICOM series in {path}")
    return image


def _description(file: str) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        _quietly(reader.ReadImageInformation)
        return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""


def _check_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, count: int, what: str) -> None:
    """Refuse a stack of slices that one grid cannot hold: tilted against its planes (gantry tilt) or unevenly
    spaced (missing slices). ITK reads both as a regular grid and would misplace the anatomy."""
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")] for k in range(count)])
    except (RuntimeError, ValueError):
        return
    if positions.shape != (count, 3):
        return
    d = np.array(image.GetDirection()).reshape(3, 3)
    normal = np.cross(d[:, 0], d[:, 1])
    along = (positions - positions[0]) @ normal
    order = np.argsort(along)
    steps = np.diff(along[order])
    across = positions[order] - positions[order][0] - np.outer(along[order], normal)
    if steps.size and abs(steps.mean()) > 0:
        tilt = math.degrees(math.atan2(float(np.linalg.norm(across[-1])), float(abs(along[order][-1] - along[order][0]))))
        if tilt > 0.5:
            raise LCSError(f"{what} is tilted: its slices are shifted {tilt:.1f} degrees against their planes (gantry "
                           "tilt), which one grid cannot hold; convert it with tilt correction first (e.g. dcm2niix)")
        if np.abs(steps - np.median(steps)).max() > 0.1 * abs(np.median(steps)):
            raise LCSError(f"{what} has unevenly spaced slices ({steps.min():.2f} to {steps.max():.2f} mm apart): slices "
                           "are missing or the folder mixes acquisitions; check the export")


# ---- ITK calls: one clear line instead of ITK's messages ---------------------------------------------------------------
def _quietly(function, *args):
    """ITK's multi-line warnings (e.g. "No Series were found") off: our own error line says it better."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return function(*args)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextmanager
def _captured_stderr():
    """What C++ code prints on stderr while reading (MetaIO's "data not read completely"), kept out of the
    terminal and handed to the error message. A no-op where file descriptor 2 cannot be redirected."""
    captured = {"text": ""}
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured["text"] = sink.read().decode("utf-8", "replace")


def _itk(function, what: str):
    """Run an ITK read; its failure becomes one LCSError line saying what is wrong and what to do."""
    with _captured_stderr() as printed:
        try:
            return _quietly(function)
        except RuntimeError as error:
            failure = error
    raise LCSError(_failure(what, str(failure) + "\n" + printed["text"])) from None


def _failure(what: str, text: str) -> str:
    """ITK's exception and whatever it printed, as one line naming the cause and the remedy."""
    low = text.lower()
    if any(k in low for k in ("not read completely", "but received", "fread got only", "unexpected end of",
                              "premature end", "truncated")):
        return f"{what} is truncated (its voxels end early); copy or export the file again"
    if "orthonormal" in low:
        return (f"{what} has a sheared orientation matrix (ITK reads only rotations); resample it onto a non-sheared "
                "grid first (e.g. Slicer's Resample Scalar Volume, or FSL flirt -applyxfm)")
    if "unable to determine imageio reader" in low or "could not create io object" in low:
        return (f"cannot read {what}: not an image format SimpleITK reads (NIfTI, NRRD, MHA, ... or a DICOM folder); "
                "check the file")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.lower().startswith(("exception thrown", "itk error")) and "/itk/" not in line.lower()]
    detail = (useful or lines or ["unknown format"])[-1].split("ITK ERROR:")[-1].strip()
    return f"cannot read {what} as an image ({detail[:120]}); check that it is a complete image file"


# ---- small helpers -----------------------------------------------------------------------------------------------
def _check_shape(components: int, dimension: int, size, what: str) -> None:
    if components != 1:
        raise LCSError(f"{what} has {components} values per voxel (RGB or vector); give a single-channel grayscale "
                       "volume (e.g. one channel or the magnitude)")
    if dimension == 4 and int(size[3]) == 1:  # a 4D file holding one volume is a 3D volume (read_image drops the 4th axis)
        dimension, size = 3, size[:3]
    if dimension != 3:
        raise LCSError(f"{what} is {dimension}D ({_times(size)}); LCS segments 3D volumes"
                       + (" (split the 4D series into 3D volumes first)" if dimension > 3 else ""))
    if min(size) < 2:
        raise LCSError(f"{what} is a single slice {tuple(int(s) for s in size)}; LCS segments 3D volumes")


def _bytes_per_component(pixel_id: int) -> int:
    name = sitk.GetPixelIDValueAsString(pixel_id).lower()
    for bits, size in (("64", 8), ("32", 4), ("16", 2), ("8", 1)):
        if bits in name:
            return size
    return 4


def _times(values, form: str = "{}") -> str:
    return "x".join(form.format(int(v) if form == "{}" else v) for v in values)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MB"
