"""Run a whole protocol: the job graph, a content-addressed cache, and Dask executors.

The pipeline is a chain of stages (data -> segment -> crops -> train -> predictions ->
saliency -> stats -> report). Each stage is planned once the stages before it have
finished, as a list of small :class:`Job` objects: a function with its arguments, a cache
key and a done marker. The key hashes the job's inputs (file contents or the keys of the
jobs that made them), the part of the resolved protocol the job reads and the cellbg
version, so a job whose marker holds the same key is skipped, and changing one model's
settings re-runs only that model's training jobs (their keys come from
:func:`cellbg.train.job_key`). Every job logs to ``<run>/logs/<stage>-<key>.log``.

Small stages run in this process; segmentation batches, training jobs and saliency run on
Dask workers: a :class:`distributed.LocalCluster` by default, or batch jobs through
dask-jobqueue (Slurm, PBS, SGE, LSF). A job that raises is retried ``executor.retries``
times; a job whose worker dies is retried as often (``distributed.scheduler.allowed-failures``)
and then reported; finished jobs are never lost, so a killed run resumes where it stopped.

This is the only module that knows about Dask and executors.

Examples
--------
>>> from cellbg.runner import hash_key
>>> len(hash_key({"a": 1}, "b"))
16
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import atomic_dir, write_json_atomic

__all__ = [
    "Job",
    "Stage",
    "RunContext",
    "NotReady",
    "JobFailure",
    "StageSummary",
    "RunSummary",
    "RunStatus",
    "hash_key",
    "FileDigests",
    "job_log_path",
    "run_stages",
    "pipeline_stages",
    "run_protocol",
    "status",
    "make_cluster",
]

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
        return Path(run_dir) / STATE_DIR / "done" / self.stage / f"{_safe(self.name)}.json"

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


def _safe(name: str) -> str:
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


# =========================================================================== capturing a job's output
class _ThreadRouter(io.TextIOBase):
    """A stand-in for sys.stdout/err that sends each thread's writes to its job log.

    Several jobs share one worker process (threads), so a process-wide redirect would mix
    their outputs.
    """

    def __init__(self, fallback):
        self._fallback = fallback

    def _target(self):
        return getattr(_capture_state.local, "stream", None) or self._fallback

    def write(self, s):  # noqa: D401
        return self._target().write(s)

    def flush(self):
        with contextlib.suppress(Exception):
            self._target().flush()

    def isatty(self):
        return False

    def fileno(self):
        return self._fallback.fileno()

    @property
    def encoding(self):
        return getattr(self._fallback, "encoding", "utf-8")


class _CaptureState:
    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.saved: tuple | None = None
        self.local = threading.local()


_capture_state = _CaptureState()


class _ThreadFilter(logging.Filter):
    def __init__(self, ident: int):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


@contextlib.contextmanager
def _capture(stream) -> Iterator[None]:
    """Send this thread's stdout, stderr and log records to ``stream``."""
    st = _capture_state
    with st.lock:
        if st.count == 0:
            root = logging.getLogger()
            st.saved = (sys.stdout, sys.stderr, root.level)
            sys.stdout, sys.stderr = _ThreadRouter(sys.stdout), _ThreadRouter(sys.stderr)
            root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        st.count += 1
    handler = logging.StreamHandler(stream)
    handler.addFilter(_ThreadFilter(threading.get_ident()))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    st.local.stream = stream
    try:
        yield
    finally:
        st.local.stream = None
        logging.getLogger().removeHandler(handler)
        with st.lock:
            st.count -= 1
            if st.count == 0 and st.saved is not None:
                out, err, level = st.saved
                if isinstance(sys.stdout, _ThreadRouter):
                    sys.stdout = out
                if isinstance(sys.stderr, _ThreadRouter):
                    sys.stderr = err
                logging.getLogger().setLevel(level)
                st.saved = None


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


