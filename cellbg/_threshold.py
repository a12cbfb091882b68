"""The classical segmenter behind ``segmentation.method: threshold`` (private).

Everything scales with one number, the cell diameter ``d`` in pixels (given, or estimated
from the image by :func:`estimate_diameter`):

=====================  ==================================================================
smoothing              Gaussian, sigma = d / 16 (at least 1 pixel)
background             lower quartile of blocks of side 4 d, interpolated, subtracted
opening                disk of radius d / 10 (removes specks and one-pixel bridges)
watershed seeds        maxima of the distance map smoothed at sigma = d / 8 (plus the
                       intensity's Laplacian of Gaussian at the cell scale for
                       ``seeds='log'``), at least 0.4 d apart
local threshold        Gaussian window of 2 d + 1 pixels (``threshold='local'``)
outline                each object's edge at 0.4 of its own height above the background
size filter            objects under 0.1 x the area of a disc of diameter d are dropped
=====================  ==================================================================

Brightfield RGB images are turned into a stain density by colour deconvolution
(``skimage.color.separate_stains``, Ruifrok & Johnston 2001; G. Landini's stain vectors as
shipped with scikit-image), so the nuclear stain is always bright where it is dense and
polarity never depends on pixel counts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from cellbg._checks import CellbgError

log = logging.getLogger("cellbg.segment")

THRESHOLDS = ("robust", "otsu", "li", "local")
SEEDS = ("distance", "log")
#: An object's outline lies where its signal falls to this fraction of its own height above
#: the background (0.5 is exact for a sharp edge blurred by the optics; a little lower keeps
#: the visible rim of real nuclei, whose edges are softer than a blurred step).
EDGE_FRACTION = 0.4
STAINS = ("auto", "hematoxylin", "eosin", "dab", "giemsa", "giemsa_eosin", "none")


def _stain_matrices() -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """``name -> (stains_from_rgb, the stain's RGB absorbance vector, index)``."""
    from skimage import color

    rgb_from_hed = np.linalg.inv(color.hed_from_rgb)
    rgb_from_bex = np.linalg.inv(color.bex_from_rgb)
    return {
        "hematoxylin": (color.hed_from_rgb, rgb_from_hed[0], 0),
        "eosin": (color.hed_from_rgb, rgb_from_hed[1], 1),
        "dab": (color.hed_from_rgb, rgb_from_hed[2], 2),
        "giemsa": (color.bex_from_rgb, rgb_from_bex[0], 0),  # methylene/methyl blue (+ azure)
        "giemsa_eosin": (color.bex_from_rgb, rgb_from_bex[1], 1),
    }


@dataclass(frozen=True)
class ThresholdInfo:
    """What :func:`cellbg.segment.segment_threshold` chose: the plane, the diameter and the threshold."""

    plane: str  # e.g. "channel 0", "stain hematoxylin"
    inverted: bool
    diameter: float
    diameter_estimated: bool
    threshold: float
    n_objects: int

    def as_dict(self) -> dict:
        return asdict(self)


def _as_rgb01(image: np.ndarray) -> np.ndarray:
    """(3, M, N) any dtype -> (M, N, 3) float in [0, 1] (integer dtypes by their maximum)."""
    rgb = np.moveaxis(np.asarray(image), 0, -1)
    if np.issubdtype(rgb.dtype, np.integer):
        return rgb.astype(np.float32) / np.iinfo(rgb.dtype).max
    rgb = rgb.astype(np.float32)
    hi = float(rgb.max())
    return rgb / hi if hi > 1 else rgb


def _is_brightfield(planes: np.ndarray) -> bool:
    """Background brighter than the objects: the brightest tenth of the pixels sits at the
    top of the range (a white background) while the darkest tenth is well above the bottom;
    fluorescence is the mirror image (a black background, a tail of bright cells)."""
    sample = planes[:, ::4, ::4].reshape(len(planes), -1)
    lo, p10, p90, hi = np.percentile(sample, [0.5, 10, 90, 99.5], axis=1)
    return bool(np.mean(hi - p90) < np.mean(p10 - lo))


def _pair_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``rgb_from_stains`` of two stains, the third row their normalised cross product."""
    m = np.array([a / np.linalg.norm(a), b / np.linalg.norm(b), np.zeros(3)])
    m[2] = np.cross(m[0], m[1])
    m[2] /= np.linalg.norm(m[2])
    return m


def _auto_stain(rgb01: np.ndarray) -> tuple[str, dict]:
    """The nuclear stain of the stain pair that explains the image's colours best.

    Each candidate pair (haematoxylin + eosin, haematoxylin + DAB, Giemsa's methylene blue +
    eosin) spans a plane of optical-density space; the share of the stained pixels' optical
    density that falls outside that plane is the pair's residual. The pair with the smallest
    residual names the nuclear stain: haematoxylin for the first two, giemsa for the last.
    """
    from skimage import color

    od = -np.log(np.clip(rgb01[::2, ::2].reshape(-1, 3), 1 / 255, 1.0))
    total = od.sum(axis=1)
    stained = od[total > max(0.15, float(np.quantile(total, 0.25)))]
    if len(stained) < 10:
        stained = od
    rgb_from_hed = np.linalg.inv(color.hed_from_rgb)
    rgb_from_bex = np.linalg.inv(color.bex_from_rgb)
    pairs = {
        "hematoxylin+eosin": _pair_matrix(rgb_from_hed[0], rgb_from_hed[1]),
        "hematoxylin+dab": _pair_matrix(rgb_from_hed[0], rgb_from_hed[2]),
        "giemsa": _pair_matrix(rgb_from_bex[0], rgb_from_bex[1]),
    }
    residual = {}
    for name, m in pairs.items():
        conc = stained @ np.linalg.inv(m)  # OD = conc @ m
        residual[name] = float(np.abs(conc[:, 2]).sum() / (np.abs(conc).sum() + 1e-12))
    best = min(residual, key=residual.__getitem__)
    return ("giemsa" if best == "giemsa" else "hematoxylin"), residual


def intensity_plane(
    image: np.ndarray, *, channel: int | None = None, stain: str = "auto"
) -> tuple[np.ndarray, str, bool]:
    """The 2-D plane to segment, bright where the cells are, and how it was chosen.

    Returns ``(plane, description, brightfield)``. ``brightfield`` is True when the plane
    came from a stain density (no inversion is needed) or from a brightfield image.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.float32), "the only channel", False
    if channel is not None:
        if not 0 <= channel < image.shape[0]:
            raise CellbgError(f"threshold channel {channel} out of range for an image with {image.shape[0]} channel(s)")
        return image[channel].astype(np.float32), f"channel {channel} (given)", False
    if image.shape[0] == 1:
        return image[0].astype(np.float32), "the only channel", False
    planes = image.astype(np.float32)
    if image.shape[0] == 3 and stain != "none" and (stain != "auto" or _is_brightfield(planes)):
        from skimage.color import separate_stains

        rgb01 = _as_rgb01(image)
        if stain == "auto":
            stain, cos = _auto_stain(rgb01)
            why = ", ".join(f"{k} {v:.3f}" for k, v in cos.items())
            desc = f"stain {stain} (colour deconvolution; brightfield RGB; residual of each stain pair: {why})"
        else:
            desc = f"stain {stain} (colour deconvolution, given)"
        mat, _, index = _stain_matrices()[stain]
        density = separate_stains(np.clip(rgb01, 1e-6, 1.0), mat)[..., index]
        return density.astype(np.float32), desc, True
    sample = planes[:, ::4, ::4].reshape(len(planes), -1)
    _, med, hi = np.percentile(sample, [0.5, 50, 99.5], axis=1)
    best = int(np.argmax(hi - med))
    return planes[best], f"channel {best} (most contrast)", False


