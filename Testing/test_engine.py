"""The inference engine: region-restricted decoding, streaming combination, batching, devices, cancel."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint, default_checkpoint
from LabelConditionedSegLib.engine import MARGIN, Condition, Engine, resolve_device
from LabelConditionedSegLib.errors import Cancelled, LCSError
from LabelConditionedSegLib.pipeline import Segmenter, model_input

from conftest import dice, heldout_subject


@pytest.fixture(scope="module")
def prepared(tiny, colin27):
    segmenter = Segmenter(tiny, "cpu")
    image, truth = heldout_subject(colin27, seed=11, grid="atlas")
    return segmenter, segmenter.prepare(image, "none")  # the decoding is under test here, not the registration


def engine(tiny, **options) -> Engine:
    return Engine(tiny.build_model(), sitk.GetArrayFromImage(tiny.atlas_image), "cpu", **options)


def conditions(segmenter):
    return segmenter.conditions([l.name for l in segmenter.checkpoint.label_table])


def test_decoding_around_each_label_matches_decoding_the_whole_grid(tiny, prepared):
    segmenter, volume = prepared
    cropped, whole = engine(tiny, margin=16), engine(tiny, margin=10_000)
    conds = conditions(segmenter)
    assert cropped._box(conds[0], volume.model_image.shape)[1] != volume.model_image.shape  # the crop is really smaller
    a = cropped.segment(cropped.encode(volume.model_image), conds).labels
    b = whole.segment(whole.encode(volume.model_image), conds).labels
    for c in conds:
        assert dice(a == c.value, b == c.value) > 0.97, c.name


def test_a_model_with_an_atlas_prior_is_decoded_within_its_radius_around_each_label(colin27_2mm):
    """The demo model (prior_weight 6, prior_radius 4) decodes each label's box grown by 4 voxels, not MARGIN: beyond
    the radius its prior is a sure "no". The label maps agree but for a few voxels per label (where the smaller box
    cuts the decoder's context), at a fraction of the decoded voxels. Colin27 scaled by 1.05 and shifted by 3 mm,
    left unregistered: the labels lie off the atlas's."""
    demo = Checkpoint.load(default_checkpoint())
    moved = sitk.AffineTransform(3)
    moved.SetMatrix((np.eye(3) * 1.05).ravel().tolist())
    moved.SetTranslation((3.0, -3.0, 3.0))
    volume = model_input(demo, colin27_2mm[0], moved)
    segmenter = Segmenter(demo, "cpu")
    near = segmenter.engine  # what lcs segment decodes with
    wide = Engine(demo.build_model(), sitk.GetArrayFromImage(demo.atlas_image), "cpu", margin=MARGIN)
    assert near.margin == 4
    conds = segmenter.conditions(["Hippocampus_L", "Thalamus_R", "Precentral_L", "Cerebelum_6_R", "Caudate_L",
                                  "Vermis_3"])
    decoded_voxels = [sum(np.prod(e._box(c, volume.shape)[1]) for c in conds) for e in (near, wide)]
    assert decoded_voxels[0] < 0.6 * decoded_voxels[1], decoded_voxels
    a, b = (e.segment(e.encode(volume), conds).labels for e in (near, wide))
    for c in conds:
        assert (a == c.value).sum() > 100 and np.sum((a == c.value) != (b == c.value)) <= 20, c.name


def test_streaming_combination_equals_argmax_of_all_probability_maps(tiny, prepared):
    segmenter, volume = prepared
    engine = segmenter.engine
    conds = conditions(segmenter)
    maps = []
    decoded = engine.segment(volume.encoded, conds, threshold=0.5, on_probability=lambda c, p: maps.append((c.value, p)))
    labels = decoded.labels
    values = np.array([v for v, _ in maps])
    stack = np.stack([p for _, p in maps])
    expected = np.where(stack.max(0) >= 0.5, values[stack.argmax(0)], 0)
    assert np.array_equal(labels, expected)
    assert set(np.unique(labels)) - {0} <= set(values.tolist())
    for (value, p), box in zip(maps, decoded.masks):  # each condition's own mask: its probability alone decides
        own = np.zeros(p.shape, bool)
        if box is not None:
            own[box.region] = box.mask
        assert np.array_equal(own, p >= 0.5), value
        assert not (labels == value)[~own].any()  # the label map gives a voxel only to a condition that reaches it


def test_batches_sized_by_memory_give_the_same_result(tiny, prepared):
    segmenter, volume = prepared
    small, large = engine(tiny, memory_budget_mb=0.001), engine(tiny, memory_budget_mb=10_000)
    conds = conditions(segmenter)
    shape = volume.model_image.shape
    assert len(list(small._batches(conds, shape))) == len(conds)
    assert len(list(large._batches(conds, shape))) < len(conds)
    a = small.segment(small.encode(volume.model_image), conds)
    b = large.segment(large.encode(volume.model_image), conds)
    assert np.array_equal(a.labels, b.labels)
    assert all(np.array_equal(x.mask, y.mask) and x.offset == y.offset for x, y in zip(a.masks, b.masks))


def test_threshold_leaves_uncertain_voxels_as_background(prepared):
    segmenter, volume = prepared
    conds = conditions(segmenter)
    loose = segmenter.engine.segment(volume.encoded, conds, threshold=0.1).labels
    strict = segmenter.engine.segment(volume.encoded, conds, threshold=0.9).labels
    assert (strict > 0).sum() < (loose > 0).sum()


def test_progress_reaches_one_and_cancel_stops(prepared):
    segmenter, volume = prepared
    seen = []
    segmenter.engine.segment(volume.encoded, conditions(segmenter), progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0
    with pytest.raises(Cancelled):
        segmenter.engine.segment(volume.encoded, conditions(segmenter), cancel=lambda: True)


def test_union_and_painted_conditions(tiny, prepared):
    segmenter, volume = prepared
    union = segmenter.conditions(["Frontal_Sup_L+Frontal_Sup_R"])[0]
    atlas_labels = sitk.GetArrayFromImage(tiny.atlas_labels)
    assert np.array_equal(union.within((0, 0, 0), atlas_labels.shape), np.isin(atlas_labels, [3, 4]))
    assert union.mask.size < atlas_labels.size / 4  # stored cropped to its bounding box
    painted = sitk.Cast(tiny.atlas_labels == 3, sitk.sitkUInt8)
    condition = segmenter.conditions([], [("my region", painted)])[0]
    assert condition.name == "my region" and condition.value > max(tiny.label_table.values)
    with pytest.raises(LCSError, match="not in the atlas"):
        segmenter.conditions(["Hippocampus_XYZ"])


def test_devices():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(LCSError, match="not known"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LCSError, match="no CUDA"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(LCSError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
