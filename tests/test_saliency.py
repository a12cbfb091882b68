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
    background_colour,
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
    expected = [sps.spearmanr(x.ravel(), y.ravel()).statistic for x, y in zip(a, b, strict=True)]
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


def test_occlusion_with_a_colour_fill():
    # Two channels; the reader averages both. Filling with (0.2, 0.6) gives a block mean of 0.4.
    x = torch.full((1, 2, 16, 16), 0.8)
    maps = occlusion(TopLeftReader(), x, [1], window=8, fill=[0.2, 0.6])
    expected = 1 / (1 + np.exp(-(10 * 0.8 - 5))) - 1 / (1 + np.exp(-(10 * 0.4 - 5)))
    np.testing.assert_allclose(maps[0, :8, :8], expected, atol=1e-6)
    np.testing.assert_allclose(maps[0, 8:], 0.0, atol=1e-7)


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


# --------------------------------------------------------------------------- whole runs
def _protocol(tmp_path, text: str):
    from cellbg.protocol import parse_protocol, write_resolved

    p = parse_protocol(text, base_dir=tmp_path)
    write_resolved(p)
    return p


def _build_run(p):
    """data -> masks -> crops -> training with the real upstream stages."""
    from cellbg.crops import run_crops
    from cellbg.data import discover
    from cellbg.segment import run_segmentation
    from cellbg.train import run_training

    run_segmentation(p, discover(p))
    run_crops(p)
    run_training(p)
    return p


_TINY = """
name: tiny
output: run
seed: 0
data:
  source: synthetic
  synthetic: {patients: 4, cells_per_patient: 8, cells_per_image: 4, image_size: 128, signal: 1.0, seed: 0}
segmentation: {method: masks}
crops: {size: 32, workers: 1}
variants: {train: [original, only_fg], test: [original]}
models: [{arch: resnet, depth: 10, width: 0.125}]
training: {epochs: 1, batch_size: 16, seeds: [0], split: {kind: kfold, folds: 2}, max_folds: 1}
saliency: {cells_per_job: 4, ig_steps: 2, occlusion_window: 16, target: both}
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A trained two-job run (original and only_fg) and its saliency outputs."""
    from cellbg.saliency import run_saliency

    tmp = tmp_path_factory.mktemp("saliency")
    p = _build_run(_protocol(tmp, _TINY))
    return p, run_saliency(p)


def test_run_saliency_files_follow_the_contract(tiny_run):
    import pandas as pd
    import zarr

    from cellbg.saliency import load_saliency

    p, table = tiny_run
    on_disk, maps, masks = load_saliency(p.run_dir)
    pd.testing.assert_frame_equal(on_disk, table)
    contract = [
        "cell_id",
        "patient_id",
        "label",
        "model",
        "train_variant",
        "seed",
        "fold",
        "method",
        "target",
        "background_share",
        "background_ratio",
        "sanity_rank_corr",
        "map_index",
    ]
    assert set(contract) <= set(table.columns)
    np.testing.assert_array_equal(table["map_index"], np.arange(len(table)))
    # 2 jobs x 4 cells x 3 methods x 2 targets
    assert len(table) == 2 * 4 * 3 * 2 and maps.shape == (len(table), 32, 32) and masks.dtype == bool
    assert set(table["method"]) == set(METHODS) and set(table["target"]) == {"predicted", "true"}
    # The stored numbers are those of the stored maps.
    bs = background_share(maps, masks)
    np.testing.assert_allclose(table["background_share"], bs.share, equal_nan=True)
    np.testing.assert_allclose(table["background_ratio"], bs.ratio, equal_nan=True)
    random_maps = zarr.open_group(str(p.run_dir / "saliency.zarr"), mode="r")["random_maps"][:]
    np.testing.assert_allclose(table["sanity_rank_corr"], rank_correlation(maps, random_maps), equal_nan=True)
    assert np.isfinite(table["sanity_rank_corr"]).any()


