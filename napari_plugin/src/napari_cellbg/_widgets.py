"""Widgets: Cell view and Segment. They collect choices, call cellbg, and add layers.

No science lives here: segmentation is :func:`cellbg.segment.segment`; the table of cells is
:func:`cellbg.cellview.cell_table`; one cell's test variants, predictions, saliency maps and
background shares come from :func:`cellbg.cellview.load_cell`. This module only lays them out.
"""

from pathlib import Path

import napari
import numpy as np
import pandas as pd
from magicgui import magic_factory
from napari.qt.threading import thread_worker
from qtpy.QtCore import QAbstractTableModel, QSortFilterProxyModel, Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from napari_cellbg._runfolder import RunFolder

__all__ = [
    "segment_widget",
    "save_masks_widget",
    "save_labels",
    "run_segmenter",
    "CellView",
    "export_cells_csv",
    "cell_layout",
    "overlay_style",
]


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
    options = (
        {"min_area": min_area or None, "diameter": diameter or None}
        if method == "threshold"
        else {
            "model": model,
            "diameter": diameter or None,
            "flow_threshold": flow_threshold,
            "cellprob_threshold": cellprob_threshold,
        }
    )
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


def save_labels(
    labels: np.ndarray, image_path: str | Path, *, suffix: str = "_masks", folder: str | Path | None = None
) -> Path:
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
def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


class _FrameModel(QAbstractTableModel):
    """A read-only Qt model over a DataFrame: numbers sort as numbers, 'correct' as yes/no."""

    def __init__(self, frame: pd.DataFrame):
        super().__init__()
        self.frame = frame.reset_index(drop=True)
        self._numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
        self._yes_no = [str(c).startswith("correct on") for c in frame.columns]

    def rowCount(self, parent=None):  # noqa: N802 (Qt API)
        return 0 if parent is not None and parent.isValid() else len(self.frame)

    def columnCount(self, parent=None):  # noqa: N802
        return 0 if parent is not None and parent.isValid() else self.frame.shape[1]

    def sort_key(self, row: int, column: int):
        """float (NaN when missing) for numeric columns, str otherwise."""
        value = self.frame.iat[row, column]
        if self._numeric[column]:
            return float(value) if not pd.isna(value) else float("nan")
        return "" if pd.isna(value) else str(value)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        r, c = index.row(), index.column()
        if role == Qt.ItemDataRole.DisplayRole:
            key = self.sort_key(r, c)
            if isinstance(key, float):
                if np.isnan(key):
                    return ""
                if self._yes_no[c]:
                    return "yes" if key else "no"
                return f"{key:.0f}" if float(key).is_integer() else f"{key:.2f}"
            return key
        if role == Qt.ItemDataRole.UserRole:
            return self.sort_key(r, c)
        if role == Qt.ItemDataRole.TextAlignmentRole and self._numeric[c]:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if role not in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole):
            return None
        if orientation == Qt.Orientation.Horizontal:
            name = str(self.frame.columns[section])
            if role == Qt.ItemDataRole.ToolTipRole:
                return name
            return name.replace("background share, ", "background\nshare\n").replace(" on ", "\non ", 1)
        return str(section + 1)


class _SortProxy(QSortFilterProxyModel):
    """Sorts by the model's sort keys, missing values last in either order."""

    def lessThan(self, left, right):  # noqa: N802 (Qt API)
        model = self.sourceModel()
        a = model.sort_key(left.row(), left.column())
        b = model.sort_key(right.row(), right.column())
        a_nan, b_nan = bool(_is_missing(a) or a == ""), bool(_is_missing(b) or b == "")
        if a_nan or b_nan:
            if a_nan and b_nan:
                return False
            # the view reverses lessThan for descending order: missing is "largest" ascending,
            # "smallest" descending, so it ends up last both ways
            descending = self.sortOrder() == Qt.SortOrder.DescendingOrder
            return bool(a_nan if descending else b_nan)
        if isinstance(a, float) and isinstance(b, float):
            return bool(a < b)
        return bool(str(a) < str(b))


def export_cells_csv(table: pd.DataFrame, path: str | Path) -> Path:
    """Write the cell table to CSV (atomically)."""
    from cellbg._io import atomic_path

    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return Path(path)


