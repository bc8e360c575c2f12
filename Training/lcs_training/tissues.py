"""Tissue classes of one labelled head: the label map that contrast generators paint.

A scan of another sequence shows the same anatomy with other intensities per tissue. Training paints each class with
a random intensity (SynthSeg's generative model); the held-out contrasts paint them with the ordering of real
sequences. The classes come from the head itself: its brain mask split into CSF, grey and white matter by intensity
(Otsu, two thresholds), the deep grey structures an atlas names (they look unlike cortex in T1 and T2), and the tissue
outside the brain split into dark (bone, air), middle (muscle, skin) and bright (fat, marrow) thirds.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from LabelConditionedSegLib.labels import LabelTable

BACKGROUND, CSF, GREY, WHITE, DARK_HEAD, SOFT_HEAD, BRIGHT_HEAD = range(7)
# Deep grey structures by the first part of their atlas name (AAL's "Putamen_L" -> "Putamen"); each is a class.
DEEP_GREY = ("Caudate", "Putamen", "Pallidum", "Thalamus", "Hippocampus", "Amygdala")
NAMES = ("background", "CSF", "grey matter", "white matter", "dark head tissue", "soft head tissue",
         "bright head tissue") + DEEP_GREY
CLASSES = len(NAMES)


def tissue_classes(image: sitk.Image, brain_mask: sitk.Image, labels: sitk.Image, table: LabelTable) -> sitk.Image:
    """One class per voxel (values of NAMES) on the image's grid; the brain is where `brain_mask` is non-zero."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    brain = sitk.GetArrayViewFromImage(brain_mask) > 0
    head = sitk.GetArrayFromImage(_head(image)).astype(bool) | brain
    classes = np.full(array.shape, BACKGROUND, np.uint8)
    classes[brain] = (CSF, GREY, WHITE)[0] + _thirds(array[brain])
    outside = head & ~brain
    classes[outside] = DARK_HEAD + _thirds(array[outside])
    label_array = sitk.GetArrayViewFromImage(labels)
    for label in table:
        structure = label.name.split("_")[0]
        if structure in DEEP_GREY:
            classes[(label_array == label.value) & brain] = NAMES.index(structure)
    result = sitk.GetImageFromArray(classes)
    result.CopyInformation(image)
    return result


def _thirds(values: np.ndarray) -> np.ndarray:
    """0, 1 or 2 per value: Otsu's two thresholds (the three intensity classes that best split the histogram)."""
    column = sitk.GetImageFromArray(values.reshape(-1, 1, 1))
    return sitk.GetArrayFromImage(sitk.OtsuMultipleThresholds(column, numberOfThresholds=2, numberOfHistogramBins=256)
                                  ).ravel().astype(np.uint8)


def _head(image: sitk.Image) -> sitk.Image:
    """The head: the largest bright component above Otsu's threshold, closed and with its holes filled."""
    foreground = sitk.OtsuThreshold(image, 0, 1)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(foreground), sortByObjectSize=True)
    head = sitk.BinaryMorphologicalClosing(components == 1, [3] * 3)
    return sitk.BinaryFillhole(head) > 0
