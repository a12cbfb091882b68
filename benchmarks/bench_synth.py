"""Throughput of the synthetic dataset generator, in fields of view per second per core.

The issue asks for >= 50 fields of view (256 x 256) per second per core. Rendering is timed
in CPU seconds of this process with BLAS/OpenMP pinned to one thread, so the figure is per
core even on a busy machine; wall-clock figures are printed beside it. The baseline,
measured in the same run, is the bare cost of writing the same images and masks with
tifffile (what any generator must pay), so the ratio says how much rendering adds to I/O.

Run::

    python benchmarks/bench_synth.py [--fields 200] [--size 256] [--known-answers]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tifffile  # noqa: E402

from cellbg.synth import CLASSES, make_dataset, random_stain, synth_field  # noqa: E402

TARGET = 50.0  # fields of view per second per core (issue 3)


def timed(fn):
    """Run ``fn`` and return (result, cpu_seconds, wall_seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def render(n: int, size: int, mode: str) -> list:
    stain = random_stain(0)
    return [
        synth_field(CLASSES[i % 2], n_cells=6, size=size, cue_probability=0.5, mode=mode, stain=stain, seed=i)
        for i in range(n)
    ]


def write_only(fields, folder: Path) -> None:
    for i, f in enumerate(fields):
        tifffile.imwrite(
            folder / f"i{i}.tif", f.image, photometric="rgb" if f.image.ndim == 3 else "minisblack", metadata=None
        )
        tifffile.imwrite(folder / f"m{i}.tif", f.mask, photometric="minisblack", metadata=None)


def main(n: int = 200, size: int = 256) -> None:
    render(5, size, "rgb")  # warm up imports and caches
    print(f"synthetic fields of view, {size}x{size}, 6 cells each, {n} fields; target {TARGET:g}/s/core")
    render_cpu = {}
    for mode in ("rgb", "gray"):
        fields, cpu, wall = timed(lambda m=mode: render(n, size, m))
        render_cpu[mode] = cpu
        print(
            f"  render {mode:4s}: {n / cpu:7.1f} FOV/s/core (CPU)  {n / wall:7.1f} FOV/s (wall)"
            f"  -> {n / cpu / TARGET:.2f}x target"
        )
    fields = render(n, size, "rgb")
    with tempfile.TemporaryDirectory() as tmp:
        _, io_cpu, _ = timed(lambda: write_only(fields, Path(tmp)))
    print(
        f"  baseline, tifffile write of image + mask only: {n / io_cpu:7.1f} FOV/s/core; "
        f"rendering takes {render_cpu['rgb'] / io_cpu:.1f}x the time of writing"
    )
    with tempfile.TemporaryDirectory() as tmp:
        manifest, cpu, wall = timed(
            lambda: make_dataset(
                Path(tmp) / "d", patients=8, cells_per_patient=40 * 3, image_size=size, signal=0.8, seed=0
            )
        )
        k = len(manifest)
        print(
            f"  make_dataset end to end (render + write {k} images and masks): "
            f"{k / cpu:7.1f} FOV/s/core (CPU)  {k / wall:7.1f} FOV/s (wall)  -> {k / cpu / TARGET:.2f}x target"
        )
    # the same seed twice gives identical files
    with tempfile.TemporaryDirectory() as tmp:
        digests = []
        for name in ("a", "b"):
            make_dataset(Path(tmp) / name, patients=2, cells_per_patient=12, seed=3)
            digests.append({p.name: p.read_bytes() for p in sorted((Path(tmp) / name).rglob("*.tif"))})
        print(f"  same seed, identical bytes: {digests[0] == digests[1]}")


def known_answers(signals=(0.0, 0.25, 0.5, 0.75, 1.0), patients: int = 24, seed: int = 11) -> None:
    """Held-out AUCs of background-only and morphology-only features over signal strengths.

    Uses the feature extraction and classifier of ``tests/test_synth.py`` (the known-answer
    tests), on ``patients`` patients x 60 cells per signal strength.
    """
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_synth import BACKGROUND, MORPHOLOGY, cell_features, held_out_auc

    print(f"known answers: {patients} patients x 60 cells, seed {seed}; held-out (2-fold patient) AUC")
    print("  signal  background  morphology  size-only  cue-share")
    with tempfile.TemporaryDirectory() as tmp:
        for signal in signals:
            d = Path(tmp) / f"s{signal}"
            make_dataset(d, patients=patients, cells_per_patient=60, cells_per_image=6, signal=signal, seed=seed)
            f = cell_features(d)
            print(
                f"  {signal:6.2f}  {held_out_auc(f, BACKGROUND):10.3f}  "
                f"{held_out_auc(f, MORPHOLOGY):10.3f}  {held_out_auc(f, ['log_area']):9.3f}"
                f"  {f['cue'].mean():9.2f}"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--known-answers", action="store_true", help="also print held-out AUCs over signal strengths (about a minute)"
    )
    args = parser.parse_args()
    main(args.fields, args.size)
    if args.known_answers:
        known_answers()
