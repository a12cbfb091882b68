"""The detection study's known answers on synthetic fields, over dataset seeds.

With a strong planted co-occurrence (a dark clump next to every cell of one class), the
reliance test (the correlated structure removed at test time) must drop that class's recall;
with no co-occurrence (clumps placed next to cells of both classes alike) it must not, and the
share of null runs in which it is significant is the test's false-positive rate.

    python benchmarks/validate_detect.py --seeds 0 1 2 --cooccurrence 1.0
    python benchmarks/validate_detect.py --seeds 0 1 2 --cooccurrence 0.0

Each dataset seed is one whole study (``cellbg.detect.train.run_detection``) in a temporary
run folder; the script prints the tests of every seed and the rejection counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile


def plant_clumps(root: Path, *, cls: str = "sezary", p_cls: float = 1.0, p_other: float = 0.0, seed: int = 0) -> None:
    """Paint a dark clump next to cells (probability p_cls for ``cls``, p_other for the rest); write its masks."""
    rng = np.random.default_rng(seed)
    truth = pd.read_csv(root / "cells_truth.csv")
    (root / "clumps").mkdir(exist_ok=True)
    for path, cells in truth.groupby("path"):
        img = tifffile.imread(root / path).astype(np.float32)
        mask = tifffile.imread(root / cells["mask"].iloc[0])
        lab = np.zeros(mask.shape, np.uint16)
        yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
        k = 0
        for c in cells.itertuples():
            if rng.random() >= (p_cls if c.label == cls else p_other):
                continue
            a = rng.uniform(0, 2 * np.pi)
            d = c.cell_radius + 7
            r0, c0 = c.centre_r + d * np.sin(a), c.centre_c + d * np.cos(a)
            disc = ((yy - r0) ** 2 + (xx - c0) ** 2 <= 5.5**2) & (mask == 0)
            k += 1
            lab[disc] = k
            img[disc] = img[disc] * np.array([0.35, 0.2, 0.45])
        tifffile.imwrite(root / path, np.clip(img, 0, 255).astype(np.uint8), photometric="rgb")
        tifffile.imwrite(root / "clumps" / Path(path).name, lab)


def one_run(seed: int, args, folder: Path) -> pd.DataFrame:
    from cellbg.detect.train import run_detection
    from cellbg.protocol import parse_protocol
    from cellbg.synth import make_dataset

    data = folder / "data"
    make_dataset(
        data,
        patients=args.patients,
        cells_per_patient=args.cells,
        cells_per_image=4,
        image_size=128,
        signal=0.0,
        seed=seed,
    )
    if args.cooccurrence > 0:
        plant_clumps(data, p_cls=args.cooccurrence, p_other=0.0, seed=seed)
    else:  # the null: clumps next to cells of both classes alike
        plant_clumps(data, p_cls=args.null_rate, p_other=args.null_rate, seed=seed)
    text = f"""
name: validate-detect
output: {folder}/run
data: {{source: manifest, manifest: {data}/manifest.csv}}
training: {{split: {{folds: {args.folds}, val_fraction: 0.0}}}}
detection:
  enabled: true
  correlated: {{source: masks, mask_dir: {data}/clumps, name: clump}}
  detector: {{depth: 10, fpn_channels: 32, representation_size: 128}}
  epochs: {args.epochs}
  batch_size: 4
  seeds: [0]
  max_folds: {"null" if args.max_folds is None else args.max_folds}
"""
    protocol = parse_protocol(text)
    t0 = time.time()
    tests = run_detection(protocol)
    tests.insert(0, "data_seed", seed)
    ap = pd.read_csv(folder / "run" / "detect" / "ap.csv")
    print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    print(ap.groupby(["condition", "test_variant", "class"])[["ap50", "ap"]].mean().round(3).to_string(), flush=True)
    return tests


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cooccurrence", type=float, default=1.0, help="clump probability next to sezary cells; 0 = null")
    ap.add_argument("--null-rate", type=float, default=0.5, help="null runs: clump probability next to any cell")
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--cells", type=int, default=16, help="cells per patient")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--max-folds", type=int, default=None, help="train and test only the first N folds")
    ap.add_argument("--out", type=Path, default=None, help="write all tests to this CSV")
    args = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(one_run(seed, args, Path(tmp)))
            cols = ["family", "condition", "class", "measure", "mean_a", "mean_b", "estimate", "pvalue", "p_holm"]
            print(rows[-1][cols].round(4).to_string(index=False), flush=True)
    tests = pd.concat(rows, ignore_index=True)
    if args.out is not None:
        tests.to_csv(args.out, index=False)
    rel = tests[(tests["family"] == "reliance") & (tests["measure"] == "recall")]
    rel = rel.assign(rejected=rel["pvalue"] < 0.05, drop=(rel["pvalue"] < 0.05) & (rel["estimate"] < 0))
    summary = rel.groupby(["condition", "class"]).agg(
        runs=("rejected", "size"),
        rejected=("rejected", "sum"),
        significant_drops=("drop", "sum"),
        mean_change=("estimate", "mean"),
    )
    kind = "strong co-occurrence" if args.cooccurrence > 0 else "no co-occurrence (null)"
    print(f"\nreliance test (recall, original vs no_correlated, patient-level paired t, alpha 0.05), {kind}:")
    print(summary.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
