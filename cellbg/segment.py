"""Instance segmentation: one interface, three backends, and its evaluation.

Backends (``segmentation.method`` in the protocol):

* ``"threshold"`` -- a classical segmenter scaled by one number, the cell diameter (given or
  estimated): smoothing, background subtraction, an automatic or local threshold, a seeded
  watershed on the smoothed distance map that splits touching cells, and size filters; RGB
  brightfield images are segmented on a stain separated by colour deconvolution. It needs
  no weights and is the baseline.
* ``"cellpose"`` -- Cellpose 4 through its public API (``CellposeModel``). Weights are found
  by name in ``CELLPOSE_LOCAL_MODELS_PATH`` (else ``~/.cellpose/models``) or by path; a
  missing file is an error here, never a silent download.
* ``"masks"`` -- the user's own instance masks (manifest ``mask`` column or ``data.mask_dir``),
  checked against the images.

:func:`run_segmentation` writes ``<run>/segmentation/<image_id>.tif`` (int32 labels) and
:func:`evaluate` / :func:`evaluate_run` score label images against ground truth by
one-to-one IoU matching.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, check_nd, look_up_option

log = logging.getLogger("cellbg.segment")

__all__ = [
    "segment",
    "segment_threshold",
    "estimate_diameter",
    "segment_cellpose",
    "otsu_components",
    "SegmentationScore",
    "evaluate",
    "evaluate_run",
    "summarize_evaluation",
    "run_segmentation",
    "seg_path",
    "threshold_log",
    "list_models",
    "model_dir",
    "resolve_model",
    "STAGING_HELP",
    "MODELS_HELP",
    "check_weights",
]

_METHODS = ("threshold", "cellpose")
_IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 1.0, 0.05), 2))

#: Cellpose 4's own model names (files of the same name in the model folder).
CELLPOSE_MODEL_NAMES = ("cpsam", "cpsam_v2", "cpdino", "cpdino-vitb")
_CELLPOSE_URL = "https://huggingface.co/mouseland/cellpose-sam/resolve/main/"

STAGING_HELP = (
    "Compute nodes without internet: on a machine with internet run "
    "`python -c \"from cellpose import models; models.CellposeModel(pretrained_model='cpsam')\"` "
    f"(or download {_CELLPOSE_URL}cpsam), copy the file into a shared folder, and export "
    "CELLPOSE_LOCAL_MODELS_PATH=<that folder> in the job environment (or give "
    "segmentation.model as the file's path)."
)

#: `cellbg models`: staging Cellpose-SAM on a cluster, and using a fine-tuned model file.
MODELS_HELP = f"""\
Cellpose-SAM (cpsam) on a cluster whose compute nodes have no internet:
  1. on a login node or laptop with internet, let Cellpose fetch the weights once:
       python -c "from cellpose import models; models.CellposeModel(pretrained_model='cpsam')"
     (they land in ~/.cellpose/models/cpsam; or download {_CELLPOSE_URL}cpsam)
  2. copy them where every node can read them:  cp ~/.cellpose/models/cpsam /shared/models/
  3. point the jobs at that folder, e.g. in the protocol's executor section:
       executor:
         job_script_prologue: ["export CELLPOSE_LOCAL_MODELS_PATH=/shared/models"]
  4. check from a compute node: `cellbg models` lists cpsam as present, and
     `cellbg validate protocol.yaml` reports missing weights before any job starts.
A fine-tuned model (e.g. `python -m cellpose --train --dir train/ --pretrained_model cpsam`
writes train/models/<name>):
  - give its path:  segmentation.model: models/my_tcells   (relative to the protocol file), or
  - copy it into $CELLPOSE_LOCAL_MODELS_PATH and give its file name: segmentation.model: my_tcells.
  It must be a Cellpose 4 (Cellpose-SAM) model; Cellpose 3 models do not load in Cellpose 4.
  Set segmentation.diameter only if the model was trained at another cell size (null = none).
