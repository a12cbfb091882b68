"""Running one job: its output captured to its log, its done marker written last.

Several jobs can share one worker process (threads), so output is routed per thread
(:func:`capture`) rather than redirected process-wide. :func:`execute_job` is what a Dask
worker (or this process, for small stages) calls for each job.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from cellbg import _progress
from cellbg._checks import CellbgError, describe_os_error
from cellbg._io import write_json_atomic
from cellbg.runner.jobs import STATE_DIR, Job, job_log_path


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
def capture(stream) -> Iterator[None]:
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


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


#: Environment variables naming the batch job a worker runs in (Slurm, PBS, LSF, SGE).
_BATCH_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def execute_job(job: Job, run_dir: str, torch_threads: int | None = None) -> dict:
    """Run one job (on a Dask worker or in this process), logging to its log file.

    Appends an ``=== attempt`` header to ``<run>/logs/<stage>-<key>.log``, runs the job with
    its output captured there, writes the done marker last, and re-raises any error (after
    writing its traceback to the log) so that Dask retries it. Bad input (a
    :class:`CellbgError`) and file-system failures (disk full, read-only, a file in the
    way) come back as ``{"user_error": message}`` instead: a retry cannot help.
    """
    try:
        return _execute_job(job, run_dir, torch_threads)
    except Exception as exc:
        message = describe_os_error(exc, where=run_dir)
        if message is None:
            raise
        return {"user_error": message}


def _execute_job(job: Job, run_dir: str | Path, torch_threads: int | None = None) -> dict:
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
            f"=== attempt started {now()} stage={job.stage} job={job.name} key={job.key} "
            f"host={socket.gethostname()} pid={os.getpid()}" + (f" batch_job={batch_job}" if batch_job else "") + "\n"
        )
        progress = _ProgressFile(run_dir, job, log)
        try:
            with capture(log), _progress.sink(progress):
                progress({})
                job.func(*job.args, **job.kwargs)
            marker = job.marker_path(run_dir)
            if job.writes_marker and not marker.exists():
                raise RuntimeError(f"job finished without writing its done marker {marker}")
            # last: the key and each output's size and digest (a damaged output is found later)
            job.write_record(
                run_dir, finished=now(), seconds=round(time.perf_counter() - t0, 3), host=socket.gethostname()
            )
        except CellbgError as exc:
            # bad input: a retry cannot help, so the error comes back as a result, not raised
            with contextlib.suppress(OSError):
                log.write(f"=== attempt failed {now()}: {type(exc).__name__}: {exc}\n")
                traceback.print_exc(file=log)
            return {"user_error": str(exc)}
        except BaseException as exc:
            with contextlib.suppress(OSError):  # the log's disk may be the one that is full
                log.write(f"=== attempt failed {now()}: {type(exc).__name__}: {exc}\n")
                traceback.print_exc(file=log)
            raise
        finally:
            progress.close()
        seconds = time.perf_counter() - t0
        with contextlib.suppress(OSError):
            log.write(f"=== attempt done {now()} in {seconds:.1f} s\n")
    return {"seconds": seconds, "host": socket.gethostname()}


def progress_path(run_dir: str | Path, job: Job) -> Path:
    """``<run>/.cellbg/progress/<stage>-<key>.json``: a running job's latest progress."""
    return Path(run_dir) / STATE_DIR / "progress" / f"{job.stage}-{job.key}.json"


class _ProgressFile:
    """The sink of a running job's :func:`cellbg._progress.report` calls.

    Writes ``progress_path`` (atomically, at most twice a second unless the job reports the
    end of a unit of its own, such as an epoch) and a line to the job's log for every
    reported epoch; removes the file when the job ends.
    """

    def __init__(self, run_dir: Path, job: Job, log):
        self.path = progress_path(run_dir, job)
        self.log = log
        self.state = {
            "stage": job.stage,
            "job": job.name,
            "key": job.key,
            "started": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.last = 0.0

    def __call__(self, fields: dict) -> None:
        self.state.update(fields)
        self.state["updated"] = time.time()
        if fields.get("line"):
            self.log.write(f"--- {fields['line']}\n")
        if fields.get("line") or time.monotonic() - self.last >= 0.5 or fields.get("done") == fields.get("total"):
            self.last = time.monotonic()
            with contextlib.suppress(OSError):
                write_json_atomic(self.path, self.state)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def read_progress(run_dir: str | Path, stage: str | None = None) -> list[dict]:
    """The progress files of the running jobs (of one stage), oldest first."""
    import json

    folder = Path(run_dir) / STATE_DIR / "progress"
    out = []
    for path in sorted(folder.glob(f"{stage or '*'}-*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text(encoding="utf-8")))
    return sorted(out, key=lambda d: d.get("started", 0.0))


def job_fraction(progress: dict) -> float:
    """How much of a job is done (0 to 1) from its progress, 0 when it has not said."""
    try:
        done, total = float(progress.get("done", 0)), float(progress.get("total", 0))
    except (TypeError, ValueError):
        return 0.0
    return min(max(done / total, 0.0), 1.0) if total > 0 else 0.0


def execute_pickled(blob: bytes, run_dir: str, torch_threads: int | None = None) -> dict:
    """:func:`execute_job` of a job pickled with cloudpickle by the client.

    Dask pickles a task's nested objects with plain pickle (by reference), which fails on
    a batch node for functions defined in a script or registered to be pickled by value.
    """
    import cloudpickle

    return execute_job(cloudpickle.loads(blob), run_dir, torch_threads)


def attempts_in_log(log_path: Path) -> int:
    """How many attempts a job's log records."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            return sum(line.startswith("=== attempt started") for line in f)
    except OSError:
        return 0


def describe_error(exc: BaseException, attempts: int, batch_logs: Path | None = None) -> str:
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        where = f"; batch-job logs in {batch_logs}" if batch_logs is not None else ""
        when = "while running it" if attempts else "before the job started"
        return f"its worker process died {when} (killed, out of memory or past walltime?{where})"
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
