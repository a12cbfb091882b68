"""Patient cluster bootstrap speed (issue 7: 10,000 resamples on 1,000,000 rows, 200 patients, <= 2 s).

The bootstrap resamples per-patient sums, never rows: the rows are reduced once to 200
per-patient sums (``cellbg.stats.cluster_sums``, one ``np.unique`` + ``np.bincount``), then
each resample draws 200 patient indices. Baseline measured in the same run: the naive
row-level cluster bootstrap (concatenate the rows of the drawn patients, then average), timed
on a few resamples and scaled to the same count.

Run::

    .venv/bin/python benchmarks/bench_bootstrap.py [--rows 1000000] [--patients 200] [--resamples 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cellbg.stats import cluster_sums, patient_bootstrap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--baseline-resamples", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    patient = np.sort(rng.integers(0, args.patients, args.rows))  # prediction rows grouped by patient
    patient_ids = np.char.add("P", patient.astype(str))
    correct_a = rng.random(args.rows) < 0.80
    correct_b = rng.random(args.rows) < 0.78
    diff = correct_b.astype(float) - correct_a.astype(float)

    t0 = time.perf_counter()
    sums, counts, labels = cluster_sums(diff, patient_ids)
    t1 = time.perf_counter()
    result = patient_bootstrap(sums, counts, n_resamples=args.resamples, seed=0)
    t2 = time.perf_counter()
    fast = t2 - t0

    # Baseline: resample rows patient by patient.
    rows_of = [diff[patient == k] for k in range(args.patients)]
    draws = np.random.default_rng(1).integers(0, args.patients, (args.baseline_resamples, args.patients))
    t3 = time.perf_counter()
    for draw in draws:
        np.concatenate([rows_of[k] for k in draw]).mean()
    naive = (time.perf_counter() - t3) / args.baseline_resamples * args.resamples

    print(f"{args.rows:,} rows, {labels.size} patients, {args.resamples:,} bootstrap-t resamples")
    print(f"  per-patient sums:          {t1 - t0:.3f} s")
    print(f"  resampling (bootstrap-t):  {t2 - t1:.3f} s")
    print(f"  total:                     {fast:.3f} s  (target <= 2 s: {'met' if fast <= 2 else 'NOT met'})")
    print(f"  naive row resampling:      {naive:.1f} s (from {args.baseline_resamples} resamples, scaled)")
    print(f"  speed-up vs naive:         {naive / fast:.0f}x")
    print(f"  estimate {result.estimate:.4f}, 95% CI [{result.ci_low:.4f}, {result.ci_high:.4f}]")


if __name__ == "__main__":
    main()
