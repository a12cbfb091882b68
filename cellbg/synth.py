"""Synthetic Sezary-like datasets with known answers.

Real Sezary-syndrome images are not public, so cellbg is validated on blood-smear-like
fields of view whose truth is known:

* **foreground**: two classes by morphology. ``healthy`` small lymphocytes have a round,
  smooth, dense nucleus and a thin rim of sky-blue cytoplasm; ``sezary`` cells are larger,
  with a cerebriform nucleus (a lobulated outline from several random harmonics plus pale
  folded grooves) and an even higher nucleus-to-cytoplasm ratio. The size and outline
  distributions overlap a little, so a foreground-only classifier is good but not perfect.
* **background**: red cells (pale discs with central pallor), platelets, debris, plasma
  tone, uneven illumination and noise. Every patient is one slide with its own stain,
  illumination, smear thickness and noise, drawn **independently of the class**.
* **planted background cue**: with probability ``signal`` (per patient, optionally varied
  by ``signal_sd_between_patients``) a cell's surroundings, within about 20 pixels of its
  outline, carry a class-specific cue: a warm (pink) halo around a healthy cell; a cool
  (lilac) halo plus a few platelets around a Sezary cell. Otherwise the background is drawn
  from the shared distribution; cell positions never depend on the class, so with
  ``signal=0`` the background says nothing about the class.
* **planted co-occurrence cue** (independent of the halo): with probability
  ``cooccurrence`` a cell of class ``cooccurrence_class`` has three non-target objects
  (platelet clumps, larger than single platelets) placed just outside its outline. The
  objects have their own label image (``objects/``) and table (``objects_truth.csv``), so a
  detector can learn them and ``no_others`` can remove them; their randomness has its own
  stream, so planting them changes nothing but their pixels.

Rendering is vectorised: every object (cell, red cell, platelet, debris) is drawn on a small
local grid in one broadcast per object kind, and the patches are summed into the field with
``np.bincount``. Brightfield colour follows Beer-Lambert (optical densities add, the image is
``light * exp(-OD)``); the gray mode is fluorescence-like (emissions add on a dark field).

The dataset layout (:func:`make_dataset`) is read directly by
:func:`cellbg.data.discover_manifest`::

    out_dir/images/P01_000.tif    uint8, (H, W, 3) RGB or (H, W) gray
    out_dir/masks/P01_000.tif     uint16 instance labels, 0 = background
    out_dir/objects/P01_000.tif   uint16 labels of the co-occurring objects (cooccurrence > 0)
    out_dir/cells_truth.csv       one row per cell, with the planted cues
    out_dir/objects_truth.csv     one row per co-occurring object (cooccurrence > 0)
    out_dir/synth.json            the parameters
    out_dir/manifest.csv          path,label,patient,mask (written last)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, look_up_option
from cellbg._io import atomic_path, write_text_atomic
from cellbg.ids import image_id

__all__ = [
    "CLASSES",
    "Stain",
    "SynthField",
    "random_stain",
    "synth_field",
    "make_dataset",
    "TRUTH_COLUMNS",
    "OBJECT_COLUMNS",
]

#: The two classes, in sorted order (their index is the label index downstream).
CLASSES = ("healthy", "sezary")

#: Columns of ``cells_truth.csv`` (and of :attr:`SynthField.cells`, less ``path``/``mask``/
#: ``patient``/``image_id``).
TRUTH_COLUMNS = [
    "path",
    "mask",
    "image_id",
    "patient",
    "label",
    "instance",
    "cue",
    "centre_r",
    "centre_c",
    "area",
    "cell_radius",
    "nucleus_radius",
    "nc_ratio",
    "folding",
    "grooves",
    "atypical",
    "cooccurrence",
    "objects",
]

#: Columns of ``objects_truth.csv`` (and of :attr:`SynthField.object_table`, less
#: ``path``/``objects_path``/``patient``/``image_id``).
OBJECT_COLUMNS = [
    "path",
    "objects_path",
    "image_id",
    "patient",
    "label",
    "object",
    "kind",
    "cell_instance",
    "centre_r",
    "centre_c",
    "radius",
    "area",
]

_MODES = ("rgb", "gray")
_LABEL_BY = ("cell", "patient")

# Geometry (pixels at the default 256 x 256 field; cells stay this size at other fields).
_SLOT = 64  # one cell per slot of a coarse grid: positions never depend on the class
_CELL_MAX = 21.0  # no cell outline reaches further from its centre (no overlaps by design)
_CUE_REACH = 20.0  # the cue fades out within this distance of the cell outline
_CUE_DECAY = 9.0  # e-folding distance of the cue halo
_CELL_PATCH = int(_CELL_MAX) + 3  # half-size of a cell's local grid
_CUE_PATCH = int(_CELL_MAX + _CUE_REACH) + 2  # half-size of the local grid of its cue halo
_MAX_GROOVES = 5

# Class-specific cue tints (optical density added to the plasma, R, G, B): a healthy cell's
# halo turns pinker (more eosin: green and blue absorbed), a Sezary cell's lilac-blue.
_CUE_OD = {"healthy": np.array([0.0, 0.11, 0.08]), "sezary": np.array([0.09, 0.05, 0.0])}
# Fluorescence mode: a brighter halo for healthy, a dimmer one for Sezary.
_CUE_GRAY = {"healthy": 0.05, "sezary": -0.03}
_CUE_PLATELETS = 3  # extra platelets in the ring of a Sezary cell carrying the cue
# The co-occurrence cue: platelet clumps (radius 2.8-4 px against 1.4-2.4 for single
# platelets) just outside the outline of a cell of the chosen class.
_COOC_OBJECTS = 3  # objects per cell carrying the co-occurrence cue
_COOC_RADIUS = (2.8, 4.0)
_COOC_GAP = (1.5, 5.0)  # gap between the cell's largest outline radius and the object's edge


@dataclass(frozen=True)
class Stain:
    """One slide's appearance: stain optical densities, illumination, smear and noise.

    Every patient is one slide. Its stain is drawn by :func:`random_stain` independently of
    the class, so a slide-level difference between classes can only arise by chance.

    Attributes
    ----------
    plasma, nucleus, cytoplasm, red_cell, platelet, debris : (3,) ndarray
        Optical density (R, G, B) of each component at unit thickness.
    light : (3,) ndarray
        Illumination colour and brightness (fraction of full scale).
    gradient, gradient_angle, vignette : float
        Linear illumination fall-off across the field, its direction (radians) and the
        radial fall-off towards the corners.
    noise : float
        Noise standard deviation (fraction of full scale).
    red_cell_density : float
        Fraction of the red-cell lattice that is occupied (smear thickness).
    red_cell_radius : float
        Mean red-cell radius in pixels.
    platelets, debris_count : float
        Mean number of platelets / debris particles per 256 x 256 field.
    gain, offset : float
        Fluorescence-mode gain and dark level.
    """

    plasma: np.ndarray
    nucleus: np.ndarray
    cytoplasm: np.ndarray
    red_cell: np.ndarray
    platelet: np.ndarray
    debris: np.ndarray
    light: np.ndarray
    gradient: float
    gradient_angle: float
    vignette: float
    noise: float
    red_cell_density: float
    red_cell_radius: float
    platelets: float
    debris_count: float
    gain: float
    offset: float


@dataclass(frozen=True)
class SynthField:
    """One synthetic field of view.

    Attributes
    ----------
    image : (M, N, 3) or (M, N) ndarray of uint8
        RGB brightfield or gray fluorescence-like image.
    mask : (M, N) ndarray of uint16
        Instance labels 1..n (0 = background); every cell pixel is labelled exactly once.
    cells : DataFrame
        One row per cell: ``instance, label, cue, centre_r, centre_c, area, cell_radius,
        nucleus_radius, nc_ratio, folding, grooves, atypical, cooccurrence, objects``.
    objects : (M, N) ndarray of uint16
        Labels 1..m of the co-occurring non-target objects (0 elsewhere; never on a cell).
    object_table : DataFrame
        One row per object: ``object, label, kind, cell_instance, centre_r, centre_c, radius,
        area``.
    """

    image: np.ndarray
    mask: np.ndarray
    cells: pd.DataFrame = field(repr=False)
    objects: np.ndarray | None = field(default=None, repr=False)
    object_table: pd.DataFrame | None = field(default=None, repr=False)


# ----------------------------------------------------------------------------- stains
def random_stain(rng: np.random.Generator | int = 0) -> Stain:
    """Draw one slide's stain, illumination, smear and noise.

    Parameters
    ----------
    rng : Generator or int
        Source of randomness (a seed is turned into ``numpy.random.default_rng(seed)``).

    Returns
    -------
    Stain

    Examples
    --------
    >>> s = random_stain(1)
    >>> s.nucleus.shape, bool(s.nucleus[1] > s.nucleus[2])
    ((3,), True)
    """
    rng = np.random.default_rng(rng)

    def jitter(od, sd=0.12):
        # stain strength varies per slide, and so does its hue a little (per channel)
        return np.asarray(od) * rng.lognormal(0.0, sd) * rng.lognormal(0.0, 0.06, size=3)

    return Stain(
        plasma=jitter([0.035, 0.085, 0.04], 0.25),
        nucleus=jitter([1.05, 1.45, 0.5]),
        cytoplasm=jitter([0.34, 0.16, 0.05]),
        red_cell=jitter([0.05, 0.36, 0.22]),
        platelet=jitter([0.55, 0.8, 0.3]),
        debris=jitter([0.25, 0.3, 0.22]),
        light=np.clip(0.97 * rng.lognormal(0.0, 0.03, size=3), 0.85, 1.0),
        gradient=float(rng.uniform(0.0, 0.12)),
        gradient_angle=float(rng.uniform(0.0, 2 * np.pi)),
        vignette=float(rng.uniform(0.0, 0.15)),
        noise=float(rng.uniform(0.006, 0.014)),
        red_cell_density=float(rng.uniform(0.35, 0.75)),
        red_cell_radius=float(rng.uniform(9.0, 10.5)),
        platelets=float(rng.uniform(2.0, 7.0)),
        debris_count=float(rng.uniform(0.5, 3.0)),
        gain=float(rng.lognormal(0.0, 0.12)),
        offset=float(rng.uniform(0.03, 0.07)),
    )


# ----------------------------------------------------------------------------- helpers
def _local_grid(centres: np.ndarray, half: int):
    """Integer patch origins and sub-pixel (dy, dx) grids of shape (n, k, k), k = 2 half + 1."""
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    base = np.round(centres).astype(np.int64)
    frac = (centres - base).astype(np.float32)
    off = np.arange(-half, half + 1, dtype=np.float32)
    dy = off[None, :, None] - frac[:, 0, None, None]
    dx = off[None, None, :] - frac[:, 1, None, None]
    k = 2 * half + 1
    dy = np.broadcast_to(dy, (len(centres), k, k))
    dx = np.broadcast_to(dx, (len(centres), k, k))
    return base, dy, dx


def _splat(patches: np.ndarray, base: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Sum (n, k, k) patches centred at integer ``base`` (n, 2) into an image of ``shape``.

    Parts outside the image are dropped.
    """
    h, w = shape
    n, k, _ = patches.shape
    if n == 0:
        return np.zeros(shape, np.float32)
    half = k // 2
    off = np.arange(-half, half + 1)
    rr = base[:, 0, None, None] + off[None, :, None]
    cc = base[:, 1, None, None] + off[None, None, :]
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    ok = np.broadcast_to(ok, patches.shape)
    idx = np.broadcast_to(rr * w + cc, patches.shape)[ok]
    out = np.bincount(idx, weights=patches[ok].astype(np.float64), minlength=h * w)
    return out.reshape(shape).astype(np.float32)


