"""The .lcs file: round trip, and refusal of anything that is not a checkpoint (never unpickling code)."""
import os
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.errors import LCSError


def test_round_trip_keeps_weights_atlas_geometry_labels_and_provenance(tiny, tmp_path):
    path = tmp_path / "copy.lcs"
    tiny.save(path)
    back = Checkpoint.load(path)
    assert back.config == tiny.config
    assert all(torch.equal(back.weights[k], tiny.weights[k]) for k in tiny.weights)
    for a, b in [(back.atlas_labels, tiny.atlas_labels), (back.atlas_mask, tiny.atlas_mask)]:
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert np.allclose(sitk.GetArrayFromImage(back.atlas_image), sitk.GetArrayFromImage(tiny.atlas_image), atol=1e-3)
    for attr in ("GetSpacing", "GetOrigin", "GetDirection", "GetSize"):
        assert np.allclose(getattr(back.atlas_image, attr)(), getattr(tiny.atlas_image, attr)())
    assert [(l.value, l.name, l.color) for l in back.label_table] == [(l.value, l.name, l.color) for l in tiny.label_table]
    assert back.provenance["iterations"] == 240
    assert 0 < back.provenance["validation_dice"] <= 1
    assert back.provenance["labels_trained"] == len(back.label_table) == 6


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_hostile_file_is_refused_without_running_its_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.lcs"
    payload = {"format": "label-conditioned-segmentation", "version": 1, "weights": RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(LCSError, match="not a valid LCS checkpoint"):
        Checkpoint.load(path)
    assert not marker.exists()


def test_truncated_random_and_foreign_files_get_clear_errors(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.lcs"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[: 50_000])
    noise = tmp_path / "noise.lcs"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path, message in [(truncated, "not a valid LCS checkpoint"), (noise, "not a valid LCS checkpoint"),
                          (foreign, "not an LCS checkpoint"), (tmp_path / "missing.lcs", "does not exist")]:
        with pytest.raises(LCSError, match=message):
            Checkpoint.load(path)


def test_damaged_weights_are_reported(tiny, tmp_path):
    tiny.save(tmp_path / "ok.lcs")
    data = torch.load(tmp_path / "ok.lcs", weights_only=True)
    data["weights"].pop(next(iter(data["weights"])))
    torch.save(data, tmp_path / "damaged.lcs")
    with pytest.raises(LCSError, match="damaged"):
        Checkpoint.load(tmp_path / "damaged.lcs")
