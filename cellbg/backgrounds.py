"""Background pools for the ``bg_image(source)`` variant.

A pool is a stack of crop-sized backgrounds, ``(k, C, S, S)`` float32 in [0, 1], drawn once
and reproducibly from a named source; :func:`cellbg.variants.apply_variant` then gives every
cell one of them (a seeded draw, recorded like the ``mixed_*`` partner). Sources:

* ``synthetic``: cell-free fields from :func:`cellbg.synth.synth_field` (``n_cells=0``), each
  with its own slide stain, illumination and noise: the dataset's kind of background without
  any cell, halo or co-occurring object in it.
* ``folder``: windows of images from a folder the user names (any images: another dataset,
  cell-free fields of view, an unrelated class as in Hashmi & Li's generic background). Each
  draw picks an image and a window position; images smaller than the crop are enlarged
  (bilinear) until the shorter side fits; values are divided by the dtype's maximum as the
  crops are; channels are matched to the crops (gray repeated, colour averaged to gray).
* ``constant``: one image of a single colour.

The module is torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellbg._checks import CellbgError, look_up_option

__all__ = ["BackgroundPool", "background_pool", "SOURCE_KINDS", "BUILTIN_SOURCES"]

#: The kinds of background source.
SOURCE_KINDS = ("synthetic", "folder", "constant")
#: Source names usable in ``bg_image(name)`` without declaring them in the protocol.
BUILTIN_SOURCES = {"synthetic": {"kind": "synthetic"}}
_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class BackgroundPool:
    """Crop-sized backgrounds of one source.

    Attributes
    ----------
    images : (k, C, S, S) ndarray of float32
        In [0, 1].
    ids : list of str
        What each background is (``synthetic:7``, ``<file>@<row>,<col>``, ``constant``);
        results record ``<source>/<id>`` for the one a cell was drawn.
    source : str
        The source's name.
    """

    images: np.ndarray = field(repr=False)
    ids: list[str] = field(repr=False)
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def _to_channels(image: np.ndarray, channels: int, where: str) -> np.ndarray:
    c = image.shape[0]
    if c == channels:
        return image
    if c == 1:
        return np.repeat(image, channels, axis=0)
    if channels == 1:
        return image.mean(axis=0, keepdims=True)
    if c == 4 and channels == 3:  # RGBA: drop alpha
        return image[:3]
    raise CellbgError(
        f"background {where} has {c} channels but the crops have {channels}; give images with 1 or {channels} channels"
    )


def _synthetic(size: int, channels: int, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    from cellbg.synth import synth_field

    if channels not in (1, 3):
        raise CellbgError(f"synthetic backgrounds are RGB or gray; the crops have {channels} channels")
    mode = "rgb" if channels == 3 else "gray"
    side = max(size, 64)
    seeds = np.random.SeedSequence([int(seed), 0x5EED]).spawn(count)
    out = np.empty((count, channels, size, size), np.float32)
    for i, ss in enumerate(seeds):
        f = synth_field("healthy", n_cells=0, size=side, mode=mode, seed=ss).image
        f = f[None] if f.ndim == 2 else np.moveaxis(f, -1, 0)
        r0 = (side - size) // 2
        out[i] = f[:, r0 : r0 + size, r0 : r0 + size].astype(np.float32) / np.float32(255.0)
    return out, [f"synthetic:{i}" for i in range(count)]


def _folder(path, size: int, channels: int, count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    from scipy.ndimage import zoom

    from cellbg.crops import _to_unit
    from cellbg.data import read_image

    folder = Path(path)
    if not folder.is_dir():
        raise CellbgError(f"background folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _EXTENSIONS)
    if not files:
        raise CellbgError(f"background folder {folder} holds no images ({', '.join(_EXTENSIONS)})")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xF01D]))
    cache: dict[int, np.ndarray] = {}
    out = np.empty((count, channels, size, size), np.float32)
    ids = []
    for i in range(count):
        j = int(rng.integers(len(files)))
        if j not in cache:
            raw, divisor = _to_unit(read_image(files[j]))
            img = _to_channels(raw.astype(np.float32) / np.float32(divisor), channels, str(files[j]))
            short = min(img.shape[1:])
            if short < size:  # enlarge (bilinear) until the shorter side holds the crop
                img = np.clip(zoom(img, (1, size / short, size / short), order=1, grid_mode=True, mode="nearest"), 0, 1)
            cache[j] = img.astype(np.float32)
        img = cache[j]
        r0 = int(rng.integers(img.shape[1] - size + 1))
        c0 = int(rng.integers(img.shape[2] - size + 1))
        out[i] = img[:, r0 : r0 + size, c0 : c0 + size]
        ids.append(f"{files[j].relative_to(folder).as_posix()}@{r0},{c0}")
    return out, ids


def background_pool(
    source: str,
    config: dict | None = None,
    *,
    size: int,
    channels: int,
    seed: int = 0,
) -> BackgroundPool:
    """Draw the background pool of one source, reproducibly.

    Parameters
    ----------
    source : str
        The source's name (``bg_image(name)``).
    config : dict, optional
        ``kind`` (``synthetic``, ``folder`` or ``constant``), ``path`` (folder), ``color``
        (constant: one value or one per channel, in [0, 1]) and ``count`` (backgrounds in the
        pool; default 64). None: a built-in source (``synthetic``).
    size : int
        Crop side S.
    channels : int
        Crop channels C.
    seed : int
        The same seed, source and settings give the same pool.

    Returns
    -------
    BackgroundPool

    Raises
    ------
    CellbgError
        An unknown source, a missing or empty folder, channels that cannot be matched.

    Examples
    --------
    >>> p = background_pool("grey", {"kind": "constant", "color": [0.5]}, size=4, channels=3)
    >>> p.images.shape, p.ids
    ((1, 3, 4, 4), ['constant'])
    """
    if config is None:
        if source not in BUILTIN_SOURCES:
            raise CellbgError(
                f"unknown background source '{source}'; declare it under variants.backgrounds (kind: folder, "
                f"synthetic or constant) or use one of {sorted(BUILTIN_SOURCES)}"
            )
        config = BUILTIN_SOURCES[source]
    config = {k: v for k, v in dict(config).items() if v is not None}
    kind = look_up_option(config.get("kind", ""), SOURCE_KINDS, what=f"background source kind (of '{source}')")
    count = int(config.get("count", 64))
    if count < 1:
        raise CellbgError(f"background source '{source}': count must be >= 1; got {count}")
    if kind == "synthetic":
        images, ids = _synthetic(size, channels, count, seed)
    elif kind == "folder":
        if "path" not in config:
            raise CellbgError(f"background source '{source}' is a folder but names no path")
        images, ids = _folder(config["path"], size, channels, count, seed)
    else:
        color = np.atleast_1d(np.asarray(config.get("color", [0.0]), np.float32))
        if color.ndim != 1 or len(color) not in (1, channels) or not ((color >= 0) & (color <= 1)).all():
            raise CellbgError(f"background source '{source}': color must be one value or {channels} values in [0, 1]")
        images = np.broadcast_to(color[:, None, None], (channels, size, size))[None].astype(np.float32)
        ids = ["constant"]
    return BackgroundPool(images=np.ascontiguousarray(images), ids=ids, source=source)


def pool_sources(specs: Sequence[str]) -> list[str]:
    """The background sources named by ``bg_image(...)`` in a list of variant specs."""
    from cellbg._variant_spec import parse_variant

    names = []
    for s in specs:
        v = parse_variant(s)
        if v.name == "bg_image" and v.args[0] not in names:
            names.append(str(v.args[0]))
    return names