# --------------------------------------------------------------------------- display choices
def overlay_style(images: np.ndarray) -> dict:
    """Colormap and blending for saliency over ``images`` (values in [0, 1]).

    Zero attribution is transparent and the colour grows opaque with the map, so the image
    shows through where the model does not look. Over bright images (brightfield, mean above
    0.5) the colour is a dark blue, over dark ones (fluorescence) a bright yellow.
    """
    from napari.utils.colormaps import Colormap

    bright = float(np.nanmean(images)) > 0.5
    if bright:
        colors = [[0.0, 0.1, 0.6, 0.0], [0.0, 0.2, 0.9, 0.55], [0.0, 0.0, 0.35, 0.95]]
        name, words = "cellbg saliency (bright images)", "dark blue"
    else:
        colors = [[1.0, 0.3, 0.0, 0.0], [1.0, 0.55, 0.0, 0.55], [1.0, 1.0, 0.2, 0.95]]
        name, words = "cellbg saliency (dark images)", "yellow"
    cmap = Colormap(colors=colors, controls=[0.0, 0.5, 1.0], name=name, display_name=name)
    return {"colormap": cmap, "blending": "translucent", "opacity": 0.9, "bright": bright, "words": words}


def _display(image: np.ndarray) -> np.ndarray:
    """(C, S, S) -> (S, S, 3) for three channels, else (S, S) (mean of the channels)."""
    image = np.asarray(image, np.float32)
    return np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image.mean(axis=0)


