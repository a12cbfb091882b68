"""Widgets: Segment, Cell browser, Saliency. They collect parameters, call cellbg, add layers.

No science lives here: segmentation is :func:`cellbg.segment.segment`, variants are
:func:`cellbg.variants.apply_variant`, background shares come from ``saliency.parquet``.
"""


from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui import magic_factory
from napari.qt.threading import thread_worker
from qtpy.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from napari_cellbg._reader import labels_features
from napari_cellbg._runfolder import RunFolder, montage

__all__ = [
    "segment_widget",
    "save_masks_widget",
    "save_labels",
    "run_segmenter",
    "CellBrowser",
    "SaliencyWidget",
    "variant_strip",
    "export_cells_csv",
]


def _camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _run_dir_from_layers(viewer) -> str | None:
    """The run folder the viewer's layers were read from (the reader records it), or None."""
    return next((ly.metadata["cellbg_run"] for ly in viewer.layers if "cellbg_run" in ly.metadata), None)


# --------------------------------------------------------------------------- segment
def run_segmenter(data: np.ndarray, *, rgb: bool, method: str, **options) -> np.ndarray:
    """Segment one napari image (H, W) or (H, W, 3) with cellbg; returns int32 labels."""
    from cellbg.segment import segment

    image = np.moveaxis(data, -1, 0) if rgb else np.asarray(data)[None]
    return segment(image, method=method, **options)


@magic_factory(
    call_button="Segment",
    method={"choices": ["threshold", "cellpose"]},
    diameter={
        "min": 0.0,
        "max": 1000.0,
        "tooltip": "cell diameter in pixels; 0 = estimated (threshold) / the model's default",
    },
    min_area={"min": 0, "max": 100000, "tooltip": "threshold: smallest object; 0 = from the diameter"},
    flow_threshold={"min": 0.0, "max": 3.0, "step": 0.1},
    cellprob_threshold={"min": -6.0, "max": 6.0, "step": 0.5},
)
def segment_widget(
    viewer: napari.Viewer,
    image: napari.layers.Image,
    method: str = "threshold",
    model: str = "cpsam",
    diameter: float = 0.0,
    min_area: int = 0,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    save_beside_image: bool = False,
):
    """Run a cellbg segmenter on the selected image layer (in a thread, with a progress bar).

    Returns the started worker; its result is added as a Labels layer, and an error is
    shown in napari's notification area instead of freezing or crashing the window. With
    ``save_beside_image`` the labels are also saved as ``<image>_masks.tif`` beside the image
    file, where a protocol's ``data.mask_suffixes`` finds them.
    """
    data = np.asarray(image.data)
    if data.ndim > (3 if image.rgb else 2):  # a stack: segment the plane on view
        data = data[int(viewer.dims.current_step[0])]
    options = {"min_area": min_area or None, "diameter": diameter or None} if method == "threshold" else {
        "model": model,
        "diameter": diameter or None,
        "flow_threshold": flow_threshold,
        "cellprob_threshold": cellprob_threshold,
    }
    name = f"{image.name} {method} labels"

    @thread_worker(progress={"total": 0, "desc": f"cellbg: {method} segmentation"})
    def _work():
        return run_segmenter(data, rgb=image.rgb, method=method, **options)

    worker = _work()
    worker.returned.connect(lambda labels: viewer.add_labels(labels, name=name))
    if save_beside_image:
        worker.returned.connect(lambda labels: _save_and_tell(labels, image))
    worker.errored.connect(lambda exc: napari.utils.notifications.show_error(f"cellbg: {exc}"))
    worker.start()
    return worker


def save_labels(labels: np.ndarray, image_path: str | Path, *, suffix: str = "_masks",
                folder: str | Path | None = None) -> Path:
    """Save a Labels layer's data as the mask of an image file (:func:`cellbg.data.write_mask`)."""
    from cellbg.data import write_mask

    return write_mask(np.asarray(labels), image_path, suffix=suffix, folder=folder)


def _source_path(image) -> str | None:
    path = getattr(getattr(image, "source", None), "path", None) or image.metadata.get("path")
    return str(path) if path else None