cellbg never downloads weights: a missing file is a one-line error naming where it looked."""


# =========================================================================== threshold
def segment_threshold(
    image: np.ndarray,
    *,
    diameter: float | None = None,
    threshold: str = "robust",
    n_sigmas: float = 8.0,
    seeds: str = "distance",
    sigma: float | None = None,
    background_radius: float | None = None,
    local_block_size: int | None = None,
    min_distance: int | None = None,
    h: float = 0.0,
    min_area: int | None = None,
    max_area: int | None = None,
    channel: int | None = None,
    stain: str = "auto",
    invert: str | bool = "auto",
    return_info: bool = False,
):
    """Segment cells with a threshold and a seeded watershed, scaled by the cell diameter.

    One number sets every scale: the typical cell (or nucleus) ``diameter`` d in pixels,
    estimated from the image when not given. From it follow the smoothing (sigma d/16), the
    background (lower quartile of 4 d blocks, subtracted), an opening (radius d/10), the
    watershed seeds (maxima of the distance map smoothed at d/8, at least 0.4 d apart),
    the local-threshold window (2 d + 1) and the smallest object (0.1 x the area of a disc of
    diameter d). Each object's outline is then set where its signal falls to 0.4 of its own
    height above the background (so dim cells keep their extent), and the refined outlines are
    split once more. Any scale can still be set by hand. Doubling the image size and
    ``diameter`` together gives the same objects at twice the size.

    Parameters
    ----------
    image : (M, N) or (C, M, N) ndarray
        Any numeric dtype.
    diameter : float, optional
        Typical cell diameter in pixels. None: estimated by
        :func:`estimate_diameter` (the median inscribed diameter of a first Otsu mask's
        components) and logged on the ``cellbg.segment`` logger.
    threshold : {'robust', 'otsu', 'li', 'local'}
        Foreground threshold rule. ``'robust'``: background median + ``n_sigmas`` robust SDs,
        capped at Otsu's (keeps dim cells whole); ``'local'``: a Gaussian-weighted local
        threshold over ``local_block_size`` pixels, above the robust background.
    n_sigmas : float
        Robust SDs above the background median for ``'robust'`` and ``'local'``.
    seeds : {'distance', 'log'}
        Watershed seeds: maxima of the smoothed distance map, or of the distance map plus
        the intensity's Laplacian of Gaussian at the cell scale (seeds at blob centres, for
        touching cells whose joint outline has little neck).
    sigma, background_radius, local_block_size, min_distance, min_area : optional
        Override the value that follows from ``diameter``. ``sigma=0`` disables smoothing,
        ``background_radius=0`` the background subtraction.
    h : float
        With ``h > 0``, seeds are the h-maxima of the distance map instead.
    max_area : int, optional
        Objects larger than this are dropped.
    channel : int, optional
        Channel to segment. By default: for a brightfield RGB image a stain density by
        colour deconvolution (see ``stain``), else the channel with the most contrast.
    stain : {'auto', 'hematoxylin', 'eosin', 'dab', 'giemsa', 'giemsa_eosin', 'none'}
        For RGB images: the stain to segment, separated by colour deconvolution
        (``skimage.color.separate_stains``; H&E-DAB vectors of Ruifrok & Johnston, Giemsa's
        methylene blue and eosin vectors of G. Landini). ``'auto'`` (brightfield RGB only)
        takes haematoxylin or Giemsa's methylene blue, whichever direction is closer to the
        most absorbing pixels; ``'none'`` uses a colour channel.
    invert : {'auto', True, False}
        For a plain channel: cells darker than the background need inverting; ``'auto'``
        inverts when most pixels lie above Otsu's threshold. A stain density is never
        inverted (the stain is dense in the cells).
    return_info : bool
        Also return a :class:`ThresholdInfo` (plane, diameter, threshold, object count).

    Returns
    -------
    labels : (M, N) ndarray of int32
        0 = background, 1..n = cells, numbered in raster order of their first pixel.
    info : ThresholdInfo
        Only with ``return_info=True``.

    Raises
    ------
    CellbgError
        A bad dimension, option or channel.

    Examples
    --------
    >>> yy, xx = np.mgrid[:64, :64]
    >>> img = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64) | ((yy - 44) ** 2 + (xx - 40) ** 2 < 81)
    >>> labels, info = segment_threshold(img.astype(float), return_info=True)
    >>> int(labels.max()), info.diameter, info.diameter_estimated
    (2, 18.0, True)
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_li, threshold_local, threshold_otsu
    from skimage.morphology import disk
    from skimage.segmentation import find_boundaries, relabel_sequential, watershed

    from cellbg import _threshold as T

    check_nd(image, (2, 3), arg_name="image")
    threshold = look_up_option(threshold, T.THRESHOLDS, what="threshold rule")
    seeds = look_up_option(seeds, T.SEEDS, what="seeds")
    stain = look_up_option(stain, T.STAINS, what="stain")
    if invert not in ("auto", True, False):
        raise CellbgError(f"invert must be 'auto', True or False; got {invert!r}")
    if diameter is not None and not diameter > 0:
        raise CellbgError(f"diameter must be > 0 pixels; got {diameter}")
    if local_block_size is not None and (local_block_size < 3 or local_block_size % 2 == 0):
        raise CellbgError(f"local_block_size must be an odd number >= 3; got {local_block_size}")
    x, plane, from_stain = T.intensity_plane(image, channel=channel, stain=stain)
    if not np.all(np.isfinite(x)):
        raise CellbgError("image holds NaN or infinite values")

    def empty(d=0.0, estimated=diameter is None, t=float("nan"), inverted=False):
        labels = np.zeros(x.shape, np.int32)
        info = T.ThresholdInfo(plane, inverted, float(d), estimated, t, 0)
        return (labels, info) if return_info else labels

    if x.max() == x.min():
        return empty()
    if from_stain:
        invert = False
    elif invert == "auto":
        x1 = ndi.gaussian_filter(x, 1.0)
        invert = bool((x1 > threshold_otsu(x1)).mean() > 0.5)
    if invert:
        x = x.max() - x
    estimated = diameter is None
    d = T.estimate_diameter(x) if diameter is None else float(diameter)
    if d <= 0:
        return empty(d, estimated, inverted=bool(invert))
    d = float(np.clip(d, 3.0, max(3.0, min(x.shape) / 2)))
    if estimated:
        log.info("threshold: diameter %.1f px estimated from the image; plane: %s", d, plane)
    else:
        log.info("threshold: diameter %.1f px (given); plane: %s", d, plane)
    s = T.scaled(d)
    sigma = s["sigma"] if sigma is None else sigma
    background_radius = s["background_radius"] if background_radius is None else background_radius
    local_block_size = s["local_block_size"] if local_block_size is None else local_block_size
    min_distance = s["min_distance"] if min_distance is None else min_distance
    min_area = s["min_area"] if min_area is None else min_area

    if sigma > 0:
        x = ndi.gaussian_filter(x, sigma)
    if background_radius > 0:
        x = x - T.background(x, background_radius)
    if x.max() == x.min():
        return empty(d, estimated, inverted=bool(invert))

    if threshold == "otsu":
        t = float(threshold_otsu(x))
        fg = x > t
    elif threshold == "li":
        t = float(threshold_li(x))
        fg = x > t
    elif threshold == "robust":
        t = T.robust_background_threshold(x, n_sigmas)
        fg = x > t
    else:
        t = T.robust_background_threshold(x, n_sigmas)
        fg = (x > threshold_local(x, local_block_size, method="gaussian")) & (x > t)
    fg = ndi.binary_fill_holes(ndi.binary_opening(fg, disk(s["opening_radius"])))

    labels = T.split_touching(
        fg,
        min_distance=min_distance,
        smooth=s["seed_smooth"],
        h=h,
        intensity=x if seeds == "log" else None,
        log_sigma=s["log_sigma"],
    )
    labels = T.refine_edges(labels, x, fg, fraction=T.EDGE_FRACTION)
    # Split again on the refined outlines: a clump joined low down now shows
    # the necks between its cells. Boundaries between objects are kept.
    apart = (labels > 0) & ~find_boundaries(labels, mode="inner")
    again = T.split_touching(
        apart,
        min_distance=min_distance,
        smooth=s["seed_smooth"],
        h=h,
        intensity=x if seeds == "log" else None,
        log_sigma=s["log_sigma"],
    )
    labels = watershed(-x, again, mask=labels > 0).astype(np.int32)
    area = np.bincount(labels.ravel())
    keep = area >= min_area
    if max_area is not None:
        keep &= area <= max_area
    keep[0] = False
    labels = np.where(keep[labels], labels, 0)
    labels = relabel_sequential(labels)[0].astype(np.int32)
    if not return_info:
        return labels
    return labels, T.ThresholdInfo(plane, bool(invert), d, estimated, float(t), int(labels.max()))


