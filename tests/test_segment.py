"""Segmentation backends (threshold, cellpose, masks), evaluation, and their errors."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from cellbg._checks import CellbgError
from cellbg.cli import app
from cellbg.protocol import parse_protocol
from cellbg.segment import (
    estimate_diameter,
    evaluate,
    evaluate_run,
    list_models,
    otsu_components,
    resolve_model,
    run_segmentation,
    seg_path,
    segment,
    segment_cellpose,
    segment_threshold,
    summarize_evaluation,
)


# --------------------------------------------------------------------------- evaluation
def _square(shape, r0, c0, side, value=1, out=None):
    out = np.zeros(shape, np.int32) if out is None else out
    out[r0 : r0 + side, c0 : c0 + side] = value
    return out


def test_evaluate_identical_and_relabelled_is_perfect():
    truth = _square((30, 30), 2, 2, 8, 1)
    _square((30, 30), 15, 15, 10, 2, truth)
    pred = np.where(truth == 1, 9, np.where(truth == 2, 4, 0))  # other ids, same objects
    s = evaluate(pred, truth)
    assert (s.tp, s.fp, s.fn) == (2, 0, 0)
    assert s.precision == s.recall == s.f1 == s.ap == 1.0


def test_evaluate_shifted_square_has_known_iou_and_ap():
    truth = _square((20, 20), 5, 2, 10)
    # Shifted 2 columns: IoU = 80 / 120 = 0.667 -> a match at 0.50, 0.55, 0.60, 0.65 only.
    s = evaluate(_square((20, 20), 5, 4, 10), truth)
    assert s.tp == 1 and s.f1 == 1.0
    assert s.mean_matched_iou == pytest.approx(80 / 120)
    assert s.ap_at[:4] == (1.0, 1.0, 1.0, 1.0) and set(s.ap_at[4:]) == {0.0}
    assert s.ap == pytest.approx(0.4)
    # Shifted 3 columns: IoU = 70 / 130 = 0.538 -> only the 0.5 threshold.
    assert evaluate(_square((20, 20), 5, 5, 10), truth).ap == pytest.approx(0.1)
    # Shifted 4 columns: IoU = 60 / 140 < 0.5 -> a false positive and a false negative.
    s = evaluate(_square((20, 20), 5, 6, 10), truth)
    assert (s.tp, s.fp, s.fn, s.f1, s.ap) == (0, 1, 1, 0.0, 0.0)


def test_evaluate_is_one_to_one():
    truth = _square((30, 30), 0, 0, 10, 1)
    _square((30, 30), 0, 10, 10, 2, truth)
    # One prediction covering both true cells (and a column more): IoU 100/210 with each.
    merged = np.zeros((30, 30), np.int32)
    merged[0:10, 0:21] = 1
    s = evaluate(merged, truth)
    assert (s.tp, s.fp, s.fn) == (0, 1, 2)
    # Two predictions on one true cell: the larger matches (IoU 0.8), the other is a FP.
    truth1 = _square((30, 30), 0, 0, 10)
    pred = np.zeros((30, 30), np.int32)
    pred[0:8, 0:10] = 1  # IoU 0.8
    pred[8:10, 0:10] = 2  # IoU 0.2
    s = evaluate(pred, truth1)
    assert (s.tp, s.fp, s.fn) == (1, 1, 0)
    assert s.precision == 0.5 and s.recall == 1.0 and s.f1 == pytest.approx(2 / 3)


def test_evaluate_empty_cases():
    empty = np.zeros((8, 8), np.int32)
    one = _square((8, 8), 1, 1, 4)
    both = evaluate(empty, empty)
    assert both.f1 == both.ap == 1.0
    miss = evaluate(empty, one)
    assert (miss.tp, miss.fn, miss.recall, miss.f1) == (0, 1, 0.0, 0.0)
    extra = evaluate(one, empty)
    assert (extra.fp, extra.precision, extra.f1) == (1, 0.0, 0.0)


def test_evaluate_rejects_bad_input():
    with pytest.raises(CellbgError, match="does not match truth shape"):
        evaluate(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(CellbgError, match="integer label image"):
        evaluate(np.zeros((4, 4)), np.zeros((4, 4), int))


# --------------------------------------------------------------------------- threshold
def _discs(shape, centres, radius):
    """Instance labels of discs; where two overlap the pixel goes to the nearer centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([np.hypot(yy - r, xx - c) for r, c in centres])
    labels = (d.argmin(axis=0) + 1) * (d.min(axis=0) <= radius)
    return labels.astype(np.int32)


