"""The runner on a real Slurm cluster (scripts/start-slurm.sh starts a one-node one in CI).

Skipped, with the reason, only where Slurm's client commands are not installed; where they
are installed the cluster must answer, or the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from cellbg._io import write_text_atomic
from cellbg.protocol import ExecutorConfig
from cellbg.runner import Job, Stage, hash_key, run_stages

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        shutil.which("sbatch") is None or shutil.which("sinfo") is None,
        reason="Slurm is not installed here (sbatch/sinfo missing); scripts/start-slurm.sh sets up a local one as root",
    ),
]

SLURM = ExecutorConfig(
    kind="slurm",
    cores=1,
    memory="1GB",
    walltime="00:15:00",
    max_jobs_in_flight=2,
    retries=1,
    worker_wait_timeout=120,
)


@pytest.fixture(scope="module", autouse=True)
def _slurm_answers():
    state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    assert state.returncode == 0 and state.stdout.strip(), (
        f"Slurm is installed but not answering ({state.stderr.strip()}); start it with scripts/start-slurm.sh"
    )


def square_in_slurm_job(run_dir: str, name: str, value: int) -> None:
    """A job that records its result and the Slurm job it ran in."""
    job_id = os.environ.get("SLURM_JOB_ID", "")
    malloc = os.environ.get("MALLOC_TRIM_THRESHOLD_", "unset")
    write_text_atomic(Path(run_dir) / "out" / f"{name}.txt", f"{value * value} {job_id} {malloc}")


def _stages():
    def plan(ctx):
        return [
            Job(
                "square",
                f"n{i}",
                hash_key("square", i),
                square_in_slurm_job,
                (str(ctx.run_dir), f"n{i}", i),
                outputs=(ctx.run_dir / "out" / f"n{i}.txt",),
            )
            for i in range(4)
        ]

    return [Stage("square", plan)]


def test_jobs_run_in_slurm_batch_jobs(tmp_path):
    summary = run_stages(_stages(), tmp_path, executor=SLURM, progress=False)
    assert summary.ok, summary.summary()
    assert summary.ran == 4
    job_ids = set()
    for i in range(4):
        value, job_id, malloc = (tmp_path / "out" / f"n{i}.txt").read_text().split()
        assert int(value) == i * i
        assert job_id.isdigit()  # ran inside a Slurm job, not in this process
        assert malloc == "unset"  # the batch script undoes Dask's glibc setting (slow PyTorch)
        job_ids.add(job_id)
    assert 1 <= len(job_ids) <= 2  # the cap: at most two batch jobs in flight
    # dask-jobqueue wrote the batch jobs' output where the runner said
    assert any((tmp_path / "logs" / "batch").glob("*.err"))
    again = run_stages(_stages(), tmp_path, executor=SLURM, progress=False)
    assert again.ran == 0


def test_pipeline_on_slurm_gives_the_local_results(tmp_path, tmp_path_factory):
    from test_runner import assert_same_results, reference_run, write_protocol

    reference = reference_run(tmp_path_factory.getbasetemp())
    # 1GB: Dask alone would restart a worker importing PyTorch (~0.7 GB) at 95 % of it
    executor = {
        "kind": "local",
        "cores": 1,
        "memory": "1GB",
        "walltime": "00:20:00",
        "max_jobs_in_flight": 2,
        "retries": 1,
        "worker_wait_timeout": 120,
    }
    path = write_protocol(tmp_path, executor=executor)
    run = subprocess.run(
        [sys.executable, "-m", "cellbg.cli", "run", str(path), "--executor", "slurm"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    run_dir = tmp_path / "run"
    train_logs = list((run_dir / "logs").glob("train-*.log"))
    assert len(train_logs) == 8
    worker_logs = [
        log for stage in ("train", "predict", "saliency-maps") for log in (run_dir / "logs").glob(f"{stage}-*.log")
    ]
    assert len(worker_logs) == 8 + 16 + 8
    for log in worker_logs:
        assert "batch_job=" in log.read_text()  # each ran on a worker inside a Slurm job
    assert_same_results(run_dir, reference)


def test_a_rejected_batch_script_is_one_clear_error(tmp_path):
    from cellbg._checks import CellbgError

    bad = SLURM.model_copy(update={"queue": "no_such_partition"})
    with pytest.raises(CellbgError, match="sbatch rejects the batch script .*job-script.sh: .*partition"):
        run_stages(_stages(), tmp_path, executor=bad, progress=False)
    assert "#SBATCH -p no_such_partition" in (tmp_path / "logs" / "batch" / "job-script.sh").read_text()
    assert not (tmp_path / "out").exists()