def estimate_diameter(image: np.ndarray, *, channel: int | None = None, stain: str = "auto") -> float:
    """Typical cell diameter (pixels) of an image, as :func:`segment_threshold` estimates it.

    The plane is chosen as in :func:`segment_threshold` (and inverted when its background is
    the brighter part); a first Otsu mask's connected components each give their inscribed
    diameter (twice the largest distance to the background, plus one), and the median is
    returned. Touching round cells share their members' inscribed diameter, so clumps do not
    inflate it. 0 when the image has no object.

    Examples
    --------
    >>> yy, xx = np.mgrid[:100, :100]
    >>> img = sum(np.hypot(yy - r, xx - c) <= 10 for r, c in [(20, 20), (20, 60), (70, 40)])
    >>> round(estimate_diameter(img.astype(float)))
    21
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from cellbg import _threshold as T

    check_nd(image, (2, 3), arg_name="image")
    stain = look_up_option(stain, T.STAINS, what="stain")
    x, _, from_stain = T.intensity_plane(image, channel=channel, stain=stain)
    if x.max() == x.min():
        return 0.0
    if not from_stain:
        x1 = ndi.gaussian_filter(x, 1.0)
        if (x1 > threshold_otsu(x1)).mean() > 0.5:
            x = x.max() - x
    return T.estimate_diameter(x)


def otsu_components(image: np.ndarray, *, min_area: int = 30, invert: str | bool = "auto") -> np.ndarray:
    """The naive baseline: global Otsu threshold and connected components.

    Parameters
    ----------
    image : (M, N) ndarray
    min_area : int
        Components smaller than this are dropped.
    invert : {'auto', True, False}
        As in :func:`segment_threshold`.

    Returns
    -------
    labels : (M, N) ndarray of int32

    Examples
    --------
    >>> img = np.zeros((20, 20)); img[2:8, 2:8] = 1; img[8:14, 4:10] = 1
    >>> int(otsu_components(img, min_area=1).max())  # two touching squares: one object
    1
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu
    from skimage.segmentation import relabel_sequential

    check_nd(image, 2, arg_name="image")
    x = np.asarray(image, np.float32)
    if x.max() == x.min():
        return np.zeros(x.shape, np.int32)
    t = threshold_otsu(x)
    fg = x > t
    if invert is True or (invert == "auto" and fg.mean() > 0.5):
        fg = ~fg
    labels, _ = ndi.label(fg)
    area = np.bincount(labels.ravel())
    keep = area >= min_area
    keep[0] = False
    return relabel_sequential(np.where(keep[labels], labels, 0))[0].astype(np.int32)


