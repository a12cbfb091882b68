"""Background variants: the images that separate what a cell says from what its background says.

Every function works on a whole batch of crops at once, numpy arrays or torch tensors alike
(same type, dtype, device and shape out), with no Python loop over pixels or cells: the
work is done by broadcasting, index gathers and a few whole-batch torch ops.

Shapes (DESIGN.md, crops contract): ``images (n, C, H, W)`` (float32 in [0, 1]),
``masks (n, H, W)`` bool, ``bboxes (n, 4)`` int ``(r0, c0, r1, c1)`` end-exclusive in crop
coordinates, ``labels (n,)`` int class indices.

Variants follow Xiao et al., "Noise or Signal: The Role of Image Backgrounds in Object
Recognition" (ICLR 2021); see ``docs/variants.md`` for the exact rules, the no-margin
fallback and how ties are broken.

Variant spec strings: ``name`` or ``name(arg, ...)``; mask perturbations compose in front
with ``+``: ``mask_erode(2)+only_fg``. :func:`apply_variant` is the batch entry point;
:class:`ApplyVariant` / :class:`ApplyVariantd` are MONAI-style transforms around it.
"""

from __future__ import annotations

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
    "mask_erode",
    "mask_dilate",
    "ring_mask",
    "resolve_fill",
    "ApplyVariant",
    "ApplyVariantd",
    "make_gallery",
    "export_variants",
    "run_variants",
]


# --------------------------------------------------------------------------- array plumbing
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


def _back(x: torch.Tensor, was_numpy: bool, like: torch.Tensor):
    x = x.to(dtype=like.dtype)
    return x.numpy() if was_numpy else x


def _check_images(images) -> tuple[torch.Tensor, bool]:
    t, is_np = _as_torch(images, arg_name="images")
    if t.ndim != 4:
        raise CellbgError(f"images must be 4-D (n, C, H, W); got shape {tuple(t.shape)}")
    return t, is_np


