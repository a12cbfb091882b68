"""Single-cell crops, their masks, and the cell table.

:func:`crop_cells` turns one image and its instance labels into fixed-size crops, one per
cell, centred on the cell's bounding box, either at the image's pixel size (``scale="keep"``)
or resampled so the cell's longer side fills ``fit_fraction`` of the crop
(``scale="fit"``). Crops that reach past the image border are zero-padded and the padding is
recorded. Each crop's mask holds only its own cell; other cells in the crop count as
background and are flagged in ``other_cells``. Their pixels, and those of any non-target
objects the dataset labels (a manifest's ``objects`` column), form the crop's ``others``
mask, which the ``no_others`` variant replaces by the fill.

:func:`run_crops` does this for every image of a protocol's dataset, in parallel over
images, and writes the cell table and the crop store (layout in ``docs/contracts.md``)::

    <run>/cells.parquet   one row per cell, in store order
    <run>/crops.zarr      images (n, C, S, S) in the source dtype, masks bool (n, S, S),
                          others bool (n, S, S)
    <run>/crops.json      cell counts, what each filter removed, the store's bytes

The store keeps the source pixels (uint8 / uint16 as read; float sources as float32) and
their divisor (``attrs["divisor"]``, the dtype's maximum): readers get float32 in [0, 1],
scaled on the fly. Rows are chunked in blocks of about 1 MiB of source pixels, compressed
with Blosc (zstd, byte shuffle), so a mini-batch reads a few chunks (see
:class:`CropStore`). :func:`load_crops` and :func:`open_store` read them back,
:func:`load_others` the ``others`` masks.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, check_nd, check_same_shape, look_up_option

__all__ = [
    "CellCrops",
    "crop_cells",
    "crop_cells_naive",
    "run_crops",
    "load_crops",
    "load_others",
    "open_store",
    "CropStore",
    "CELL_COLUMNS",
    "FILTERS",
]

#: Columns of ``cells.parquet``, in order (contract columns, then the padding per side).
CELL_COLUMNS = [
    "cell_id", "image_id", "patient_id", "label", "label_index", "fold", "instance",
    "area", "eccentricity", "solidity", "centroid_r", "centroid_c",
    "crop_r0", "crop_c0", "scale", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1",
    "padded", "other_cells", "touches_border",
    "pad_top", "pad_bottom", "pad_left", "pad_right", "clipped",
]  # fmt: skip

#: Cell filters, in the order they are applied; ``crops.json`` counts what each removed.
FILTERS = ("min_area", "max_area", "border", "solidity")

# Columns computed per image by crop_cells (the rest come from the image table).
_GEOMETRY = CELL_COLUMNS[CELL_COLUMNS.index("instance") :]


@dataclass(frozen=True)
class CellCrops:
    """Crops of the cells of one image.

    Attributes
    ----------
    images : (n, C, S, S) ndarray of float32
        In [0, 1] (integer images divided by their dtype's maximum; floats as they are).
    masks : (n, S, S) ndarray of bool
        Each crop's own cell.
    table : DataFrame
        One row per crop: ``instance`` and the geometry columns of :data:`CELL_COLUMNS`.
    removed : dict
        Cells removed by each filter of :data:`FILTERS`.
    others : (n, S, S) ndarray of bool
        Pixels of every other labelled object in each crop: other cells (filtered out or
        not) and the non-target objects of ``objects``.
    """

    images: np.ndarray
    masks: np.ndarray
    table: pd.DataFrame
    removed: dict = field(default_factory=dict)
    others: np.ndarray | None = None


def _to_unit(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The image and the divisor that maps its dtype's range to [0, 1]."""
    if image.dtype == bool:
        return image, 1.0
    if np.issubdtype(image.dtype, np.integer):
        return image, float(np.iinfo(image.dtype).max)
    return image, 1.0


def _properties(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cell area, box, centroid, eccentricity and solidity, from one pass of bincounts.

    Eccentricity is scikit-image's (from the eigenvalues of the pixel-coordinate
    covariance). Solidity is the area over the area of the convex hull of the cell's pixel
    squares (a filled rectangle is exactly 1); the hull is the only per-cell step.
    """
    from scipy import ndimage as ndi
    from scipy.spatial import ConvexHull, QhullError

    slices = ndi.find_objects(labels)
    ids = np.array([i + 1 for i, sl in enumerate(slices) if sl is not None], np.int64)
    rr, cc = np.nonzero(labels)  # moments from the cell pixels only (a few % of the image)
    flat = labels[rr, cc]
    rr, cc = rr.astype(np.float64), cc.astype(np.float64)
    n = int(labels.max()) + 1
    area = np.bincount(flat, minlength=n).astype(np.float64)
    sum_r, sum_c = np.bincount(flat, rr, n), np.bincount(flat, cc, n)
    sum_rr, sum_cc = np.bincount(flat, rr * rr, n), np.bincount(flat, cc * cc, n)
    sum_rc = np.bincount(flat, rr * cc, n)
    a = area[ids]
    mr, mc = sum_r[ids] / a, sum_c[ids] / a
    var_r, var_c = sum_rr[ids] / a - mr**2, sum_cc[ids] / a - mc**2
    cov = sum_rc[ids] / a - mr * mc
    half_gap = np.sqrt(((var_r - var_c) / 2) ** 2 + cov**2)
    l1 = (var_r + var_c) / 2 + half_gap
    l2 = np.maximum((var_r + var_c) / 2 - half_gap, 0)
    ecc = np.sqrt(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0))
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    box = np.empty((len(ids), 4), np.int64)
    hull_area = np.empty(len(ids))
    for j, i in enumerate(ids):
        sl = slices[i - 1]
        box[j] = sl[0].start, sl[1].start, sl[0].stop, sl[1].stop
        pts = np.argwhere(labels[sl] == i)
        pts = (pts[:, None, :] + corners[None]).reshape(-1, 2)
        try:
            hull_area[j] = ConvexHull(pts).volume
        except QhullError:  # a degenerate cell: its pixel squares are its hull
            hull_area[j] = a[j]
    return {
        "instance": ids,
        "area": a.astype(np.int64),
        "r0": box[:, 0],
        "c0": box[:, 1],
        "r1": box[:, 2],
        "c1": box[:, 3],
        "centroid_r": mr,
        "centroid_c": mc,
        "eccentricity": ecc,
        "solidity": np.minimum(a / hull_area, 1.0),
    }


def _filter(props: dict, shape, *, min_area, max_area, exclude_border, min_solidity):
    """Apply the filters in order; return the kept cells and the count each one removed."""
    h, w = shape
    props = dict(props)
    props["touches_border"] = (props["r0"] == 0) | (props["c0"] == 0) | (props["r1"] == h) | (props["c1"] == w)
    tests = {
        "min_area": props["area"] >= min_area,
        "max_area": props["area"] <= (max_area if max_area is not None else np.inf),
        "border": ~props["touches_border"] if exclude_border else np.ones(len(props["area"]), bool),
        "solidity": props["solidity"] >= min_solidity,
    }
    keep = np.ones(len(props["area"]), bool)
    removed = {}
    for name in FILTERS:
        removed[name] = int((keep & ~tests[name]).sum())
        keep &= tests[name]
    return {k: v[keep] for k, v in props.items()}, removed


def crop_cells(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    size: int = 64,
    scale: str = "keep",
    fit_fraction: float = 0.6,
    min_area: int = 20,
    max_area: int | None = None,
    exclude_border: bool = True,
    min_solidity: float = 0.0,
    objects: np.ndarray | None = None,
    raw: bool = False,
) -> CellCrops:
    """Cut one fixed-size crop and mask per cell of a labelled image.

    All cells are cut at once: the image is padded once and every crop is gathered with
    one fancy-indexing step (``scale="keep"``), or every crop is resampled with one
    ``map_coordinates`` call per channel (``scale="fit"``).

    Parameters
    ----------
    image : (C, M, N) or (M, N) ndarray
    labels : (M, N) ndarray of int
        Instance labels, 0 = background.
    size : int
        Crop side S in pixels.
    scale : {'keep', 'fit'}
        ``'keep'``: image pixels; ``'fit'``: resample so the cell's longer bounding-box side
        is ``fit_fraction * size`` crop pixels (bilinear image, nearest-neighbour mask).
    fit_fraction : float in (0, 1]
    min_area, max_area : int
        Cells outside [min_area, max_area] pixels are dropped.
    exclude_border : bool
        Drop cells that touch the image border (they are cut off).
    min_solidity : float in [0, 1]
        Drop cells whose area / convex-hull area is lower (implausible, ragged masks).
    objects : (M, N) ndarray of int, optional
        Labels of non-target objects (platelets, debris...); they are never cropped, and
        their pixels join each crop's ``others`` mask.
    raw : bool
        Keep the source dtype (integer images: ``fit`` crops rounded back to it; boolean:
        uint8; float: float32) instead of float32 in [0, 1]; divide by
        :func:`source_divisor` to scale. The crop store keeps these.

    Returns
    -------
    CellCrops
        Rows in increasing instance order. ``table`` coordinates: ``centroid_*`` in the
        image; ``crop_r0, crop_c0`` the image position of crop pixel (0, 0) (negative when
        padded); ``scale`` crop pixels per image pixel; ``bbox_*`` the cell's box in crop
        pixels (end exclusive); ``pad_*`` crop rows/columns outside the image, zero-filled.

    Raises
    ------
    CellbgError
        Shapes that do not match, a bad option.

    Examples
    --------
    >>> img = np.zeros((1, 40, 40), np.uint8); lab = np.zeros((40, 40), int)
    >>> lab[10:16, 20:30] = 3; img[0][lab == 3] = 255
    >>> c = crop_cells(img, lab, size=16)
    >>> c.images.shape, c.masks.shape, c.table["bbox_r0"].tolist(), c.table["bbox_c1"].tolist()
    ((1, 1, 16, 16), (1, 16, 16), [5], [13])
    >>> float(c.images[0, 0][c.masks[0]].min())
    1.0
    """
    image = np.asarray(image)
    labels = np.asarray(labels)
    check_nd(image, (2, 3), arg_name="image")
    check_nd(labels, 2, arg_name="labels")
    image = image[None] if image.ndim == 2 else image
    check_same_shape(image[0], labels, names=("image", "labels"))
    if objects is not None:
        objects = np.asarray(objects)
        check_same_shape(labels, objects, names=("labels", "objects"))
        objects = objects != 0
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise CellbgError(f"labels must be integer instance labels; got dtype {labels.dtype}")
    scale = look_up_option(scale, ("keep", "fit"), what="crop scale")
    if size < 2:
        raise CellbgError(f"size must be >= 2; got {size}")
    if not 0 < fit_fraction <= 1:
        raise CellbgError(f"fit_fraction must be in (0, 1]; got {fit_fraction}")
    labels = labels.astype(np.int32, copy=False)
    n_ch, h, w = image.shape

    empty_dtype = _store_dtype(image.dtype) if raw else np.float32
    if not labels.any():
        return _empty(n_ch, size, {k: 0 for k in FILTERS}, empty_dtype)
    props = _properties(labels)
    props, removed = _filter(
        props, (h, w), min_area=min_area, max_area=max_area,
        exclude_border=exclude_border, min_solidity=min_solidity,
    )  # fmt: skip
    k = len(props["instance"])
    if k == 0:
        return _empty(n_ch, size, removed, empty_dtype)
    r0, c0, r1, c1 = props["r0"], props["c0"], props["r1"], props["c1"]
    inst = props["instance"].astype(np.int32)
    offs = np.arange(size)
    source, divisor = _to_unit(image)
    if scale == "keep":
        s = np.ones(k)
        origin_r = (r0 + r1 - size) // 2  # box centred (rounded down) in the crop
        origin_c = (c0 + c1 - size) // 2
        rows = origin_r[:, None] + offs  # (k, S) image row of each crop row
        cols = origin_c[:, None] + offs
        pad = size  # enough: a crop starts at most size/2 outside the image
        padded_img = np.pad(source, ((0, 0), (pad, pad), (pad, pad)))
        padded_lab = np.pad(labels, pad)
        ri, ci = rows[:, :, None] + pad, cols[:, None, :] + pad
        crops = padded_img[:, ri, ci]  # (C, k, S, S)
        lab_crops = padded_lab[ri, ci]  # (k, S, S)
        obj_crops = np.pad(objects, pad)[ri, ci] if objects is not None else None
        clipped = (r0 < origin_r) | (c0 < origin_c) | (r1 > origin_r + size) | (c1 > origin_c + size)
        crop_r0, crop_c0 = origin_r.astype(float), origin_c.astype(float)
        out_r = (rows < 0) | (rows >= h)
        out_c = (cols < 0) | (cols >= w)
    else:
        from scipy.ndimage import map_coordinates

        extent = np.maximum(r1 - r0, c1 - c0)
        s = fit_fraction * size / extent  # crop pixels per image pixel
        # Pixel-centre coordinates: crop pixel i sits at (i + 0.5 - S/2) / s from the box centre.
        rows = (r0 + r1)[:, None] / 2 - 0.5 + (offs + 0.5 - size / 2) / s[:, None]
        cols = (c0 + c1)[:, None] / 2 - 0.5 + (offs + 0.5 - size / 2) / s[:, None]
        grid = np.stack(np.broadcast_arrays(rows[:, :, None], cols[:, None, :]))  # (2, k, S, S)
        crops = np.stack(
            [map_coordinates(p.astype(np.float32), grid, order=1, mode="constant", cval=0.0) for p in source]
        )
        lab_crops = map_coordinates(labels, grid, order=0, mode="constant", cval=0)
        obj_crops = (
            map_coordinates(objects.astype(np.uint8), grid, order=0, mode="constant", cval=0) > 0
            if objects is not None
            else None
        )
        clipped = np.zeros(k, bool)  # the longer side is fit_fraction <= 1 of the crop
        crop_r0, crop_c0 = rows[:, 0], cols[:, 0]
        out_r = (rows < -0.5) | (rows > h - 0.5)
        out_c = (cols < -0.5) | (cols > w - 0.5)

    if raw:
        images = np.moveaxis(crops, 0, 1)
        dtype = _store_dtype(image.dtype)
        if np.issubdtype(dtype, np.integer) and images.dtype != dtype:  # 'fit' resampled in float
            images = np.clip(np.rint(images), 0, np.iinfo(dtype).max)
        images = np.ascontiguousarray(images, dtype=dtype)
    else:
        images = np.moveaxis(crops, 0, 1).astype(np.float32)
        if divisor != 1.0:
            images /= np.float32(divisor)
    masks = lab_crops == inst[:, None, None]
    others = (lab_crops != 0) & ~masks
    other = others.any(axis=(1, 2))
    if obj_crops is not None:
        others |= obj_crops & ~masks
    rows_any, cols_any = masks.any(axis=2), masks.any(axis=1)
    bbox_r0 = rows_any.argmax(axis=1)
    bbox_r1 = size - rows_any[:, ::-1].argmax(axis=1)
    bbox_c0 = cols_any.argmax(axis=1)
    bbox_c1 = size - cols_any[:, ::-1].argmax(axis=1)
    # Crop rows outside the image lie before the first / after the last inside one.
    first_in_r = (~out_r).argmax(axis=1)
    pad_top = np.where(out_r.all(axis=1), size, first_in_r)
    pad_bottom = out_r.sum(axis=1) - pad_top
    first_in_c = (~out_c).argmax(axis=1)
    pad_left = np.where(out_c.all(axis=1), size, first_in_c)
    pad_right = out_c.sum(axis=1) - pad_left

    table = pd.DataFrame(
        {
            "instance": inst.astype(np.int64),
            "area": props["area"],
            "eccentricity": props["eccentricity"],
            "solidity": props["solidity"],
            "centroid_r": props["centroid_r"],
            "centroid_c": props["centroid_c"],
            "crop_r0": np.asarray(crop_r0, np.float64),
            "crop_c0": np.asarray(crop_c0, np.float64),
            "scale": np.asarray(s, np.float64),
            "bbox_r0": bbox_r0.astype(np.int64),
            "bbox_c0": bbox_c0.astype(np.int64),
            "bbox_r1": bbox_r1.astype(np.int64),
            "bbox_c1": bbox_c1.astype(np.int64),
            "padded": (out_r.any(axis=1) | out_c.any(axis=1)),
            "other_cells": other,
            "touches_border": props["touches_border"],
            "pad_top": pad_top.astype(np.int64),
            "pad_bottom": pad_bottom.astype(np.int64),
            "pad_left": pad_left.astype(np.int64),
            "pad_right": pad_right.astype(np.int64),
            "clipped": np.asarray(clipped, bool),
        }
    )
    return CellCrops(images=images, masks=masks, table=table, removed=removed, others=others)


def _store_dtype(dtype) -> np.dtype:
    """The dtype crops of an image of ``dtype`` are stored in."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if np.issubdtype(dtype, np.integer):
        return dtype
    return np.dtype(np.float32)


def source_divisor(dtype) -> float:
    """What stored crops of ``dtype`` are divided by to lie in [0, 1] (1 for floats and bool).

    Examples
    --------
    >>> source_divisor(np.uint8), source_divisor(np.uint16), source_divisor(np.float32)
    (255.0, 65535.0, 1.0)
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return 1.0
    return _to_unit(np.zeros(0, dtype))[1]


def _empty(n_ch: int, size: int, removed: dict, dtype=np.float32) -> CellCrops:
    table = pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in _GEOMETRY})
    return CellCrops(
        images=np.zeros((0, n_ch, size, size), dtype),
        masks=np.zeros((0, size, size), bool),
        table=table,
        removed=removed,
        others=np.zeros((0, size, size), bool),
    )


def _dtype(column: str):
    if column in ("padded", "other_cells", "touches_border", "clipped"):
        return bool
    if column in ("eccentricity", "solidity", "centroid_r", "centroid_c", "crop_r0", "crop_c0", "scale"):
        return np.float64
    if column in ("cell_id", "image_id", "patient_id", "label"):
        return str
    return np.int64


def crop_cells_naive(image: np.ndarray, labels: np.ndarray, *, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The per-cell loop that :func:`crop_cells` replaces (benchmark baseline only).

    One ``regionprops`` object, one ``np.pad`` and one slice per cell, ``scale="keep"``,
    no filters. Returns ``(images, masks)`` like :func:`crop_cells`.
    """
    from skimage.measure import regionprops

    image = image[None] if image.ndim == 2 else image
    _, divisor = _to_unit(image)
    out_i, out_m = [], []
    for region in regionprops(labels.astype(np.int32)):
        _ = region.eccentricity, region.solidity
        r0, c0, r1, c1 = region.bbox
        orr, oc = (r0 + r1 - size) // 2, (c0 + c1 - size) // 2
        img = np.pad(image, ((0, 0), (size, size), (size, size)))
        lab = np.pad(labels, size)
        out_i.append(img[:, orr + size : orr + 2 * size, oc + size : oc + 2 * size].astype(np.float32) / divisor)
        out_m.append(lab[orr + size : orr + 2 * size, oc + size : oc + 2 * size] == region.label)
    return np.array(out_i), np.array(out_m)


# =========================================================================== run
def _crop_job(args: tuple):
    """Read one image and its labels, check them, and crop (runs in a worker process)."""
    from cellbg.data import read_image, read_mask

    image_path, labels_path, objects_path, channels, options = args
    image = read_image(image_path, channels=channels)
    labels = read_mask(labels_path)
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise CellbgError(
            f"segmentation {labels_path} has shape {tuple(labels.shape)} but image {image_path} is "
            f"{tuple(image.shape[1:])}"
        )
    objects = None
    if objects_path:
        objects = read_mask(objects_path)
        if tuple(objects.shape) != tuple(image.shape[1:]):
            raise CellbgError(
                f"objects label image {objects_path} has shape {tuple(objects.shape)} but image {image_path} is "
                f"{tuple(image.shape[1:])}"
            )
    return crop_cells(image, labels, objects=objects, **options)


def _chunk_rows(n_ch: int, size: int, itemsize: int = 1) -> int:
    """Rows per store chunk: about 1 MiB of source pixels (at least 16 rows), a power of two.

    Small enough that a shuffled mini-batch drawn from a window of chunks decodes little it
    does not use, large enough that Blosc compresses well and the file count stays low.
    """
    rows = max(16, 2**20 // max(1, itemsize * n_ch * size * size))
    return 1 << (rows.bit_length() - 1)


def _compressors():
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]


def store_bytes(path: str | Path) -> int:
    """Bytes on disk of every file under ``path`` (a crop store)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_crops(protocol, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Crop every cell of a protocol's dataset; write the cell table and the crop store.

    Runs the segmentation first where it is missing (:func:`cellbg.segment.run_segmentation`),
    then crops images in parallel (``crops.workers`` processes) with a progress bar. The
    store is written into a temporary folder and renamed, then ``cells.parquet``, then
    ``crops.json``; a failure leaves earlier complete files untouched and no partial ones.

    Parameters
    ----------
    protocol : Protocol
    table : DataFrame, optional
        The image table; discovered when None.

    Returns
    -------
    DataFrame
        The cell table (:data:`CELL_COLUMNS`), row i = crop i of the store. Its
        ``attrs["summary"]`` holds the counts written to ``crops.json``.

    Raises
    ------
    CellbgError
        An unreadable image, a segmentation that does not match its image, images with
        different channel counts.

    Warns
    -----
    UserWarning
        For each image left without cells (it contributes zero rows).
    """
    import zarr

    from cellbg._io import atomic_dir, write_json_atomic, write_parquet_atomic
    from cellbg.data import assign_folds, discover
    from cellbg.protocol import write_resolved
    from cellbg.segment import parallel_map, run_segmentation

    if table is None:
        table = discover(protocol)
    table = run_segmentation(protocol, table).reset_index(drop=True)
    cfg = protocol.crops
    split = protocol.training.split
    folds = assign_folds(
        table, kind=split.kind, folds=split.folds, test_patients=split.test_patients, seed=protocol.seed
    ).to_numpy()
    classes = sorted(table["label"].unique())
    options = dict(
        size=cfg.size, scale=cfg.scale, fit_fraction=cfg.fit_fraction, min_area=cfg.min_area,
        max_area=cfg.max_area, exclude_border=cfg.exclude_border, min_solidity=cfg.min_solidity, raw=True,
    )  # fmt: skip
    objects = table["objects_path"] if "objects_path" in table.columns else [""] * len(table)
    jobs = [
        (r.path, r.seg_path, o, protocol.data.channels, options)
        for r, o in zip(table.itertuples(), objects, strict=True)
    ]
    run_dir = Path(protocol.run_dir)
    size = cfg.size

    tables: list[pd.DataFrame] = []
    removed = {k: 0 for k in FILTERS}
    empty_images: list[str] = []
    n_written = 0
    n_ch: int | None = None
    dtype: np.dtype | None = None
    with atomic_dir(run_dir / "crops.zarr") as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        images_arr: zarr.Array | None = None
        masks_arr: zarr.Array | None = None
        others_arr: zarr.Array | None = None
        buf_i: list[np.ndarray] = []
        buf_m: list[np.ndarray] = []
        buf_o: list[np.ndarray] = []
        buffered = 0

        def flush():
            nonlocal n_written, buf_i, buf_m, buf_o, buffered
            if not buffered:
                return
            block_i, block_m, block_o = np.concatenate(buf_i), np.concatenate(buf_m), np.concatenate(buf_o)
            images_arr.resize((n_written + buffered, n_ch, size, size))
            masks_arr.resize((n_written + buffered, size, size))
            others_arr.resize((n_written + buffered, size, size))
            images_arr[n_written:] = block_i
            masks_arr[n_written:] = block_m
            others_arr[n_written:] = block_o
            n_written += buffered
            buf_i, buf_m, buf_o, buffered = [], [], [], 0

        for i, result in enumerate(parallel_map(_crop_job, jobs, workers=cfg.workers, description="cropping")):
            row = table.iloc[i]
            if n_ch is None:
                n_ch, dtype = result.images.shape[1], result.images.dtype
                chunk = _chunk_rows(n_ch, size, dtype.itemsize)
                images_arr = group.create_array(
                    "images",
                    shape=(0, n_ch, size, size),
                    chunks=(chunk, n_ch, size, size),
                    dtype=dtype,
                    compressors=_compressors(),
                )
                masks_arr = group.create_array(
                    "masks", shape=(0, size, size), chunks=(chunk, size, size), dtype="bool", compressors=_compressors()
                )
                others_arr = group.create_array(
                    "others",
                    shape=(0, size, size),
                    chunks=(chunk, size, size),
                    dtype="bool",
                    compressors=_compressors(),
                )
            elif result.images.shape[1] != n_ch:
                from cellbg.data import check_channels

                check_channels(table, channels=protocol.data.channels)  # names the odd image(s) out
                raise CellbgError(
                    f"image {row.path} has {result.images.shape[1]} channel(s) but earlier images have {n_ch}; "
                    "set data.channels to pick the same channels from every image"
                )
            elif result.images.dtype != dtype:
                raise CellbgError(
                    f"image {row.path} holds {result.images.dtype} pixels but earlier images hold {dtype}; "
                    "convert the images to one pixel type"
                )
            for k, v in result.removed.items():
                removed[k] += v
            n = len(result.table)
            if n == 0:
                empty_images.append(row.image_id)
                continue
            t = result.table
            t.insert(0, "fold", int(folds[i]))
            t.insert(0, "label_index", classes.index(row.label))
            t.insert(0, "label", row.label)
            t.insert(0, "patient_id", row.patient_id)
            t.insert(0, "image_id", row.image_id)
            t.insert(0, "cell_id", [f"{row.image_id}-{j:04d}" for j in t["instance"]])
            tables.append(t)
            buf_i.append(result.images)
            buf_m.append(result.masks)
            buf_o.append(result.others)
            buffered += n
            assert images_arr is not None  # created with the first image's crops
            if buffered >= images_arr.chunks[0]:
                flush()
        flush()
        cells = (
            pd.concat(tables, ignore_index=True)
            if tables
            else pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in CELL_COLUMNS})
        )
        cells = cells[CELL_COLUMNS]
        group.attrs["classes"] = classes
        group.attrs["size"] = size
        group.attrs["divisor"] = source_divisor(dtype) if n_ch is not None else 1.0
        group.attrs["scale"] = cfg.scale
        # Ties the store to its table: a run killed between the two renames is detected.
        group.attrs["cell_ids_sha256"] = _ids_hash(cells["cell_id"])

    for image_id in empty_images:
        warnings.warn(
            f"image {image_id} has no cells after segmentation and filters; it adds no rows", UserWarning, stacklevel=2
        )
    write_parquet_atomic(cells, run_dir / "cells.parquet")
    n_bytes = store_bytes(run_dir / "crops.zarr")
    source = len(cells) * (n_ch or 0) * size * size * (dtype.itemsize if dtype is not None else 0)
    summary = {
        "images": len(table),
        "images_without_cells": empty_images,
        "cells": len(cells),
        "removed": removed,
        "cells_per_class": {c: int((cells["label"] == c).sum()) for c in classes},
        "size": size,
        "scale": cfg.scale,
        "store_bytes": n_bytes,
        "store_bytes_per_cell": n_bytes / max(len(cells), 1),
        "source_pixel_bytes": source,
        "store_dtype": str(dtype) if n_ch is not None else "float32",
    }
    write_json_atomic(run_dir / "crops.json", summary)
    write_resolved(protocol)
    cells.attrs["summary"] = summary
    return cells


