"""cellbg: how much of a microscopy classifier's accuracy comes from the cell, and how much
from the background around it.

The pipeline is one module per stage (see DESIGN.md): :mod:`cellbg.data`,
:mod:`cellbg.synth`, :mod:`cellbg.segment`, :mod:`cellbg.crops`, :mod:`cellbg.variants`,
:mod:`cellbg.models`, :mod:`cellbg.train`, :mod:`cellbg.saliency`, :mod:`cellbg.stats`,
:mod:`cellbg.report` and :mod:`cellbg.runner`. Importing :mod:`cellbg` imports none of the
heavy libraries.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellbg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"

from cellbg._checks import CellbgError

__all__ = ["__version__", "CellbgError"]
