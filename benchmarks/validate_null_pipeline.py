"""The whole pipeline's false-positive rate (and power), through ``cellbg run``, many seeds.

``bench_stats_calibration.py`` checks the statistical tests alone on simulated correctness
tables. This script checks what a user gets: for each seed it writes a copy of a protocol
(default: the quickstart) with the synthetic background cue set to ``--signal`` and the data,
split and training seeds all set to that seed, runs the real pipeline (``cellbg run``:
synthetic data, crops, variants, training, predictions, stats; saliency and the report are
switched off to save time), and reads ``stats/tests.csv``. At ``--signal 0`` there is no
background information to find, so every rejection is a false positive; at the protocol's
own signal the rejections are the power.

Counted per seed (alpha = the protocol's ``stats.alpha``):

- ``confirmatory``: the primary test of each confirmatory comparison (default
  original:original vs original:only_fg), Holm-adjusted within its family;
- ``bg_gap``: the primary test of BG-GAP (mixed_rand vs mixed_same) for each trained
  model, BH-adjusted within the exploratory family;
- ``fg_trained``: original:original vs only_fg:only_fg (a model that never sees a
  background against one that does, each on its own kind of image; BH), the comparison
  that asks whether the background adds information rather than whether removing it
  disturbs a model trained with it.

The other exploratory comparisons (e.g. original vs no_fg, where the cell itself is removed)
lose real information at any signal, so they are not null tests and are not counted.

Run (about 25 s per seed on 2 cores)::

    .venv/bin/python benchmarks/validate_null_pipeline.py --seeds 20 --signal 0 --out /tmp/null
    .venv/bin/python benchmarks/validate_null_pipeline.py --seeds 5 --signal 0.9 --out /tmp/power

The protocol is copied into ``--out``, so relative data paths in it would not resolve: use a
protocol with synthetic data (or absolute paths). Runs are kept under ``--out`` (one folder per seed), so an interrupted call resumes with
``cellbg run``'s cache. Prints one line per seed and the rejection rates with exact
(Clopper-Pearson) 95% intervals.
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

ROOT = Path(__file__).resolve().parents[1]


def write_protocol(base: Path, out_dir: Path, seed: int, signal: float, overrides=()) -> Path:
    """A copy of ``base`` for one seed: cue strength, seeds and output folder replaced."""
    p = yaml.safe_load(base.read_text())
    for item in overrides:  # "a.b.c=VALUE", VALUE read as YAML
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = p
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    p["name"] = f"{p.get('name', 'run')}-signal{signal:g}-seed{seed}"
    p["output"] = str(out_dir / f"seed{seed}" / "run")
    p["seed"] = seed
    synthetic = p.setdefault("data", {}).setdefault("synthetic", {})
    synthetic["signal"] = signal
    synthetic["seed"] = seed
    p.setdefault("saliency", {})["enabled"] = False
    p.setdefault("report", {}).update(formats=["md"], figures=False)
    path = out_dir / f"seed{seed}" / "protocol.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def _hits(rows: pd.DataFrame, p_column: str, alpha: float) -> tuple[int, int]:
    return int((rows[p_column] < alpha).sum()), len(rows)


def rejections(tests: pd.DataFrame) -> dict[str, float]:
    """The per-seed outcomes read from ``stats/tests.csv``: (rejected, tested) and estimates."""
    primary = tests[tests["role"] == "primary"]
    alpha = float(primary["alpha"].iloc[0])
    conf = primary[primary["family"] == "confirmatory"]
    expl = primary[primary["family"] == "exploratory"]
    gap = expl[expl["name"] == "BG-GAP (original)"]
    gap_fg = expl[expl["name"] == "BG-GAP (only_fg)"]
    fg_trained = expl[(expl["a"] == "original:original") & (expl["b"] == "only_fg:only_fg")]
    out = {}
    for key, rows, p_column in [("confirmatory", conf, "p_holm"), ("bg_gap", gap, "p_bh"),
                                ("bg_gap_only_fg", gap_fg, "p_bh"), ("fg_trained", fg_trained, "p_bh")]:
        out[key], out[f"{key}_n"] = _hits(rows, p_column, alpha)
        out[f"{key}_estimate"] = float(rows["estimate"].mean()) if len(rows) else float("nan")
        out[f"{key}_p"] = float(rows[p_column].min()) if len(rows) else float("nan")
    return out


def interval(hits: int, n: int) -> str:
    lo, hi = proportion_confint(hits, n, alpha=0.05, method="beta")
    return f"{hits}/{n} = {hits / n:.1%} (95% CI {lo:.1%} .. {hi:.1%})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--protocol", type=Path, default=ROOT / "protocols" / "quickstart.yaml")
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--signal", type=float, default=0.0, help="background cue strength (0 = none)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the per-seed runs (kept)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="also set a protocol key, e.g. data.synthetic.cells_per_image=1 (repeatable)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cellbg = [str(Path(sys.executable).parent / "cellbg")]  # the installed CLI, as a user runs it
    rows = []
    print(f"{args.protocol.name} {' '.join(args.overrides)} at signal {args.signal:g}, seeds {args.first_seed}.."
          f"{args.first_seed + args.seeds - 1}; runs in {args.out}", flush=True)
    print(f"{'seed':>4} {'s':>5} {'conf. drop':>10} {'p_holm':>8} {'BG-GAP':>8} {'p_bh':>8} {'BG-GAP(only_fg) rej.':>21} {'fg-trained':>10} {'rej.':>5}")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        protocol = write_protocol(args.protocol, args.out, seed, args.signal, args.overrides)
        t0 = time.perf_counter()
        done = subprocess.run([*cellbg, "run", str(protocol)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"seed {seed}: cellbg run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        r = rejections(pd.read_csv(args.out / f"seed{seed}" / "run" / "stats" / "tests.csv"))
        r["seed"] = seed
        rows.append(r)
        print(f"{seed:4d} {time.perf_counter() - t0:5.0f} {r['confirmatory_estimate']:10.3f} {r['confirmatory_p']:8.3f} "
              f"{r['bg_gap_estimate']:8.3f} {r['bg_gap_p']:8.3f} {r['bg_gap_only_fg']:21.0f} "
              f"{r['fg_trained_estimate']:10.3f} {r['fg_trained']:5.0f}", flush=True)
    table = pd.DataFrame(rows)
    print(f"\nsignal {args.signal:g}, {len(table)} seeds (the estimates are accuracy differences b - a):")
    for key, what in [("confirmatory", "confirmatory (Holm)"), ("bg_gap", "BG-GAP original (BH)"),
                      ("bg_gap_only_fg", "BG-GAP only_fg (BH)"),
                      ("fg_trained", "original:original vs only_fg:only_fg (BH)")]:
        if table[f"{key}_n"].sum():
            print(f"  {what} rejected: {interval(int(table[key].sum()), int(table[f'{key}_n'].sum()))}")
    print(f"  mean confirmatory estimate {table['confirmatory_estimate'].mean():+.3f}, "
          f"mean BG-GAP {table['bg_gap_estimate'].mean():+.3f}, mean only_fg-trained "
          f"{table['fg_trained_estimate'].mean():+.3f}")
    table.to_csv(args.out / f"summary_signal{args.signal:g}.csv", index=False)


if __name__ == "__main__":
    main()