def estimate_diameter(x: np.ndarray) -> float:
    """Typical object diameter (pixels) of a plane whose objects are bright.

    A first Otsu mask of the lightly smoothed plane; each connected component's largest
    distance-to-background is its inscribed radius, which a merged clump of touching round
    cells shares with its members. The median over components (>= 10 pixels) of
    ``2 * radius + 1`` is returned; 0 when there is no object.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    x = ndi.gaussian_filter(np.asarray(x, np.float32), 1.0)
    if x.max() == x.min():
        return 0.0
    fg = ndi.binary_opening(x > threshold_otsu(x))
    labels, n = ndi.label(fg)
    if n == 0:
        return 0.0
    dist = ndi.distance_transform_edt(fg)
    radius = ndi.maximum(dist, labels, np.arange(1, n + 1))
    area = np.bincount(labels.ravel())[1:]
    radius = np.asarray(radius)[area >= 10]
    if radius.size == 0:
        return 0.0
    return float(2 * np.median(radius) + 1)


def background(x: np.ndarray, radius: float) -> np.ndarray:
    """A smooth background: the 25th percentile of blocks of side 4 x ``radius``, linearly
    interpolated (and extrapolated to the borders) between block centres.

    A block spans at least two cell diameters when ``radius`` is the cell diameter or more,
    so its lower quartile is background. Unlike a morphological top-hat this is exact for a
    linear illumination gradient, also at the image borders.
    """
    from scipy.interpolate import RegularGridInterpolator

    side = max(4, int(round(4 * radius)))
    h, w = x.shape
    n_r, n_c = max(1, h // side), max(1, w // side)
    edges_r = np.linspace(0, h, n_r + 1).astype(int)
    edges_c = np.linspace(0, w, n_c + 1).astype(int)
    levels = np.array(
        [
            [np.percentile(x[edges_r[i] : edges_r[i + 1], edges_c[j] : edges_c[j + 1]], 25) for j in range(n_c)]
            for i in range(n_r)
        ]
    )
    if n_r == 1 and n_c == 1:
        return np.full_like(x, levels[0, 0])
    centres_r = (edges_r[:-1] + edges_r[1:] - 1) / 2
    centres_c = (edges_c[:-1] + edges_c[1:] - 1) / 2
    if n_r == 1:  # one block row: interpolate along columns only
        return np.broadcast_to(np.interp(np.arange(w), centres_c, levels[0]), x.shape).astype(x.dtype)
    if n_c == 1:
        return np.broadcast_to(np.interp(np.arange(h), centres_r, levels[:, 0])[:, None], x.shape).astype(x.dtype)
    interp = RegularGridInterpolator((centres_r, centres_c), levels, bounds_error=False, fill_value=None)
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return interp(np.stack([rr.ravel(), cc.ravel()], axis=1)).reshape(h, w).astype(x.dtype)


def robust_background_threshold(x: np.ndarray, n_sigmas: float) -> float:
    """CellProfiler's "robust background": background median + ``n_sigmas`` robust SDs.

    The background is estimated from the pixels below Otsu's threshold (the majority in a
    field of view), its spread from the lower half of them (which dim cells do not reach), so
    dim cells that Otsu would merge into the background still clear it.
    Never above Otsu: bright cells are found either way.
    """
    from skimage.filters import threshold_otsu

    t_otsu = float(threshold_otsu(x))
    sample = x[::2, ::2]  # the median and MAD of a quarter of the pixels: same answer, faster
    below = sample[sample <= t_otsu]
    if below.size == 0:
        return t_otsu
    med = float(np.median(below))
    # The spread from the lower half only: dim cells below Otsu add to the upper half, never
    # to the lower, so they do not inflate the noise estimate (and raise the threshold).
    lower = below[below <= med]
    sd = 1.4826 * float(np.median(med - lower)) if lower.size else 0.0
    if sd <= 0:
        return t_otsu
    return min(t_otsu, med + n_sigmas * sd)


def split_touching(
    fg: np.ndarray,
    *,
    min_distance: int,
    smooth: float,
    h: float = 0.0,
    intensity: np.ndarray | None = None,
    log_sigma: float = 0.0,
) -> np.ndarray:
    """Seeded watershed on the (smoothed) distance map: one seed per cell centre.

    With ``intensity`` and ``log_sigma > 0`` the seed surface also holds the intensity's
    scale-normalised Laplacian of Gaussian (blob centres at the cell scale), for touching
    cells whose outline has little neck.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    components, n = ndi.label(fg)
    if n == 0:
        return components.astype(np.int32)
    distance = ndi.distance_transform_edt(fg)
    if smooth > 0:  # removes the spurious maxima of ragged outlines
        distance = ndi.gaussian_filter(distance, smooth)
    surface = distance / (distance.max() + 1e-12)
    if intensity is not None and log_sigma > 0:
        blob = -ndi.gaussian_laplace(intensity.astype(np.float32), log_sigma) * log_sigma**2
        blob = np.clip(blob, 0, None)
        surface = surface + blob / (np.percentile(blob[fg], 99) + 1e-12) if fg.any() else surface
    if h > 0:
        seeds, _ = ndi.label(h_maxima(distance, h))
    else:
        peaks = peak_local_max(surface, min_distance=max(1, int(min_distance)), labels=components, exclude_border=False)
        seeds = np.zeros(fg.shape, np.int32)
        seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A component without a seed (too small for a peak) keeps itself as one object.
    seeded = np.zeros(n + 1, bool)
    seeded[components[seeds > 0]] = True
    orphan = ~seeded[components] & (components > 0)
    if orphan.any():
        seeds = np.where(orphan, components + seeds.max(), seeds)
    return watershed(-surface, seeds, mask=fg).astype(np.int32)


