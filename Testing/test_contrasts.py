"""Tissue classes of the real Colin27 head, the contrasts painted from them, and the prior that registers any of them."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lcs_training.data import read_table
from lcs_training.synth import SubjectGenerator, paint
from lcs_training.tissues import BACKGROUND, CSF, DARK_HEAD, GREY, NAMES, WHITE, tissue_classes


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


def test_paint_gives_each_tissue_class_a_random_intensity_seeded_by_the_generator(colin27_2mm):
    classes = sitk.GetArrayFromImage(colin27_2mm[3])
    first, again = paint(classes, np.random.default_rng(3)), paint(classes, np.random.default_rng(3))
    assert np.array_equal(first, again) and first.shape == classes.shape
    means = [[float(p[classes == k].mean()) for k in (CSF, GREY, WHITE)]
             for p in (paint(classes, np.random.default_rng(seed)) for seed in range(8))]
    assert len({tuple(np.argsort(m)) for m in means}) >= 3  # the tissues' order changes: not one contrast
    assert float(first[classes == BACKGROUND].mean()) < 0.06  # the background stays dark


def test_a_subject_of_random_contrast_keeps_the_anatomy_and_labels_of_the_same_draw(colin27_2mm):
    image, labels, mask, classes = colin27_2mm
    generator = SubjectGenerator(image, labels, mask, classes)
    plain, plain_labels = generator.sample(np.random.default_rng(11), skull_strip_probability=0, fov_cut_probability=0)
    painted, painted_labels = generator.sample(np.random.default_rng(11), skull_strip_probability=0,
                                               fov_cut_probability=0, contrast_probability=1.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(plain_labels), sitk.GetArrayViewFromImage(painted_labels))
    a, b = sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(painted)
    head = a > 0.05 * a.max()
    assert (b[head] > 0).mean() > 0.99 and abs(np.corrcoef(a[head], b[head])[0, 1]) < 0.9  # same head, other contrast
    unpainted = SubjectGenerator(image, labels, mask).sample(np.random.default_rng(11), skull_strip_probability=0,
                                                             fov_cut_probability=0, contrast_probability=1.0)[0]
    assert np.array_equal(sitk.GetArrayViewFromImage(unpainted), a)  # no classes: the head's own contrast, same stream