def _touching_and_dim(seed=0):
    """Bright touching pairs, bright singles and dim singles on a noisy background."""
    shape = (160, 160)
    bright = [(25, 22), (25, 40), (70, 25), (70, 43), (120, 30)]  # two touching pairs + one
    dim = [(25, 110), (75, 115), (125, 110)]
    truth = _discs(shape, bright + dim, 9.5)
    level = np.r_[0.0, np.full(len(bright), 0.9), np.full(len(dim), 0.3)]
    rng = np.random.default_rng(seed)
    image = 0.1 + level[truth] + rng.normal(0, 0.02, shape)
    return image.astype(np.float32), truth


def test_threshold_beats_otsu_components_on_touching_and_dim_cells():
    image, truth = _touching_and_dim()
    ours = evaluate(segment_threshold(image, min_area=30), truth)
    naive = evaluate(otsu_components(image, min_area=30), truth)
    # Plain Otsu loses the three dim cells and merges each touching pair into one object,
    # which then matches at most one cell of its pair: 3 objects, at most 3 of 8 found.
    assert naive.n_pred == 3 and naive.tp <= 3 and naive.f1 < 0.6
    assert ours.tp == 8 and ours.fp == 0 and ours.f1 == 1.0
    assert ours.mean_matched_iou > 0.75  # a low threshold widens blurred edges a little


def test_threshold_handles_dark_cells_on_bright_background_and_channels():
    image, truth = _touching_and_dim(seed=1)
    inverted = 1.0 - image
    stack = np.stack([np.full_like(image, 0.5), inverted])  # channel 1 holds the cells
    labels = segment_threshold(stack, channel=1, min_area=30)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    assert evaluate(labels, truth).f1 == 1.0
    with pytest.raises(CellbgError, match="channel 5 out of range"):
        segment_threshold(stack, channel=5)


@pytest.mark.parametrize("rule", ["otsu", "li", "local"])
def test_threshold_rules_split_touching_cells(rule):
    image, truth = _touching_and_dim()
    bright_only = np.where(np.isin(truth, [1, 2, 3, 4, 5]), truth, 0)
    labels = segment_threshold(image, threshold=rule, min_area=30)
    s = evaluate(labels, truth)
    # Every method separates the touching bright pairs (5 bright cells matched).
    assert evaluate(np.where(np.isin(labels, np.unique(labels[bright_only > 0])), labels, 0), bright_only).tp == 5
    assert s.fp == 0


def test_both_seed_rules_split_an_overlapping_pair():
    # Two overlapping discs, each brighter at its centre: the Laplacian-of-Gaussian seeds find
    # both centres; the distance seeds do after the outlines are refined (second split).
    yy, xx = np.mgrid[:80, :100]
    truth = _discs((80, 100), [(40, 38), (40, 58)], 11.0)
    image = np.where(truth > 0, 1.0, 0.1) + np.random.default_rng(0).normal(0, 0.01, truth.shape)
    for c in (38, 58):  # brighter centres
        image = image + 0.6 * np.exp(-((yy - 40) ** 2 + (xx - c) ** 2) / 60)
    for rule in ("log", "distance"):
        assert evaluate(segment_threshold(image, diameter=22, seeds=rule), truth).tp == 2
    with pytest.raises(CellbgError, match="did you mean 'log'"):
        segment_threshold(image, seeds="logg")