def test_run_saliency_pairs_cells_across_train_variants(tiny_run):
    import pandas as pd

    p, table = tiny_run
    cells = pd.read_parquet(p.run_dir / "cells.parquet").set_index("cell_id")
    per_variant = table.groupby("train_variant")["cell_id"].apply(lambda s: sorted(set(s)))
    assert per_variant["original"] == per_variant["only_fg"]  # the same cells for a paired comparison
    assert (cells.loc[table["cell_id"], "fold"].to_numpy() == table["fold"].to_numpy()).all()  # held out
    assert table["patient_id"].nunique() == 2  # spread over the fold's patients
    # Where the prediction is right, both targets explain the same class: same map, same share.
    right = table[table["correct"]]
    if len(right):
        wide = right.pivot_table(
            index=["train_variant", "method", "cell_id"], columns="target", values="background_share"
        )
        np.testing.assert_allclose(wide["predicted"], wide["true"], equal_nan=True)
    wrong = table[~table["correct"]]
    assert (
        wrong["target_index"] == np.where(wrong["target"] == "true", wrong["label_index"], wrong["pred_index"])
    ).all()


def test_run_saliency_maps_are_the_models_maps(tiny_run):
    """A stored map equals a fresh map of the job's model on the cell's crop."""
    from cellbg.crops import load_crops
    from cellbg.saliency import load_saliency
    from cellbg.train import load_job_model

    p, table = tiny_run
    _, maps, _ = load_saliency(p.run_dir)
    images, masks, cells = load_crops(p.run_dir)
    colour = background_colour(images, masks)  # the default integrated-gradients baseline
    for method in METHODS:
        row = table[(table["method"] == method) & (table["train_variant"] == "only_fg")].iloc[-1]
        model, _ = load_job_model(p.run_dir / "jobs" / row["job_key"])
        i = int(np.flatnonzero(cells["cell_id"] == row["cell_id"])[0])
        options = {
            "integrated_gradients": {"steps": 2, "baseline": colour},
            "occlusion": {"window": 16, "fill": 0.0},
        }.get(method, {})
        fresh = attribute(model, images[i : i + 1], [int(row["target_index"])], method=method, **options)
        np.testing.assert_allclose(maps[int(row["map_index"])], fresh[0], rtol=1e-4, atol=1e-6)


def test_run_saliency_is_deterministic(tiny_run):
    import shutil

    import pandas as pd

    from cellbg.saliency import load_saliency, run_saliency

    p, table = tiny_run
    _, maps, _ = load_saliency(p.run_dir)
    for done in (p.run_dir / "jobs").glob("*/maps.zarr"):  # computed again, not read back
        shutil.rmtree(done.parent)
    again = run_saliency(p)
    pd.testing.assert_frame_equal(again, table)
    np.testing.assert_array_equal(load_saliency(p.run_dir)[1], maps)


def test_run_saliency_unfinished_jobs_keep_outputs(tiny_run):
    from cellbg.saliency import run_saliency

    p, _ = tiny_run
    before = (p.run_dir / "saliency.parquet").read_bytes()
    other = p.model_copy(deep=True)
    other.training.seeds = [7]
    with pytest.raises(CellbgError, match=r"2 training job\(s\) not finished.*seed 7.*cellbg train"):
        run_saliency(other)
    assert (p.run_dir / "saliency.parquet").read_bytes() == before


def test_cli_saliency_with_montage(tiny_run):
    from typer.testing import CliRunner

    from cellbg.cli import app

    p, table = tiny_run
    png = p.run_dir / "montage.png"
    # Same training jobs (saliency settings are not part of a job's key), one cheap method.
    cli_protocol = p.run_dir.parent / "tiny-cli.yaml"
    cli_protocol.write_text(_TINY.replace("ig_steps: 2,", "methods: [gradcam], sanity_check: false,"))
    result = CliRunner().invoke(app, ["saliency", str(cli_protocol), "--montage", str(png)])
    assert result.exit_code == 0, result.output
    assert "16 maps (mean per model, train variant, method)" in result.output and "montage:" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["saliency", str(p.run_dir.parent / "missing.yaml")])
    assert bad.exit_code == 2 and "protocol file not found" in bad.output