# =========================================================================== cellpose
def model_dir() -> Path:
    """The folder Cellpose looks in for models by name.

    ``CELLPOSE_LOCAL_MODELS_PATH`` when set, else ``~/.cellpose/models`` (Cellpose's cache).
    Read at call time, so a value exported after import is honoured.
    """
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env).expanduser() if env else Path.home() / ".cellpose" / "models"


def _looks_like_path(model: str) -> bool:
    return os.sep in model or "/" in model or model.endswith((".pth", ".pt")) or model.startswith("~")


def resolve_model(model: str | os.PathLike) -> Path:
    """The weights file for a Cellpose model name or path; raise if it is not there.

    Cellpose starts a download when a model is missing; compute nodes usually have no
    internet, so a missing file is a one-line error that says where it was looked for.

    Parameters
    ----------
    model : str or PathLike
        A model name (``cpsam``, or a file name in :func:`model_dir`) or a path.

    Returns
    -------
    Path
        An existing file.

    Raises
    ------
    CellbgError
        No such file.

    Examples
    --------
    >>> resolve_model("/nonexistent/weights.pth")
    Traceback (most recent call last):
    ...
    cellbg._checks.CellbgError: Cellpose weights file not found: /nonexistent/weights.pth; ...
    """
    text = os.fspath(model)
    if not text:
        raise CellbgError("segmentation.model is empty; give a Cellpose model name or weights path")
    if _looks_like_path(text) or Path(text).is_absolute():
        path = Path(text).expanduser()
        if not path.is_file():
            raise CellbgError(
                f"Cellpose weights file not found: {path}; copy the weights there or set "
                "segmentation.model to a model name (`cellbg models` lists them)"
            )
        return path
    path = model_dir() / text
    if not path.is_file():
        where = "CELLPOSE_LOCAL_MODELS_PATH" if os.environ.get("CELLPOSE_LOCAL_MODELS_PATH") else "Cellpose's cache"
        raise CellbgError(
            f"Cellpose model '{text}' not found: no file {path} ({where}); pre-stage it there "
            "(see `cellbg models`) or give segmentation.model as a weights path"
        )
    return path


def check_weights(protocol) -> list[str]:
    """Problems with the weights a protocol needs (one line each; empty when all are there).

    For ``segmentation.method: cellpose`` the model must resolve to a local file (see
    :func:`resolve_model`) holding a Cellpose 4 state dict. Nothing is downloaded.
    """
    cfg = protocol.segmentation
    if cfg.method != "cellpose":
        return []
    try:
        path = resolve_model(cfg.model)
        _check_cp4_weights(str(path))
    except CellbgError as exc:
        return [f"segmentation.model: {exc}"]
    return []


def list_models() -> pd.DataFrame:
    """The Cellpose models present locally and where they are looked for.

    Returns
    -------
    DataFrame
        One row per Cellpose 4 built-in name and per other file in :func:`model_dir`:
        ``name``, ``present`` (bool), ``size_mb``, ``path``, ``kind`` (``builtin``/``user``).

    Examples
    --------
    >>> list(list_models().columns)
    ['name', 'present', 'size_mb', 'path', 'kind']
    """
    folder = model_dir()
    names = list(CELLPOSE_MODEL_NAMES)
    if folder.is_dir():
        names += sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file()
            and p.name not in CELLPOSE_MODEL_NAMES
            and not p.name.startswith(".")
            and p.suffix not in (".txt", ".json", ".npy")
        )
    rows = []
    for name in names:
        path = folder / name
        present = path.is_file()
        rows.append(
            {
                "name": name,
                "present": present,
                "size_mb": round(path.stat().st_size / 2**20, 1) if present else float("nan"),
                "path": str(path),
                "kind": "builtin" if name in CELLPOSE_MODEL_NAMES else "user",
            }
        )
    return pd.DataFrame(rows, columns=["name", "present", "size_mb", "path", "kind"])


def _want_gpu(gpu: str | bool) -> bool:
    import torch

    if gpu == "auto":
        return bool(torch.cuda.is_available())
    return bool(gpu)