def _check_masks(masks, images: torch.Tensor) -> torch.Tensor:
    m, _ = _as_torch(masks, arg_name="masks")
    n, _, h, w = images.shape
    if tuple(m.shape) != (n, h, w):
        raise CellbgError(f"masks must have shape (n, H, W) = {(n, h, w)} to match images; got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.dtype.is_floating_point or m.dtype.is_complex:
            raise CellbgError(f"masks must be bool (True = cell); got {m.dtype}")
        m = m != 0
    return m.to(images.device)


def _check_bboxes(bboxes, images: torch.Tensor) -> torch.Tensor:
    b, _ = _as_torch(bboxes, arg_name="bboxes")
    n, _, h, w = images.shape
    if tuple(b.shape) != (n, 4):
        raise CellbgError(f"bboxes must have shape (n, 4) = {(n, 4)} (r0, c0, r1, c1); got {tuple(b.shape)}")
    if b.dtype.is_floating_point:
        raise CellbgError(f"bboxes must be integers (r0, c0, r1, c1, end exclusive); got {b.dtype}")
    b = b.to(dtype=torch.int64, device=images.device)
    if n:
        r0, c0, r1, c1 = b.unbind(1)
        bad = (r0 < 0) | (c0 < 0) | (r1 > h) | (c1 > w) | (r0 > r1) | (c0 > c1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise CellbgError(
                f"bboxes[{i}] = {b[i].tolist()} is not inside the {h}x{w} crop (need 0 <= r0 <= r1 <= H, 0 <= c0 <= c1 <= W)"
            )
    return b


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise CellbgError(f"labels must be {n} integer class indices, shape ({n},); got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise CellbgError(f"labels must be class indices >= 0; got {int(y.min())}")
    return y.astype(np.int64)


def _box_mask(bboxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, H, W) bool: inside each cell's bounding box."""
    r = torch.arange(h, device=bboxes.device)
    c = torch.arange(w, device=bboxes.device)
    r0, c0, r1, c1 = (v[:, None] for v in bboxes.unbind(1))
    rows = (r >= r0) & (r < r1)
    cols = (c >= c0) & (c < c1)
    return rows[:, :, None] & cols[:, None, :]


def _bboxes_of(masks: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Bounding boxes of the masks; ``fallback`` rows where a mask is empty."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    r0 = rows.int().argmax(1)
    r1 = h - rows.flip(1).int().argmax(1)
    c0 = cols.int().argmax(1)
    c1 = w - cols.flip(1).int().argmax(1)
    boxes = torch.stack([r0, c0, r1, c1], 1).to(torch.int64)
    empty = ~rows.any(1)
    return torch.where(empty[:, None], fallback, boxes)


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
    lo, hi = (x.amin(), x.amax()) if x.numel() else (0.0, 1.0)
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
    return out.addcmul_(b, 1 - c) if out.shape == torch.broadcast_shapes(out.shape, b.shape, c.shape) \
        else out + b * (1 - c)


# --------------------------------------------------------------------------- morphology
def _sq_dist_within(masks: torch.Tensor, width: int) -> torch.Tensor:
    """Exact squared Euclidean distance to the nearest True pixel, capped beyond ``width``.

    Row pass: horizontal distance to the nearest True pixel in the same row (running max/min
    of True-pixel column indices). Column pass: min over row offsets ``|dr| <= width`` of
    ``row_dist(r + dr)**2 + dr**2`` (offsets beyond ``width`` can only give distances
    > ``width``). Values > ``width**2`` are "outside" (may be inexact; inf where no pixel).
    """
    n, h, w = masks.shape
    # "No True pixel" is a finite far value (arithmetic select beats torch.where on CPU);
    # far**2 exceeds every in-crop squared distance and width**2.
    far = float(2 * (h + w + int(width) + 1))
    col = torch.arange(w, device=masks.device, dtype=torch.float32)
    mf = masks.to(torch.float32)
    left = (mf * (col + far) - far).cummax(dim=2).values
    right = (far - mf * (far - col)).flip(2).cummin(dim=2).values.flip(2)
    row_sq = torch.minimum(col - left, right - col).clamp_(max=far) ** 2
    reach = min(int(width), h - 1)
    padded = torch.nn.functional.pad(row_sq, (0, 0, reach, reach), value=far * far)
    best = row_sq.clone()
    for dr in range(1, reach + 1):  # a loop over ring offsets, not over pixels or cells
        best = torch.minimum(best, padded[:, reach + dr : reach + dr + h] + dr * dr)
        best = torch.minimum(best, padded[:, reach - dr : reach - dr + h] + dr * dr)
    return best


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
    m, is_np = _as_torch(masks, arg_name="masks")
    if m.ndim != 3:
        raise CellbgError(f"masks must be 3-D (n, H, W); got shape {tuple(m.shape)}")
    if width < 0:
        raise CellbgError(f"width must be >= 0; got {width}")
    m = m != 0 if m.dtype != torch.bool else m
    out = _sq_dist_within(m, int(width)) <= float(width) ** 2
    return out.numpy() if is_np else out


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
    m, is_np = _as_torch(masks, arg_name="masks")
    if m.ndim != 3:
        raise CellbgError(f"masks must be 3-D (n, H, W); got shape {tuple(m.shape)}")
    if k < 0:
        raise CellbgError(f"k must be >= 0; got {k}")
    m = m != 0 if m.dtype != torch.bool else m
    out = ~(_sq_dist_within(~m, int(k)) <= float(k) ** 2)
    return out.numpy() if is_np else out


# --------------------------------------------------------------------------- variants (torch core)
def _only_fg(x, m, fill):
    return _select(m.unsqueeze(1), x, fill)


def _no_fg(x, m, fill):
    return _select(~m.unsqueeze(1), x, fill)


def _only_bg_b(x, b, fill):
    return _select(~_box_mask(b, x.shape[2], x.shape[3]).unsqueeze(1), x, fill)


def _tile_sources(b: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per crop: flat source index of every pixel (its tile inside the box, itself outside),
    whether a margin exists, and the box as a (n, H, W) bool."""
    r0, c0, r1, c1 = b.unbind(1)
    left, right, top, bottom = c0, w - c1, r0, h - r1
    side_w = torch.maximum(left, right)  # widest left/right margin
    side_h = torch.maximum(top, bottom)  # widest top/bottom margin
    # Ties: equal areas -> the left/right (full-height) strip; equal margins -> left / top.
    use_cols = side_w * h >= side_h * w
    strip_start = torch.where(
        use_cols,
        torch.where(left >= right, torch.zeros_like(c0), c1),
        torch.where(top >= bottom, torch.zeros_like(r0), r1),
    )
    strip_len = torch.where(use_cols, side_w, side_h)
    has_margin = strip_len > 0
    step = strip_len.clamp(min=1)[:, None]
    start = strip_start[:, None]
    cols_case = use_cols[:, None].long()
    rr = torch.arange(h, device=b.device)[None, :]
    cc = torch.arange(w, device=b.device)[None, :]
    # The tiling is separable: the source row depends on the row only, the column on the column.
    src_c = cc + cols_case * (start + cc % step - cc)  # (n, W)
    src_r = rr + (1 - cols_case) * (start + rr % step - rr)  # (n, H)
    # Full-size (n, H, W) arithmetic in int32 (several times faster than int64 on CPU).
    i32 = torch.int32
    row_in = ((rr >= r0[:, None]) & (rr < r1[:, None])).to(i32)  # (n, H)
    col_in = ((cc >= c0[:, None]) & (cc < c1[:, None])).to(i32)  # (n, W)
    box = row_in[:, :, None] * col_in[:, None, :]
    # Inside the box: tile - own = row shift + column shift (the tiling is separable).
    shift = ((src_r - rr) * w).to(i32)[:, :, None] + (src_c - cc).to(i32)[:, None, :]
    own = ((rr * w)[:, :, None] + cc[:, None, :]).to(i32)
    return (own + box * shift).long(), has_margin, box.bool()


def _only_bg_t(x, b, fill):
    """Tile the box of every crop (one gather: box pixels read their tile, others themselves)."""
    n, c, h, w = x.shape
    src, has_margin, box = _tile_sources(b, h, w)
    tiled = x.reshape(n, c, h * w).gather(2, src.view(n, 1, h * w).expand(n, c, h * w)).view(n, c, h, w)
    if not bool(has_margin.all()):
        # No margin (the box is the whole crop): nothing to tile; the box takes the fill.
        filled = _select(torch.zeros_like(box).unsqueeze(1), tiled, fill)
        tiled = _select((~box | has_margin[:, None, None]).unsqueeze(1), tiled, filled)
    return tiled


def pair_cells(labels, rule: str, *, seed: int = 0, num_classes: int | None = None) -> np.ndarray:
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

    Returns
    -------
    (n,) int64 ndarray
        Partner index. A cell is never its own partner unless it is the only cell of the
        chosen class.

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
    own = target == y
    avail = counts[target] - own.astype(np.int64)  # exclude the cell itself from its own class
    alone = avail == 0
    offset = np.floor(u * np.maximum(avail, 1)).astype(np.int64)
    offset = np.where(own & (offset >= rank), offset + 1, offset)
    offset = np.where(alone, rank, offset)  # the only cell of its class pairs with itself
    return order[starts[target] + offset]


def _mixed(x, m, b, labels, rule, seed, fill, num_classes):
    partner_np = pair_cells(labels, rule, seed=seed, num_classes=num_classes)
    partner = torch.from_numpy(partner_np).to(x.device)
    background = _only_bg_t(x[partner], b[partner], fill)  # partner's own only_bg_t
    return _select(m.unsqueeze(1), x, background), partner_np


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
    if x.numel() == 0:
        return x.clone()
    return _select(m.unsqueeze(1), x, _blur(x, sigma))


def _bg_ring(x, m, width, fill):
    return _select(_sq_dist_within(m, width).unsqueeze(1) <= float(width) ** 2, x, fill)


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
    """

    images: Any
    masks: Any
    partner: np.ndarray
    spec: str = ""

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
) -> VariantResult:
    """Apply one background variant to a batch of crops.

    Parameters
    ----------
    spec : str or VariantSpec
        E.g. ``"only_bg_t"``, ``"bg_ring(4)"``, ``"mask_erode(2)+only_fg"``.
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
        (the default ``"black"`` is Xiao et al.'s 0).
    seed : int
        Seeds the pairing (``mixed_*``) and the noise fill.
    num_classes : int, optional
        ``K`` for ``mixed_next``; default ``labels.max() + 1``.

    Returns
    -------
    VariantResult
        ``images`` (same type, dtype, shape), ``masks`` used, ``partner`` (-1 unless mixed).

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
    x, is_np = _check_images(images)
    m = _check_masks(masks, x)
    n, _, h, w = x.shape
    given_boxes = _check_bboxes(bboxes, x) if bboxes is not None else None
    for pname, (k,) in v.perturbations:
        m = mask_erode(m, int(k)) if pname == "mask_erode" else mask_dilate(m, int(k))
    partner = np.full(n, -1, np.int64)
    name, args = v.name, v.args
    needs_box = name in ("only_bg_b", "only_bg_t") or name.startswith("mixed_")
    if needs_box:
        fallback = given_boxes if given_boxes is not None else torch.zeros((n, 4), dtype=torch.int64, device=x.device)
        b = _bboxes_of(m, fallback) if (v.perturbations or given_boxes is None) else given_boxes
    needs_fill = name in ("only_fg", "no_fg", "only_bg_b", "only_bg_t", "bg_ring") or name.startswith("mixed_")
    fill_t = resolve_fill(fill, x, m, seed=seed) if needs_fill else None

    if name == "original":
        out = x.clone()
    elif name == "only_fg":
        out = _only_fg(x, m, fill_t)
    elif name == "no_fg":
        out = _no_fg(x, m, fill_t)
    elif name == "only_bg_b":
        out = _only_bg_b(x, b, fill_t)
    elif name == "only_bg_t":
        out = _only_bg_t(x, b, fill_t)
    elif name.startswith("mixed_"):
        if labels is None:
            raise CellbgError(f"{name} needs labels (class index per cell) to choose partners")
        out, partner = _mixed(x, m, b, _check_labels(labels, n), name[6:], seed, fill_t, num_classes)
    elif name == "bg_color":
        out = _only_fg(x, m, resolve_fill(list(args), x))
    elif name == "bg_blur":
        out = _bg_blur(x, m, args[0])
    elif name == "bg_ring":
        out = _bg_ring(x, m, int(args[0]), fill_t)
    else:  # pragma: no cover - the registry and this switch are kept together
        raise AssertionError(name)
    out_masks = m.numpy() if is_np else m
    return VariantResult(_back(out, is_np, x), out_masks, partner, v.spec)


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
    return _run("only_bg_b", images, bboxes=np.asarray(bboxes) if not torch.is_tensor(bboxes) else bboxes, fill=fill).images


def only_bg_t(images, bboxes, *, fill="black"):
    """The background with the box filled by tiles of the largest background strip.

    Xiao et al.'s rule: compare ``max(left, right) * H`` with ``max(top, bottom) * W``; take
    the larger full-height (or full-width) strip outside the box and tile it from the image
    origin, so a box pixel at column ``x`` takes the strip's column ``x mod strip_width``
    (rows likewise). Only box pixels change. Ties: equal areas take the left/right strip,
    equal margins the left (or top) one. No margin at all: the box takes ``fill``.

    Examples
    --------
    >>> x = np.arange(6, dtype=float).reshape(1, 1, 1, 6)   # one row: 0 1 2 3 4 5
    >>> only_bg_t(x, [[0, 2, 1, 6]])[0, 0].tolist()          # strip = columns 0, 1
    [[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    """
    return _run("only_bg_t", images, bboxes=np.asarray(bboxes) if not torch.is_tensor(bboxes) else bboxes, fill=fill).images


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

    def __call__(self, images, masks, bboxes=None, labels=None, *, randomize: bool = True) -> VariantResult:
        if randomize:
            self.randomize()
        single = getattr(images, "ndim", 0) == 3
        if single:
            images, masks = images[None], masks[None]
            bboxes = None if bboxes is None else (bboxes[None] if torch.is_tensor(bboxes) else np.asarray(bboxes)[None])
            labels = None if labels is None else np.atleast_1d(np.asarray(labels))
        r = apply_variant(
            self.variant, images, masks, bboxes=bboxes, labels=labels, fill=self.fill, seed=self._seed,
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
                raise CellbgError(f"ApplyVariantd needs the mask under key '{self.mask_key}'; keys: {sorted(map(str, d))}")
            r = self.transform(d[key], d[self.mask_key], d.get(self.bbox_key), d.get(self.label_key), randomize=False)
            d[key], used_mask = r.images, r.masks
            d[self.partner_key] = r.partner
        if used_mask is not None:
            d[self.mask_key] = used_mask
        return d


# --------------------------------------------------------------------------- gallery and export
def make_gallery(images, masks, bboxes, labels, specs: Sequence[str], out_png, *, fill="black", seed=0,
                 cells: Sequence[int] | None = None, row_names: Sequence[str] | None = None) -> Path:
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
    cols = [apply_variant(v, images, masks, bboxes=bboxes, labels=labels, fill=fill, seed=seed) for v in parsed]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.4 * len(cols), 1.4 * len(rows)), squeeze=False)
    for j, (v, r) in enumerate(zip(parsed, cols)):
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


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.,+-]", "_", spec).replace("(", "_").strip("_")


def export_variants(images, masks, cells, specs: Sequence[str], out_dir, *, fill="black", seed=0,
                    classes: Sequence[str] | None = None):
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
        r = apply_variant(v, images, masks, bboxes=bboxes, labels=labels, fill=fill, seed=seed)
        imgs = r.images.cpu().numpy() if torch.is_tensor(r.images) else np.asarray(r.images)
        name = _safe_name(v.spec)
        rows = []
        with atomic_dir(out_dir / name) as tmp:
            for i, (cid, lab) in enumerate(zip(ids, cells["label"].astype(str))):  # one file per cell
                rel = Path(lab) / f"{cid}.tif"
                (tmp / lab).mkdir(exist_ok=True)
                tifffile.imwrite(tmp / rel, imgs[i].astype(np.float32), photometric="minisblack")
                rows.append({"path": rel.as_posix(), "label": lab, "cell_id": cid,
                             "partner_cell_id": ids[r.partner[i]] if r.partner[i] >= 0 else ""})
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
    from cellbg.crops import load_crops

    cfg = protocol.variants
    specs = list(dict.fromkeys(parse_variant(s).spec for s in [*cfg.train, *cfg.test]))
    images, masks, cells = load_crops(protocol.run_dir)
    bboxes = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(np.int64)
    labels = cells["label_index"].to_numpy(np.int64)
    summary = {"specs": specs, "cells": len(cells), "gallery": None, "export": None}
    if gallery is not None:
        rows = _gallery_rows(labels, n_rows)
        names = [f"{cells.cell_id.iloc[i]} ({cells.label.iloc[i]})" for i in rows]
        summary["gallery"] = make_gallery(images, masks, bboxes, labels, specs, gallery, fill=cfg.fill,
                                          seed=cfg.seed, cells=rows, row_names=names)
    if export is not None:
        export_variants(images, masks, cells, specs, export, fill=cfg.fill, seed=cfg.seed)
        summary["export"] = Path(export)
    return summary
