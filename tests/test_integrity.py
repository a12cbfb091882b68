"""No silent wrong results: bad input, damaged run folders and file-system failures.

Each test reproduces one mistake or fault and checks the exit code, the one-line message
(what and where) and that finished work is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from cellbg._checks import CellbgError
from cellbg.cli import app
from cellbg.data import discover_folders, discover_manifest, read_image, read_mask

runner = CliRunner()


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_error_line(result) -> str:
    """The single red line a user error prints (and nothing else on stderr)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the runner's bookkeeping and logs aside) -> its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cellbg" not in p.parts and "logs" not in p.parts
    }


# --------------------------------------------------------------------------- a small masked dataset
def _cells_image(rng, *, channels: int = 3, dtype=np.uint8) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 64 field with four square cells and their instance mask."""
    mask = np.zeros((64, 64), np.int32)
    for k, (r, c) in enumerate([(8, 8), (8, 36), (36, 8), (36, 36)], start=1):
        mask[r : r + 16, c : c + 16] = k
    image = (rng.random((64, 64, channels)) * 60 + 100 * (mask > 0)[..., None]).astype(dtype)
    return (image[..., 0] if channels == 1 else image), mask


def masked_dataset(folder: Path, *, gray_first: bool = False) -> Path:
    """4 patients x 2 images, two classes, with masks; a protocol for it. Returns the protocol."""
    rng = np.random.default_rng(0)
    rows = []
    (folder / "im").mkdir(parents=True)
    (folder / "mk").mkdir()
    for p in range(4):
        for i in range(2):
            name = f"p{p}_{i}"
            channels = 1 if (gray_first and p == 0 and i == 0) else 3
            image, mask = _cells_image(rng, channels=channels)
            tifffile.imwrite(folder / "im" / f"{name}.tif", image, photometric="rgb" if channels == 3 else None)
            tifffile.imwrite(folder / "mk" / f"{name}.tif", mask)
            rows.append(f"im/{name}.tif,{'ab'[p % 2]},P{p},mk/{name}.tif")
    (folder / "m.csv").write_text("path,label,patient,mask\n" + "\n".join(rows) + "\n")
    proto = folder / "p.yaml"
    proto.write_text(
        "name: masked\noutput: run\ndata: {source: manifest, manifest: m.csv}\n"
        "segmentation: {method: masks, workers: 1}\ncrops: {size: 24, workers: 1}\n"
        "training: {split: {folds: 2}}\n"
    )
    return proto


# =========================================================================== 1. input checks
def test_nan_pixels_are_refused_naming_the_file(tmp_path):
    image = np.ones((16, 16), np.float32)
    image[3, 4] = np.nan
    image[5, 6] = np.inf
    tifffile.imwrite(tmp_path / "nan.tif", image)
    with pytest.raises(CellbgError, match=r"nan\.tif has 2 non-finite pixel\(s\)"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "ok.tif", np.ones((16, 16), np.float32))
    assert read_image(tmp_path / "ok.tif").dtype == np.float32


def test_nan_image_stops_crops_with_exit_2_and_keeps_earlier_crops(tmp_path):
    proto = masked_dataset(tmp_path)
    assert cli("crops", proto).exit_code == 0
    before = digests(tmp_path / "run")
    bad = tifffile.imread(tmp_path / "im" / "p1_1.tif").astype(np.float32)
    bad[10, 10, 0] = np.nan
    tifffile.imwrite(tmp_path / "im" / "p1_1.tif", bad, photometric="rgb")
    result = cli("crops", proto)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "p1_1.tif" in line and "non-finite" in line
    assert digests(tmp_path / "run") == before


@pytest.mark.parametrize(("axes", "word"), [("ZYX", "depth"), ("TYX", "time")])
def test_z_and_t_stacks_from_metadata_are_refused_with_advice(tmp_path, axes, word):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((3, 16, 16), np.uint16), imagej=True, metadata={"axes": axes})
    with tifffile.TiffFile(tmp_path / "s.tif") as tif:
        assert tif.series[0].axes == axes  # the metadata really says so
    with pytest.raises(CellbgError, match=rf"s\.tif is a stack with axes {axes}: .*{word}.*one plane per file"):
        read_image(tmp_path / "s.tif")
    # a plain multi-page TIFF (no axes in its metadata) still reads its pages as channels
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((3, 16, 16), np.uint16))
    assert read_image(tmp_path / "pages.tif").shape == (3, 16, 16)


def test_negative_and_fractional_labels_name_the_mask(tmp_path):
    mask = np.zeros((16, 16), np.int16)
    mask[4, 5] = -3
    tifffile.imwrite(tmp_path / "neg.tif", mask)
    with pytest.raises(CellbgError, match=r"mask .*neg\.tif holds negative labels \(e\.g\. -3 at row 4, column 5\)"):
        read_mask(tmp_path / "neg.tif")
    frac = np.zeros((16, 16), np.float32)
    frac[1, 2] = 1.5
    tifffile.imwrite(tmp_path / "frac.tif", frac)
    with pytest.raises(CellbgError, match=r"frac\.tif holds non-integer values \(e\.g\. 1\.5 at row 1, column 2\)"):
        read_mask(tmp_path / "frac.tif")


def test_negative_mask_label_in_a_run_is_named_and_not_retried(tmp_path):
    proto = masked_dataset(tmp_path)
    mask = tifffile.imread(tmp_path / "mk" / "p2_0.tif")
    mask[0, 0] = -1
    tifffile.imwrite(tmp_path / "mk" / "p2_0.tif", mask)
    result = cli("run", proto)
    assert result.exit_code == 2, result.output
    assert "mk/p2_0.tif holds negative labels" in result.output
    log = next((tmp_path / "run" / "logs").glob("segment-*.log")).read_text()
    assert log.count("=== attempt started") == 1  # a deterministic input error is never retried
    record = json.loads((tmp_path / "run" / ".cellbg" / "last-run.json").read_text())
    assert record["state"] == "failed"


def test_odd_channel_count_blames_the_odd_image(tmp_path):
    proto = masked_dataset(tmp_path, gray_first=True)  # the gray image is the first one read
    result = cli("crops", proto)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "im/p0_0.tif has 1 channel(s) but 7 of 8 images have 3" in line
    assert not (tmp_path / "run" / "cells.parquet").exists()


def test_unicode_names_get_distinct_image_ids(tmp_path):
    for label in ("a", "b"):
        for name in ("Zelle ä.tif", "Zelle ö.tif", "x y.tif", "x_y.tif"):
            (tmp_path / label / "P1").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / label / "P1" / name, np.zeros((8, 8), np.uint8))
    table = discover_folders(tmp_path)
    ids = table["image_id"].tolist()
    assert len(set(ids)) == len(ids) == 8
    assert "a_P1_Zelle_ä" in ids and "a_P1_Zelle_ö" in ids
    assert sum(i.startswith("a_P1_x_y-") for i in ids) == 2  # the pair that maps to one id gets suffixes
    again = discover_folders(tmp_path)
    assert again["image_id"].tolist() == ids  # stable


def test_manifest_listing_one_image_twice_names_both_lines(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "m.csv").write_text("path,label,patient\na.tif,x,p1\n./a.tif,y,p2\n")
    with pytest.raises(CellbgError, match=r"m\.csv:3: image \S*a\.tif is listed twice \(also on line 2\)"):
        discover_manifest(tmp_path / "m.csv")


def test_no_nan_probability_is_ever_written(tmp_path):
    from cellbg.train import check_probabilities

    preds = pd.DataFrame(
        {"cell_id": ["c1", "c2"], "test_variant": ["original"] * 2, "prob_a": [0.2, np.nan], "prob_b": [0.8, np.nan]}
    )
    with pytest.raises(CellbgError, match=r"job X: 1 of 2 prediction rows have non-finite probabilities, e\.g\. c"):
        check_probabilities(preds, where="job X")
    check_probabilities(preds.iloc[:1], where="job X")


# =========================================================================== 2. run-folder integrity
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _damage(run: Path) -> dict[str, str]:
    """Damage one file of every kind a finished run depends on; ``{path: how}``."""
    jobs = sorted(p for p in (run / "jobs").iterdir() if (p / "DONE").exists() and (p / "checkpoint.pt").exists())
    tested = sorted(
        p for p in (run / "jobs").iterdir() if (p / "DONE").exists() and (p / "predictions.parquet").exists()
    )
    chunk = next(p for p in sorted((run / "crops.zarr").rglob("*")) if p.is_file() and p.name != "zarr.json")
    label = sorted((run / "segmentation").glob("*.tif"))[0]
    plan = {
        label: "truncate",
        run / "cells.parquet": "truncate",
        chunk: "flip",  # same size, other bytes
        tested[0] / "predictions.parquet": "truncate",
        jobs[1] / "checkpoint.pt": "delete",
        jobs[2] / "history.csv": "truncate",
        jobs[3] / "checkpoint.pt": "truncate",
        run / "predictions.parquet": "delete",
        run / "saliency.parquet": "truncate",
        run / "stats" / "tests.csv": "delete",
        run / "report" / "report.md": "truncate",
    }
    for path, how in plan.items():
        {"truncate": _truncate, "flip": _flip_byte, "delete": Path.unlink}[how](path)
    return {str(p.relative_to(run)): how for p, how in plan.items()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The runner tests' tiny reference run (shared with them in one session)."""
    from test_runner import reference_run

    return reference_run(tmp_path_factory.getbasetemp())


