"""Tests of training jobs (cellbg.train) on real synthetic crops, real MONAI/torchvision models."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cellbg import CellbgError
from cellbg.cli import app
from cellbg.crops import run_crops
from cellbg.planning import JobSpec, PredictSpec, crops_fingerprint, job_key, plan_jobs, predict_key
from cellbg.protocol import Protocol, load_protocol
from cellbg.train import (
    RandDihedral,
    RandIntensityJitter,
    collect_predictions,
    load_job_model,
    patient_split,
    run_job,
    run_prediction,
    run_training,
    select_device,
    test_job,
    window_order,
)

TINY_RESNET = {"arch": "resnet", "depth": 10, "width": 0.25, "small_stem": False}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # The test machine is shared: one torch thread per test process is fastest and keeps
    # results comparable between this process and the subprocess of the resume test.
    monkeypatch.setenv("CELLBG_NUM_THREADS", "1")


def _config(run_dir: Path, *, signal: float, **training) -> dict:
    return {
        "name": f"signal-{signal}",
        "output": str(run_dir),
        "data": {
            "source": "synthetic",
            "synthetic": {
                "patients": 8,
                "cells_per_patient": 32,
                "cells_per_image": 4,
                "image_size": 128,
                "signal": signal,
                "seed": 1,
            },
        },
        "segmentation": {"method": "masks", "workers": 1},
        "crops": {"size": 64, "exclude_border": False, "workers": 1},
        "models": [TINY_RESNET],
        "variants": {"train": ["original", "only_fg"], "test": ["original", "only_fg", "mixed_rand"], "fill": "mean"},
        "training": {
            "epochs": 12,
            "batch_size": 32,
            "lr": 3e-3,
            "patience": 12,
            "split": {"folds": 2, "val_fraction": 0.25},
            "max_folds": 1,
            **training,
        },
    }


def _make_run(tmp_path_factory, signal: float) -> dict:
    run_dir = tmp_path_factory.mktemp(f"signal{signal}") / "run"
    config = _config(run_dir, signal=signal)
    run_crops(Protocol.model_validate(config))
    return config


@pytest.fixture(scope="module")
def strong_run(tmp_path_factory):
    return _make_run(tmp_path_factory, 1.0)


@pytest.fixture(scope="module")
def null_run(tmp_path_factory):
    return _make_run(tmp_path_factory, 0.0)


def _protocol(config: dict, **changes) -> Protocol:
    config = json.loads(json.dumps(config))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value
    return Protocol.model_validate(config)


# --------------------------------------------------------------------------- planning
def test_plan_jobs_nesting_and_fixed_split():
    p = Protocol.model_validate(
        {
            "name": "x",
            "models": [TINY_RESNET, {"arch": "cellyolo"}],
            "variants": {"train": ["original", "only_fg"]},
            "training": {"seeds": [3, 4], "split": {"folds": 3}},
        }
    )
    jobs = plan_jobs(p)
    assert len(jobs) == 2 * 2 * 2 * 3
    assert jobs[0] == JobSpec("resnet", "original", 3, 0) and jobs[-1] == JobSpec("cellyolo", "only_fg", 4, 2)
    p.training.max_folds = 1
    assert {j.fold for j in plan_jobs(p)} == {0}
    fixed = Protocol.model_validate({"name": "x", "training": {"split": {"kind": "fixed", "test_patients": ["a"]}}})
    assert [j.fold for j in plan_jobs(fixed)] == [0, 0]


def test_job_key_tracks_exactly_what_the_job_depends_on(tmp_path):
    base = {"name": "k", "output": str(tmp_path), "models": [TINY_RESNET, {"arch": "cellyolo"}]}
    p = Protocol.model_validate(base)
    spec = JobSpec("resnet", "original", 0, 0)
    key = job_key(p, spec, crops_hash="c0")
    assert len(key) == 16 and key == job_key(Protocol.model_validate(base), spec, crops_hash="c0")
    changed = {
        "crops content": job_key(p, spec, crops_hash="c1"),
        "this model's width": job_key(
            _protocol(base, **{"models": [dict(TINY_RESNET, width=0.5), {"arch": "cellyolo"}]}), spec, crops_hash="c0"
        ),
        "learning rate": job_key(_protocol(base, **{"training": {"lr": 0.01}}), spec, crops_hash="c0"),
        "fill": job_key(_protocol(base, **{"variants": {"fill": "black"}}), spec, crops_hash="c0"),
        "job seed": job_key(p, JobSpec("resnet", "original", 1, 0), crops_hash="c0"),
        "job fold": job_key(p, JobSpec("resnet", "original", 0, 1), crops_hash="c0"),
        "train variant": job_key(p, JobSpec("resnet", "only_fg", 0, 0), crops_hash="c0"),
    }
    for what, k in changed.items():
        assert k != key, what
    unchanged = {
        "other model": _protocol(base, **{"models": [TINY_RESNET, {"arch": "cellyolo", "width": 0.5}]}),
        "seed list": _protocol(base, **{"training": {"seeds": [0, 1, 2]}}),
        "other train variants": _protocol(base, **{"variants": {"train": ["original", "no_fg"]}}),
        "loader workers": _protocol(base, **{"training": {"num_workers": 2}}),
        "memory budget": _protocol(base, **{"training": {"memory_budget": "0"}}),
        "test variants": _protocol(base, **{"variants": {"test": ["original"]}}),
    }
    for what, q in unchanged.items():
        assert job_key(q, spec, crops_hash="c0") == key, what
    # a prediction job: the trained model's key and its test variant
    pk = predict_key(p, PredictSpec(spec, "original"), crops_hash="c0")
    assert pk == predict_key(
        _protocol(base, **{"variants": {"test": ["original"]}}), PredictSpec(spec, "original"), crops_hash="c0"
    )
    assert pk != predict_key(p, PredictSpec(spec, "only_fg"), crops_hash="c0")
    assert pk != predict_key(
        _protocol(base, **{"training": {"lr": 0.5}}), PredictSpec(spec, "original"), crops_hash="c0"
    )


def test_crops_fingerprint_follows_bytes(strong_run, tmp_path):
    run = Path(strong_run["output"])
    copy = tmp_path / "run"
    (copy).mkdir()
    shutil.copy(run / "cells.parquet", copy / "cells.parquet")
    shutil.copytree(run / "crops.zarr", copy / "crops.zarr")
    assert crops_fingerprint(copy) == crops_fingerprint(run)
    chunk = max((p for p in (copy / "crops.zarr" / "images").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert crops_fingerprint(copy) != crops_fingerprint(run)
    with pytest.raises(CellbgError, match="run 'cellbg crops' first"):
        crops_fingerprint(tmp_path / "nothing")


def test_streamed_crops_equal_in_memory(strong_run):
    from cellbg.crops import load_crops
    from cellbg.train import _read_crops

    run = Path(strong_run["output"])
    memory, streamed = _read_crops(run, budget="100GB"), _read_crops(run, in_memory="auto", budget="0")
    assert memory.in_memory and not streamed.in_memory
    idx = np.array([7, 2, 30, 2, 0, 200, 5])
    images, masks, _ = load_crops(run)
    for a, b in zip(memory.take(idx), streamed.take(idx), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(memory.take(idx)[0], torch.from_numpy(images[idx]))
    assert torch.equal(memory.take(idx)[1], torch.from_numpy(masks[idx]))


def test_window_order_is_a_chunk_aligned_shuffle():
    rng = np.random.default_rng(0)
    rows = np.arange(0, 1000, 2)  # every other row of a 1000-row store, 10 rows per chunk
    out = window_order(rows, 10, rng, window=40)
    assert sorted(out.tolist()) == rows.tolist()  # a permutation
    # each run of 20 consecutive rows (one window: 4 chunks of 5 training rows) spans 4 chunks
    for start in range(0, len(out), 20):
        assert len(set((out[start : start + 20] // 10).tolist())) == 4
    assert not np.array_equal(out, rows)
    # seeded: the same generator state, the same order
    assert np.array_equal(out, window_order(rows, 10, np.random.default_rng(0), window=40))


# --------------------------------------------------------------------------- splits
def _cells(folds, patients, labels):
    return pd.DataFrame({"patient_id": patients, "label": labels, "fold": folds})


def test_patient_split_known_answer_and_grouping():
    patients = [f"p{i}" for i in range(10) for _ in range(3)]
    labels = ["a" if i < 5 else "b" for i in range(10) for _ in range(3)]
    folds = [0 if i in (0, 5) else 1 for i in range(10) for _ in range(3)]
    s = patient_split(_cells(folds, patients, labels), fold=0, val_fraction=0.25, seed=0)
    assert s.test_patients == ["p0", "p5"]
    assert len(s.val_patients) == 2  # one of the four per class: stratified
    assert {p < "p5" for p in s.val_patients} == {True, False}
    assert set(s.train_patients).isdisjoint(s.val_patients) and set(s.train_patients).isdisjoint(s.test_patients)
    assert len(s.train) + len(s.val) + len(s.test) == 30
    pid = np.array(patients)
    assert set(pid[s.val]) == set(s.val_patients) and set(pid[s.train]) == set(s.train_patients)
    again = patient_split(_cells(folds, patients, labels), fold=0, val_fraction=0.25, seed=0)
    assert again.val_patients == s.val_patients
    fixed = patient_split(_cells(folds, patients, labels), fold=0, val_patients=["p3"])
    assert fixed.val_patients == ["p3"] and "p3" not in fixed.train_patients
    none = patient_split(_cells(folds, patients, labels), fold=0, val_fraction=0.0)
    assert none.val_patients == [] and len(none.val) == 0


def test_patient_in_train_and_test_is_named():
    cells = _cells([0, 0, 1, 1, 1], ["p1", "p2", "p2", "p3", "p4"], ["a", "b", "b", "a", "b"])
    with pytest.raises(CellbgError, match="patient 'p2' is in both the test set \\(fold 0\\) and the training set"):
        patient_split(cells, fold=0)
    with pytest.raises(CellbgError, match="val_patients: patient 'p9'"):
        patient_split(_cells([0, 1, 1], ["p1", "p2", "p3"], ["a", "a", "b"]), fold=0, val_patients=["p9"])
    with pytest.raises(CellbgError, match="no cells in test fold 4"):
        patient_split(_cells([0, 1], ["p1", "p2"], ["a", "b"]), fold=4)


# --------------------------------------------------------------------------- augmentation
def test_rand_dihedral_matches_torch_and_is_seeded():
    x = torch.rand(40, 2, 9, 9)
    t = RandDihedral().set_random_state(7)
    t.randomize(40)
    y = t(x)
    ops = t._ops.tolist()
    expected = torch.stack(
        [
            torch.flip(torch.rot90(x[i], o % 4, (1, 2)), (2,)) if o >= 4 else torch.rot90(x[i], o % 4, (1, 2))
            for i, o in enumerate(ops)
        ]
    )
    assert torch.equal(y, expected)
    assert len(set(ops)) > 4  # per-image draws, not one per batch
    t2 = RandDihedral().set_random_state(7)
    t2.randomize(40)
    assert torch.equal(t2(x), y)
    t3 = RandDihedral(prob=0.0).set_random_state(7)
    t3.randomize(40)
    assert torch.equal(t3(x), x)


def test_rand_intensity_jitter_bounds_and_colour():
    x = torch.rand(50, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    t = RandIntensityJitter(scale=0.2, shift=0.1).set_random_state(1)
    t.randomize(50)
    y = t(x)
    # one affine map per image, shared by its channels (colour differences only scale)
    a = (y[:, :, 0, 0] - y[:, :, 0, 1]) / (x[:, :, 0, 0] - x[:, :, 0, 1])
    assert torch.allclose(a, a[:, :1].expand_as(a), atol=1e-4)
    assert a.min() >= 0.8 - 1e-5 and a.max() <= 1.2 + 1e-5 and a.std() > 0.05
    t2 = RandIntensityJitter(scale=0.2, shift=0.1).set_random_state(1)
    t2.randomize(50)
    assert torch.equal(t2(x), y)


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
    else:
        with pytest.raises(CellbgError, match="no CUDA device"):
            select_device("cuda")


# --------------------------------------------------------------------------- one job
def test_run_job_files_predictions_and_model(strong_run, tmp_path):
    p = _protocol(strong_run, **{"training.epochs": 2, "variants.test": ["original", "mixed_same", "mixed_rand"]})
    spec = plan_jobs(p)[0]
    job_dir = tmp_path / "job"
    result = run_job(p, spec, job_dir)
    assert result.done and result.epochs == 2
    names = {f.name for f in job_dir.iterdir()}
    assert {"spec.json", "checkpoint.pt", "history.csv", "DONE"} <= names
    assert "predictions.parquet" not in names  # testing is its own job
    assert not [n for n in names if n.endswith(".tmp")]

    accuracy = test_job(p, spec, train_dir=job_dir, out_dir=tmp_path / "pred")
    pred_dir = tmp_path / "pred" / "original"
    assert (pred_dir / "DONE").stat().st_mtime_ns >= (pred_dir / "predictions.parquet").stat().st_mtime_ns
    cells = pd.read_parquet(Path(p.run_dir) / "cells.parquet")
    test_cells = cells[cells["fold"] == spec.fold]
    preds = pd.concat(
        [pd.read_parquet(tmp_path / "pred" / v / "predictions.parquet") for v in p.variants.test], ignore_index=True
    )
    expected_cols = [
        "cell_id",
        "image_id",
        "patient_id",
        "label",
        "label_index",
        "model",
        "train_variant",
        "test_variant",
        "seed",
        "fold",
        "pred",
        "pred_index",
        "correct",
        "prob_healthy",
        "prob_sezary",
        "partner_cell_id",
        "background_id",
    ]
    assert list(preds.columns) == expected_cols
    assert len(preds) == 3 * len(test_cells)
    assert set(preds["cell_id"]) == set(test_cells["cell_id"])
    np.testing.assert_allclose(preds[["prob_healthy", "prob_sezary"]].sum(axis=1), 1.0, rtol=1e-5)
    assert (preds["correct"] == (preds["pred"] == preds["label"])).all()
    orig = preds[preds["test_variant"] == "original"]
    assert (orig["partner_cell_id"] == "").all()
    label_of = dict(zip(cells["cell_id"], cells["label"], strict=True))
    same = preds[preds["test_variant"] == "mixed_same"]
    assert (same["partner_cell_id"] != "").all()
    assert all(label_of[c] == label_of[q] for c, q in zip(same["cell_id"], same["partner_cell_id"], strict=True))
    assert set(preds.loc[preds["test_variant"] == "mixed_rand", "partner_cell_id"]) <= set(test_cells["cell_id"])
    assert accuracy["original"] == pytest.approx(orig["correct"].mean())

    history = pd.read_csv(job_dir / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    for col in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seed", "init_seed", "batch_seed"):
        assert col in history and history[col].notna().all(), col
    meta = json.loads((job_dir / "spec.json").read_text())
    assert meta["job"] == spec.to_dict() and meta["key"] == result.key
    assert set(meta["patients"]["test"]).isdisjoint(meta["patients"]["train"] + meta["patients"]["val"])

    # the saved model reproduces the predicted probabilities
    model, meta2 = load_job_model(job_dir)
    assert meta2["classes"] == ["healthy", "sezary"] and not model.training
    from cellbg.crops import load_crops

    images, _, cells2 = load_crops(p.run_dir)
    rows = np.flatnonzero(cells2["fold"].to_numpy() == spec.fold)
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(images[rows])), 1).numpy()
    by_id = orig.set_index("cell_id").loc[cells2["cell_id"].iloc[rows]]
    np.testing.assert_allclose(probs[:, 1], by_id["prob_sezary"], atol=1e-5)

    # a finished job is not rerun
    mtime = (job_dir / "checkpoint.pt").stat().st_mtime_ns
    assert run_job(p, spec, job_dir).epochs == result.epochs
    assert (job_dir / "checkpoint.pt").stat().st_mtime_ns == mtime
    mtime = (pred_dir / "predictions.parquet").stat().st_mtime_ns
    run_prediction(p, PredictSpec(spec, "original"), pred_dir, train_dir=job_dir)
    assert (pred_dir / "predictions.parquet").stat().st_mtime_ns == mtime


def test_run_job_bad_inputs(strong_run, tmp_path):
    p = _protocol(strong_run, **{"training.epochs": 1})
    with pytest.raises(CellbgError, match="did you mean 'only_fg'"):
        run_job(p, JobSpec("resnet", "only_gf", 0, 0), tmp_path / "a")
    with pytest.raises(CellbgError, match="unknown model 'resnt'"):
        run_job(p, JobSpec("resnt", "original", 0, 0), tmp_path / "b")
    empty = _protocol(strong_run, output=str(tmp_path / "empty"))
    with pytest.raises(CellbgError, match="crops"):
        run_job(empty, JobSpec("resnet", "original", 0, 0))
    with pytest.raises(CellbgError, match="not finished"):
        load_job_model(tmp_path)


def test_kill_after_epoch_two_then_resume_equals_uninterrupted(strong_run, tmp_path):
    config = _config(Path(strong_run["output"]), signal=1.0, epochs=4)
    config["variants"]["test"] = ["original", "mixed_rand"]
    proto_file = tmp_path / "protocol.yaml"
    proto_file.write_text(yaml.safe_dump(config))
    p = load_protocol(proto_file, check_paths=False)
    spec = JobSpec("resnet", "original", 0, 0)

    full = run_job(p, spec, tmp_path / "full")
    assert full.done and full.epochs == 4

    killed_dir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        from cellbg.protocol import load_protocol
        from cellbg.planning import JobSpec
        from cellbg.train import run_job

        def die(epoch, row):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        p = load_protocol({str(proto_file)!r}, check_paths=False)
        run_job(p, JobSpec("resnet", "original", 0, 0), {str(killed_dir)!r}, on_epoch_end=die)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "CELLBG_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (killed_dir / "DONE").exists()
    assert list(pd.read_csv(killed_dir / "history.csv")["epoch"]) == [1, 2]

    resumed = run_job(p, spec, killed_dir)
    assert resumed.done and resumed.epochs == 4

    def weights(job_dir):
        return torch.load(job_dir / "checkpoint.pt", weights_only=False)["model"]

    a = weights(tmp_path / "full")
    for k, v in weights(killed_dir).items():
        assert torch.equal(a[k], v), k
    ha = pd.read_csv(tmp_path / "full" / "history.csv").drop(columns="seconds")
    hb = pd.read_csv(killed_dir / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)

    # the documented hook does the same without a kill
    hook_dir = tmp_path / "hook"
    part = run_job(p, spec, hook_dir, max_epochs_this_call=1)
    assert not part.done and part.epochs == 1 and not (hook_dir / "DONE").exists()
    run_job(p, spec, hook_dir)
    for k, v in weights(hook_dir).items():
        assert torch.equal(a[k], v), k


# --------------------------------------------------------------------------- the science
def _accuracy(config: dict) -> dict:
    # no validation split: every training patient trains, and the last epoch is kept
    p = _protocol(config, **{"training.epochs": 15, "training.split.val_fraction": 0.0})
    out = {}
    for spec in plan_jobs(p):
        run_job(p, spec)
        out[spec.train_variant] = test_job(p, spec)
    return out


def _extra_drop(acc: dict, test_variant: str) -> float:
    """How much more accuracy the original-trained model loses on ``test_variant`` than the
    only_fg-trained model does, each relative to the images it was trained on."""
    drop = {t: acc[t][t] - acc[t][test_variant] for t in ("original", "only_fg")}
    return drop["original"] - drop["only_fg"]


def test_planted_background_signal_is_found_and_absent_signal_is_not(strong_run, null_run):
    strong = _accuracy(strong_run)
    null = _accuracy(null_run)
    print("accuracy (train variant -> test variant)", strong, null)
    # both models learn the task from the cell alone
    assert strong["only_fg"]["only_fg"] > 0.75 and null["only_fg"]["only_fg"] > 0.75
    assert null["original"]["original"] > 0.75
    # a strong planted cue: the original-trained model leans on the background
    assert _extra_drop(strong, "only_fg") > 0.15, strong
    assert _extra_drop(strong, "mixed_rand") > 0.15, strong
    # no cue: no extra loss beyond noise
    assert _extra_drop(null, "only_fg") < 0.1, null
    assert _extra_drop(null, "mixed_rand") < 0.1, null


def test_run_training_collect_and_cli(strong_run, tmp_path):
    config = _protocol(
        strong_run, **{"training.epochs": 1, "variants.train": ["original"], "variants.test": ["original"]}
    ).model_dump(mode="json")
    proto_file = tmp_path / "p.yaml"
    proto_file.write_text(yaml.safe_dump(config))
    p = load_protocol(proto_file, check_paths=False)
    results = run_training(p)
    assert len(results) == 1 and results[0].done
    out = pd.read_parquet(Path(p.run_dir) / "predictions.parquet")
    job = pd.read_parquet(
        Path(p.run_dir) / "jobs" / predict_key(p, PredictSpec(results[0].spec, "original")) / "predictions.parquet"
    )
    pd.testing.assert_frame_equal(out, job)
    parts = sorted((Path(p.run_dir) / "predictions").glob("*.parquet"))
    assert len(parts) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(parts[0]), job)
    # the CLI finds the finished job (same key) and reports it
    res = CliRunner().invoke(app, ["train", str(proto_file)])
    assert res.exit_code == 0, res.output
    assert "1 jobs done" in res.output
    assert f"test accuracy: original {results[0].accuracy['original']:.3f}" in res.output
    res = CliRunner().invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2
    # predictions of unfinished jobs are refused with a count
    p.training.seeds = [0, 5]
    with pytest.raises(CellbgError, match="1 prediction job\\(s\\) not finished"):
        collect_predictions(p.run_dir, protocol=p)
