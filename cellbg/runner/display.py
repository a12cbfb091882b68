"""What a person sees while a run goes: a live rich display in a terminal (a bar per stage
and one per running job, with its epoch, loss and accuracy), one line per stage in logs and
CI, and the run log ``<run>/.cellbg/run.log`` beside the run record.

Jobs report their inner progress through :mod:`cellbg._progress` into their progress
files (:func:`cellbg.runner.execute.read_progress`); a thread here reads them twice a
second, wherever the jobs run (this process, Dask workers, batch nodes).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import threading
import time
from pathlib import Path

from cellbg.runner.execute import job_fraction, read_progress
from cellbg.runner.jobs import STATE_DIR, StageSummary


def run_log_path(run_dir: str | Path) -> Path:
    """``<run>/.cellbg/run.log``: what every ``cellbg run`` of this folder did, appended."""
    return Path(run_dir) / STATE_DIR / "run.log"


class RunLog:
    """Timestamped lines appended to the run log (opened per line: safe beside a kill)."""

    def __init__(self, run_dir: str | Path | None):
        self.path = run_log_path(run_dir) if run_dir is not None else None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if self.path is None:
            return
        stamp = _dt.datetime.now().isoformat(timespec="seconds")
        with self._lock, contextlib.suppress(OSError):  # a log line never stops a run (disk full)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                for line in str(text).splitlines() or [""]:
                    f.write(f"{stamp} {line}\n")


def describe(progress: dict) -> str:
    """A job's progress in a few words: ``epoch 7/30 · loss 0.412 · acc 0.81 · val acc 0.78``."""
    unit = str(progress.get("unit", ""))
    parts = []
    if "total" in progress:
        if unit == "epochs":
            parts.append(f"epoch {progress.get('done', 0)}/{progress['total']}")
        else:
            parts.append(f"{unit} {progress.get('done', 0)}/{progress['total']}".strip())
    for key, label, fmt in (("loss", "loss", ".3f"), ("acc", "acc", ".2f"), ("val_acc", "val acc", ".2f")):
        value = progress.get(key)
        if isinstance(value, int | float) and value == value:
            parts.append(f"{label} {value:{fmt}}")
    if progress.get("device"):
        parts.append(str(progress["device"]))
    return " · ".join(parts)


def _eta(elapsed: float, done: float, total: float) -> str:
    """``ETA 1:02`` from the pace so far; ``ETA ?`` before anything is done."""
    if done <= 0:
        return "ETA ?"
    left = int(round(max(elapsed, 0.0) * max(total - done, 0.0) / done))
    if left >= 3600:
        return f"ETA {left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}"
    return f"ETA {left // 60}:{left % 60:02d}"


