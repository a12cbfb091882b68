"""Open a cellbg run in napari, show one cell in the Cell view, and save a 1600 x 1000 screenshot.

Usage (needs a display; without one use xvfb-run)::

    xvfb-run -a .venv/bin/python examples/napari_screenshot.py runs/quickstart examples/napari_plugin.png

The three actions a user takes after opening the folder: Plugins > cellbg > Cell view; sort
by a background-share column; click a row.
"""

import sys

import imageio.v3 as iio
import napari
import numpy as np

from napari_cellbg import CellView


def main(run_dir: str, out: str, *, width: int = 1600, height: int = 1000) -> None:
    viewer = napari.Viewer(show=False)
    viewer.window._qt_window.resize(width, height)
    viewer.open(f"{run_dir}/protocol.resolved.yaml", plugin=None)  # the only reader of that file
    widget = CellView(viewer)
    viewer.window.add_dock_widget(widget, name="Cell view (cellbg)", area="right")
    # a mixed_rand cell: sort by its background share (largest first) and take the top row
    share = [c for c in widget.table.columns if c.startswith("background share") and c.endswith("mixed_rand")]
    if share:
        from qtpy.QtCore import Qt

        widget.view.sortByColumn(list(widget.table.columns).index(share[0]), Qt.SortOrder.DescendingOrder)
    widget.view.selectRow(0)
    worker = widget._worker
    app = napari.qt.get_qapp()
    while worker is not None and widget.cell is None:
        app.processEvents()
    viewer.screenshot(canvas_only=False)  # the first call makes a hidden viewer draw
    viewer.reset_view()  # fit the image and the cell view to the canvas as laid out
    shot = viewer.screenshot(canvas_only=False, size=None)
    iio.imwrite(out, np.asarray(shot))
    print(out, shot.shape)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
