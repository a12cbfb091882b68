"""napari-cellbg: a napari plugin that opens cellbg run folders (work in progress, issue 11)."""

__version__ = "0.1.0"