def test_damaged_run_folder_is_found_redone_and_gives_identical_results(finished_run, tmp_path):
    from test_runner import assert_same_results

    shutil.copytree(finished_run.parent, tmp_path / "copy")  # keeps modification times
    run = tmp_path / "copy" / "run"
    assert cli("status", "--verify", run).exit_code == 0
    damaged = _damage(run)

    result = cli("status", "--verify", run)
    assert result.exit_code == 2
    assert one_error_line(result).startswith(f"error: {len(damaged)} damaged file(s) in {run}")
    for rel in damaged:
        assert f": {rel}: " in result.stdout, rel  # every damaged file is named

    result = cli("run", tmp_path / "copy" / "protocol.yaml")
    assert result.exit_code == 0, result.output
    assert "redone: damaged outputs" in result.stdout
    assert_same_results(run, finished_run)
    for rel in damaged:  # every file is back, with the same bytes as the undamaged run
        if not rel.endswith(("checkpoint.pt", ".md")):
            assert (run / rel).read_bytes() == (finished_run / rel).read_bytes(), rel
    assert cli("status", "--verify", run).exit_code == 0
    again = cli("run", tmp_path / "copy" / "protocol.yaml")
    assert again.exit_code == 0 and "(0 jobs ran" in again.stdout


# =========================================================================== 3. validate before any work
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\ntraining:\n  seeds: []\n", "p.yaml:3: training.seeds: List should have at least 1 item"),
        ("name: x\ntraining:\n  epochs: 2\n  epochs: 3\n", "p.yaml:4: duplicate key 'epochs' (first on line 3)"),
        ("name: x\ncrops: {size: 32, size: 48}\n", "p.yaml:2: duplicate key 'size' (first on line 2)"),
        (
            "name: x\nstats:\n  confirmatory:\n  - a: original:original\n    b: original:blur\n",
            "stats.confirmatory[0].b = 'original:blur': 'blur' is not in variants.test",
        ),
        (
            "name: x\nvariants: {train: [original]}\nstats:\n  confirmatory:\n  - a: only_fg:original\n"
            "    b: original:original\n",
            "stats.confirmatory[0].a = 'only_fg:original': 'only_fg' is not in variants.train",
        ),
        (
            "name: x\ndata: {synthetic: {patients: 3}}\ntraining: {split: {folds: 5}}\n",
            "p.yaml: training.split.folds: 3 patients (data.synthetic.patients) cannot fill 5",
        ),
        (
            "name: x\nsegmentation: {method: cellpose, model: weights/missing.pth}\n",
            "p.yaml: segmentation.model: Cellpose weights file not found",
        ),
    ],
)
def test_validate_finds_protocol_mistakes_before_any_work(tmp_path, text, expected):
    (tmp_path / "p.yaml").write_text(text)
    result = cli("validate", tmp_path / "p.yaml")
    assert result.exit_code == 2
    line = one_error_line(result)
    assert expected in line.replace(str(tmp_path) + "/", ""), line
    assert not (tmp_path / "runs").exists()  # nothing was made


