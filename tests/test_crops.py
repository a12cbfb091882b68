"""Single-cell crops: geometry, padding, masks, filters, the store and its errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from cellbg._checks import CellbgError
from cellbg.cli import app
from cellbg.crops import CELL_COLUMNS, crop_cells, crop_cells_naive, load_crops, run_crops
from cellbg.protocol import parse_protocol


def _scene():
    """A 60 x 80 uint16 image: a 6 x 10 box (id 3), a cell at the corner (id 5), a neighbour."""
    labels = np.zeros((60, 80), np.int32)
    labels[20:26, 30:40] = 3
    labels[0:8, 0:6] = 5  # touches the border, crops get padded
    labels[20:26, 42:46] = 7  # 2 px right of cell 3: inside its crop
    image = np.zeros((2, 60, 80), np.uint16)
    image[0] = np.where(labels > 0, 65535, 0)
    image[1] = np.arange(80, dtype=np.uint16)[None, :] * 100  # column ramp: checks position
    return image, labels


# --------------------------------------------------------------------------- crop_cells
def test_keep_scale_geometry_masks_and_intensity():
    image, labels = _scene()
    c = crop_cells(image, labels, size=16, exclude_border=False, min_area=1)
    t = c.table.set_index("instance")
    assert list(t.index) == [3, 5, 7]
    assert c.images.shape == (3, 2, 16, 16) and c.images.dtype == np.float32
    assert c.masks.shape == (3, 16, 16) and c.masks.dtype == bool
    # Cell 3: box rows 20..26, cols 30..40 -> crop origin (20+26-16)//2 = 15, (30+40-16)//2 = 27.
    assert (t.loc[3, "crop_r0"], t.loc[3, "crop_c0"]) == (15, 27)
    assert tuple(t.loc[3, ["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]]) == (5, 3, 11, 13)
    i3 = 0
    assert c.masks[i3].sum() == 60 and c.masks[i3, 5:11, 3:13].all()
    # Its neighbour shows in the crop but is not in its mask, and is flagged.
    assert t.loc[3, "other_cells"] and not t.loc[3, "padded"]
    assert c.images[i3, 0][c.masks[i3]].min() == 1.0  # uint16 scaled by 65535
    np.testing.assert_allclose(c.images[i3, 1, 0], np.arange(27, 43) * 100 / 65535, rtol=1e-6)
    assert t.loc[3, "area"] == 60 and t.loc[3, "scale"] == 1.0
    assert t.loc[3, "centroid_r"] == pytest.approx(22.5) and t.loc[3, "centroid_c"] == pytest.approx(34.5)


def test_border_cell_is_padded_with_padding_recorded():
    image, labels = _scene()
    c = crop_cells(image, labels, size=16, exclude_border=False, min_area=1)
    t = c.table.set_index("instance")
    # Cell 5: box rows 0..8, cols 0..6 -> origin (0+8-16)//2 = -4, (0+6-16)//2 = -5.
    assert (t.loc[5, "crop_r0"], t.loc[5, "crop_c0"]) == (-4, -5)
    assert t.loc[5, "padded"] and t.loc[5, "touches_border"]
    assert tuple(t.loc[5, ["pad_top", "pad_bottom", "pad_left", "pad_right"]]) == (4, 0, 5, 0)
    i5 = 1
    assert (c.images[i5, :, :4, :] == 0).all() and (c.images[i5, :, :, :5] == 0).all()
    assert c.masks[i5, 4:12, 5:11].all() and c.masks[i5].sum() == 48


def test_fit_scale_resizes_the_cell_to_the_fraction():
    image, labels = _scene()
    c = crop_cells(image, labels, size=40, scale="fit", fit_fraction=0.5, min_area=1, exclude_border=True)
    t = c.table.set_index("instance")
    assert list(t.index) == [3, 7]
    # Cell 3's longer side is 10 px -> 0.5 * 40 / 10 = 2 crop pixels per image pixel.
    assert t.loc[3, "scale"] == pytest.approx(2.0)
    i3 = 0
    assert (t.loc[3, "bbox_c1"] - t.loc[3, "bbox_c0"]) == 20 and (t.loc[3, "bbox_r1"] - t.loc[3, "bbox_r0"]) == 12
    assert c.masks[i3].sum() == 240  # 60 px * 2**2
    # The ramp channel is resampled: crop column j sits at image column crop_c0 + j / scale.
    cols = t.loc[3, "crop_c0"] + np.arange(40) / 2.0
    np.testing.assert_allclose(c.images[i3, 1, 20], cols * 100 / 65535, atol=1e-6)


def test_shape_measures_agree_with_scikit_image():
    from skimage.draw import ellipse
    from skimage.measure import regionprops

    labels = np.zeros((90, 90), np.int32)
    labels[ellipse(25, 25, 8, 15, rotation=0.4, shape=labels.shape)] = 1
    labels[ellipse(60, 60, 12, 12, shape=labels.shape)] = 2
    labels[10:14, 60:80] = 3
    t = crop_cells(np.zeros((90, 90)), labels, size=48, min_area=1).table
    ref = regionprops(labels)
    np.testing.assert_allclose(t["eccentricity"], [r.eccentricity for r in ref], atol=1e-9)
    np.testing.assert_allclose(t["centroid_r"], [r.centroid[0] for r in ref])
    np.testing.assert_array_equal(t["area"], [r.area for r in ref])
    # Solidity from the hull of the pixel squares: exactly 1 for a rectangle, and within
    # a few percent of scikit-image's rasterised hull for convex shapes.
    assert t["solidity"].iloc[2] == 1.0
    np.testing.assert_allclose(t["solidity"], [r.solidity for r in ref], atol=0.05)


def test_keep_scale_matches_the_naive_per_cell_loop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 50, 70), dtype=np.uint8)
    labels = np.zeros((50, 70), np.int32)
    for k, (r, c) in enumerate([(3, 4), (20, 30), (40, 60), (10, 55)], start=1):
        labels[r : r + 7, c : c + 5] = k
    fast = crop_cells(image, labels, size=24, exclude_border=False, min_area=1)
    slow_i, slow_m = crop_cells_naive(image, labels, size=24)
    np.testing.assert_array_equal(fast.images, slow_i)
    np.testing.assert_array_equal(fast.masks, slow_m)


def test_filters_count_what_they_remove():
    labels = np.zeros((80, 80), np.int32)
    labels[10:20, 10:20] = 1  # kept (area 100)
    labels[30:32, 30:32] = 2  # too small (4)
    labels[0:10, 40:50] = 3  # touches the border
    ring = np.zeros((80, 80), bool)
    ring[50:70, 50:70] = True
    ring[53:67, 53:67] = False
    labels[ring] = 4  # a ring: solidity ~0.5
    labels[45:75, 5:35] = 5  # too large (900)
    image = np.ones((1, 80, 80), np.float32)
    c = crop_cells(image, labels, size=32, min_area=10, max_area=500, min_solidity=0.8)
    assert c.table["instance"].tolist() == [1]
    assert c.removed == {"min_area": 1, "max_area": 1, "border": 1, "solidity": 1}
    none = crop_cells(image, np.zeros((80, 80), np.int32), size=32)
    assert none.images.shape == (0, 1, 32, 32) and len(none.table) == 0


def test_crop_cells_rejects_mismatched_labels():
    with pytest.raises(CellbgError, match=r"labels shape \(5, 5\) does not match image shape \(6, 6\)"):
        crop_cells(np.zeros((1, 6, 6)), np.zeros((5, 5), int))
    with pytest.raises(CellbgError, match="unknown crop scale 'fitt'"):
        crop_cells(np.zeros((6, 6)), np.zeros((6, 6), int), scale="fitt")


# --------------------------------------------------------------------------- run_crops
def _dataset(root: Path, n=4, *, empty=(), size=96):
    """``n`` gray uint8 images with three discs each (one image per patient, two classes)."""
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        labels = np.zeros((size, size), np.uint16)
        if i not in empty:
            for k, (r, c) in enumerate([(20, 20), (50, 70), (75, 30)], start=1):
                labels[(yy - r - i) ** 2 + (xx - c) ** 2 <= 64] = k
        image = np.where(labels > 0, 200, 20).astype(np.uint8)
        tifffile.imwrite(root / f"im{i}.tif", image)
        tifffile.imwrite(root / f"im{i}_mask.tif", labels)
        rows.append(
            {"path": f"im{i}.tif", "label": ["healthy", "sezary"][i % 2], "patient": f"p{i}", "mask": f"im{i}_mask.tif"}
        )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def _protocol(root, workers=1, method="masks", size=32):
    text = f"""
