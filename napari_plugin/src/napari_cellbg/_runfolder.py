"""Read a cellbg run folder into arrays and tables for napari (no science here).

Everything comes from cellbg's own files and loaders: the resolved protocol
(:func:`cellbg.protocol.load_run`), the image table (:func:`cellbg.data.discover`), the
segmentation label images and ``cells.parquet``. One cell's variants, predictions and
saliency come from :func:`cellbg.cellview.load_cell`, the table of cells from
:func:`cellbg.cellview.cell_table`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["RunFolder", "find_run_dir"]


def find_run_dir(path: str | Path) -> Path | None:
    """The run folder for ``path`` (a run folder or its protocol.resolved.yaml), else None."""
    path = Path(path)
    if path.is_file() and path.name == "protocol.resolved.yaml":
        return path.parent
    if path.is_dir() and (path / "protocol.resolved.yaml").exists():
        return path
    return None


class RunFolder:
    """Lazy view of one run folder: its fields of view, segmentation and cells."""

    def __init__(self, run_dir: str | Path):
        from cellbg.protocol import load_run

        self.run_dir = Path(run_dir)
        self.protocol = load_run(self.run_dir)

    # ------------------------------------------------------------------ images
    @cached_property
    def image_table(self) -> pd.DataFrame:
        """The dataset's image table (image_id, path, label, patient_id, mask_path)."""
        from cellbg.data import discover

        return discover(self.protocol).reset_index(drop=True)

    def _stack(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Stack arrays of possibly different (H, W) into one, zero-padded at the far edges."""
        h = max(a.shape[0] for a in arrays)
        w = max(a.shape[1] for a in arrays)
        out = np.zeros((len(arrays), h, w, *arrays[0].shape[2:]), dtype=arrays[0].dtype)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0], : a.shape[1]] = a
        return out

    @cached_property
    def images(self) -> np.ndarray:
        """All fields of view as (N, H, W[, C]) in image-table order (RGB last for napari)."""
        from cellbg.data import read_image

        channels = self.protocol.data.channels
        arrays = []
        for path in self.image_table["path"]:
            img = read_image(path, channels=channels)
            arrays.append(np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0])
        return self._stack(arrays)

    @property
    def crop_size(self) -> int:
        """Side of the crops in pixels (``crops.size`` of the protocol)."""
        return int(self.protocol.crops.size)

    @property
    def rgb(self) -> bool:
        return self.images.ndim == 4 and self.images.shape[-1] == 3

    @cached_property
    def labels(self) -> np.ndarray | None:
        """The segmentation as (N, H, W) int32 labels, or None when not segmented yet."""
        from cellbg.data import read_mask

        seg = self.run_dir / "segmentation"
        paths = [seg / f"{i}.tif" for i in self.image_table["image_id"]]
        if not all(p.exists() for p in paths):
            return None
        return self._stack([read_mask(p) for p in paths])

    # ------------------------------------------------------------------ tables
    @cached_property
    def cells(self) -> pd.DataFrame | None:
        """``cells.parquet`` with the image's index in the stack (``image_index``)."""
        path = self.run_dir / "cells.parquet"
        if not path.exists():
            return None
        cells = pd.read_parquet(path)
        index_of = {iid: i for i, iid in enumerate(self.image_table["image_id"])}
        cells["image_index"] = cells["image_id"].map(index_of).astype(int)
        cells["store_index"] = np.arange(len(cells))
        return cells
