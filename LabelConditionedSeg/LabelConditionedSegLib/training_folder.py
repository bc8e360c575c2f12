"""The training folder layout, shared by `lcs train`, `lcs relabel` and Slicer's "Export for training".

    DATA/labels.csv            value,name,r,g,b[,code]
    DATA/images/CASE.nii.gz    any format SimpleITK reads
    DATA/labels/CASE.nii.gz    same file name as the image
    DATA/masks/CASE.nii.gz     optional brain mask; else estimated from the image (never from the labels: a few
                               labelled structures outline a hull that would ruin the atlas registration)
    DATA/annotated/CASE.txt    optional: the labels this case annotates, one name or value per line. A label not
                               listed is unknown in this case, never taught as background (SMILE). Without the file,
                               the case annotates exactly the labels its label map holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import SimpleITK as sitk

from .files import write_image, write_text
from .labels import LabelTable


def write_case(folder: Path, name: str, image: sitk.Image, labels: sitk.Image, mask: sitk.Image | None = None,
               annotated: Iterable[str] | None = None) -> None:
    """One case in the layout above (NIfTI files named after the case)."""
    volumes = {"images": image, "labels": labels, "masks": mask}
    for sub, volume in volumes.items():
        if volume is not None:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            write_image(volume, folder / sub / f"{name}.nii.gz", compress=False)
    if annotated is not None:
        (folder / "annotated").mkdir(parents=True, exist_ok=True)
        write_text("".join(f"{label}\n" for label in annotated), folder / "annotated" / f"{name}.txt")


def read_annotated(folder: Path, name: str, table: LabelTable) -> list[int] | None:
    """The label values a case declares it annotates, or None when it has no annotated/CASE.txt."""
    path = folder / "annotated" / f"{name}.txt"
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted({table.resolve(line).value for line in lines})
