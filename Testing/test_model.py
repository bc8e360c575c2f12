"""The network: shapes, the encode/decode split, and labels decoded in a batch equal to one at a time."""
import numpy as np
import pytest
import torch
from torch import nn

from LabelConditionedSegLib.model import LCSNet, ModelConfig


@pytest.mark.parametrize("levels", ["bottleneck", "all"])
def test_shapes_and_single_channel_output(levels):
    model = LCSNet(ModelConfig(base_channels=4, depth=4, condition_levels=levels)).eval()
    x = torch.randn(1, 1, 32, 48, 32)
    features = model.encode(x)
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 64]
    assert [tuple(f.shape[2:]) for f in features][-1] == (2, 3, 2)  # bottleneck at 1/16
    mask = (torch.rand(1, 1, 32, 48, 32) > 0.8).float()
    y = model.decode(features, torch.randn(1, 1, 32, 48, 32), mask)
    assert y.shape == (1, 1, 32, 48, 32)


def test_decoding_k_labels_in_a_batch_equals_k_single_decodes():
    torch.manual_seed(0)
    model = LCSNet(ModelConfig(base_channels=4, depth=3, norm="batch")).eval()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 24, 32, 24)
    atlas = torch.randn(1, 1, 24, 32, 24)
    masks = torch.zeros(5, 1, 24, 32, 24)
    for k in range(5):  # distinct regions, as atlas labels are
        masks[k, 0, 4 * k:4 * k + 6, 2 * k:2 * k + 10, 3:3 + 4 * k + 4] = 1
    with torch.no_grad():
        features = model.encode(x)
        batched = model.decode([f.expand(5, -1, -1, -1, -1) for f in features], atlas.expand(5, -1, -1, -1, -1), masks)
        single = torch.cat([model.decode(features, atlas, masks[k:k + 1]) for k in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(single[0], single[1])  # the condition really changes the output


def test_forward_is_encode_then_decode():
    model = LCSNet(ModelConfig(base_channels=4, depth=2)).eval()
    x, atlas, mask = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16), (torch.rand(1, 1, 16, 16, 16) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(model(x, atlas, mask), model.decode(model.encode(x), atlas, mask))


def test_small_labels_survive_pooling_to_the_bottleneck():
    model = LCSNet(ModelConfig(base_channels=2, depth=4))
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[0, 0, 17, 5, 9] = 1  # a one-voxel label
    pyramid = model._atlas_pyramid(torch.zeros_like(mask), mask)
    assert pyramid[-1][:, 1].sum() == 1


def test_config_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(norm="layer")


def test_the_multichannel_baseline_has_k_outputs_and_no_atlas_input():
    config = ModelConfig(depth=3, baseline_labels=5, condition_levels="all")
    model = LCSNet(config).eval()
    image = torch.randn(2, 1, 32, 24, 16)
    assert model(image).shape == (2, 5, 32, 24, 16)
    lcs = LCSNet(ModelConfig(depth=3, condition_levels="all"))
    assert model.bottleneck[0].in_channels == lcs.bottleneck[0].in_channels - 2  # no atlas image and mask
    assert all(b[0].in_channels == l[0].in_channels - 2 for b, l in zip(model.up, lcs.up))
    assert not config.conditioned and ModelConfig().conditioned


def test_with_a_prior_weight_an_untrained_network_outputs_its_prior_and_learns_what_to_change():
    """prior_weight w: the logits start as w * (2 * mask - 1) exactly (the last convolution starts at zero), so the
    thresholded output is the atlas prior; every weight still receives a gradient, w included."""
    model = LCSNet(ModelConfig(base_channels=4, depth=3, condition_levels="all", prior_weight=6.0)).train()
    x, atlas = torch.randn(1, 1, 16, 24, 16), torch.randn(1, 1, 16, 24, 16)
    mask = (torch.rand(1, 1, 16, 24, 16) > 0.7).float()
    logits = model(x, atlas, mask)
    assert torch.equal(logits, 6.0 * (2 * mask - 1))
    (logits.sigmoid() * torch.rand_like(logits)).sum().backward()
    assert model.prior_weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert not hasattr(LCSNet(ModelConfig(base_channels=4, depth=3)), "prior_weight")  # the paper's network: none
    with pytest.raises(ValueError):
        ModelConfig(prior_weight=-1.0)
    with pytest.raises(ValueError):
        ModelConfig(prior_radius=0)


def test_a_graded_prior_is_the_chessboard_distance_to_the_boundary_capped_at_its_radius():
    """prior_radius r: the logits start as w / r times the signed chessboard distance to the other side of the mask's
    boundary (+1 on its boundary voxels, -1 just outside, capped at +-r), checked against a brute-force distance
    (the erosions run one axis at a time); thresholded, it is still the mask."""
    mask = np.zeros((12, 16, 16), bool)
    mask[2:10, 3:13, 2:8] = True
    mask[5:7, 6:8, 8:14] = True  # a thin arm
    mask[0:3, 0:4, 12:16] = True  # a corner on the grid's edge: beyond the grid is neither inside nor outside
    points = np.argwhere(np.ones_like(mask))
    distance = np.abs(points[:, None] - points[None]).max(-1)  # chessboard, every pair of voxels
    other = mask.ravel()[:, None] != mask.ravel()[None]
    nearest = np.where(other, distance, 99).min(1).reshape(mask.shape)
    expected = 6.0 / 4 * np.where(mask, 1, -1) * np.minimum(nearest, 4)
    model = LCSNet(ModelConfig(base_channels=4, depth=2, condition_levels="all", prior_weight=6.0, prior_radius=4))
    tensor = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    logits = model(torch.randn_like(tensor), torch.randn_like(tensor), tensor)[0, 0].detach().numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert np.array_equal(logits > 0, mask)


def test_inference_on_the_cpu_takes_onednn_for_every_convolution_with_the_same_logits(monkeypatch):
    """model.Conv3d sends one volume with few channels to oneDNN at inference (PyTorch's own choice there is its
    reference kernel, several times slower): the logits are those of the reference path, and training (gradients on)
    keeps PyTorch's choice."""
    torch.manual_seed(0)
    model = LCSNet(ModelConfig(base_channels=8, depth=3, condition_levels="all", prior_weight=6.0, prior_radius=4)).eval()
    nn.init.normal_(model.head.weight)  # a head that is not zero: the convolutions show in the logits
    image, atlas = torch.rand(2, 1, 1, 24, 32, 16)
    mask = (torch.rand(1, 1, 24, 32, 16) > 0.5).float()
    with torch.no_grad(), torch.profiler.profile() as profile:
        fast = model(image, atlas, mask)
    assert any(e.key == "aten::mkldnn_convolution" for e in profile.key_averages())
    assert not any(e.key == "aten::slow_conv3d_forward" for e in profile.key_averages())
    with torch.profiler.profile() as profile:
        model(image, atlas, mask).sum().backward()
    assert any(e.key == "aten::slow_conv3d_forward" for e in profile.key_averages())  # PyTorch's own choice
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    with torch.no_grad():
        reference = model(image, atlas, mask)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