@functools.lru_cache(maxsize=2)
def _cellpose_model(path: str, use_gpu: bool):
    # Cached: constructing builds a ViT-L (seconds, ~2 GB), so repeated calls reuse it.
    _check_cp4_weights(path)  # before importing Cellpose and building its ViT
    import torch
    from cellpose import models

    device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
    try:
        return models.CellposeModel(gpu=device.type == "cuda", device=device, pretrained_model=path)
    except ValueError as exc:  # Cellpose's "not a CP4 model" and size mismatches
        raise CellbgError(f"cannot load Cellpose weights {path}: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, OSError, EOFError) as exc:
        if _is_oom(exc):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CellbgError(f"cannot load Cellpose weights {path}: {msg}") from None


def _check_cp4_weights(path: str) -> None:
    """Fail fast on a file that is not a Cellpose 4 state dict (before a ViT is built)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CellbgError(f"cannot load Cellpose weights {path}: not a PyTorch state dict ({msg[:120]})") from None
    if not isinstance(state, dict) or "W2" not in state:
        raise CellbgError(
            f"cannot load Cellpose weights {path}: not a Cellpose 4 (CP4) model; "
            "Cellpose 3 models do not load in Cellpose 4"
        )


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def segment_cellpose(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    model: str = "cpsam",
    diameter: float | None = None,
    channels: list[int] | None = None,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    batch_size: int = 8,
    gpu: str | bool = "auto",
    min_size: int = 15,
) -> list[np.ndarray]:
    """Segment images with Cellpose 4; same-size images run as one batched array.

    Parameters
    ----------
    images : (C, M, N) ndarray or sequence of (C, M, N) / (M, N) ndarrays
        One image or several. Cellpose batches only an array, not a list, so images are
        grouped by shape and each group is stacked into one ``(n, C, M, N)`` array.
    model : str
        A model name or a weights path (see :func:`resolve_model`).
    diameter : float, optional
        Typical cell diameter in pixels; images are rescaled so cells are 30 pixels.
        None = no rescaling.
    channels : list of int, optional
        Channels handed to Cellpose (at most three; 0-based). All (first three) when None.
    flow_threshold, cellprob_threshold : float
        Cellpose's mask quality and cell-probability thresholds.
    batch_size : int
        256 x 256 tiles per network pass.
    gpu : {'auto', True, False}
        Use CUDA when available. A GPU out of memory falls back to the CPU with a warning.
    min_size : int
        Masks smaller than this are dropped by Cellpose.

    Returns
    -------
    list of (M, N) ndarray of int32
        One label image per input image, in input order.

    Raises
    ------
    CellbgError
        Missing weights (no download is attempted), weights that are not a Cellpose 4
        model, a channel out of range.

    Examples
    --------
    >>> segment_cellpose(np.zeros((1, 8, 8)), model="/nonexistent.pth")
    Traceback (most recent call last):
    ...
    cellbg._checks.CellbgError: Cellpose weights file not found: /nonexistent.pth; ...
    """
    path = resolve_model(model)
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        images = [images]
    planes = []
    for i, im in enumerate(images):
        im = np.asarray(im)
        check_nd(im, (2, 3), arg_name=f"images[{i}]")
        im = im[None] if im.ndim == 2 else im
        if channels:
            bad = [c for c in channels if not 0 <= c < im.shape[0]]
            if bad:
                raise CellbgError(
                    f"Cellpose channel(s) {bad} out of range for images[{i}] with {im.shape[0]} channel(s)"
                )
            im = im[list(channels)]
        planes.append(im[:3].astype(np.float32))
    if batch_size < 1:
        raise CellbgError(f"batch_size must be >= 1; got {batch_size}")

    use_gpu = _want_gpu(gpu)
    out: list[np.ndarray | None] = [None] * len(planes)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(planes):
        groups.setdefault(p.shape, []).append(i)
    kwargs = dict(
        diameter=diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        batch_size=batch_size,
        min_size=min_size,
    )
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            stack = np.stack([planes[i] for i in chunk])  # (n, C, M, N): one batched call
            masks, use_gpu = _eval_with_fallback(str(path), use_gpu, stack, kwargs)
            masks = np.asarray(masks).reshape(len(chunk), *stack.shape[2:])
            for j, i in enumerate(chunk):
                out[i] = masks[j].astype(np.int32)
    return out  # type: ignore[return-value]


def _eval_with_fallback(path: str, use_gpu: bool, stack: np.ndarray, kwargs: dict):
    """Run ``model.eval``; on a CUDA out-of-memory error warn and redo it on the CPU."""
    try:
        model = _cellpose_model(path, use_gpu)  # moving the weights to the GPU may run out too
        masks, _, _ = model.eval(stack, channel_axis=1, **kwargs)
        return masks, use_gpu
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not (use_gpu and _is_oom(exc)):
            raise
        import torch

        torch.cuda.empty_cache()
        warnings.warn(
            "Cellpose ran out of GPU memory; continuing on the CPU (lower segmentation.batch_size to stay on the GPU)",
            RuntimeWarning,
            stacklevel=3,
        )
        model = _cellpose_model(path, False)
        masks, _, _ = model.eval(stack, channel_axis=1, **kwargs)
        return masks, False


# =========================================================================== one interface
def segment(image: np.ndarray, *, method: str = "threshold", **options) -> np.ndarray:
    """Segment one image into instance labels.

    Parameters
    ----------
    image : (M, N) or (C, M, N) ndarray
    method : {'threshold', 'cellpose'}
        The backend (user masks are read from files by :func:`run_segmentation`).
    **options
        The backend's keyword options: see :func:`segment_threshold` and
        :func:`segment_cellpose`.

    Returns
    -------
    labels : (M, N) ndarray of int32

    Examples
    --------
    >>> img = np.zeros((40, 40)); img[5:15, 5:15] = 1; img[25:35, 20:30] = 1
    >>> int(segment(img, method="threshold", min_area=10).max())
    2
    """
    method = look_up_option(method, _METHODS, what="segmentation method")
    check_nd(image, (2, 3), arg_name="image")
    if method == "threshold":
        return segment_threshold(image, **options)
    return segment_cellpose(np.asarray(image), **options)[0]


# =========================================================================== evaluation
@dataclass(frozen=True)
class SegmentationScore:
    """Instance-matching scores of one predicted label image against the truth.

    ``tp``, ``fp``, ``fn``, ``precision``, ``recall`` and ``f1`` are at IoU 0.5;
    ``ap`` is the mean over ``thresholds`` of TP / (TP + FP + FN) (the "average precision"
    of the cell-segmentation literature: Caicedo et al. 2019, Stringer et al. 2021).
    """

    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap: float
    mean_matched_iou: float
    thresholds: tuple[float, ...]
    ap_at: tuple[float, ...]

    def as_row(self) -> dict:
        """The scalar fields, for a table row."""
        keys = ("n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1", "ap", "mean_matched_iou")
        return {k: getattr(self, k) for k in keys}


def _iou_matrix(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every (truth, pred) instance pair, from one joint histogram."""
    from skimage.segmentation import relabel_sequential

    p, _, _ = relabel_sequential(pred)
    t, _, _ = relabel_sequential(truth)
    n_p, n_t = int(p.max()), int(t.max())
    joint = np.bincount(t.ravel().astype(np.int64) * (n_p + 1) + p.ravel(), minlength=(n_t + 1) * (n_p + 1))
    joint = joint.reshape(n_t + 1, n_p + 1)
    area_t = joint.sum(axis=1)[1:]
    area_p = joint.sum(axis=0)[1:]
    inter = joint[1:, 1:].astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def evaluate(
    pred: np.ndarray, truth: np.ndarray, *, thresholds: Iterable[float] = _IOU_THRESHOLDS
) -> SegmentationScore:
    """Score predicted instances against true instances by one-to-one IoU matching.

    Instances are paired by the assignment that maximises total IoU
    (``scipy.optimize.linear_sum_assignment``); a pair counts as a match at threshold t
    when its IoU >= t. For t >= 0.5 this equals every other one-to-one rule, because an
    instance can overlap at most one other by more than half.

    Parameters
    ----------
    pred, truth : (M, N) ndarray of int
        Instance labels, 0 = background.
    thresholds : iterable of float
        IoU thresholds averaged in ``ap`` (default 0.5, 0.55, ..., 0.95).

    Returns
    -------
    SegmentationScore
        With no true and no predicted instances every score is 1.

    Raises
    ------
    CellbgError
        The arrays differ in shape, are not 2-D, or are not integer labels.

    Examples
    --------
    >>> truth = np.zeros((10, 10), int); truth[1:5, 1:5] = 1; truth[6:9, 6:9] = 2
    >>> pred = np.zeros((10, 10), int); pred[1:5, 1:4] = 7
    >>> s = evaluate(pred, truth)
    >>> s.tp, s.fp, s.fn, round(s.f1, 3)
    (1, 0, 1, 0.667)
    """
    from scipy.optimize import linear_sum_assignment

    for name, arr in (("pred", pred), ("truth", truth)):
        check_nd(arr, 2, arg_name=name)
        if not (np.issubdtype(np.asarray(arr).dtype, np.integer)):
            raise CellbgError(f"{name} must be an integer label image; got dtype {np.asarray(arr).dtype}")
        if np.asarray(arr).min(initial=0) < 0:
            raise CellbgError(f"{name} holds negative labels")
    if np.shape(pred) != np.shape(truth):
        raise CellbgError(f"pred shape {np.shape(pred)} does not match truth shape {np.shape(truth)}")
    thresholds = tuple(float(t) for t in thresholds)
    iou = _iou_matrix(np.asarray(pred), np.asarray(truth))
    n_t, n_p = iou.shape
    if n_t and n_p:
        rows, cols = linear_sum_assignment(iou, maximize=True)
        matched = iou[rows, cols]
    else:
        matched = np.zeros(0)

    def counts(t: float) -> tuple[int, int, int]:
        tp = int((matched >= t).sum())
        return tp, n_p - tp, n_t - tp

    ap_at = []
    for t in thresholds:
        tp, fp, fn = counts(t)
        ap_at.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    tp, fp, fn = counts(0.5)
    precision = tp / n_p if n_p else float(n_t == 0)
    recall = tp / n_t if n_t else float(n_p == 0)
    f1 = 2 * tp / (n_p + n_t) if n_p + n_t else 1.0
    good = matched[matched >= 0.5]
    return SegmentationScore(
        n_true=n_t,
        n_pred=n_p,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=precision,
        recall=recall,
        f1=f1,
        ap=float(np.mean(ap_at)) if ap_at else float("nan"),
        mean_matched_iou=float(good.mean()) if good.size else float("nan"),
        thresholds=thresholds,
        ap_at=tuple(ap_at),
    )


def summarize_evaluation(scores: pd.DataFrame) -> dict:
    """Mean precision, recall, F1 and AP over images, plus pooled counts."""
    out = {k: float(scores[k].mean()) for k in ("precision", "recall", "f1", "ap")}
    out.update({k: int(scores[k].sum()) for k in ("n_true", "n_pred", "tp", "fp", "fn")})
    out["images"] = len(scores)
    return out


# =========================================================================== files
def seg_path(run_dir: str | Path, image_id: str) -> Path:
    """``<run>/segmentation/<image_id>.tif``."""
    return Path(run_dir) / "segmentation" / f"{image_id}.tif"


def _progress(iterable: Iterable, *, total: int, description: str) -> Iterator:
    """A rich progress bar on stderr when it is a terminal; plain iteration otherwise."""
    from rich.console import Console
    from rich.progress import Progress

    from cellbg import _progress

    console = Console(stderr=True)
    if not console.is_terminal:  # under the runner: the job's progress file
        _progress.report(done=0, total=total, unit=description)
        for i, item in enumerate(iterable, 1):
            yield item
            _progress.report(done=i, total=total, unit=description)
        return
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


def _workers(requested: int | None, n_items: int) -> int:
    n = requested if requested is not None else (os.cpu_count() or 1)
    return max(1, min(int(n), n_items))


def parallel_map(func: Callable, items: Sequence, *, workers: int | None, description: str) -> Iterator:
    """``map(func, items)`` in input order over worker processes, with a progress bar.

    One worker (or one item) runs in this process. Workers are spawned, not forked: the
    parent may hold threads (torch) that a fork would copy in a locked state.
    """
    n = _workers(workers, len(items))
    if n == 1:
        yield from _progress(map(func, items), total=len(items), description=description)
        return
    ctx = multiprocessing.get_context("spawn")
    chunksize = max(1, len(items) // (n * 8))
    with concurrent.futures.ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
        try:
            yield from _progress(pool.map(func, items, chunksize=chunksize), total=len(items), description=description)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _write_labels(path: Path, labels: np.ndarray) -> None:
    import tifffile

    from cellbg._io import atomic_path

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels.astype(np.int32), compression="zlib")


def _image_hw(path: str) -> tuple[int, int]:
    """(rows, columns) of an image, from the header where possible."""
    import tifffile

    from cellbg.data import _image_shape, read_image

    shape = _image_shape(Path(path), tifffile)
    if shape is not None:
        return shape
    _, rows, columns = read_image(path).shape  # (C, M, N)
    return rows, columns


def _masks_job(args: tuple) -> str:
    """Copy one user mask into the run after checking it against its image."""
    from cellbg.data import read_mask

    image_path, mask_path, out = args
    if not mask_path:
        raise CellbgError(f"segmentation.method is 'masks' but image {image_path} has no mask")
    mask = read_mask(mask_path)
    hw = _image_hw(image_path)
    if tuple(mask.shape) != tuple(hw):
        raise CellbgError(f"mask {mask_path} has shape {tuple(mask.shape)} but image {image_path} is {tuple(hw)}")
    _write_labels(Path(out), mask)
    return out


def _threshold_job(args: tuple) -> dict:
    from cellbg.data import read_image

    image_path, channels, options, out = args
    image = read_image(image_path, channels=channels)
    labels, info = segment_threshold(image, return_info=True, **options)
    _write_labels(Path(out), labels)
    return info.as_dict()


def _write_threshold_log(folder: Path, image_ids: list[str], infos: list[dict], keep_old: bool) -> None:
    """``segmentation/threshold.csv``: per image the plane (channel or stain), the diameter
    (and whether it was estimated), the threshold and the object count."""
    from cellbg._io import atomic_path

    path = folder / "threshold.csv"
    new = pd.DataFrame([{"image_id": i, **info} for i, info in zip(image_ids, infos, strict=True)])
    if keep_old and path.exists() and not new.empty:
        old = pd.read_csv(path, dtype={"image_id": str})
        new = pd.concat([old[~old["image_id"].isin(new["image_id"])], new], ignore_index=True)
    elif keep_old and path.exists():
        return
    with atomic_path(path) as tmp:
        new.to_csv(tmp, index=False)
    if len(infos):
        d = new["diameter"]
        log.info(
            "threshold: diameter median %.1f px (%d of %d estimated); planes: %s",
            d.median(),
            int(new["diameter_estimated"].sum()),
            len(new),
            ", ".join(sorted({str(v).split(" (")[0] for v in new["plane"]})),
        )


def threshold_log(run_dir: str | Path) -> pd.DataFrame | None:
    """The threshold backend's per-image choices of a run (``segmentation/threshold.csv``), or None."""
    path = Path(run_dir) / "segmentation" / "threshold.csv"
    return pd.read_csv(path, dtype={"image_id": str}) if path.exists() else None


def _seg_hash(protocol) -> str:
    from cellbg.protocol import protocol_hash

    d = json.loads(protocol.model_dump_json())
    d["segmentation"].pop("workers", None)  # how many processes never changes the labels
    return protocol_hash({"segmentation": d["segmentation"], "data": d["data"]})


def run_segmentation(protocol, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Segment every image of a protocol's dataset into ``<run>/segmentation/``.

    Label images already written under the same segmentation and data settings are kept
    (``segmentation/params.json`` records the settings' hash, written last); every file is
    written atomically, so an interrupted run resumes.

    Parameters
    ----------
    protocol : Protocol
    table : DataFrame, optional
        The image table (:func:`cellbg.data.discover`); discovered when None.

    Returns
    -------
    DataFrame
        The image table with a ``seg_path`` column.

    Raises
    ------
    CellbgError
        A missing model, an unreadable image, a mask whose shape differs from its image.
    """
    from cellbg._io import write_json_atomic
    from cellbg.data import discover, read_image

    if table is None:
        table = discover(protocol, need_classes=False)  # segmenting needs no classes
    cfg = protocol.segmentation
    if cfg.method == "cellpose":
        resolve_model(cfg.model)  # a missing model fails before anything is written
    run_dir = Path(protocol.run_dir)
    folder = run_dir / "segmentation"
    params = folder / "params.json"
    key = _seg_hash(protocol)
    outs = [str(seg_path(run_dir, i)) for i in table["image_id"]]
    fresh = params.exists() and json.loads(params.read_text()).get("hash") == key
    if not fresh and params.exists():
        params.unlink()  # settings changed: outputs here are stale until all are rewritten
    todo = [i for i, o in enumerate(outs) if not (fresh and Path(o).exists())]
    folder.mkdir(parents=True, exist_ok=True)
    channels = protocol.data.channels

    if cfg.method == "masks":
        mask_jobs = [(table["path"].iat[i], table["mask_path"].iat[i], outs[i]) for i in todo]
        for _ in parallel_map(_masks_job, mask_jobs, workers=cfg.workers, description="masks"):
            pass
    elif cfg.method == "threshold":
        options = {**cfg.threshold.model_dump(), "diameter": cfg.diameter}
        threshold_jobs = [(table["path"].iat[i], channels, options, outs[i]) for i in todo]
        infos = list(parallel_map(_threshold_job, threshold_jobs, workers=cfg.workers, description="segmenting"))
        _write_threshold_log(folder, [table["image_id"].iat[i] for i in todo], infos, fresh)
    else:
        n_batches = -(-len(todo) // cfg.batch_size)
        for start in _progress(range(0, len(todo), cfg.batch_size), total=n_batches, description="cellpose"):
            idx = todo[start : start + cfg.batch_size]
            images = [read_image(table["path"].iat[i], channels=channels) for i in idx]
            labels = segment_cellpose(
                images,
                model=cfg.model,
                diameter=cfg.diameter,
                channels=cfg.channels,
                flow_threshold=cfg.flow_threshold,
                cellprob_threshold=cfg.cellprob_threshold,
                batch_size=cfg.batch_size,
                gpu=cfg.gpu,
            )
            for i, lab in zip(idx, labels, strict=True):
                _write_labels(Path(outs[i]), lab)
    write_json_atomic(params, {"hash": key, "method": cfg.method, "images": len(outs)})
    return table.assign(seg_path=outs)


def evaluate_run(protocol, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Score the run's segmentation against the ground-truth masks of the dataset.

    Writes ``<run>/segmentation/evaluation.csv``.

    Returns
    -------
    DataFrame
        One row per image with ground truth: ``image_id``, ``n_true``, ``n_pred``, ``tp``,
        ``fp``, ``fn``, ``precision``, ``recall``, ``f1`` (IoU 0.5), ``ap`` (IoU 0.5:0.95),
        ``mean_matched_iou``.

    Raises
    ------
    CellbgError
        No image has a ground-truth mask, or the segmentation has not been run.
    """
    from cellbg._io import atomic_path
    from cellbg.data import discover, read_mask

    if table is None:
        table = discover(protocol, need_classes=False)  # segmenting needs no classes
    truth = table[table["mask_path"] != ""]
    if truth.empty:
        raise CellbgError(
            "no ground-truth masks to evaluate against: save them beside the images as <name>_masks.tif "
            "(data.mask_suffixes), add a mask column to the manifest, or set data.mask_dir"
        )
    rows = []
    for r in truth.itertuples():
        p = seg_path(protocol.run_dir, r.image_id)
        if not p.exists():
            raise CellbgError(f"no segmentation for image {r.image_id} ({p}); run `cellbg segment` first")
        pred, true = read_mask(p), read_mask(r.mask_path)
        if pred.shape != true.shape:
            raise CellbgError(f"segmentation {p} has shape {pred.shape} but mask {r.mask_path} is {true.shape}")
        rows.append({"image_id": r.image_id, **evaluate(pred, true).as_row()})
    scores = pd.DataFrame(rows)
    out = Path(protocol.run_dir) / "segmentation" / "evaluation.csv"
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, index=False)
    return scores
