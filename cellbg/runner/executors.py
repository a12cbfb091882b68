"""Where worker jobs run: a Dask ``LocalCluster`` or batch jobs through dask-jobqueue.

:func:`make_cluster` builds the cluster for an :class:`~cellbg.protocol.ExecutorConfig`
(local, Slurm, PBS, SGE, LSF); :class:`Executor` starts it lazily (only when a worker job
is not cached), hands jobs to it as worker threads come free, and scales batch clusters to
the jobs that remain. This is the only module that knows about Dask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellbg._checks import CellbgError
from cellbg.runner.execute import execute_pickled
from cellbg.runner.jobs import STATE_DIR, Job, safe_name

if TYPE_CHECKING:
    from distributed import Client


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
            "worker": {
                "daemon": False,
                "memory": {"target": False, "spill": False, "pause": False, "terminate": False},
            },
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
            env={
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                **({"CELLBG_SCRATCH": cfg.scratch} if cfg.scratch else {}),
            },
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
        job_name=f"cellbg-{safe_name(run_dir.name)}"[:40],
        python=cfg.python or sys.executable,
        job_extra_directives=[*_gpu_directives(cfg.kind, cfg.gpus), *cfg.job_extra_directives],
        job_directives_skip=list(cfg.job_directives_skip),
        job_script_prologue=[
            f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}",
            f"export DASK_CONFIG={_worker_dask_config(run_dir)}",
            # node-local copy of the crop store (cellbg.crops.open_store)
            *([f'export CELLBG_SCRATCH="{cfg.scratch}"'] if cfg.scratch else []),
            *cfg.job_script_prologue,
        ],
        # --nthreads again (after dask-jobqueue's cores // processes): the last one wins, so a
        # worker runs threads_per_worker jobs at once however many cores the job reserves.
        worker_extra_args=[
            "--nthreads",
            str(cfg.threads_per_worker),
            "--lifetime",
            lifetime,
            "--lifetime-stagger",
            cfg.worker_lifetime_stagger,
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


class Executor:
    """Runs jobs: client jobs in this process, worker jobs on a Dask cluster made lazily.

    The cluster is started only when a worker job is not cached, so re-running a finished
    protocol starts nothing.
    """

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.client: Client | None = None
        self.cluster: Any = None  # LocalCluster or a dask-jobqueue cluster: no common typed base
        self.adaptive: Any = None
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
                    assert self.client is not None  # set by _start
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
                Adaptive=_jobs_adaptive(),
                minimum_jobs=0,
                maximum_jobs=self.cfg.max_jobs_in_flight or 8,
                interval="2s",
                wait_count=30,
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
        assert client is not None  # set by _ensure_started
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
                            for fut, _ in in_flight.values():
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
                    key = f"{job.stage}-{job.key}"
                    fut = client.submit(
                        execute_pickled,
                        cloudpickle.dumps(job),
                        str(self.run_dir),
                        threads,
                        key=key,
                        retries=self.cfg.retries,
                        pure=False,
                    )
                    in_flight[key] = (fut, job)  # the future's key is the one given
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
