"""The brain mask of a training case without masks/ (issue 29): estimated from its image, never from its labels."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LabelConditionedSegLib.geometry import register, to_input_grid
from LabelConditionedSegLib.labels import LabelTable
from lcs_training.data import check_training_folder, load_atlas, load_cases, mask_from_image, write_merged
from LabelConditionedSegLib.training_folder import write_case

from conftest import dice, heldout_subject

FEW = ["Hippocampus_L", "Hippocampus_R", "Thalamus_L", "Thalamus_R"]
BRAIN_ML = (1500, 2100)  # Colin27's brain mask (ch2bet) holds 1737 mL


def volume_ml(mask: sitk.Image) -> float:
    return np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * np.prod(mask.GetSpacing()) / 1000


@pytest.fixture(scope="module")
def few_labels(colin27, tmp_path_factory) -> Path:
    """Colin27 with only the hippocampi and thalami labelled (38 mL), and no masks/, plus an unlabelled scan."""
    folder = tmp_path_factory.mktemp("few")
    table = LabelTable.read_csv(colin27 / "labels.csv")
    values = [table.resolve(name).value for name in FEW]
    labels = sitk.ReadImage(str(colin27 / "labels/colin27.nii.gz"))
    kept = sitk.GetImageFromArray(np.where(np.isin(sitk.GetArrayFromImage(labels), values),
                                           sitk.GetArrayFromImage(labels), 0).astype(np.int16))
    kept.CopyInformation(labels)
    write_case(folder, "colin27", sitk.ReadImage(str(colin27 / "images/colin27.nii.gz")), kept)
    scan, _ = heldout_subject(colin27, 5)
    empty = sitk.Image(scan.GetSize(), sitk.sitkInt16)
    empty.CopyInformation(scan)
    write_case(folder, "unlabelled", scan, empty, annotated=[])
    shutil.copy(colin27 / "labels.csv", folder / "labels.csv")
    return folder


@pytest.fixture(scope="module")
def atlas(few_labels):
    return load_atlas(few_labels, "colin27", 4.0, 8)


def test_a_few_labels_without_masks_give_an_atlas_brain_mask_that_registers(colin27, atlas):
    truth = load_atlas(colin27, "colin27", 4.0, 8).mask  # masks/ as shipped: read, not estimated
    assert BRAIN_ML[0] < volume_ml(atlas.mask) < BRAIN_ML[1]  # the labels' hull held 38 mL
    assert dice(sitk.GetArrayFromImage(atlas.mask) > 0, sitk.GetArrayFromImage(truth) > 0) > 0.9
    assert volume_ml(truth) == pytest.approx(1737, abs=5)
    # affine propagation of the four labels onto a held-out subject, the atlas mask as the fixed mask
    image, labels = heldout_subject(colin27, 1)
    propagated = sitk.GetArrayFromImage(to_input_grid(atlas.labels, image, register(image, atlas.image, "affine",
                                                                                   fixed_mask=atlas.mask)))
    expected = sitk.GetArrayFromImage(labels)
    scores = [dice(propagated == v, expected == v) for v in atlas.present]
    assert len(scores) == 4 and np.mean(scores) > 0.6  # 0.10 with the hull as the atlas mask


def test_every_case_without_a_mask_file_gets_its_brain_from_its_image(few_labels, atlas):
    unlabelled = next(case for case in load_cases(few_labels, atlas) if case.name == "unlabelled")
    assert unlabelled.unlabelled and BRAIN_ML[0] < volume_ml(unlabelled.mask) < BRAIN_ML[1]
    inside = sitk.GetArrayFromImage(atlas.mask) > 0
    assert dice(sitk.GetArrayFromImage(unlabelled.mask) > 0, inside) > 0.85  # registered onto the atlas's brain


def test_a_merged_copy_of_a_folder_without_masks_estimates_them_too(few_labels, tmp_path):
    """Labels merged into coarse groups: no mask is written for a case without one (the unlabelled case's labels
    gave an empty mask, which the copy then refused)."""
    merged = write_merged(few_labels, tmp_path / "merged", {"Hippocampi": ["Hippocampus_L", "Hippocampus_R"]})
    assert not (merged / "masks").exists()
    assert sorted(check_training_folder(merged, "colin27")) == ["colin27", "unlabelled"]


@pytest.mark.parametrize("kind", ["skull-stripped", "noisy background"])
def test_the_brain_is_found_in_skull_stripped_scans_and_in_noise(colin27, kind):
    image = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(colin27 / "masks/colin27.nii.gz"))) > 0
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if kind == "skull-stripped":
        array = array * truth
    else:  # magnitude of complex Gaussian noise at 8 % of the brightest tissue, as a scanner's background shows it
        rng, sigma = np.random.default_rng(0), 0.08 * np.percentile(array, 99)
        array = np.abs(array + rng.normal(0, sigma, array.shape) + 1j * rng.normal(0, sigma, array.shape))
    scan = sitk.GetImageFromArray(array.astype(np.float32))
    scan.CopyInformation(image)
    mask = mask_from_image(scan)
    assert mask.GetSize() == scan.GetSize() and BRAIN_ML[0] < volume_ml(mask) < BRAIN_ML[1]
    assert dice(sitk.GetArrayFromImage(mask) > 0, truth) > 0.9
