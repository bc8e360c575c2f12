"""Export for training: a scan and its segments written as one case of a training folder (training_folder.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import slicer

from .errors import LCSError
from .labels import LabelTable
from .mrml import require_binary_labelmap, require_image, segment_array, volume_to_image
from .training_folder import write_case

CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def case_exists(folder: str | Path, caseName: str) -> bool:
    """Whether the training folder has files of this case already."""
    return any((Path(folder) / sub / f"{caseName}{suffix}").exists()
               for sub, suffix in (("images", ".nii.gz"), ("labels", ".nii.gz"), ("masks", ".nii.gz"),
                                   ("annotated", ".txt")))


def _check_table(path: Path, labels) -> None:
    """A training folder's labels.csv, if it has one, must give the exported labels the model's values."""
    if not path.exists():
        return
    theirs = {l.name.lower(): l.value for l in LabelTable.read_csv(path)}
    clash = [l.name for l in labels if theirs.get(l.name.lower()) != l.value]
    if clash:
        raise LCSError(f"{path} lacks {', '.join(clash)} or gives other values than the model; export into a folder "
                       "made with this model's labels")


def require_on(segmentationNode, inputVolume) -> None:
    """A segmentation drawn on another volume (its reference geometry node, as Apply and Segment Editor set it) would
    label this scan with voxels of that one: refuse it. One with no reference volume is read on the scan's grid."""
    reference = segmentationNode.GetNodeReference(segmentationNode.GetReferenceImageGeometryReferenceRole())
    if reference is not None and reference is not inputVolume:
        raise LCSError(f"{segmentationNode.GetName()} was drawn on {reference.GetName()}, not on "
                       f"{inputVolume.GetName()}; choose {reference.GetName()} as the input volume, or a segmentation "
                       f"of {inputVolume.GetName()}")


def export_case(inputVolume, segmentationNode, folder: str | Path, caseName: str, table: LabelTable,
                overwrite: bool, messages: Callable[[str], None]) -> Path:
    """Write the scan and its segments as one case; returns the label map's path. Each segment named like an atlas
    label of `table` gets that label's value (where segments overlap, the later one wins) and annotated/CASE.txt
    lists those labels, so training treats the case's other labels as unknown rather than background. Other segments
    are left out and named through `messages`. A scan with no segments (`segmentationNode` None or empty) is written
    unlabelled: an all-zero label map and an empty annotated/CASE.txt, a scan for pretraining and adversarial
    training that supervised training skips."""
    require_image(inputVolume)
    if not str(folder).strip():
        raise LCSError("choose the training folder to export the case into")
    if not CASE_NAME.fullmatch(caseName or ""):
        raise LCSError(f"case name {caseName!r} cannot name files; use letters, digits, '_', '-' and '.'")
    folder = Path(folder)
    if case_exists(folder, caseName) and not overwrite:
        raise LCSError(f"case {caseName!r} exists in {folder} already; choose another name or allow overwriting")
    by_name = {l.name.lower(): l for l in table}
    if segmentationNode is not None:
        require_on(segmentationNode, inputVolume)
        require_binary_labelmap(segmentationNode, inputVolume)
    segments = segmentationNode.GetSegmentation() if segmentationNode is not None else None
    count = segments.GetNumberOfSegments() if segments is not None else 0
    labels = np.zeros(slicer.util.arrayFromVolume(inputVolume).shape, np.int32)
    written, skipped = {}, []
    for i in range(count):
        segmentId, name = segments.GetNthSegmentID(i), segments.GetNthSegment(i).GetName()
        label = by_name.get(name.lower())
        mask = segment_array(segmentationNode, segmentId, inputVolume) if label else None
        if mask is None or not mask.any():
            skipped.append(name)
            continue
        labels[mask] = label.value
        written[label.value] = label
    if count and not written:  # segments drawn but none kept: the user meant to label, not to export unlabelled
        raise LCSError(f"no segment of {segmentationNode.GetName()} is named like an atlas label (or they are "
                       "empty); name segments as in the atlas label list (a scan with no segments exports as "
                       "unlabelled)")
    _check_table(folder / "labels.csv", written.values())
    image = volume_to_image(inputVolume)
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(image)
    (folder / "masks" / f"{caseName}.nii.gz").unlink(missing_ok=True)  # an overwritten case's mask is not this scan's
    write_case(folder, caseName, image, labelmap, annotated=[l.name for l in written.values()])
    if not (folder / "labels.csv").exists():
        table.write_csv(folder / "labels.csv")
    if skipped:
        messages(f"Not exported (no atlas label of that name, or empty): {', '.join(skipped)}.")
    if not count:
        messages(f"Case {caseName} has no segments, so it was written unlabelled: lcs pretrain and "
                 "lcs train --adversarial use it; supervised training skips it.")
    return folder / "labels" / f"{caseName}.nii.gz"
