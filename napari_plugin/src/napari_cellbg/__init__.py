"""napari-cellbg: open cellbg run folders in napari and inspect them cell by cell.

The plugin holds no science: it reads cellbg's files and calls cellbg's functions.
"""

__version__ = "0.1.0"

from napari_cellbg._reader import napari_get_reader, read_run
from napari_cellbg._widgets import CellBrowser, SaliencyWidget, segment_widget

__all__ = ["napari_get_reader", "read_run", "CellBrowser", "SaliencyWidget", "segment_widget"]
