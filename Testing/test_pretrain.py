"""lcs pretrain: the siamese proxy task's pairs, crops, mirroring, sample labels and loss, checked exactly; an
end-to-end run whose encoder lcs train can load; and load_encoder's refusals."""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.errors import LCSError
from LabelConditionedSegLib.labels import Label, LabelTable
from LabelConditionedSegLib.model import LCSNet, ModelConfig
from lcs_training.data import load_atlas, read_table
from lcs_training.pretrain import (FORMAT, HISTORY, LEFT, RIGHT, contrastive_loss, crop_cube, draw_sample,
                                   embedding_distance, find_pairs, left_right_axis, load_encoder, sample_crops,
                                   side_crop)

CONFIG = ModelConfig(base_channels=8, depth=3, norm="group")


@pytest.fixture(scope="module")
def atlas(colin27):
    return load_atlas(colin27, "colin27", 4.0, CONFIG.factor)


@pytest.fixture(scope="module")
def pretrained(colin27, tmp_path_factory) -> Path:
    """A few steps of lcs pretrain through the CLI, at 4 mm with 16-voxel crops, on Colin27 and an unlabelled scan
    (Colin27 at 5 mm, turned and moved a little)."""
    folder = tmp_path_factory.mktemp("pretrain")
    image = sitk.ReadImage(str(colin27 / "images/colin27.nii.gz"))
    size = [int(n * s / 5) for n, s in zip(image.GetSize(), image.GetSpacing())]
    (folder / "scans").mkdir()
    sitk.WriteImage(sitk.Resample(image, size, sitk.Euler3DTransform((0, 0, 0), 0.05, 0, 0, (3, -2, 1)),
                                  sitk.sitkLinear, image.GetOrigin(), (5, 5, 5), image.GetDirection()),
                    str(folder / "scans/scan1.nii.gz"))
    out = folder / "encoder.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these small convolutions run 4 times slower on 2 threads when another process holds a core
    try:
        assert main(["pretrain", str(colin27), "--atlas", "colin27", "-o", str(out), "--unlabelled", str(folder / "scans"),
                     "--spacing", "4", "--depth", "3", "--crop", "16", "--steps", "6", "--batch-size", "2",
                     "--validate-every", "3", "--device", "cpu", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _table(*names: str) -> LabelTable:
    return LabelTable(Label(v, name, (200, 100, 50)) for v, name in enumerate(names, start=1))


def test_pairs_are_the_atlas_labels_named_l_and_r(colin27, atlas):
    """Every AAL X_L with its X_R, left first; unpaired labels (the vermis) and labels off the grid are left out."""
    table = read_table(colin27)
    pairs = find_pairs(table, atlas.present)
    names = {label.name for label in table}
    expected = [n for n in names if n.endswith("_L") and n[:-2] + "_R" in names]
    assert sorted(p.left.name for p in pairs) == sorted(expected) and len(pairs) == 54
    assert all(p.right.name == p.left.name[:-2] + "_R" for p in pairs)
    assert not any("Vermis" in str(p) for p in pairs) and "Hippocampus_L:Hippocampus_R" in map(str, pairs)

    table = _table("Caudate_l", "CAUDATE_R", "Putamen_L", "Putamen_R", "Thalamus_L", "Brainstem")
    assert [str(p) for p in find_pairs(table, [1, 2, 3, 5, 6])] == ["Caudate_l:CAUDATE_R"]  # Putamen_R is off the grid


def test_explicit_pairs_and_their_errors(colin27, atlas):
    table = read_table(colin27)
    pairs = find_pairs(table, atlas.present, "Hippocampus_L:Hippocampus_R, amygdala_l : Amygdala_R")
    assert [(p.left.name, p.right.name) for p in pairs] == [("Hippocampus_L", "Hippocampus_R"), ("Amygdala_L", "Amygdala_R")]
    refused = {
        "Hippocampus_L": "--pairs item 'Hippocampus_L' is not LEFT:RIGHT; write e.g. --pairs Hippocampus_L:Hippocampus_R",
        "Hippocampus_L:Nowhere_R": "--pairs names 'Nowhere_R', which labels.csv does not list; use the names (or values) "
                                   "that labels.csv gives",
        "Hippocampus_L:hippocampus_l": "--pairs item 'Hippocampus_L:hippocampus_l' pairs a label with itself; give a "
                                       "structure and its counterpart",
    }
    for given, message in refused.items():
        with pytest.raises(LCSError) as error:
            find_pairs(table, atlas.present, given)
        assert str(error.value) == message
    hippocampus_r = table.resolve("Hippocampus_R").value
    with pytest.raises(LCSError, match=r"^--pairs names Hippocampus_R, which has no voxel on the atlas grid; leave it "
                                       r"out or use a finer --spacing$"):
        find_pairs(table, set(atlas.present) - {hippocampus_r}, "Hippocampus_L:Hippocampus_R")
    with pytest.raises(LCSError, match=r"^no paired labels: labels.csv names no two labels X_L and X_R .* --pairs LEFT:RIGHT"):
        find_pairs(_table("Brain", "Thalamus_L"), [1, 2])


def test_the_left_right_axis_comes_from_the_direction_matrix(atlas):
    """The array axis (z, y, x order) whose physical direction is most along x, whatever its sign or index axis."""
    assert left_right_axis((1, 0, 0, 0, 1, 0, 0, 0, 1)) == 2
    assert left_right_axis(atlas.image.GetDirection()) == 2  # Colin27: (-1, -1, 1), x flipped
    assert left_right_axis((0, -1, 0, 1, 0, 0, 0, 0, 1)) == 1  # index axis 1 runs along -x
    assert left_right_axis((0, 0, 1, 1, 0, 0, 0, 1, 0)) == 0  # index axis 2 (array axis 0) runs along x: sagittal slices
    assert left_right_axis((0.3, 0.95, 0, 0.95, -0.3, 0, 0, 0, 1)) == 1  # oblique: the nearest axis


def test_crops_are_centred_and_zero_padded_voxel_by_voxel():
    volume = np.arange(1, 10 * 12 * 14 + 1, dtype=np.float32).reshape(10, 12, 14)  # zero only where padded
    np.testing.assert_array_equal(crop_cube(volume, (5, 6, 7), 4), volume[4:8, 5:9, 6:10])  # centre between voxels 5, 6
    np.testing.assert_array_equal(crop_cube(volume, (5.4, 6.6, 7.0), 4), volume[4:8, 5:9, 6:10])  # nearest centre
    np.testing.assert_array_equal(crop_cube(volume, (5, 6, 7), 4, shift=(1, -2, 0)), volume[5:9, 3:7, 6:10])
    assert crop_cube(volume, (5, 6, 7), 3)[1, 1, 1] == volume[5, 6, 7]  # odd size: the centre voxel in the middle
    padded = crop_cube(volume, (0, 0, 13), 4)  # starts at (-1, -1, 12)
    for index in np.ndindex(padded.shape):
        source = np.add(index, (-1, -1, 12))
        inside = all(0 <= s < n for s, n in zip(source, volume.shape))
        assert padded[index] == (volume[tuple(source)] if inside else 0)
    assert not crop_cube(volume, (40, 6, 7), 4).any()  # entirely outside


def test_right_crops_are_mirrored_along_the_left_right_axis():
    rng = np.random.default_rng(3)
    volume = rng.random((10, 12, 14)).astype(np.float32)
    np.testing.assert_array_equal(side_crop(volume, (5, 6, 3), 4, LEFT, 2), crop_cube(volume, (5, 6, 3), 4))
    # the right crop at x = 3: the mirrored volume's crop at x = 13 - 3 = 10, i.e. volume columns 4, 3, 2, 1
    np.testing.assert_array_equal(side_crop(volume, (5, 6, 3), 4, RIGHT, 2), volume[4:8, 5:9, [4, 3, 2, 1]])
    # along z (10 voxels): the mirrored crop at z = 9 - 5 = 4, i.e. volume rows 6, 5, 4, 3
    np.testing.assert_array_equal(side_crop(volume, (5, 6, 3), 4, RIGHT, 0), volume[[6, 5, 4, 3], 5:9, 2:6])
    for axis in range(3):  # a structure and its mirror image in a symmetric volume give the same crop, voxel for voxel
        symmetric = volume + np.flip(volume, axis)
        left = np.array([5.3, 6.2, 3.4])
        right = left.copy()
        right[axis] = symmetric.shape[axis] - 1 - left[axis]
        for shift in ((0, 0, 0), (2, -1, 1)):
            np.testing.assert_array_equal(side_crop(symmetric, left, 6, LEFT, axis, shift),
                                          side_crop(symmetric, right, 6, RIGHT, axis, shift))
        assert not np.array_equal(crop_cube(symmetric, left, 6), crop_cube(symmetric, right, 6))  # unmirrored: differ


def test_sample_labels_are_one_exactly_when_the_sides_match_and_balanced():
    rng = np.random.default_rng(0)
    samples = [draw_sample(rng, pairs=5, scans=3, max_shift=2) for _ in range(4000)]
    assert all(s.same == int(s.sides[0] == s.sides[1]) for s in samples)
    assert 0.47 < np.mean([s.same for s in samples]) < 0.53
    assert 0.47 < np.mean([s.sides[0] == LEFT for s in samples]) < 0.53
    assert 0.47 < np.mean([s.sides[1] == LEFT for s in samples]) < 0.53
    assert all(s.scans[0] != s.scans[1] for s in samples)  # two scans whenever there are several
    assert {s.pair for s in samples} == set(range(5)) and {s.scans[0] for s in samples} == {0, 1, 2}
    assert all(-2 <= v <= 2 for s in samples for shift in s.shifts for v in shift)
    assert {s.scans for s in (draw_sample(rng, 5, 1, 2) for _ in range(20))} == {(0, 0)}

    volumes = [np.full((8, 8, 8), k, dtype=np.float32) + rng.random((8, 8, 8), dtype=np.float32) for k in range(3)]
    centers = [(np.array([3.0, 4.0, 2.0]), np.array([3.0, 4.0, 5.0]))] * 5
    for sample in samples[:20]:  # each branch: its scan, its side's centroid, mirrored when right, its shift
        for branch, crop in enumerate(sample_crops(sample, volumes, centers, 4, 2)):
            side = sample.sides[branch]
            np.testing.assert_array_equal(crop, side_crop(volumes[sample.scans[branch]], centers[sample.pair][side], 4,
                                                          side, 2, sample.shifts[branch]))


def test_contrastive_loss_at_known_distances():
    a = torch.zeros(3, 4)
    b = torch.tensor([[0.0, 0, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 2]])
    distance = embedding_distance(a, b)
    torch.testing.assert_close(distance, torch.tensor([0.0, 0.5, 2.0]))
    torch.testing.assert_close(contrastive_loss(distance, torch.ones(3)), torch.tensor([0.0, 0.25, 4.0]))  # d**2
    torch.testing.assert_close(contrastive_loss(distance, torch.zeros(3)), torch.tensor([1.0, 0.25, 0.0]))  # (1 - d)+**2


def test_pretrain_writes_an_encoder_that_an_lcs_net_loads(pretrained):
    raw = torch.load(pretrained, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and json.loads(raw["config"]) == CONFIG.to_dict()
    provenance = json.loads(raw["provenance"])
    assert provenance["scans"] == ["colin27", "scan1"] and provenance["steps"] == 6 and provenance["atlas"] == "colin27"
    assert "Hippocampus_L:Hippocampus_R" in provenance["pairs"] and 0 <= provenance["proxy_accuracy"] <= 1
    assert provenance["settings"]["crop"] == 16 and provenance["settings"]["lr"] == 1e-3

    rows = (pretrained.parent / "encoder_history.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == ",".join(HISTORY) and len(rows) == 7
    measured = [r.split(",")[0] for r in rows[1:] if r.split(",")[5]]
    assert measured == ["3", "6"]  # the validation pairs scored every 3 steps

    weights = load_encoder(pretrained, CONFIG)
    torch.manual_seed(0)  # the pretraining's seed: the same initial weights
    fresh = LCSNet(CONFIG)
    assert set(weights) == {k for k in fresh.state_dict() if k.startswith("down.")} and "down.0.0.weight" in weights
    assert all(not torch.equal(weights[k], fresh.state_dict()[k]) for k in weights if k.endswith("0.weight"))
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    assert not unexpected and not any(k.startswith("down.") for k in missing)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    assert fresh(torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1, 16, 16, 16)


def test_pretrain_refuses_an_existing_output_and_a_bad_crop(pretrained, colin27, capsys):
    common = [str(colin27), "--atlas", "colin27", "--spacing", "4", "--depth", "3", "--steps", "1", "--device", "cpu"]
    assert main(["pretrain", *common, "-o", str(pretrained), "--crop", "16"]) == 2
    assert capsys.readouterr().err == f"lcs: error: {pretrained} already exists; choose another -o or pass --overwrite\n"
    assert main(["pretrain", *common, "-o", str(pretrained.parent / "other.pt"), "--crop", "20"]) == 2
    assert capsys.readouterr().err == ("lcs: error: --crop 20 must be a multiple of 2**depth = 8 (--depth 3) and at "
                                       "least 16, so that the deepest features keep more than one voxel; use e.g. "
                                       "--crop 24\n")


@dataclass
class Harmless:
    note: str


class Planted:
    """An object whose unpickling would write a file: load_encoder must never run it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_load_encoder_refusals(pretrained, tmp_path):
    hint = "give the encoder.pt that 'lcs pretrain' wrote, or pretrain again"

    def refusal(path, config=CONFIG) -> str:
        with pytest.raises(LCSError) as error:
            load_encoder(path, config)
        assert "\n" not in str(error.value)
        return str(error.value)

    assert refusal(tmp_path / "none.pt") == f"encoder {tmp_path / 'none.pt'} does not exist; {hint}"

    planted = tmp_path / "planted.pt"
    torch.save({"format": FORMAT, "config": json.dumps(CONFIG.to_dict()), "weights": {"x": Planted(tmp_path / "ran")}},
               planted)
    assert refusal(planted).startswith(f"{planted} holds a pickled Python object (")
    assert refusal(planted).endswith(f"), which lcs does not load (it could run code); {hint}")
    assert not (tmp_path / "ran").exists()
    harmless = tmp_path / "harmless.pt"
    torch.save({"format": FORMAT, "note": Harmless("hello")}, harmless)
    assert refusal(harmless).startswith(f"{harmless} holds a pickled Python object (test_pretrain.Harmless)")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pretrained.read_bytes()[: pretrained.stat().st_size // 2])
    message = refusal(truncated)
    assert message.startswith(f"{truncated} is damaged, cut short or not a torch file (") and message.endswith(hint)
    text = tmp_path / "text.pt"
    text.write_text("not an encoder\n")
    assert refusal(text).startswith(f"{text} is damaged, cut short or not a torch file (")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "weights": {}}, other)
    assert refusal(other) == f"{other} is not an encoder of lcs pretrain (no '{FORMAT}' marker); {hint}"

    assert refusal(pretrained, ModelConfig(base_channels=8, depth=3, norm="batch")) == (
        f"{pretrained} was pretrained with --norm group; train with --norm group or pretrain with --norm batch")
    assert refusal(pretrained, ModelConfig(base_channels=8, depth=4, norm="group")) == (
        f"{pretrained} was pretrained with --depth 3; train with --depth 3 or pretrain with --depth 4")
    assert refusal(pretrained, ModelConfig(base_channels=16, depth=3, norm="group")) == (
        f"{pretrained} was pretrained with --base-channels 8; train with --base-channels 8 or pretrain with "
        "--base-channels 16")
    # the options that do not touch the encoder (decoder dropout, condition levels) may differ
    assert load_encoder(pretrained, ModelConfig(base_channels=8, depth=3, norm="group", dropout=0.1,
                                                condition_levels="all")).keys() == load_encoder(pretrained, CONFIG).keys()