def _harmonics(dy, dx, rho, amps: np.ndarray, phases: np.ndarray, orders) -> np.ndarray:
    """Sum_j amps[n, j] cos(orders[j] theta + phases[n, j]), theta = atan2(dy, dx).

    ``dy, dx, rho`` are (n, k, k) local grids; cos/sin of k theta come from the
    angle-addition recurrence (a few multiplies instead of one cosine per order and pixel).
    """
    safe = np.where(rho > 0, rho, 1.0)
    c1 = np.where(rho > 0, dx / safe, 1.0).astype(np.float32)
    s1 = (dy / safe).astype(np.float32)
    a = np.asarray(amps, np.float32)
    cphi, sphi = np.cos(phases).astype(np.float32), np.sin(phases).astype(np.float32)
    out = np.zeros(rho.shape, np.float32)
    ck, sk = c1, s1
    for order in range(1, max(orders) + 1):
        if order > 1:
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        if order in orders:
            j = list(orders).index(order)
            # cos(k t + phi) = cos k t cos phi - sin k t sin phi
            out += (a[:, j] * cphi[:, j])[:, None, None] * ck - (a[:, j] * sphi[:, j])[:, None, None] * sk
    return out


# ----------------------------------------------------------------------------- cells
def _draw_cells(rng: np.random.Generator, label: str, n: int) -> dict:
    """Morphology parameters of ``n`` cells of one class (arrays of length n)."""
    # Each class has a typical and an atypical form, which makes the classes overlap:
    # reactive lymphocytes (larger, an indented, slightly folded nucleus) and the small-cell
    # variant of Sezary cells (lymphocyte-sized, mildly folded).
    orders = np.array([1, 0.7, 0.4, 0.2, 0.1, 0.05]), np.array([1, 1, 0.9, 0.8, 0.6, 0.5])
    if label == "healthy":
        atypical = rng.random(n) < 0.12
        radius = np.where(atypical, rng.normal(14.5, 1.3, n), rng.normal(12.8, 1.3, n))
        nc = rng.uniform(0.74, 0.86, n)
        # a smooth, nearly round nucleus: weak low-order harmonics and no grooves
        smooth = np.abs(rng.normal(0.0, 0.03, (n, 6))) * orders[0]
        folded = rng.uniform(0.15, 0.4, (n, 1)) * np.abs(rng.normal(0.07, 0.03, (n, 6))) * orders[1]
        amps = np.where(atypical[:, None], folded, smooth)
        n_grooves = np.where(atypical, rng.integers(1, 3, n), 0)
        depth = rng.uniform(0.2, 0.4, (n, _MAX_GROOVES))
    else:
        atypical = rng.random(n) < 0.25
        radius = np.where(atypical, rng.normal(13.5, 1.3, n), rng.normal(16.5, 1.8, n))
        nc = rng.uniform(0.8, 0.92, n)
        # cerebriform: lobulated outline (orders 2..7) and several deep, folded grooves
        scale = np.where(atypical[:, None], rng.uniform(0.2, 0.5, (n, 1)), rng.uniform(0.35, 1.0, (n, 1)))
        amps = scale * np.abs(rng.normal(0.07, 0.03, (n, 6))) * orders[1]
        n_grooves = np.where(atypical, rng.integers(1, 3, n), rng.integers(2, _MAX_GROOVES + 1, n))
        depth = np.where(
            atypical[:, None],
            rng.uniform(0.25, 0.5, (n, _MAX_GROOVES)),
            rng.uniform(0.4, 0.7, (n, _MAX_GROOVES)),
        )
    radius = np.clip(radius, 9.5, 20.0)
    depth = depth * (np.arange(_MAX_GROOVES)[None, :] < n_grooves[:, None])
    nucleus = radius * nc
    room = np.maximum(radius - nucleus, 0.0)
    ecc_r = rng.uniform(0.0, 0.7, n) * room
    ecc_a = rng.uniform(0, 2 * np.pi, n)
    return {
        "atypical": atypical,
        "radius": radius,
        "nucleus": nucleus,
        "nc": nc,
        "outline_amps": rng.uniform(0.0, 0.03, (n, 2)),
        "outline_phases": rng.uniform(0, 2 * np.pi, (n, 2)),
        "nuc_offset": np.stack([ecc_r * np.sin(ecc_a), ecc_r * np.cos(ecc_a)], 1),
        "amps": amps,
        "phases": rng.uniform(0, 2 * np.pi, (n, 6)),
        "n_grooves": n_grooves,
        "groove_depth": depth,
        "groove_angle": rng.uniform(0, np.pi, (n, _MAX_GROOVES)),
        "groove_shift": rng.uniform(-0.65, 0.65, (n, _MAX_GROOVES)),
        "groove_wave": rng.uniform(0.12, 0.35, (n, _MAX_GROOVES)),
        "groove_freq": rng.uniform(0.15, 0.35, (n, _MAX_GROOVES)),
        "groove_phase": rng.uniform(0, 2 * np.pi, (n, _MAX_GROOVES)),
        "groove_width": rng.uniform(0.9, 1.5, (n, _MAX_GROOVES)),
        "texture": rng.standard_normal((n, 2 * _CELL_PATCH + 1, 2 * _CELL_PATCH + 1), dtype=np.float32),
    }