_MIXED = _TINY.replace("test: [original]}", "test: [original, only_fg, mixed_rand]}").replace(
    "saliency: {cells_per_job: 4, ig_steps: 2, occlusion_window: 16, target: both}",
    "saliency: {cells_per_job: 4, methods: [gradcam], target: predicted, sanity_check: false, "
    "test_variants: [original, mixed_rand]}",
)


def test_run_saliency_maps_each_test_variant_on_the_image_the_model_saw(tmp_path):
    """Issue 17: with several test variants, each map is computed on the variant image the
    model was tested on; for mixed_rand the cell on the same partner's background as in its
    predictions (recorded), stored with the variant in the map's key."""
    import pandas as pd
    import zarr

    from cellbg.crops import load_crops
    from cellbg.saliency import load_saliency, run_saliency
    from cellbg.train import load_job_model
    from cellbg.variants import apply_variant

    p = _build_run(_protocol(tmp_path, _MIXED))
    table = run_saliency(p)
    assert set(table["test_variant"]) == {"original", "mixed_rand"}
    key = ["cell_id", "model", "train_variant", "test_variant", "seed", "fold", "method", "target"]
    assert not table.duplicated(key).any()  # the variant is part of each map's key
    per = table.groupby(["train_variant", "test_variant"])["cell_id"].apply(lambda s: sorted(s))
    assert per["original", "original"] == per["original", "mixed_rand"]  # the same cells in both
    _, maps, _ = load_saliency(p.run_dir)
    shown = zarr.open_group(str(p.run_dir / "saliency.zarr"), mode="r")["shown"][:]
    images, masks, cells = load_crops(p.run_dir)
    preds = pd.read_parquet(p.run_dir / "predictions.parquet")

    row = table[(table["test_variant"] == "mixed_rand") & (table["train_variant"] == "original")].iloc[0]
    job_preds = preds[
        (preds["model"] == row["model"])
        & (preds["train_variant"] == row["train_variant"])
        & (preds["seed"] == row["seed"])
        & (preds["fold"] == row["fold"])
    ]
    mine = preds[
        (preds["cell_id"] == row["cell_id"])
        & (preds["test_variant"] == "mixed_rand")
        & (preds["train_variant"] == "original")
    ].iloc[0]
    # the partner is the one the model's prediction used, and the prediction is the same
    assert row["partner_cell_id"] == mine["partner_cell_id"] != ""
    assert row["pred_index"] == mine["pred_index"]
    # the stored image is the mixed_rand image of the held-out pool, pixel for pixel ...
    held = job_preds["cell_id"].drop_duplicates().to_numpy()
    idx = np.array([int(np.flatnonzero(cells["cell_id"] == c)[0]) for c in held])
    bboxes = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy()[idx]
    pool = apply_variant(
        "mixed_rand",
        images[idx],
        masks[idx],
        bboxes=bboxes,
        labels=cells["label_index"].to_numpy()[idx],
        fill=p.variants.fill,
        seed=p.variants.seed,
    )
    pos = int(np.flatnonzero(held == row["cell_id"])[0])
    image = shown[int(row["shown_index"])]
    np.testing.assert_array_equal(image, pool.images[pos])
    assert held[pool.partner[pos]] == row["partner_cell_id"]
    # ... the cell's own pixels on another background: not the original crop
    crop, mask = images[idx[pos]], masks[idx[pos]]
    np.testing.assert_array_equal(image[:, mask], crop[:, mask])
    assert np.abs(image[:, ~mask] - crop[:, ~mask]).max() > 0.05
    # and the stored map is the model's map of that image
    model, _ = load_job_model(p.run_dir / "jobs" / row["job_key"])
    fresh = attribute(model, image[None], [int(row["target_index"])], method="gradcam")
    np.testing.assert_allclose(maps[int(row["map_index"])], fresh[0], rtol=1e-4, atol=1e-6)
    same_cell = table[(table["cell_id"] == row["cell_id"]) & (table["job_key"] == row["job_key"])]
    original = same_cell[same_cell["test_variant"] == "original"].iloc[0]
    np.testing.assert_array_equal(shown[int(original["shown_index"])], crop)
    assert original["partner_cell_id"] == ""
    # train variants of one fold share the stored images
    assert shown.shape[0] == table.drop_duplicates(["cell_id", "fold", "test_variant"]).shape[0]


