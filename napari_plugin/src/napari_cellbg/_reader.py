"""npe2 reader: open a cellbg run folder (or its protocol.resolved.yaml) in napari.

The reader claims nothing else: the manifest names only ``protocol.resolved.yaml`` (and
folders, which napari offers to every reader that accepts folders), and
:func:`napari_get_reader` returns None for any folder that is not a run.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_cellbg._runfolder import RunFolder, find_run_dir

__all__ = ["napari_get_reader", "read_run", "run_layers", "global_labels"]


def napari_get_reader(path):
    """Return :func:`read_run` when ``path`` is a run folder or its protocol file, else None."""
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
    """Each labelled cell's id, image and place, keyed by global label id (napari's ``index``)."""
    if run.cells is None:
        return None
    cells = run.cells
    return pd.DataFrame(
        {
            "index": offsets[cells["image_index"].to_numpy()] + cells["instance"].to_numpy(),
            "cell_id": cells["cell_id"].astype(str).to_numpy(),
            "image_index": cells["image_index"].to_numpy(),
            "centroid_r": cells["centroid_r"].to_numpy(),
            "centroid_c": cells["centroid_c"].to_numpy(),
        }
    )


def run_layers(run: RunFolder) -> list[tuple]:
    """Layer data tuples for a run: the fields of view and their segmentation.

    Saliency maps are not pasted into the fields of view: a map is computed on the test
    variant the model saw (for ``mixed_*`` another cell's background), so it is drawn over
    that image in the Cell view.
    """
    axis_labels = ("image", "row", "column")
    meta = {"cellbg_run": str(run.run_dir)}
    layers: list[tuple] = [
        (run.images, {"name": "images", "rgb": run.rgb, "metadata": meta, "axis_labels": axis_labels}, "image")
    ]
    if run.labels is not None:
        shifted, offsets = global_labels(run.labels, run.cells)
        kwargs = {
            "name": "segmentation",
            "opacity": 0.35,
            "metadata": {**meta, "offsets": offsets},
            "axis_labels": axis_labels,
        }
        features = labels_features(run, offsets)
        if features is not None:
            kwargs["features"] = features
        layers.append((shifted, kwargs, "labels"))
    return layers


def read_run(path) -> list[tuple]:
    """Read a run folder into napari layers."""
    if isinstance(path, list):
        path = path[0]
    run_dir = find_run_dir(path)
    if run_dir is None:
        raise ValueError(f"{path} is not a cellbg run folder (no protocol.resolved.yaml)")
    return run_layers(RunFolder(run_dir))
