"""Boxes from instance masks, and test images with a structure removed: array functions.

No torch here: boxes are ``(row0, col0, row1, col1)`` with exclusive ends, the convention of
``cells.parquet``; :mod:`cellbg.detect.train` turns them into torchvision's ``(x1, y1, x2, y2)``.
"""

from __future__ import annotations

import numpy as np

from cellbg._checks import CellbgError

__all__ = ["boxes_from_labels", "remove_structure", "fill_colour"]


def boxes_from_labels(labels: np.ndarray, *, min_area: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of every instance of an instance-label image.

    Parameters
    ----------
    labels : (M, N) ndarray of int
        Instance labels, 0 = background.
    min_area : int, optional
        Instances with fewer pixels are left out.

    Returns
    -------
    boxes : (K, 4) ndarray of int64
        ``row0, col0, row1, col1`` (ends exclusive), in increasing label order.
    ids : (K,) ndarray of int64
        The label of each box.

    Raises
    ------
    CellbgError
        ``labels`` is not a 2-D integer image.

    Examples
    --------
    >>> lab = np.zeros((6, 8), np.uint16)
    >>> lab[1:3, 2:5] = 1
    >>> lab[4:6, 0:1] = 3
    >>> boxes, ids = boxes_from_labels(lab)
    >>> boxes.tolist(), ids.tolist()
    ([[1, 2, 3, 5], [4, 0, 6, 1]], [1, 3])
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise CellbgError(
            f"instance labels must be a 2-D integer image; got shape {labels.shape} and dtype {labels.dtype}"
        )
    if labels.dtype == bool:
        raise CellbgError("instance labels are boolean; label the objects first (scipy.ndimage.label)")
    if labels.size and labels.min() < 0:
        raise CellbgError("instance labels must be non-negative")
    slices = ndi.find_objects(labels.astype(np.int64, copy=False))
    boxes, ids = [], []
    areas = np.bincount(labels.ravel().astype(np.int64)) if labels.size else np.zeros(1, np.int64)
    for i, sl in enumerate(slices):
        if sl is None or areas[i + 1] < min_area:
            continue
        boxes.append([sl[0].start, sl[1].start, sl[0].stop, sl[1].stop])
        ids.append(i + 1)
    return np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(ids, np.int64)


def fill_colour(image: np.ndarray, background: np.ndarray, fill: str = "mean") -> np.ndarray:
    """The colour (one value per channel, in the image's units) that replaces a structure.

    Parameters
    ----------
    image : (M, N) or (M, N, C) ndarray
    background : (M, N) ndarray of bool
        Pixels that are background (no target, no structure): ``mean`` averages them.
    fill : {'mean', 'black'} or 'r,g,b'
        ``mean``: the mean background colour of this image; ``black``: zero; a colour in
        [0, 1], scaled to the dtype's range for integer images.

    Returns
    -------
    (C,) ndarray of float64

    Examples
    --------
    >>> img = np.array([[10, 20], [30, 40]], np.uint8)
    >>> fill_colour(img, np.array([[True, True], [False, False]])).tolist()
    [15.0]
    """
    image = np.asarray(image)
    channels = image.reshape(image.shape[0], image.shape[1], -1)
    if fill == "black":
        return np.zeros(channels.shape[-1])
    if fill == "mean":
        pix = channels[np.asarray(background, bool)]
        if not len(pix):
            pix = channels.reshape(-1, channels.shape[-1])
        return pix.astype(np.float64).mean(axis=0)
    try:
        rgb = np.array([float(x) for x in str(fill).split(",")])
    except ValueError:
        rgb = np.array([])
    if rgb.size != 3 or np.any((rgb < 0) | (rgb > 1)):
        raise CellbgError(f"fill must be 'mean', 'black' or 'r,g,b' in [0, 1]; got {fill!r}")
    scale = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    if channels.shape[-1] == 1:
        rgb = rgb.mean(keepdims=True)
    elif channels.shape[-1] != 3:
        rgb = np.full(channels.shape[-1], rgb.mean())
    return rgb * scale


def remove_structure(
    image: np.ndarray,
    structure: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    fill: str = "mean",
    dilate: int = 2,
) -> np.ndarray:
    """The image with a structure (e.g. the correlated objects) replaced by a fill.

    The reliance test of the detection study: a detector that finds a target class through
    an object that sits next to it loses recall on these images.

    Parameters
    ----------
    image : (M, N) or (M, N, C) ndarray
    structure : (M, N) ndarray
        Non-zero where the structure is (instance labels or a boolean mask).
    keep : (M, N) ndarray, optional
        Non-zero pixels are never changed (the target cells), even inside the dilation.
    fill : str, optional
        See :func:`fill_colour`; ``mean`` is the mean colour of the pixels outside both.
    dilate : int, optional
        Pixels added around the structure (its blurred edge goes too).

    Returns
    -------
    ndarray
        Same shape and dtype as ``image``; only structure pixels differ.

    Examples
    --------
    >>> img = np.full((5, 5), 100, np.uint8)
    >>> img[2, 2] = 0
    >>> s = np.zeros((5, 5), bool)
    >>> s[2, 2] = True
    >>> out = remove_structure(img, s, dilate=0)
    >>> int(out[2, 2]), int(out[0, 0])
    (100, 100)
    """
    from scipy import ndimage as ndi

    image = np.asarray(image)
    structure = np.asarray(structure)
    if structure.shape != image.shape[:2]:
        raise CellbgError(f"structure mask {structure.shape} does not match the image {image.shape[:2]}")
    if dilate < 0:
        raise CellbgError(f"dilate must be >= 0; got {dilate}")
    region = structure != 0
    if dilate and region.any():
        region = ndi.binary_dilation(region, iterations=int(dilate))
    protected = np.zeros(region.shape, bool) if keep is None else np.asarray(keep) != 0
    region &= ~protected
    colour = fill_colour(image, ~region & ~protected & (structure == 0), fill)
    out = image.copy()
    if image.ndim == 2:
        value = colour[0]
    else:
        value = colour
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        value = np.clip(np.rint(value), info.min, info.max)
    out[region] = np.asarray(value).astype(image.dtype)
    return out
