"""Images -> segmentation -> crops throughput, with the threshold backend.

Makes ``--fovs`` synthetic fields of view (not timed), then times ``run_crops`` (threshold
segmentation of every image + crops + the cell table + the zarr store, in parallel over
images). Prints cells/s and two same-run baselines:

* crop step: the vectorised ``crop_cells`` against the naive per-cell loop
  (``crop_cells_naive``: one regionprops object, one ``np.pad`` and one slice per cell) on
  a subset of the images;
* segmentation quality: mean F1@0.5 of the threshold backend against plain Otsu +
  connected components, both against the exact synthetic masks.

Target (issue 4): 1,000 fields of view in under 2 minutes on the 2-core dev machine.

    .venv/bin/python benchmarks/bench_crops.py            # 1,000 FOVs
    .venv/bin/python benchmarks/bench_crops.py --fovs 100 # quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fovs", type=int, default=1000, help="fields of view")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--subset", type=int, default=100, help="images for the baselines")
    parser.add_argument("--size", type=int, default=64, help="crop side")
    args = parser.parse_args()

    from cellbg.crops import crop_cells, crop_cells_naive, run_crops
    from cellbg.data import read_image, read_mask
    from cellbg.protocol import parse_protocol
    from cellbg.segment import evaluate, otsu_components, segment_threshold

    patients = 10
    per_image = 6
    with tempfile.TemporaryDirectory(prefix="bench_crops_") as tmp:
        root = Path(tmp)
        workers = "null" if args.workers is None else args.workers
        per_patient = args.fovs * per_image // patients
        text = f"""
name: bench
output: run
data:
  source: synthetic
  synthetic: {{patients: {patients}, cells_per_patient: {per_patient}, cells_per_image: {per_image}}}
segmentation: {{method: threshold, workers: {workers}}}
crops: {{size: {args.size}, workers: {workers}}}
"""
        protocol = parse_protocol(text, base_dir=root)
        from cellbg.data import discover

        t0 = time.perf_counter()
        table = discover(protocol)  # writes the synthetic dataset (not timed below)
        print(f"made {len(table)} synthetic FOVs in {time.perf_counter() - t0:.1f} s (not timed)")

        t0 = time.perf_counter()
        cells = run_crops(protocol, table)
        elapsed = time.perf_counter() - t0
        print(
            f"run_crops: {len(table)} FOVs -> {len(cells)} cells in {elapsed:.1f} s "
            f"= {len(cells) / elapsed:.0f} cells/s, {len(table) / elapsed:.1f} FOVs/s "
            f"(target: 1,000 FOVs < 120 s) {'PASS' if elapsed * 1000 / len(table) < 120 else 'FAIL'}"
        )

        # Same-run baselines on a subset, in this process.
        subset = table.iloc[: args.subset]
        images = [read_image(p) for p in subset["path"]]
        labels = [read_mask(Path(protocol.run_dir) / "segmentation" / f"{i}.tif") for i in subset["image_id"]]
        t0 = time.perf_counter()
        n_fast = sum(
            len(crop_cells(im, lab, size=args.size, exclude_border=False, min_area=0).table)
            for im, lab in zip(images, labels, strict=True)
        )
        fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_slow = sum(len(crop_cells_naive(im, lab, size=args.size)[0]) for im, lab in zip(images, labels, strict=True))
        slow = time.perf_counter() - t0
        assert n_fast == n_slow
        print(
            f"crop step on {len(subset)} FOVs ({n_fast} cells): vectorised {n_fast / fast:.0f} cells/s, "
            f"naive per-cell loop {n_slow / slow:.0f} cells/s, ratio {slow / fast:.1f}x"
        )

        truths = [read_mask(p) for p in subset["mask_path"]]
        f1_ours = np.mean([evaluate(lab, t).f1 for lab, t in zip(labels, truths, strict=True)])
        t0 = time.perf_counter()
        for im in images[:10]:
            segment_threshold(im)
        seg_rate = 10 / (time.perf_counter() - t0)
        f1_otsu = np.mean(
            [evaluate(otsu_components(im.mean(axis=0)), t).f1 for im, t in zip(images, truths, strict=True)]
        )
        print(
            f"segmentation on {len(subset)} FOVs: threshold backend mean F1@0.5 {f1_ours:.3f} "
            f"(target >= 0.90), plain Otsu + components {f1_otsu:.3f}; {seg_rate:.1f} FOVs/s per process"
        )


if __name__ == "__main__":
    main()
