"""napari-cellbg: open cellbg run folders in napari and inspect them cell by cell.

The plugin holds no science: it reads cellbg's files and calls cellbg's functions.
"""

import sys

__version__ = "0.1.0"

# Keep triton out of napari's process. torch (through MONAI/torchvision) and Cellpose import
# triton when it is installed; triton's bundled LLVM crashes the process (segfault) once napari
# holds an OpenGL context drawn by Mesa's llvmpipe or an LLVM-based Mesa driver. The plugin runs
# models eagerly and never compiles kernels, and torch treats a missing triton as "no triton".
# Only when nothing has imported triton yet: then no one in this process needs it.
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

from napari_cellbg._reader import napari_get_reader, read_run
from napari_cellbg._sample import quickstart_run
from napari_cellbg._widgets import CellView, segment_widget

__all__ = ["napari_get_reader", "read_run", "quickstart_run", "CellView", "segment_widget"]
