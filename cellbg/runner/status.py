"""How far a run folder is: the last run's record and, per stage, jobs done and to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cellbg._checks import CellbgError
from cellbg.runner.jobs import RunContext, RunSummary, Stage
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

    def summary(self) -> str:
        """Text for the terminal."""
        lines = [f"run {self.run_dir}: {self.state}" + (f" ({self.detail})" if self.detail else "")]
        if self.plan is not None:
            lines.append(f"{'stage':<12}{'jobs':>6}{'done':>6}{'to do':>7}  note")
            for s in self.plan.stages:
                if not s.planned:
                    lines.append(f"{s.name:<12}{'-':>6}{'-':>6}{'-':>7}  {s.note}")
                else:
                    lines.append(f"{s.name:<12}{s.total:>6}{s.cached:>6}{s.total - s.cached:>7}")
        lines.extend(
            f"FAILED: {f['stage']} {f['name']} after {f['attempts']} attempt(s): {f['error']} (log: {f['log']})"
            for f in self.failures
        )
        return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(run_dir: str | Path, *, stages: Sequence[Stage] | None = None) -> RunStatus:
    """How far a run folder is: the last run's state and, per stage, jobs done and to do.

    Parameters
    ----------
    run_dir : path
        A run folder (it holds ``protocol.resolved.yaml``).
    stages : sequence of Stage, optional
        The stages to check; default the cellbg pipeline of the folder's protocol.
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
        ctx = RunContext(run_dir=run_dir, protocol=protocol)
        stages = pipeline_stages()
    else:
        ctx = RunContext(run_dir=run_dir)
    plan = run_stages(stages, run_dir, dry_run=True, progress=False, context=ctx)
    return RunStatus(run_dir, state, detail, plan, tuple(record.get("failures", [])))
