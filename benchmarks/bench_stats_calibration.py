"""Calibration of the primary test under a true null (issue 7: 3.5% .. 6.5% at alpha 0.05).

Simulation (``cellbg.stats.simulate_paired_correctness``): 10 patients x 50 cells; on the
logit scale a patient random effect (SD 1), a cell effect shared by both conditions (SD 1)
and a patient-specific condition effect of mean 0 and SD 0.5, split symmetrically between
the two conditions so that the accuracy difference is exactly 0 on average. For each run the
primary test (paired t on per-patient accuracies, df 9) and, beside it, cell-level McNemar
(the baseline: it ignores patients) are computed through cellbg's own functions; the
Wilcoxon check and the GEE alternative on a subset. Then the power with a true effect.

Run::

    .venv/bin/python benchmarks/bench_stats_calibration.py [--runs 2000] [--gee-runs 200] \\
        [--wilcoxon-runs 200] [--effects 0.5,1.0]

The binomial SE of a rejection rate near 5% over R runs is sqrt(0.05 * 0.95 / R): 0.49% at
R = 2000, so the 3.5% .. 6.5% band is about 3 SE wide on each side.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
import pandas as pd

from cellbg.stats import (
    gee_test,
    mcnemar_test,
    paired_t_test,
    paired_table,
    patient_bootstrap,
    simulate_paired_correctness,
    wilcoxon_test,
)


def rejection_rates(a, b, *, alpha: float, gee_runs: int = 0, wilcoxon_runs: int = 0) -> dict[str, float]:
    runs, patients, cells = a.shape
    acc_a, acc_b = a.mean(2), b.mean(2)
    p_t = np.array([paired_t_test(acc_a[i], acc_b[i]).pvalue for i in range(runs)])
    p_mc = np.array([mcnemar_test(paired_table(a[i], b[i])).pvalue for i in range(runs)])
    out = {"paired t (patients), primary": np.mean(p_t < alpha), "McNemar (cells)": np.mean(p_mc < alpha)}
    if wilcoxon_runs:
        # scipy's exact permutation p-value with tied accuracies costs ~0.2 s a call: a subset.
        n = min(wilcoxon_runs, runs)
        p_w = np.array([wilcoxon_test(acc_a[i], acc_b[i]).pvalue for i in range(n)])
        out[f"Wilcoxon (patients, {n} runs)"] = np.mean(p_w < alpha)
    if wilcoxon_runs:
        n = min(wilcoxon_runs, runs)
        p_b = np.array([patient_bootstrap(acc_b[i] - acc_a[i], n_resamples=999, seed=i).pvalue for i in range(n)])
        out[f"bootstrap-t (patients, B=999, {n} runs)"] = np.mean(p_b < alpha)
    if gee_runs:
        pid = np.repeat(np.arange(patients), cells)
        p_g = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(min(gee_runs, runs)):
                paired = pd.DataFrame(
                    {
                        "patient_id": pid,
                        "cell_id": np.arange(pid.size),
                        "seed": 0,
                        "correct_a": a[i].ravel(),
                        "correct_b": b[i].ravel(),
                    }
                )
                p_g.append(gee_test(paired).pvalue)
        out[f"GEE bias-reduced, t ref ({len(p_g)} runs)"] = np.nanmean(np.array(p_g) < alpha)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--gee-runs", type=int, default=200)
    parser.add_argument("--wilcoxon-runs", type=int, default=200)
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--effects", default="0.5,1.0", help="true mean condition effects (logit) for power")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    t0 = time.perf_counter()
    a, b = simulate_paired_correctness(args.patients, args.cells, runs=args.runs, effect_sd=0.5, seed=args.seed)
    null = rejection_rates(a, b, alpha=args.alpha, gee_runs=args.gee_runs, wilcoxon_runs=args.wilcoxon_runs)
    se = math.sqrt(args.alpha * (1 - args.alpha) / args.runs)
    print(
        f"null: {args.runs} runs of {args.patients} patients x {args.cells} cells, "
        f"patient-specific effect mean 0, SD 0.5 (logit); alpha {args.alpha}; binomial SE {100 * se:.2f}%"
    )
    for name, rate in null.items():
        print(f"  {name:<40s} rejects {100 * rate:5.1f}%   (ratio to alpha {rate / args.alpha:.2f})")
    primary = null["paired t (patients), primary"]
    print(f"  primary within 3.5% .. 6.5%: {'yes' if 0.035 <= primary <= 0.065 else 'NO'}")

    for k, effect in enumerate(float(e) for e in args.effects.split(",")):
        a1, b1 = simulate_paired_correctness(
            args.patients, args.cells, runs=args.runs, effect_mean=effect, effect_sd=0.5, seed=args.seed + 1 + k
        )
        alt = rejection_rates(a1, b1, alpha=args.alpha)
        true_diff = b1.mean() - a1.mean()
        print(f"power: true mean effect {effect} on the logit scale (accuracy difference about {true_diff:.3f})")
        for name, rate in alt.items():
            print(f"  {name:<40s} rejects {100 * rate:5.1f}%")
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