def test_validate_counts_the_patients_of_the_data_listing(tmp_path):
    proto = masked_dataset(tmp_path)  # 4 patients
    assert cli("validate", proto).exit_code == 0
    proto.write_text(proto.read_text().replace("folds: 2", "folds: 5"))
    result = cli("validate", proto)
    assert result.exit_code == 2
    assert "p.yaml: training.split: 4 patients cannot fill 5 patient-grouped folds" in one_error_line(result)
    result = cli("run", proto)  # and run stops before any work
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


def test_validate_refuses_cuda_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    (tmp_path / "p.yaml").write_text("name: x\ntraining: {device: cuda}\n")
    result = cli("validate", tmp_path / "p.yaml")
    assert result.exit_code == 2
    assert "training.device: 'cuda' but this machine has no CUDA GPU" in one_error_line(result)
    (tmp_path / "p.yaml").write_text("name: x\ntraining: {device: cuda}\nexecutor: {kind: slurm}\n")
    assert cli("validate", tmp_path / "p.yaml").exit_code == 0  # batch jobs run on other nodes


# =========================================================================== 4. file-system failures
def _write_bytes(run_dir: str, name: str, size: int) -> None:
    """A job that writes ``size`` bytes to ``<run>/<name>`` atomically."""
    from cellbg._io import atomic_path

    with atomic_path(Path(run_dir) / name) as tmp:
        tmp.write_bytes(b"x" * size)


