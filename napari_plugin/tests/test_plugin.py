"""napari-cellbg for real: reader, sample data, Cell view and Segment widgets on a run folder.

Runs under Xvfb (``make test`` wraps pytest in ``xvfb-run``); the Qt offscreen platform
cannot draw image layers, so without a display these tests are skipped with that reason.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.gui

if not os.environ.get("DISPLAY"):
    pytest.skip(
        reason="napari GUI tests need an X server: run under xvfb-run (make test does)", allow_module_level=True
    )

napari = pytest.importorskip("napari", reason="napari is installed by `make test` (extra 'napari')")

from napari_cellbg._reader import global_labels, napari_get_reader, read_run  # noqa: E402
from napari_cellbg._widgets import CellView, export_cells_csv, run_segmenter, segment_widget  # noqa: E402


def _readers(path) -> dict:
    from napari.plugins import _npe2

    return _npe2.get_readers(str(path))


def test_manifest_claims_no_plain_file():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    readers = pm.get_manifest("napari-cellbg").contributions.readers
    assert [r.filename_patterns for r in readers] == [["protocol.resolved.yaml"]]
    for name in ("cells.tif", "x.png", "a.zarr", "protocol.yaml"):
        assert "napari-cellbg" not in {r.plugin_name for r in pm.iter_compatible_readers([name])}


def test_reader_rejects_other_paths(tmp_path):
    assert napari_get_reader(str(tmp_path)) is None  # a folder that is not a run
    (tmp_path / "image.tif").write_bytes(b"")
    assert napari_get_reader(str(tmp_path / "image.tif")) is None
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


def test_plain_tiff_opens_with_napari_own_reader(make_napari_viewer, tmp_path):
    """With the plugin installed a plain TIFF has one reader, napari's: no 'Choose reader'."""
    import tifffile

    image = (np.arange(64 * 48).reshape(64, 48) % 251).astype(np.uint8)
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, image)
    assert list(_readers(path)) == ["napari"]
    viewer = make_napari_viewer()
    # plugin=None is what File > Open and drag-and-drop use: a second compatible reader would
    # raise MultipleReaderError here (the dialog in the GUI)
    layers = viewer.open(str(path), plugin=None)
    assert len(layers) == 1 and np.array_equal(np.asarray(layers[0].data), image)


def test_run_folder_opens_without_naming_the_plugin(make_napari_viewer, plugin_run):
    protocol_file = plugin_run / "protocol.resolved.yaml"
    assert list(_readers(protocol_file)) == ["napari-cellbg"]  # the only reader of that file
    viewer = make_napari_viewer()
    viewer.open(str(protocol_file), plugin=None)
    assert [ly.name for ly in viewer.layers] == ["images", "segmentation"]
    assert viewer.dims.axis_labels[0] == "image"
    # a folder is offered to both readers that accept folders; cellbg reads it as a run
    assert {"napari", "napari-cellbg"} <= set(_readers(plugin_run))
    assert napari_get_reader(str(plugin_run)) is read_run


def test_reader_layers_match_the_run_files(plugin_run):
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read_run(str(plugin_run))}
    cells = pd.read_parquet(plugin_run / "cells.parquet")
    images, _, kind = layers["images"]
    seg, kw, kind = layers["segmentation"]
    assert kind == "labels" and seg.shape == images.shape[:3]
    features = kw["features"]
    assert len(features) == len(cells) and set(features["index"]) <= set(np.unique(seg[seg > 0]).tolist())
    first = features.iloc[0]
    r, c = int(round(first["centroid_r"])), int(round(first["centroid_c"]))
    assert seg[int(first["image_index"]), r, c] == first["index"]