def _ids_hash(cell_ids) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, cell_ids)).encode()).hexdigest()


class ScaledImages:
    """The store's images read as float32 in [0, 1]: ``stored / divisor``, on the fly.

    Supports what readers need of an array: ``shape``, ``ndim``, ``dtype`` (float32),
    ``nbytes`` (of the float32 view), ``chunks``, slicing and ``oindex`` (both return numpy).
    """

    def __init__(self, array, divisor: float):
        self.array, self.divisor = array, float(divisor)
        self.shape, self.ndim, self.chunks = tuple(array.shape), array.ndim, tuple(array.chunks)
        self.dtype = np.dtype(np.float32)
        self.nbytes = int(np.prod(self.shape)) * 4
        self.oindex = _OIndex(self)

    def __len__(self) -> int:
        return self.shape[0]

    def scale(self, raw: np.ndarray) -> np.ndarray:
        return scale_pixels(raw, self.divisor)

    def __getitem__(self, item) -> np.ndarray:
        return self.scale(self.array[item])

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out if dtype is None else out.astype(dtype)


class _OIndex:
    def __init__(self, parent: ScaledImages):
        self.parent = parent

    def __getitem__(self, item) -> np.ndarray:
        return self.parent.scale(self.parent.array.oindex[item])


class CropStore:
    """Random row reads from a run's crop store, decoding each chunk once.

    :meth:`read` returns the images (float32 in [0, 1]) and masks of any rows in the order
    asked. Rows are read chunk by chunk (a whole chunk decodes in one call, far faster than
    a gather), and the last ``cache_chunks`` decoded chunks are kept, so reading the
    mini-batches of a shuffled window of chunks decodes each chunk once.

    Parameters
    ----------
    run_dir : path
    cache_chunks : int
        Decoded chunks kept (source dtype: about 1 MiB each).

    Attributes
    ----------
    n, channels, size : int
    chunk_rows : int
    divisor : float
    dtype : numpy dtype
        Of the stored pixels.
    """

    def __init__(self, run_dir: str | Path, *, cache_chunks: int = 64):
        images, masks, cells = load_crops(run_dir, lazy=True)
        self.cells = cells
        self.images, self.masks = images.array, masks
        self.others = load_others(run_dir, lazy=True)  # None for stores written before them
        self.divisor = images.divisor
        self.dtype = np.dtype(self.images.dtype)
        self.n, self.channels, self.size = int(images.shape[0]), int(images.shape[1]), int(images.shape[-1])
        self.chunk_rows = int(self.images.chunks[0])
        self.cache_chunks = int(cache_chunks)
        # chunk index -> decoded (images, masks, others or None)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self.path = Path(run_dir) / "crops.zarr"

    @property
    def source_nbytes(self) -> int:
        """Bytes of the stored pixels and masks decoded (what an in-memory copy holds)."""
        masks = 1 + (self.others is not None)
        return self.n * (self.channels * self.dtype.itemsize + masks) * self.size * self.size

    def __getstate__(self):  # pickled to loader workers without the decoded chunks
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        hit = self._cache.pop(c, None)
        if hit is None:
            lo, hi = c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n)
            hit = (
                np.asarray(self.images[lo:hi]),
                np.asarray(self.masks[lo:hi]),
                np.asarray(self.others[lo:hi]) if self.others is not None else None,
            )
            while len(self._cache) >= max(self.cache_chunks, 1):
                self._cache.pop(next(iter(self._cache)))
        self._cache[c] = hit  # most recently used last
        return hit

    def read_raw(self, idx, *, others: bool = False) -> tuple:
        """Stored pixels (source dtype) and masks of rows ``idx``, in that order (and, with
        ``others``, the ``others`` masks: None for a store without them)."""
        idx = np.asarray(idx, dtype=np.int64)
        out_i = np.empty((len(idx), self.channels, self.size, self.size), self.dtype)
        out_m = np.empty((len(idx), self.size, self.size), bool)
        want_o = others and self.others is not None
        out_o = np.empty((len(idx), self.size, self.size), bool) if want_o else None
        chunk = idx // self.chunk_rows
        order = np.argsort(chunk, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk[order])) + 1
        for group in np.split(order, bounds) if len(idx) else []:
            c = int(chunk[group[0]])
            imgs, msks, oths = self._chunk(c)
            local = idx[group] - c * self.chunk_rows
            out_i[group] = imgs[local]
            out_m[group] = msks[local]
            if out_o is not None and oths is not None:  # want_o: the store has others
                out_o[group] = oths[local]
        return (out_i, out_m, out_o) if others else (out_i, out_m)

    def read(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32 in [0, 1]) and masks of rows ``idx``, in that order."""
        raw, masks = self.read_raw(idx)
        return scale_pixels(raw, self.divisor), masks


def scale_pixels(raw: np.ndarray, divisor: float) -> np.ndarray:
    """Stored pixels as float32 in [0, 1] (``raw / divisor``)."""
    out = np.asarray(raw, dtype=np.float32)
    if divisor != 1.0:
        out = np.multiply(out, np.float32(1.0 / divisor), out=out if out is not raw else None)
    return out


#: Environment variable naming a node-local folder (e.g. ``$TMPDIR`` on a cluster node) that
#: :func:`open_store` copies the crop store to, once per node, and reads from. The runner sets
#: it on its workers from ``executor.scratch``.
SCRATCH_ENV = "CELLBG_SCRATCH"


def stage_to_scratch(run_dir: str | Path, scratch: str | Path) -> Path:
    """Copy a run's ``cells.parquet`` and ``crops.zarr`` into ``scratch`` once; return the copy's folder.

    The copy is named by the run folder and the files' sizes and modification times, made
    in a temporary folder and renamed into place, so processes of one node share it and a
    changed store is copied again.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    run_dir = Path(run_dir).resolve()
    files = [run_dir / "cells.parquet", *sorted((run_dir / "crops.zarr").glob("*.json"))]
    stamp = [str(run_dir)] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists()]
    name = "cellbg-crops-" + hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    scratch = Path(os.path.expandvars(str(scratch)))
    target = scratch / name
    if (target / "crops.zarr").is_dir():
        return target
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=scratch))
    try:
        shutil.copy2(run_dir / "cells.parquet", tmp / "cells.parquet")
        shutil.copytree(run_dir / "crops.zarr", tmp / "crops.zarr")
        try:
            os.rename(tmp, target)
        except OSError:  # another process of this node was first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def open_store(run_dir: str | Path, *, scratch: str | Path | None = None, **kwargs) -> CropStore:
    """A :class:`CropStore` on ``<run>/crops.zarr`` (checked against ``cells.parquet``).

    With ``scratch`` (default: the ``CELLBG_SCRATCH`` environment variable), the store is
    read from a node-local copy (:func:`stage_to_scratch`).
    """
    import os

    scratch = scratch if scratch is not None else os.environ.get(SCRATCH_ENV) or None
    if scratch:
        run_dir = stage_to_scratch(run_dir, scratch)
    return CropStore(run_dir, **kwargs)