def scaled(diameter: float) -> dict:
    """The settings that follow from a cell diameter (pixels); see the module docstring."""
    d = float(diameter)
    return {
        "sigma": max(1.0, d / 16),
        "background_radius": d,
        "opening_radius": max(1, int(round(d / 10))),
        "seed_smooth": max(1.0, d / 8),
        "min_distance": max(2, int(round(0.4 * d))),
        "log_sigma": d / (2 * np.sqrt(2)),
        "local_block_size": 2 * int(round(d)) + 1,
        "min_area": max(4, int(round(0.1 * np.pi * d * d / 4))),
    }


def refine_edges(labels: np.ndarray, x: np.ndarray, fg: np.ndarray, *, fraction: float = EDGE_FRACTION) -> np.ndarray:
    """Each object's outline at ``fraction`` of its own height above the background.

    The height is the object's 90th intensity percentile (robust to a bright speck) minus the
    background median (pixels outside ``fg``), so a dim cell's edge lies at the same fraction
    of its own signal as a bright cell's does;
    one global threshold puts a bright cell's edge outside its blur and a dim one's inside.
    Holes left inside an object are given back to it.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    n = int(labels.max())
    if n == 0 or fraction <= 0:
        return labels
    b = float(np.median(x[~fg])) if (~fg).any() else float(x.min())
    peak = _label_percentile(x, labels, n, 90)
    edge = np.r_[np.inf, b + fraction * (peak - b)]
    core = np.where(x >= edge[labels], labels, 0)
    region = ndi.binary_fill_holes(core > 0)
    return watershed(-x, core, mask=region).astype(np.int32)


def _label_percentile(x: np.ndarray, labels: np.ndarray, n: int, q: float) -> np.ndarray:
    """The ``q``-th percentile of ``x`` over each label 1..n (nearest rank), in one sort."""
    inside = labels.ravel() > 0
    lab = labels.ravel()[inside]
    val = x.ravel()[inside]
    order = np.lexsort((val, lab))
    lab, val = lab[order], val[order]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    idx = starts + np.clip(np.floor(q / 100 * (counts - 1)).astype(int), 0, None)
    out = np.full(n, np.inf)
    has = counts > 0
    out[has] = val[idx[has]]
    return out
