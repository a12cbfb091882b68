"""Open a cellbg run in napari with the plugin's widgets and save a screenshot.

Usage (needs a display; under CI use xvfb-run)::

    xvfb-run -a .venv/bin/python examples/napari_screenshot.py runs/quickstart examples/napari_plugin.png
"""

import sys

import imageio.v3 as iio
import napari

from napari_cellbg import CellBrowser, SaliencyWidget


def main(run_dir: str, out: str) -> None:
    viewer = napari.Viewer(show=False)
    viewer.window.resize(1800, 1100)
    viewer.open(run_dir, plugin="napari-cellbg")
    for name in ("saliency", "saliency crops"):
        if name in viewer.layers:
            viewer.layers[name].visible = False
    browser = CellBrowser(viewer)
    viewer.window.add_dock_widget(browser, name="Cell browser", area="right")
    saliency = SaliencyWidget(viewer)
    viewer.window.add_dock_widget(saliency, name="Saliency", area="right")
    browser.view.selectRow(5)
    viewer.reset_view()
    viewer.screenshot(canvas_only=False)  # the first call makes a hidden viewer draw
    iio.imwrite(out, viewer.screenshot(canvas_only=False))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
