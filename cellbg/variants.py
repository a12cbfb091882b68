"""Background variants: the images that separate what a cell says from what its background says.

Every function works on a whole batch of crops at once, numpy arrays or torch tensors alike
(same type, dtype, device and shape out), with no Python loop over pixels or cells: the
work is done by broadcasting, in-place masked copies, gathers of the box pixels and shifted
ORs of the masks, in numpy for numpy input and in torch for torch input.

Shapes (DESIGN.md, crops contract): ``images (n, C, H, W)`` (float32 in [0, 1]),
``masks (n, H, W)`` bool, ``bboxes (n, 4)`` int ``(r0, c0, r1, c1)`` end-exclusive in crop
coordinates, ``labels (n,)`` int class indices.

Variants follow Xiao et al., "Noise or Signal: The Role of Image Backgrounds in Object
Recognition" (ICLR 2021) and Hashmi & Li (ICLR 2022 workshop). ``reference="cellbg"`` (the
default) uses cellbg's own rules for ``only_bg_*`` and ``mixed_*`` (exact boxes, documented
ties, a fill); ``reference="xiao"`` reproduces the authors' generation code pixel for pixel,
quirks included. ``docs/variants.md`` lists every rule and every difference between the two.

Variant spec strings: ``name`` or ``name(arg, ...)``; mask perturbations compose in front
with ``+``: ``mask_erode(2)+only_fg``. :func:`apply_variant` is the batch entry point;
:class:`ApplyVariant` / :class:`ApplyVariantd` are MONAI-style transforms around it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, Transform

from cellbg._checks import CellbgError, look_up_option
from cellbg._variant_spec import VariantSpec, _fmt, check_fill, list_variants, parse_variant

__all__ = [
    "VariantSpec",
    "VariantResult",
    "list_variants",
    "parse_variant",
    "apply_variant",
    "original",
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_rand",
    "mixed_next",
    "pair_cells",
    "bg_color",
    "bg_blur",
    "bg_ring",
    "bg_image",
    "context",
    "no_others",
    "REFERENCES",
    "mask_erode",
    "mask_dilate",
    "ring_mask",
    "resolve_fill",
    "ApplyVariant",
    "ApplyVariantd",
    "make_gallery",
    "export_variants",
    "run_variants",
    "protocol_backgrounds",
]


# --------------------------------------------------------------------------- array plumbing
# Numpy input is worked on with numpy and torch input with torch (no conversions on the way);
# the few steps computed in torch for both (fills, blur) go through zero-copy views.
def _as_torch(x, *, arg_name: str) -> tuple[torch.Tensor, bool]:
    """Return a torch view of ``x`` (no copy for numpy) and whether it came in as numpy."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x))), True
    except (TypeError, ValueError):
        raise CellbgError(f"{arg_name} must be a numpy array or torch tensor; got {type(x).__name__}") from None


def _to_numpy(a) -> np.ndarray:
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _check_images(images) -> tuple[np.ndarray | torch.Tensor, bool]:
    """The images as they came (numpy or torch, no copy) and whether they are numpy."""
    x: np.ndarray | torch.Tensor
    if isinstance(images, torch.Tensor):
        x, is_np = images, False
    else:
        try:
            x, is_np = np.asarray(images), True
        except (TypeError, ValueError):
            raise CellbgError(f"images must be a numpy array or torch tensor; got {type(images).__name__}") from None
        if x.dtype == object:
            raise CellbgError(f"images must be a numpy array or torch tensor; got {type(images).__name__}")
    if x.ndim != 4:
        raise CellbgError(f"images must be 4-D (n, C, H, W); got shape {tuple(x.shape)}")
    return x, is_np


def _check_masks(masks, images):
    """The masks as bool, in the images' kind (numpy, or torch on the images' device)."""
    n, _, h, w = images.shape
    if isinstance(images, torch.Tensor):
        m, _ = _as_torch(masks, arg_name="masks")
        m = m.to(images.device)
        shape, dtype = tuple(m.shape), m.dtype
        is_bool, is_float = dtype == torch.bool, dtype.is_floating_point or dtype.is_complex
    else:
        m = _to_numpy(masks) if isinstance(masks, torch.Tensor) else np.asarray(masks)
        shape, dtype = m.shape, m.dtype
        is_bool, is_float = dtype == np.bool_, not (np.issubdtype(dtype, np.integer) or dtype == np.bool_)
    if shape != (n, h, w):
        raise CellbgError(f"masks must have shape (n, H, W) = {(n, h, w)} to match images; got {shape}")
    if not is_bool:
        if is_float:
            raise CellbgError(f"masks must be bool (True = cell); got {dtype}")
        m = m != 0
    return m