def test_threshold_h_maxima_seeds_and_area_filters():
    image, truth = _touching_and_dim()
    assert evaluate(segment_threshold(image, h=1.0, min_area=30), truth).tp == 8
    # An area ceiling below a disc's area (~280 px) removes every cell.
    assert segment_threshold(image, max_area=100).max() == 0
    assert segment_threshold(np.zeros((16, 16))).max() == 0


def test_background_correction_removes_uneven_illumination():
    image, truth = _touching_and_dim()
    ramp = np.linspace(0, 0.8, image.shape[1], dtype=np.float32)[None, :]  # brighter to the right
    lit = image + ramp
    corrected = evaluate(segment_threshold(lit, background_radius=15, min_area=30), truth)
    assert corrected.tp == 8 and corrected.fp == 0


def test_threshold_reaches_f1_on_synthetic_fields(tmp_path):
    from cellbg.synth import make_dataset

    f1 = []
    for mode in ("rgb", "gray"):
        manifest = make_dataset(tmp_path / mode, patients=2, cells_per_patient=12, mode=mode, seed=3)
        for r in manifest.itertuples():
            image = tifffile.imread(tmp_path / mode / r.path)
            image = np.moveaxis(image, -1, 0) if image.ndim == 3 else image
            truth = tifffile.imread(tmp_path / mode / r.mask).astype(np.int32)
            f1.append(evaluate(segment(image, method="threshold"), truth).f1)
    assert np.mean(f1) >= 0.9


def test_backend_and_threshold_rule_are_separate_keywords():
    image, truth = _touching_and_dim()
    # The backend is `method`, the threshold rule `threshold`: both can be given at once.
    labels = segment(image, method="threshold", threshold="otsu", diameter=19)
    assert evaluate(labels, truth).tp >= 5
    with pytest.raises(CellbgError, match="threshold rule"):
        segment(image, method="threshold", threshold="otsuu")
    with pytest.raises(TypeError):
        segment_threshold(image, method="otsu")  # the old spelling is not silently accepted
    # ... and in a protocol, the old key is named with its new name.
    with pytest.raises(CellbgError, match=r"threshold.method was renamed segmentation.threshold.threshold"):
        parse_protocol("name: x\nsegmentation:\n  method: threshold\n  threshold: {method: otsu}\n")
    p = parse_protocol("name: x\nsegmentation:\n  method: threshold\n  diameter: 19\n  threshold: {threshold: li}\n")
    assert p.segmentation.threshold.threshold == "li" and p.segmentation.diameter == 19


