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
        ``jobs/<key>/DONE``; the key is in the path). In every case the runner writes
        ``<run>/.cellbg/done/<stage>/<name>.json`` after the function returns: the key and
        the size and BLAKE2b digest of every output file (every file inside an output folder).
    outputs : tuple of Path
        Files and folders the job makes. A job is cached only when each recorded output is
        still there with its recorded size and digest; a missing, truncated or changed one
        makes the job *damaged*: it is redone (see :meth:`check`).
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

    def record_path(self, run_dir: Path) -> Path:
        """The runner's record of this job: ``<run>/.cellbg/done/<stage>/<name>.json``."""
        return Path(run_dir) / STATE_DIR / "done" / self.stage / f"{safe_name(self.name)}.json"

    def marker_path(self, run_dir: Path) -> Path:
        """Where the done marker of this job lives (its own marker, else the runner's record)."""
        if self.marker is not None:
            return Path(self.marker)
        return self.record_path(run_dir)

    def _record(self, run_dir: Path) -> dict | None:
        try:
            record = json.loads(self.record_path(run_dir).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == self.key else None

    def check(self, run_dir: Path, *, full: bool = False) -> JobCheck:
        """Whether the job is done, to do, or done with damaged outputs.

        Parameters
        ----------
        run_dir : Path
        full : bool
            Hash every output file. By default a file whose size and modification time
            match the record is taken as intact (as git does); any other is hashed.

        Returns
        -------
        JobCheck
            ``state`` is ``"done"``, ``"todo"`` (never finished, or with another key) or
            ``"damaged"`` (finished, but an output is missing or differs from its record;
            ``problems`` names each file).
        """
        run_dir = Path(run_dir)
        record = self._record(run_dir)
        if self.writes_marker:
            if not self.marker_path(run_dir).exists():
                return JobCheck("todo")
            if record is None or "outputs" not in record:
                # finished outside the runner (e.g. `cellbg train`): only existence is known
                missing = [f"{p}: missing" for p in self.outputs if not Path(p).exists()]
                return JobCheck("damaged", tuple(missing)) if missing else JobCheck("done")
        elif record is None:
            return JobCheck("todo")
        elif "outputs" not in record:  # a record from before digests were kept
            missing = [f"{p}: missing" for p in self.outputs if not Path(p).exists()]
            return JobCheck("damaged", tuple(missing)) if missing else JobCheck("done")
        problems = check_outputs(run_dir, record["outputs"], self.outputs, full=full)
        # a damaged job keeps the digest it was written with: a dry run plans later stages as
        # they will be once it is redone (to the same bytes, on CPU)
        return JobCheck("damaged" if problems else "done", tuple(problems), output_digest(record))

    def is_cached(self, run_dir: Path) -> bool:
        """True when the job finished with this key and its outputs are intact."""
        return self.check(run_dir).state == "done"

    def write_record(self, run_dir: Path, **extra) -> None:
        """Record the job as done: its key and the size and digest of each output file."""
        run_dir = Path(run_dir)
        write_json_atomic(
            self.record_path(run_dir),
            {
                "key": self.key,
                "stage": self.stage,
                "name": self.name,
                **extra,
                "outputs": describe_outputs(run_dir, self.outputs),
            },
        )

    def clear(self, run_dir: Path, problems: tuple[str, ...] = ()) -> None:
        """Forget that a damaged job was done: its markers and its damaged output files go.

        Intact outputs stay (a training job with an intact checkpoint only predicts again).
        """
        run_dir = Path(run_dir)
        self.record_path(run_dir).unlink(missing_ok=True)
        if self.marker is not None:
            Path(self.marker).unlink(missing_ok=True)
        for problem in problems:
            path = Path(problem.split(": ", 1)[0])
            path = path if path.is_absolute() else run_dir / path
            if path.is_file():
                path.unlink()


@dataclass(frozen=True)
class JobCheck:
    """What :meth:`Job.check` finds: ``state`` ("done", "todo", "damaged"), the damaged
    files with what is wrong with each, and the digest of the outputs as recorded."""

    state: str
    problems: tuple[str, ...] = ()
    digest: str = ""


# =========================================================================== output digests
def digest_file(path: str | Path) -> str:
    """BLAKE2b (128-bit, hex) of a file's bytes.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a"
    >>> _ = p.write_bytes(b"abc")
    >>> digest_file(p)
    'cf4ab791c62b8d2b2109c90275287816'
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _output_files(outputs) -> list[Path]:
    files = []
    for out in outputs:
        out = Path(out)
        if out.is_dir():
            files.extend(sorted(p for p in out.rglob("*") if p.is_file()))
        else:
            files.append(out)
    return files


def _rel(run_dir: Path, path: Path) -> str:
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def describe_outputs(run_dir: Path, outputs) -> dict[str, list]:
    """``{path: [size, mtime_ns, digest]}`` for every file of ``outputs`` (paths relative to
    ``run_dir`` when inside it; every file inside an output folder)."""
    described = {}
    for path in _output_files(outputs):
        if not path.is_file():
            raise RuntimeError(f"the job finished without writing its output {path}")
        st = path.stat()
        described[_rel(run_dir, path)] = [st.st_size, st.st_mtime_ns, digest_file(path)]
    return described


def check_outputs(run_dir: Path, recorded: dict[str, list], outputs=(), *, full: bool = False) -> list[str]:
    """``"<path>: <what is wrong>"`` for each recorded output file that is missing, has
    another size, or (hashed when its modification time changed, or always with ``full``)
    another digest; also for an expected output the record does not list."""
    problems = []
    for rel, (size, mtime_ns, digest) in sorted(recorded.items()):
        path = Path(rel) if Path(rel).is_absolute() else run_dir / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if st.st_size != size:
            problems.append(f"{rel}: {st.st_size} bytes, {size} when written (truncated or replaced)")
        elif (full or st.st_mtime_ns != mtime_ns) and digest_file(path) != digest:
            problems.append(f"{rel}: content differs from when it was written (digest {digest[:8]}...)")
    for out in outputs:
        rel = _rel(run_dir, Path(out))
        if not any(r == rel or r.startswith(rel + "/") for r in recorded):
            if not Path(out).exists():
                problems.append(f"{rel}: missing")
            elif Path(out).is_file():
                problems.append(f"{rel}: not in the job's record")
    return problems


def output_digest(record: dict | None) -> str:
    """One digest of a job record's outputs (their paths, sizes and digests)."""
    if not record or "outputs" not in record:
        return ""
    return hash_key(sorted((k, v[0], v[2]) for k, v in record["outputs"].items()))


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
    ``count(context)``, when given, says how many jobs the stage will have before its
    inputs exist (from the protocol alone): a dry run shows it for stages planned later.
    """

    name: str
    plan: Callable[[RunContext], list[Job]]
    prepare: Callable[[RunContext, list[Job]], None] | None = None
    worker_modules: tuple[str, ...] = ()
    count: Callable[[RunContext], int] | None = None


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
        return f"{self.stage} {self.name} failed after {self.attempts} attempt(s): {self.error} (log: {self.log})"


@dataclass(frozen=True)
class JobRecord:
    """One planned job in a summary: its name, key, whether it was cached, and the damaged
    outputs that made a finished job run again (or, in a dry run, that will)."""

    name: str
    key: str
    cached: bool
    where: str
    damaged: tuple[str, ...] = ()


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
            lines.append(f"{s.name:<12}{s.total:>6}{s.cached:>8}{s.ran:>6}{s.failed:>8}{s.seconds:>9.1f}  {s.note}")
        lines.extend(f"FAILED: {f}" for f in self.failures)
        return "\n".join(lines)