name: crops
output: run
seed: 3
data: {{source: manifest, manifest: manifest.csv}}
segmentation: {{method: {method}, workers: 1}}
crops: {{size: {size}, workers: {workers}}}
training: {{split: {{folds: 2}}}}
"""
    return parse_protocol(text, base_dir=root)


def test_run_crops_writes_the_contract(tmp_path):
    protocol = _protocol(_dataset(tmp_path))
    cells = run_crops(protocol)
    images, masks, loaded = load_crops(protocol.run_dir)
    assert list(loaded.columns) == CELL_COLUMNS
    assert len(cells) == len(loaded) == 12 and images.shape == (12, 1, 32, 32) and masks.shape == (12, 32, 32)
    assert images.dtype == np.float32 and masks.dtype == bool
    assert loaded["cell_id"].tolist()[:3] == ["im0-0001", "im0-0002", "im0-0003"]
    assert loaded.attrs["classes"] == ["healthy", "sezary"]
    assert (loaded["label_index"] == (loaded["label"] == "sezary")).all()
    # Folds are patient-grouped and come from assign_folds with the protocol seed.
    assert loaded.groupby("patient_id")["fold"].nunique().max() == 1
    assert set(loaded["fold"]) == {0, 1}
    # Row i of the store is the crop of row i of the table: the cell's pixels are 200/255.
    for i in (0, 7, 11):
        assert np.allclose(images[i, 0][masks[i]], 200 / 255)
        assert masks[i].sum() == loaded["area"][i]
    group = zarr.open_group(str(protocol.run_dir / "crops.zarr"), mode="r")
    assert group.attrs["classes"] == ["healthy", "sezary"]
    summary = json.loads((protocol.run_dir / "crops.json").read_text())
    assert summary["cells"] == 12 and set(summary["removed"]) == {"min_area", "max_area", "border", "solidity"}
    assert (protocol.run_dir / "protocol.resolved.yaml").exists()


def test_store_keeps_the_source_dtype_compactly_and_reads_rows_in_any_order(tmp_path):
    from cellbg.crops import CropStore, open_store, store_bytes

    protocol = _protocol(_dataset(tmp_path))
    cells = run_crops(protocol)
    group = zarr.open_group(str(protocol.run_dir / "crops.zarr"), mode="r")
    assert group["images"].dtype == np.uint8 and group.attrs["divisor"] == 255.0
    # the stored pixels are the image's own: 200 inside the cell
    raw = np.asarray(group["images"][:])
    assert set(np.unique(raw[:, 0][np.asarray(group["masks"][:])]).tolist()) == {200}
    summary = json.loads((protocol.run_dir / "crops.json").read_text())
    assert summary["store_dtype"] == "uint8" and summary["source_pixel_bytes"] == len(cells) * 32 * 32
    assert summary["store_bytes"] == store_bytes(protocol.run_dir / "crops.zarr")
    assert summary["store_bytes"] <= 1.1 * summary["source_pixel_bytes"]
    # random reads (repeats, any order) give exactly the float crops
    images, masks, _ = load_crops(protocol.run_dir)
    store = CropStore(protocol.run_dir, cache_chunks=1)
    idx = np.array([11, 0, 5, 5, 3])
    got_i, got_m = store.read(idx)
    assert got_i.dtype == np.float32
    np.testing.assert_array_equal(got_i, images[idx])
    np.testing.assert_array_equal(got_m, masks[idx])
    # a node-local copy reads the same
    copy = open_store(protocol.run_dir, scratch=tmp_path / "scratch")
    assert copy.path.parent.parent == tmp_path / "scratch"
    np.testing.assert_array_equal(copy.read(idx)[0], images[idx])
    assert open_store(protocol.run_dir, scratch=tmp_path / "scratch").path == copy.path  # copied once


def test_run_crops_parallel_equals_serial(tmp_path):
    serial = run_crops(_protocol(_dataset(tmp_path / "a")))
    parallel = run_crops(_protocol(_dataset(tmp_path / "b"), workers=2))
    pd.testing.assert_frame_equal(serial, parallel)
    a, _, _ = load_crops(tmp_path / "a" / "run")
    b, _, _ = load_crops(tmp_path / "b" / "run")
    np.testing.assert_array_equal(a, b)


def test_image_without_cells_warns_and_adds_no_rows(tmp_path):
    protocol = _protocol(_dataset(tmp_path, empty=(2,)))
    with pytest.warns(UserWarning, match="image im2 has no cells"):
        cells = run_crops(protocol)
    assert len(cells) == 9 and "im2" not in set(cells["image_id"])
    assert cells.attrs["summary"]["images_without_cells"] == ["im2"]


def test_corrupt_image_keeps_earlier_crops_and_leaves_no_partial_files(tmp_path):
    root = _dataset(tmp_path)
    protocol = _protocol(root)
    run_crops(protocol)
    before = (protocol.run_dir / "cells.parquet").read_bytes()
    (root / "im3.tif").write_bytes(b"\x00garbage")
    protocol.crops.size = 24  # a changed protocol, so nothing is reused
    with pytest.raises(CellbgError, match="cannot read image .*im3.tif") as info:
        run_crops(protocol)
    assert "\n" not in str(info.value)
    assert (protocol.run_dir / "cells.parquet").read_bytes() == before
    assert load_crops(protocol.run_dir)[0].shape[-1] == 32
    leftovers = [p.name for p in protocol.run_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_mismatched_segmentation_is_one_line_error(tmp_path):
    root = _dataset(tmp_path)
    protocol = _protocol(root)
    from cellbg.segment import run_segmentation, seg_path

    run_segmentation(protocol)
    tifffile.imwrite(seg_path(protocol.run_dir, "im1"), np.zeros((10, 10), np.int32))
    with pytest.raises(
        CellbgError, match=r"segmentation .*im1.tif has shape \(10, 10\) but image .*im1.tif is \(96, 96\)"
    ):
        run_crops(protocol)
    assert not (protocol.run_dir / "cells.parquet").exists() and not (protocol.run_dir / "crops.zarr").exists()


def test_load_crops_without_a_run_or_with_mixed_files_is_a_clear_error(tmp_path):
    with pytest.raises(CellbgError, match="run `cellbg crops PROTOCOL` first"):
        load_crops(tmp_path)
    # A store and a table of the same length from different runs are told apart.
    a = run_crops(_protocol(_dataset(tmp_path / "a")))
    b_root = _dataset(tmp_path / "b")
    (b_root / "im0.tif").rename(b_root / "im9.tif")
    manifest = pd.read_csv(b_root / "manifest.csv")
    manifest.loc[0, "path"] = "im9.tif"
    manifest.to_csv(b_root / "manifest.csv", index=False)
    b = run_crops(_protocol(b_root))
    assert len(a) == len(b)
    (tmp_path / "b" / "run" / "cells.parquet").replace(tmp_path / "a" / "run" / "cells.parquet")
    with pytest.raises(CellbgError, match="come from different runs"):
        load_crops(tmp_path / "a" / "run")


def test_cli_crops(tmp_path):
    root = _dataset(tmp_path)
    (root / "p.yaml").write_text(
        "name: cli\noutput: run\ndata: {source: manifest, manifest: manifest.csv}\n"
        "segmentation: {method: threshold, workers: 1}\ncrops: {size: 32, workers: 1}\n"
        "training: {split: {folds: 2}}\n"
    )
    result = CliRunner().invoke(app, ["crops", str(root / "p.yaml")])
    assert result.exit_code == 0, result.output
    assert "12 cells from 4 images (healthy: 6, sezary: 6)" in result.output
    assert "removed by filter: min_area 0" in result.output
