"""The runner: job graph, content-addressed cache, retries, failure reports, Dask executors.

The machinery is tested with small job functions defined here that write files, run on a
real Dask LocalCluster (worker processes; a killed job really kills its worker), and a real
``cellbg run`` subprocess that is killed with SIGKILL and run again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from cellbg._checks import CellbgError
from cellbg._io import write_text_atomic
from cellbg.protocol import ExecutorConfig
from cellbg.runner import (
    FileDigests,
    Job,
    Stage,
    hash_key,
    job_log_path,
    make_cluster,
    run_stages,
    status,
)

# Workers unpickle the job functions below by value, so they need not import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOCAL = ExecutorConfig(workers=2, retries=1)


# --------------------------------------------------------------------------- job functions
def _note_call(run_dir: str, name: str) -> None:
    with open(Path(run_dir) / "calls.txt", "a") as f:
        f.write(f"{name}\n")


def write_value(run_dir: str, name: str, value: str, seconds: float = 0.0) -> None:
    """A job: (optionally sleep, then) write ``out/<name>.txt``."""
    _note_call(run_dir, name)
    print(f"job {name} writes {value}; MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_')}")
    time.sleep(seconds)
    write_text_atomic(Path(run_dir) / "out" / f"{name}.txt", value)


def raise_error(run_dir: str, name: str, value: str) -> None:
    """A job that always raises."""
    _note_call(run_dir, name)
    print(f"job {name} is about to fail")
    raise ValueError(f"value {value} is not allowed")


def fail_first_time(run_dir: str, name: str, value: str) -> None:
    """A job that raises on its first attempt only (a transient error)."""
    flag = Path(run_dir) / f"{name}.tried"
    if not flag.exists():
        flag.touch()
        _note_call(run_dir, name)
        raise OSError("transient failure")
    write_value(run_dir, name, value)


def kill_own_process(run_dir: str, name: str, value: str) -> None:
    """A job whose process dies (as under the OOM killer or a walltime)."""
    _note_call(run_dir, name)
    print(f"job {name} kills its process {os.getpid()}")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def combine(run_dir: str) -> None:
    """A client job: concatenate ``out/*.txt`` into ``total.txt``."""
    _note_call(run_dir, "combine")
    out = Path(run_dir) / "out"
    text = "".join(f"{p.stem}={p.read_text()}\n" for p in sorted(out.glob("*.txt")))
    write_text_atomic(Path(run_dir) / "total.txt", text)


def make_stages(values: dict[str, str], *, kinds: dict[str, object] | None = None, seconds: float = 0.0):
    """Two stages: ``make`` (one worker job per value) then ``combine`` (one client job)."""
    kinds = kinds or {}

    def plan_make(ctx):
        jobs = []
        for name, value in values.items():
            func = kinds.get(name, write_value)
            args = (str(ctx.run_dir), name, value) + ((seconds,) if func is write_value else ())
            out = ctx.run_dir / "out" / f"{name}.txt"
            jobs.append(Job("make", name, hash_key("make", name, value), func, args, outputs=(out,)))
        return jobs

    def plan_combine(ctx):
        key = hash_key("combine", ctx.key("make"))
        return [
            Job(
                "combine",
                "all",
                key,
                combine,
                (str(ctx.run_dir),),
                where="client",
                outputs=(ctx.run_dir / "total.txt",),
            )
        ]

    return [Stage("make", plan_make), Stage("combine", plan_combine)]


def calls(run_dir: Path) -> list[str]:
    path = run_dir / "calls.txt"
    return path.read_text().split() if path.exists() else []


# --------------------------------------------------------------------------- cache
def test_cache_dry_run_and_one_changed_job(tmp_path):
    values = {"a": "1", "b": "2", "c": "3"}
    dry = run_stages(make_stages(values), tmp_path, dry_run=True, progress=False)
    assert [(s.name, s.total, s.cached, s.planned) for s in dry.stages] == [
        ("make", 3, 0, True),
        ("combine", 0, 0, False),
    ]
    assert dry.stages[1].note == "planned after make"
    assert not (tmp_path / "out").exists()  # a dry run does nothing

    first = run_stages(make_stages(values), tmp_path, executor=LOCAL, progress=False)
    assert first.ok and first.ran == 4
    assert (tmp_path / "total.txt").read_text() == "a=1\nb=2\nc=3\n"
    assert sorted(calls(tmp_path)) == ["a", "b", "c", "combine"]
    for name in values:  # every job logged to <run>/logs/<stage>-<key>.log
        log = tmp_path / "logs" / f"make-{hash_key('make', name, values[name])}.log"
        assert f"job {name} writes {values[name]}" in log.read_text()
        # Dask's default makes glibc trim every free: PyTorch ran 2-3x slower in workers
        assert "MALLOC_TRIM_THRESHOLD_=None" in log.read_text()

    # everything cached: no job runs, no cluster starts
    t0 = time.perf_counter()
    again = run_stages(make_stages(values), tmp_path, executor=LOCAL, progress=False)
    assert again.ok and again.ran == 0 and time.perf_counter() - t0 < 2.0
    assert [s.cached for s in again.stages] == [3, 1]
    dry = run_stages(make_stages(values), tmp_path, dry_run=True, progress=False)
    assert all(j.cached for s in dry.stages for j in s.jobs) and dry.stages[1].planned

    # one value changes: only its job and the combine job run again
    changed = dict(values, b="20")
    third = run_stages(make_stages(changed), tmp_path, executor=LOCAL, progress=False)
    assert [(s.cached, s.ran) for s in third.stages] == [(2, 1), (0, 1)]
    assert sorted(calls(tmp_path)) == ["a", "b", "b", "c", "combine", "combine"]
    assert (tmp_path / "total.txt").read_text() == "a=1\nb=20\nc=3\n"


def test_missing_output_is_not_cached(tmp_path):
    values = {"a": "1"}
    stages = make_stages(values)
    assert run_stages(stages, tmp_path, executor=ExecutorConfig(workers=1), progress=False).ok
    (tmp_path / "total.txt").unlink()  # the marker says done, but the output is gone
    dry = run_stages(stages, tmp_path, dry_run=True, progress=False)
    assert [s.cached for s in dry.stages] == [1, 0]


def test_file_digests_follow_content(tmp_path):
    f = tmp_path / "img.tif"
    f.write_bytes(b"abc")
    digests = FileDigests(tmp_path / "run")
    d1 = digests(f)
    digests.save()
    assert FileDigests(tmp_path / "run")(f) == d1  # remembered across runs
    f.write_bytes(b"abd")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert FileDigests(tmp_path / "run")(f) != d1
    with pytest.raises(CellbgError, match="input file not readable"):
        digests(tmp_path / "missing.tif")


# --------------------------------------------------------------------------- failures
def test_failures_are_retried_reported_and_finished_work_kept(tmp_path):
    values = {"good": "1", "flaky": "2", "bad": "3", "killed": "4", "good2": "5"}
    kinds = {"flaky": fail_first_time, "bad": raise_error, "killed": kill_own_process}
    summary = run_stages(make_stages(values, kinds=kinds), tmp_path, executor=LOCAL, progress=False)

    assert not summary.ok
    by_name = {f.name: f for f in summary.failures}
    assert sorted(by_name) == ["bad", "killed"]
    bad, killed = by_name["bad"], by_name["killed"]
    # retries=1: two attempts each, then a report naming the job's log
    assert bad.attempts == 2 and killed.attempts == 2
    assert bad.error == "ValueError: value 3 is not allowed"
    assert "worker process died" in killed.error
    for f in (bad, killed):
        assert f.log == tmp_path / "logs" / f"make-{f.key}.log" and f.log.exists()
    assert "ValueError: value 3 is not allowed" in bad.log.read_text()  # the traceback
    assert "Traceback" in bad.log.read_text()
    assert "job killed kills its process" in killed.log.read_text()
    # the transient error was retried and succeeded; finished jobs are kept
    assert calls(tmp_path).count("flaky") == 2
    for name, value in (("good", "1"), ("flaky", "2"), ("good2", "5")):
        assert (tmp_path / "out" / f"{name}.txt").read_text() == value
    # the stage after the failure did not run
    assert summary.stages[1].planned is False and not (tmp_path / "total.txt").exists()
    assert "not run: make failed" in summary.stages[1].note

    st = status(tmp_path, stages=make_stages(values, kinds=kinds))
    assert st.state == "failed"
    assert sorted(f["name"] for f in st.failures) == ["bad", "killed"]
    assert str(bad.log) in st.summary()
    assert st.plan.stages[0].cached == 3

    # a second run keeps the three finished jobs and retries only the failed ones
    n_good = calls(tmp_path).count("good")
    again = run_stages(
        make_stages(values, kinds=kinds), tmp_path, executor=ExecutorConfig(workers=1, retries=0), progress=False
    )
    assert sorted(f.name for f in again.failures) == ["bad", "killed"]
    assert [f.attempts for f in sorted(again.failures, key=lambda f: f.name)] == [3, 3]
    assert calls(tmp_path).count("good") == n_good
    assert again.stages[0].cached == 3


def test_client_job_failure_is_reported(tmp_path):
    def plan(ctx):
        return [Job("only", "bad", hash_key("x"), raise_error, (str(ctx.run_dir), "bad", "7"), where="client")]

    summary = run_stages([Stage("only", plan)], tmp_path, executor=ExecutorConfig(retries=2), progress=False)
    (failure,) = summary.failures
    assert failure.attempts == 3 and failure.log == job_log_path(tmp_path, Job("only", "bad", hash_key("x"), print))
    assert json.loads((tmp_path / ".cellbg" / "last-run.json").read_text())["state"] == "failed"


# --------------------------------------------------------------------------- misc
def test_one_run_per_folder(tmp_path):
    import fcntl

    (tmp_path / ".cellbg").mkdir()
    with open(tmp_path / ".cellbg" / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CellbgError, match="is in use"):
            run_stages(make_stages({"a": "1"}), tmp_path, progress=False)


# --------------------------------------------------------------------------- batch-job scripts
@pytest.mark.parametrize(
    ("kind", "expected", "absent"),
    [
        (
            "slurm",
            [
                "#SBATCH -p short",
                "#SBATCH -A proj42",
                "#SBATCH --gres=gpu:1",
                "#SBATCH -t 02:00:00",
                "#SBATCH --constraint=a100",
            ],
            ["#SBATCH --mem"],
        ),
        ("pbs", ["#PBS -q short", "#PBS -A proj42", "#PBS -l ngpus=1", "#PBS -l walltime=02:00:00"], []),
        ("sge", ["#$ -q short", "#$ -P proj42", "#$ -l gpu=1", "#$ -l h_rt=02:00:00"], []),
        ("lsf", ["#BSUB -q short", '#BSUB -P "proj42"', '#BSUB -gpu "num=1"', "#BSUB -W 02:00"], []),
    ],
)
def test_batch_job_script(tmp_path, kind, expected, absent):
    cfg = ExecutorConfig(
        kind=kind,
        queue="short",
        account="proj42",
        cores=4,
        memory="16GB",
        gpus=1,
        walltime="02:00:00",
        job_extra_directives=["--constraint=a100"] if kind == "slurm" else [],
        job_directives_skip=["--mem"],
        job_script_prologue=["module load cuda/12"],
        interface="lo",
        local_directory="$TMPDIR",
        python="/opt/venv/bin/python",
    )
    cluster = make_cluster(cfg, tmp_path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in expected:
        assert line in script
    for text in absent:
        assert text not in script
    assert "module load cuda/12" in script
    assert f"export DASK_CONFIG={tmp_path / '.cellbg' / 'dask-config'}" in script
    assert "export OMP_NUM_THREADS=4" in script  # 4 cores, one job per worker
    assert "/opt/venv/bin/python -m distributed.cli.dask_worker" in script
    assert "--interface lo" in script and "--local-directory $TMPDIR" in script
    # recycle workers 5 minutes before the walltime; one cellbg job per worker at a time
    assert "--lifetime 6900s --lifetime-stagger 2m" in script
    assert script.index("--nthreads 4") < script.index("--nthreads 1")
    assert (tmp_path / "logs" / "batch").is_dir()


def test_lifetime_must_end_before_walltime(tmp_path):
    cfg = ExecutorConfig(kind="slurm", walltime="00:30:00", worker_lifetime="45m")
    with pytest.raises(CellbgError, match="must be shorter than executor.walltime"):
        make_cluster(cfg, tmp_path)


# --------------------------------------------------------------------------- the cellbg pipeline
#: A protocol small enough for the default test run: 4 patients, 2 models x 2 train
#: variants x 2 folds = 8 training jobs of one epoch on 24-pixel crops.
TINY = {
    "name": "tiny",
    "output": "run",
    "seed": 0,
    "data": {
        "source": "synthetic",
        "synthetic": {
            "patients": 4,
            "cells_per_patient": 12,
            "cells_per_image": 4,
            "image_size": 160,
            "signal": 0.9,
            "seed": 0,
        },
    },
    "segmentation": {"method": "masks"},
    "crops": {"size": 24},
    "variants": {"train": ["original", "only_fg"], "test": ["original", "only_fg"]},
    "models": [
        {"arch": "resnet", "label": "resnet_a", "depth": 10, "width": 0.125},
        {"arch": "resnet", "label": "resnet_b", "depth": 10, "width": 0.25},
    ],
    "training": {"epochs": 1, "batch_size": 32, "seeds": [0], "split": {"kind": "kfold", "folds": 2}},
    # big enough (~2 s in all) for a test to kill a saliency job's worker while the maps run
    "saliency": {"methods": ["gradcam", "occlusion"], "cells_per_job": 16, "sanity_check": True},
    "stats": {"bootstrap": 50},
    "report": {"formats": ["md"], "figures": False},
    "executor": {"workers": 2, "retries": 1},
}


def write_protocol(folder: Path, **changes) -> Path:
    """The tiny protocol (with top-level sections replaced or merged) in ``folder``."""
    import copy

    import yaml

    proto = copy.deepcopy(TINY)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(proto.get(key), dict):
            proto[key] = {**proto[key], **value}
        else:
            proto[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(proto, sort_keys=False))
    return path


def reference_run(base: Path) -> Path:
    """The tiny protocol run once, uninterrupted, per test session (test_slurm reuses it)."""
    from cellbg.runner import run_protocol

    folder = base / "tiny-reference"
    run_dir = folder / "run"
    if (
        not (run_dir / ".cellbg" / "last-run.json").exists()
        or json.loads((run_dir / ".cellbg" / "last-run.json").read_text())["state"] != "finished"
    ):
        summary = run_protocol(write_protocol(folder), progress=False)
        assert summary.ok, summary.summary()
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory.getbasetemp())


def cellbg(*args: str) -> subprocess.CompletedProcess:
    """``cellbg ARGS`` in this process (typer's CliRunner): exit code, stdout, stderr."""
    from typer.testing import CliRunner

    from cellbg.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_same_results(run_dir: Path, reference: Path, *, saliency: bool = True) -> None:
    """Same predictions, statistics (and saliency) as the reference run, to the last bit."""
    import pandas as pd

    keys = ["cell_id", "model", "train_variant", "test_variant", "seed", "fold"]
    ours = pd.read_parquet(run_dir / "predictions.parquet").sort_values(keys).reset_index(drop=True)
    theirs = pd.read_parquet(reference / "predictions.parquet").sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, theirs)
    pd.testing.assert_frame_equal(
        pd.read_csv(run_dir / "stats" / "tests.csv"), pd.read_csv(reference / "stats" / "tests.csv")
    )
    if saliency:
        pd.testing.assert_frame_equal(
            pd.read_parquet(run_dir / "saliency.parquet"), pd.read_parquet(reference / "saliency.parquet")
        )


def test_pipeline_end_to_end_and_rerun_does_no_work(reference):
    import pandas as pd

    cells = pd.read_parquet(reference / "cells.parquet")
    preds = pd.read_parquet(reference / "predictions.parquet")
    # every cell is tested once (its fold) per model x train variant x test variant x seed
    assert len(preds) == len(cells) * 2 * 2 * 2
    assert set(preds["model"]) == {"resnet_a", "resnet_b"}
    assert (reference / "stats" / "tests.csv").exists() and (reference / "saliency.parquet").exists()
    assert (reference / "report" / "report.md").exists()
    # 8 training jobs, 8 x 2 prediction jobs, 8 x 1 saliency jobs (one test variant mapped)
    assert len(list((reference / "jobs").glob("*/DONE"))) == 8 + 16 + 8
    logs = sorted(p.name.rsplit("-", 1)[0] for p in (reference / "logs").glob("*.log") if p.name != "dask.log")
    assert logs == (
        ["crops", "data"]
        + ["predict"] * 16
        + ["predictions", "report", "saliency"]
        + ["saliency-maps"] * 8
        + ["segment", "stats"]
        + ["train"] * 8
    )
    # the predictions as a dataset: one file per prediction job, the same rows
    parts = sorted((reference / "predictions").glob("*.parquet"))
    assert len(parts) == 16
    assert sum(len(pd.read_parquet(f)) for f in parts) == len(preds)
    # a second run of the finished protocol does no work (and starts no cluster)
    mtimes = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and ".cellbg" not in p.parts}
    again = cellbg("run", str(reference.parent / "protocol.yaml"))
    assert again.returncode == 0, again.stderr
    assert "0 jobs ran" in again.stdout
    # no file touched: no job ran, no cluster started (it would have written logs/dask.log)
    changed = [
        p for p, m in mtimes.items() if p.exists() and p.stat().st_mtime_ns != m and p.name != "protocol.resolved.yaml"
    ]
    assert changed == []
    st = cellbg("status", str(reference))
    assert st.returncode == 0 and "finished" in st.stdout
    assert all(line.split()[1] == line.split()[2] for line in st.stdout.splitlines()[2:] if line.strip())


