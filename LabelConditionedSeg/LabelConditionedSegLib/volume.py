"""Reading a scan and refusing the ones LCS cannot segment, with a reason the user can act on."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import LCSError


def read_volume(path: str | Path) -> sitk.Image:
    """Any file SimpleITK reads, or a folder holding a DICOM series (the largest one)."""
    path = Path(path)
    if not path.exists():
        raise LCSError(f"input {path} does not exist")
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise LCSError(f"folder {path} holds no DICOM series; give a file or a DICOM folder")
            files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            image = sitk.ReadImage(files)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown format"
        raise LCSError(f"cannot read {path} as an image ({first[:120]})") from None
    check_volume(image, str(path))
    return image


def check_volume(image: sitk.Image, what: str = "input") -> None:
    """Refuse what is not a single-channel, finite, non-constant 3D volume."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LCSError(f"{what} has {image.GetNumberOfComponentsPerPixel()} values per voxel (RGB or vector); give a single-channel grayscale volume")
    if image.GetDimension() != 3:
        raise LCSError(f"{what} is {image.GetDimension()}D; LCS segments 3D volumes (split a 4D series into 3D volumes first)")
    if min(image.GetSize()) < 2:
        raise LCSError(f"{what} is a single slice {image.GetSize()}; LCS segments 3D volumes")
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise LCSError(f"{what} has NaN or infinite voxels; fix or mask them before segmenting")
    if array.max() == array.min() == 0:
        raise LCSError(f"{what} is empty (every voxel is 0); check that the right file was given")
    if array.max() == array.min():
        raise LCSError(f"{what} is constant (every voxel is {array.flat[0]}); it holds no image to segment")