def _save_and_tell(labels, image, *, suffix: str = "_masks", folder: str | Path | None = None) -> Path | None:
    from cellbg._checks import CellbgError

    path = _source_path(image)
    if path is None:
        napari.utils.notifications.show_error(
            f"cellbg: image '{image.name}' was not opened from a file; choose a folder to save its masks in"
        )
        return None
    try:
        out = save_labels(labels, path, suffix=suffix, folder=folder or None)
    except CellbgError as exc:
        napari.utils.notifications.show_error(f"cellbg: {exc}")
        return None
    napari.utils.notifications.show_info(f"cellbg: saved {out}")
    return out


@magic_factory(
    call_button="Save masks",
    suffix={"tooltip": "the mask is saved as <image name><suffix>.tif (data.mask_suffixes finds _masks, _cp_masks)"},
    folder={"mode": "d", "tooltip": "empty: beside the image file"},
)
def save_masks_widget(
    labels: napari.layers.Labels,
    image: napari.layers.Image,
    suffix: str = "_masks",
    folder: Path = Path(""),
) -> Path | None:
    """Save a Labels layer (a segmentation, corrected by hand or not) as the mask of the image
    file it belongs to, where a protocol finds it (docs/data.md)."""
    data = np.asarray(labels.data)
    if data.ndim > 2:  # a stack: the plane on view
        data = data[int(napari.current_viewer().dims.current_step[0])] if napari.current_viewer() else data[0]
    target = None if str(folder) in ("", ".") else folder
    return _save_and_tell(data, image, suffix=suffix, folder=target)


