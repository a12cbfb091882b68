"""How far a run folder is: the last run's record, the stage and jobs running now with an
estimate of the time left in that stage, and, per stage, jobs done and to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cellbg._checks import CellbgError
from cellbg.runner.display import describe
from cellbg.runner.execute import job_fraction, read_progress
from cellbg.runner.jobs import STATE_DIR, JobRecord, RunContext, RunSummary, Stage, check_outputs
from cellbg.runner.loop import record_path, run_stages
from cellbg.runner.pipeline import pipeline_stages


@dataclass(frozen=True)
class RunStatus:
    """What :func:`status` finds in a run folder."""

    run_dir: Path
    state: str
    detail: str
    plan: RunSummary | None
    failures: tuple[dict, ...]
    #: The stage running now (``stage``, ``todo``, ``done``, ``failed``, ``started``), when running.
    current: dict | None = None
    #: The progress of its running jobs (job name, epoch or items done, loss, accuracy).
    jobs: tuple[dict, ...] = ()
    #: Seconds left in the current stage (from its pace so far); None when not known yet.
    eta_seconds: float | None = None
    log: Path | None = None
    verified: bool = False

    @property
    def damaged(self) -> tuple[tuple[str, str, str], ...]:
        """``(stage, job, "<file>: <what is wrong>")`` for each damaged output found."""
        if self.plan is None:
            return ()
        return tuple((s.name, j.name, d) for s in self.plan.stages for j in s.jobs for d in j.damaged)

    def summary(self) -> str:
        """Text for the terminal."""
        detail = [
            d for d in (self.detail, f"log {self.log}" if self.log is not None and self.log.exists() else "") if d
        ]
        lines = [f"run {self.run_dir}: {self.state}" + (f" ({'; '.join(detail)})" if detail else "")]
        if self.current:
            c = self.current
            eta = (
                "time left not known yet"
                if self.eta_seconds is None
                else f"about {_duration(self.eta_seconds)} left in this stage (later stages not estimated)"
            )
            lines.append(
                f"now: stage {c['stage']}, {c.get('done', 0)} of {c.get('todo', 0)} jobs done"
                + (f", {c['failed']} failed" if c.get("failed") else "")
                + f"; {eta}"
            )
            for j in self.jobs:
                running = _duration(time.time() - float(j.get("started", time.time())))
                lines.append(f"  {j.get('job', '?')}: {describe(j) or 'started'} (running {running})")
        if self.plan is not None:
            lines.append(f"{'stage':<12}{'jobs':>6}{'done':>6}{'to do':>7}  note")
            for s in self.plan.stages:
                if not s.planned:
                    lines.append(f"{s.name:<12}{'-':>6}{'-':>6}{'-':>7}  {s.note}")
                else:
                    lines.append(f"{s.name:<12}{s.total:>6}{s.cached:>6}{s.total - s.cached:>7}")
        lines.extend(f"DAMAGED: {stage} {job}: {what}" for stage, job, what in self.damaged)
        if self.verified and self.plan is not None:
            n = len(self.damaged)
            lines.append(
                f"verified: {n} damaged file(s); run again to redo their jobs"
                if n
                else "verified: every output of every finished job matches its recorded digest"
            )
        lines.extend(
            f"FAILED: {f['stage']} {f['name']} after {f['attempts']} attempt(s): {f['error']} (log: {f['log']})"
            for f in self.failures
        )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def stage_eta(current: dict, jobs: Sequence[dict], now: float | None = None) -> float | None:
    """Seconds left in a stage from its pace: the time so far per job done (a running job
    counting for the share of its epochs or items done), times the jobs left.

    Examples
    --------
    >>> stage_eta({"started": 0.0, "todo": 4, "done": 1, "failed": 0},
    ...           [{"done": 5, "total": 10}], now=60.0)  # 1.5 jobs in 60 s: 2.5 jobs left
    100.0
    """
    now = time.time() if now is None else now
    units = float(current.get("done", 0)) + float(current.get("failed", 0)) + sum(job_fraction(j) for j in jobs)
    todo = float(current.get("todo", 0))
    if units <= 0 or todo <= 0:
        return None
    return max(now - float(current.get("started", now)), 0.0) * max(todo - units, 0.0) / units


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(run_dir: str | Path, *, stages: Sequence[Stage] | None = None, verify: bool = False) -> RunStatus:
    """How far a run folder is: the last run's state and, per stage, jobs done and to do.

    Parameters
    ----------
    run_dir : path
        A run folder (it holds ``protocol.resolved.yaml``).
    stages : sequence of Stage, optional
        The stages to check; default the cellbg pipeline of the folder's protocol.
    verify : bool
        Hash every output of every finished job and compare it with the digest recorded
        when the job finished; :attr:`RunStatus.damaged` names each damaged file.
    """
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise CellbgError(f"run folder not found: {run_dir}")
    record: dict = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(record_path(run_dir).read_text())
    state = record.get("state", "never run")
    detail = ""
    if state == "running":
        pid, host = record.get("pid"), record.get("host")
        if host == socket.gethostname() and pid and not _pid_alive(int(pid)):
            state, detail = "interrupted", f"process {pid} is gone; run again to resume"
        else:
            detail = f"pid {pid} on {host}"
    elif record:
        detail = f"last update {record.get('updated', '?')}"
    if stages is None:
        from cellbg.protocol import load_run

        protocol = load_run(run_dir)
        # the folder as it is now: a copied or moved run folder is checked where it lies
        protocol = protocol.model_copy(update={"output": run_dir})
        ctx = RunContext(run_dir=run_dir, protocol=protocol)
        stages = pipeline_stages()
    else:
        ctx = RunContext(run_dir=run_dir)
    plan = run_stages(stages, run_dir, dry_run=True, progress=False, context=ctx, verify=verify)
    if verify:
        plan = _verify_unplanned(run_dir, plan)
    current: dict | None = None
    jobs: tuple[dict, ...] = ()
    eta: float | None = None
    if state == "running" and isinstance(record.get("current"), dict):
        current = record["current"]
        jobs = tuple(read_progress(run_dir, current.get("stage")))
        eta = stage_eta(current, jobs)
    log = Path(record["log"]) if record.get("log") else None
    return RunStatus(
        run_dir, state, detail, plan, tuple(record.get("failures", [])), current, jobs, eta, log, verified=verify
    )


def _verify_unplanned(run_dir: Path, plan: RunSummary) -> RunSummary:
    """Also check the recorded outputs of jobs a dry run could not check: those of stages
    it could not plan, and those whose key changes once damaged inputs are redone (every
    job record in ``<run>/.cellbg/done/<stage>/`` that the plan did not find done)."""
    stages = []
    for s in plan.stages:
        known = {j.name: j for j in s.jobs}
        found = {}
        for path in sorted((run_dir / STATE_DIR / "done" / s.name).glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                name, outputs = str(rec["name"]), rec["outputs"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            job = known.get(name)
            if job is not None and (job.cached or job.damaged):
                continue  # checked by the plan
            problems = tuple(check_outputs(run_dir, outputs, full=True))
            if problems:
                found[name] = JobRecord(name, str(rec.get("key", "")), False, job.where if job else "", problems)
        if found:
            jobs = tuple(found.pop(j.name, j) for j in s.jobs) + tuple(found.values())
            s = dataclasses.replace(s, jobs=jobs)
        stages.append(s)
    return dataclasses.replace(plan, stages=tuple(stages))
