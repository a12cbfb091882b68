"""Tests of cellbg.saliency: known answers on hand-made models, maps and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from cellbg._checks import CellbgError
from cellbg.saliency import (
    METHODS,
    attribute,
    background_share,
    gradcam,
    integrated_gradients,
    occlusion,
    randomize_weights,
    rank_correlation,
)


# --------------------------------------------------------------------------- hand-made models
class GapLinear(nn.Module):
    """logit_k = w_k * mean(features), features = x (a 1x1 identity convolution).

    Grad-CAM on ``features`` for class 1 (w = +1) is exactly x / (H W); for class 0
    (w = -1) it is relu(-x / (H W)) = 0 for a non-negative image. The model is linear, so
    integrated gradients from a black baseline is exactly w_k * x / (H W).
    """

    def __init__(self, single_logit: bool = False):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        self.head = nn.Linear(1, 1 if single_logit else 2, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[1.0]]) if single_logit else torch.tensor([[-1.0], [1.0]]))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class TopLeftReader(nn.Module):
    """Class-1 logit 10 * mean(top-left 8x8 block) - 5; class-0 logit 0. Reads nothing else."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        z = self.scale * x[:, :, :8, :8].mean(dim=(1, 2, 3)) - 5.0
        return torch.stack([torch.zeros_like(z), z], dim=1)