def load_crops(run_dir: str | Path, *, lazy: bool = False):
    """Read a run's crops, masks and cell table (row i of each belongs together).

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    lazy : bool
        Return arrays read on indexing (images as :class:`ScaledImages`, masks as the zarr
        array) instead of numpy arrays in memory.

    Returns
    -------
    images : (n, C, S, S) float32 array
        In [0, 1], whatever the stored dtype.
    masks : (n, S, S) bool array
    cells : DataFrame
        ``cells.parquet``; ``cells.attrs["classes"]`` holds the sorted class names.

    Raises
    ------
    CellbgError
        The files are missing or disagree in length.
    """
    import zarr

    run_dir = Path(run_dir)
    store, table = run_dir / "crops.zarr", run_dir / "cells.parquet"
    for p in (store, table):
        if not p.exists():
            raise CellbgError(f"no {p.name} in {run_dir}; run `cellbg crops PROTOCOL` first")
    try:
        group = zarr.open_group(str(store), mode="r")
        # written by run_crops: arrays, and JSON attributes of known types
        images = cast("zarr.Array", group["images"])
        masks = cast("zarr.Array", group["masks"])
        classes = list(cast("list[str]", group.attrs.get("classes", [])))
        divisor = float(cast(float, group.attrs.get("divisor", 1.0)))  # stores before the source dtype were float32
    except Exception as exc:
        raise CellbgError(
            f"cannot read {store}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    cells = pd.read_parquet(table)
    if not (images.shape[0] == masks.shape[0] == len(cells)):
        raise CellbgError(
            f"{store} holds {images.shape[0]} crops but {table} has {len(cells)} rows; run `cellbg crops` again"
        )
    stamp = group.attrs.get("cell_ids_sha256")
    if stamp is not None and stamp != _ids_hash(cells["cell_id"]):
        raise CellbgError(f"{store} and {table} come from different runs; run `cellbg crops` again")
    cells.attrs["classes"] = classes
    scaled = ScaledImages(images, divisor)
    if not lazy:
        return scaled[...], np.asarray(masks[:]), cells
    return scaled, masks, cells


def load_others(run_dir: str | Path, *, lazy: bool = False):
    """A run's ``others`` masks (n, S, S) bool: pixels of other objects in each crop.

    Returns None for a crop store written before they were stored (run ``cellbg crops``
    again to get them).
    """
    import zarr

    store = Path(run_dir) / "crops.zarr"
    if not store.exists():
        raise CellbgError(f"no crops.zarr in {run_dir}; run `cellbg crops PROTOCOL` first")
    group = zarr.open_group(str(store), mode="r")
    if "others" not in group:
        return None
    others = cast("zarr.Array", group["others"])  # written by run_crops: an array
    return others if lazy else np.asarray(others[:])


def read_summary(run_dir: str | Path) -> dict:
    """``crops.json`` of a run: counts of images, cells and what each filter removed."""
    path = Path(run_dir) / "crops.json"
    if not path.exists():
        raise CellbgError(f"no crops.json in {run_dir}; run `cellbg crops PROTOCOL` first")
    return json.loads(path.read_text())
