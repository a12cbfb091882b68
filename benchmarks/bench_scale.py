"""Cohort scale: crops, store size, training memory and throughput, prediction speed.

For synthetic cohorts of ``--sizes`` cells (default 10k and 100k; ``--million`` adds 1M) it
prints, per cohort:

* crops seconds (``run_crops`` on the synthetic images with their exact masks; the
  synthetic images themselves are made first, not timed);
* store bytes per cell and the ratio to the source pixels' bytes (target <= 1.1x);
* training: peak RSS and train cells/s of the same training batches (the same cells, the
  same order, the same model) read from memory and streamed from the store, each in a
  fresh process, in this run (targets: streamed >= 0.9x in memory; peak RSS <= 4 GB);
* prediction rows/s (streamed, blocks of ``PREDICT_BLOCK`` cells, one test variant).

The 1M cohort (and any ``--replicated`` size) is **generated directly into the store**: the
largest cohort made from images is replicated (its crops, masks, others masks and cell rows,
chunk by chunk; cell and image ids suffixed ``-r<k>``, patients kept, so folds stay
patient-grouped) until it holds that many cells; its "crops seconds" is that replication
time, marked ``r``.

Training is timed over ``--steps`` batches of the first epoch (``cellbg.train``'s own
loader and ``train_epoch``: chunk-aligned shuffle, variant, augmentation, forward, backward,
step) with the quickstart's tiny ResNet at ``--threads`` torch threads.

    .venv/bin/python benchmarks/bench_scale.py                 # 10k, 100k
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000   # quick look
    .venv/bin/python benchmarks/bench_scale.py --million       # + 1M generated into the store
    .venv/bin/python benchmarks/bench_scale.py --sizes 10000 --replicated 100000 1000000  # a loaded machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATIENTS = 40
CROP = 48


def _protocol_text(cells: int, out: str) -> str:
    per_patient = max(2, cells // PATIENTS)
    return f"""
name: scale
output: {out}
seed: 0
data:
  source: synthetic
  synthetic: {{patients: {PATIENTS}, cells_per_patient: {per_patient}, cells_per_image: 16, image_size: 256,
              signal: 0.9, seed: 0}}
segmentation: {{method: masks}}
crops: {{size: {CROP}, exclude_border: false}}
variants: {{train: [original], test: [original]}}
models: [{{arch: resnet, depth: 10, width: 0.125}}]
training: {{epochs: 1, batch_size: 64, seeds: [0], split: {{kind: kfold, folds: 5}}, max_folds: 1,
           device: cpu}}
