"""napari-cellbg for real: reader, Segment, Cell browser and Saliency widgets on a run folder.

Runs under Xvfb (``make test`` wraps pytest in ``xvfb-run``); the Qt offscreen platform
cannot draw image layers, so without a display these tests are skipped with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY"):
    pytest.skip(reason="napari GUI tests need an X server: run under xvfb-run (make test does)", allow_module_level=True)

napari = pytest.importorskip("napari", reason="napari is installed by `make test` (extra 'napari')")

from napari_cellbg._reader import global_labels, napari_get_reader, read_run  # noqa: E402
from napari_cellbg._runfolder import RunFolder  # noqa: E402
from napari_cellbg._widgets import (  # noqa: E402
    CellBrowser,
    SaliencyWidget,
    export_cells_csv,
    run_segmenter,
    segment_widget,
)


def test_reader_rejects_other_paths(tmp_path):
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader([str(tmp_path), str(tmp_path)]) is None


def test_global_labels_are_unique_across_the_stack():
    labels = np.zeros((3, 4, 4), np.int32)
    labels[0, 0, 0], labels[0, 1, 1] = 1, 2
    labels[1, 2, 2] = 1
    labels[2, 3, 3] = 5
    shifted, offsets = global_labels(labels, None)
    assert offsets.tolist() == [0, 2, 3]
    assert shifted[0, 1, 1] == 2 and shifted[1, 2, 2] == 3 and shifted[2, 3, 3] == 8
    assert (shifted[labels == 0] == 0).all()


def test_reader_layers_match_the_run_files(plugin_run):
    reader = napari_get_reader(str(plugin_run))
    assert reader is read_run
    assert napari_get_reader(str(plugin_run / "protocol.resolved.yaml")) is read_run
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in reader(str(plugin_run))}
    run = RunFolder(plugin_run)
    images, _, kind = layers["images"]
    assert kind == "image" and images.shape[0] == len(run.image_table)
    seg, kw, kind = layers["segmentation"]
    assert kind == "labels" and seg.shape == images.shape[:3]
    # one global id per cell, and the features table describes exactly the labelled cells
    features = kw["features"]
    ids = np.unique(seg[seg > 0])
    assert set(features["index"]) <= set(ids.tolist())
    cells = pd.read_parquet(plugin_run / "cells.parquet")
    assert len(features) == len(cells)
    first = features.iloc[0]
    plane = seg[int(first["image_index"])]
    r, c = int(round(first["centroid_r"])), int(round(first["centroid_c"]))
    assert plane[r, c] == first["index"]
    # saliency: one field-of-view layer per (method, model, train variant), predicted class
    sal = pd.read_parquet(plugin_run / "saliency.parquet")
    chosen = sal[(sal.target == "predicted") & (sal.seed == sal.seed.min())]
    groups = chosen.groupby(["model", "train_variant", "method"])
    sal_layers = {k: v for k, v in layers.items() if k.startswith("saliency ")}
    assert len(sal_layers) == groups.ngroups
    (model, train_variant, method), rows = next(iter(groups))
    fov, kw, kind = sal_layers[f"saliency {method} | {model} | {train_variant}"]
    assert kind == "image" and fov.shape == images.shape[:3]
    assert kw["colormap"] == "inferno" and kw["blending"] == "additive"
    # a cell's map sits at its crop's place in its image (crops are not rescaled here)
    maps = run.saliency_maps()
    cell = cells.set_index("cell_id").loc[rows.cell_id.iloc[0]]
    r0, c0 = int(cell.crop_r0), int(cell.crop_c0)
    m = maps[rows.map_index.iloc[0]]
    plane = fov[features.set_index("cell_id").loc[rows.cell_id.iloc[0], "image_index"]]
    rr0, cc0 = max(r0, 0), max(c0, 0)
    window = plane[rr0: r0 + m.shape[0], cc0: c0 + m.shape[1]]
    assert (window >= m[rr0 - r0: rr0 - r0 + window.shape[0], cc0 - c0: cc0 - c0 + window.shape[1]] - 1e-6).all()
    assert (fov >= 0).all() and fov.max() > 0


def test_segmenter_function_without_a_viewer():
    yy, xx = np.mgrid[:64, :64]
    image = np.zeros((64, 64), np.float32)
    for r, c in [(16, 16), (44, 40)]:
        image[(yy - r) ** 2 + (xx - c) ** 2 < 64] = 1.0
    labels = run_segmenter(image, rgb=False, method="threshold", min_area=10)
    assert labels.shape == (64, 64) and len(np.unique(labels[labels > 0])) == 2


def _screenshot_not_blank(viewer):
    shot = viewer.screenshot(canvas_only=False)  # first call makes hidden viewers draw
    shot = viewer.screenshot(canvas_only=True)
    assert shot.ndim == 3 and shot[..., :3].std() > 5, "screenshot is blank"
    return shot


def test_open_run_browse_cells_and_saliency(make_napari_viewer, plugin_run, qtbot, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(plugin_run), plugin="napari-cellbg")
    names = [ly.name for ly in viewer.layers]
    assert {"images", "segmentation"} <= set(names)
    assert any(n.startswith("saliency ") for n in names)
    labels = viewer.layers["segmentation"]

    browser = CellBrowser(viewer)
    viewer.window.add_dock_widget(browser)
    assert len(browser.table) == len(pd.read_parquet(plugin_run / "cells.parquet"))
    # predictions and correctness per model x train x test are columns of the table
    assert any(c.startswith("correct|") for c in browser.table.columns)
    assert "index" in labels.features.columns and len(labels.features) == len(browser.table)

    # filter, then select a row: the view centres on the cell, the variants strip appears
    target = browser.table.iloc[3]
    browser.filter.setText(str(target["cell_id"]))
    assert browser.proxy.rowCount() == 1
    browser.view.selectRow(0)
    assert viewer.dims.current_step[0] == int(target["image_index"])
    from napari_cellbg._widgets import _camera

    np.testing.assert_allclose(_camera(viewer).center[-2:], (target["centroid_r"], target["centroid_c"]))
    strip = viewer.layers["cell variants"]
    n_var = len(strip.metadata["variants"])
    assert strip.metadata["cell_id"] == target["cell_id"]
    assert strip.data.shape[1] == n_var * strip.data.shape[0]

    # selecting a cell in the Labels layer selects its row
    browser.filter.setText("")
    other = browser.table.iloc[7]
    labels.selected_label = int(other["index"])
    sel = browser.view.selectionModel().selectedRows()
    assert len(sel) == 1
    assert browser.table.iloc[browser.proxy.mapToSource(sel[0]).row()]["cell_id"] == other["cell_id"]

    # sorting by area sorts numerically
    col = list(browser.table.columns).index("area")
    from qtpy.QtCore import Qt

    browser.view.sortByColumn(col, Qt.SortOrder.AscendingOrder)
    shown = browser.visible_rows()["area"].to_numpy()
    assert (np.diff(shown) >= 0).all()

    out = export_cells_csv(browser.visible_rows(), tmp_path / "cells.csv")
    assert len(pd.read_csv(out)) == len(browser.table)

    sal = SaliencyWidget(viewer)
    viewer.window.add_dock_widget(sal)
    rows = sal.selection()
    assert len(rows) > 0
    for key in ("model", "train_variant", "method", "target"):
        assert rows[key].nunique() == 1  # one analysis at a time, never pooled
    share = sal.show()
    np.testing.assert_allclose(share, rows["background_share"].mean())
    assert "background share" in sal.share.text()
    crop_side = browser.run.crops()[0].shape[-1]
    assert viewer.layers["saliency"].data.ndim == 2  # a montage beside the images, no new slider
    assert viewer.layers["saliency"].data.shape[1] >= crop_side
    sal.where.setCurrentText("field of view")
    sal.show(cell_id=rows["cell_id"].iloc[0])
    fov = viewer.layers["saliency (field of view)"].data
    assert fov.shape == viewer.layers["images"].data.shape[:3] and fov.max() > 0
    assert rows["cell_id"].iloc[0] in sal.share.text()

    shot = _screenshot_not_blank(viewer)
    keep = os.environ.get("CELLBG_SCREENSHOT")
    if keep:
        import imageio.v3 as iio

        iio.imwrite(keep, viewer.screenshot(canvas_only=False))
    assert shot.shape[0] > 50


def test_segment_widget_runs_in_a_thread(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    yy, xx = np.mgrid[:96, :96]
    image = np.zeros((96, 96), np.float32)
    for r, c in [(20, 20), (30, 70), (70, 50)]:
        image[(yy - r) ** 2 + (xx - c) ** 2 < 100] = 1.0
    layer = viewer.add_image(image, name="small")
    widget = segment_widget()
    viewer.window.add_dock_widget(widget)
    widget.image.value = layer
    widget.method.value = "threshold"
    widget.min_area.value = 20
    widget()
    qtbot.waitUntil(lambda: "small threshold labels" in viewer.layers, timeout=30000)
    result = viewer.layers["small threshold labels"]
    assert result.data.shape == (96, 96)
    assert len(np.unique(result.data[result.data > 0])) == 3
    _screenshot_not_blank(viewer)


def test_segment_widget_saves_masks_where_a_protocol_finds_them(make_napari_viewer, qtbot, tmp_path):
    import tifffile

    from cellbg.data import discover_folders
    from napari_cellbg._widgets import save_masks_widget

    folder = tmp_path / "tcells" / "p1"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:96, :96]
    image = np.zeros((96, 96), np.uint8)
    for r, c in [(20, 20), (30, 70), (70, 50)]:
        image[(yy - r) ** 2 + (xx - c) ** 2 < 100] = 200
    tifffile.imwrite(folder / "field.tif", image)
    viewer = make_napari_viewer()
    layer = viewer.open(str(folder / "field.tif"))[0]
    widget = segment_widget()
    widget.image.value = layer
    widget.method.value = "threshold"
    widget.save_beside_image.value = True
    widget()
    saved = folder / "field_masks.tif"
    qtbot.waitUntil(saved.exists, timeout=30000)
    table = discover_folders(tmp_path, need_classes=False)
    assert len(table) == 1 and table["mask_path"].iat[0] == str(saved)  # the mask is not an image
    assert len(np.unique(tifffile.imread(saved))) == 4  # background + 3 cells
    # A hand-edited Labels layer saved with Cellpose's suffix into another folder.
    edited = np.zeros((96, 96), np.int32)
    edited[10:30, 10:30] = 1
    labels = viewer.add_labels(edited, name="edited")
    save = save_masks_widget()
    out = save(labels=labels, image=layer, suffix="_cp_masks", folder=tmp_path / "masks")
    assert out == tmp_path / "masks" / "field_cp_masks.tif"
    np.testing.assert_array_equal(tifffile.imread(out), edited)
    # An image not opened from a file: nothing is written.
    unsaved = viewer.add_image(image, name="in memory")
    assert save(labels=labels, image=unsaved, suffix="_masks", folder=Path("")) is None