def test_sampled_cells_get_the_images_of_their_prediction_blocks(tmp_path, monkeypatch):
    """A saliency job varies only the prediction blocks that hold its sampled cells; each
    sampled image (and partner) is the one the whole held-out set gives, block by block."""
    import cellbg.planning
    from cellbg.crops import load_crops, load_others
    from cellbg.saliency import _job_cells, _variant_blocks, held_out_variant, sample_cells

    p = _build_run(_protocol(tmp_path, _MIXED))
    monkeypatch.setattr(cellbg.planning, "PREDICT_BLOCK", 5)  # several blocks in a tiny fold
    job_dir = next(d.parent for d in (p.run_dir / "jobs").glob("*/checkpoint.pt"))
    images, masks, cells = load_crops(p.run_dir, lazy=True)
    rows, whole = held_out_variant(p, job_dir, "mixed_rand")
    assert len(rows) > 10 and _job_cells(job_dir, cells).tolist() == rows.tolist()
    pick = sample_cells(cells.iloc[rows], 6, seed=3)[::-1]  # any order
    assert len({int(i) // 5 for i in pick}) >= 2
    part = _variant_blocks(
        p,
        rows,
        "mixed_rand",
        images=images,
        masks=masks,
        cells=cells,
        others=load_others(p.run_dir, lazy=True),
        backgrounds={},
        positions=pick,
    )
    np.testing.assert_array_equal(part.images, np.asarray(whole.images)[pick])
    np.testing.assert_array_equal(part.masks, np.asarray(whole.masks)[pick])
    np.testing.assert_array_equal(part.partner, np.asarray(whole.partner)[pick])
    assert (part.partner >= 0).all() and (part.partner // 5 == pick // 5).all()  # partners from the block
    # one block, as a viewer asks for it
    _, second = held_out_variant(p, job_dir, "mixed_rand", block=1)
    np.testing.assert_array_equal(second.images, np.asarray(whole.images)[5:10])
    np.testing.assert_array_equal(second.partner, np.asarray(whole.partner)[5:10])
    with pytest.raises(CellbgError, match="block 99 is not a prediction block"):
        held_out_variant(p, job_dir, "mixed_rand", block=99)


def test_adding_a_saliency_test_variant_maps_only_the_new_variant(tiny_run, tmp_path):
    """One saliency job per trained model and test variant: a new variant adds jobs, the
    finished jobs are kept and the maps of the old variant are unchanged."""
    import shutil

    import pandas as pd

    from cellbg.saliency import run_saliency

    p, table = tiny_run
    base = tmp_path / "copy"
    shutil.copytree(p.run_dir, base / "run")
    text = _TINY.replace("test: [original]}", "test: [original, only_fg]}")
    wider = _protocol(base, text.replace("target: both}", "target: both, test_variants: [original, only_fg]}"))
    before = {d.parent.name: d.stat().st_mtime_ns for d in (base / "run" / "jobs").glob("*/maps.zarr")}
    run_saliency(wider)  # (only_fg prediction jobs are not needed for maps)
    after = {d.parent.name: d.stat().st_mtime_ns for d in (base / "run" / "jobs").glob("*/maps.zarr")}
    # two new jobs (two trained models x the new variant), every finished one untouched
    assert len(set(after) - set(before)) == 2 and all(after[k] == v for k, v in before.items())
    new = pd.read_parquet(base / "run" / "saliency.parquet")
    old = new[new["test_variant"] == "original"].drop(columns=["map_index", "shown_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(old, table.drop(columns=["map_index", "shown_index"]))
    assert set(new["test_variant"]) == {"original", "only_fg"}


def test_montage_layout():
    from cellbg.saliency import montage

    images = np.zeros((3, 3, 16, 16), np.float32)
    masks = np.zeros((3, 16, 16), bool)
    masks[:, 4:12, 4:12] = True
    maps = {"gradcam": np.ones((3, 16, 16)), "occlusion": np.zeros((3, 16, 16))}
    fig = montage(images, masks, maps, shares={"gradcam": [0.75] * 3}, titles=["a", "b", "c"])
    assert len(fig.axes) == 9
    assert fig.axes[1].get_xlabel() == "bg share 0.75" and fig.axes[2].get_xlabel() == ""


_PLANTED = """
name: planted-{signal}
output: run-{signal}
seed: 0
data:
  source: synthetic
  synthetic: {{patients: 12, cells_per_patient: 24, cells_per_image: 4, image_size: 128, signal: {signal}, seed: 3}}
segmentation: {{method: masks}}
crops: {{size: 40, workers: 1}}
variants: {{train: [original, only_fg], test: [original]}}
models: [{{arch: resnet, depth: 10, width: 0.125}}]
training:
  epochs: 15
  patience: 15
  batch_size: 16
  lr: 0.003
  augment: false
  seeds: [0]
  split: {{kind: fixed, test_patients: [P07, P08, P09, P10, P11, P12], val_fraction: 0.2}}
saliency: {{cells_per_job: 60, target: true, sanity_check: false}}
"""


@pytest.mark.slow
def test_planted_background_signal_is_found_and_absent_without_it(tmp_path):
    """Issue 8 "done when": with a strong planted background cue, models trained on
    ``original`` put a larger share of attribution on the background than models trained on
    ``only_fg`` (paired t on per-patient means, p < 0.01); with signal 0 the gap is small."""
    from cellbg.saliency import run_saliency
    from cellbg.stats import paired_t_test

    gaps = {}
    for signal in (1.0, 0.0):
        p = _build_run(_protocol(tmp_path, _PLANTED.format(signal=signal)))
        table = run_saliency(p)
        per = table.groupby(["method", "patient_id", "train_variant"])["background_share"].mean().unstack()
        for method in METHODS:
            m = per.loc[method]
            assert len(m) == 6
            r = paired_t_test(m["only_fg"], m["original"])
            gaps[signal, method] = (float((m["original"] - m["only_fg"]).mean()), r.pvalue)
    print(gaps)
    for method in METHODS:
        gap, pvalue = gaps[1.0, method]
        assert gap > 0 and pvalue < 0.01, (method, gap, pvalue)
        gap0, _ = gaps[0.0, method]
        assert abs(gap0) < 0.5 * gap, (method, gap0, gap)


def test_integrated_gradients_baseline_decides_what_is_nothing():
    # Linear model: IG = (x - baseline) * w / (H W). A pixel equal to the baseline gets 0.
    x = _images()
    per_channel = integrated_gradients(GapLinear(), x, [1, 1, 1], steps=4, baseline=[0.25])
    np.testing.assert_allclose(per_channel, (x[:, 0].numpy() - 0.25) / 256, rtol=1e-4, atol=1e-7)
    images = x.numpy()
    np.testing.assert_allclose(integrated_gradients(GapLinear(), x, [1, 1, 1], steps=4, baseline=images), 0.0)
    with pytest.raises(CellbgError, match="baseline must be a number"):
        integrated_gradients(GapLinear(), x, [1, 1, 1], baseline=[0.1, 0.2])


def test_background_colour_is_the_median_of_background_pixels():
    from cellbg.saliency import background_colour

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 2, 8, 8)).astype(np.float32)
    masks = np.zeros((5, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    images[:, :, 2:6, 2:6] = 50.0  # cells far from the background must not move the median
    expected = [np.median(images[:, c][~masks]) for c in range(2)]
    np.testing.assert_allclose(background_colour(images, masks), expected, rtol=1e-6)
    np.testing.assert_allclose(background_colour(images, np.ones((5, 8, 8), bool)), [0.0, 0.0])


def test_protocol_target_reads_unquoted_yaml_true():
    from cellbg.protocol import parse_protocol

    p = parse_protocol("name: x\nsaliency:\n  target: true\n")
    assert p.saliency.target == "true"
    with pytest.raises(CellbgError, match="saliency.target"):
        parse_protocol("name: x\nsaliency:\n  target: false\n")