def _check_bboxes(bboxes, images) -> np.ndarray:
    """(n, 4) int64 ndarray (boxes are small; index planning is done in numpy)."""
    b = _to_numpy(bboxes)
    n, _, h, w = images.shape
    if b.shape != (n, 4):
        raise CellbgError(f"bboxes must have shape (n, 4) = {(n, 4)} (r0, c0, r1, c1); got {b.shape}")
    if not np.issubdtype(b.dtype, np.integer):
        raise CellbgError(f"bboxes must be integers (r0, c0, r1, c1, end exclusive); got {b.dtype}")
    b = b.astype(np.int64)
    if n:
        r0, c0, r1, c1 = b.T
        bad = (r0 < 0) | (c0 < 0) | (r1 > h) | (c1 > w) | (r0 > r1) | (c0 > c1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CellbgError(
                f"bboxes[{i}] = {b[i].tolist()} is not inside the {h}x{w} crop "
                "(need 0 <= r0 <= r1 <= H, 0 <= c0 <= c1 <= W)"
            )
    return b


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise CellbgError(f"labels must be {n} integer class indices, shape ({n},); got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise CellbgError(f"labels must be class indices >= 0; got {int(y.min())}")
    return y.astype(np.int64)


def _like(a: np.ndarray, images):
    """A small numpy array (index, box) moved to the images' kind and device."""
    return torch.from_numpy(a).to(images.device) if isinstance(images, torch.Tensor) else a


def _box_mask(bboxes: np.ndarray, images):
    """(n, H, W) bool in the images' kind: inside each cell's bounding box."""
    _, _, h, w = images.shape
    r0, c0, r1, c1 = (v[:, None] for v in bboxes.T)
    rows = _like((np.arange(h) >= r0) & (np.arange(h) < r1), images)
    cols = _like((np.arange(w) >= c0) & (np.arange(w) < c1), images)
    return rows[:, :, None] & cols[:, None, :]


def _bboxes_of(masks, fallback: np.ndarray) -> np.ndarray:
    """Bounding boxes of the masks (int64 ndarray); ``fallback`` rows where a mask is empty."""
    n, h, w = masks.shape
    rows, cols = _to_numpy(masks.any(2)), _to_numpy(masks.any(1))
    boxes = np.stack([rows.argmax(1), cols.argmax(1), h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)], 1)
    empty = ~rows.any(1, keepdims=True)
    return np.where(empty, fallback, boxes).astype(np.int64)


def _copy(x):
    """A C-contiguous copy (flat views of it are written in place)."""
    if isinstance(x, torch.Tensor):
        return torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x.copy(order="C")


# --------------------------------------------------------------------------- fills
def resolve_fill(fill, images, masks=None, *, seed: int = 0):
    """The fill image for a batch: black, dataset mean, matched noise, or a colour.

    Parameters
    ----------
    fill : str, float or sequence of float
        ``"black"`` (0); ``"mean"`` (per-channel mean over every pixel of the batch);
        ``"noise"`` (gaussian noise with each crop's per-channel background mean and SD,
        clipped to the batch's value range; seeded); a number or one number per channel
        (a colour, also as the string ``"r,g,b"``).
    images : (n, C, H, W) ndarray or Tensor
    masks : (n, H, W) bool, optional
        Needed for ``"noise"`` (background = ``~masks``).
    seed : int
        Seed of the noise (``torch.Generator``).

    Returns
    -------
    Tensor
        Broadcastable to ``images`` (torch, float, on the images' device).

    Examples
    --------
    >>> x = np.ones((2, 3, 4, 4), np.float32)
    >>> resolve_fill("0,0.5,1", x).flatten().tolist()
    [0.0, 0.5, 1.0]
    """
    x, _ = _as_torch(images, arg_name="images")
    n, c, h, w = x.shape
    ftype = x.dtype if x.dtype.is_floating_point else torch.float32
    if isinstance(fill, str):
        key = fill.strip().lower()
        if key == "black":
            return torch.zeros((), dtype=ftype, device=x.device)
        if key == "mean":
            if x.numel() == 0:
                return torch.zeros((), dtype=ftype, device=x.device)
            return x.to(ftype).mean(dim=(0, 2, 3)).view(1, c, 1, 1)
        if key == "noise":
            if masks is None:
                raise CellbgError("fill='noise' needs the masks (the background statistics come from ~mask)")
            return _noise_fill(x.to(ftype), _check_masks(masks, x), seed)
        try:
            fill = [float(v) for v in key.split(",")]
        except ValueError:
            raise CellbgError(
                f"fill must be 'black', 'mean', 'noise', a number or a colour 'r,g,b'; got '{fill}'"
            ) from None
    values = torch.as_tensor(np.atleast_1d(np.asarray(fill, dtype=np.float64)), dtype=ftype, device=x.device)
    if values.ndim != 1 or values.numel() not in (1, c):
        raise CellbgError(f"fill colour must have 1 or {c} values (one per channel); got {values.numel()}")
    return values.view(1, -1, 1, 1)


def _noise_fill(x: torch.Tensor, m: torch.Tensor, seed: int) -> torch.Tensor:
    bg = (~m).unsqueeze(1).to(x.dtype)
    count = bg.sum(dim=(2, 3), keepdim=True)
    # A crop without background pixels takes its statistics from the whole crop.
    no_bg = count == 0
    bg = torch.where(no_bg, torch.ones_like(bg), bg)
    count = bg.sum(dim=(2, 3), keepdim=True)
    mean = (x * bg).sum(dim=(2, 3), keepdim=True) / count
    var = (((x - mean) * bg) ** 2).sum(dim=(2, 3), keepdim=True) / count
    gen = torch.Generator(device=x.device).manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
    lo, hi = (x.amin(), x.amax()) if x.numel() else (x.new_tensor(0.0), x.new_tensor(1.0))
    return (noise * var.sqrt() + mean).clamp(lo, hi)


def _select(cond: torch.Tensor, a: torch.Tensor, b) -> torch.Tensor:
    """``where(cond, a, b)`` in ``a``'s dtype (fills are float; images may be integer).

    For float images this is ``a * c + b * (1 - c)`` with ``c`` the condition as 0/1: exact
    for finite values (``a * 1 + b * 0 == a``) and several times faster than ``torch.where``
    with a broadcast bool condition on CPU.
    """
    if not torch.is_tensor(b):
        b = torch.as_tensor(b, device=a.device)
    if not a.dtype.is_floating_point:
        return torch.where(cond, a, b.round().to(a.dtype))
    b = b.to(a.dtype)
    c = cond.to(a.dtype)
    out = a * c
    if b.ndim == 0 and float(b) == 0.0:
        return out
    return (
        out.addcmul_(b, 1 - c)
        if out.shape == torch.broadcast_shapes(out.shape, b.shape, c.shape)
        else out + b * (1 - c)
    )


def _fill_as(fill: torch.Tensor, x):
    """The fill (a float tensor from :func:`resolve_fill`) in ``x``'s kind and dtype.

    Integer images take the rounded fill (as ``torch.round`` then a cast, half to even).
    """
    if isinstance(x, torch.Tensor):
        return fill.round().to(x.dtype) if not x.dtype.is_floating_point else fill.to(x.dtype)
    f = fill.cpu().numpy()
    return np.round(f).astype(x.dtype) if not np.issubdtype(x.dtype, np.floating) else f.astype(x.dtype, copy=False)


def _keep(cond, x, fill: torch.Tensor):
    """A new array: ``x`` where ``cond`` (broadcast over channels), ``fill`` elsewhere.

    Numpy: a black fill is one ``multiply`` by the condition (what ``image * mask`` means),
    any other fill is written once and ``x`` copied over it where ``cond`` holds; no
    temporaries of the batch. Torch: :func:`_select`.
    """
    if isinstance(x, torch.Tensor):
        return _select(cond, x, fill)
    if fill.ndim == 0 and float(fill) == 0.0:
        return np.multiply(x, cond, dtype=x.dtype)
    out = np.empty_like(x, order="C")
    out[...] = _fill_as(fill, x)
    np.copyto(out, x, where=cond)
    return out


def _paste(cond, x, base):
    """``x`` where ``cond``, ``base`` elsewhere; numpy writes into ``base`` (a fresh array)."""
    if isinstance(x, torch.Tensor):
        return _select(cond, x, base)
    np.copyto(base, x, where=cond)
    return base


# --------------------------------------------------------------------------- morphology
def _dilate_disk(masks, k: int):
    """Binary dilation of every mask by the Euclidean disk of radius ``k`` (exact), in the crop.

    The disk is the union over row offsets ``|dr| <= k`` of horizontal segments of half-width
    ``floor(sqrt(k**2 - dr**2))``. So: dilate each row horizontally (shifted ORs; the
    half-width only grows as ``|dr|`` falls, so one running horizontal dilation serves every
    offset, largest ``|dr|`` first) and OR it in shifted by ``dr`` rows. About ``4 k`` shifted
    ORs of bool arrays for the whole batch; the same code for numpy arrays and torch tensors.
    """
    n, h, w = masks.shape
    out = masks.clone() if isinstance(masks, torch.Tensor) else masks.copy()
    if k <= 0 or n == 0:
        return out
    across = masks.clone() if isinstance(masks, torch.Tensor) else masks.copy()  # running row dilation
    half = 0
    for dr in range(min(k, h - 1), -1, -1):  # a loop over disk rows, not over pixels or cells
        want = min(math.isqrt(k * k - dr * dr), w - 1)
        while half < want:
            half += 1
            across[..., half:] |= masks[..., :-half]
            across[..., :-half] |= masks[..., half:]
        if dr == 0:
            out |= across
        else:
            out[:, dr:] |= across[:, :-dr]
            out[:, :-dr] |= across[:, dr:]
    return out


def _check_mask_stack(masks):
    m = masks if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if m.ndim != 3:
        raise CellbgError(f"masks must be 3-D (n, H, W); got shape {tuple(m.shape)}")
    is_bool = m.dtype == torch.bool if isinstance(m, torch.Tensor) else m.dtype == np.bool_
    return m if is_bool else m != 0


def ring_mask(masks, width: int):
    """Pixels within Euclidean distance ``width`` of the mask (the mask dilated by a disk).

    Exact: equals ``scipy.ndimage.distance_transform_edt(~mask) <= width`` per crop, i.e. a
    binary dilation by ``skimage.morphology.disk(width)``. Distances are measured inside the
    crop only.

    Parameters
    ----------
    masks : (n, H, W) bool ndarray or Tensor
    width : int >= 0

    Returns
    -------
    (n, H, W) bool, same type as ``masks``.

    Examples
    --------
    >>> m = np.zeros((1, 5, 5), bool); m[0, 2, 2] = True
    >>> ring_mask(m, 1)[0].astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 0, 1, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 1, 0, 0],
           [0, 0, 0, 0, 0]])
    """
    m = _check_mask_stack(masks)
    if width < 0:
        raise CellbgError(f"width must be >= 0; got {width}")
    return _dilate_disk(m, int(width))


def mask_dilate(masks, k: int):
    """Grow the masks by ``k`` pixels: binary dilation by a Euclidean disk of radius ``k``.

    Same as :func:`ring_mask`. Examples: ``mask_dilate(m, 0)`` returns ``m``.
    """
    return ring_mask(masks, k)


def mask_erode(masks, k: int):
    """Shrink the masks by ``k`` pixels: binary erosion by a Euclidean disk of radius ``k``.

    A pixel stays when no background pixel of the crop lies within distance ``k``; the crop
    border does not erode (pixels outside the crop are not background), as in
    ``skimage.morphology.binary_erosion(mask, disk(k))``.

    Examples
    --------
    >>> m = np.zeros((1, 5, 5), bool); m[0, 1:4, 1:4] = True
    >>> int(mask_erode(m, 1).sum())
    1
    """
    m = _check_mask_stack(masks)
    if k < 0:
        raise CellbgError(f"k must be >= 0; got {k}")
    return ~_dilate_disk(~m, int(k))


# --------------------------------------------------------------------------- variants (numpy or torch)
def _tile_plan(b: np.ndarray, c: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where ``only_bg_t`` writes and what it reads, for the box pixels only.

    Returns flat indices into a C-contiguous ``(n, C, H, W)`` array (channel 0; add
    ``ch * H * W`` for channel ``ch``): destination of every box pixel, its tile's source
    pixel, and the cells without any margin (box = whole crop). Built from the box sizes
    with ``repeat``/``cumsum`` (no scan of the full image).
    """
    n = len(b)
    r0, c0, r1, c1 = b.T
    left, right, top, bottom = c0, w - c1, r0, h - r1
    side_w = np.maximum(left, right)  # widest left/right margin
    side_h = np.maximum(top, bottom)  # widest top/bottom margin
    # Ties: equal areas -> the left/right (full-height) strip; equal margins -> left / top.
    use_cols = side_w * h >= side_h * w
    strip_start = np.where(use_cols, np.where(left >= right, 0, c1), np.where(top >= bottom, 0, r1))
    strip_len = np.where(use_cols, side_w, side_h)
    no_margin = strip_len == 0
    step = np.maximum(strip_len, 1)[:, None]
    start = strip_start[:, None]
    # The tiling is separable: the source row depends on the row only, the column on the column.
    rr, cc = np.arange(h), np.arange(w)
    src_r = np.where(use_cols[:, None], rr, start + rr % step)  # (n, H)
    src_c = np.where(use_cols[:, None], start + cc % step, cc)  # (n, W)
    # Every box row (cell, row), then every pixel of it (row, offset j in the box).
    height, width = r1 - r0, c1 - c0
    row_cell = np.repeat(np.arange(n), height)
    first_row = np.cumsum(height) - height
    row = r0[row_cell] + np.arange(len(row_cell)) - first_row[row_cell]
    cell_base = row_cell * (c * h * w)
    dst_row = cell_base + row * w + c0[row_cell]
    src_row = cell_base + src_r[row_cell, row] * w
    col_row = row_cell * w + c0[row_cell]  # into src_c.ravel()
    seg = width[row_cell]
    pix_row = np.repeat(np.arange(len(row_cell)), seg)
    j = np.arange(len(pix_row)) - (np.cumsum(seg) - seg)[pix_row]
    dst = dst_row[pix_row] + j
    src = src_row[pix_row] + src_c.ravel()[col_row[pix_row] + j]
    return dst, src, no_margin


def _tile_into(out, src, b: np.ndarray, fill: torch.Tensor) -> None:
    """Write ``only_bg_t`` of ``src`` into the box pixels of ``out`` (C-contiguous, same shape).

    ``out`` may be ``src`` itself: the strip read is outside the box written. Cells without
    margin take the fill in the box (the whole crop), the fill row of their own position.
    """
    n, c, h, w = out.shape
    dst_i, src_i, no_margin = _tile_plan(b, c, h, w)
    dst_i, src_i = _like(dst_i, out), _like(src_i, out)
    flat_out, flat_src = out.reshape(-1), src.reshape(-1)
    plane = h * w
    for ch in range(c):  # a loop over channels: each writes its box pixels in one gather
        if isinstance(out, torch.Tensor):  # index_select/index_copy_: ~3x faster than [] on CPU
            flat_out[ch * plane :].index_copy_(0, dst_i, flat_src[ch * plane :].index_select(0, src_i))
        else:
            flat_out[ch * plane :][dst_i] = flat_src[ch * plane :][src_i]
    if no_margin.any():
        cells = np.flatnonzero(no_margin)
        value = _fill_as(fill, out)
        full = value.expand(out.shape) if isinstance(out, torch.Tensor) else np.broadcast_to(value, out.shape)
        out[_like(cells, out)] = full[_like(cells, out)]


def _only_bg_t(x, b: np.ndarray, fill):
    """Tile the box of every crop: copy the batch once, then write only the box pixels."""
    out = _copy(x)
    if x.shape[0]:
        _tile_into(out, out, b, fill)
    return out


def pair_cells(
    labels, rule: str, *, seed: int = 0, num_classes: int | None = None, exclude_self: bool = True
) -> np.ndarray:
    """Choose the partner cell of every cell for ``mixed_*``, from the batch given.

    Parameters
    ----------
    labels : (n,) int
        Class index of each cell.
    rule : {"same", "rand", "next"}
        ``same``: another cell of the same class; ``rand``: a class drawn uniformly from the
        classes present, then a cell of it; ``next``: a cell of class ``(y + 1) mod K``
        (when that class is absent from the batch, the next present class after it).
    seed : int
        Seed of ``numpy.random.default_rng``; same seed, same pairing.
    num_classes : int, optional
        ``K``; default ``labels.max() + 1``.
    exclude_self : bool
        True (cellbg's rule): a cell is never its own partner unless it is the only cell of
        the chosen class. False (Xiao et al.'s code, which draws a random file of the class
        folder, the cell's own file included): uniform over every cell of the chosen class.

    Returns
    -------
    (n,) int64 ndarray
        Partner index.

    Examples
    --------
    >>> pair_cells([0, 0, 1, 1], "next", seed=0) // 2
    array([1, 1, 0, 0])
    """
    rule = look_up_option(rule, ("same", "rand", "next"), what="pairing rule")
    y = _check_labels(labels, len(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)))
    n = len(y)
    if n == 0:
        return np.zeros(0, np.int64)
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if k <= int(y.max()):
        raise CellbgError(f"num_classes={k} but labels go up to {int(y.max())}")
    rng = np.random.default_rng(seed)
    order = np.argsort(y, kind="stable")  # cells grouped by class
    counts = np.bincount(y, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[y[order]]  # position of each cell within its class
    present = np.flatnonzero(counts)
    if rule == "same":
        target = y
    elif rule == "rand":
        target = present[rng.integers(len(present), size=n)]
    else:
        # Next present class cyclically after y: first present class > y, else wrap around.
        pos = np.searchsorted(present, y, side="right")
        target = present[pos % len(present)]
    u = rng.random(n)
    own = (target == y) & bool(exclude_self)
    avail = counts[target] - own.astype(np.int64)  # exclude the cell itself from its own class
    alone = avail == 0
    offset = np.floor(u * np.maximum(avail, 1)).astype(np.int64)
    offset = np.where(own & (offset >= rank), offset + 1, offset)
    offset = np.where(alone, rank, offset)  # the only cell of its class pairs with itself
    return order[starts[target] + offset]


def _mixed(x, m, b, labels, rule, seed, fill, num_classes):
    partner = pair_cells(labels, rule, seed=seed, num_classes=num_classes)
    # The partners' crops, gathered once; their only_bg_t written in place; the cells pasted on.
    if isinstance(x, torch.Tensor):
        background = x[torch.from_numpy(partner).to(x.device)].contiguous()
    else:
        background = np.ascontiguousarray(x[partner])
    if len(partner):
        _tile_into(background, background, b[partner], fill)
    return _paste(m[:, None], x, background), partner


def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's truncate=4.0
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _blur_matrix(size: int, k: torch.Tensor) -> torch.Tensor:
    """(size, size) matrix of a 1-D convolution with 'nearest' edges: out = M @ signal.

    Tap ``t`` of output ``i`` reads input ``clamp(i + t)``, so the edge replication is folded
    into the matrix and one matmul does the whole 1-D pass for every crop and channel.
    """
    r = (k.numel() - 1) // 2
    i = torch.arange(size, device=k.device)
    src = (i[:, None] + torch.arange(-r, r + 1, device=k.device)[None, :]).clamp(0, size - 1)
    m = torch.zeros(size, size, dtype=k.dtype, device=k.device)
    return m.index_put_((i[:, None].expand_as(src), src), k.expand_as(src).clone(), accumulate=True)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable gaussian over H and W of every crop and channel ('nearest' edges)."""
    if sigma == 0:
        return x
    _, _, h, w = x.shape
    ftype = x.dtype if x.dtype.is_floating_point else torch.float32
    k = _gaussian_kernel(sigma, ftype, x.device)
    y = x.to(ftype) @ _blur_matrix(w, k).T  # along W
    return _blur_matrix(h, k) @ y  # along H


def _bg_blur(x, m, sigma):
    if x.shape[0] == 0 or sigma == 0:
        return _copy(x)
    if isinstance(x, torch.Tensor):
        return _select(m.unsqueeze(1), x, _blur(x, sigma))
    # The blur itself in torch (zero-copy view) so that numpy and torch give the same numbers.
    blurred = _blur(torch.from_numpy(np.ascontiguousarray(x)), sigma).numpy()
    if blurred.dtype != x.dtype:
        blurred = _fill_as(torch.from_numpy(blurred), x)
    return _paste(m[:, None], x, blurred)


def _bg_ring(x, m, width, fill):
    return _keep(_dilate_disk(m, width)[:, None], x, fill)


#: Gaussian scales (pixels) of the ``inpaint`` fill, finest first.
INPAINT_SIGMAS = (2.0, 6.0, 18.0)


def _inpaint(x, hole, source):
    """Every ``hole`` pixel takes the local mean of the ``source`` pixels (normalised convolution).

    ``sum(G * x * source) / sum(G * source)`` with a Gaussian ``G`` of the finest scale in
    :data:`INPAINT_SIGMAS` whose support weight there exceeds 5 % of a full neighbourhood;
    where none does, the crop's mean over ``source`` (or over the crop, without any source
    pixel). Only ``hole`` pixels change. Computed in torch (for numpy input through a view).
    """
    xt = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    ftype = xt.dtype if xt.dtype.is_floating_point else torch.float32
    xf = xt.to(ftype)
    h_t = hole if isinstance(hole, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(hole))
    s_t = source if isinstance(source, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(source))
    h_t, s_t = h_t.to(xt.device)[:, None], s_t.to(xt.device)[:, None]
    w = s_t.to(ftype)
    count = w.sum(dim=(2, 3), keepdim=True)
    mean = torch.where(
        count > 0, (xf * w).sum(dim=(2, 3), keepdim=True) / count.clamp_min(1), xf.mean(dim=(2, 3), keepdim=True)
    )
    value = mean.expand_as(xf).clone()
    for sigma in reversed(INPAINT_SIGMAS):  # coarse first, finer scales overwrite where supported
        den = _blur(w, sigma)
        num = _blur(xf * w, sigma)
        ok = den > 0.05
        value = torch.where(ok, num / den.clamp_min(1e-12), value)
    filled = torch.where(h_t, value, xf)
    if isinstance(x, torch.Tensor):
        return filled if xt.dtype.is_floating_point else _fill_as(filled, x)
    out = filled.numpy()
    return out.astype(x.dtype, copy=False) if np.issubdtype(x.dtype, np.floating) else _fill_as(filled, x)


def _remove_others(x, m, o, fill, others_fill, seed):
    """The pixels of other objects (``o & ~m``) replaced: inpainted from the true background, or a fill."""
    if others_fill is not None and others_fill != "inpaint" and isinstance(others_fill, str):
        check_fill(others_fill)
    hole = o & ~m
    if others_fill == "inpaint":
        return _inpaint(x, hole, ~(o | m))
    return _keep(~hole[:, None], x, resolve_fill(others_fill if others_fill is not None else fill, x, m, seed=seed))


def _bg_image(x, m, pool, seed):
    """The cells pasted on backgrounds drawn from ``pool`` ((k, C, H, W)); returns the draw."""
    images = pool.images if hasattr(pool, "images") else pool
    n, c, h, w = x.shape
    if tuple(images.shape[1:]) != (c, h, w):
        raise CellbgError(
            f"bg_image: the background pool holds {tuple(images.shape[1:])} images but the crops are {(c, h, w)}"
        )
    if len(images) == 0:
        raise CellbgError("bg_image: the background pool is empty")
    draw = np.random.default_rng(seed).integers(len(images), size=n).astype(np.int64)
    if isinstance(x, torch.Tensor):
        pool_t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
        base = pool_t.to(device=x.device, dtype=x.dtype)[torch.from_numpy(draw).to(x.device)].contiguous()
    else:
        base = np.asarray(images)[draw]
        base = (
            base.astype(x.dtype, copy=False)
            if np.issubdtype(x.dtype, np.floating)
            else _fill_as(torch.from_numpy(np.ascontiguousarray(base)), x)
        )
        base = np.ascontiguousarray(base)
    return _paste(m[:, None], x, base), draw


def _context_axis(size: int, f: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of one axis: output i samples input coordinate S/2 + (i + 0.5 - S/2) f - 0.5.

    Returns the (S, S) interpolation matrix (rows sum to 1 inside, 0 outside), the nearest
    input index of every output position (for the mask) and whether it lies outside the
    crop (beyond half a pixel of its edge).
    """
    i = np.arange(size, dtype=np.float64)
    t = size / 2 + (i + 0.5 - size / 2) * f - 0.5
    outside = (t < -0.5) | (t > size - 0.5)
    tc = np.clip(t, 0.0, size - 1.0)  # within half a pixel of the edge: the edge pixel
    lo = np.floor(tc).astype(np.int64)
    hi = np.minimum(lo + 1, size - 1)
    wt = tc - lo
    mat = np.zeros((size, size))
    np.add.at(mat, (np.arange(size), lo), 1.0 - wt)
    np.add.at(mat, (np.arange(size), hi), wt)
    mat[outside] = 0.0
    nearest = np.clip(np.floor(t + 0.5), 0, size - 1).astype(np.int64)
    return mat, nearest, outside


def _context(x, m, f: float, fill):
    """The crop's central window of side f S, resampled to S x S (bilinear; mask nearest)."""
    n, c, h, w = x.shape
    mr, nr, out_r = _context_axis(h, f)
    mc, nc, out_c = _context_axis(w, f)
    xt, is_np = (torch.from_numpy(np.ascontiguousarray(x)), True) if not isinstance(x, torch.Tensor) else (x, False)
    ftype = xt.dtype if xt.dtype.is_floating_point else torch.float32
    rows = torch.from_numpy(mr).to(dtype=ftype, device=xt.device)
    cols = torch.from_numpy(mc).to(dtype=ftype, device=xt.device)
    y = rows @ (xt.to(ftype) @ cols.T)  # exact identity at f = 1 (weights 1 and 0)
    outside = torch.from_numpy(out_r[:, None] | out_c[None, :]).to(xt.device)
    if outside.any():
        y = _select(~outside.expand(n, 1, h, w), y, fill.to(ftype) if fill is not None else 0.0)
    mt = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(m))
    mt = mt[:, torch.from_numpy(nr).to(mt.device)][:, :, torch.from_numpy(nc).to(mt.device)] & ~outside
    if is_np:
        out = y.numpy()
        out = out.astype(x.dtype, copy=False) if np.issubdtype(x.dtype, np.floating) else _fill_as(y, x)
        return np.ascontiguousarray(out), mt.numpy()
    return (y if xt.dtype.is_floating_point else _fill_as(y, x)), mt


# --------------------------------------------------------------------------- Xiao et al.'s own code
#: The rule sets of ``only_bg_*`` and ``mixed_*``: cellbg's clean rules, or the authors' code.
REFERENCES = ("cellbg", "xiao")


def _xiao_plan(b: np.ndarray, h: int, w: int):
    """The painted region and the tile source map of Xiao et al.'s ``get_bg_tiled``.

    The box ``(r0, c0, r1, c1)`` is passed as their XML box ``xmin=c0, ymin=r0, xmax=c1,
    ymax=r1``; ``ImageDraw.rectangle`` paints it inclusive of ``xmax``/``ymax`` (clipped to
    the image). Margins ``left = xmin, right = W - xmax, top = ymin, bottom = H - ymax``;
    ``use_horizontal = max(left, right) * H > max(top, bottom) * W`` (strict: a tie takes the
    top/bottom strip); the left strip when ``left > right`` (strict: a tie takes the right
    one, which starts at column ``xmax``, a painted column), the top strip when ``top >
    bottom``. The tile is pasted from the image origin, so pixel (r, c) reads strip column
    ``c mod strip_width`` (or row ``r mod strip_height``) of the unmodified image.

    Returns the painted (n, H, W) bool region (numpy), the (n, H) source rows, the (n, W)
    source columns, and the cells without any margin (their code raises ValueError).
    """
    r0, c0, r1, c1 = b.T
    left, right, top, bottom = c0, w - c1, r0, h - r1
    area_x = np.maximum(left, right) * h
    area_y = np.maximum(top, bottom) * w
    no_margin = np.maximum(area_x, area_y) <= 0
    use_cols = area_x > area_y
    col_start = np.where(left > right, 0, c1)
    col_len = np.where(left > right, left, right)
    row_start = np.where(top > bottom, 0, r1)
    row_len = np.where(top > bottom, top, bottom)
    rr, cc = np.arange(h), np.arange(w)
    src_r = np.where(use_cols[:, None], rr, row_start[:, None] + rr % np.maximum(row_len, 1)[:, None])
    src_c = np.where(use_cols[:, None], col_start[:, None] + cc % np.maximum(col_len, 1)[:, None], cc)
    rows_in = (rr >= r0[:, None]) & (rr <= r1[:, None])
    cols_in = (cc >= c0[:, None]) & (cc <= c1[:, None])
    painted = rows_in[:, :, None] & cols_in[:, None, :]
    return painted, np.clip(src_r, 0, h - 1), np.clip(src_c, 0, w - 1), no_margin


def _xiao_only_bg_t(x, b: np.ndarray, fill):
    """``combine(img, get_bg_tiled(img, box), mask)`` of the authors' main.py, per crop."""
    n, c, h, w = x.shape
    if n == 0:
        return _copy(x)
    painted, src_r, src_c, no_margin = _xiao_plan(b, h, w)
    ni = np.arange(n)[:, None, None]
    tiled: np.ndarray | torch.Tensor
    if isinstance(x, torch.Tensor):
        idx = [torch.from_numpy(a).to(x.device) for a in (ni, src_r[:, :, None], src_c[:, None, :])]
        tiled = x.permute(0, 2, 3, 1)[idx[0], idx[1], idx[2]].permute(0, 3, 1, 2).contiguous()
    else:
        gathered = x.transpose(0, 2, 3, 1)[ni, src_r[:, :, None], src_c[:, None, :]]
        tiled = np.ascontiguousarray(np.moveaxis(gathered, -1, 1))
    if no_margin.any():  # their code raises "No background rectangles left"; cellbg's fill instead
        cells = np.flatnonzero(no_margin)
        value = _fill_as(fill, tiled)
        full = value.expand(tiled.shape) if isinstance(tiled, torch.Tensor) else np.broadcast_to(value, tiled.shape)
        tiled[_like(cells, tiled)] = full[_like(cells, tiled)]
    return _paste(_like(~painted, x)[:, None], x, tiled)


def _xiao_only_bg_b(x, b: np.ndarray):
    """``blackout(img, mask)``: the box, inclusive of xmax/ymax, set to 0 (never another fill)."""
    n, c, h, w = x.shape
    painted, *_ = _xiao_plan(b, h, w)
    floating = isinstance(x, torch.Tensor) and x.dtype.is_floating_point
    zero = torch.zeros((), dtype=x.dtype if floating else torch.float32)
    return _keep(_like(~painted, x)[:, None], x, zero)


def _xiao_mixed(x, m, b, labels, rule, seed, fill, num_classes):
    """``combine(fg, only_bg_t(partner), bg_mask)`` with ``bg_mask`` = pure-black pixels of ``fg``.

    ``fg`` is the cell with a black background (``img * fg_mask``); every pixel of it whose
    channels are all 0 (the background, and any pure-black foreground pixel) takes the
    partner's backdrop. The partner is uniform over the chosen class, the cell itself included.
    """
    partner = pair_cells(labels, rule, seed=seed, num_classes=num_classes, exclude_self=False)
    if isinstance(x, torch.Tensor):
        backdrop = _xiao_only_bg_t(x[torch.from_numpy(partner).to(x.device)].contiguous(), b[partner], fill)
        keep = m & (x != 0).any(dim=1)
    else:
        backdrop = _xiao_only_bg_t(np.ascontiguousarray(x[partner]), b[partner], fill)
        keep = m & (x != 0).any(axis=1)
    return _paste(keep[:, None], x, backdrop), partner


# --------------------------------------------------------------------------- public result + entry point
@dataclass(frozen=True)
class VariantResult:
    """Output of :func:`apply_variant`.

    Attributes
    ----------
    images : (n, C, H, W) ndarray or Tensor
        The variant images; same type, dtype and shape as the input images.
    masks : (n, H, W) bool
        The foreground mask actually used (after ``mask_erode`` / ``mask_dilate``).
    partner : (n,) int64 ndarray
        Index in the batch of the cell whose background was used (``mixed_*``); -1 otherwise.
    spec : str
        The normalised variant spec.
    background : (n,) int64 ndarray, optional
        Index in the background pool of the background each cell was drawn (``bg_image``);
        -1 otherwise (None when the result was built without it).
    """

    images: Any
    masks: Any
    partner: np.ndarray
    spec: str = ""
    background: np.ndarray | None = None

    def __iter__(self):  # unpack as images, masks, partner
        return iter((self.images, self.masks, self.partner))


def apply_variant(
    spec: str | VariantSpec,
    images,
    masks,
    *,
    bboxes=None,
    labels=None,
    fill="black",
    seed: int = 0,
    num_classes: int | None = None,
    others=None,
    backgrounds: Mapping[str, Any] | None = None,
    reference: str = "cellbg",
    others_fill: str | None = "inpaint",
) -> VariantResult:
    """Apply one background variant to a batch of crops.

    Parameters
    ----------
    spec : str or VariantSpec
        E.g. ``"only_bg_t"``, ``"bg_ring(4)"``, ``"mask_erode(2)+only_fg"``,
        ``"no_others+mixed_rand"`` (other objects removed from every crop, then mixed).
    images : (n, C, H, W) ndarray or Tensor
    masks : (n, H, W) bool ndarray or Tensor
    bboxes : (n, 4) int, optional
        ``(r0, c0, r1, c1)`` end exclusive, crop coordinates. Needed by ``only_bg_*`` and
        ``mixed_*``; default: the boxes of ``masks``. After a mask perturbation the boxes
        of the perturbed masks are used (the given box where a mask became empty).
    labels : (n,) int, optional
        Class indices; needed by ``mixed_*`` (the pairing pool is this batch).
    fill : str, float or sequence
        See :func:`resolve_fill`. ``only_bg_b`` and the no-margin ``only_bg_t`` use it too
        (the default ``"black"`` is 0, as in Xiao et al.).
    seed : int
        Seeds the pairing (``mixed_*``) and the noise fill.
    num_classes : int, optional
        ``K`` for ``mixed_next``; default ``labels.max() + 1``.
    others : (n, H, W) bool, optional
        Pixels of other segmented objects in each crop (other cells, non-target objects);
        needed by ``no_others``. Pixels of the crop's own (perturbed) mask never count.
    backgrounds : mapping of str to BackgroundPool or (k, C, H, W) array, optional
        The pools of ``bg_image(source)`` by source name (:func:`cellbg.backgrounds.background_pool`).
    reference : {'cellbg', 'xiao'}
        The rules of ``only_bg_b``, ``only_bg_t`` and ``mixed_*``: cellbg's (exact boxes, a
        fill) or Xiao et al.'s generation code, quirks included (docs/variants.md).
    others_fill : str or None
        What replaces other objects in ``no_others``: ``"inpaint"`` (default: the local mean
        of the true background around them, a normalised Gaussian convolution, so no
        object-shaped patch of another colour or texture is left), any ``fill`` value, or
        None (the same as ``fill``).

    Returns
    -------
    VariantResult
        ``images`` (same type, dtype, shape), ``masks`` used (resampled for ``context``),
        ``partner`` (-1 unless mixed), ``background`` (-1 unless ``bg_image``).

    Examples
    --------
    >>> x = np.full((1, 1, 4, 4), 0.5, np.float32)
    >>> m = np.zeros((1, 4, 4), bool); m[0, 1:3, 1:3] = True
    >>> apply_variant("only_fg", x, m).images[0, 0]
    array([[0. , 0. , 0. , 0. ],
           [0. , 0.5, 0.5, 0. ],
           [0. , 0.5, 0.5, 0. ],
           [0. , 0. , 0. , 0. ]], dtype=float32)
    """
    v = parse_variant(spec)
    reference = look_up_option(reference, REFERENCES, what="variants reference")
    x, is_np = _check_images(images)
    m = _check_masks(masks, x)
    n = x.shape[0]
    given_boxes = _check_bboxes(bboxes, x) if bboxes is not None else None
    o = None
    if others is not None:
        o = _check_masks(others, x)
    elif v.name == "no_others" or any(p == "no_others" for p, _ in v.perturbations):
        raise CellbgError(
            "no_others needs the other objects' masks (others=); crops made by 'cellbg crops' "
            "store them as crops.zarr/others"
        )
    for pname, pargs in v.perturbations:
        if pname == "no_others":  # a first step: the other objects of every crop are removed
            x = _remove_others(x, m, o, fill, others_fill, seed)
        elif pname == "mask_erode":
            m = ~_dilate_disk(~m, int(pargs[0]))
        else:
            m = _dilate_disk(m, int(pargs[0]))
    mask_changed = any(p.startswith("mask_") for p, _ in v.perturbations)
    partner = np.full(n, -1, np.int64)
    background = np.full(n, -1, np.int64)
    name, args = v.name, v.args
    needs_box = name in ("only_bg_b", "only_bg_t") or name.startswith("mixed_")
    if needs_box:
        fallback = given_boxes if given_boxes is not None else np.zeros((n, 4), np.int64)
        b = _bboxes_of(m, fallback) if (mask_changed or given_boxes is None) else given_boxes
    needs_fill = name in ("only_fg", "no_fg", "only_bg_b", "only_bg_t", "bg_ring", "context") or name.startswith(
        "mixed_"
    )
    fill_t = resolve_fill(fill, x, m, seed=seed) if needs_fill else None

    if name == "original":
        out = _copy(x)
    elif name == "only_fg":
        assert fill_t is not None  # needs_fill
        out = _keep(m[:, None], x, fill_t)
    elif name == "no_fg":
        assert fill_t is not None  # needs_fill
        out = _keep(~m[:, None], x, fill_t)
    elif name == "only_bg_b":
        assert fill_t is not None  # needs_fill
        out = _xiao_only_bg_b(x, b) if reference == "xiao" else _keep(~_box_mask(b, x)[:, None], x, fill_t)
    elif name == "only_bg_t":
        out = _xiao_only_bg_t(x, b, fill_t) if reference == "xiao" else _only_bg_t(x, b, fill_t)
    elif name.startswith("mixed_"):
        if labels is None:
            raise CellbgError(f"{name} needs labels (class index per cell) to choose partners")
        mix = _xiao_mixed if reference == "xiao" else _mixed
        out, partner = mix(x, m, b, _check_labels(labels, n), name[6:], seed, fill_t, num_classes)
    elif name == "bg_image":
        source = str(args[0])
        if backgrounds is None or source not in backgrounds:
            have = sorted(backgrounds) if backgrounds else []
            raise CellbgError(f"bg_image({source}) needs the background pool '{source}' (backgrounds=); given: {have}")
        out, background = _bg_image(x, m, backgrounds[source], seed)
    elif name == "context":
        out, m = _context(x, m, float(args[0]), fill_t)
    elif name == "no_others":
        out = _remove_others(x, m, o, fill, others_fill, seed)
    elif name == "bg_color":
        out = _keep(m[:, None], x, resolve_fill(list(args), x))
    elif name == "bg_blur":
        out = _bg_blur(x, m, args[0])
    elif name == "bg_ring":
        out = _bg_ring(x, m, int(args[0]), fill_t)
    else:  # pragma: no cover - the registry and this switch are kept together
        raise AssertionError(name)
    return VariantResult(out, m, partner, v.spec, background)


# --------------------------------------------------------------------------- one public function per variant
def _run(spec, images, masks=None, bboxes=None, labels=None, **kw):
    if masks is None:
        x, _ = _check_images(images)
        masks = torch.zeros(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool)
        masks = masks.numpy() if isinstance(images, np.ndarray) else masks
    return apply_variant(spec, images, masks, bboxes=bboxes, labels=labels, **kw)


def original(images):
    """The crops as they are (a copy).

    Examples
    --------
    >>> original(np.zeros((1, 1, 2, 2))).shape
    (1, 1, 2, 2)
    """
    return _run("original", images).images


def only_fg(images, masks, *, fill="black", seed: int = 0):
    """The cell alone: ``image * mask`` (background replaced by ``fill``).

    Examples
    --------
    >>> x = np.ones((1, 1, 2, 2)); m = np.array([[[True, False], [False, False]]])
    >>> only_fg(x, m)[0, 0].tolist()
    [[1.0, 0.0], [0.0, 0.0]]
    """
    return _run("only_fg", images, masks, fill=fill, seed=seed).images


def no_fg(images, masks, *, fill="black", seed: int = 0):
    """The background alone: ``image * (1 - mask)`` (the cell replaced by ``fill``).

    Examples
    --------
    >>> x = np.ones((1, 1, 2, 2)); m = np.array([[[True, False], [False, False]]])
    >>> no_fg(x, m)[0, 0].tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    return _run("no_fg", images, masks, fill=fill, seed=seed).images


def only_bg_b(images, bboxes, *, fill="black"):
    """The background with the cell's bounding box set to 0 (or ``fill``).

    Examples
    --------
    >>> x = np.ones((1, 1, 3, 3)); only_bg_b(x, [[1, 1, 2, 3]])[0, 0].tolist()
    [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    return _run(
        "only_bg_b", images, bboxes=np.asarray(bboxes) if not torch.is_tensor(bboxes) else bboxes, fill=fill
    ).images


def only_bg_t(images, bboxes, *, fill="black"):
    """The background with the box filled by tiles of the largest background strip.

    cellbg's rule (after Xiao et al.; ``apply_variant(..., reference="xiao")`` gives the
    authors' code instead, see docs/variants.md): compare ``max(left, right) * H`` with
    ``max(top, bottom) * W``; take the larger full-height (or full-width) strip outside the
    box and tile it from the image origin, so a box pixel at column ``x`` takes the strip's
    column ``x mod strip_width`` (rows likewise). Only box pixels change. Ties: equal areas
    take the left/right strip, equal margins the left (or top) one. No margin at all: the
    box takes ``fill``.

    Examples
    --------
    >>> x = np.arange(6, dtype=float).reshape(1, 1, 1, 6)   # one row: 0 1 2 3 4 5
    >>> only_bg_t(x, [[0, 2, 1, 6]])[0, 0].tolist()          # strip = columns 0, 1
    [[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    """
    return _run(
        "only_bg_t", images, bboxes=np.asarray(bboxes) if not torch.is_tensor(bboxes) else bboxes, fill=fill
    ).images


def mixed_same(images, masks, bboxes, labels, *, seed: int = 0, fill="black") -> VariantResult:
    """The cell pasted on the ``only_bg_t`` background of another cell of the same class.

    Returns a :class:`VariantResult`; ``partner[i]`` is the index of the background's cell.
    """
    return apply_variant("mixed_same", images, masks, bboxes=bboxes, labels=labels, seed=seed, fill=fill)


def mixed_rand(images, masks, bboxes, labels, *, seed: int = 0, fill="black") -> VariantResult:
    """The cell pasted on the ``only_bg_t`` background of a cell of a random class."""
    return apply_variant("mixed_rand", images, masks, bboxes=bboxes, labels=labels, seed=seed, fill=fill)


def mixed_next(images, masks, bboxes, labels, *, seed: int = 0, fill="black", num_classes=None) -> VariantResult:
    """The cell pasted on the ``only_bg_t`` background of a cell of class ``(y + 1) mod K``."""
    return apply_variant(
        "mixed_next", images, masks, bboxes=bboxes, labels=labels, seed=seed, fill=fill, num_classes=num_classes
    )


def bg_color(images, masks, color):
    """The cell on a solid colour (one value, or one per channel, in [0, 1]).

    Examples
    --------
    >>> x = np.zeros((1, 3, 1, 2)); m = np.array([[[True, False]]])
    >>> bg_color(x, m, (0, 0, 1))[0, :, 0, 1].tolist()
    [0.0, 0.0, 1.0]
    """
    color = tuple(np.atleast_1d(np.asarray(color, dtype=float)).tolist())
    return _run(VariantSpec(_fmt("bg_color", color), "bg_color", color), images, masks).images


def bg_blur(images, masks, sigma: float):
    """The cell on its own background, gaussian-blurred with ``sigma`` pixels.

    The blur runs over H and W only (not across crops or channels), edges 'nearest', kernel
    truncated at 4 sigma, as ``scipy.ndimage.gaussian_filter(x, (0, 0, s, s), mode="nearest")``;
    foreground pixels keep their original values.
    """
    return _run(f"bg_blur({float(sigma):g})", images, masks).images


def bg_ring(images, masks, width: int, *, fill="black", seed: int = 0):
    """The cell plus a ``width``-pixel ring of its own background; the rest filled.

    The ring is every pixel within Euclidean distance ``width`` of the mask (exact; see
    :func:`ring_mask`). ``bg_ring(0)`` is ``only_fg``; a ring wider than the crop is ``original``.
    """
    return _run(f"bg_ring({int(width)})", images, masks, fill=fill, seed=seed).images


def bg_image(images, masks, pool, *, seed: int = 0) -> VariantResult:
    """The cell's foreground over a background drawn from a pool (a generic background).

    Every cell draws one background of ``pool`` uniformly with
    ``numpy.random.default_rng(seed)``; ``result.background[i]`` records the draw (an index
    into the pool, like the ``mixed_*`` partner). Foreground pixels are bit-identical to the
    input; the rest are the drawn background's.

    Parameters
    ----------
    images : (n, C, H, W) ndarray or Tensor
    masks : (n, H, W) bool
    pool : BackgroundPool or (k, C, H, W) array
        From :func:`cellbg.backgrounds.background_pool` (cell-free synthetic fields, windows of
        images from a folder, or a constant image).
    seed : int

    Returns
    -------
    VariantResult

    Examples
    --------
    >>> x = np.ones((2, 1, 2, 2), np.float32); m = np.zeros((2, 2, 2), bool); m[:, 0, 0] = True
    >>> pool = np.stack([np.full((1, 2, 2), 0.25), np.full((1, 2, 2), 0.75)]).astype(np.float32)
    >>> r = bg_image(x, m, pool, seed=0)
    >>> r.images[0, 0].tolist(), r.background.tolist()
    ([[1.0, 0.75], [0.75, 0.75]], [1, 1])
    """
    return apply_variant("bg_image(pool)", images, masks, backgrounds={"pool": pool}, seed=seed)


def context(images, masks, f: float, *, fill="black", seed: int = 0) -> VariantResult:
    """The cell at a chosen fraction of the crop: the central window of side ``f * S`` resampled to ``S``.

    Output pixel ``i`` (per axis) samples the input at ``S/2 + (i + 0.5 - S/2) * f - 0.5``
    (pixel centres; the crops are centred on the cell's box) by bilinear interpolation, the
    mask by nearest neighbour. ``f < 1`` enlarges the cell by ``1/f`` and shows less of its
    background; ``f = 1`` is the crop itself, exactly; ``f > 1`` shrinks the cell, and where
    the window reaches beyond the stored crop the surround is the fill (nothing is
    invented inside the crop: every output pixel inside it is an interpolation of crop
    pixels). No antialiasing: for ``f > 1`` each output pixel still reads its 2 x 2 nearest
    input pixels.

    Returns
    -------
    VariantResult
        ``masks`` are the resampled masks.

    Examples
    --------
    >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4); m = np.zeros((1, 4, 4), bool)
    >>> bool((context(x, m, 1.0).images == x).all())
    True
    >>> context(x, m, 0.5).images[0, 0, 1].tolist()
    [5.75, 6.25, 6.75, 7.25]
    """
    return apply_variant(f"context({float(f):g})", images, masks, fill=fill, seed=seed)


def no_others(images, masks, others, *, fill="inpaint", seed: int = 0):
    """The crop with the other segmented objects removed.

    Only pixels of ``others`` outside the crop's own mask change: the target cell and the
    true background remain. ``fill="inpaint"`` (default) gives each removed pixel the local
    mean of the true background around it (pixels of neither the cell nor any other object;
    a normalised Gaussian convolution at the finest of :data:`INPAINT_SIGMAS` with enough
    support), so no patch of another colour or texture marks where an object was; any other
    fill of :func:`resolve_fill` is written instead when given.

    Parameters
    ----------
    images : (n, C, H, W) ndarray or Tensor
    masks : (n, H, W) bool
        The crop's own cell.
    others : (n, H, W) bool
        Pixels of every other labelled object in the crop (``crops.zarr/others``): other
        cells, and non-target objects when the dataset names them.

    Examples
    --------
    >>> x = np.ones((1, 1, 1, 3)); m = np.array([[[True, False, False]]]); o = np.array([[[True, True, False]]])
    >>> no_others(x, m, o, fill="black")[0, 0].tolist()
    [[1.0, 0.0, 1.0]]
    """
    return apply_variant(
        "no_others",
        images,
        masks,
        others=others,
        fill="black" if fill == "inpaint" else fill,
        seed=seed,
        others_fill=fill,
    ).images


# --------------------------------------------------------------------------- MONAI-style transforms
class ApplyVariant(Randomizable, Transform):
    """Array transform: apply one background variant to a batch of crops.

    Random variants (``mixed_*``, ``fill="noise"``) draw the seed of each call from
    ``self.R``; seed the transform with :meth:`set_random_state`. Use it on batches (the
    ``mixed_*`` pairing pool is the batch); a single crop ``(C, H, W)`` is accepted and
    treated as a batch of one.

    Examples
    --------
    >>> t = ApplyVariant("only_fg").set_random_state(0)
    >>> x = np.ones((2, 1, 4, 4), np.float32); m = np.ones((2, 4, 4), bool)
    >>> t(x, m).images.shape
    (2, 1, 4, 4)
    """

    def __init__(self, spec: str, *, fill="black", num_classes: int | None = None) -> None:
        self.variant = parse_variant(spec)
        if isinstance(fill, str):
            check_fill(fill)  # fail at construction, not on the first batch
        self.fill = fill
        self.num_classes = num_classes
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    # MONAI's Transform.__call__ takes one ``data``; a variant needs the images and their masks (and boxes,
    # labels), so this signature deliberately differs.
    def __call__(  # type: ignore[override]
        self, images, masks, bboxes=None, labels=None, *, randomize: bool = True
    ) -> VariantResult:
        if randomize:
            self.randomize()
        single = getattr(images, "ndim", 0) == 3
        if single:
            images, masks = images[None], masks[None]
            bboxes = None if bboxes is None else (bboxes[None] if torch.is_tensor(bboxes) else np.asarray(bboxes)[None])
            labels = None if labels is None else np.atleast_1d(np.asarray(labels))
        r = apply_variant(
            self.variant,
            images,
            masks,
            bboxes=bboxes,
            labels=labels,
            fill=self.fill,
            seed=self._seed,
            num_classes=self.num_classes,
        )
        if single:
            return VariantResult(r.images[0], r.masks[0], r.partner, r.spec)
        return r


class ApplyVariantd(Randomizable, MapTransform):
    """Dictionary twin of :class:`ApplyVariant`.

    Reads ``image_key``, ``mask_key``, ``bbox_key``, ``label_key`` from the dictionary and
    writes the variant image to ``image_key`` (and ``partner_key``, and the mask used to
    ``mask_key``). ``keys`` are the image keys; all share one random draw per call.

    Examples
    --------
    >>> t = ApplyVariantd("image", spec="no_fg").set_random_state(0)
    >>> d = {"image": np.ones((1, 1, 2, 2)), "mask": np.ones((1, 2, 2), bool)}
    >>> float(t(d)["image"].sum())
    0.0
    """

    def __init__(
        self,
        keys,
        spec: str,
        *,
        fill="black",
        mask_key: str = "mask",
        bbox_key: str = "bbox",
        label_key: str = "label",
        partner_key: str = "partner",
        num_classes: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = ApplyVariant(spec, fill=fill, num_classes=num_classes)
        self.mask_key, self.bbox_key, self.label_key, self.partner_key = mask_key, bbox_key, label_key, partner_key

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        self.transform.randomize()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        used_mask = None
        for key in self.key_iterator(d):
            if self.mask_key not in d:
                raise CellbgError(
                    f"ApplyVariantd needs the mask under key '{self.mask_key}'; keys: {sorted(map(str, d))}"
                )
            r = self.transform(d[key], d[self.mask_key], d.get(self.bbox_key), d.get(self.label_key), randomize=False)
            d[key], used_mask = r.images, r.masks
            d[self.partner_key] = r.partner
        if used_mask is not None:
            d[self.mask_key] = used_mask
        return d


# --------------------------------------------------------------------------- gallery and export
def make_gallery(
    images,
    masks,
    bboxes,
    labels,
    specs: Sequence[str],
    out_png,
    *,
    fill="black",
    seed=0,
    cells: Sequence[int] | None = None,
    row_names: Sequence[str] | None = None,
    **options,
) -> Path:
    """Write a montage PNG: rows = cells, columns = variants.

    Parameters
    ----------
    images, masks, bboxes, labels
        The batch, as for :func:`apply_variant` (mixed partners are drawn from it).
    specs : sequence of str
        Variant specs, one column each.
    out_png : path
    cells : sequence of int, optional
        Row indices to show; default the first 8.
    row_names : sequence of str, optional
        A label per shown row (e.g. cell ids).
    **options
        Passed to :func:`apply_variant` (``others``, ``backgrounds``, ``reference``).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from cellbg._io import atomic_path

    parsed = [parse_variant(s) for s in specs]
    if not parsed:
        raise CellbgError("make_gallery needs at least one variant spec")
    x, _ = _check_images(images)
    n = x.shape[0]
    if n == 0:
        raise CellbgError("make_gallery: the crop store holds no cells")
    rows = list(range(min(8, n))) if cells is None else [int(i) for i in cells]
    cols = [
        apply_variant(v, images, masks, bboxes=bboxes, labels=labels, fill=fill, seed=seed, **options) for v in parsed
    ]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.4 * len(cols), 1.4 * len(rows)), squeeze=False)
    for j, (v, r) in enumerate(zip(parsed, cols, strict=True)):
        imgs = r.images.cpu().numpy() if torch.is_tensor(r.images) else np.asarray(r.images)
        for i, cell in enumerate(rows):
            ax = axes[i, j]
            img = imgs[cell].astype(np.float32)
            img = img[0] if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)
            ax.imshow(np.clip(img, 0, 1), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(v.spec, fontsize=7)
            if j == 0 and row_names is not None:
                ax.set_ylabel(str(row_names[i]), fontsize=6)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png


def protocol_backgrounds(protocol, specs: Sequence[str], *, size: int, channels: int) -> dict:
    """The background pools that ``specs`` need (``bg_image(name)``), drawn with ``variants.seed``.

    Sources are the protocol's ``variants.backgrounds`` and the built-in ``synthetic``.
    """
    from cellbg.backgrounds import background_pool, pool_sources

    cfg = protocol.variants
    pools = {}
    for name in pool_sources(specs):
        source = cfg.backgrounds.get(name)
        config = source.model_dump() if source is not None else None
        pools[name] = background_pool(name, config, size=size, channels=channels, seed=cfg.seed)
    return pools


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,+-]", "_", spec).replace("(", "_").strip("_")


def export_variants(
    images,
    masks,
    cells,
    specs: Sequence[str],
    out_dir,
    *,
    fill="black",
    seed=0,
    classes: Sequence[str] | None = None,
    **options,
):
    """Materialise variant datasets as TIFFs for other tools.

    Writes ``out_dir/<variant>/<class>/<cell_id>.tif`` (float32 ``(C, H, W)``) and
    ``out_dir/<variant>/manifest.csv`` (``path, label, cell_id, partner_cell_id``); each
    variant folder is written atomically, so a finished variant is never half-replaced.

    Parameters
    ----------
    images, masks
        The crop store's arrays.
    cells : pandas.DataFrame
        ``cells.parquet`` rows (``cell_id``, ``label``, ``label_index``, ``bbox_*``).
    specs : sequence of str
    out_dir : path

    Returns
    -------
    pandas.DataFrame
        One row per written file with a ``variant`` column.
    """
    import pandas as pd
    import tifffile

    from cellbg._io import atomic_dir

    need = {"cell_id", "label", "label_index", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"}
    missing = need - set(cells.columns)
    if missing:
        raise CellbgError(f"cell table lacks columns {sorted(missing)} needed for export")
    bboxes = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(np.int64)
    labels = cells["label_index"].to_numpy(np.int64)
    ids = cells["cell_id"].astype(str).to_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    for spec in specs:
        v = parse_variant(spec)
        r = apply_variant(v, images, masks, bboxes=bboxes, labels=labels, fill=fill, seed=seed, **options)
        imgs = r.images.cpu().numpy() if torch.is_tensor(r.images) else np.asarray(r.images)
        name = _safe_name(v.spec)
        rows = []
        with atomic_dir(out_dir / name) as tmp:
            for i, (cid, lab) in enumerate(zip(ids, cells["label"].astype(str), strict=True)):  # one file per cell
                rel = Path(lab) / f"{cid}.tif"
                (tmp / lab).mkdir(exist_ok=True)
                tifffile.imwrite(tmp / rel, imgs[i].astype(np.float32), photometric="minisblack")
                rows.append(
                    {
                        "path": rel.as_posix(),
                        "label": lab,
                        "cell_id": cid,
                        "partner_cell_id": ids[r.partner[i]] if r.partner[i] >= 0 else "",
                    }
                )
            table = pd.DataFrame(rows)
            table.to_csv(tmp / "manifest.csv", index=False)
        tables.append(table.assign(variant=v.spec))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _gallery_rows(labels: np.ndarray, n_rows: int) -> list[int]:
    """Up to ``n_rows`` cells, the first ones of each class in turn (so every class shows)."""
    per_class = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    rows: list[int] = []
    for depth in range(max((len(p) for p in per_class), default=0)):
        for p in per_class:
            if depth < len(p) and len(rows) < n_rows:
                rows.append(int(p[depth]))
    return rows


def run_variants(protocol, *, gallery=None, export=None, n_rows: int = 8) -> dict:
    """The ``cellbg variants`` stage: check the protocol's variants on the run's crops.

    Reads ``<run>/crops.zarr`` and ``cells.parquet`` (:func:`cellbg.crops.load_crops`); with
    ``gallery`` writes a montage PNG (rows = cells of every class, columns = the train and
    test variants); with ``export`` writes every variant as TIFFs (:func:`export_variants`).
    Variants are otherwise computed on the fly by the training loader, never stored.

    Returns
    -------
    dict
        ``specs`` (normalised), ``cells``, ``gallery`` and ``export`` paths (or None).
    """
    from cellbg.crops import load_crops, load_others

    cfg = protocol.variants
    specs = list(dict.fromkeys(parse_variant(s).spec for s in [*cfg.train, *cfg.test]))
    images, masks, cells = load_crops(protocol.run_dir)
    options = {
        "others": load_others(protocol.run_dir),
        "reference": cfg.reference,
        "others_fill": cfg.others_fill,
        "backgrounds": protocol_backgrounds(protocol, specs, size=images.shape[-1], channels=images.shape[1]) or None,
    }
    bboxes = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(np.int64)
    labels = cells["label_index"].to_numpy(np.int64)
    summary = {"specs": specs, "cells": len(cells), "gallery": None, "export": None}
    if gallery is not None:
        rows = _gallery_rows(labels, n_rows)
        names = [f"{cells.cell_id.iloc[i]} ({cells.label.iloc[i]})" for i in rows]
        summary["gallery"] = make_gallery(
            images,
            masks,
            bboxes,
            labels,
            specs,
            gallery,
            fill=cfg.fill,
            seed=cfg.seed,
            cells=rows,
            row_names=names,
            **options,
        )
    if export is not None:
        export_variants(images, masks, cells, specs, export, fill=cfg.fill, seed=cfg.seed, **options)
        summary["export"] = Path(export)
    return summary