def test_sample_data_opens_the_quickstart_run(make_napari_viewer, plugin_run, monkeypatch, tmp_path):
    from cellbg._checks import CellbgError
    from napari_cellbg._sample import quickstart_run

    monkeypatch.setenv("CELLBG_QUICKSTART_RUN", str(tmp_path / "missing"))
    with pytest.raises(CellbgError, match="make demo"):
        quickstart_run()
    monkeypatch.setenv("CELLBG_QUICKSTART_RUN", str(plugin_run))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-cellbg", "quickstart")
    assert [ly.name for ly in viewer.layers] == ["images", "segmentation"]


def _open_cell_view(viewer, plugin_run):
    viewer.open(str(plugin_run / "protocol.resolved.yaml"), plugin=None)
    widget = CellView(viewer)
    viewer.window.add_dock_widget(widget, name="Cell view (cellbg)", area="right")
    return widget


def _show(widget, qtbot, cell_id):
    widget.select_cell(cell_id)
    qtbot.waitUntil(lambda: widget.cell is not None and widget.cell.cell_id == cell_id, timeout=120000)


def test_cell_view_shows_a_mixed_rand_cell(make_napari_viewer, plugin_run, qtbot):
    """Select a cell: its crop, every test variant (labelled with the prediction) and each map
    over the very image it was computed on, pixel-checked against the run's stored arrays."""
    import zarr

    from cellbg.crops import load_crops

    viewer = make_napari_viewer()
    widget = _open_cell_view(viewer, plugin_run)
    sal = pd.read_parquet(plugin_run / "saliency.parquet")
    sal = sal[(sal.train_variant == "original") & (sal.target == "predicted")]
    row = sal[sal.test_variant == "mixed_rand"].iloc[0]
    cell_id = row["cell_id"]
    _show(widget, qtbot, cell_id)

    images, masks, cells = load_crops(plugin_run)
    i = int(np.flatnonzero(cells["cell_id"] == cell_id)[0])
    store = zarr.open_group(str(plugin_run / "saliency.zarr"), mode="r")
    shown, maps = store["shown"][:], store["maps"][:]
    montage = viewer.layers["cell view: crop and variants"]
    at, side, scale = montage.metadata["at"], images.shape[-1], widget.layout_info["scale"]

    def tile(key):
        r, c = at[key]
        return np.moveaxis(montage.data[r : r + side, c : c + side], -1, 0)  # RGB -> (C, S, S)

    np.testing.assert_allclose(tile(("images", "crop")), images[i], atol=1e-6)
    # the crop and the variants with maps first, the other test variants below the maps
    assert [k[1] for k in at if k[0] == "images"] == ["crop", "original", "mixed_rand", "only_fg"]
    assert at["images", "only_fg"][0] > max(r for (row, _), (r, _c) in at.items() if row != "images")
    mixed = shown[int(row["shown_index"])]
    np.testing.assert_allclose(tile(("images", "mixed_rand")), mixed, atol=1e-6)
    assert np.abs(mixed - images[i]).max() > 0.05  # another cell's background, not the crop's
    for method in ("gradcam", "occlusion"):
        for variant in ("original", "mixed_rand"):
            r = sal[(sal.cell_id == cell_id) & (sal.test_variant == variant) & (sal.method == method)].iloc[0]
            layer = viewer.layers[f"{variant} · {method} · resnet/original"]
            np.testing.assert_array_equal(layer.data, maps[int(r["map_index"])])
            # the map lies exactly over the stored image it was computed on
            np.testing.assert_allclose(tile((method, variant)), shown[int(r["shown_index"])], atol=1e-6)
            expected = np.add(montage.translate, np.multiply(at[method, variant], scale))
            np.testing.assert_allclose(layer.translate, expected)
            np.testing.assert_allclose(layer.scale, montage.scale)
            assert layer.metadata["background_share"] == pytest.approx(r["background_share"])
            assert f"{variant} {r['background_share']:.2f}" in widget.summary.text()
    # every variant is labelled with the model's prediction and probability
    preds = pd.read_parquet(plugin_run / "predictions.parquet")
    p = preds[(preds.cell_id == cell_id) & (preds.train_variant == "original") & (preds.test_variant == "mixed_rand")]
    p = p.iloc[0]
    text = list(viewer.layers["cell view: labels"].features["text"])
    assert f"mixed_rand\n{p['pred']} {p[f'prob_{p.pred}']:.2f}" in "\n".join(text)
    assert row["partner_cell_id"] in widget.summary.text()
    # the cell is outlined in its image, on the plane on view
    c = cells.iloc[i]
    outline = viewer.layers["cell view: selected cell"]
    plane = widget.run.cells.set_index("cell_id").loc[cell_id, "image_index"]
    assert viewer.dims.current_step[0] == plane
    corners = outline.data[0]
    assert corners[0].tolist() == [plane, c.crop_r0, c.crop_c0]
    assert np.allclose(corners[:, 1:].max(0) - corners[:, 1:].min(0), side / c.scale)

    # a click on another cell in the image selects it
    features = viewer.layers["segmentation"].features
    other = features[features.cell_id.isin(sal.cell_id) & (features.cell_id != cell_id)].iloc[0]
    widget._on_canvas_click(viewer, SimpleNamespace(position=(other.image_index, other.centroid_r, other.centroid_c)))
    qtbot.waitUntil(lambda: widget.cell.cell_id == other.cell_id, timeout=120000)
    assert viewer.layers["cell view: selected cell"].metadata["cell_id"] == other.cell_id

    shot = viewer.screenshot(canvas_only=False)
    shot = viewer.screenshot(canvas_only=True)
    assert shot[..., :3].std() > 5, "screenshot is blank"