def _render_cells(p: dict, dy: np.ndarray, dx: np.ndarray):
    """Inside mask, cytoplasm and nucleus densities, and boundary distance on local grids."""
    from scipy.ndimage import gaussian_filter

    rho = np.hypot(dy, dx)
    outline = _outline(p, dy, dx, rho)
    inside = rho <= outline

    ny = dy - p["nuc_offset"][:, 0, None, None]
    nx = dx - p["nuc_offset"][:, 1, None, None]
    nrho = np.hypot(ny, nx)
    nrad = p["nucleus"][:, None, None] * (1 + _harmonics(ny, nx, nrho, p["amps"], p["phases"], (2, 3, 4, 5, 6, 7)))
    nucleus = np.clip(nrad - nrho + 0.5, 0.0, 1.0)
    # grooves: sinuous pale clefts across the nucleus (cerebriform folds)
    r0 = p["nucleus"][:, None, None, None]
    a = p["groove_angle"][:, :, None, None]
    u = nx[:, None] * np.cos(a) + ny[:, None] * np.sin(a)
    v = -nx[:, None] * np.sin(a) + ny[:, None] * np.cos(a)
    centre_line = r0 * (
        p["groove_shift"][:, :, None, None]
        + p["groove_wave"][:, :, None, None]
        * np.sin(p["groove_freq"][:, :, None, None] * v + p["groove_phase"][:, :, None, None])
    )
    groove = p["groove_depth"][:, :, None, None] * np.exp(
        -(((u - centre_line) / p["groove_width"][:, :, None, None]) ** 2)
    )
    nucleus = nucleus * (1 - groove.max(axis=1))
    tex = gaussian_filter(p["texture"], (0, 1.0, 1.0))
    tex /= max(float(tex.std()) if tex.size else 1.0, 1e-6)
    nucleus = nucleus * (1 + 0.22 * tex) * inside
    nucleus = np.clip(nucleus, 0.0, 1.3)
    edge = np.clip(nrad - nrho + 0.5, 0.0, 1.0)
    # cytoplasm: a little denser at the cell membrane, absent under the nucleus
    cytoplasm = inside * (1 - edge) * (0.8 + 0.4 * np.clip(rho / np.maximum(outline, 1), 0, 1) ** 4)
    return inside, cytoplasm.astype(np.float32), nucleus.astype(np.float32)