def _fill_disk(run_dir: str, name: str) -> None:
    """A job that fills the disk with a file it leaves behind (as a foreign program would)."""
    with open(Path(run_dir) / name, "wb") as f:
        while True:
            f.write(b"x" * 65536)
            f.flush()


def _two_stages(second):
    from cellbg.runner import Job, Stage, hash_key

    def plan_first(ctx):
        return [
            Job(
                "first",
                "first",
                hash_key("first"),
                _write_bytes,
                (str(ctx.run_dir), "first.bin", 1000),
                where="client",
                outputs=(ctx.run_dir / "first.bin",),
            )
        ]

    def plan_second(ctx):
        return [
            Job(
                "second",
                "second",
                hash_key("second", ctx.key("first")),
                second,
                (str(ctx.run_dir), "second.bin", *((1 << 20,) if second is _write_bytes else ())),
                where="client",
                outputs=(ctx.run_dir / "second.bin",),
            )
        ]

    return [Stage("first", plan_first), Stage("second", plan_second)]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only): a real full disk, no mocks."""
    import os
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("second", [_write_bytes, _fill_disk], ids=["write", "fill"])
def test_disk_full_is_a_listed_user_error_and_the_run_record_is_closed(tiny_disk, second):
    from cellbg.protocol import ExecutorConfig
    from cellbg.runner import run_stages

    run = tiny_disk / "run"
    summary = run_stages(_two_stages(second), run, executor=ExecutorConfig(retries=2), progress=False)
    assert not summary.ok and [s.name for s in summary.stages] == ["first", "second"]
    failure = summary.failures[0]
    assert (failure.stage, failure.user_error, failure.attempts) == ("second", True, 1)  # listed, not retried
    assert failure.error.startswith((f"CellbgError: cannot write {run}/", f"CellbgError: cannot write a file in {run}"))
    assert "no space left on the device" in failure.error
    record = json.loads((run / ".cellbg" / "last-run.json").read_text())
    assert record["state"] == "failed"  # closed, even with the disk full
    assert (run / "first.bin").read_bytes() == b"x" * 1000  # earlier work unchanged
    assert not (run / ".cellbg" / "done" / "second").exists()  # never taken as done


def test_disk_full_in_the_cli_exits_2_naming_the_path(tiny_disk, tmp_path):
    import subprocess

    subprocess.run(["mount", "-o", "remount,size=64k", str(tiny_disk)], check=True)
    proto = masked_dataset(tmp_path / "data")
    proto.write_text(
        proto.read_text()
        .replace("output: run", f"output: {tiny_disk / 'run'}")
        .replace("crops: {size: 24", "crops: {size: 128")
    )
    result = cli("crops", proto)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"cannot write {tiny_disk}/run/crops.zarr: no space left on the device" in line
    assert not (tiny_disk / "run" / "cells.parquet").exists()
    assert len(list((tiny_disk / "run" / "segmentation").glob("*.tif"))) == 8  # the earlier stage's work


def test_output_path_that_is_a_file_exits_2_naming_it(tmp_path):
    proto = masked_dataset(tmp_path)
    (tmp_path / "run").write_text("not a folder")
    result = cli("run", proto)
    assert result.exit_code == 2
    assert one_error_line(result) == (
        f"error: cannot write {tmp_path / 'run'}: a file is in the way; move it away or choose another output folder"
    )
    assert (tmp_path / "run").read_text() == "not a folder"
    proto.write_text(proto.read_text().replace("output: run", "output: run/inner"))
    result = cli("run", proto)
    assert result.exit_code == 2 and "a file is in the way (a folder is needed there)" in one_error_line(result)


def test_read_only_output_exits_2_naming_it(tiny_disk, tmp_path):
    import subprocess

    proto = masked_dataset(tmp_path)
    proto.write_text(proto.read_text().replace("output: run", f"output: {tiny_disk / 'run'}"))
    (tiny_disk / "kept.txt").write_text("earlier work")
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    result = cli("run", proto)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert f"cannot write {tiny_disk / 'run'}: read-only file system" in line
    assert (tiny_disk / "kept.txt").read_text() == "earlier work"


def test_dry_run_into_a_closed_pipe_ends_cleanly(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "p.yaml").write_text("name: x\n")
    read, write = os.pipe()
    os.close(read)  # like `| head -1` after its line: every write fails with EPIPE
    result = subprocess.run(
        [sys.executable, "-m", "cellbg.cli", "run", "--dry-run", str(tmp_path / "p.yaml")],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write)
    assert result.returncode == 0, result.stderr
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr


def _one_file(run: Path, kind: str) -> Path:
    jobs = sorted(p for p in (run / "jobs").iterdir() if (p / "DONE").exists() and (p / "checkpoint.pt").exists())
    tested = sorted(
        p for p in (run / "jobs").iterdir() if (p / "DONE").exists() and (p / "predictions.parquet").exists()
    )
    return {
        "label": lambda: sorted((run / "segmentation").glob("*.tif"))[0],
        "cells": lambda: run / "cells.parquet",
        "crops": lambda: next(p for p in sorted((run / "crops.zarr").rglob("*")) if p.is_file()),
        "job_predictions": lambda: tested[0] / "predictions.parquet",
        "checkpoint": lambda: jobs[0] / "checkpoint.pt",
        "history": lambda: jobs[0] / "history.csv",
        "spec": lambda: jobs[0] / "spec.json",
        "predictions": lambda: run / "predictions.parquet",
        "saliency": lambda: run / "saliency.parquet",
        "saliency_maps": lambda: next(p for p in sorted((run / "saliency.zarr").rglob("*")) if p.is_file()),
        "tests": lambda: run / "stats" / "tests.csv",
        "report": lambda: run / "report" / "report.md",
    }[kind]()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize(
    "kind",
    [
        "label",
        "cells",
        "crops",
        "job_predictions",
        "checkpoint",
        "history",
        "spec",
        "predictions",
        "saliency",
        "saliency_maps",
        "tests",
        "report",
    ],
)
def test_each_damaged_file_alone_is_redone(finished_run, tmp_path, kind, how):
    from test_runner import assert_same_results

    shutil.copytree(finished_run.parent, tmp_path / "copy")
    run = tmp_path / "copy" / "run"
    target = _one_file(run, kind)
    _truncate(target) if how == "truncate" else target.unlink()
    result = cli("status", "--verify", run)
    assert result.exit_code == 2 and str(target.relative_to(run)) in result.stdout
    result = cli("run", tmp_path / "copy" / "protocol.yaml")
    assert result.exit_code == 0, result.output
    assert_same_results(run, finished_run)
    assert cli("status", "--verify", run).exit_code == 0


def test_training_on_nan_crops_stops_with_a_clear_error(finished_run, tmp_path):
    import zarr

    from cellbg.planning import plan_jobs
    from cellbg.protocol import load_run
    from cellbg.train import run_job

    shutil.copytree(finished_run, tmp_path / "run", ignore=shutil.ignore_patterns("jobs", "saliency*", "logs"))
    protocol = load_run(tmp_path / "run").model_copy(update={"output": tmp_path / "run"})
    group = zarr.open_group(str(tmp_path / "run" / "crops.zarr"), mode="r+")
    shape, chunks = group["images"].shape, group["images"].chunks
    del group["images"]  # float images are stored as float32: crops of NaN images would be NaN
    group.create_array("images", data=np.full(shape, np.nan, np.float32), chunks=chunks)
    group.attrs["divisor"] = 1.0
    spec = plan_jobs(protocol)[0]
    with pytest.raises(CellbgError, match=r"training job .*: the training loss is nan at epoch 1; check the crops"):
        run_job(protocol, spec, job_dir=tmp_path / "job")
    assert not (tmp_path / "job" / "predictions.parquet").exists()
