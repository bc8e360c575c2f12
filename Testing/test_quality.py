"""The plausibility check: a result whose label volumes are far from the atlas's is flagged where the user looks
(stderr, the summary line, the volumes CSV, a cohort's table), and a barely trained model says so when loaded; a
good result on a real head stays silent."""
from __future__ import annotations

import csv
import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.deformable import deformable_prior
from LabelConditionedSegLib.geometry import labels_to_input, with_margin
from LabelConditionedSegLib.model import LCSNet
from LabelConditionedSegLib.pipeline import Segmenter
from LabelConditionedSegLib.quality import PLAUSIBLE, alignment, flag, mirror_image, mirror_ratio, volume_scale
from lcs_training.contrasts import contrast_heads, contrast_subjects
from lcs_training.evaluate import VALIDATION_STREAMS

from conftest import contrast_subject, heldout_subject, mean_label_dice


def lcs(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def untrained(tiny, tmp_path_factory) -> Path:
    """The tiny model's atlas and settings with freshly initialized weights: what a run stopped after a few steps
    leaves (its validation Dice 0.02)."""
    torch.manual_seed(0)
    model = Checkpoint(tiny.config, LCSNet(tiny.config).state_dict(), tiny.atlas_image, tiny.atlas_labels,
                       tiny.atlas_mask, tiny.label_table, tiny.normalization,
                       {**tiny.provenance, "name": "barely trained", "validation_dice": 0.02})
    path = tmp_path_factory.mktemp("untrained") / "untrained.lcs"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def scans(colin27, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("quality_scans")
    sitk.WriteImage(heldout_subject(colin27, seed=71)[0], str(folder / "head.nrrd"))
    return folder


def test_a_barely_trained_model_says_so_and_its_implausible_volumes_are_flagged(untrained, scans, tmp_path):
    code, out, err = lcs("segment", scans / "head.nrrd", "-o", tmp_path / "x.seg.nrrd", "--checkpoint", untrained,
                         "--volumes-csv", tmp_path / "x.csv", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "barely trained reached validation Dice 0.02 only" in err
    assert "CHECK FAILED: 6 label volumes implausible" in out
    assert "lcs: warning: head.nrrd: 6 label volumes implausible" in err and "--overlay" in err
    table = rows(tmp_path / "x.csv")
    assert all(r["flag"].startswith("implausible volume:") for r in table)
    assert all(float(r["volume_ml"]) > PLAUSIBLE[1] * float(r["atlas_ml"]) for r in table)


@pytest.mark.slow  # 14 s: a cohort of two registered heads
def test_a_trained_model_on_a_head_is_silent_and_a_cohort_table_carries_the_flag(tiny_checkpoint, untrained, scans,
                                                                                 tmp_path):
    code, out, err = lcs("segment", scans / "head.nrrd", "-o", tmp_path / "good.seg.nrrd", "--checkpoint",
                         tiny_checkpoint, "--volumes-csv", tmp_path / "good.csv", "--device", "cpu", "--quiet")
    assert code == 0 and "CHECK" not in out and "warning" not in err, (out, err)
    table = rows(tmp_path / "good.csv")
    assert [r["flag"] for r in table] == [""] * 6
    ratios = [float(r["volume_ml"]) / float(r["atlas_ml"]) for r in table]
    assert all(0.5 < ratio < 2 for ratio in ratios), ratios
    code, out, err = lcs("segment", scans, "-o", tmp_path / "cohort", "--checkpoint", untrained, "--device", "cpu",
                         "--quiet")
    assert code == 0 and "CHECK FAILED" in out, (out, err)
    assert all(r["flag"] for r in rows(tmp_path / "cohort" / "volumes.csv"))


def test_volume_scale_is_the_registration_s_change_of_volume(tiny):
    grid = tiny.atlas_image
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([1.2, 0.1, 0, 0, 0.9, 0, 0, 0.2, 1.5])
    affine.SetCenter(grid.TransformContinuousIndexToPhysicalPoint([10, 10, 10]))
    affine.SetTranslation([4, -3, 7])
    assert volume_scale(affine, grid) == pytest.approx(1.2 * 0.9 * 1.5, rel=1e-6)
    assert volume_scale(sitk.Transform(), grid) == pytest.approx(1.0)
    assert flag(10, 10) == "" and flag(0, 10) == "" and flag(10 * PLAUSIBLE[1] * 1.01, 10).startswith("implausible")
    assert flag(5400, 10) == "implausible volume: 540x the atlas's" and flag(0.5, 10).endswith(": 0.05x the atlas's")


def test_alignment_is_high_for_the_atlas_itself_whatever_its_contrast_and_low_for_noise(tiny):
    atlas = sitk.GetArrayFromImage(tiny.atlas_image)
    brain = sitk.GetArrayFromImage(tiny.atlas_mask) > 0
    itself = alignment(atlas, atlas, brain)
    inverted = alignment(1 - atlas, atlas, brain)  # the same anatomy in another contrast
    noise = alignment(np.random.default_rng(0).random(atlas.shape).astype(np.float32), atlas, brain)
    assert itself == pytest.approx(inverted, abs=0.03) and inverted > 1.9  # bins split a little differently
    assert noise < 1.05


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])  # LPS, RAS axes
def test_the_atlas_mirror_image_is_reflected_left_to_right_about_its_brain_centre(direction):
    """x index i of the mirror image holds the atlas's 2c - i, c the brain's centre along x, whichever way the
    grid's axes point; beyond the grid it is 0."""
    image = np.random.default_rng(0).random((5, 6, 21)).astype(np.float32)
    brain = np.zeros(image.shape, np.uint8)
    brain[:, :, 4:15] = 1  # centre: x index 9
    atlas, mask = sitk.GetImageFromArray(image), sitk.GetImageFromArray(brain)
    for grid in (atlas, mask):
        grid.SetSpacing([2.0, 1.5, 3.0])
        grid.SetOrigin([30.0, -7.0, 12.0])
        grid.SetDirection(direction)
    mirrored = mirror_image(atlas, mask)
    np.testing.assert_allclose(mirrored[:, :, :19], image[:, :, 18::-1], atol=1e-5)
    assert not mirrored[:, :, 19:].any()


def test_the_mirror_ratio_tells_the_atlas_from_its_mirror_image_whatever_the_contrast(tiny):
    """Below 1 for the atlas itself, far above 1 for its mirror image, in its own contrast or inverted."""
    atlas = sitk.GetArrayFromImage(tiny.atlas_image)
    around = sitk.GetArrayFromImage(with_margin(tiny.atlas_mask)) > 0
    mirror = mirror_image(tiny.atlas_image, tiny.atlas_mask)
    assert mirror_ratio(atlas, atlas, mirror, around) < 0.5 and mirror_ratio(1 - atlas, atlas, mirror, around) < 0.5
    assert mirror_ratio(mirror, atlas, mirror, around) > 2 and mirror_ratio(1 - mirror, atlas, mirror, around) > 2


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.slow  # 25 s: four registrations and a deformable prior
def test_a_head_upside_down_or_mirrored_a_phantom_and_a_deformable_prior_gone_astray_are_flagged(tiny_checkpoint,
                                                                                                colin27, tmp_path):
    """The issue's deliberately failed cases, end to end: Colin27 turned upside down and mirrored left to right with
    --registration none, and a cylinder of noise (not a head). Then a deformable prior gone astray: the atlas warped
    onto the head moved 12 mm up, laid over the head where it is. (The issue's own case, Colin27 with its contrast
    inverted, no longer goes astray: its prior is painted in the scan's contrast and ignores the black around the
    head.)"""
    head = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    coarse = sitk.BinShrink(head, [2] * 3)  # turned at 2 mm: as plainly wrong, and quicker
    upside, mirrored = (sitk.GetImageFromArray(np.ascontiguousarray(flip(sitk.GetArrayFromImage(coarse))))
                        for flip in (lambda a: a[::-1], lambda a: a[:, :, ::-1]))
    upside.CopyInformation(coarse)
    mirrored.CopyInformation(coarse)
    zz, yy, _ = np.mgrid[:96, :96, :96]
    cylinder = ((zz - 48) ** 2 + (yy - 48) ** 2 < 32 ** 2) * 100.0 + np.random.default_rng(0).normal(0, 5, (96,) * 3)
    phantom = sitk.GetImageFromArray(cylinder.astype(np.float32))
    phantom.SetSpacing([2.0] * 3)
    failed = "the scan does not match the atlas after registration"
    for name, image, registration, words in (("upside", upside, "none", failed), ("phantom", phantom, "affine", failed),
                                             ("mirrored", mirrored, "none", "the scan matches the atlas's mirror image")):
        scan = write(image, tmp_path / f"{name}.nii.gz")
        code, out, err = lcs("segment", scan, "-o", tmp_path / f"{name}.seg.nrrd", "--checkpoint", tiny_checkpoint,
                             "--registration", registration, "--volumes-csv", tmp_path / f"{name}.csv", "--device",
                             "cpu", "--quiet")
        assert code == 0, err
        assert f"CHECK FAILED: {words}" in out and f"lcs: warning: {name}.nii.gz: {words}" in err, (name, out, err)
        assert all(r["flag"].startswith(words) for r in rows(tmp_path / f"{name}.csv"))
    segmenter = Segmenter(Checkpoint.load(tiny_checkpoint), "cpu")
    prepared = segmenter.prepare(coarse, "deformable")
    grid = segmenter.checkpoint.atlas_image
    shift = int(round(12 / grid.GetSpacing()[2]))
    atlas, brain = (sitk.GetArrayFromImage(i) for i in (grid, segmenter.checkpoint.atlas_mask))
    astray = deformable_prior(np.roll(prepared.model_image, shift, axis=0), atlas, grid, atlas_mask=brain > 0)
    assert prepared.check == "", prepared.match  # the prior fitted to this head is fine
    seen = segmenter.seen(coarse, prepared.transform)
    problem = segmenter.warped_match(prepared.match, prepared.model_image, seen, astray).problem()
    assert problem.startswith("the deformable prior matches the scan worse than the affine step"), problem


@pytest.mark.slow
def test_the_check_reads_any_contrast_and_flags_a_ball_of_noise_and_a_slab(colin27):
    """On the demo model's 2 mm atlas, where its thresholds were set. A PD head registered right reads as a head
    (mutual information inside the brain alone flagged it: 1.009 against the old limit 1.015); a ball of noise placed
    over the head matches its outline but has no edges where the atlas has them; a 12-slice slab holds a seventh of
    the brain."""
    segmenter = Segmenter(Checkpoint.load(default_checkpoint()), "cpu")
    head = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    zz, yy, xx = np.mgrid[:120, :120, :120]
    ball = (((zz - 60) ** 2 + (yy - 60) ** 2 + (xx - 60) ** 2 < 50 ** 2) * 100.0
            + np.random.default_rng(0).normal(0, 5, (120,) * 3))
    phantom = sitk.GetImageFromArray(ball.astype(np.float32))
    phantom.SetSpacing([1.5] * 3)
    depth = head.GetDepth()
    said = []
    pd = segmenter.prepare(contrast_subject(colin27, "pd")[0], progress=lambda fraction, message: said.append(message))
    assert pd.check == "", pd.match
    assert not any("farther poses" in message for message in said), said  # registered at the first try
    said.clear()
    ball = segmenter.prepare(phantom, progress=lambda fraction, message: said.append(message))
    assert ball.check.startswith("the scan does not match the atlas") and ball.match.edges < 0.09, ball.match
    assert "registration looks wrong: trying farther poses" in said  # tried again, and still flagged
    slab = segmenter.prepare(head[:, :, depth // 2 - 6: depth // 2 + 6])
    assert slab.check.startswith("the scan holds only 1") and "of the atlas's brain" in slab.check, slab.match


@pytest.mark.slow  # 30 s: a PD head registered twice on the demo model's 2 mm atlas
def test_a_registration_the_check_flags_is_tried_again_from_farther_poses(colin27):
    """A validation head of the unlike generator (PD, its field of view cut) fails the check after the first
    registration (affine propagation Dice 0.19, docs/results.md); the second search, shifts up to 20 mm, registers
    it and the check is silent."""
    checkpoint = Checkpoint.load(default_checkpoint())
    *_, (_, image, truth) = contrast_subjects(*contrast_heads(colin27, "colin27", ["pd"]), 3, 7,
                                              VALIDATION_STREAMS["unlike"])
    said = []
    prepared = Segmenter(checkpoint, "cpu").prepare(image, progress=lambda fraction, message: said.append(message))
    assert "registration looks wrong: trying farther poses" in said  # the first registration was flagged
    found = labels_to_input(checkpoint.atlas_labels, image, prepared.transform)
    assert mean_label_dice(sitk.GetArrayFromImage(found), sitk.GetArrayFromImage(truth)) > 0.6
    assert prepared.check == "", prepared.match


def test_a_head_mirrored_left_to_right_is_flagged_and_not_searched_again(tiny, scans):
    """A held-out head registers as well mirrored as it is (a registration cannot mirror), but then matches the
    atlas's mirror image better than the atlas: its left and right look swapped. A search from farther poses cannot
    mend that, so none is made."""
    head = sitk.ReadImage(str(scans / "head.nrrd"))
    mirror = sitk.AffineTransform(3)
    mirror.SetMatrix([-1.0, 0, 0, 0, 1, 0, 0, 0, 1])
    mirror.SetCenter(head.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in head.GetSize()]))
    segmenter, said = Segmenter(tiny, "cpu"), []
    as_it_is = segmenter.prepare(head)
    mirrored = segmenter.prepare(sitk.Resample(head, head, mirror, sitk.sitkLinear, 0.0),
                                 progress=lambda fraction, message: said.append(message))
    assert as_it_is.check == "" and as_it_is.match.mirror < 1 < mirrored.match.mirror, (as_it_is.match, mirrored.match)
    assert mirrored.check.startswith("the scan matches the atlas's mirror image better than the atlas"), mirrored.match
    assert "left and right look swapped" in mirrored.check and not mirrored.match.misregistered()
    assert not any("farther poses" in message for message in said), said


def test_the_check_reads_only_what_the_scan_shows(tiny, colin27):
    """A head registered right (Colin27 blurred, with other intensities and noise) whose field of view lost its top
    half reads as aligned as the whole head: coverage says what is missing, and the black slab does not pull the
    alignment below a head's (over the whole brain it did)."""
    segmenter = Segmenter(tiny, "cpu")
    head = sitk.SmoothingRecursiveGaussian(sitk.ReadImage(str(colin27 / "images/colin27.nii.gz")), 2.0)
    scan = np.sqrt(np.clip(sitk.GetArrayFromImage(head), 0, None)) + np.random.default_rng(0).normal(0, 1, head.GetSize()[::-1])
    images = []
    for keep in (1.0, 0.5):
        array = scan.copy()
        array[int(array.shape[0] * keep):] = 0
        images.append(sitk.GetImageFromArray(array.astype(np.float32)))
        images[-1].CopyInformation(head)
    whole, top_cut = (segmenter.prepare(image, "none") for image in images)
    assert whole.match.coverage > 0.99 and 0.5 < top_cut.match.coverage < 0.8, top_cut.match
    assert top_cut.match.alignment == pytest.approx(whole.match.alignment, abs=0.01), (whole.match, top_cut.match)
    assert top_cut.match.edges == pytest.approx(whole.match.edges, abs=0.01), (whole.match, top_cut.match)
    assert whole.check == top_cut.check == "", top_cut.match
    atlas = sitk.GetArrayFromImage(tiny.atlas_image)
    around = sitk.GetArrayFromImage(with_margin(tiny.atlas_mask)) > 0
    assert alignment(top_cut.model_image, atlas, around) < whole.match.alignment - 0.01  # what the slab did before
