"""Held-out scans of other MRI sequences: the source head repainted per tissue class, then made unlike training.

"t1" is the source's own T1 appearance. Every other sequence paints the tissue classes (tissues.py) with a fixed table
of relative intensities whose orderings follow the MRI literature, keeps the T1 texture inside each class (its
deviation from the class mean) and blurs a little for partial volume, so that the result looks like a scan rather
than a painted label map. The painted head then goes through synth.unlike_subject like the T1 one, from the same
seeds: subject i of every contrast has the same anatomy, grid, warp, bias field and noise, and only the contrast
differs between them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.errors import LCSError

from .data import case_files, mask_from_image, read_table
from .synth import SubjectGenerator, unlike_subject
from .tissues import CLASSES, NAMES, tissue_classes

# Relative intensity of each tissue class (tissues.NAMES order: background, CSF, grey, white, dark/soft/bright head
# tissue, caudate, putamen, pallidum, thalamus, hippocampus, amygdala).
TABLES = {
    # Spoiled gradient echo T1: the orderings of MPRAGE with a weaker grey/white difference.
    "t1-spgr": (0.0, 0.22, 0.52, 0.62, 0.05, 0.45, 0.95, 0.53, 0.56, 0.60, 0.57, 0.51, 0.52),
    # T2: CSF brightest, grey above white, fat bright (fast spin echo); iron-rich pallidum and putamen dark.
    "t2": (0.0, 1.00, 0.55, 0.38, 0.04, 0.30, 0.75, 0.55, 0.45, 0.32, 0.46, 0.62, 0.60),
    # Proton density: CSF bright-ish, grey above white by a little, fat bright.
    "pd": (0.0, 0.85, 0.74, 0.60, 0.05, 0.50, 0.85, 0.74, 0.70, 0.62, 0.67, 0.78, 0.76),
    # FLAIR: CSF nulled, grey above white, hippocampus a little bright, fat moderately bright.
    "flair": (0.0, 0.06, 0.58, 0.47, 0.03, 0.32, 0.60, 0.57, 0.53, 0.42, 0.51, 0.66, 0.63),
}
CONTRASTS = ("t1",) + tuple(TABLES)
TEXTURE = 1.0  # the T1 deviation from its class mean kept, relative to each image's bright end
PARTIAL_VOLUME_MM = 0.6  # sigma of the blur that mixes neighbouring classes


def parse_contrasts(text: str) -> list[str]:
    """The contrasts of `--contrasts t1,t2,...`, in the order given, each once."""
    names = list(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in CONTRASTS]
    if unknown or not names:
        raise LCSError(f"--contrasts: unknown contrast {', '.join(unknown) or repr(text)}; "
                       f"give a comma-separated list of {', '.join(CONTRASTS)}")
    return names


def paint(image: sitk.Image, classes: sitk.Image, contrast: str) -> sitk.Image:
    """`image` (a T1 head) as the sequence `contrast` shows it: each tissue class at its relative intensity plus the
    T1 texture within the class, blurred by partial volume; on the image's grid and intensity range."""
    x = sitk.GetArrayFromImage(image).astype(np.float32)
    c = sitk.GetArrayViewFromImage(classes)
    top = float(np.percentile(x, 99.5)) or 1.0
    table = np.array(TABLES[contrast], np.float32)
    means = np.array([x[c == k].mean() if (c == k).any() else 0.0 for k in range(CLASSES)], np.float32)
    painted = table[c] + TEXTURE * (x - means[c]) / top
    painted[c == NAMES.index("background")] = 0.0
    result = sitk.GetImageFromArray(np.clip(painted, 0, None) * top)
    result.CopyInformation(image)
    return sitk.SmoothingRecursiveGaussian(result, PARTIAL_VOLUME_MM)


def contrast_heads(data: Path, atlas: str, contrasts: list[str]
                   ) -> tuple[dict[str, sitk.Image], sitk.Image, sitk.Image]:
    """The data folder's atlas case as each of `contrasts` shows it (its own image for "t1"), its labels and its
    brain mask (estimated from the image when the folder has none)."""
    image_path, label_path, mask_path = case_files(data)[atlas]
    image, labels = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    mask = sitk.ReadImage(str(mask_path)) if mask_path else mask_from_image(image)
    classes = tissue_classes(image, mask, labels, read_table(data)) if set(contrasts) - {"t1"} else None
    return {c: image if c == "t1" else paint(image, classes, c) for c in contrasts}, labels, mask


def contrast_subjects(heads: dict[str, sitk.Image], labels: sitk.Image, mask: sitk.Image, count: int, seed: int,
                      stream: int = 30_000) -> Iterator[tuple[str, sitk.Image, sitk.Image]]:
    """(contrast, image, truth) of `count` subjects of each head (contrast_heads), made by the unlike generator from
    the seeds [seed, stream + i]: by default those of `lcs evaluate --unlike`'s held-out subjects."""
    for contrast, head in heads.items():
        generator = SubjectGenerator(head, labels, mask)
        for i in range(count):
            yield (contrast, *unlike_subject(generator, np.random.default_rng([seed, stream + i])))
