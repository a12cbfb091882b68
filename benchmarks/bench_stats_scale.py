"""`cellbg stats` on a ten-million-row predictions table: seconds and peak memory.

Issue 22's target: <= 30 s and <= 4 GB for 10 million rows. The table is synthetic, written
straight to parquet (no training): the shape of ``protocols/sezary.yaml`` on a 40k-cell
cohort, 3 models x 2 training variants x 8 test variants x 5 seeds, every cell tested once
per seed in a 5-fold patient-grouped split, 40 patients, 2 classes; correctness drawn from
``logit = 1.5 + patient effect (SD 0.7) + cell effect (SD 0.7) + condition effect``
(``only_fg`` -0.6, ``mixed_rand`` -0.4, ``no_fg`` and ``only_bg_*`` -1.5), with the
columns a real table has (``image_id``, ``pred``, class probabilities) so that reading only
the needed columns is measured too. The protocol plans sezary.yaml's three confirmatory
comparisons, the exploratory grid (every condition against ``original:original`` and BG-GAP)
and 2000 bootstrap resamples.

Each measurement is ``python -m cellbg.cli stats RUN`` in a fresh process: wall seconds and
the process's own peak RSS (:mod:`peak_memory`: not the driver's, which Linux would
otherwise carry into the child). The baseline is the cell-level implementation this
replaced (``cellbg/stats.py`` at commit 2323008, read with ``git show``: pandas pairing of
cell rows, statsmodels GEE on cell rows) on a smaller table of the same design, measured in
the same run, next to the current code on that smaller table.

    .venv/bin/python benchmarks/bench_stats_scale.py                 # 10M rows, baseline 240k
    .venv/bin/python benchmarks/bench_stats_scale.py --cells 4000 --baseline-cells 500 --folder
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak_memory import run_measured

ROOT = Path(__file__).resolve().parents[1]
BASELINE_COMMIT = "2323008"
MODELS = ["cellyolo", "resnet", "shufflenet_v2"]
TRAIN = ["original", "only_fg"]
TEST = ["original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand", "mixed_next"]
EFFECT = {"only_fg": -0.6, "mixed_rand": -0.4, "no_fg": -1.5, "only_bg_b": -1.5, "only_bg_t": -1.5}
SEEDS, FOLDS, PATIENTS = 5, 5, 40


def write_table(run: Path, cells: int, *, folder: bool, seed: int = 0) -> int:
    """Write the synthetic predictions of ``cells`` cells; return the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    patient = np.arange(cells) * PATIENTS // cells  # contiguous blocks of cells per patient
    label = rng.integers(0, 2, cells)
    u = rng.normal(0, 0.7, PATIENTS)[patient]
    e = rng.normal(0, 0.7, cells)
    fold = patient % FOLDS
    cell_names = pa.array([f"P{p:02d}-img{c // 8:05d}-{c:06d}" for c, p in enumerate(patient)])
    image_names = pa.array([f"P{p:02d}-img{c // 8:05d}" for c, p in enumerate(patient)])
    image_index = pa.array(np.arange(cells, dtype=np.int32))
    patients = pa.array([f"P{p:02d}" for p in range(PATIENTS)])
    classes = pa.array(["healthy", "sezary"])
    n_rows = 0
    part = 0
    target = run / ("predictions" if folder else "predictions.parquet")
    if folder:
        target.mkdir(parents=True)
    writer = None
    schema = None
    for m, model in enumerate(MODELS):
        for tr in TRAIN:
            for te in TEST:
                for s in range(SEEDS):
                    logit = 1.5 + u + e + EFFECT.get(te, 0.0) + rng.normal(0, 0.3, cells) + 0.1 * m
                    correct = rng.random(cells) < 1 / (1 + np.exp(-logit))
                    pred = np.where(correct, label, 1 - label)
                    p1 = np.where(pred == 1, 0.8, 0.2).astype(np.float32)
                    idx = np.arange(cells, dtype=np.int32)
                    table = pa.table(
                        {
                            "cell_id": pa.DictionaryArray.from_arrays(idx, cell_names),
                            "image_id": pa.DictionaryArray.from_arrays(image_index, image_names),
                            "patient_id": pa.DictionaryArray.from_arrays(patient.astype(np.int32), patients),
                            "label": pa.DictionaryArray.from_arrays(label.astype(np.int32), classes),
                            "model": pa.DictionaryArray.from_arrays(np.zeros(cells, np.int32), pa.array([model])),
                            "train_variant": pa.DictionaryArray.from_arrays(np.zeros(cells, np.int32), pa.array([tr])),
                            "test_variant": pa.DictionaryArray.from_arrays(np.zeros(cells, np.int32), pa.array([te])),
                            "seed": np.full(cells, s, np.int64),
                            "fold": fold.astype(np.int64),
                            "pred": pa.DictionaryArray.from_arrays(pred.astype(np.int32), classes),
                            "correct": correct,
                            "prob_healthy": 1 - p1,
                            "prob_sezary": p1,
                        }
                    )
                    if folder:
                        pq.write_table(table, target / f"part-{part:04d}.parquet")
                    else:
                        if writer is None:
                            schema = table.schema
                            writer = pq.ParquetWriter(target, schema)
                        writer.write_table(table.cast(schema))
                    part += 1
                    n_rows += cells
    if writer is not None:
        writer.close()
    return n_rows