class Display:
    """A live rich progress display (terminal) or one line per stage (logs, CI), and the run log.

    Parameters
    ----------
    enabled : bool or None
        True: live display; False: silent; None: live when stderr is a terminal.
    run_dir : path, optional
        The run folder: its jobs' progress files are read and its run log written.
    """

    def __init__(self, enabled: bool | None, run_dir: str | Path | None = None):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal if enabled is None else enabled
        self.quiet = enabled is False
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.log = RunLog(run_dir)
        self.progress = None
        self.task = None
        self.stage: str | None = None
        self._counts = (0, 0, 0)
        self._stage_started = time.time()
        self._running_fraction = 0.0  # the running jobs' shares done, from their progress files
        self._todo = 0
        self._cached = 0
        self._job_tasks: dict[str, object] = {}
        self._seen: dict[str, str] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description:<24}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                # time left at the pace so far (a job counting for its share of epochs or items)
                TextColumn("{task.fields[eta]:<11}"),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                redirect_stdout=False,
                redirect_stderr=False,
                refresh_per_second=4,
            )
            self.progress.start()
        if self.run_dir is not None:
            self._thread = threading.Thread(target=self._poll_loop, name="cellbg-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.progress is not None:
            self.progress.stop()

    # ------------------------------------------------------------------ stages
    def start(self, stage: str, todo: int, cached: int) -> None:
        with self._lock:
            self.poll()  # the last words of the stage before
            self._clear_jobs()
            self.stage, self._todo, self._cached, self._counts = stage, todo, cached, (0, 0, 0)
            self._stage_started = time.time()
            self._running_fraction = 0.0
            self._seen = {}
            self.log.write(f"stage {stage}: {todo + cached} jobs, {cached} cached, {todo} to run")
            if self.progress is not None:  # a stage with nothing to do shows as complete
                self.task = self.progress.add_task(
                    f"[bold]{stage}", total=max(todo, 1), completed=0 if todo else 1, info=self._info(0, 0), eta=""
                )

    def _info(self, running: int, failed: int) -> str:
        parts = [f"running {running}"]
        if failed:
            parts.append(f"[red]failed {failed}[/red]")
        if self._cached:
            parts.append(f"cached {self._cached}")
        return " · ".join(parts)

    def update(self, done: int, running: int, failed: int) -> None:
        with self._lock:
            self._counts = (done, running, failed)
            self._refresh_stage()

    def job_finished(self, stage: str, name: str, seconds: float | None, error: str | None = None) -> None:
        """A line in the run log for a job that ended (the display shows it through its bar)."""
        took = f" in {seconds:.1f} s" if seconds else ""
        self.log.write(f"{stage} {name}: " + (f"FAILED: {error}" if error else f"done{took}"))

    def end(self, s: StageSummary) -> None:
        failed = f", {s.failed} failed" if s.failed else ""
        line = f"{s.name}: {s.total} jobs, {s.cached} cached, {s.ran} ran{failed} ({s.seconds:.1f} s)"
        with self._lock:
            self.poll()
            self._clear_jobs()
            self.stage = None
        self.log.write(line)
        if self.progress is None and not self.quiet:
            self.console.print(line.replace(f", {s.failed} failed", f", [red]{s.failed} failed[/red]"), highlight=False)

    def say(self, text: str) -> None:
        """A line for the run log only (the run's start, its end, its result)."""
        self.log.write(text)

    # ------------------------------------------------------------------ jobs
    def _clear_jobs(self) -> None:
        if self.progress is not None:
            for task in self._job_tasks.values():
                self.progress.remove_task(task)
        self._job_tasks = {}

    def _refresh_stage(self) -> None:
        done, running, failed = self._counts
        if self.progress is not None and self.task is not None:
            units = done + failed + self._running_fraction
            completed = min(units, max(self._todo, 1)) if self._todo else 1
            left = _eta(time.time() - self._stage_started, units, self._todo) if self._todo else ""
            self.progress.update(self.task, completed=completed, info=self._info(running, failed), eta=left)

    def poll(self) -> None:
        """Read the running jobs' progress files: update their bars and log what changed."""
        if self.run_dir is None or self.stage is None:
            return
        with self._lock:
            current = {p.get("key", ""): p for p in read_progress(self.run_dir, self.stage)}
            for key, p in current.items():
                text = describe(p)
                if self._seen.get(key) != text:
                    if key not in self._seen:
                        self.log.write(f"{self.stage} {p.get('job', key)}: started on {p.get('host', '?')}")
                    if p.get("line") and text:
                        self.log.write(f"{self.stage} {p.get('job', key)}: {p['line']}")
                    self._seen[key] = text
                if self.progress is None:
                    continue
                total = float(p.get("total") or 1)
                if key not in self._job_tasks:
                    self._job_tasks[key] = self.progress.add_task(
                        f"  {p.get('job', key)}"[:24], total=total, completed=0, info="", eta=""
                    )
                elapsed = time.time() - float(p.get("started", time.time()))
                self.progress.update(
                    self._job_tasks[key],
                    total=total,
                    completed=float(p.get("done") or 0),
                    info=text,
                    eta=_eta(elapsed, job_fraction(p), 1.0),
                )
            for key in [k for k in self._job_tasks if k not in current]:  # ended
                if self.progress is not None:
                    self.progress.remove_task(self._job_tasks.pop(key))
            self._running_fraction = sum(job_fraction(p) for p in current.values())
            self._refresh_stage()

    def _poll_loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the display must never stop a run
                time.sleep(1.0)
