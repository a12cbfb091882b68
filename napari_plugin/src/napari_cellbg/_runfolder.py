"""Read a cellbg run folder into arrays and tables for napari (no science here).

Everything comes from cellbg's own files and loaders: the resolved protocol
(:func:`cellbg.protocol.load_run`), the image table (:func:`cellbg.data.discover_manifest` /
``discover``), the segmentation label images, ``cells.parquet``, ``crops.zarr``
(:func:`cellbg.crops.load_crops`), ``predictions.parquet`` and ``saliency.parquet`` /
``saliency.zarr``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["RunFolder", "find_run_dir", "montage"]


def find_run_dir(path: str | Path) -> Path | None:
    """The run folder for ``path`` (a run folder or its protocol.resolved.yaml), else None."""
    path = Path(path)
    if path.is_file() and path.name == "protocol.resolved.yaml":
        return path.parent
    if path.is_dir() and (path / "protocol.resolved.yaml").exists():
        return path
    return None


def montage(tiles: np.ndarray, *, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Arrange tiles (k, S, S[, C]) in a grid with ``gap`` pixels between them (row-major)."""
    k, h, w = tiles.shape[:3]
    columns = columns or int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / columns))
    out = np.zeros((rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles.shape[3:]), tiles.dtype)
    for i, tile in enumerate(tiles):  # one slice assignment per tile, not per pixel
        r, c = divmod(i, columns)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tile
    return out


class RunFolder:
    """Lazy view of one run folder: images, labels, cells, predictions, saliency."""

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

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        path = self.run_dir / "predictions.parquet"
        return pd.read_parquet(path) if path.exists() else None

    @cached_property
    def saliency(self) -> pd.DataFrame | None:
        path = self.run_dir / "saliency.parquet"
        return pd.read_parquet(path) if path.exists() else None

    def saliency_maps(self) -> np.ndarray | None:
        """The saliency maps (k, H, W), row j described by row j of :attr:`saliency`."""
        path = self.run_dir / "saliency.zarr"
        if self.saliency is None or not path.exists():
            return None
        import zarr

        return np.asarray(zarr.open_group(str(path), mode="r")["maps"][:])

    def saliency_fov(self, rows: pd.DataFrame, maps: np.ndarray) -> np.ndarray:
        """Paste the maps of saliency ``rows`` into field-of-view coordinates: (N, H, W).

        Each map covers its cell's crop (origin ``crop_r0, crop_c0``, ``scale`` crop pixels
        per image pixel); where crops of neighbouring cells overlap the larger value is kept;
        pixels outside every sampled crop are 0.
        """
        from skimage.transform import resize

        n, h, w = self.images.shape[:3]
        out = np.zeros((n, h, w), np.float32)
        cells = self.cells.set_index("cell_id")
        for j, row in zip(rows["map_index"].to_numpy(), rows.itertuples()):
            c = cells.loc[row.cell_id]
            m = maps[j]
            scale = float(c["scale"])
            if scale != 1.0:
                size = max(1, int(round(m.shape[0] / scale)))
                m = resize(m, (size, size), order=1, preserve_range=True, anti_aliasing=scale > 1)
            r0, c0 = int(round(c["crop_r0"])), int(round(c["crop_c0"]))
            rr0, cc0 = max(r0, 0), max(c0, 0)
            rr1, cc1 = min(r0 + m.shape[0], h), min(c0 + m.shape[1], w)
            if rr1 <= rr0 or cc1 <= cc0:
                continue
            plane = out[int(c["image_index"])]
            patch = m[rr0 - r0: rr1 - r0, cc0 - c0: cc1 - c0]
            np.maximum(plane[rr0:rr1, cc0:cc1], patch, out=plane[rr0:rr1, cc0:cc1])
        return out

    def saliency_choices(self) -> pd.DataFrame:
        """One row per (model, train_variant, method) with maps for the predicted class of the
        first seed: the analyses the reader shows as field-of-view layers."""
        sal = self.saliency
        if "target" in sal and (sal["target"] == "predicted").any():
            sal = sal[sal["target"] == "predicted"]
        sal = sal[sal["seed"] == sal["seed"].min()]
        return sal

    def crops(self):
        """(images (n, C, S, S), masks (n, S, S), cells) from the crop store."""
        from cellbg.crops import load_crops

        return load_crops(self.run_dir)

    def cell_table(self) -> pd.DataFrame:
        """One row per cell: label, patient, and per (model, train, test) the prediction,
        whether it is correct, and the mean background share per model where computed (of
        the maps for the predicted class when both predicted and true were computed).

        Columns of the per-condition parts are named ``pred|model|train|test`` and
        ``correct|model|train|test`` (first seed and fold that predicted the cell).
        """
        cells = self.cells
        if cells is None:
            raise FileNotFoundError(f"{self.run_dir} has no cells.parquet (run `cellbg crops` first)")
        table = cells[
            ["cell_id", "image_id", "patient_id", "label", "fold", "area", "image_index",
             "store_index", "centroid_r", "centroid_c"]
        ].copy()
        preds = self.predictions
        if preds is not None and len(preds):
            first = preds.sort_values(["seed", "fold"]).drop_duplicates(
                ["cell_id", "model", "train_variant", "test_variant"]
            )
            key = first["model"] + "|" + first["train_variant"] + "|" + first["test_variant"]
            wide_pred = first.assign(key="pred|" + key).pivot(index="cell_id", columns="key", values="pred")
            wide_ok = first.assign(key="correct|" + key).pivot(index="cell_id", columns="key", values="correct")
            table = table.merge(wide_pred, left_on="cell_id", right_index=True, how="left")
            table = table.merge(wide_ok, left_on="cell_id", right_index=True, how="left")
        sal = self.saliency
        if sal is not None and "target" in sal and (sal["target"] == "predicted").any():
            sal = sal[sal["target"] == "predicted"]  # one map per cell: the predicted class's
        if sal is not None and len(sal):
            share = sal.groupby(["cell_id", "model", "train_variant"])["background_share"].mean().reset_index()
            share["key"] = "bg_share|" + share["model"] + "|" + share["train_variant"]
            wide = share.pivot(index="cell_id", columns="key", values="background_share")
            table = table.merge(wide, left_on="cell_id", right_index=True, how="left")
        return table