def test_cell_table_one_analysis_numeric_sort_nan_last_and_csv(make_napari_viewer, plugin_run, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    widget = _open_cell_view(viewer, plugin_run)
    cells = pd.read_parquet(plugin_run / "cells.parquet")
    assert len(widget.table) == len(cells)
    assert not any("|" in c for c in widget.table.columns)
    col = "background share, gradcam on mixed_rand"
    assert col in widget.table.columns and widget.table[col].isna().any() and widget.table[col].notna().any()
    for order in (Qt.SortOrder.AscendingOrder, Qt.SortOrder.DescendingOrder):
        widget.view.sortByColumn(list(widget.table.columns).index(col), order)
        shown = widget.visible_rows()[col].to_numpy()
        n = int(np.isfinite(shown).sum())
        assert np.isnan(shown[n:]).all()  # missing values last, either way
        steps = np.diff(shown[:n])
        assert (steps >= 0).all() if order == Qt.SortOrder.AscendingOrder else (steps <= 0).all()
    # one training variant at a time: the other one's numbers
    sal = pd.read_parquet(plugin_run / "saliency.parquet")
    sal = sal[(sal.target == "predicted") & (sal.method == "gradcam") & (sal.test_variant == "mixed_rand")]
    for variant in ("only_fg", "original"):
        widget.choose(train_variant=variant)
        expected = sal[sal.train_variant == variant].set_index("cell_id")["background_share"]
        got = widget.table.set_index("cell")[col].dropna()
        pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    widget.filter.setText("P01")
    out = export_cells_csv(widget.visible_rows(), tmp_path / "cells.csv")
    back = pd.read_csv(out)
    assert len(back) == widget.proxy.rowCount() > 0 and set(back["patient"]) == {"P01"}
    assert list(back.columns) == list(widget.table.columns)


def test_segmenter_function_without_a_viewer():
    yy, xx = np.mgrid[:64, :64]
    image = np.zeros((64, 64), np.float32)
    for r, c in [(16, 16), (44, 40)]:
        image[(yy - r) ** 2 + (xx - c) ** 2 < 64] = 1.0
    labels = run_segmenter(image, rgb=False, method="threshold", min_area=10)
    assert labels.shape == (64, 64) and len(np.unique(labels[labels > 0])) == 2


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
