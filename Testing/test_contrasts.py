"""Tissue classes of the real Colin27 head, the contrasts painted from them, and the prior that registers any of them."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lcs_training.data import read_table
from lcs_training.tissues import CSF, DARK_HEAD, GREY, NAMES, WHITE, tissue_classes


@pytest.fixture(scope="module")
def colin27_2mm(colin27):
    """Colin27's image, labels, brain mask and tissue classes at 2 mm (fast enough for the fast tier)."""
    def read(kind: str, interpolator: int) -> sitk.Image:
        image = sitk.ReadImage(str(colin27 / f"{kind}/colin27.nii.gz"))
        size = [s // 2 for s in image.GetSize()]
        return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), [2.0] * 3,
                             image.GetDirection())
    image, labels, mask = read("images", sitk.sitkLinear), read("labels", sitk.sitkNearestNeighbor), \
        read("masks", sitk.sitkNearestNeighbor)
    return image, labels, mask, tissue_classes(image, mask, labels, read_table(colin27))


def test_tissue_classes_of_colin27_follow_its_t1_anatomy(colin27_2mm, colin27):
    image, labels, mask, classes = colin27_2mm
    c, x = sitk.GetArrayFromImage(classes), sitk.GetArrayFromImage(image)
    ml = {name: float((c == i).sum()) * 8 / 1000 for i, name in enumerate(NAMES)}
    assert 550 < ml["grey matter"] < 1100 and 450 < ml["white matter"] < 1000 and 50 < ml["CSF"] < 400, ml
    mean = [float(x[c == k].mean()) for k in (CSF, GREY, WHITE)]
    assert mean == sorted(mean)  # T1: CSF dark, white matter bright
    head = [float(x[c == k].mean()) for k in (DARK_HEAD, DARK_HEAD + 1, DARK_HEAD + 2)]
    assert head == sorted(head)
    brain = sitk.GetArrayViewFromImage(mask) > 0
    assert set(np.unique(c[brain])) <= {CSF, GREY, WHITE} | set(range(DARK_HEAD + 3, len(NAMES)))
    assert not (c[~brain] >= DARK_HEAD + 3).any() and not np.isin(c[~brain], (CSF, GREY, WHITE)).any()
    values = {label.name: label.value for label in read_table(colin27)}
    putamen = np.isin(sitk.GetArrayViewFromImage(labels), [values["Putamen_L"], values["Putamen_R"]]) & brain
    assert putamen.sum() > 500 and (c[putamen] == NAMES.index("Putamen")).all()
    assert 5 < ml["Putamen"] < 25 and not (c == NAMES.index("Putamen"))[~putamen].any()