def _outline(p: dict, dy, dx, rho) -> np.ndarray:
    """Radius of each cell's outline in the direction of every grid point."""
    outline = p["radius"][:, None, None] * (1 + _harmonics(dy, dx, rho, p["outline_amps"], p["outline_phases"], (2, 3)))
    return np.minimum(outline, _CELL_MAX)


def _cue_halo(p: dict, dy, dx) -> np.ndarray:
    """The cue's weight outside each cell: exp(-distance / decay) up to ``_CUE_REACH``."""
    rho = np.hypot(dy, dx)
    dist = rho - _outline(p, dy, dx, rho)  # approximate distance to the outline
    halo = np.exp(-np.maximum(dist, 0.0) / _CUE_DECAY) * ((dist > 0) & (dist < _CUE_REACH))
    return halo.astype(np.float32)


# ----------------------------------------------------------------------------- background
def _render_red_cells(rng, stain: Stain, shape):
    """Red cells on a jittered lattice (a monolayer: they touch but rarely overlap)."""
    h, w = shape
    r_mean = stain.red_cell_radius
    spacing = 2.15 * r_mean
    ny, nx = int(math.ceil(h / spacing)) + 2, int(math.ceil(w / spacing)) + 2
    gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    # a random lattice phase per field keeps the red-cell density stationary: the expected
    # coverage at any distance from a cell is the same for small and large cells
    phase = rng.uniform(-1.0, 0.0, 2) * spacing
    centres = np.stack([gy.ravel(), gx.ravel()], 1) * spacing + phase
    centres = centres + rng.uniform(-0.28, 0.28, centres.shape) * spacing
    keep = rng.random(len(centres)) < stain.red_cell_density
    radii = r_mean * rng.lognormal(0.0, 0.07, len(centres))
    ellip = rng.uniform(0.0, 0.08, len(centres))
    ephase = rng.uniform(0, np.pi, len(centres))
    centres, radii, ellip, ephase = centres[keep], radii[keep], ellip[keep], ephase[keep]
    half = int(r_mean * 1.4) + 2
    base, dy, dx = _local_grid(centres, half)
    rho = np.hypot(dy, dx)
    rad = radii[:, None, None] * (1 + _harmonics(dy, dx, rho, ellip[:, None], 2 * ephase[:, None], (2,)))
    edge = np.clip((rad - rho) / 1.2 + 0.5, 0.0, 1.0)
    # biconcave disc: thin centre (pallor), thick rim
    thick = (0.3 + 0.7 * np.clip(rho / rad, 0, 1) ** 2.5) * edge
    return _splat(thick.astype(np.float32), base, shape)


def _render_dots(rng, centres, sizes, kind: str, shape, *, amps=None, phases=None):
    """Platelets (small granular dots) or debris (irregular blobs) at the given centres.

    ``amps, phases`` (n, 3) are the outline harmonics; drawn from ``rng`` when None.
    """
    n = len(centres)
    half = _dot_half(kind, sizes)
    base, dy, dx = _local_grid(centres, half)
    if amps is None:
        amps = rng.uniform(0.0, 0.25 if kind == "platelet" else 0.4, (n, 3))
        phases = rng.uniform(0, 2 * np.pi, (n, 3))
    prof = _dot_profile(dy, dx, sizes, amps, phases, kind)
    if kind != "platelet":
        prof = prof * rng.uniform(0.4, 1.0, (n, 1, 1))
    return _splat(prof.astype(np.float32), base, shape)


def _dot_half(kind: str, sizes) -> int:
    """Half-size of a dot's local grid (4 px for platelets, 7 for debris and clumps)."""
    return 4 if kind == "platelet" and (len(sizes) == 0 or float(np.max(sizes)) <= 2.4) else 7


def _dot_profile(dy, dx, sizes, amps, phases, kind: str) -> np.ndarray:
    """Coverage of each dot on its local grid: a disc with a harmonic outline."""
    rho = np.hypot(dy, dx)
    rad = sizes[:, None, None] * (1 + _harmonics(dy, dx, rho, amps, phases, (2, 3, 5)))
    prof = np.clip(rad - rho + 0.5, 0.0, 1.0)
    if kind == "platelet":
        prof = prof * (0.6 + 0.4 * np.exp(-(rho**2) / (sizes[:, None, None] ** 2 + 1e-6)))
    return prof