# --------------------------------------------------------------------------- table model
class _FrameModel(QAbstractTableModel):
    """A read-only Qt model over a DataFrame; sorts numbers as numbers."""

    def __init__(self, frame: pd.DataFrame):
        super().__init__()
        self.frame = frame.reset_index(drop=True)

    def rowCount(self, parent=QModelIndex()):  # noqa: N802 (Qt API)
        return 0 if parent.isValid() else len(self.frame)

    def columnCount(self, parent=QModelIndex()):  # noqa: N802
        return 0 if parent.isValid() else self.frame.shape[1]

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        value = self.frame.iat[index.row(), index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            if isinstance(value, float | np.floating):
                return "" if np.isnan(value) else f"{value:.3g}"
            return str(value)
        if role == Qt.ItemDataRole.UserRole:  # sort key
            if isinstance(value, bool | np.bool_):
                return int(value)
            if isinstance(value, int | float | np.integer | np.floating):
                return float(value)
            return str(value)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return str(self.frame.columns[section])
        return str(section)


def export_cells_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the cell table to CSV (atomically)."""
    from cellbg._io import atomic_path

    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


def variant_strip(run: RunFolder, store_index: int, variants: list[str], *, pool: int = 64) -> np.ndarray:
    """One cell's crop in every variant, side by side: (S, S * len(variants)[, C]).

    The ``mixed_*`` variants need other cells to paste onto; the pool is this cell and the
    next ``pool - 1`` cells of the store (the same seed as the protocol's variants).
    """
    from cellbg.variants import apply_variant

    images, masks, cells = run.crops()
    n = len(cells)
    idx = (store_index + np.arange(min(pool, n))) % n
    bbox = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy()[idx]
    labels = cells["label_index"].to_numpy()[idx]
    img, msk = np.asarray(images[idx], dtype=np.float32), np.asarray(masks[idx], dtype=bool)
    cfg = run.protocol.variants
    tiles = [
        apply_variant(v, img, msk, bboxes=bbox, labels=labels, fill=cfg.fill, seed=cfg.seed).images[0]
        for v in variants
    ]
    strip = np.concatenate(tiles, axis=-1)  # (C, S, S * V)
    return np.moveaxis(strip, 0, -1) if strip.shape[0] == 3 else strip[0]


# --------------------------------------------------------------------------- cell browser
class CellBrowser(QWidget):
    """A sortable, filterable table of cells; a row centres the view and shows its variants."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.run = None
        self.table = pd.DataFrame()
        self.labels_layer = None

        self.filter = QLineEdit()
        self.filter.setPlaceholderText("filter: text in any column")
        self.view = QTableView()
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.proxy = QSortFilterProxyModel()
        self.proxy.setSortRole(Qt.ItemDataRole.UserRole)
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.view.setModel(self.proxy)
        self.load_button = QPushButton("Load from layers")
        self.export_button = QPushButton("Export CSV…")
        self.status = QLabel("open a cellbg run folder, then press 'Load from layers'")

        buttons = QHBoxLayout()
        buttons.addWidget(self.load_button)
        buttons.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addWidget(self.filter)
        layout.addWidget(self.view)
        layout.addWidget(self.status)

        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.load_button.clicked.connect(lambda: self.load())
        self.export_button.clicked.connect(self._export_dialog)
        self.load()

    # -- data
    def load(self, run_dir: str | Path | None = None) -> None:
        """Load the table of ``run_dir`` or of the run the viewer's layers came from."""
        if run_dir is None:
            run_dir = _run_dir_from_layers(self.viewer)
            self.labels_layer = next(
                (ly for ly in self.viewer.layers if "cellbg_run" in ly.metadata and ly.__class__.__name__ == "Labels"),
                self.labels_layer,
            )
        if run_dir is None:
            return
        self.run = RunFolder(run_dir)
        if self.labels_layer is not None and "offsets" in self.labels_layer.metadata:
            # the same table the reader put on the layer: keyed by the layer's global label ids
            self.table = labels_features(self.run, np.asarray(self.labels_layer.metadata["offsets"]))
            self.labels_layer.features = self.table
            self.labels_layer.events.selected_label.connect(self._on_label_selected)
            if self._on_click not in self.labels_layer.mouse_drag_callbacks:
                self.labels_layer.mouse_drag_callbacks.append(self._on_click)
        else:
            self.table = self.run.cell_table()
        self.proxy.setSourceModel(_FrameModel(self.table))
        self.view.selectionModel().selectionChanged.connect(self._on_selection)
        self.status.setText(f"{len(self.table)} cells from {self.run.run_dir.name}")

    def visible_rows(self) -> pd.DataFrame:
        """The rows left after filtering, in the displayed order."""
        rows = [self.proxy.mapToSource(self.proxy.index(i, 0)).row() for i in range(self.proxy.rowCount())]
        return self.table.iloc[rows]

    # -- selection
    def select_cell(self, cell_id: str) -> None:
        """Select the row of ``cell_id`` (as a click on it would)."""
        row = int(np.flatnonzero(self.table["cell_id"].to_numpy() == cell_id)[0])
        proxy_index = self.proxy.mapFromSource(self.proxy.sourceModel().index(row, 0))
        self.view.selectRow(proxy_index.row())

    def _on_selection(self, *_):
        rows = self.view.selectionModel().selectedRows()
        if not rows:
            return
        row = self.table.iloc[self.proxy.mapToSource(rows[0]).row()]
        self.show_cell(row)

    def show_cell(self, row: pd.Series) -> None:
        """Centre the view on the cell and show its crop in every test variant."""
        step = list(self.viewer.dims.current_step)
        step[0] = int(row["image_index"])
        self.viewer.dims.current_step = tuple(step)
        camera = _camera(self.viewer)
        camera.center = (float(row["centroid_r"]), float(row["centroid_c"]))
        camera.zoom = max(camera.zoom, 2.0)
        variants = list(self.run.protocol.variants.test)
        strip = variant_strip(self.run, int(row["store_index"]), variants)
        width = self.run.images.shape[2]
        name = "cell variants"
        meta = {"variants": variants, "cell_id": row["cell_id"]}
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data, layer.metadata = strip, meta
        else:
            self.viewer.add_image(
                strip, name=name, rgb=strip.ndim == 3, translate=(0, width + 8), metadata=meta
            )
        self.status.setText(f"{row['cell_id']}: {', '.join(variants)}")

    def _on_label_selected(self, event=None) -> None:
        value = self.labels_layer.selected_label
        hits = np.flatnonzero(self.table["index"].to_numpy() == value) if "index" in self.table else []
        if len(hits):
            self.select_cell(self.table["cell_id"].iloc[int(hits[0])])

    def _on_click(self, layer, event):
        value = layer.get_value(event.position, world=True)
        if value:
            layer.selected_label = int(value)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export cells", "cells.csv", "CSV (*.csv)")
        if path:
            export_cells_csv(self.visible_rows(), path)


# --------------------------------------------------------------------------- saliency
class SaliencyWidget(QWidget):
    """Choose model, train variant, seed, method and target class; overlay maps and show the
    background share."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.run = None
        self.table = pd.DataFrame()
        self.maps = None
        self.combos = {k: QComboBox() for k in ("model", "train_variant", "seed", "method", "target")}
        self.where = QComboBox()
        self.where.addItems(["crop", "field of view"])
        self.show_button = QPushButton("Show")
        self.share = QLabel("no saliency loaded")
        form = QFormLayout(self)
        for k, combo in self.combos.items():
            form.addRow(k.replace("_", " "), combo)
        form.addRow("overlay on", self.where)
        form.addRow(self.show_button)
        form.addRow(self.share)
        self.show_button.clicked.connect(lambda: self.show())
        self.load()

    def load(self, run_dir: str | Path | None = None) -> None:
        if run_dir is None:
            run_dir = _run_dir_from_layers(self.viewer)
        if run_dir is None:
            return
        self.run = RunFolder(run_dir)
        if self.run.saliency is None:
            self.share.setText("no saliency was computed for this run")
            return
        self.table = self.run.saliency.reset_index(drop=True)
        self.maps = self.run.saliency_maps()
        if "target" not in self.table:
            self.table["target"] = "predicted"
        for k, combo in self.combos.items():
            combo.clear()
            combo.addItems([str(v) for v in sorted(self.table[k].unique())])
        self.share.setText(f"{len(self.table)} maps")

    def selection(self) -> pd.DataFrame:
        """Rows of saliency.parquet matching the chosen model, train variant, seed, method, target."""
        mask = np.ones(len(self.table), bool)
        for k, combo in self.combos.items():
            mask &= self.table[k].astype(str).to_numpy() == combo.currentText()
        return self.table[mask]

    def show(self, *, cell_id: str | None = None) -> float:
        """Overlay the chosen maps; return (and print) the mean background share."""
        rows = self.selection()
        if rows.empty:
            self.share.setText("no maps for this choice")
            return float("nan")
        maps = self.maps[rows["map_index"].to_numpy()] if "map_index" in rows else self.maps[rows.index]
        mean_share = float(rows["background_share"].mean())
        label = (
            f"background share {mean_share:.2f} (ratio to area {rows['background_ratio'].mean():.2f}) "
            f"over {len(rows)} cells"
        )
        if self.where.currentText() == "crop":
            # a 2-D montage beside the images (a stack would take over the image slider)
            images, _, _ = self.run.crops()
            store = self.run.cells.set_index("cell_id").loc[rows["cell_id"], "store_index"].to_numpy()
            crops = images[store]
            crops = np.moveaxis(crops, 1, -1) if crops.shape[1] == 3 else crops[:, 0]
            beside = (0, self.run.images.shape[2] + 8)
            self._set_layer("saliency crops", montage(crops), {"rgb": crops.ndim == 4, "translate": beside})
            self._set_layer(
                "saliency",
                montage(maps),
                {"colormap": "inferno", "blending": "additive", "opacity": 0.7, "translate": beside},
            )
        else:
            self._set_layer(
                "saliency (field of view)",
                self.run.saliency_fov(rows, self.maps),
                {"colormap": "inferno", "blending": "additive", "opacity": 0.7},
            )
            if cell_id is not None:
                c = self.run.cells.set_index("cell_id").loc[cell_id]
                step = list(self.viewer.dims.current_step)
                step[0] = int(c["image_index"])
                self.viewer.dims.current_step = tuple(step)
                share = float(rows.loc[rows["cell_id"] == cell_id, "background_share"].iloc[0])
                label = f"{cell_id}: background share {share:.2f}; " + label
        self.share.setText(label)
        return mean_share

    def _set_layer(self, name, data, kwargs):
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        self.viewer.add_image(data, name=name, **kwargs)
