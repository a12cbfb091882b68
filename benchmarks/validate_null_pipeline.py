"""The whole pipeline's false-positive rate (and power), through ``cellbg run``, many seeds.

``bench_stats_calibration.py`` checks the statistical tests alone on simulated correctness
tables. This script checks what a user gets: for each seed it writes a copy of a protocol
(default: the quickstart) with the synthetic background cue set to ``--signal`` and the data,
split and training seeds all set to that seed, runs the real pipeline (``cellbg run``:
synthetic data, crops, variants, training, predictions, stats; saliency and the report are
switched off to save time), and reads ``stats/tests.csv``. At ``--signal 0`` there is no
background information to find, so every rejection is a false positive; at the protocol's
own signal the rejections are the power.

Counted per seed (alpha = the protocol's ``stats.alpha``), each from the primary test of the
confirmatory family (Holm) when the protocol made the comparison confirmatory, else from the
exploratory family (BH):

- original:original vs original:only_fg: how much the original-trained model loses when its
  background is replaced by the fill (dependence on the background);
- BG-GAP (original:mixed_rand vs original:mixed_same): whether it uses class information
  in the background (the default confirmatory comparison when both mixed variants are
  tested);
- BG-GAP of the only_fg-trained model: a negative control (it never saw a background);
- original:original vs only_fg:only_fg: a model that never sees a background against one
  that does, each on its own kind of image.

The other exploratory comparisons (e.g. original vs no_fg, where the cell itself is removed)
lose real information at any signal, so they are not null tests and are not counted.

Run (about 45 s per seed on 2 cores)::

    .venv/bin/python benchmarks/validate_null_pipeline.py --seeds 20 --signal 0 --out /tmp/null
    .venv/bin/python benchmarks/validate_null_pipeline.py --seeds 10 --signal 0.9 --out /tmp/power
    .venv/bin/python benchmarks/validate_null_pipeline.py --seeds 15 --signal 0 --out /tmp/null16 \
        --set data.synthetic.patients=16

The protocol is copied into ``--out``, so relative data paths in it would not resolve: use a
protocol with synthetic data (or absolute paths). Runs are kept under ``--out`` (one folder
per seed), so an interrupted call resumes with ``cellbg run``'s cache. Prints one line per seed and the
rejection rates with exact (Clopper-Pearson) 95% intervals.
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


#: What is counted: (key, label, a, b). Each comparison is read from the confirmatory family
#: (Holm) when the protocol made it confirmatory, else from the exploratory family (BH).
COMPARISONS = [
    ("only_fg_drop", "original:original vs original:only_fg", "original:original", "original:only_fg"),
    ("bg_gap", "BG-GAP, original-trained", "original:mixed_rand", "original:mixed_same"),
    ("bg_gap_only_fg", "BG-GAP, only_fg-trained", "only_fg:mixed_rand", "only_fg:mixed_same"),
    ("fg_trained", "original:original vs only_fg:only_fg", "original:original", "only_fg:only_fg"),
]


def rejections(tests: pd.DataFrame) -> dict[str, float]:
    """The per-seed outcomes read from ``stats/tests.csv``: rejected, tested, estimate, p."""
    primary = tests[tests["role"] == "primary"]
    alpha = float(primary["alpha"].iloc[0])
    out: dict[str, float] = {}
    for key, _, a, b in COMPARISONS:
        rows = primary[(primary["a"] == a) & (primary["b"] == b)]
        confirmatory = rows[rows["family"] == "confirmatory"]
        rows, p_column = (
            (confirmatory, "p_holm") if len(confirmatory) else (rows[rows["family"] == "exploratory"], "p_bh")
        )
        out[key] = int((rows[p_column] < alpha).sum())
        out[f"{key}_n"] = len(rows)
        out[f"{key}_estimate"] = float(rows["estimate"].mean()) if len(rows) else float("nan")
        out[f"{key}_p"] = float(rows[p_column].min()) if len(rows) else float("nan")
        out[f"{key}_adjusted"] = "Holm, confirmatory" if p_column == "p_holm" else "BH, exploratory"
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
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="also set a protocol key, e.g. data.synthetic.cells_per_image=1 (repeatable)",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cellbg = [str(Path(sys.executable).parent / "cellbg")]  # the installed CLI, as a user runs it
    rows = []
    print(
        f"{args.protocol.name} {' '.join(args.overrides)} at signal {args.signal:g}, seeds {args.first_seed}.."
        f"{args.first_seed + args.seeds - 1}; runs in {args.out}",
        flush=True,
    )
    print(f"{'seed':>4} {'s':>5}" + "".join(f" {k[:14]:>14} {'p':>6}" for k, *_ in COMPARISONS))
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        protocol = write_protocol(args.protocol, args.out, seed, args.signal, args.overrides)
        t0 = time.perf_counter()
        done = subprocess.run([*cellbg, "run", str(protocol)], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"seed {seed}: cellbg run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        r = rejections(pd.read_csv(args.out / f"seed{seed}" / "run" / "stats" / "tests.csv"))
        r["seed"] = seed
        rows.append(r)
        print(
            f"{seed:4d} {time.perf_counter() - t0:5.0f}"
            + "".join(f" {r[k + '_estimate']:14.3f} {r[k + '_p']:6.3f}" for k, *_ in COMPARISONS),
            flush=True,
        )
    table = pd.DataFrame(rows)
    print(f"\nsignal {args.signal:g}, {len(table)} seeds (estimates: accuracy difference b - a, mean over seeds):")
    for key, label, _, _ in COMPARISONS:
        if table[f"{key}_n"].sum():
            adjusted = ", ".join(sorted(set(table[f"{key}_adjusted"])))
            print(
                f"  {label} ({adjusted}): rejected "
                f"{interval(int(table[key].sum()), int(table[f'{key}_n'].sum()))}; "
                f"estimate {100 * table[f'{key}_estimate'].mean():+.1f} points "
                f"(SE {100 * table[f'{key}_estimate'].std() / len(table) ** 0.5:.1f})"
            )
    table.to_csv(args.out / f"summary_signal{args.signal:g}.csv", index=False)


if __name__ == "__main__":
    main()