"""


def _make_cohort(cells: int, root: Path) -> tuple[Path, dict]:
    from cellbg.crops import run_crops
    from cellbg.data import discover
    from cellbg.protocol import parse_protocol

    folder = root / f"n{cells}"
    folder.mkdir(parents=True, exist_ok=True)
    protocol = parse_protocol(_protocol_text(cells, "run"), base_dir=folder)
    timing = folder / "timing.json"
    if timing.exists() and (Path(protocol.run_dir) / "crops.json").exists():  # --keep: made by an earlier run
        summary = json.loads((Path(protocol.run_dir) / "crops.json").read_text())
        return Path(protocol.run_dir), {**json.loads(timing.read_text()), **summary}
    t0 = time.perf_counter()
    table = discover(protocol)  # makes the synthetic images (not timed)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_crops(protocol, table)
    seconds = time.perf_counter() - t0
    (folder / "protocol.yaml").write_text(_protocol_text(cells, "run"))
    timing.write_text(json.dumps({"crops_seconds": seconds, "images_seconds": made}))
    summary = json.loads((Path(protocol.run_dir) / "crops.json").read_text())
    return Path(protocol.run_dir), {"crops_seconds": seconds, "images_seconds": made, **summary}


def _replicate(source_run: Path, target: int, root: Path) -> tuple[Path, dict]:
    """A store of ``target`` cells made by repeating ``source_run``'s crops (see the module doc)."""
    import numpy as np
    import pandas as pd
    import zarr

    from cellbg.crops import _compressors, _ids_hash, store_bytes

    folder = root / f"n{target}"
    run = folder / "run"
    made = folder / "replicated.json"
    if made.exists() and json.loads(made.read_text()).get("source") == str(source_run):  # --keep: made before
        return run, json.loads(made.read_text())["info"]
    t0 = time.perf_counter()
    run.mkdir(parents=True, exist_ok=True)
    (folder / "protocol.yaml").write_text(_protocol_text(target, "run"))
    cells = pd.read_parquet(source_run / "cells.parquet")
    src = zarr.open_group(str(source_run / "crops.zarr"), mode="r")
    n0 = len(cells)
    reps = -(-target // n0)
    parts = []
    for k in range(reps):
        c = cells.copy()
        c["cell_id"] = c["cell_id"].astype(str) + f"-r{k}"
        c["image_id"] = c["image_id"].astype(str) + f"-r{k}"
        parts.append(c)
    big = pd.concat(parts, ignore_index=True).iloc[:target].reset_index(drop=True)
    group = zarr.open_group(str(run / "crops.zarr"), mode="w")
    img, msk = src["images"], src["masks"]
    oth = src["others"] if "others" in src else None
    out_i = group.create_array(
        "images", shape=(target, *img.shape[1:]), chunks=img.chunks, dtype=img.dtype, compressors=_compressors()
    )
    out_m = group.create_array(
        "masks", shape=(target, *msk.shape[1:]), chunks=msk.chunks, dtype=msk.dtype, compressors=_compressors()
    )
    out_o = (
        group.create_array(
            "others", shape=(target, *oth.shape[1:]), chunks=oth.chunks, dtype=oth.dtype, compressors=_compressors()
        )
        if oth is not None
        else None
    )
    step = img.chunks[0] * 64
    for start in range(0, target, step):
        stop = min(start + step, target)
        rows = np.arange(start, stop) % n0
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block_i, block_m = img[lo:hi], msk[lo:hi]
        out_i[start:stop] = block_i[rows - lo]
        out_m[start:stop] = block_m[rows - lo]
        if out_o is not None:
            out_o[start:stop] = oth[lo:hi][rows - lo]
    group.attrs.update(dict(src.attrs))
    group.attrs["cell_ids_sha256"] = _ids_hash(big["cell_id"])
    big.to_parquet(run / "cells.parquet", index=False)
    n_bytes = store_bytes(run / "crops.zarr")
    source = target * int(np.prod(img.shape[1:])) * img.dtype.itemsize
    info = {
        "crops_seconds": time.perf_counter() - t0,
        "replicated": True,
        "cells": target,
        "store_bytes": n_bytes,
        "store_bytes_per_cell": n_bytes / target,
        "source_pixel_bytes": source,
        "store_dtype": str(img.dtype),
    }
    made.write_text(json.dumps({"source": str(source_run), "info": info}))
    return run, info


# --------------------------------------------------------------------------- child processes
def _own_peak_rss() -> int:
    """This process's peak RSS in bytes since its exec (``VmHWM``; ``ru_maxrss`` would include
    the driver's peak, which Linux carries across ``vfork`` + ``exec``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _train_child(run_dir: str, mode: str, steps: int, threads: int) -> dict:
    """Time ``steps`` training batches; runs in a fresh process (its peak RSS is the job's)."""
    import itertools

    import torch

    from cellbg.protocol import load_protocol
    from cellbg.train import (
        _epoch_loader,
        _job_seeds,
        _read_crops,
        get_model,
        patient_split,
        train_epoch,
    )

    torch.set_num_threads(threads)
    protocol = load_protocol(Path(run_dir).parent / "protocol.yaml", check_paths=False)
    spec = __import__("cellbg.planning", fromlist=["plan_jobs"]).plan_jobs(protocol)[0]
    t0 = time.perf_counter()
    crops = _read_crops(Path(run_dir), in_memory=(mode == "memory"))
    load = time.perf_counter() - t0
    split = patient_split(crops.cells, fold=spec.fold, val_fraction=0.2, seed=protocol.seed)
    seeds = _job_seeds(protocol, spec)
    torch.manual_seed(0)
    model = get_model("resnet", in_channels=crops.channels, num_classes=len(crops.classes), depth=10, width=0.125)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = _epoch_loader(crops, split.train, protocol, spec, seeds, 1, device=torch.device("cpu"))
    warm = 3
    batches = iter(loader)
    train_epoch(model, itertools.islice(batches, warm), opt)
    t0 = time.perf_counter()
    _, _, seen = train_epoch(model, itertools.islice(batches, steps), opt)
    seconds = time.perf_counter() - t0
    peak = _own_peak_rss()
    return {
        "mode": mode,
        "cells_per_s": seen / seconds,
        "seen": seen,
        "load_seconds": load,
        "peak_rss": peak,
        "in_memory": crops.in_memory,
    }


def _predict_child(run_dir: str, rows: int, threads: int) -> dict:
    import numpy as np
    import torch

    from cellbg.train import _evaluate_rows, _read_crops, get_model

    torch.set_num_threads(threads)
    crops = _read_crops(Path(run_dir), in_memory=False)
    idx = np.flatnonzero(crops.cells["fold"].to_numpy() == 0)[:rows]
    torch.manual_seed(0)
    model = get_model("resnet", in_channels=crops.channels, num_classes=len(crops.classes), depth=10, width=0.125)
    model.eval()
    t0 = time.perf_counter()
    _evaluate_rows(
        model, crops, idx, "original", fill="mean", seed=0, device=torch.device("cpu"), batch_size=256, amp=False
    )
    seconds = time.perf_counter() - t0
    peak = _own_peak_rss()
    return {"rows_per_s": len(idx) / seconds, "rows": len(idx), "peak_rss": peak}


def _available_memory() -> int:
    """Bytes the kernel can give without swapping (``MemAvailable``: free memory plus the page
    cache it can drop; the free pages alone leave out a cache full of the cohorts' files)."""
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="cohorts made from images")
    parser.add_argument("--million", action="store_true", help="add 1M cells generated directly into the store")
    parser.add_argument(
        "--replicated",
        type=int,
        nargs="*",
        default=[],
        help="further cohorts generated directly into the store (replicating the largest one made)",
    )
    parser.add_argument("--steps", type=int, default=40, help="timed training batches (batch 64)")
    parser.add_argument("--predict-rows", type=int, default=20_000, help="rows timed for prediction")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each training mode, alternated; fastest kept")
    parser.add_argument("--keep", type=Path, default=None, help="keep the cohorts in this folder")
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.4,
        help="time the in-memory mode only when its crops take less than this share of the free memory",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = json.loads(args.child)
        result = _train_child(*rest) if kind == "train" else _predict_child(*rest)
        print(json.dumps(result))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    cohorts = []
    for n in sorted(args.sizes):
        cohorts.append((n, *_make_cohort(n, root)))
    source = cohorts[-1][1]
    for n in sorted(set(args.replicated + ([1_000_000] if args.million else []))):
        cohorts.append((n, *_replicate(source, n, root)))

    header = (
        f"{'cells':>9} {'crops s':>8} {'B/cell':>7} {'store/src':>9} {'RSS mem GB':>10} {'RSS str GB':>10} "
        f"{'mem c/s':>8} {'str c/s':>8} {'str/mem':>7} {'pred r/s':>9}"
    )
    lines = []
    for _n, run, info in cohorts:
        mem_need = info["cells"] * (CROP * CROP * 5)  # 3 channels uint8 + masks and others (bool) per pixel
        avail = _available_memory()
        memory = stream = None
        for _ in range(args.repeats):  # alternated, the fastest of each kept: the machine may be shared
            if mem_need < args.memory_fraction * avail:
                m = _child(["train", str(run), "memory", args.steps, args.threads])
                memory = m if memory is None or m["cells_per_s"] > memory["cells_per_s"] else memory
            st = _child(["train", str(run), "stream", args.steps, args.threads])
            stream = st if stream is None or st["cells_per_s"] > stream["cells_per_s"] else stream
        pred = _child(["predict", str(run), args.predict_rows, args.threads])
        ratio = info["store_bytes"] / info["source_pixel_bytes"]
        speed = stream["cells_per_s"] / memory["cells_per_s"] if memory else float("nan")
        crops_s = f"{info['crops_seconds']:.1f}" + ("r" if info.get("replicated") else "")
        line = (
            f"{info['cells']:>9} {crops_s:>8} {info['store_bytes_per_cell']:>7.0f} {ratio:>9.2f} "
            f"{(memory['peak_rss'] / 1e9 if memory else float('nan')):>10.2f} {stream['peak_rss'] / 1e9:>10.2f} "
            f"{(memory['cells_per_s'] if memory else float('nan')):>8.0f} {stream['cells_per_s']:>8.0f} "
            f"{speed:>7.2f} {pred['rows_per_s']:>9.0f}"
        )
        lines.append(line)
        print(header if len(lines) == 1 else "", line, sep="\n" if len(lines) == 1 else "", flush=True)
        print(
            f"          store {info['store_dtype']}; images made in {info.get('images_seconds', 0):.1f} s (not "
            f"timed); memory load {memory['load_seconds'] if memory else float('nan'):.1f} s; prediction peak RSS "
            f"{pred['peak_rss'] / 1e9:.2f} GB over {pred['rows']} rows",
            flush=True,
        )
    print(
        "targets: store/src <= 1.10; str/mem >= 0.90; streamed RSS <= 4 GB at 1M cells. "
        "'r' = crops seconds of a cohort replicated into the store (not cropped from images)"
    )
    print(f"cohorts in {root}")


if __name__ == "__main__":
    main()
