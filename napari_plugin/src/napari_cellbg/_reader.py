"""npe2 reader: open a cellbg run folder (or its protocol.resolved.yaml) in napari."""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_cellbg._runfolder import RunFolder, find_run_dir

__all__ = ["napari_get_reader", "read_run", "run_layers", "global_labels"]


def napari_get_reader(path):
    """Return :func:`read_run` when ``path`` is a run folder, else None (not ours)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_run if find_run_dir(path) is not None else None


def global_labels(labels: np.ndarray, cells: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray]:
    """Make instance ids unique across the image stack.

    Per-image instance ids repeat from image to image; one Labels layer over the stack
    needs one id per cell, so image i's ids are shifted by the largest id of the images
    before it. Returns the shifted labels and the offset of each image.
    """
    per_image_max = labels.reshape(len(labels), -1).max(axis=1).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_image_max)[:-1]])
    shifted = np.where(labels > 0, labels + offsets[:, None, None], 0).astype(np.int32)
    return shifted, offsets


def labels_features(run: RunFolder, offsets: np.ndarray) -> pd.DataFrame | None:
    """The cell table keyed by global label id (napari's ``index`` column)."""
    if run.cells is None:
        return None
    table = run.cell_table()
    inst = run.cells["instance"].to_numpy()
    table.insert(0, "index", offsets[run.cells["image_index"].to_numpy()] + inst)
    return table


def run_layers(run: RunFolder) -> list[tuple]:
    """Layer data tuples for a run: images, segmentation (with features), saliency."""
    layers: list[tuple] = [
        (run.images, {"name": "images", "rgb": run.rgb, "metadata": {"cellbg_run": str(run.run_dir)}}, "image")
    ]
    if run.labels is not None:
        shifted, offsets = global_labels(run.labels, run.cells)
        meta = {"cellbg_run": str(run.run_dir), "offsets": offsets}
        kwargs = {"name": "segmentation", "opacity": 0.4, "metadata": meta}
        features = labels_features(run, offsets)
        if features is not None:
            kwargs["features"] = features
        layers.append((shifted, kwargs, "labels"))
    maps = run.saliency_maps()
    if maps is not None and run.cells is not None:
        # One field-of-view layer per analysis (model, training variant, method): maps of the
        # predicted class, pasted at their cells' places, so they overlay the images directly.
        sal = run.saliency_choices()
        groups = sal.groupby(["model", "train_variant", "method"], sort=True)
        for i, ((model, train_variant, method), rows) in enumerate(groups):
            layers.append(
                (
                    run.saliency_fov(rows, maps),
                    {
                        "name": f"saliency {method} | {model} | {train_variant}",
                        "colormap": "inferno",
                        "blending": "additive",
                        "opacity": 0.7,
                        "visible": i == 0,
                        "metadata": {"table": rows.reset_index(drop=True), "cellbg_run": str(run.run_dir)},
                    },
                    "image",
                )
            )
    return layers


def read_run(path) -> list[tuple]:
    """Read a run folder into napari layers."""
    if isinstance(path, list):
        path = path[0]
    return run_layers(RunFolder(find_run_dir(path)))