def test_changing_one_model_reruns_only_its_jobs(reference, tmp_path):
    models = [TINY["models"][0], {**TINY["models"][1], "width": 0.5}]
    path = write_protocol(tmp_path, output=str(reference), models=models)
    dry = cellbg("run", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    rows = [line.split() for line in dry.stdout.splitlines()]
    train = [w for w in rows if w and w[0] == "train" and w[1] in ("cached", "to")]
    assert len(train) == 8
    to_run = [words[-1] for words in train if words[1] == "to"]
    cached = [words[-1] for words in train if words[1] == "cached"]
    assert sorted(to_run) == sorted(n for n in to_run if n.startswith("resnet_b/")) and len(to_run) == 4
    assert all(n.startswith("resnet_a/") for n in cached) and len(cached) == 4
    for stage in ("data", "segment", "crops"):
        assert any(line.startswith(stage) and " cached " in line for line in dry.stdout.splitlines())


def test_adding_a_test_variant_runs_only_its_prediction_and_saliency_jobs(reference, tmp_path):
    import shutil

    import pandas as pd

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("logs"))
    old = pd.read_parquet(run_dir / "predictions.parquet")
    old_maps = pd.read_parquet(run_dir / "saliency.parquet")
    path = write_protocol(
        tmp_path,
        variants={**TINY["variants"], "test": ["original", "only_fg", "no_fg"]},
        saliency={**TINY["saliency"], "test_variants": ["original", "no_fg"]},
    )

    def table(out: str) -> dict:
        return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}

    dry = cellbg("run", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    rows = [line.split() for line in dry.stdout.splitlines()]
    assert [w[1] for w in rows if w and w[0] == "train" and w[1] in ("cached", "to")] == ["cached"] * 8
    for stage, jobs in (("predict", 24), ("saliency-maps", 16)):
        listed = [w for w in rows if w and w[0] == stage and w[1] in ("cached", "to")]
        assert len(listed) == jobs, stage
        assert sorted(w[-1].split("/")[-1] for w in listed if w[1] == "to") == ["no_fg"] * 8, stage

    run = cellbg("run", str(path))
    assert run.returncode == 0, run.stderr
    t = table(run.stdout)
    assert t["train"][:3] == ["8", "8", "0"]  # jobs, cached, ran: no training
    assert t["predict"][:3] == ["24", "16", "8"]  # only the new variant's prediction jobs
    assert t["saliency-maps"][:3] == ["16", "8", "8"]  # and its maps
    assert not list((run_dir / "logs").glob("train-*.log"))
    new = pd.read_parquet(run_dir / "predictions.parquet")
    assert sorted(new["test_variant"].unique()) == ["no_fg", "only_fg", "original"]
    keys = ["cell_id", "model", "train_variant", "test_variant", "seed", "fold"]
    kept = new[new["test_variant"] != "no_fg"].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, old.sort_values(keys).reset_index(drop=True))
    maps = pd.read_parquet(run_dir / "saliency.parquet")
    assert sorted(maps["test_variant"].unique()) == ["no_fg", "original"]
    index = ["map_index", "shown_index"]  # positions in the run's store move; the maps do not
    pd.testing.assert_frame_equal(
        maps[maps["test_variant"] == "original"].drop(columns=index).reset_index(drop=True),
        old_maps.drop(columns=index),
    )


