"""Known answers for the two planted cues: co-occurring objects against the halo.

``cellbg synth`` plants two independent background cues: a class-specific halo around the
cell (``signal``) and non-target objects (platelet clumps) beside cells of one class
(``cooccurrence``). Two comparisons of a model trained on ``original`` separate them:

- the **no_others drop**: ``original:original`` vs ``original:no_others`` (the other
  segmented objects in the crop, here the labelled clumps, replaced by the fill). A model that
  uses the neighbours loses accuracy; one that uses the halo does not.
- the **halo BG-GAP**: ``original:no_others+mixed_rand`` vs ``original:no_others+mixed_same``
  (BG-GAP on crops whose other objects were removed first, partners included): it moves the
  halo between classes but no objects. A model that uses the halo loses accuracy on
  ``mixed_rand``; one that uses the neighbours does not.

Scenarios (for each seed the real pipeline runs through ``cellbg run`` on a fresh synthetic
dataset; the data, split and training seeds all equal the seed):

- ``cooccurrence``: ``signal 0, cooccurrence P``: the no_others drop is the power, a
  halo-BG-GAP rejection is a false positive;
- ``halo``: ``signal S, cooccurrence 0``: the halo BG-GAP is the power, a no_others
  rejection is a false positive.

Both comparisons are the protocol's confirmatory family (Holm over the two, patient-level
tests as ``cellbg stats`` makes them; alpha 0.05). Prints one line per run and, per scenario,
the rejection rates with exact (Clopper-Pearson) 95% intervals, the mean estimates and their
standard errors.

Run (2 to 14 minutes per seed and scenario on 2 heavily shared cores)::

    .venv/bin/python benchmarks/validate_cooccurrence.py --seeds 5 --out /tmp/cooc

Runs are kept under ``--out`` (one folder per scenario and seed), so an interrupted call
resumes with ``cellbg run``'s cache.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from statsmodels.stats.proportion import proportion_confint

#: The comparisons counted: (key, label, a, b).
COMPARISONS = [
    ("no_others_drop", "no_others drop", "original:original", "original:no_others"),
    ("halo_bg_gap", "halo BG-GAP", "original:no_others+mixed_rand", "original:no_others+mixed_same"),
]


def base_protocol(out: Path, seed: int, *, signal: float, cooccurrence: float, patients: int, epochs: int) -> dict:
    """A small synthetic study: one model trained on original, tested on the separating variants."""
    return {
        "name": f"cooccurrence-s{signal:g}-c{cooccurrence:g}-seed{seed}",
        "output": str(out / "run"),
        "seed": seed,
        "data": {
            "source": "synthetic",
            "synthetic": {
                "patients": patients,
                "cells_per_patient": 40,
                "cells_per_image": 8,
                "signal": signal,
                "cooccurrence": cooccurrence,
                "cooccurrence_class": "sezary",
                "seed": seed,
            },
        },
        "segmentation": {"method": "masks"},
        "crops": {"size": 64},
        "variants": {
            "train": ["original"],
            "test": ["original", "no_others", "no_others+mixed_same", "no_others+mixed_rand"],
            "fill": "noise",
            "others_fill": "inpaint",
        },
        "models": [{"arch": "resnet", "depth": 10, "width": 0.125}],
        "training": {
            "epochs": epochs,
            "batch_size": 16,
            "lr": 0.002,
            "seeds": [0],
            "split": {"kind": "kfold", "folds": 3},
            "max_folds": 3,
        },
        "saliency": {"enabled": False},
        "stats": {
            "confirmatory": [{"a": a, "b": b} for _, _, a, b in COMPARISONS],
            "exploratory": False,
            "bootstrap": 500,
        },
        "report": {"formats": ["md"], "figures": False},
    }


def outcomes(tests: pd.DataFrame) -> dict:
    """Rejected (Holm, confirmatory), estimate and adjusted p of each counted comparison."""
    primary = tests[(tests["role"] == "primary") & (tests["family"] == "confirmatory")]
    alpha = float(primary["alpha"].iloc[0])
    out = {}
    for key, _, a, b in COMPARISONS:
        row = primary[(primary["a"] == a) & (primary["b"] == b)].iloc[0]
        out[key] = bool(row["p_holm"] < alpha)
        out[f"{key}_estimate"] = float(row["estimate"])
        out[f"{key}_p"] = float(row["p_holm"])
    return out


def interval(hits: int, n: int) -> str:
    lo, hi = proportion_confint(hits, n, alpha=0.05, method="beta")
    return f"{hits}/{n} = {hits / n:.0%} (95% CI {lo:.0%} .. {hi:.0%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds first .. first + N - 1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--scenarios", default="cooccurrence,halo")
    ap.add_argument("--cooccurrence", type=float, default=0.8, help="P of the co-occurrence scenario")
    ap.add_argument("--signal", type=float, default=0.9, help="S of the halo scenario")
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", type=Path, required=True, help="folder for the runs (kept)")
    args = ap.parse_args()
    cellbg = [sys.executable, "-m", "cellbg.cli"]
    power = {"cooccurrence": "no_others_drop", "halo": "halo_bg_gap"}
    rows = []
    print(f"{'scenario':>12} {'seed':>4} {'s':>5}" + "".join(f" {k:>16} {'p':>6}" for k, *_ in COMPARISONS))
    for scenario in args.scenarios.split(","):
        if scenario not in power:
            sys.exit(f"unknown scenario {scenario!r}; use cooccurrence and/or halo")
        cues = (
            {"signal": 0.0, "cooccurrence": args.cooccurrence}
            if scenario == "cooccurrence"
            else {"signal": args.signal, "cooccurrence": 0.0}
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            folder = args.out / scenario / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            protocol = folder / "protocol.yaml"
            protocol.write_text(
                yaml.safe_dump(
                    base_protocol(folder, seed, patients=args.patients, epochs=args.epochs, **cues), sort_keys=False
                )
            )
            t0 = time.perf_counter()
            done = subprocess.run([*cellbg, "run", str(protocol)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(
                    f"{scenario} seed {seed}: cellbg run failed ({done.returncode}):\n"
                    f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
                )
            r = outcomes(pd.read_csv(folder / "run" / "stats" / "tests.csv"))
            rows.append({"scenario": scenario, "seed": seed, **cues, **r})
            print(
                f"{scenario:>12} {seed:4d} {time.perf_counter() - t0:5.0f}"
                + "".join(f" {r[k + '_estimate']:16.3f} {r[k + '_p']:6.3f}" for k, *_ in COMPARISONS),
                flush=True,
            )
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "summary.csv", index=False)
    print(
        f"\n{args.patients} patients x 40 cells per run; Holm over the two confirmatory comparisons, alpha 0.05;"
        " estimates: accuracy b - a"
    )
    for scenario, sub in table.groupby("scenario", sort=False):
        for key, label, _, _ in COMPARISONS:
            kind = "power" if key == power[scenario] else "false-positive rate"
            est = sub[f"{key}_estimate"]
            print(
                f"  {scenario:>12}: {label:>15} {kind:>19}: {interval(int(sub[key].sum()), len(sub))}; "
                f"estimate {100 * est.mean():+.1f} points (SE {100 * est.std() / len(sub) ** 0.5:.1f})"
            )


if __name__ == "__main__":
    main()
