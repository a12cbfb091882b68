"""Jobs and their content-addressed cache.

A :class:`Job` is a function with its arguments, a cache key and a done marker; a
:class:`Stage` plans its jobs from a :class:`RunContext` once the stages before it have
finished. :func:`hash_key` makes the keys (the job's inputs, the part of the resolved
protocol it reads and the cellbg version); :class:`FileDigests` remembers input-file digests
by size and modification time. The summary classes (:class:`RunSummary`,
:class:`StageSummary`, :class:`JobFailure`) are what a run returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import write_json_atomic

#: Folder inside a run that holds the runner's own bookkeeping (markers, digests, lock).
STATE_DIR = ".cellbg"

# =========================================================================== keys and jobs
def hash_key(*parts: Any) -> str:
    """A 16-hex-digit SHA-256 of ``parts`` (JSON-serialised) and the cellbg version.

    Examples
    --------
    >>> hash_key("x") == hash_key("x") != hash_key("y")
    True
    """
    blob = json.dumps([__version__, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FileDigests:
    """SHA-256 digests of input files, remembered by (size, mtime) in ``<run>/.cellbg``.

    Hashing every image on every run would cost minutes on a large dataset; a file whose
    size and modification time are unchanged keeps its digest (as git and DVC do).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / STATE_DIR / "file-digests.json"
        try:
            self._cache: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._cache = {}
        self._dirty = False

    def __call__(self, path: str | Path) -> str:
        """The digest of one file (hex, 16 digits)."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError as exc:
            raise CellbgError(f"input file not readable: {path} ({exc.strerror})") from None
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self._cache.get(str(path))
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()[:16]
        self._cache[str(path)] = [*stamp, digest]
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the remembered digests (atomically) when new ones were computed."""
        if self._dirty:
            write_json_atomic(self.path, self._cache)
            self._dirty = False


@dataclass(frozen=True)
class Job:
    """One unit of work: ``func(*args, **kwargs)`` with a cache key and a done marker.

    Parameters
    ----------
    stage : str
        The stage the job belongs to (``train``, ``segment``, ...).
    name : str
        A readable name, unique within the stage (``resnet/original/s0/f1``).
    key : str
        The content hash; the job is cached when its marker holds this key.
    func : callable
        A module-level function (it is pickled to Dask workers).
    args, kwargs
        Its arguments.
    where : {"worker", "client"}
        ``worker``: a Dask task; ``client``: run in this process (small stages).
    marker : Path, optional
        Written by the function itself when ``writes_marker`` (training jobs write
        ``jobs/<key>/DONE``; the key is in the path); otherwise the runner writes
        ``<run>/.cellbg/done/<stage>/<name>.json`` holding the key after the function returns.
    outputs : tuple of Path
        Files the job makes; a job whose outputs are missing is not cached.
    """

    stage: str
    name: str
    key: str
    func: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    where: Literal["worker", "client"] = "worker"
    marker: Path | None = None
    writes_marker: bool = False
    outputs: tuple[Path, ...] = ()

    def marker_path(self, run_dir: Path) -> Path:
        """Where the done marker of this job lives."""
        if self.marker is not None:
            return Path(self.marker)
        return Path(run_dir) / STATE_DIR / "done" / self.stage / f"{safe_name(self.name)}.json"

    def is_cached(self, run_dir: Path) -> bool:
        """True when the job's marker holds its key and its outputs exist."""
        marker = self.marker_path(run_dir)
        if not marker.exists():
            return False
        if not self.writes_marker:
            try:
                if json.loads(marker.read_text()).get("key") != self.key:
                    return False
            except (OSError, ValueError, AttributeError):
                return False
        return all(Path(p).exists() for p in self.outputs)


def safe_name(name: str) -> str:
    """A file-name-safe version of a job name."""
    return "".join(c if c.isalnum() or c in "-_.=" else "-" for c in name).strip("-") or "job"


def job_log_path(run_dir: str | Path, job: Job) -> Path:
    """``<run>/logs/<stage>-<key>.log``, where a job's output and traceback go."""
    return Path(run_dir) / "logs" / f"{job.stage}-{job.key}.log"


class NotReady(Exception):
    """Raised by a stage's planner when its inputs do not exist yet (dry runs)."""


@dataclass
class RunContext:
    """What a stage planner sees: the run folder, the protocol and upstream stage keys."""

    run_dir: Path
    protocol: Any = None
    keys: dict[str, str] = field(default_factory=dict)
    digests: FileDigests | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def key(self, stage: str) -> str:
        """The key of a finished upstream stage (hash of its job keys)."""
        try:
            return self.keys[stage]
        except KeyError:
            raise NotReady(stage) from None


@dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``plan(context) -> list[Job]``, called once upstream is done.

    ``prepare(context, jobs)``, when given, runs in this process before the stage's jobs
    that are not cached (never in a dry run), e.g. to clear their stale outputs.
    ``worker_modules`` names the modules the stage's worker jobs import: when an earlier
    stage has work to do, the cluster is started early and imports them meanwhile.
    """

    name: str
    plan: Callable[[RunContext], list[Job]]
    prepare: Callable[[RunContext, list[Job]], None] | None = None
    worker_modules: tuple[str, ...] = ()


# =========================================================================== results
@dataclass(frozen=True)
class JobFailure:
    """A job that failed after all its attempts."""

    stage: str
    name: str
    key: str
    error: str
    log: Path
    attempts: int
    user_error: bool = False  # bad input (a CellbgError): fix the input, a retry cannot help

    def __str__(self) -> str:
        return (
            f"{self.stage} {self.name} failed after {self.attempts} attempt(s): {self.error} "
            f"(log: {self.log})"
        )


@dataclass(frozen=True)
class JobRecord:
    """One planned job in a summary: its name, key and whether it was cached."""

    name: str
    key: str
    cached: bool
    where: str


@dataclass(frozen=True)
class StageSummary:
    """What happened to one stage."""

    name: str
    total: int
    cached: int
    ran: int
    failed: int
    seconds: float
    planned: bool = True
    note: str = ""
    jobs: tuple[JobRecord, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """The result of :func:`run_protocol` / :func:`run_stages`."""

    run_dir: Path
    executor: str
    dry_run: bool
    seconds: float
    stages: tuple[StageSummary, ...]
    failures: tuple[JobFailure, ...]
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """True when no job failed and every stage was reached."""
        return not self.failures and not self.interrupted

    @property
    def ran(self) -> int:
        """Jobs that ran (not cached) in this run."""
        return sum(s.ran for s in self.stages)

    def summary(self) -> str:
        """A short text table: one line per stage, then the failures."""
        lines = [f"{'stage':<12}{'jobs':>6}{'cached':>8}{'ran':>6}{'failed':>8}{'seconds':>9}  note"]
        for s in self.stages:
            if not s.planned:
                lines.append(f"{s.name:<12}{'-':>6}{'-':>8}{'-':>6}{'-':>8}{'':>9}  {s.note}")
                continue
            lines.append(
                f"{s.name:<12}{s.total:>6}{s.cached:>8}{s.ran:>6}{s.failed:>8}{s.seconds:>9.1f}  {s.note}"
            )
        lines.extend(f"FAILED: {f}" for f in self.failures)
        return "\n".join(lines)