def test_dry_run_counts_training_jobs_before_the_crops_exist(tmp_path):
    path = write_protocol(tmp_path)
    dry = cellbg("run", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = {line.split()[0]: line for line in dry.stdout.splitlines() if line.strip()}
    assert "8 jobs" in lines["train"] and "16 jobs" in lines["predict"]
    assert not (tmp_path / "run" / "crops.zarr").exists()


def test_killed_run_resumes_with_the_same_results(reference, tmp_path):
    path = write_protocol(tmp_path)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbg.cli", "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list((run_dir / "jobs").glob("*/DONE")):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # `cellbg run` dies mid-way through training
    proc.wait(timeout=30)
    finished = {p.parent.name for p in (run_dir / "jobs").glob("*/DONE")}
    assert 1 <= len(finished) < 8
    st = cellbg("status", str(run_dir))
    assert "interrupted" in st.stdout

    again = cellbg("run", str(path))
    assert again.returncode == 0, again.stderr
    for key in finished:  # finished before the kill: not run again
        (log,) = (run_dir / "logs").glob(f"*-{key}.log")
        assert log.read_text().count("=== attempt started") == 1
    assert_same_results(run_dir, reference)


def test_failed_jobs_are_reported_with_their_logs(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("saliency.*", "logs"))
    # 1. a job that raises: an occlusion window larger than the crops, found on the worker
    path = write_protocol(tmp_path, saliency={"occlusion_window": 99})
    first = cellbg("run", str(path))
    assert first.returncode == 2  # bad input, as every user error; a killed worker below is 1
    key = json.loads((run_dir / ".cellbg" / "last-run.json").read_text())["failures"][0]["key"]
    log = run_dir / "logs" / f"saliency-maps-{key}.log"
    # a user error is not retried: one attempt, reported with the job's log
    assert re.search(r"saliency-maps resnet_\S+ failed after 1 attempt\(s\): CellbgError", first.stdout)
    assert str(log) in first.stdout
    assert "occlusion window 99" in log.read_text() and "Traceback" in log.read_text()
    table = {line.split()[0]: line.split()[1:] for line in first.stdout.splitlines() if line.strip()}
    assert table["train"][:3] == ["8", "8", "0"]  # finished training kept: 8 jobs, 8 cached, 0 ran
    assert "not run: saliency-maps failed" in first.stdout

    # 2. a job whose worker process is killed (as by the OOM killer), no retries
    path = write_protocol(tmp_path, executor={"workers": 2, "retries": 0})
    failed_before = set((run_dir / "logs").glob("saliency-maps-*.log"))  # the jobs of step 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "cellbg.cli", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    logs = []
    while not logs:
        logs = [
            p
            for p in (run_dir / "logs").glob("saliency-maps-*.log")
            if p not in failed_before and "pid=" in p.read_text()
        ]
        assert proc.poll() is None and time.monotonic() < deadline, "the saliency jobs ended before the kill"
        time.sleep(0.02)
    worker_pid = int(logs[0].read_text().split("pid=")[1].split()[0])
    os.kill(worker_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, out + err
    assert "worker process died" in out and str(logs[0]) in out
    assert "finished jobs are kept" in err

    # 3. run again: everything finishes, with the reference's numbers
    again = cellbg("run", str(path))
    assert again.returncode == 0, again.stderr
    assert_same_results(run_dir, reference)


@pytest.mark.parametrize("name", ["quickstart", "sezary", "xiao_variants", "background_factors", "hashmi_li"])
def test_shipped_protocols_are_valid(name):
    from cellbg.protocol import load_protocol
    from cellbg.variants import parse_variant

    p = load_protocol(Path(__file__).parents[1] / "protocols" / f"{name}.yaml", check_paths=False)
    for spec in [*p.variants.train, *p.variants.test, p.saliency.test_variant]:
        parse_variant(spec)
    conditions = {f"{a}:{b}" for a in p.variants.train for b in p.variants.test}
    for c in p.stats.confirmatory:
        assert {c.a, c.b} <= conditions


def test_status_needs_a_run_folder(tmp_path):
    with pytest.raises(CellbgError, match="run folder not found"):
        status(tmp_path / "nope")
    with pytest.raises(CellbgError, match="not a cellbg run folder"):
        status(tmp_path)


def test_segment_batches_on_workers_feed_crops(reference, tmp_path):
    """User data (a manifest), threshold segmentation in worker batches, then crops."""
    from cellbg.protocol import load_protocol
    from cellbg.runner import RunContext, pipeline_stages

    data = {"source": "manifest", "manifest": str(reference.parent / "run" / "data" / "manifest.csv")}
    path = write_protocol(tmp_path, data=data, segmentation={"method": "threshold"})
    protocol = load_protocol(path)
    stages = pipeline_stages()[:3]  # data, segment, crops
    summary = run_stages(
        stages, tmp_path / "run", executor=LOCAL, progress=False, context=RunContext(tmp_path / "run", protocol)
    )
    assert summary.ok, summary.summary()
    data_stage, segment, crops = summary.stages
    assert data_stage.total == 0  # user data: nothing to make
    assert segment.ran >= 1 and all(j.where == "worker" for j in segment.jobs)
    labels = sorted((tmp_path / "run" / "segmentation").glob("*.tif"))
    n_images = len((reference / "data" / "manifest.csv").read_text().splitlines()) - 1
    assert len(labels) == n_images
    assert crops.ran == 1 and (tmp_path / "run" / "cells.parquet").exists()

    # new crop size: crops run again, the label images are kept (neither the runner nor
    # run_crops' own call of run_segmentation segments again)
    stamps = [p.stat().st_mtime_ns for p in labels]
    protocol = load_protocol(
        write_protocol(tmp_path, data=data, segmentation={"method": "threshold"}, crops={"size": 28})
    )
    again = run_stages(
        stages, tmp_path / "run", executor=LOCAL, progress=False, context=RunContext(tmp_path / "run", protocol)
    )
    assert [(s.cached, s.ran) for s in again.stages[1:]] == [(segment.total, 0), (0, 1)]
    assert [p.stat().st_mtime_ns for p in labels] == stamps


def test_bad_input_inside_a_job_exits_2_with_the_file_named(tmp_path):
    """A corrupt image met by a segmentation job is a user error: exit 2, file and log named."""
    import numpy as np
    import tifffile
    from typer.testing import CliRunner

    from cellbg.cli import app

    (tmp_path / "im").mkdir()
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / "im" / f"{name}.tif", np.zeros((64, 64), np.uint8))
    (tmp_path / "im" / "c.tif").write_bytes(b"not a tiff at all")
    (tmp_path / "m.csv").write_text("path,label,patient\nim/a.tif,x,p1\nim/b.tif,y,p2\nim/c.tif,y,p1\n")
    (tmp_path / "p.yaml").write_text(
        "name: bad\noutput: run\ndata: {source: manifest, manifest: m.csv}\n"
        "segmentation: {method: threshold}\nexecutor: {workers: 1}\ntraining: {split: {folds: 2}}\n"
    )
    res = CliRunner().invoke(app, ["run", str(tmp_path / "p.yaml")])
    assert res.exit_code == 2, res.output
    assert "cannot read image" in res.output and "c.tif" in res.output
    log = next((tmp_path / "run" / "logs").glob("segment-*.log"))
    assert "c.tif" in log.read_text()


# --------------------------------------------------------------------------- progress, run log, status
def report_epochs(run_dir: str, name: str, epochs: int, seconds: float) -> None:
    """A client job that reports epochs as a training job does, then writes its output."""
    from cellbg import _progress

    for epoch in range(1, epochs + 1):
        time.sleep(seconds)
        _progress.report(
            done=epoch,
            total=epochs,
            unit="epochs",
            loss=1.0 / epoch,
            acc=0.5 + 0.1 * epoch,
            line=f"epoch {epoch}/{epochs} loss {1.0 / epoch:.4f}",
        )
    time.sleep(seconds)
    write_text_atomic(Path(run_dir) / "out" / f"{name}.txt", "x")


def test_progress_reaches_run_log_job_log_and_display(tmp_path):
    def plan(ctx):
        out = ctx.run_dir / "out" / "fit.txt"
        return [
            Job(
                "train",
                "fit",
                hash_key("fit"),
                report_epochs,
                (str(ctx.run_dir), "fit", 3, 0.7),
                where="client",
                outputs=(out,),
            )
        ]

    summary = run_stages([Stage("train", plan)], tmp_path, progress=False)
    assert summary.ok
    run_log = (tmp_path / ".cellbg" / "run.log").read_text()
    # every epoch in the job's own log; the run log samples progress twice a second
    job_log = job_log_path(tmp_path, Job("train", "fit", hash_key("fit"), report_epochs)).read_text()
    assert [ln for ln in job_log.splitlines() if ln.startswith("--- epoch")] == [
        "--- epoch 1/3 loss 1.0000",
        "--- epoch 2/3 loss 0.5000",
        "--- epoch 3/3 loss 0.3333",
    ]
    for text in (
        "run started",
        "stage train: 1 jobs, 0 cached, 1 to run",
        "train fit: started",
        "train fit: epoch 1/3 loss 1.0000",
        "train fit: epoch 2/3 loss 0.5000",
        "train fit: done in",
        "=== run finished: 1 jobs ran",
    ):
        assert text in run_log, text
    assert not list((tmp_path / ".cellbg" / "progress").glob("*.json"))  # removed when the job ended
    record = json.loads((tmp_path / ".cellbg" / "last-run.json").read_text())
    assert record["log"] == str(tmp_path / ".cellbg" / "run.log") and record["current"] is None


def test_status_shows_the_running_job_and_time_left(tmp_path):
    """A run folder as a running run leaves it: the record names the stage, a progress file
    the job's epoch; status shows both and the time left at the pace so far."""
    from cellbg.runner.status import stage_eta

    write_text_atomic(
        tmp_path / ".cellbg" / "last-run.json",
        json.dumps(
            {
                "state": "running",
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "updated": "now",
                "current": {
                    "stage": "make",
                    "started": time.time() - 120,
                    "todo": 3,
                    "cached": 0,
                    "done": 1,
                    "failed": 0,
                },
                "log": str(tmp_path / ".cellbg" / "run.log"),
            }
        ),
    )
    write_text_atomic(tmp_path / ".cellbg" / "run.log", "x\n")
    write_text_atomic(
        tmp_path / ".cellbg" / "progress" / "make-abc.json",
        json.dumps(
            {
                "stage": "make",
                "job": "resnet/original/s0/f1",
                "key": "abc",
                "started": time.time() - 30,
                "done": 7,
                "total": 28,
                "unit": "epochs",
                "loss": 0.4123,
                "acc": 0.81,
                "val_acc": 0.78,
            }
        ),
    )
    st = status(tmp_path, stages=make_stages({"a": "1"}))
    text = st.summary()
    assert "now: stage make, 1 of 3 jobs done" in text
    assert "resnet/original/s0/f1: epoch 7/28 · loss 0.412 · acc 0.81 · val acc 0.78 (running 30 s)" in text
    # 1.25 jobs' worth in 120 s: 1.75 jobs left take 168 s
    assert st.eta_seconds == pytest.approx(168, abs=2) and "about 2 min 4" in text  # 2 min 48 s (clock drift)
    assert f"log {tmp_path / '.cellbg' / 'run.log'}" in text.splitlines()[0]
    assert stage_eta({"started": 0, "todo": 2, "done": 0, "failed": 0}, [], now=10) is None


def test_live_display_moves_the_stage_bar_within_jobs(tmp_path):
    """Two of four jobs at half their epochs: the stage bar stands at 1 of 4, each job has its
    own bar with its epoch, loss and accuracy, and a job whose file is gone loses its bar."""
    import io

    from rich.console import Console

    from cellbg.runner.display import Display

    display = Display(True, tmp_path)
    display.console = Console(file=io.StringIO(), force_terminal=True, width=160)
    with display:
        display.start("train", 4, 0)
        display._stage_started -= 10  # the stage began 10 s ago
        for key in ("a", "b"):
            write_text_atomic(
                tmp_path / ".cellbg" / "progress" / f"train-{key}.json",
                json.dumps(
                    {
                        "stage": "train",
                        "job": f"resnet/original/s0/f{key}",
                        "key": key,
                        "started": time.time() - 10,
                        "done": 15,
                        "total": 30,
                        "unit": "epochs",
                        "loss": 0.25,
                        "acc": 0.9,
                    }
                ),
            )
        display.poll()
        display.update(0, 2, 0)  # the loop's own update keeps the jobs' shares
        stage, *jobs = display.progress.tasks
        assert stage.completed == pytest.approx(1.0) and stage.fields["eta"] == "ETA 0:30"
        assert [t.fields["info"] for t in jobs] == ["epoch 15/30 · loss 0.250 · acc 0.90"] * 2
        (tmp_path / ".cellbg" / "progress" / "train-a.json").unlink()
        display.update(1, 1, 0)
        display.poll()
        assert len(display.progress.tasks) == 2 and display.progress.tasks[0].completed == pytest.approx(1.5)