def test_diameter_estimate_and_scaling():
    from skimage.transform import rescale

    image, truth = _touching_and_dim()
    # Discs of radius 9.5: inscribed diameter 19-20 pixels, touching pairs included.
    labels, info = segment_threshold(image, return_info=True)
    assert info.diameter_estimated and 17 <= info.diameter <= 22
    assert estimate_diameter(image) == pytest.approx(info.diameter)
    # Twice the image and twice the diameter: the same cells at four times the area.
    big = rescale(image, 2, order=1)
    big_truth = rescale(truth, 2, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    small, small_info = segment_threshold(image, diameter=19, return_info=True)
    large, large_info = segment_threshold(big, diameter=38, return_info=True)
    assert not large_info.diameter_estimated and large_info.diameter == 38
    assert small.max() == large.max() == 8
    assert evaluate(large, big_truth).f1 == 1.0
    ratio = np.bincount(large.ravel())[1:].sum() / np.bincount(small.ravel())[1:].sum()
    assert 3.6 < ratio < 4.4
    assert 3 * estimate_diameter(image) / 2 < estimate_diameter(big) < 5 * estimate_diameter(image) / 2
    # A diameter far too small for the cells cuts them into pieces (seeds 0.4 d apart);
    # the documented scale is what keeps one object per cell.
    assert segment_threshold(big, diameter=8).max() > 8
    with pytest.raises(CellbgError, match="diameter must be > 0"):
        segment_threshold(image, diameter=0)


def test_brightfield_rgb_uses_the_nuclear_stain_by_colour_deconvolution():
    from skimage.color import combine_stains, rgb_from_hed

    _, truth = _touching_and_dim()
    rng = np.random.default_rng(0)
    # Haematoxylin nuclei on a DAB/eosin-stained surround: the red channel (the old rule)
    # and plain intensity see the stroma as much as the nuclei; the stain separates them.
    hed = np.zeros(truth.shape + (3,))
    hed[..., 0] = np.where(truth > 0, 0.05, 0.0)  # densities in rgb2hed's units
    hed[..., 1] = 0.01 + 0.01 * rng.random(truth.shape)
    hed[..., 2] = np.where((truth == 0) & (np.arange(truth.shape[1])[None, :] > 80), 0.05, 0.0)
    rgb = (combine_stains(hed, rgb_from_hed) * 255).astype(np.uint8)
    image = np.moveaxis(rgb, -1, 0)
    labels, info = segment_threshold(image, return_info=True)
    assert info.plane.startswith("stain hematoxylin") and not info.inverted
    assert evaluate(labels, truth).f1 >= 0.9
    labels, info = segment_threshold(image, stain="giemsa", return_info=True)
    assert info.plane.startswith("stain giemsa")
    assert segment_threshold(image, stain="none", channel=None, return_info=True)[1].plane.startswith("channel")


def test_segment_rejects_unknown_method():
    with pytest.raises(CellbgError, match="did you mean 'threshold'"):
        segment(np.zeros((8, 8)), method="treshold")


# --------------------------------------------------------------------------- cellpose
def test_missing_model_is_one_line_error_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    with pytest.raises(CellbgError, match="Cellpose model 'cpsam' not found") as info:
        resolve_model("cpsam")
    assert "\n" not in str(info.value) and str(tmp_path / "models") in str(info.value)
    with pytest.raises(CellbgError, match="weights file not found"):
        segment_cellpose(np.zeros((1, 32, 32)), model=str(tmp_path / "nope.pth"))
    assert not (tmp_path / "models").exists()  # nothing was fetched


def test_list_models_reports_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    (tmp_path / "cpsam").write_bytes(b"x" * 2048)
    (tmp_path / "my_finetuned").write_bytes(b"x")
    table = list_models().set_index("name")
    assert bool(table.loc["cpsam", "present"]) and not bool(table.loc["cpsam_v2", "present"])
    assert table.loc["my_finetuned", "kind"] == "user"
    assert resolve_model("my_finetuned") == tmp_path / "my_finetuned"


def test_non_cellpose_weights_are_a_clear_error(tmp_path):
    import torch

    bad = tmp_path / "old.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(CellbgError, match="cannot load Cellpose weights .*not a Cellpose 4"):
        segment_cellpose(np.zeros((1, 32, 32)), model=str(bad), gpu=False)


def _grid_labels(shape, block=8):
    blocks = np.arange(shape[0] // block * (shape[1] // block)).reshape(shape[0] // block, -1)
    return 1 + blocks.repeat(block, 0).repeat(block, 1)


@pytest.fixture(scope="module")
def cellpose_run(tmp_path_factory, cellpose_weights):
    """A three-image dataset segmented once by the real Cellpose path (two sizes)."""
    root = tmp_path_factory.mktemp("cp_data")
    rng = np.random.default_rng(0)
    rows = []
    for i, shape in enumerate([(64, 64), (64, 64), (32, 48)]):
        tifffile.imwrite(root / f"im{i}.tif", rng.integers(0, 255, shape, dtype=np.uint8))
        rows.append({"path": f"im{i}.tif", "label": "ab"[i % 2], "patient": f"p{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    text = f"""
name: cp
output: run
data: {{source: manifest, manifest: manifest.csv}}
segmentation: {{method: cellpose, model: {cellpose_weights}, gpu: false, batch_size: 4}}
crops: {{size: 16, min_area: 20, workers: 1}}
training: {{split: {{folds: 2}}}}
"""
    protocol = parse_protocol(text, base_dir=root)
    return protocol, run_segmentation(protocol)


def test_cellpose_backend_gives_the_planted_masks(cellpose_run):
    protocol, table = cellpose_run
    # Two 64 x 64 images ran as one batched array, the 32 x 48 one alone; order is kept.
    assert len(table) == 3
    for path, shape in zip(table["seg_path"], [(64, 64), (64, 64), (32, 48)], strict=True):
        labels = tifffile.imread(path)
        assert labels.shape == shape and labels.dtype == np.int32
        ids, areas = np.unique(labels, return_counts=True)
        # The weights send every pixel to the centre of its 8 x 8 block: one mask per block.
        assert ids.min() >= 1 and len(ids) == shape[0] * shape[1] // 64
        assert set(areas) == {64}
        assert evaluate(labels, _grid_labels(shape).astype(np.int32)).ap == 1.0


def test_cellpose_masks_make_crops(cellpose_run):
    from cellbg.crops import load_crops, run_crops

    protocol, _ = cellpose_run
    cells = run_crops(protocol)
    images, masks, loaded = load_crops(protocol.run_dir)
    # Interior blocks only (border blocks are excluded): 6x6 + 6x6 + 2x4.
    assert len(cells) == len(loaded) == 36 + 36 + 8
    assert masks.shape == (80, 16, 16) and masks.sum(axis=(1, 2)).tolist() == [64] * 80
    assert cells["other_cells"].all() and not cells["touches_border"].any()
    assert cells.groupby("image_id")["instance"].apply(lambda s: s.is_unique).all()


# --------------------------------------------------------------------------- runs
def _manifest_dataset(root: Path, *, masks: dict | None = None):
    """Two classes, a disc per image; masks written where ``masks`` says (name -> array)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        image, truth = _touching_and_dim(seed=i)
        tifffile.imwrite(root / f"im{i}.tif", (image.clip(0, 1) * 255).astype(np.uint8))
        mask = (masks or {}).get(f"im{i}", truth)
        tifffile.imwrite(root / f"im{i}_mask.tif", mask.astype(np.uint16))
        rows.append({"path": f"im{i}.tif", "label": "ab"[i % 2], "patient": f"p{i}", "mask": f"im{i}_mask.tif"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _protocol(root, method="threshold", **seg):
    extra = "".join(f", {k}: {v}" for k, v in seg.items())
    text = f"""
name: seg
output: run
data: {{source: manifest, manifest: manifest.csv}}
segmentation: {{method: {method}, workers: 1{extra}}}
"""
    return parse_protocol(text, base_dir=root)


def test_run_segmentation_threshold_and_evaluate_run(tmp_path):
    protocol = _protocol(_manifest_dataset(tmp_path))
    table = run_segmentation(protocol)
    assert all(Path(p).exists() for p in table["seg_path"])
    scores = evaluate_run(protocol)
    assert len(scores) == 4 and scores["f1"].min() == 1.0
    summary = summarize_evaluation(scores)
    assert summary["tp"] == 32 and summary["f1"] == 1.0
    assert (protocol.run_dir / "segmentation" / "evaluation.csv").exists()
    # A second run keeps the finished label images (same settings).
    mtime = Path(table["seg_path"][0]).stat().st_mtime_ns
    run_segmentation(protocol)
    assert Path(table["seg_path"][0]).stat().st_mtime_ns == mtime


def test_run_segmentation_masks_copies_user_masks(tmp_path):
    protocol = _protocol(_manifest_dataset(tmp_path), method="masks")
    table = run_segmentation(protocol)
    _, truth = _touching_and_dim(seed=2)
    np.testing.assert_array_equal(tifffile.imread(table["seg_path"][2]), truth)
    assert evaluate_run(protocol)["ap"].min() == 1.0


def test_mismatched_mask_is_one_line_error_and_no_partial_files(tmp_path):
    root = _manifest_dataset(tmp_path, masks={"im0": np.ones((10, 12), np.uint16)})
    protocol = _protocol(root, method="masks")
    message = r"im0_mask.tif has shape \(10, 12\) but image .*im0.tif is \(160, 160\)"
    with pytest.raises(CellbgError, match=message) as info:
        run_segmentation(protocol)
    assert "\n" not in str(info.value)
    seg = protocol.run_dir / "segmentation"
    assert not seg_path(protocol.run_dir, "im0").exists()
    assert not list(seg.glob(".*tmp")) and not (seg / "params.json").exists()


def test_corrupt_image_is_one_line_error(tmp_path):
    root = _manifest_dataset(tmp_path)
    (root / "im1.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(CellbgError, match="cannot read image .*im1.tif") as info:
        run_segmentation(_protocol(root))
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "run" / "segmentation").glob(".*tmp"))


def test_cli_segment_evaluate_and_missing_model(tmp_path, monkeypatch):
    root = _manifest_dataset(tmp_path)
    (root / "p.yaml").write_text(
        "name: cli\noutput: run\ndata: {source: manifest, manifest: manifest.csv}\n"
        "segmentation: {method: threshold, workers: 1}\n"
    )
    result = CliRunner().invoke(app, ["segment", str(root / "p.yaml"), "--evaluate"])
    assert result.exit_code == 0, result.output
    assert "F1@0.5 1.000" in result.output

    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "empty"))
    (root / "q.yaml").write_text(
        "name: cli\noutput: run2\ndata: {source: manifest, manifest: manifest.csv}\n"
        "segmentation: {method: cellpose, model: cpsam}\n"
    )
    result = CliRunner().invoke(app, ["segment", str(root / "q.yaml")])
    assert result.exit_code == 2
    assert "Cellpose model 'cpsam' not found" in result.output
    assert not (root / "run2" / "segmentation").exists() or not any((root / "run2" / "segmentation").glob("*.tif"))

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "CELLPOSE_LOCAL_MODELS_PATH" in result.output


def test_validate_reports_missing_cellpose_weights_and_accepts_a_fine_tuned_file(
    tmp_path, monkeypatch, cellpose_weights
):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    proto = tmp_path / "p.yaml"
    proto.write_text("name: cp\nsegmentation: {method: cellpose, model: cpsam}\n")
    r = CliRunner().invoke(app, ["validate", str(proto)])
    assert r.exit_code == 2, r.output
    assert "segmentation.model: Cellpose model 'cpsam' not found" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1 and "Traceback" not in r.output
    # A fine-tuned model file (here a locally built Cellpose 4 network) given by path ...
    proto.write_text(f"name: cp\nsegmentation: {{method: cellpose, model: {cellpose_weights}}}\n")
    assert CliRunner().invoke(app, ["validate", str(proto)]).exit_code == 0
    # ... or copied into the model folder and named.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "my_tcells").write_bytes(Path(cellpose_weights).read_bytes())
    proto.write_text("name: cp\nsegmentation: {method: cellpose, model: my_tcells}\n")
    assert CliRunner().invoke(app, ["validate", str(proto)]).exit_code == 0
    # Not a Cellpose 4 file: named before any work starts.
    (tmp_path / "models" / "old").write_bytes(b"not torch")
    proto.write_text("name: cp\nsegmentation: {method: cellpose, model: old}\n")
    r = CliRunner().invoke(app, ["validate", str(proto)])
    assert r.exit_code == 2 and "cannot load Cellpose weights" in r.output
    r = CliRunner().invoke(app, ["models"])
    assert r.exit_code == 0 and "fine-tuned model" in r.output and "job_script_prologue" in r.output