class NoisyNet(nn.Module):
    """BatchNorm + Dropout: different answers in train mode, and batch-dependent ones."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            self.features[1].running_mean.copy_(torch.randn(4, generator=gen))
            self.features[1].running_var.fill_(2.0)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean(dim=(2, 3))))


def _images(n=3, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- background share
def test_background_share_uniform_map_matches_area():
    masks = np.zeros((16, 16), bool)
    masks[4:12, 4:12] = True  # 64 cell pixels, 192 background pixels
    bs = background_share(np.ones((16, 16)), masks)
    np.testing.assert_allclose(bs.share, [0.75])
    np.testing.assert_allclose(bs.background_fraction, [0.75])
    np.testing.assert_allclose(bs.ratio, [1.0])


def test_background_share_known_answers_batch():
    masks = np.zeros((4, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    maps = np.zeros((4, 16, 16))
    maps[0] = np.where(masks[0], 2.0, 1.0)  # 128 on cell, 192 on background
    maps[1] = np.where(masks[1], 1.0, -5.0)  # negative evidence does not count
    maps[2] = np.where(masks[2], 0.0, 3.0)  # only background
    maps[3, 0, 0] = 1.0
    maps[3, 8, 8] = 3.0  # one background pixel (1) and one cell pixel (3)
    bs = background_share(maps, masks)
    np.testing.assert_allclose(bs.share, [192 / 320, 0.0, 1.0, 0.25])
    np.testing.assert_allclose(bs.ratio, [0.8, 0.0, 4 / 3, 1 / 3])
    share, fraction, ratio = bs  # unpacks like a tuple
    np.testing.assert_allclose(fraction, 0.75)


def test_background_share_undefined_cases_are_nan():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:6, 2:6] = True
    masks[1] = True  # no background at all
    maps = np.stack([np.zeros((8, 8)), np.ones((8, 8))])
    bs = background_share(maps, masks)
    assert np.isnan(bs.share[0]) and np.isnan(bs.ratio[0])  # nothing positive to share
    assert bs.share[1] == 0.0 and bs.background_fraction[1] == 0.0 and np.isnan(bs.ratio[1])


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32])
def test_background_share_accepts_0_1_masks(dtype):
    masks = np.zeros((8, 8), dtype)
    masks[:4] = 1
    np.testing.assert_allclose(background_share(np.ones((8, 8)), masks).share, [0.5])


def test_background_share_rejects_bad_input():
    with pytest.raises(CellbgError, match="does not match maps shape"):
        background_share(np.ones((2, 8, 8)), np.ones((2, 8, 7), bool))
    with pytest.raises(CellbgError, match="masks must be boolean"):
        background_share(np.ones((8, 8)), np.full((8, 8), 2))
    with pytest.raises(CellbgError, match="NaN or infinite"):
        background_share(np.full((8, 8), np.nan), np.ones((8, 8), bool))
    with pytest.raises(CellbgError, match="maps must be 2-D or 3-D"):
        background_share(np.ones(8), np.ones(8, bool))


# --------------------------------------------------------------------------- rank correlation
def test_rank_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 6, 6))
    b = a + rng.normal(scale=1.0, size=a.shape)
    b[:, 0, :3] = b[:, 0, 3:]  # ties
    expected = [sps.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(rank_correlation(a, b), expected)


def test_rank_correlation_constant_map_is_nan():
    a = np.zeros((1, 4, 4))
    assert np.isnan(rank_correlation(a, np.arange(16.0).reshape(1, 4, 4))[0])


# --------------------------------------------------------------------------- methods: known answers
def test_gradcam_known_answer():
    x = _images()
    model = GapLinear()
    maps1 = gradcam(model, x, [1, 1, 1], layer="features")
    np.testing.assert_allclose(maps1, x[:, 0].numpy() / 256, rtol=1e-5, atol=1e-8)
    maps0 = gradcam(model, x, [0, 0, 0], layer="features")
    np.testing.assert_array_equal(maps0, 0.0)
    # Mixed targets in one batch are each explained for their own class.
    mixed = gradcam(model, x, [1, 0, 1], layer="features")
    np.testing.assert_allclose(mixed, np.stack([maps1[0], maps0[1], maps1[2]]), atol=1e-8)


def test_integrated_gradients_known_answer_on_linear_model():
    x = _images()
    maps = integrated_gradients(GapLinear(), x, np.array([1, 0, 1]), steps=4)
    expected = x[:, 0].numpy() / 256 * np.array([1, -1, 1])[:, None, None]
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-7)


def test_integrated_gradients_completeness_on_nonlinear_model():
    model = NoisyNet().eval()
    x = _images(n=2)
    maps = integrated_gradients(model, x, [0, 1], steps=32)
    with torch.no_grad():
        gap = model(x) - model(torch.zeros_like(x))
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), [gap[0, 0], gap[1, 1]], rtol=0.02, atol=1e-3)


def test_occlusion_known_answer():
    x = torch.full((2, 1, 16, 16), 0.8)
    maps = occlusion(TopLeftReader(), x, [1, 0], window=8, overlap=0.0, fill=0.0)
    p_intact = 1 / (1 + np.exp(-(10 * 0.8 - 5)))
    p_occluded = 1 / (1 + np.exp(5.0))
    expected = np.zeros((16, 16))
    expected[:8, :8] = p_intact - p_occluded
    np.testing.assert_allclose(maps[0], expected, atol=1e-6)
    np.testing.assert_allclose(maps[1], -expected, atol=1e-6)  # class 0 loses what class 1 gains


def test_single_logit_binary_model():
    x = _images()
    single, double = GapLinear(single_logit=True), GapLinear()
    # [-z/2, z/2]: class 1 is explained by +z/2, class 0 by -z/2.
    ig1 = integrated_gradients(single, x, [1, 1, 1], steps=4)
    ig0 = integrated_gradients(single, x, [0, 0, 0], steps=4)
    np.testing.assert_allclose(ig1, integrated_gradients(double, x, [1, 1, 1], steps=4) / 2, rtol=1e-4)
    np.testing.assert_allclose(ig0, -ig1, rtol=1e-5)
    np.testing.assert_allclose(gradcam(single, x, [1, 1, 1], layer="features"), x[:, 0].numpy() / 512, rtol=1e-5)
    occ = occlusion(single, x, [1, 0, 1], window=8)
    assert occ.shape == (3, 16, 16) and np.all(occ[[0, 2]] >= 0) and np.all(occ[1] <= 0)


@pytest.mark.parametrize("method", METHODS)
def test_eval_mode_and_model_untouched(method):
    model = NoisyNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(n=4)
    options = {"layer": "features"} if method == "gradcam" else {}
    a = attribute(model, x, [0, 1, 0, 1], method=method, **options)
    b = attribute(model, x, [0, 1, 0, 1], method=method, **options)
    alone = attribute(model, x[:1], [0], method=method, **options)
    np.testing.assert_array_equal(a, b)  # no dropout
    np.testing.assert_allclose(alone[0], a[0], rtol=1e-4, atol=1e-7)  # BN uses running stats, not the batch
    assert np.abs(a).max() > 0
    assert model.training  # the caller's model keeps its mode ...
    for k, v in model.state_dict().items():  # ... and its weights and running statistics
        assert torch.equal(v, before[k]), k


def test_wrong_layer_lists_valid_names():
    with pytest.raises(CellbgError, match=r"did you mean 'features'.*valid layers: features, head"):
        gradcam(GapLinear(), _images(), [1, 1, 1], layer="featurs")
    with pytest.raises(CellbgError, match="needs a layer with an \\(n, C, h, w\\) feature map; layer 'head'"):
        gradcam(GapLinear(), _images(), [1, 1, 1], layer="head")


@pytest.mark.parametrize("method", METHODS)
def test_targets_are_required_and_checked(method):
    model, x = GapLinear(), _images()
    options = {"layer": "features"} if method == "gradcam" else {}
    with pytest.raises(CellbgError, match="targets must be given explicitly"):
        attribute(model, x, None, method=method, **options)
    with pytest.raises(CellbgError, match=r"class indices in \[0, 1\]"):
        attribute(model, x, [0, 2, 1], method=method, **options)
    with pytest.raises(CellbgError, match=r"shape \(3,\)"):
        attribute(model, x, [0, 1], method=method, **options)


def test_bad_options():
    with pytest.raises(CellbgError, match="unknown saliency method 'gradcan'"):
        attribute(GapLinear(), _images(), [1, 1, 1], method="gradcan")
    with pytest.raises(CellbgError, match="larger than the crop"):
        occlusion(GapLinear(), _images(), [1, 1, 1], window=32)
    with pytest.raises(CellbgError, match="images must be 4-D"):
        integrated_gradients(GapLinear(), np.zeros((16, 16)), [1])


def test_default_layer_from_model_registry():
    from cellbg.models import get_model

    net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    maps = gradcam(net, _images(n=2), [0, 1])
    assert maps.shape == (2, 16, 16) and maps.min() >= 0


# --------------------------------------------------------------------------- sanity check
def test_randomize_weights_is_seeded_and_leaves_original():
    model = NoisyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b, c = randomize_weights(model, seed=3), randomize_weights(model, seed=3), randomize_weights(model, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
        assert torch.equal(model.state_dict()[k], before[k]), k
    assert not torch.equal(a.head.weight, c.head.weight)
    assert not torch.equal(a.head.weight, model.head.weight)
    assert torch.equal(a.features[1].running_mean, torch.zeros(4))  # norm layers reset to identity
    assert torch.equal(a.features[1].weight.detach(), torch.ones(4))


def test_sanity_check_flags_maps_that_ignore_the_weights():
    # For GapLinear the integrated-gradients map is +-image / (H W) whatever the weights are:
    # the check must report |rank correlation| = 1 with a re-randomised copy (the map says
    # nothing about what was learned), while a model reading only the top-left block
    # does not keep its map under re-randomisation of a learned, structured layer.
    x = _images(n=4)
    trained = integrated_gradients(GapLinear(), x, [1] * 4, steps=4)
    rnd = integrated_gradients(randomize_weights(GapLinear(), seed=0), x, [1] * 4, steps=4)
    np.testing.assert_allclose(np.abs(rank_correlation(trained, rnd)), 1.0)

    local = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(256, 2))
    with torch.no_grad():
        local[0].weight.zero_()
        local[0].weight[0, 0, 1, 1] = 1.0
        local[2].weight.zero_()
        local[2].weight[1].view(16, 16)[:8, :8] = 1.0  # class 1 reads only the top-left block
        local[2].bias.zero_()
    trained = integrated_gradients(local, x, [1] * 4, steps=4)
    assert np.all(trained.reshape(4, 16, 16)[:, 8:, :] == 0)
    rnd = integrated_gradients(randomize_weights(local, seed=0), x, [1] * 4, steps=4)
    assert np.all(rank_correlation(trained, rnd) < 0.5)