#: Environment variables naming the batch job a worker runs in (Slurm, PBS, LSF, SGE).
_BATCH_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def _execute_job(job: Job, run_dir: str, torch_threads: int | None = None) -> dict:
    """Run one job (on a Dask worker or in this process), logging to its log file.

    Appends an ``=== attempt`` header to ``<run>/logs/<stage>-<key>.log``, runs the job with
    its output captured there, writes the done marker last, and re-raises any error (after
    writing its traceback to the log) so that Dask retries it.
    """
    run_dir = Path(run_dir)
    if job.is_cached(run_dir):
        # Dask recomputes a finished task whose result was held by a worker that died since;
        # the marker says the work is done.
        return {"seconds": 0.0, "host": socket.gethostname(), "cached": True}
    log_path = job_log_path(run_dir, job)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if torch_threads:
        # torch reads OMP_NUM_THREADS when it is first imported; later jobs set it directly.
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_threads)
    batch_job = next((os.environ[v] for v in _BATCH_JOB_VARS if os.environ.get(v)), None)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:
        log.write(
            f"=== attempt started {_now()} stage={job.stage} job={job.name} key={job.key} "
            f"host={socket.gethostname()} pid={os.getpid()}"
            + (f" batch_job={batch_job}" if batch_job else "")
            + "\n"
        )
        try:
            with _capture(log):
                job.func(*job.args, **job.kwargs)
            marker = job.marker_path(run_dir)
            if job.writes_marker:
                if not marker.exists():
                    raise RuntimeError(f"job finished without writing its done marker {marker}")
            else:
                write_json_atomic(
                    marker,
                    {"key": job.key, "stage": job.stage, "name": job.name, "finished": _now(),
                     "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname()},
                )
        except CellbgError as exc:
            # bad input: a retry cannot help, so the error comes back as a result, not raised
            log.write(f"=== attempt failed {_now()}: {type(exc).__name__}: {exc}\n")
            traceback.print_exc(file=log)
            return {"user_error": str(exc)}
        except BaseException as exc:
            log.write(f"=== attempt failed {_now()}: {type(exc).__name__}: {exc}\n")
            traceback.print_exc(file=log)
            raise
        seconds = time.perf_counter() - t0
        log.write(f"=== attempt done {_now()} in {seconds:.1f} s\n")
    return {"seconds": seconds, "host": socket.gethostname()}


def _execute_pickled(blob: bytes, run_dir: str, torch_threads: int | None = None) -> dict:
    """:func:`_execute_job` of a job pickled with cloudpickle by the client.

    Dask pickles a task's nested objects with plain pickle (by reference), which fails on
    a batch node for functions defined in a script or registered to be pickled by value.
    """
    import cloudpickle

    return _execute_job(cloudpickle.loads(blob), run_dir, torch_threads)


def _attempts(log_path: Path) -> int:
    """How many attempts a job's log records."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return sum(line.startswith("=== attempt started") for line in f)
    except OSError:
        return 0


def _describe_error(exc: BaseException, attempts: int, batch_logs: Path | None = None) -> str:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        where = f"; batch-job logs in {batch_logs}" if batch_logs is not None else ""
        when = "while running it" if attempts else "before the job started"
        return f"its worker process died {when} (killed, out of memory or past walltime?{where})"
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# =========================================================================== executors
def _parse_duration(text: str) -> float:
    """Seconds in a walltime ('HH:MM:SS', 'D-HH:MM:SS', 'MM:SS') or a Dask time ('55m')."""
    text = str(text).strip()
    try:
        if ":" in text or "-" in text:
            days = 0
            if "-" in text:
                d, text = text.split("-", 1)
                days = int(d)
            parts = [float(p) for p in text.split(":")]
            while len(parts) < 3:
                parts.insert(0, 0.0)
            h, m, s = parts
            return days * 86400 + h * 3600 + m * 60 + s
        from dask.utils import parse_timedelta

        return float(parse_timedelta(text, default="s"))
    except (ValueError, KeyError, TypeError):
        raise CellbgError(
            f"executor: cannot read the duration '{text}' (use HH:MM:SS for walltime, e.g. 55m for lifetimes)"
        ) from None


def _gpu_directives(kind: str, gpus: int) -> list[str]:
    """The batch-system directive that asks for ``gpus`` GPUs (the common site syntax)."""
    if gpus <= 0:
        return []
    return {
        "slurm": [f"--gres=gpu:{gpus}"],
        "pbs": [f"-l ngpus={gpus}"],
        "sge": [f"-l gpu={gpus}"],
        "lsf": [f'-gpu "num={gpus}"'],
    }.get(kind, [])


def _torch_threads(cfg) -> int:
    """Threads each job may use: the cores of a worker shared by its concurrent jobs."""
    if cfg.kind == "local":
        return 1 if cfg.threads_per_worker > 1 else max(1, _local_cores() // _local_workers(cfg))
    return max(1, cfg.cores // cfg.processes // cfg.threads_per_worker)


def _local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _local_workers(cfg) -> int:
    return cfg.workers or max(1, _local_cores() // cfg.threads_per_worker)


def _worker_dask_config(run_dir: Path) -> Path:
    """A Dask config folder for batch-job workers, with the settings local workers get.

    Environment variables cannot carry them: Dask lower-cases their keys, and the glibc
    variable's name is upper case. The folder is in the run folder, which the nodes share.
    """
    import yaml

    from cellbg._io import write_text_atomic

    folder = Path(run_dir) / STATE_DIR / "dask-config"
    settings = {
        "distributed": {
            # Dask would pause and restart a worker at 80-95 % of `memory`, and importing
            # PyTorch alone takes ~0.7 GB; the batch system enforces the real limit.
            "worker": {"daemon": False, "memory": {"target": False, "spill": False, "pause": False,
                                                   "terminate": False}},
            "nanny": {"pre-spawn-environ": {"MALLOC_TRIM_THRESHOLD_": None}},
        }
    }
    write_text_atomic(folder / "cellbg-workers.yaml", yaml.safe_dump(settings))
    return folder


def make_cluster(cfg, run_dir: str | Path):
    """A Dask cluster for ``cfg`` (an :class:`~cellbg.protocol.ExecutorConfig`).

    ``local``: a :class:`distributed.LocalCluster` of worker processes. ``slurm``, ``pbs``,
    ``sge``, ``lsf``: a dask-jobqueue cluster whose batch jobs start workers with this
    Python (``executor.python``); the runner scales it to the jobs that remain, up to
    ``max_jobs_in_flight`` batch jobs. Each worker retires itself after
    ``worker_lifetime`` (default: walltime minus 5 minutes) and a new batch job replaces
    it, so a long run outlives any walltime.

    Examples
    --------
    >>> from cellbg.protocol import ExecutorConfig
    >>> cluster = make_cluster(ExecutorConfig(kind="slurm", gpus=1), "runs/x")  # doctest: +SKIP
    >>> print(cluster.job_script())  # the batch script each worker job runs  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if cfg.kind == "local":
        from distributed import LocalCluster

        threads = _torch_threads(cfg)
        return LocalCluster(
            n_workers=_local_workers(cfg),
            threads_per_worker=cfg.threads_per_worker,
            processes=True,
            dashboard_address=":0",  # any free port: several runs may share a machine
            silence_logs=logging.CRITICAL,
            local_directory=os.path.expandvars(cfg.local_directory) if cfg.local_directory else None,
            memory_limit=0,  # jobs own their memory; Dask must not pause or kill them for it
            env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )

    import dask_jobqueue

    classes = {
        "slurm": dask_jobqueue.SLURMCluster,
        "pbs": dask_jobqueue.PBSCluster,
        "sge": dask_jobqueue.SGECluster,
        "lsf": dask_jobqueue.LSFCluster,
    }
    walltime = _parse_duration(cfg.walltime)
    lifetime = cfg.worker_lifetime or f"{max(60, int(walltime - 300))}s"
    if _parse_duration(lifetime) >= walltime:
        raise CellbgError(
            f"executor.worker_lifetime ({lifetime}) must be shorter than executor.walltime ({cfg.walltime}) "
            "so that workers retire before the batch system kills them"
        )
    threads = _torch_threads(cfg)
    log_dir = Path(cfg.log_directory) if cfg.log_directory else run_dir / "logs" / "batch"
    log_dir.mkdir(parents=True, exist_ok=True)
    if cfg.kind == "lsf":  # LSF's -W takes [hours:]minutes
        minutes = int(walltime // 60)
        batch_walltime = f"{minutes // 60:02d}:{minutes % 60:02d}"
    else:
        batch_walltime = cfg.walltime
    kwargs: dict[str, Any] = dict(
        cores=cfg.cores,
        memory=cfg.memory,
        processes=cfg.processes,
        walltime=batch_walltime,
        job_name=f"cellbg-{_safe(run_dir.name)}"[:40],
        python=cfg.python or sys.executable,
        job_extra_directives=[*_gpu_directives(cfg.kind, cfg.gpus), *cfg.job_extra_directives],
        job_directives_skip=list(cfg.job_directives_skip),
        job_script_prologue=[
            f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}",
            f"export DASK_CONFIG={_worker_dask_config(run_dir)}",
            *cfg.job_script_prologue,
        ],
        # --nthreads again (after dask-jobqueue's cores // processes): the last one wins, so a
        # worker runs threads_per_worker jobs at once however many cores the job reserves.
        worker_extra_args=[
            "--nthreads", str(cfg.threads_per_worker),
            "--lifetime", lifetime,
            "--lifetime-stagger", cfg.worker_lifetime_stagger,
        ],
        log_directory=str(log_dir),
        scheduler_options={"dashboard_address": ":0"},
    )
    if cfg.interface:
        kwargs["interface"] = cfg.interface
    if cfg.local_directory:
        kwargs["local_directory"] = cfg.local_directory
    if cfg.queue:
        kwargs["queue"] = cfg.queue
    if cfg.account:
        kwargs["account" if cfg.kind in ("slurm", "pbs") else "project"] = cfg.account
    try:
        return classes[cfg.kind](**kwargs)
    except (ValueError, TypeError, OSError) as exc:
        raise CellbgError(f"executor '{cfg.kind}': cannot set up the cluster: {exc}") from None


_SUBMIT_COMMANDS = {"slurm": "sbatch", "pbs": "qsub", "sge": "qsub", "lsf": "bsub"}


def _check_batch_system(cfg, cluster, run_dir: Path) -> None:
    """Fail at once, in one line, when batch jobs cannot be submitted.

    Otherwise dask-jobqueue's submission errors only reach a log while the run waits for
    workers. Writes the batch script to ``<run>/logs/batch/job-script.sh``; Slurm checks it
    with ``sbatch --test-only`` (a wrong partition, account or directive).
    """
    import shutil
    import subprocess

    from cellbg._io import write_text_atomic

    command = _SUBMIT_COMMANDS[cfg.kind]
    script = write_text_atomic(
        Path(cfg.log_directory or run_dir / "logs" / "batch") / "job-script.sh", cluster.job_script()
    )
    if shutil.which(command) is None:
        cluster.close()
        raise CellbgError(
            f"executor '{cfg.kind}': '{command}' is not on this machine's PATH; run cellbg on a node "
            "that can submit batch jobs, or use --executor local"
        )
    if cfg.kind == "slurm":
        check = subprocess.run([command, "--test-only", str(script)], capture_output=True, text=True, timeout=120)
        if check.returncode != 0:
            cluster.close()
            reason = next((line for line in check.stderr.splitlines() if "error" in line), check.stderr.strip())
            raise CellbgError(f"executor 'slurm': sbatch rejects the batch script {script}: {reason}")


class _Executor:
    """Runs jobs: client jobs in this process, worker jobs on a Dask cluster made lazily.

    The cluster is started only when a worker job is not cached, so re-running a finished
    protocol starts nothing.
    """

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.client = None
        self.cluster = None
        self.adaptive = None
        self._warm: threading.Thread | None = None
        self._warm_error: BaseException | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._warm is not None:
            self._warm.join(timeout=120)
            self._warm = None
        with contextlib.suppress(Exception):
            if self.client is not None:
                self.client.close(timeout=10)
        with contextlib.suppress(Exception):
            if self.cluster is not None:
                self.cluster.close(timeout=20)
        self.client = self.cluster = self.adaptive = None
        self._stack.close()

    def warm_up(self, modules: Sequence[str] = ()) -> None:
        """Start the cluster in the background and import ``modules`` on its workers.

        Called when a run has work to do before its first worker stage: the workers start
        (and import PyTorch) while this process runs the small stages.
        """
        if self.client is not None or self._warm is not None or self.cfg.kind != "local":
            return  # batch-job workers come later anyway (and their cluster wants the main thread)

        def work() -> None:
            try:
                self._start()
                if modules:
                    self.client.run(_import_modules, list(modules))
            except BaseException as exc:  # noqa: BLE001 - raised again by _ensure_started
                self._warm_error = exc

        self._warm = threading.Thread(target=work, name="cellbg-warm-up", daemon=True)
        self._warm.start()

    def _ensure_started(self) -> None:
        if self._warm is not None:
            self._warm.join()
            self._warm = None
            if self._warm_error is not None:
                error, self._warm_error = self._warm_error, None
                raise error
        self._start()

    def _start(self) -> None:
        if self.client is not None:
            return
        import dask
        from distributed import Client

        # A task whose worker dies is retried as often as one that raises, then fails with
        # KilledWorker (never waited on forever).
        self._stack.enter_context(
            dask.config.set(
                {
                    "distributed.scheduler.allowed-failures": self.cfg.retries,
                    "distributed.scheduler.worker-saturation": 1.0,
                    # jobs may start their own process pools (segmentation, crops)
                    "distributed.worker.daemon": False,
                    # Dask sets MALLOC_TRIM_THRESHOLD_ in workers, which makes glibc return
                    # and re-fault every large buffer: PyTorch training ran 2-3x slower.
                    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                    "distributed.scheduler.worker-ttl": "5 minutes",
                    "distributed.comm.timeouts.connect": "60s",
                }
            )
        )
        self._stack.enter_context(_dask_logs_to_file(self.run_dir / "logs" / "dask.log"))
        self.cluster = make_cluster(self.cfg, self.run_dir)
        if self.cfg.kind != "local":
            _check_batch_system(self.cfg, self.cluster, self.run_dir)
            # idle workers go after a minute (between stages); never more than the job cap
            self.adaptive = self.cluster.adapt(
                Adaptive=_jobs_adaptive(), minimum_jobs=0, maximum_jobs=self.cfg.max_jobs_in_flight or 8,
                interval="2s", wait_count=30,
            )
        self.client = Client(self.cluster)

    def run_worker_jobs(self, jobs: Sequence[Job], on_update: Callable[[int, int, int], None]):
        """Run ``jobs`` on Dask; yield ``(job, result or None, exception or None)`` as they end.

        Jobs are handed to the scheduler only as worker threads are free, so a worker never
        holds queued jobs: when a job kills its worker, only that job is blamed (Dask counts
        every task on a dying worker towards ``allowed-failures``), and a batch cluster is
        asked for as many workers as jobs remain (see :func:`_jobs_adaptive`).
        """
        import cloudpickle

        self._ensure_started()
        client = self.client
        # Fixed by the configuration, never by how many jobs remain: a float sum depends on
        # the thread count, and a resumed run must give the numbers of an uninterrupted one.
        threads = _torch_threads(self.cfg)
        waiting = list(jobs)
        in_flight: dict[str, tuple[Any, Job]] = {}
        done = failed = 0
        capacity, last_poll = 0, 0.0
        no_worker_since: float | None = None
        try:
            while waiting or in_flight:
                now = time.monotonic()
                if now - last_poll > 0.5:
                    last_poll = now
                    capacity = sum(client.nthreads().values())
                    if self.adaptive is not None:
                        per_worker = self.cfg.threads_per_worker
                        self.adaptive.wanted = -(-(len(waiting) + len(in_flight)) // per_worker)
                    if capacity == 0 and self.cfg.worker_wait_timeout is not None:
                        no_worker_since = no_worker_since or now
                        if now - no_worker_since > self.cfg.worker_wait_timeout:
                            batch_logs = self.cfg.log_directory or self.run_dir / "logs" / "batch"
                            where = f" (batch-job logs: {batch_logs})" if self.cfg.kind != "local" else ""
                            wait = self.cfg.worker_wait_timeout
                            exc = RuntimeError(f"no Dask worker connected for {wait:.0f} s{where}")
                            for fut, job in in_flight.values():
                                fut.cancel()
                            for job in [j for _, j in in_flight.values()] + waiting:
                                failed += 1
                                yield job, None, exc
                            in_flight.clear()
                            waiting.clear()
                            break
                    else:
                        no_worker_since = None
                while waiting and len(in_flight) < capacity:
                    job = waiting.pop(0)
                    fut = client.submit(
                        _execute_pickled, cloudpickle.dumps(job), str(self.run_dir), threads,
                        key=f"{job.stage}-{job.key}", retries=self.cfg.retries, pure=False,
                    )
                    in_flight[fut.key] = (fut, job)
                for k, (fut, job) in list(in_flight.items()):
                    if fut.status == "finished":
                        del in_flight[k]
                        result = fut.result()
                        fut.release()
                        if "user_error" in result:
                            failed += 1
                            yield job, None, CellbgError(result["user_error"])
                        else:
                            done += 1
                            yield job, result, None
                    elif fut.status in ("error", "cancelled", "lost"):
                        del in_flight[k]
                        if fut.status == "error":
                            exc = fut.exception()
                        elif job.is_cached(self.run_dir):  # result lost after the job finished
                            done += 1
                            yield job, {}, None
                            continue
                        else:
                            exc = RuntimeError(f"Dask {fut.status} the task")
                        fut.release()
                        failed += 1
                        yield job, None, exc
                on_update(done, len(in_flight), failed)
                if waiting or in_flight:
                    time.sleep(0.1)
        finally:
            for fut, _ in in_flight.values():
                fut.cancel()
            if self.adaptive is not None:
                self.adaptive.wanted = 0
        on_update(done, 0, failed)


def _import_modules(modules: list[str]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def _jobs_adaptive():
    """An :class:`distributed.deploy.Adaptive` whose target is the runner's count of jobs.

    Dask's own target guesses from task durations; cellbg knows how many jobs remain and
    that each takes one worker thread, so it asks for exactly that many workers (capped by
    ``max_jobs_in_flight`` batch jobs) and lets idle ones go. Workers that retire at their
    ``--lifetime`` are replaced the same way.
    """
    from distributed.deploy.adaptive import Adaptive

    class _JobsAdaptive(Adaptive):
        wanted = 0

        async def target(self) -> int:
            return self.wanted

    return _JobsAdaptive


@contextlib.contextmanager
def _dask_logs_to_file(path: Path) -> Iterator[None]:
    """Send distributed's and dask-jobqueue's log lines to ``path`` instead of the terminal.

    Worker restarts and KilledWorker errors are reported by the runner itself, with the
    job's log path; the full Dask story stays in ``<run>/logs/dask.log``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in ("distributed", "dask_jobqueue", "tornado", "asyncio"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate, lg.level))
        lg.handlers = [handler]
        lg.propagate = False
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg, handlers, propagate, level in saved:
            lg.handlers, lg.propagate = handlers, propagate
            lg.setLevel(level)
        handler.close()


# =========================================================================== progress display
class _Display:
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


# =========================================================================== the loop
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


def _record_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR / "last-run.json"


def _write_record(run_dir: Path, state: str, started: str, executor: str, stages, failures) -> None:
    write_json_atomic(
        _record_path(run_dir),
        {
            "state": state,
            "started": started,
            "updated": _now(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "executor": executor,
            "cellbg": __version__,
            "stages": [
                {k: getattr(s, k) for k in ("name", "total", "cached", "ran", "failed", "seconds", "planned", "note")}
                for s in stages
            ],
            "failures": [
                {"stage": f.stage, "name": f.name, "key": f.key, "error": f.error, "log": str(f.log),
                 "attempts": f.attempts}
                for f in failures
            ],
        },
    )


def run_stages(
    stages: Sequence[Stage],
    run_dir: str | Path,
    *,
    executor=None,
    dry_run: bool = False,
    progress: bool | None = None,
    context: RunContext | None = None,
    on_start: Callable[[], Any] | None = None,
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
    started = _now()
    summaries: list[StageSummary] = []
    failures: list[JobFailure] = []
    blocked_by: str | None = None
    interrupted = False

    if dry_run:
        for stage in stages:
            if blocked_by is not None:
                note = f"planned after {blocked_by}"
                summaries.append(StageSummary(stage.name, 0, 0, 0, 0, 0.0, planned=False, note=note))
                continue
            try:
                jobs = stage.plan(ctx)
            except NotReady as exc:
                summaries.append(StageSummary(stage.name, 0, 0, 0, 0, 0.0, planned=False, note=f"planned after {exc}"))
                blocked_by = blocked_by or str(exc)
                continue
            records = tuple(JobRecord(j.name, j.key, j.is_cached(run_dir), j.where) for j in jobs)
            n_cached = sum(r.cached for r in records)
            summaries.append(StageSummary(stage.name, len(jobs), n_cached, 0, 0, 0.0, jobs=records))
            if n_cached < len(jobs):
                blocked_by = stage.name
            else:
                ctx.keys[stage.name] = hash_key(sorted(j.key for j in jobs))
        ctx.digests.save()
        return RunSummary(run_dir, cfg.kind, True, time.perf_counter() - t_run, tuple(summaries), ())

    run_dir.mkdir(parents=True, exist_ok=True)
    batch_logs = None
    if cfg.kind != "local":
        batch_logs = Path(cfg.log_directory) if cfg.log_directory else run_dir / "logs" / "batch"
    with _run_lock(run_dir), _Executor(cfg, run_dir) as ex, _Display(progress) as display:
        if on_start is not None:
            on_start()
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
                is_cached = [j.is_cached(run_dir) for j in jobs]
                todo = [j for j, c in zip(jobs, is_cached) if not c]
                if todo and stage.prepare is not None:
                    stage.prepare(ctx, todo)
                later = [m for st in stages[index:] for m in st.worker_modules]
                if todo and later:
                    ex.warm_up(later)
                display.start(stage.name, len(todo), sum(is_cached))
                stage_failures: list[JobFailure] = []
                counts = {"done": 0, "failed": 0}

                def record(job: Job, exc: BaseException | None) -> None:
                    if exc is None:
                        counts["done"] += 1
                        return
                    counts["failed"] += 1
                    log = job_log_path(run_dir, job)
                    attempts = _attempts(log)
                    stage_failures.append(
                        JobFailure(job.stage, job.name, job.key, _describe_error(exc, attempts, batch_logs), log,
                                   attempts, user_error=isinstance(exc, CellbgError))
                    )

                for job in (j for j in todo if j.where == "client"):
                    record(job, _run_in_client(job, run_dir, cfg.retries))
                    display.update(counts["done"], 0, counts["failed"])
                worker_jobs = [j for j in todo if j.where == "worker"]
                if worker_jobs:
                    base_done, base_failed = counts["done"], counts["failed"]
                    for job, _result, exc in ex.run_worker_jobs(
                        worker_jobs,
                        lambda d, r, f: display.update(base_done + d, r, base_failed + f),
                    ):
                        record(job, exc)
                summary = StageSummary(
                    stage.name,
                    len(jobs),
                    sum(is_cached),
                    counts["done"],
                    counts["failed"],
                    time.perf_counter() - t0,
                    jobs=tuple(JobRecord(j.name, j.key, c, j.where) for j, c in zip(jobs, is_cached)),
                )
                summaries.append(summary)
                display.end(summary)
                failures.extend(stage_failures)
                if stage_failures:
                    blocked_by = stage.name
                else:
                    ctx.keys[stage.name] = hash_key(sorted(j.key for j in jobs))
                _write_record(run_dir, "running", started, cfg.kind, summaries, failures)
        except KeyboardInterrupt:
            interrupted = True
            _write_record(run_dir, "interrupted", started, cfg.kind, summaries, failures)
            raise
        except BaseException:
            _write_record(run_dir, "failed", started, cfg.kind, summaries, failures)
            raise
        finally:
            ctx.digests.save()
        state = "failed" if failures else "finished"
        _write_record(run_dir, state, started, cfg.kind, summaries, failures)
    return RunSummary(
        run_dir, cfg.kind, False, time.perf_counter() - t_run, tuple(summaries), tuple(failures), interrupted
    )


def _check_unique(stage: Stage, jobs: Sequence[Job]) -> None:
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"stage {stage.name} planned two jobs named {dup[0]}")


def _run_in_client(job: Job, run_dir: Path, retries: int) -> BaseException | None:
    """Run a small job in this process with the same retries and logging as on a worker."""
    for attempt in range(retries + 1):
        try:
            result = _execute_job(job, str(run_dir))
            if "user_error" in result:  # bad input: a retry cannot help
                return CellbgError(result["user_error"])
            return None
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with its log path
            if attempt == retries:
                return exc
    return None  # pragma: no cover


# =========================================================================== the cellbg pipeline
def _section(protocol, *path: str) -> Any:
    """A part of the resolved protocol as plain JSON data (for keys)."""
    obj = json.loads(protocol.model_dump_json())
    for p in path:
        obj = obj[p]
    return obj


def _job_synth(protocol) -> None:
    """Make the synthetic dataset in ``<run>/data`` (replacing an older one only when done)."""
    from cellbg import synth

    with atomic_dir(protocol.run_dir / "data") as tmp:
        synth.make_dataset(tmp, **protocol.data.synthetic.model_dump())


def _job_segment(protocol, table) -> None:
    from cellbg import segment

    segment.run_segmentation(protocol, table=table)


def _prepare_segment(ctx: RunContext, todo: list[Job]) -> None:
    """Clear what the segment jobs to run would otherwise keep.

    ``run_segmentation`` keeps label images whose ``segmentation/params.json`` matches the
    settings; here the runner's keys decide (they also see changed image bytes), so the
    stale label images of the batches to run and the shared params file go first, in this
    process, before batches run side by side.
    """
    (ctx.run_dir / "segmentation" / "params.json").unlink(missing_ok=True)
    for job in todo:
        for out in job.outputs:
            Path(out).unlink(missing_ok=True)


def _job_crops(protocol) -> None:
    from cellbg import crops

    crops.run_crops(protocol)


def _job_train(protocol, spec, job_dir: str) -> None:
    from cellbg import train

    train.run_job(protocol, spec, job_dir=Path(job_dir))


def _job_collect(run_dir: str) -> None:
    from cellbg import train

    train.collect_predictions(Path(run_dir))


def _job_saliency(protocol) -> None:
    from cellbg import saliency

    saliency.run_saliency(protocol)


def _job_stats(run_dir: str) -> None:
    from cellbg import stats

    stats.run_stats(Path(run_dir))


def _job_report(run_dir: str) -> None:
    from cellbg import report

    report.write_report(Path(run_dir))


#: Images per segmentation job. Fixed (never from the worker count) so that cache keys do
#: not depend on the executor.
SEGMENT_BATCH = 16


def _image_table(ctx: RunContext):
    """The discovered image table with a content digest per image and mask."""
    if "images" not in ctx.data:
        from cellbg.data import discover

        if ctx.protocol.data.source == "synthetic" and not (ctx.run_dir / "data" / "manifest.csv").exists():
            raise NotReady("data")
        table = discover(ctx.protocol)
        table = table.assign(
            digest=[ctx.digests(p) for p in table["path"]],
            mask_digest=[ctx.digests(m) if m else "" for m in table["mask_path"]],
        )
        ctx.data["images"] = table
    return ctx.data["images"]


def _plan_data(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    if p.data.source == "synthetic":
        return [
            Job("data", "synthetic", hash_key("data", _section(p, "data")), _job_synth, (p,),
                where="client", outputs=(p.run_dir / "data" / "manifest.csv",))
        ]
    return []  # user data: nothing to make; the digests below carry its content into the keys


def _segment_protocol(p):
    """The protocol the segment and crops jobs get.

    On a worker one batch is one process's work (the worker pool is the parallelism), so
    ``segmentation.workers`` is 1 there. The crops job gets the same protocol: its own call
    of ``run_segmentation`` then finds the label images current and keeps them.
    """
    if p.segmentation.method == "masks":
        return p
    return p.model_copy(update={"segmentation": p.segmentation.model_copy(update={"workers": 1})})


def _plan_segment(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    ctx.key("data")
    table = _image_table(ctx).sort_values("image_id", kind="stable").reset_index(drop=True)
    seg = _section(p, "segmentation")
    seg.pop("workers", None)  # how many processes cannot change a label image
    channels = _section(p, "data", "channels")
    seg_dir = p.run_dir / "segmentation"
    masks_only = p.segmentation.method == "masks"
    worker_protocol = _segment_protocol(p)
    size = len(table) if masks_only else SEGMENT_BATCH
    jobs = []
    for start in range(0, len(table), max(size, 1)):
        batch = table.iloc[start : start + size]
        content = batch[["image_id", "digest", "mask_digest"]].values.tolist()
        name = f"images-{start:05d}-{start + len(batch) - 1:05d}"
        jobs.append(
            Job(
                "segment", name, hash_key("segment", seg, channels, content), _job_segment,
                (worker_protocol, batch.drop(columns=["digest", "mask_digest"])),
                # copying the user's masks is quick: no worker needed
                where="client" if masks_only else "worker",
                outputs=tuple(seg_dir / f"{i}.tif" for i in batch["image_id"]),
            )
        )
    return jobs


def _plan_crops(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    table = _image_table(ctx)
    content = sorted(table[["image_id", "label", "patient_id", "digest"]].values.tolist())
    crops_section = _section(p, "crops")
    crops_section.pop("workers", None)
    key = hash_key(
        "crops", ctx.key("segment"), content, _section(p, "data"), crops_section,
        _section(p, "training", "split"), p.seed,
    )
    return [
        Job("crops", "crops", key, _job_crops, (_segment_protocol(p),), where="client",
            outputs=(p.run_dir / "cells.parquet", p.run_dir / "crops.zarr"))
    ]


def _spec_name(spec) -> str:
    parts = [getattr(spec, a, None) for a in ("model", "train_variant", "seed", "fold")]
    if any(v is None for v in parts):
        return str(spec)
    model, variant, seed, fold = parts
    return f"{model}/{variant}/s{seed}/f{fold}"


def _plan_train(ctx: RunContext) -> list[Job]:
    from cellbg import _jobs as train  # planning and keys only: no torch in the client

    p = ctx.protocol
    ctx.key("crops")
    jobs = []
    for spec in train.plan_jobs(p):
        key = train.job_key(p, spec)
        job_dir = p.run_dir / "jobs" / key
        jobs.append(
            Job("train", _spec_name(spec), key, _job_train, (p, spec, str(job_dir)),
                marker=job_dir / "DONE", writes_marker=True,
                outputs=(job_dir / "predictions.parquet",))
        )
    return jobs


def _plan_predictions(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    key = hash_key("predictions", ctx.key("train"))
    return [Job("predictions", "predictions", key, _job_collect, (str(p.run_dir),), where="client",
                outputs=(p.run_dir / "predictions.parquet",))]


def _plan_saliency(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    if not p.saliency.enabled:
        return []
    key = hash_key("saliency", ctx.key("train"), ctx.key("crops"), _section(p, "saliency"), _section(p, "variants"))
    return [Job("saliency", "saliency", key, _job_saliency, (p,),
                outputs=(p.run_dir / "saliency.parquet", p.run_dir / "saliency.zarr"))]


def _plan_stats(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    key = hash_key("stats", ctx.key("predictions"), ctx.keys.get("saliency", ""), _section(p, "stats"))
    return [Job("stats", "stats", key, _job_stats, (str(p.run_dir),), where="client",
                outputs=(p.run_dir / "stats" / "tests.csv",))]


def _plan_report(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    key = hash_key("report", ctx.key("stats"), ctx.key("predictions"), ctx.keys.get("saliency", ""),
                   _section(p, "report"), p.name)
    return [Job("report", "report", key, _job_report, (str(p.run_dir),), where="client",
                outputs=(p.run_dir / "report",))]


def pipeline_stages() -> list[Stage]:
    """The cellbg pipeline: data, segment, crops, train, predictions, saliency, stats, report."""
    return [
        Stage("data", _plan_data),
        Stage("segment", _plan_segment, _prepare_segment, worker_modules=("cellbg.segment",)),
        Stage("crops", _plan_crops),
        Stage("train", _plan_train, worker_modules=("cellbg.train",)),
        Stage("predictions", _plan_predictions),
        Stage("saliency", _plan_saliency, worker_modules=("cellbg.saliency",)),
        Stage("stats", _plan_stats),
        Stage("report", _plan_report),
    ]


def run_protocol(
    protocol_path,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
) -> RunSummary:
    """Run a whole protocol, skipping every job whose inputs have not changed.

    Parameters
    ----------
    protocol_path : path or Protocol
        The protocol file (or an already loaded :class:`~cellbg.protocol.Protocol`).
    executor : {"local", "slurm", "pbs", "sge", "lsf"}, optional
        Overrides ``executor.kind`` of the protocol.
    dry_run : bool
        Only list the jobs and which are cached.
    progress : bool, optional
        Live progress display; default when stderr is a terminal.

    Returns
    -------
    RunSummary
        ``summary.ok`` is False when a job failed; ``summary.failures`` name their logs.

    Examples
    --------
    >>> summary = run_protocol("protocols/quickstart.yaml", dry_run=True)  # doctest: +SKIP
    """
    from cellbg.protocol import Protocol, load_protocol, write_resolved

    protocol = protocol_path if isinstance(protocol_path, Protocol) else load_protocol(protocol_path)
    cfg = protocol.executor
    if executor is not None:
        from cellbg._checks import look_up_option

        kind = look_up_option(str(executor), ["local", "slurm", "pbs", "sge", "lsf"], what="executor")
        cfg = cfg.model_copy(update={"kind": kind})
    run_dir = Path(protocol.run_dir).resolve()
    ctx = RunContext(run_dir=run_dir, protocol=protocol)
    return run_stages(
        pipeline_stages(), run_dir, executor=cfg, dry_run=dry_run, progress=progress, context=ctx,
        on_start=lambda: write_resolved(protocol),  # stats and report read it
    )


# =========================================================================== status
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
        record = json.loads(_record_path(run_dir).read_text())
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