def write_protocol(run: Path) -> None:
    from cellbg.protocol import Protocol, write_resolved

    p = Protocol.model_validate(
        {
            "name": "bench-stats-scale",
            "output": str(run),
            "models": [
                {"arch": "cellyolo", "label": "cellyolo"},
                {"arch": "resnet", "depth": 18, "label": "resnet"},
                {"arch": "shufflenet_v2", "label": "shufflenet_v2"},
            ],
            "variants": {"train": TRAIN, "test": TEST},
            "training": {"seeds": list(range(SEEDS)), "split": {"kind": "kfold", "folds": FOLDS}},
            "stats": {
                "bootstrap": 2000,
                "exploratory": True,
                "confirmatory": [
                    {"a": "original:original", "b": "original:only_fg"},
                    {"a": "original:original", "b": "only_fg:only_fg"},
                    {"a": "original:mixed_rand", "b": "original:mixed_same"},
                ],
            },
        }
    )
    run.mkdir(parents=True, exist_ok=True)
    write_resolved(p)


def measure(cmd: list[str], env: dict) -> tuple[float, float, int, float, float]:
    """Wall seconds, peak RSS (GB), exit code, CPU seconds (user + system) and the 1-minute
    load average at the end, of a child process (its own peak: :mod:`peak_memory`)."""
    m = run_measured(cmd, env=env)
    if m.returncode:
        print(m.stderr[-2000:], file=sys.stderr)
    return m.seconds, m.peak_rss / 1024**3, m.returncode, m.cpu_seconds, os.getloadavg()[0]


OLD_RUNNER = """
import sys, types, subprocess
src = subprocess.run(["git", "-C", sys.argv[1], "show", sys.argv[2] + ":cellbg/stats.py"],
                     capture_output=True, text=True, check=True).stdout
mod = types.ModuleType("cellbg_stats_old"); sys.modules[mod.__name__] = mod
exec(compile(src, "cellbg/stats.py@" + sys.argv[2], "exec"), mod.__dict__)
mod.run_stats(sys.argv[3])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=41_667, help="cells of the large table (41,667: 10.0M rows)")
    ap.add_argument("--baseline-cells", type=int, default=1_000, help="cells of the baseline table")
    ap.add_argument("--folder", action="store_true", help="write predictions as a folder of per-job files")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    py = sys.executable
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench_stats_scale_"))
    combos = len(MODELS) * len(TRAIN) * len(TEST) * SEEDS
    print(
        f"design: {len(MODELS)} models x {len(TRAIN)} train x {len(TEST)} test variants x {SEEDS} seeds "
        f"= {combos} rows per cell; {PATIENTS} patients, {FOLDS} patient folds; bootstrap 2000"
    )
    results = {}
    for name, cells in (("small", args.baseline_cells), ("large", args.cells)):
        run = base / name
        write_protocol(run)
        t0 = time.perf_counter()
        rows = write_table(run, cells, folder=args.folder and name == "large")
        size = sum(f.stat().st_size for f in run.rglob("*.parquet"))
        print(
            f"{name}: {cells:,} cells, {rows:,} rows, {size / 1e6:.0f} MB parquet, written in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        results[name] = (rows, measure([py, "-m", "cellbg.cli", "stats", str(run)], env))
    small = base / "small"
    (small / "stats").rename(small / "stats.new")
    old = measure([py, "-c", OLD_RUNNER, str(ROOT), BASELINE_COMMIT, str(small)], env)
    rows_s, new_s = results["small"]
    rows_l, new_l = results["large"]
    print()
    print(
        f"{os.cpu_count()} CPUs; wall time grows with the machine's load (1-minute load average shown), "
        "CPU time (user + system) much less"
    )
    print(f"{'':34s} {'rows':>11s} {'wall s':>7s} {'CPU s':>7s} {'load':>5s} {'peak RSS GB':>11s} {'exit':>4s}")
    for label, rows, m in (
        (f"cell-level path ({BASELINE_COMMIT})", rows_s, old),
        ("counts path (this tree)", rows_s, new_s),
        ("counts path (this tree)", rows_l, new_l),
    ):
        print(f"{label:34s} {rows:11,d} {m[0]:7.1f} {m[3]:7.1f} {m[4]:5.1f} {m[1]:11.2f} {m[2]:4d}")
    print()
    print(
        f"same {rows_s:,}-row table: {old[0] / new_s[0]:.1f}x less wall time, {old[3] / new_s[3]:.1f}x less CPU, "
        f"peak RSS {old[1] / new_s[1]:.1f}x lower"
    )
    print(
        f"throughput (rows per CPU second): cell-level {rows_s / old[3] / 1e3:,.0f}k, counts "
        f"{rows_l / new_l[3] / 1e3:,.0f}k ({rows_l / new_l[3] / (rows_s / old[3]):.0f}x)"
    )
    ok = new_l[0] <= 30 and new_l[1] <= 4
    print(
        f"target at {rows_l / 1e6:.1f}M rows: <= 30 s and <= 4 GB: {'met' if ok else 'NOT met'} in wall time "
        f"({new_l[0]:.1f} s at load {new_l[4]:.0f}; CPU {new_l[3]:.1f} s; {new_l[1]:.2f} GB)"
    )
    if args.keep is None:
        print(f"(runs left in {base}; delete when done)")


if __name__ == "__main__":
    main()
