"""The run loop: plan each stage once upstream is done, skip cached jobs, run the rest.

:func:`run_stages` holds the run folder's lock, writes the run record
(``<run>/.cellbg/last-run.json``: the stage running now and its counts, updated as jobs end)
and the run log beside it (``<run>/.cellbg/run.log``), runs small jobs in this process and
worker jobs on the executor, and stops after a stage in which a job failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import write_json_atomic
from cellbg.runner.display import Display, run_log_path
from cellbg.runner.execute import attempts_in_log, describe_error, execute_job, now
from cellbg.runner.executors import Executor
from cellbg.runner.jobs import (
    STATE_DIR,
    FileDigests,
    Job,
    JobCheck,
    JobFailure,
    JobRecord,
    NotReady,
    RunContext,
    RunSummary,
    Stage,
    StageSummary,
    hash_key,
    job_log_path,
)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One ``cellbg run`` per run folder; the lock goes with the process, even on kill -9."""
    path = run_dir / STATE_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise CellbgError(f"run folder {run_dir} is in use by {who}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"cellbg run pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR / "last-run.json"


def _close_record(run_dir: Path, state: str, started: str, executor: str, stages, failures) -> None:
    """Write the run record's final state, whatever the disk says.

    On a full disk the atomic write (a new file) fails; the record is then overwritten in
    place (its old blocks are freed first), and failing that replaced by a minimal one, so
    that it never stays "running" after the run has ended.
    """
    try:
        _write_record(run_dir, state, started, executor, stages, failures)
        return
    except OSError:
        pass
    full = _record(run_dir, state, started, executor, stages, failures)
    small = {
        "state": state,
        "started": started,
        "updated": now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "failures": full["failures"][:3],
        "note": "record cut short: disk full?",
    }
    for obj in (full, small, {"state": state, "pid": os.getpid()}):
        try:
            with open(record_path(run_dir), "w", encoding="utf-8") as f:
                f.write(json.dumps(obj, sort_keys=True, default=str))
            return
        except OSError:
            continue


def _write_record(
    run_dir: Path, state: str, started: str, executor: str, stages, failures, current: dict | None = None
) -> None:
    write_json_atomic(record_path(run_dir), _record(run_dir, state, started, executor, stages, failures, current))


def _write_progress(run_dir: Path, started: str, executor: str, stages, failures, current: dict | None = None) -> None:
    """The running record, updated as jobs end: progress only (a full disk must not stop the
    run for it; :func:`_close_record` writes the final state)."""
    with contextlib.suppress(OSError):
        _write_record(run_dir, "running", started, executor, stages, failures, current)


def _record(
    run_dir: Path, state: str, started: str, executor: str, stages, failures, current: dict | None = None
) -> dict:
    return {
        "state": state,
        "started": started,
        "updated": now(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "executor": executor,
        "cellbg": __version__,
        "log": str(run_log_path(run_dir)),
        # the stage running now: its start (epoch seconds) and job counts, for `cellbg status`
        "current": current,
        "stages": [
            {k: getattr(s, k) for k in ("name", "total", "cached", "ran", "failed", "seconds", "planned", "note")}
            for s in stages
        ],
        "failures": [
            {
                "stage": f.stage,
                "name": f.name,
                "key": f.key,
                "error": f.error,
                "log": str(f.log),
                "attempts": f.attempts,
            }
            for f in failures
        ],
    }


def run_stages(
    stages: Sequence[Stage],
    run_dir: str | Path,
    *,
    executor=None,
    dry_run: bool = False,
    progress: bool | None = None,
    context: RunContext | None = None,
    on_start: Callable[[], Any] | None = None,
    verify: bool = False,
) -> RunSummary:
    """Plan and run ``stages`` in order, skipping cached jobs.

    Parameters
    ----------
    stages : sequence of Stage
        Each planned when the ones before it have finished.
    run_dir : path
        The run folder (markers in ``<run>/.cellbg``, logs in ``<run>/logs``).
    executor : ExecutorConfig, optional
        Where worker jobs run; default a local cluster.
    dry_run : bool
        Plan only: list each stage's jobs and which are cached. Stages after the first one
        with work to do are listed as planned later (their inputs do not exist yet).
    progress : bool, optional
        Live display; default: when stderr is a terminal. ``False``: silent.
    context : RunContext, optional
        Carries the protocol and file digests to the planners.
    on_start : callable, optional
        Called once the run folder is locked for this run (not in a dry run).
    verify : bool
        In a dry run, hash every output of every finished job (not only those whose size
        or modification time changed); damaged files are listed in each job's record.

    Returns
    -------
    RunSummary
        Per stage: jobs, cached, ran, failed; the failures with their log paths. A failed
        job stops the run after its stage (every other job of the stage still finishes).

    Examples
    --------
    >>> def plan(ctx):
    ...     out = ctx.run_dir / "hello.txt"
    ...     return [Job("greet", "hello", hash_key("hello"), out.write_text, ("hi",),
    ...                 where="client", outputs=(out,))]
    >>> import tempfile
    >>> run = tempfile.mkdtemp()
    >>> run_stages([Stage("greet", plan)], run, progress=False).ran
    1
    >>> run_stages([Stage("greet", plan)], run, progress=False).ran  # cached now
    0
    """
    from cellbg.protocol import ExecutorConfig

    stages = list(stages)
    run_dir = Path(run_dir).resolve()
    cfg = executor if executor is not None else ExecutorConfig()
    ctx = context or RunContext(run_dir=run_dir)
    ctx.run_dir = run_dir
    if ctx.digests is None:
        ctx.digests = FileDigests(run_dir)
    t_run = time.perf_counter()
    started = now()
    summaries: list[StageSummary] = []
    failures: list[JobFailure] = []
    blocked_by: str | None = None
    interrupted = False

    if dry_run:

        def later(stage: Stage, after: str) -> StageSummary:
            n = stage.count(ctx) if stage.count is not None else None
            note = f"planned after {after}" + (f": {n} jobs" if n is not None else "")
            return StageSummary(stage.name, n or 0, 0, 0, 0, 0.0, planned=False, note=note)

        # Every stage is planned whose inputs are known: a stage waiting for one with work to
        # do raises NotReady, while one that needs only finished stages (the saliency maps
        # of trained models while new prediction jobs wait) lists its jobs.
        redo_by: str | None = None  # the first stage with damaged jobs
        for stage in stages:
            if blocked_by is not None:
                summaries.append(later(stage, blocked_by))
                continue
            try:
                jobs = stage.plan(ctx)
            except NotReady as exc:
                summaries.append(later(stage, str(exc)))
                continue
            except CellbgError:
                if redo_by is None:
                    raise
                # its inputs are damaged files that an earlier stage makes again (a deleted cell table)
                summaries.append(
                    StageSummary(stage.name, 0, 0, 0, 0, 0.0, planned=False, note=f"planned after {redo_by} is redone")
                )
                blocked_by = redo_by
                continue
            checks = [j.check(run_dir, full=verify) for j in jobs]
            records = tuple(
                JobRecord(j.name, j.key, c.state == "done", j.where, c.problems)
                for j, c in zip(jobs, checks, strict=True)
            )
            n_cached = sum(r.cached for r in records)
            n_damaged = sum(c.state == "damaged" for c in checks)
            redo_by = redo_by or (stage.name if n_damaged else None)
            note = f"{n_damaged} job(s) with damaged outputs to redo" if n_damaged else ""
            summaries.append(StageSummary(stage.name, len(jobs), n_cached, 0, 0, 0.0, note=note, jobs=records))
            if not any(c.state == "todo" for c in checks):
                # a damaged job is redone under the same key: later stages can be planned
                ctx.keys[stage.name] = _stage_key(jobs, checks)
        ctx.digests.save()
        return RunSummary(run_dir, cfg.kind, True, time.perf_counter() - t_run, tuple(summaries), ())

    run_dir.mkdir(parents=True, exist_ok=True)
    batch_logs = None
    if cfg.kind != "local":
        batch_logs = Path(cfg.log_directory) if cfg.log_directory else run_dir / "logs" / "batch"
    with _run_lock(run_dir), Executor(cfg, run_dir) as ex, Display(progress, run_dir) as display:
        if on_start is not None:
            on_start()
        display.say(
            f"=== cellbg {__version__} run started: pid {os.getpid()} on {socket.gethostname()}, "
            f"executor {cfg.kind}, {len(stages)} stages, run folder {run_dir}"
        )
        _write_record(run_dir, "running", started, cfg.kind, summaries, failures)
        try:
            for index, stage in enumerate(stages):
                if blocked_by is not None:
                    summaries.append(
                        StageSummary(stage.name, 0, 0, 0, 0, 0.0, planned=False, note=f"not run: {blocked_by} failed")
                    )
                    continue
                t0 = time.perf_counter()
                jobs = stage.plan(ctx)
                ctx.digests.save()
                _check_unique(stage, jobs)
                checks = [j.check(run_dir) for j in jobs]
                is_cached = [c.state == "done" for c in checks]
                todo = [j for j, c in zip(jobs, is_cached, strict=True) if not c]
                damaged = {j.name: c.problems for j, c in zip(jobs, checks, strict=True) if c.state == "damaged"}
                for job in todo:
                    if job.name in damaged:  # never used: its markers and damaged files go, it runs again
                        job.clear(run_dir, damaged[job.name])
                if todo and stage.prepare is not None:
                    stage.prepare(ctx, todo)
                later_modules = [m for st in stages[index:] for m in st.worker_modules]
                if todo and later_modules:
                    ex.warm_up(later_modules)
                display.start(stage.name, len(todo), sum(is_cached))
                stage_failures: list[JobFailure] = []
                counts = {"done": 0, "failed": 0}
                current = {
                    "stage": stage.name,
                    "started": time.time(),
                    "todo": len(todo),
                    "cached": sum(is_cached),
                    "done": 0,
                    "failed": 0,
                }
                if todo:
                    _write_progress(run_dir, started, cfg.kind, summaries, failures, current)

                # Called only within this stage's iteration; the defaults bind this stage's containers.
                def record(
                    job: Job,
                    exc: BaseException | None,
                    seconds: float | None = None,
                    counts: dict[str, int] = counts,
                    current: dict[str, Any] = current,
                    stage_failures: list[JobFailure] = stage_failures,
                ) -> None:
                    if exc is None:
                        counts["done"] += 1
                        display.job_finished(job.stage, job.name, seconds)
                    else:
                        counts["failed"] += 1
                        log = job_log_path(run_dir, job)
                        attempts = attempts_in_log(log)
                        failure = JobFailure(
                            job.stage,
                            job.name,
                            job.key,
                            describe_error(exc, attempts, batch_logs),
                            log,
                            attempts,
                            user_error=isinstance(exc, CellbgError),
                        )
                        stage_failures.append(failure)
                        display.job_finished(job.stage, job.name, seconds, f"{failure.error} (log: {log})")
                    current.update(counts)
                    _write_progress(run_dir, started, cfg.kind, summaries, failures, current)

                for job in (j for j in todo if j.where == "client"):
                    t_job = time.perf_counter()
                    error = _run_in_client(job, run_dir, cfg.retries)
                    record(job, error, time.perf_counter() - t_job)
                    display.update(counts["done"], 0, counts["failed"])
                worker_jobs = [j for j in todo if j.where == "worker"]
                if worker_jobs:
                    base_done, base_failed = counts["done"], counts["failed"]
                    for job, result, error in ex.run_worker_jobs(
                        worker_jobs,
                        lambda d, r, f, bd=base_done, bf=base_failed: display.update(bd + d, r, bf + f),
                    ):
                        record(job, error, (result or {}).get("seconds"))
                summary = StageSummary(
                    stage.name,
                    len(jobs),
                    sum(is_cached),
                    counts["done"],
                    counts["failed"],
                    time.perf_counter() - t0,
                    note=f"{len(damaged)} job(s) redone: damaged outputs" if damaged else "",
                    jobs=tuple(
                        JobRecord(j.name, j.key, c, j.where, damaged.get(j.name, ()))
                        for j, c in zip(jobs, is_cached, strict=True)
                    ),
                )
                summaries.append(summary)
                display.end(summary)
                failures.extend(stage_failures)
                if stage_failures:
                    blocked_by = stage.name
                else:
                    ctx.keys[stage.name] = _stage_key(jobs, [j.check(run_dir) for j in jobs])
                _write_progress(run_dir, started, cfg.kind, summaries, failures)
        except KeyboardInterrupt:
            interrupted = True
            _close_record(run_dir, "interrupted", started, cfg.kind, summaries, failures)
            with contextlib.suppress(OSError):
                display.say("=== run interrupted; finished jobs are kept, run again to resume")
            raise
        except BaseException as exc:
            _close_record(run_dir, "failed", started, cfg.kind, summaries, failures)
            with contextlib.suppress(OSError):  # the run log's disk may be the one that is full
                display.say(f"=== run failed: {type(exc).__name__}: {exc}")
            raise
        finally:
            with contextlib.suppress(OSError):  # a cache: on a full disk it is only lost
                ctx.digests.save()
        state = "failed" if failures else "finished"
        _close_record(run_dir, state, started, cfg.kind, summaries, failures)
        ran = sum(s.ran for s in summaries)
        with contextlib.suppress(OSError):
            display.say(
                f"=== run {state}: {ran} jobs ran in {time.perf_counter() - t_run:.1f} s"
                + "".join(f"\nFAILED: {f}" for f in failures)
            )
    return RunSummary(
        run_dir, cfg.kind, False, time.perf_counter() - t_run, tuple(summaries), tuple(failures), interrupted
    )


def _stage_key(jobs: Sequence[Job], checks: Sequence[JobCheck]) -> str:
    """A finished stage's key for the stages after it: its jobs' keys and the digests of
    their outputs, so that a job redone with other bytes (a damaged output made again on a
    GPU, say) also redoes what was built on it."""
    return hash_key(sorted(j.key for j in jobs), sorted(c.digest for c in checks))


def _check_unique(stage: Stage, jobs: Sequence[Job]) -> None:
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"stage {stage.name} planned two jobs named {dup[0]}")


def _run_in_client(job: Job, run_dir: Path, retries: int) -> BaseException | None:
    """Run a small job in this process with the same retries and logging as on a worker."""
    for attempt in range(retries + 1):
        try:
            result = execute_job(job, str(run_dir))
            if "user_error" in result:  # bad input: a retry cannot help
                return CellbgError(result["user_error"])
            return None
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with its log path
            if attempt == retries:
                return exc
    return None  # pragma: no cover
