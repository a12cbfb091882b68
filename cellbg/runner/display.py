"""What a person sees while a run goes: a live rich display in a terminal, one line per
stage in logs and CI.
"""

from __future__ import annotations

from cellbg.runner.jobs import StageSummary


class Display:
    """A live rich progress display (terminal) or one line per stage (logs, CI)."""

    def __init__(self, enabled: bool | None):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal if enabled is None else enabled
        self.quiet = enabled is False
        self.progress = None
        self.task = None

    def __enter__(self):
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description:<11}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def start(self, stage: str, todo: int, cached: int) -> None:
        self._cached = cached
        if self.progress is not None:  # a stage with nothing to do shows as complete
            self.task = self.progress.add_task(
                stage, total=max(todo, 1), completed=0 if todo else 1, info=self._info(0, 0)
            )

    def _info(self, running: int, failed: int) -> str:
        parts = [f"running {running}"]
        if failed:
            parts.append(f"[red]failed {failed}[/red]")
        if self._cached:
            parts.append(f"cached {self._cached}")
        return " · ".join(parts)

    def update(self, done: int, running: int, failed: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done + failed, info=self._info(running, failed))

    def end(self, s: StageSummary) -> None:
        if self.progress is None and not self.quiet:
            failed = f", [red]{s.failed} failed[/red]" if s.failed else ""
            self.console.print(
                f"{s.name}: {s.total} jobs, {s.cached} cached, {s.ran} ran{failed} ({s.seconds:.1f} s)",
                highlight=False,
            )