def _slot_centres(rng, size: int, n_cells: int) -> np.ndarray:
    """Cell centres: ``n_cells`` distinct slots of a coarse grid, jittered within each slot.

    The jitter leaves at least 2 pixels between the largest possible cells, so cells never
    overlap and never leave the field; positions never depend on the class.
    """
    per_side = size // _SLOT
    n_slots = per_side * per_side
    if n_cells > n_slots:
        raise CellbgError(
            f"cells_per_image={n_cells} does not fit a {size}x{size} field, which holds at most "
            f"{n_slots} cells; lower cells_per_image or raise image_size"
        )
    slot = size / per_side
    chosen = np.sort(rng.choice(n_slots, size=n_cells, replace=False))
    jitter = max(slot / 2 - _CELL_MAX - 1.0, 0.0)
    centres = np.stack([(chosen // per_side + 0.5) * slot, (chosen % per_side + 0.5) * slot], 1)
    return centres + rng.uniform(-jitter, jitter, centres.shape)


# ----------------------------------------------------------------------------- one field
def synth_field(
    label: str,
    *,
    n_cells: int = 6,
    size: int = 256,
    cue_probability: float = 0.0,
    mode: str = "rgb",
    stain: Stain | None = None,
    seed: int | np.random.SeedSequence | np.random.Generator = 0,
    cooccurrence_probability: float = 0.0,
) -> SynthField:
    """Render one field of view holding ``n_cells`` cells of class ``label``.

    Parameters
    ----------
    label : {'healthy', 'sezary'}
        Class of every cell in the field.
    n_cells : int
        Number of cells (at most ``(size // 64) ** 2``; 0 gives a cell-free field).
    size : int
        Field side in pixels (>= 64).
    cue_probability : float in [0, 1]
        Probability that a cell's surroundings carry the class-specific background cue.
    mode : {'rgb', 'gray'}
        Giemsa-like brightfield colour, or fluorescence-like gray.
    stain : Stain, optional
        The slide's appearance; drawn from ``seed`` when None.
    seed : int, SeedSequence or Generator
        Source of randomness; the same seed gives the same field.
    cooccurrence_probability : float in [0, 1]
        Probability that a cell has three non-target objects (platelet clumps) placed just
        outside its outline: the co-occurrence cue, independent of the halo cue. Drawn from
        its own stream, so it changes nothing but the objects' pixels.

    Returns
    -------
    SynthField
        ``image`` (uint8), ``mask`` (uint16 instance labels), the ``cells`` table, and the
        co-occurring objects' labels (``objects``) and table (``object_table``).

    Raises
    ------
    CellbgError
        An unknown label or mode, a probability outside [0, 1], or too many cells.

    Examples
    --------
    >>> f = synth_field("sezary", n_cells=3, size=128, seed=1)
    >>> f.image.shape, f.image.dtype.name, int(f.mask.max()), len(f.cells)
    ((128, 128, 3), 'uint8', 3, 3)
    """
    label = look_up_option(label, CLASSES, what="class")
    mode = look_up_option(mode, _MODES, what="synth mode")
    _check_range(cue_probability, "cue_probability", 0.0, 1.0)
    _check_range(cooccurrence_probability, "cooccurrence_probability", 0.0, 1.0)
    _check_int(n_cells, "n_cells", 0)
    _check_int(size, "size", 64)
    # Independent streams: the layout (positions, cue flags), the morphology, the background
    # the cue's objects and the co-occurring objects. So with one seed, a field of either
    # class has the same background, and a cue changes nothing but its own pixels.
    ss = _seed_sequence(seed)
    stain_ss, layout_ss, cells_ss, bg_ss, cue_ss, cooc_ss = ss.spawn(6)
    if stain is None:
        stain = random_stain(np.random.default_rng(stain_ss))
    layout_rng, bg_rng, cue_rng = (np.random.default_rng(x) for x in (layout_ss, bg_ss, cue_ss))
    shape = (size, size)

    # --- cells: positions and cue flags (never class-dependent), morphology
    centres = _slot_centres(layout_rng, size, n_cells)
    cue = layout_rng.random(n_cells) < cue_probability
    params = _draw_cells(np.random.default_rng(cells_ss), label, n_cells)
    base, dy, dx = _local_grid(centres, _CELL_PATCH)
    inside, cyt, nuc = _render_cells(params, dy, dx)
    coverage = _splat(inside.astype(np.float32), base, shape)
    if coverage.max() > 1:  # the slot grid makes this impossible; guard the invariant
        raise RuntimeError("synthetic cells overlap; the slot geometry is broken")
    ids = np.arange(1, n_cells + 1, dtype=np.float32)[:, None, None]
    mask = np.rint(_splat(inside * ids, base, shape)).astype(np.uint16)
    cell_px = coverage > 0
    cytoplasm = _splat(cyt, base, shape)
    nucleus = _splat(nuc, base, shape)

    # --- background objects, independent of the class
    red = _render_red_cells(bg_rng, stain, shape)
    area_scale = size * size / 256.0**2
    n_plt = bg_rng.poisson(stain.platelets * area_scale)
    plt_centres = bg_rng.uniform(0, size, (n_plt, 2))
    plt_sizes = bg_rng.uniform(1.4, 2.4, n_plt)
    platelets = _render_dots(bg_rng, plt_centres, plt_sizes, "platelet", shape)
    n_deb = bg_rng.poisson(stain.debris_count * area_scale)
    deb_centres = bg_rng.uniform(0, size, (n_deb, 2))
    deb_sizes = bg_rng.uniform(1.5, 4.5, n_deb)
    debris = _render_dots(bg_rng, deb_centres, deb_sizes, "debris", shape)

    # --- the planted cue: a halo (both classes) and a few platelets (Sezary) near the cell
    cue_map = np.zeros(shape, np.float32)
    if cue.any():
        cue_base, cdy, cdx = _local_grid(centres[cue], _CUE_PATCH)
        sub = {k: params[k][cue] for k in ("radius", "outline_amps", "outline_phases")}
        cue_map = _splat(_cue_halo(sub, cdy, cdx), cue_base, shape)
        if label == "sezary":
            k = int(cue.sum())
            angle = cue_rng.uniform(0, 2 * np.pi, (k, _CUE_PLATELETS))
            r = params["radius"][cue, None] + cue_rng.uniform(3.0, 13.0, (k, _CUE_PLATELETS))
            extra = centres[cue, None, :] + np.stack([r * np.sin(angle), r * np.cos(angle)], -1)
            extra = extra.reshape(-1, 2)
            sizes = cue_rng.uniform(1.6, 2.4, len(extra))
            platelets = platelets + _render_dots(cue_rng, extra, sizes, "platelet", shape)
    # --- the co-occurrence cue: platelet clumps just outside the cell (own stream)
    cooc, objects, object_table, clumps = _cooccurring_objects(
        np.random.default_rng(cooc_ss),
        centres,
        params["radius"],
        cooccurrence_probability,
        label,
        cell_px,
        shape,
    )
    platelets = platelets + clumps
    rng = bg_rng  # the smooth fields and the noise below belong to the background stream

    # --- slide-level smooth fields: plasma tone and illumination (separable: outer products)
    yy = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    xx = yy
    waves = rng.uniform(1.0, 4.0, (3, 2)) * rng.choice([-1, 1], (3, 2)) * np.pi
    wphase = rng.uniform(0, 2 * np.pi, 3)
    wamp = rng.uniform(0.0, 0.15, 3)
    # cos(a y + b x + p) = cos(a y) cos(b x + p) - sin(a y) sin(b x + p)
    ay = waves[:, 0, None] * yy[None]
    bx = waves[:, 1, None] * xx[None] + wphase[:, None]
    plasma = 1.0 + ((wamp[:, None] * np.cos(ay)).T @ np.cos(bx) - (wamp[:, None] * np.sin(ay)).T @ np.sin(bx)).astype(
        np.float32
    )
    ga = stain.gradient_angle
    illum = (
        1.0
        + stain.gradient * (yy[:, None] * np.sin(ga) + xx[None] * np.cos(ga))
        - 2 * stain.vignette * (yy[:, None] ** 2 + xx[None] ** 2)
    ).astype(np.float32)
    channels = 3 if mode == "rgb" else 1
    # triangular noise (sum of two uniforms, unit variance): close to Gaussian, 3x cheaper
    noise = rng.random((2, channels, size * size), dtype=np.float32)
    noise = (noise[0] + noise[1] - 1.0) * np.float32(math.sqrt(6.0))

    # every layer is one row; each channel is a weighted sum of rows (one matrix product)
    bg = (~cell_px).astype(np.float32)
    layers = np.stack([plasma, red * bg, platelets * bg, debris * bg, cue_map * bg, cytoplasm, nucleus])
    layers = layers.reshape(len(layers), -1)
    if mode == "rgb":
        weights = np.stack(
            [
                stain.plasma,
                stain.red_cell,
                stain.platelet,
                stain.debris,
                _CUE_OD[label],
                stain.cytoplasm,
                stain.nucleus,
            ],
            1,
        ).astype(np.float32)  # (3, 7) optical densities
        od = weights @ layers  # (3, pixels)
        light = stain.light.astype(np.float32)[:, None] * illum.reshape(1, -1)
        image = light * np.exp(-od) + np.float32(stain.noise) * noise
        image = image.reshape(3, size, size)
    else:
        weights = np.array([stain.offset, 0.035, 0.3, 0.12, _CUE_GRAY[label], 0.14, 0.5], np.float32)  # emissions
        emission = (weights @ layers).reshape(size, size)
        image = np.float32(stain.gain) * illum * emission
        sd = np.sqrt(np.float32(stain.noise) ** 2 + 0.0006 * np.clip(image, 0, None))
        image = image + sd * noise.reshape(size, size)
    image = np.clip(image * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)
    if mode == "rgb":
        image = np.ascontiguousarray(np.moveaxis(image, 0, -1))

    area = np.bincount(mask.ravel(), minlength=n_cells + 1)[1:]
    cells = pd.DataFrame(
        {
            "instance": np.arange(1, n_cells + 1),
            "label": label,
            "cue": cue,
            "centre_r": centres[:, 0].round(2),
            "centre_c": centres[:, 1].round(2),
            "area": area,
            "cell_radius": params["radius"].round(3),
            "nucleus_radius": params["nucleus"].round(3),
            "nc_ratio": params["nc"].round(4),
            "folding": params["amps"].sum(axis=1).round(4),
            "grooves": params["n_grooves"],
            "atypical": params["atypical"],
            "cooccurrence": cooc,
            "objects": np.bincount(object_table["cell_instance"], minlength=n_cells + 1)[1:],
        }
    )
    return SynthField(image=image, mask=mask, cells=cells, objects=objects, object_table=object_table)


def _cooccurring_objects(rng, centres, radius, probability, label, cell_px, shape):
    """Place the co-occurrence cue: ``_COOC_OBJECTS`` platelet clumps near flagged cells.

    The draws do not depend on ``probability`` beyond the flags (every cell draws its
    flag, angles, gaps and sizes), so the flags are nested across probabilities and the
    objects of a flagged cell are the same whatever the probability.

    Returns the per-cell flags, the objects' label image (uint16, 0 on cells), their table
    and their density layer (added to the platelet layer).
    """
    n = len(centres)
    k = _COOC_OBJECTS
    flag = rng.random(n) < probability
    turn = rng.uniform(0, 2 * np.pi, n)
    # spread the objects of one cell around it: evenly spaced angles, jittered
    angle = turn[:, None] + 2 * np.pi * np.arange(k)[None] / k + rng.uniform(-0.5, 0.5, (n, k))
    size = rng.uniform(*_COOC_RADIUS, (n, k))
    gap = rng.uniform(*_COOC_GAP, (n, k))
    amps = rng.uniform(0.0, 0.25, (n, k, 3))
    phases = rng.uniform(0, 2 * np.pi, (n, k, 3))
    table_cols = ["object", "label", "kind", "cell_instance", "centre_r", "centre_c", "radius", "area"]
    objects = np.zeros(shape, np.uint16)
    if not flag.any():
        empty = pd.DataFrame({c: pd.Series(dtype=object if c in ("label", "kind") else float) for c in table_cols})
        empty = empty.astype({"object": np.int64, "cell_instance": np.int64, "area": np.int64})
        return flag, objects, empty, np.zeros(shape, np.float32)
    owner = np.repeat(np.flatnonzero(flag), k)
    sizes = size[flag].ravel()
    reach = np.minimum(radius[owner] * 1.07, _CELL_MAX)  # the outline's largest radius
    dist = reach + gap[flag].ravel() + sizes
    a = angle[flag].ravel()
    ctr = centres[owner] + np.stack([dist * np.sin(a), dist * np.cos(a)], 1)
    base, dy, dx = _local_grid(ctr, _dot_half("clump", sizes))
    prof = _dot_profile(dy, dx, sizes, amps[flag].reshape(-1, 3), phases[flag].reshape(-1, 3), "platelet")
    density = _splat(prof.astype(np.float32), base, shape)
    # each object's label: every pixel it covers (more than 5 %, so that blanking the label
    # leaves no rim), never on a cell; a later object wins where two touch (rare: the angles
    # are spread)
    ids = np.arange(1, len(ctr) + 1, dtype=np.float32)[:, None, None]
    top = _splat_max((prof > 0.05) * ids, base, shape)
    objects = np.where(cell_px, 0, top).astype(np.uint16)
    area = np.bincount(objects.ravel(), minlength=len(ctr) + 1)[1:]
    table = pd.DataFrame(
        {
            "object": np.arange(1, len(ctr) + 1),
            "label": label,
            "kind": "platelet_clump",
            "cell_instance": owner + 1,
            "centre_r": ctr[:, 0].round(2),
            "centre_c": ctr[:, 1].round(2),
            "radius": sizes.round(3),
            "area": area,
        }
    )
    return flag, objects, table, density


def _splat_max(patches: np.ndarray, base: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Like :func:`_splat` but each pixel keeps the largest patch value (for labels)."""
    h, w = shape
    n, k, _ = patches.shape
    out = np.zeros(h * w, np.float32)
    half = k // 2
    off = np.arange(-half, half + 1)
    rr = base[:, 0, None, None] + off[None, :, None]
    cc = base[:, 1, None, None] + off[None, None, :]
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    ok = np.broadcast_to(ok, patches.shape)
    idx = np.broadcast_to(rr * w + cc, patches.shape)[ok]
    np.maximum.at(out, idx, patches[ok].astype(np.float32))
    return out.reshape(shape)


# ----------------------------------------------------------------------------- dataset
def _seed_sequence(seed) -> np.random.SeedSequence:
    """A SeedSequence from an int, a list of ints, a SeedSequence or a Generator."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, np.random.Generator):
        return np.random.SeedSequence(int(seed.integers(0, 2**63)))
    try:
        return np.random.SeedSequence(seed)
    except (TypeError, ValueError):
        raise CellbgError(f"seed must be a non-negative integer; got {seed!r}") from None


def _check_range(value, name: str, lo: float, hi: float | None) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CellbgError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(v) or v < lo or (hi is not None and v > hi):
        span = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise CellbgError(f"{name} must be in {span}; got {value!r}")


def _check_int(value, name: str, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise CellbgError(f"{name} must be an integer >= {lo}; got {value!r}")


def _write_tiff(path: Path, array: np.ndarray, photometric: str) -> None:
    """Write a TIFF atomically with no varying metadata (same array -> same bytes)."""
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric=photometric, metadata=None, software=False)


def _split(n: int, per: int) -> list[int]:
    """Split n cells into images of at most ``per`` cells, as evenly as possible."""
    if n <= 0:
        return []
    k = -(-n // per)
    return [len(a) for a in np.array_split(np.arange(n), k)]


def make_dataset(
    out_dir,
    *,
    patients: int = 8,
    cells_per_patient: int = 40,
    cells_per_image: int = 6,
    image_size: int = 256,
    signal: float = 0.8,
    signal_sd_between_patients: float = 0.0,
    label_by: str = "cell",
    mode: str = "rgb",
    seed: int = 0,
    cooccurrence: float = 0.0,
    cooccurrence_class: str = "sezary",
) -> pd.DataFrame:
    """Write a synthetic Sezary-like dataset with a planted background cue; return its manifest.

    Parameters
    ----------
    out_dir : str or Path
        Output folder (created; an earlier synthetic dataset there is replaced, any other
        non-empty folder is refused).
    patients : int
        Number of patients; each is one slide with its own stain and illumination.
    cells_per_patient : int
        Cells per patient. With ``label_by='cell'`` they are split evenly between classes.
    cells_per_image : int
        Most cells in one field of view (at most ``(image_size // 64) ** 2``).
    image_size : int
        Field side in pixels.
    signal : float in [0, 1]
        Probability that a cell's surroundings carry the class-specific cue (0: the
        background says nothing about the class).
    signal_sd_between_patients : float
        Standard deviation of a patient's cue probability around ``signal`` (clipped to
        [0, 1]); 0 gives every patient the same probability.
    label_by : {'cell', 'patient'}
        ``'cell'``: every patient has fields of both classes. ``'patient'``: each patient
        has one class (half the patients each); stains are drawn independently of the class.
    mode : {'rgb', 'gray'}
        Giemsa-like RGB brightfield or fluorescence-like gray.
    seed : int
        The same seed gives byte-identical files.
    cooccurrence : float in [0, 1]
        Probability that a cell of class ``cooccurrence_class`` has three non-target objects
        (platelet clumps) just outside its outline: a second planted cue, independent of the
        halo (``signal``). When > 0 the objects' label images are written to ``objects/``,
        one row per object to ``objects_truth.csv``, and the manifest gains an ``objects``
        column.
    cooccurrence_class : {'healthy', 'sezary'}
        The class whose cells the objects accompany.

    Returns
    -------
    DataFrame
        The manifest: ``path, label, patient, mask[, objects]`` (paths relative to
        ``out_dir``).

    Raises
    ------
    CellbgError
        A parameter out of range, or ``out_dir`` holding files that are not a synthetic
        dataset.

    Examples
    --------
    >>> import tempfile
    >>> m = make_dataset(tempfile.mkdtemp(), patients=2, cells_per_patient=4, image_size=128,
    ...                  cells_per_image=2, seed=0)
    >>> sorted(m["label"].unique()), m["patient"].nunique()
    (['healthy', 'sezary'], 2)
    """
    _check_int(patients, "patients", 2 if label_by == "patient" else 1)
    _check_int(cells_per_patient, "cells_per_patient", 1)
    _check_int(cells_per_image, "cells_per_image", 1)
    _check_int(image_size, "image_size", 64)
    _check_int(seed, "seed", 0)
    _check_range(signal, "signal", 0.0, 1.0)
    _check_range(signal_sd_between_patients, "signal_sd_between_patients", 0.0, None)
    _check_range(cooccurrence, "cooccurrence", 0.0, 1.0)
    cooccurrence_class = look_up_option(cooccurrence_class, CLASSES, what="cooccurrence_class")
    label_by = look_up_option(label_by, _LABEL_BY, what="label_by")
    mode = look_up_option(mode, _MODES, what="synth mode")
    if cells_per_image > (image_size // _SLOT) ** 2:
        raise CellbgError(
            f"cells_per_image={cells_per_image} does not fit a {image_size}x{image_size} field, "
            f"which holds at most {(image_size // _SLOT) ** 2} cells; lower cells_per_image or "
            "raise image_size"
        )
    if label_by == "cell" and cells_per_patient < 2:
        raise CellbgError("label_by 'cell' needs cells_per_patient >= 2 (one cell of each class)")

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)
    params = dict(
        patients=patients,
        cells_per_patient=cells_per_patient,
        cells_per_image=cells_per_image,
        image_size=image_size,
        signal=float(signal),
        signal_sd_between_patients=float(signal_sd_between_patients),
        label_by=label_by,
        mode=mode,
        seed=seed,
        cooccurrence=float(cooccurrence),
        cooccurrence_class=cooccurrence_class,
    )
    with_objects = cooccurrence > 0

    # the parameters first: they mark the folder as a synthetic dataset, so a run killed
    # half-way is replaced on the next call instead of being refused as foreign
    write_text_atomic(out_dir / "synth.json", json.dumps(params, indent=2, sort_keys=True) + "\n")

    root = np.random.SeedSequence(seed)
    design_ss, *patient_ss = root.spawn(patients + 1)
    design = np.random.default_rng(design_ss)
    patient_class = design.permutation(np.arange(patients) % 2)
    width = max(2, len(str(patients)))
    photometric = "rgb" if mode == "rgb" else "minisblack"

    manifest_rows, truth, object_rows = [], [], []
    for i in range(patients):
        pid = f"P{i + 1:0{width}d}"
        prng = np.random.default_rng(patient_ss[i])
        stain = random_stain(prng)  # independent of the class: no built-in slide confound
        z = prng.standard_normal()
        p_cue = float(np.clip(signal + signal_sd_between_patients * z, 0.0, 1.0))
        if label_by == "cell":
            half = cells_per_patient // 2
            plan = [("healthy", n) for n in _split(cells_per_patient - half, cells_per_image)]
            plan += [("sezary", n) for n in _split(half, cells_per_image)]
        else:
            cls = CLASSES[patient_class[i]]
            plan = [(cls, n) for n in _split(cells_per_patient, cells_per_image)]
        image_ss = patient_ss[i].spawn(len(plan))
        for j, (cls, n) in enumerate(plan):
            fov = synth_field(
                cls,
                n_cells=n,
                size=image_size,
                cue_probability=p_cue,
                mode=mode,
                stain=stain,
                seed=image_ss[j],
                cooccurrence_probability=cooccurrence if cls == cooccurrence_class else 0.0,
            )
            rel_img, rel_mask = f"images/{pid}_{j:03d}.tif", f"masks/{pid}_{j:03d}.tif"
            _write_tiff(out_dir / rel_img, fov.image, photometric)
            _write_tiff(out_dir / rel_mask, fov.mask, "minisblack")
            row = {"path": rel_img, "label": cls, "patient": pid, "mask": rel_mask}
            if with_objects:
                # synth_field always draws the co-occurring objects (none when the probability is 0)
                assert fov.objects is not None and fov.object_table is not None
                row["objects"] = rel_obj = f"objects/{pid}_{j:03d}.tif"
                _write_tiff(out_dir / rel_obj, fov.objects, "minisblack")
                objs = fov.object_table.copy()
                objs.insert(0, "path", rel_img)
                objs.insert(1, "objects_path", rel_obj)
                objs.insert(2, "image_id", image_id(rel_img))
                objs.insert(3, "patient", pid)
                if len(objs):
                    object_rows.append(objs)
            manifest_rows.append(row)
            cells = fov.cells.copy()
            cells.insert(0, "path", rel_img)
            cells.insert(1, "mask", rel_mask)
            cells.insert(2, "image_id", image_id(rel_img))
            cells.insert(3, "patient", pid)
            truth.append(cells)

    keep = {r[k] for r in manifest_rows for k in ("path", "mask", "objects") if k in r}
    _remove_stale(out_dir, keep)
    truth_df = pd.concat(truth, ignore_index=True)[TRUTH_COLUMNS]
    write_text_atomic(out_dir / "cells_truth.csv", truth_df.to_csv(index=False, lineterminator="\n"))
    if with_objects:
        objects_df = (
            pd.concat(object_rows, ignore_index=True)[OBJECT_COLUMNS]
            if object_rows
            else pd.DataFrame(columns=OBJECT_COLUMNS)
        )
        write_text_atomic(out_dir / "objects_truth.csv", objects_df.to_csv(index=False, lineterminator="\n"))
    else:
        (out_dir / "objects_truth.csv").unlink(missing_ok=True)
    columns = ["path", "label", "patient", "mask"] + (["objects"] if with_objects else [])
    manifest = pd.DataFrame(manifest_rows, columns=columns)
    # the manifest is written last: its presence means the dataset is complete
    write_text_atomic(out_dir / "manifest.csv", manifest.to_csv(index=False, lineterminator="\n"))
    return manifest


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir``; refuse a non-empty folder that is not a synthetic dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CellbgError(f"synth output {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    if entries and not (out_dir / "synth.json").exists():
        raise CellbgError(
            f"synth output folder {out_dir} is not empty and holds no synthetic dataset "
            "(no synth.json); choose an empty or new folder"
        )
    # an older dataset is being replaced: it is no longer complete until the new manifest
    (out_dir / "manifest.csv").unlink(missing_ok=True)


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Remove images/masks of an earlier, larger synthetic dataset in the same folder."""
    for sub in ("images", "masks", "objects"):
        folder = out_dir / sub
        if folder.is_dir():
            for p in folder.glob("*.tif"):
                if f"{sub}/{p.name}" not in keep:
                    p.unlink()