def cell_layout(view) -> dict:
    """Where each tile of a cell view goes, in crop pixels from the montage's top-left corner.

    Row 0: the crop, then each test variant that has saliency maps; one more row per method,
    with each map under the column of the variant it was computed on; then the other test
    variants, wrapped to the same width. Rows leave room above each tile for three lines of
    text.

    Returns
    -------
    dict
        ``rows`` (``'images'``, the methods, then ``'other'`` rows), ``side`` (tile side),
        ``shape`` (montage rows, columns), ``methods`` and ``at[(row, column)] = (r, c)``
        (tile corner; ``row`` is ``'images'`` or a method, ``column`` ``'crop'`` or a variant).
    """
    side = int(view.crop.shape[-1])
    methods = list(dict.fromkeys(m for _, m in view.maps))
    mapped = [v for v in view.variants if any((v, m) in view.maps for m in methods)]
    others = [v for v in view.variants if v not in mapped]
    width = max(1 + len(mapped), min(len(others), 5))
    gap, text = max(4, round(0.4 * side)), max(8, round(0.8 * side))
    step_r, step_c = side + text, side + gap
    at = {("images", "crop"): (text, 0)}
    for j, variant in enumerate(mapped, start=1):
        at["images", variant] = (text, j * step_c)
        for i, method in enumerate(methods, start=1):
            if (variant, method) in view.maps:
                at[method, variant] = (text + i * step_r, j * step_c)
    first_other = 1 + len(methods)
    for k, variant in enumerate(others):
        i, j = divmod(k, width)
        at["images", variant] = (text + (first_other + i) * step_r, j * step_c)
    n_rows = first_other + -(-len(others) // width)
    shape = (n_rows * step_r, width * step_c - gap)
    return {
        "side": side,
        "text": text,
        "at": at,
        "methods": methods,
        "mapped": mapped,
        "others": others,
        "shape": shape,
    }


# --------------------------------------------------------------------------- cell view
class CellView(QWidget):
    """One model at a time: a table of cells; a selected cell's crop, test variants and saliency.

    Choose the model and its training variant at the top; select a row (or click a cell in
    the canvas) to outline the cell in its image and lay out, under the image, its crop with
    the mask outline, every test variant labelled with the model's prediction and
    probability, and one row per saliency method with each map over the very image it was
    computed on, labelled with the cell's own background share.
    """

    LAYER_PREFIX = "cell view: "

    def sizeHint(self):  # noqa: N802 (Qt API): leave the canvas most of a 1600-pixel window
        from qtpy.QtCore import QSize

        return QSize(470, 900)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.run: RunFolder | None = None
        self.table = pd.DataFrame()
        self.cell = None  # the CellView (cellbg.cellview) on show
        self.layout_info: dict = {}
        self._worker = None
        self._pending = None

        self.model_box, self.train_box, self.seed_box = QComboBox(), QComboBox(), QComboBox()
        self.target_box = QComboBox()
        self.target_box.addItems(["predicted class", "true class"])
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("filter rows: text in any column")
        self.export_button = QPushButton("Export CSV…")
        self.view = QTableView()
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        vheader, hheader = self.view.verticalHeader(), self.view.horizontalHeader()
        assert vheader is not None and hheader is not None  # a QTableView always has both headers
        vheader.setDefaultSectionSize(22)
        hheader.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        hheader.setDefaultSectionSize(96)
        self.proxy = _SortProxy()
        self.proxy.setFilterKeyColumn(-1)
        self.proxy.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.view.setModel(self.proxy)
        self.summary = QLabel("open a cellbg run folder (File > Open, or File > Open Sample > cellbg)")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        self.summary.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.legend = QLabel("")
        self.legend.setWordWrap(True)

        choose = QGridLayout()
        for k, (text, box) in enumerate(
            (
                ("model", self.model_box),
                ("trained on", self.train_box),
                ("seed", self.seed_box),
                ("maps of", self.target_box),
            )
        ):
            choose.addWidget(QLabel(text), k // 2, 2 * (k % 2))
            choose.addWidget(box, k // 2, 2 * (k % 2) + 1)
            box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            box.setMinimumContentsLength(8)
        tools = QHBoxLayout()
        tools.addWidget(self.filter, 1)
        tools.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(choose)
        layout.addLayout(tools)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.summary)
        layout.addWidget(self.legend)

        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        self.export_button.clicked.connect(self._export_dialog)
        self.model_box.currentTextChanged.connect(lambda *_: self._fill_train_box())
        self.train_box.currentTextChanged.connect(lambda *_: self._fill_seed_box())
        self.seed_box.currentTextChanged.connect(lambda *_: self.reload_table())
        self.target_box.currentTextChanged.connect(lambda *_: self.reload_table())
        self.viewer.layers.events.inserted.connect(self._maybe_load)
        if self._on_canvas_click not in self.viewer.mouse_drag_callbacks:
            self.viewer.mouse_drag_callbacks.append(self._on_canvas_click)
        self.load()

    # ------------------------------------------------------------------ choices
    @property
    def target(self) -> str:
        return "true" if self.target_box.currentText().startswith("true") else "predicted"

    def _maybe_load(self, event=None) -> None:
        if self.run is None and _run_dir_from_layers(self.viewer) is not None:
            self.load()

    def load(self, run_dir: str | Path | None = None) -> None:
        """Load the run the viewer's layers came from (or ``run_dir``) and its analyses."""
        from cellbg.cellview import analyses

        run_dir = run_dir or _run_dir_from_layers(self.viewer)
        if run_dir is None:
            return
        self.run = RunFolder(run_dir)
        self.analyses = analyses(self.run.run_dir)
        self.viewer.dims.axis_labels = ("image", "row", "column")[-self.viewer.dims.ndim :]
        self.model_box.blockSignals(True)
        self.model_box.clear()
        self.model_box.addItems(list(dict.fromkeys(self.analyses["model"].astype(str))))
        self.model_box.blockSignals(False)
        self._fill_train_box()

    def _fill_train_box(self) -> None:
        rows = self.analyses[self.analyses["model"] == self.model_box.currentText()]
        self.train_box.blockSignals(True)
        self.train_box.clear()
        self.train_box.addItems(list(dict.fromkeys(rows["train_variant"].astype(str))))
        self.train_box.blockSignals(False)
        self._fill_seed_box()

    def _fill_seed_box(self) -> None:
        rows = self.analyses[
            (self.analyses["model"] == self.model_box.currentText())
            & (self.analyses["train_variant"] == self.train_box.currentText())
        ]
        self.seed_box.blockSignals(True)
        self.seed_box.clear()
        self.seed_box.addItems([str(s) for s in rows["seed"]])
        self.seed_box.blockSignals(False)
        self.reload_table()

    def choose(self, *, model: str | None = None, train_variant: str | None = None) -> None:
        """Show another model or training variant (as picking them in the boxes would)."""
        if model is not None:
            self.model_box.setCurrentText(model)
        if train_variant is not None:
            self.train_box.setCurrentText(train_variant)

    def reload_table(self) -> None:
        """The table of the chosen model / training variant (:func:`cellbg.cellview.cell_table`)."""
        from cellbg.cellview import cell_table

        if self.run is None or not self.model_box.currentText() or not self.train_box.currentText():
            return
        seed = int(self.seed_box.currentText()) if self.seed_box.currentText() else None
        self.table = cell_table(
            self.run.run_dir,
            model=self.model_box.currentText(),
            train_variant=self.train_box.currentText(),
            seed=seed,
            target=self.target,
        )
        self.proxy.setSourceModel(_FrameModel(self.table))
        selection = self.view.selectionModel()
        assert selection is not None  # the view has a model (the proxy), hence a selection model
        selection.selectionChanged.connect(self._on_selection)
        self.view.resizeColumnsToContents()
        for c, name in enumerate(self.table.columns):
            if pd.api.types.is_numeric_dtype(self.table[name]):
                self.view.setColumnWidth(c, 84)
        n_maps = int(self.table.filter(like="background share").notna().any(axis=1).sum())
        self.summary.setText(
            f"{len(self.table)} cells ({n_maps} with saliency) · <b>{self.model_box.currentText()}</b> trained on "
            f"<b>{self.train_box.currentText()}</b>. Select a row, or click a cell in the image."
        )
        if self.cell is not None:
            self.show_cell(self.cell.cell_id)

    def visible_rows(self) -> pd.DataFrame:
        """The rows left after filtering, in the displayed order."""
        rows = [self.proxy.mapToSource(self.proxy.index(i, 0)).row() for i in range(self.proxy.rowCount())]
        return self.table.iloc[rows]

    # ------------------------------------------------------------------ selection
    def select_cell(self, cell_id: str) -> None:
        """Select the row of ``cell_id`` (as a click on it would)."""
        hits = np.flatnonzero(self.table["cell"].to_numpy() == str(cell_id))
        if not len(hits):
            raise ValueError(f"cell '{cell_id}' is not in the table")
        source = self.proxy.sourceModel()
        assert source is not None  # a non-empty table is always the proxy's source
        proxy_index = self.proxy.mapFromSource(source.index(int(hits[0]), 0))
        if not proxy_index.isValid():  # filtered out: clear the filter first
            self.filter.setText("")
            proxy_index = self.proxy.mapFromSource(source.index(int(hits[0]), 0))
        self.view.selectRow(proxy_index.row())
        self.view.scrollTo(proxy_index)

    def _on_selection(self, *_):
        rows = self.view.selectionModel().selectedRows()
        if rows:
            self.show_cell(str(self.table["cell"].iloc[self.proxy.mapToSource(rows[0]).row()]))

    def _on_canvas_click(self, viewer, event):
        labels = next((ly for ly in viewer.layers if ly.name == "segmentation" and "offsets" in ly.metadata), None)
        if labels is None or self.table.empty:
            return
        value = labels.get_value(event.position, world=True)
        if not value:
            return
        features = labels.features
        hits = np.flatnonzero(features["index"].to_numpy() == int(value))
        if len(hits):
            self.select_cell(str(features["cell_id"].iloc[int(hits[0])]))

    # ------------------------------------------------------------------ one cell
    def _loaded_run(self) -> RunFolder:
        """The run folder shown; a one-line error when none is loaded yet."""
        if self.run is None:
            raise ValueError("no cellbg run folder is loaded; open one first")
        return self.run

    def show_cell(self, cell_id: str):
        """Load ``cell_id`` in a thread (:func:`cellbg.cellview.load_cell`), then lay it out.

        Returns the worker; the layers appear when it returns (``self.cell.cell_id``).
        """
        from cellbg.cellview import load_cell

        self._outline(cell_id)
        kwargs = {
            "model": self.model_box.currentText(),
            "train_variant": self.train_box.currentText(),
            "seed": int(self.seed_box.currentText()) if self.seed_box.currentText() else None,
            "target": self.target,
        }
        run_dir = self._loaded_run().run_dir
        self.summary.setText(f"loading {cell_id} …")

        @thread_worker
        def _work():
            return load_cell(run_dir, cell_id, **kwargs)

        worker = _work()
        worker.returned.connect(self._draw)
        worker.errored.connect(lambda exc: self.summary.setText(f"cellbg: {exc}"))
        self._worker = worker
        worker.start()
        return worker

    def _outline(self, cell_id: str) -> None:
        """Go to the cell's image and outline its crop (the window the model saw)."""
        run = self._loaded_run()
        if run.cells is None:
            raise ValueError(f"no cells.parquet in {run.run_dir}; run 'cellbg segment' first")
        cells = run.cells.set_index(run.cells["cell_id"].astype(str))
        c = cells.loc[str(cell_id)]
        step = list(self.viewer.dims.current_step)
        step[0] = int(c["image_index"])
        self.viewer.dims.current_step = tuple(step)
        side = float(run.crop_size) / float(c.get("scale", 1.0) or 1.0)
        r0, c0 = float(c["crop_r0"]), float(c["crop_c0"])
        i = int(c["image_index"])
        r1, c1 = r0 + side, c0 + side
        rect = np.array([[i, r0, c0], [i, r0, c1], [i, r1, c1], [i, r1, c0]], float)
        name = self.LAYER_PREFIX + "selected cell"
        width = max(1.0, run.images.shape[1] / 150)
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = []
            layer.add_rectangles(rect, edge_color="#ffd400", face_color="transparent", edge_width=width)
        else:
            layer = self.viewer.add_shapes(
                rect,
                shape_type="rectangle",
                edge_color="#ffd400",
                face_color="transparent",
                edge_width=width,
                name=name,
                axis_labels=("image", "row", "column"),
            )
        layer.metadata = {"cell_id": str(cell_id)}

    def _draw(self, view) -> None:
        """Lay out one cell's crop, variants and maps under the field of view."""
        self.cell = view
        h, w = self._loaded_run().images.shape[1:3]
        info = cell_layout(view)
        # the montage right of the image and about 2.4 times as tall: the canvas shows both,
        # with the tiles (not the whole field of view) at the larger size
        scale = max(1.0, 2.4 * h / info["shape"][0])
        origin = (0.0, w + 0.05 * w)
        self.layout_info = {**info, "scale": scale, "origin": origin}
        side = info["side"]
        tiles = {
            key: view.crop
            if key[1] == "crop"
            else (view.variants[key[1]] if key[0] == "images" else view.shown.get(key[1], view.variants[key[1]]))
            for key in info["at"]
        }
        first = _display(view.crop)
        montage = np.zeros((*info["shape"], *first.shape[2:]), np.float32)
        for key, (r, c) in info["at"].items():
            montage[r : r + side, c : c + side] = _display(tiles[key])
        rgb = montage.ndim == 3
        tag = f"{view.model}/{view.train_variant}"
        style = overlay_style(np.stack([_display(t) for t in tiles.values()]))
        keep = set()

        def put(name, data, kind="image", prefix=True, **kwargs):
            name = self.LAYER_PREFIX + name if prefix else name
            keep.add(name)
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            kwargs["metadata"] = {**kwargs.get("metadata", {}), "cellbg_cell_view": True}
            return getattr(self.viewer, f"add_{kind}")(data, name=name, **kwargs)

        world = {key: (origin[0] + r * scale, origin[1] + c * scale) for key, (r, c) in info["at"].items()}
        put(
            "crop and variants",
            np.clip(montage, 0, 1),
            rgb=rgb,
            translate=origin,
            scale=(scale, scale),
            contrast_limits=None if rgb else (0.0, 1.0),
            metadata={"cell_id": view.cell_id, "at": info["at"]},
        )
        for method in info["methods"]:
            top = max(float(np.max(m)) for (_, mm), m in view.maps.items() if mm == method)
            top = top if top > 0 else 1.0
            for (variant, mm), amap in view.maps.items():
                if mm != method:
                    continue
                put(
                    f"{variant} · {method} · {tag}",
                    amap,
                    prefix=False,
                    translate=world[method, variant],
                    scale=(scale, scale),
                    colormap=style["colormap"],
                    blending=style["blending"],
                    opacity=style["opacity"],
                    contrast_limits=(0.0, top),
                    metadata={
                        "cell_id": view.cell_id,
                        "tile": (method, variant),
                        "model": view.model,
                        "train_variant": view.train_variant,
                        "test_variant": variant,
                        "method": method,
                        "background_share": view.background_share(variant, method),
                    },
                )
        self._add_outline(put, view.mask, world, scale)
        self._add_text(put, info, world, view, scale)
        for layer in list(self.viewer.layers):
            if layer.metadata.get("cellbg_cell_view") and layer.name not in keep:
                self.viewer.layers.remove(layer)
        maps = [ly for ly in self.viewer.layers if "method" in ly.metadata and ly.metadata.get("cellbg_cell_view")]
        if maps:
            self.viewer.layers.selection.active = maps[-1]
        self._write_summary(view, style)
        self.viewer.reset_view()

    def _add_outline(self, put, mask, world, scale) -> None:
        """The cell's mask contour over every tile (Shapes paths traced from the mask)."""
        from skimage.measure import find_contours

        paths = []
        for contour in find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
            contour = (contour - 1 + 0.5) * scale  # pixel centres in tile coordinates
            for r, c in world.values():
                paths.append(contour + np.array([r, c]) - 0.5 * scale)
        if paths:
            put(
                "mask outline",
                paths,
                kind="shapes",
                shape_type="path",
                edge_color="#00e5ff",
                edge_width=max(0.5, 0.5 * scale),
                opacity=0.9,
            )

    def _add_text(self, put, info, world, view, scale) -> None:
        """Labels above every tile: the variant and the model's answer; the method and the share."""
        points, text = [], []
        for (row, col), (r, c) in world.items():
            if row == "images":
                if col == "crop":
                    words = f"crop\n{view.label}\n{view.patient_id}"
                else:
                    p = view.predictions.loc[col]
                    mark = "right" if bool(p["correct"]) else "WRONG"
                    words = f"{col}\n{p['pred']} {float(p['probability']):.2f}\n{mark}"
            else:
                words = f"bg share\n{view.background_share(col, row):.2f}"
            points.append((r - 0.45 * info["text"] * scale, c + 0.5 * info["side"] * scale))  # centred above
            text.append(words)
        crop_r, crop_c = world["images", "crop"]
        for method in info["methods"]:  # the method's name in the empty crop column of its row
            r = min(rr for (row, _), (rr, _c) in world.items() if row == method)
            points.append((r + 0.5 * info["side"] * scale, crop_c + 0.5 * info["side"] * scale))
            text.append(method.replace("_", "\n"))
        put(
            "labels",
            np.asarray(points, float),
            kind="points",
            size=0.01,
            face_color="transparent",
            border_width=0,
            features={"text": text},
            text={"string": "{text}", "size": 7, "color": "white", "anchor": "center"},
        )

    def _write_summary(self, view, style) -> None:
        shares = []
        for method in dict.fromkeys(m for _, m in view.maps):
            parts = [f"{v} {view.background_share(v, method):.2f}" for v, mm in view.maps if mm == method]
            shares.append(f"{method}: " + ", ".join(parts))
        partners = "; ".join(f"{v} on the background of {p}" for v, p in view.partners.items())
        self.summary.setText(
            f"<b>{view.cell_id}</b> · {view.label} · patient {view.patient_id} · held out in fold {view.fold} · "
            f"<b>{view.model}</b> trained on <b>{view.train_variant}</b> (seed {view.seed})<br>"
            f"this cell's background share — " + " · ".join(shares) + (f"<br>{partners}" if partners else "")
        )
        self.legend.setText(
            f"Legend: yellow box = the selected cell's crop in its image; cyan line = its mask. Saliency "
            f"({'bright' if style['bright'] else 'dark'} images): transparent = no attribution, "
            f"opaque {style['words']} = the most, scaled per method over this cell's maps. Each map lies on the "
            f"image it was computed on; 'bg share' = the map's share outside the mask."
        )

    # ------------------------------------------------------------------ export
    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export cells", "cells.csv", "CSV (*.csv)")
        if path:
            export_cells_csv(self.visible_rows(), path)
