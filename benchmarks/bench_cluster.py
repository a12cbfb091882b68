"""Per-job overhead of the Slurm executor against the local one, on the same jobs.

Runs ``--jobs`` small jobs (each works ``--work`` seconds: a fixed CPU loop) through
cellbg's runner twice, with the local executor (``--slots`` worker processes) and with the
Slurm executor (at most ``--slots`` batch jobs in flight, one core each), and prints for
each: wall time, jobs per batch job (how many jobs one batch job ran: Dask workers live in
the batch jobs and take job after job, so a batch job's start-up is paid once for many
jobs) and the per-job overhead::

    overhead per job = wall * slots / jobs - work

Target (issue 22): <= 5 s per job on Slurm. ``--protocol`` runs a cellbg protocol instead
(each executor in its own copy of the run folder) and compares the seconds of its train,
predict and saliency-maps stages per job.

Needs a Slurm cluster (``bash scripts/start-slurm.sh`` starts a one-node one as root).

    .venv/bin/python benchmarks/bench_cluster.py
    .venv/bin/python benchmarks/bench_cluster.py --jobs 40 --work 1 --slots 2
    .venv/bin/python benchmarks/bench_cluster.py --protocol protocols/quickstart.yaml
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: The stages whose jobs run on workers (compared per job in ``--protocol`` mode).
WORKER_STAGES = ("train", "predict", "saliency-maps")


def work_job(out: str, seconds: float) -> None:
    """Busy for ``seconds`` of wall time; record the batch job it ran in."""
    t0 = time.perf_counter()
    x = 0
    while time.perf_counter() - t0 < seconds:
        x += 1
    Path(out).write_text(os.environ.get("SLURM_JOB_ID", "local"))


def _stages(n: int, seconds: float, tag: str):
    from cellbg.runner import Job, Stage, hash_key

    def plan(ctx):
        return [
            Job(
                "work",
                f"j{i}",
                hash_key("work", tag, i, seconds),
                work_job,
                (str(ctx.run_dir / "out" / f"j{i}.txt"), seconds),
                outputs=(ctx.run_dir / "out" / f"j{i}.txt",),
            )
            for i in range(n)
        ]

    def prepare(ctx, todo):
        (ctx.run_dir / "out").mkdir(parents=True, exist_ok=True)

    return [Stage("work", plan, prepare)]


def _executors(slots: int):
    from cellbg.protocol import ExecutorConfig

    return {
        "local": ExecutorConfig(kind="local", workers=slots, retries=0),
        "slurm": ExecutorConfig(
            kind="slurm",
            cores=1,
            memory="2GB",
            walltime="00:30:00",
            max_jobs_in_flight=slots,
            retries=0,
            worker_wait_timeout=300,
        ),
    }


def bench_jobs(jobs: int, work: float, slots: int, root: Path) -> None:
    from cellbg.runner import run_stages

    print(f"{jobs} jobs of {work:.1f} s each, {slots} slots")
    print(f"{'executor':<9}{'wall s':>8}{'batch jobs':>11}{'jobs/batch job':>15}{'overhead s/job':>15}")
    results = {}
    for name, cfg in _executors(slots).items():
        run = root / name
        t0 = time.perf_counter()
        summary = run_stages(_stages(jobs, work, name), run, executor=cfg, progress=False)
        wall = time.perf_counter() - t0
        if not summary.ok:
            print(f"{name}: FAILED {summary.summary()}")
            continue
        where = [p.read_text() for p in (run / "out").glob("*.txt")]
        batch_jobs = len(set(where))
        overhead = wall * slots / jobs - work
        results[name] = overhead
        print(f"{name:<9}{wall:>8.1f}{batch_jobs:>11}{jobs / batch_jobs:>15.1f}{overhead:>15.2f}", flush=True)
    if "slurm" in results:
        verdict = "PASS" if results["slurm"] <= 5 else "FAIL"
        print(
            f"slurm per-job overhead {results['slurm']:.2f} s (local {results.get('local', float('nan')):.2f} s); "
            f"target <= 5 s: {verdict}"
        )


def bench_protocol(path: Path, slots: int, root: Path) -> None:
    from cellbg.protocol import load_protocol
    from cellbg.runner import run_protocol

    print(f"protocol {path}, {slots} slots")
    rows = {}
    for name, cfg in _executors(slots).items():
        p = load_protocol(path)
        p = p.model_copy(update={"output": root / name / "run", "executor": cfg})
        t0 = time.perf_counter()
        summary = run_protocol(p, progress=False)
        wall = time.perf_counter() - t0
        if not summary.ok:
            print(f"{name}: FAILED\n{summary.summary()}")
            continue
        rows[name] = {s.name: (s.seconds, s.ran) for s in summary.stages}
        # the batch job each worker job ran in (its log's first line), as the runner logs it
        batch = [
            log.read_text().split("batch_job=")[1].split()[0]
            for stage in WORKER_STAGES
            for log in (root / name / "run" / "logs").glob(f"{stage}-*.log")
            if "batch_job=" in log.read_text()
        ]
        ran = sum(rows[name].get(st, (0.0, 0))[1] for st in WORKER_STAGES)
        spread = f", {len(set(batch))} batch jobs ran {len(batch)} of them" if batch else ""
        print(f"{name}: {wall:.1f} s wall, {ran} worker jobs{spread}", flush=True)
    print(f"{'stage':<14}" + "".join(f"{n + ' s/job':>16}" for n in rows))
    for stage in WORKER_STAGES:
        cells = []
        for n in rows:
            seconds, ran = rows[n].get(stage, (0.0, 0))
            cells.append(f"{seconds * slots / max(ran, 1):>16.2f}")
        print(f"{stage:<14}" + "".join(cells))
    if {"local", "slurm"} <= set(rows):
        ran = sum(rows["slurm"][s][1] for s in WORKER_STAGES if s in rows["slurm"])
        extra = (
            sum(rows["slurm"][s][0] - rows["local"][s][0] for s in WORKER_STAGES if s in rows["slurm"])
            * slots
            / max(ran, 1)
        )
        print(f"slurm minus local: {extra:.2f} s per job (target <= 5 s): {'PASS' if extra <= 5 else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--work", type=float, default=1.0, help="seconds of work per job")
    parser.add_argument("--slots", type=int, default=2, help="local workers / Slurm batch jobs in flight")
    parser.add_argument("--protocol", type=Path, default=None, help="run this protocol instead of small jobs")
    args = parser.parse_args()
    if shutil.which("sbatch") is None:
        sys.exit("Slurm is not installed here (sbatch missing); bash scripts/start-slurm.sh starts a local one")
    root = Path(tempfile.mkdtemp(prefix="bench_cluster_", dir=os.environ.get("CELLBG_BENCH_DIR")))
    try:
        if args.protocol is not None:
            bench_protocol(args.protocol, args.slots, root)
        else:
            bench_jobs(args.jobs, args.work, args.slots, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
