"""GPU readiness: every architecture at full size through cellbg's own training path.

For each architecture (``cellbg.models.list_models``) at its protocol defaults (ResNet-18
width 1, ShuffleNetV2 x1.0, CellYOLO-n, EfficientNet-B0) on 64 x 64 RGB crops it prints:

* throughput of the pure model step (forward, backward, AdamW step on a batch already on
  the device) and of cellbg's pipeline (the store read chunk-aligned by the training loader,
  the train variant, augmentation, pinned host memory, copy, the same step: ``train_epoch``
  on ``_epoch_loader``), and their ratio;
* the same with mixed precision (AMP: bfloat16 where supported, else float16 with a
  gradient scaler) on and off;
* peak GPU memory of the pipeline step;
* the out-of-memory fallback documented in ``docs/training.md``: a batch that does not fit
  is split into micro-batches with gradient accumulation (the step still sees the whole
  batch); on a GPU a real out-of-memory batch is provoked (a batch too large for the card)
  and the check passes when training continues; on CPU (no device memory limit) the
  micro-batch path is run directly and must give the same gradients as the whole batch.

On one H100/H200 it finishes in well under five minutes. ``--tiny`` runs small models on
32 x 32 crops on the CPU in seconds (the test suite runs it, so it cannot rot).

    .venv/bin/python benchmarks/gpu_check.py            # full size, on the GPU
    .venv/bin/python benchmarks/gpu_check.py --tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = {
    "resnet": {"depth": 18, "width": 1.0},
    "shufflenet_v2": {"width": 1.0},
    "cellyolo": {"width": 0.25, "depth": 0.33},
    "efficientnet_b0": {},
}
TINY = {
    "resnet": {"depth": 10, "width": 0.125},
    "shufflenet_v2": {"width": 0.5},
    "cellyolo": {"width": 0.125, "depth": 0.33},
    "efficientnet_b0": {},
}


def make_store(root: Path, *, cells: int, size: int, seed: int = 0) -> Path:
    """A run folder with ``cells`` random RGB uint8 crops and round masks (two classes, 8 patients)."""
    import pandas as pd
    import zarr

    from cellbg.crops import CELL_COLUMNS, _chunk_rows, _compressors, _dtype, _ids_hash

    rng = np.random.default_rng(seed)
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    chunk = _chunk_rows(3, size, 1)
    group = zarr.open_group(str(run / "crops.zarr"), mode="w")
    images = group.create_array(
        "images", shape=(cells, 3, size, size), chunks=(chunk, 3, size, size), dtype="uint8", compressors=_compressors()
    )
    masks = group.create_array(
        "masks", shape=(cells, size, size), chunks=(chunk, size, size), dtype="bool", compressors=_compressors()
    )
    for start in range(0, cells, chunk * 8):
        n = min(chunk * 8, cells - start)
        images[start : start + n] = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        masks[start : start + n] = np.broadcast_to(mask, (n, size, size))
    table = pd.DataFrame({c: pd.Series(np.zeros(cells), dtype=_dtype(c)) for c in CELL_COLUMNS})
    patient = np.arange(cells) * 8 // cells
    table["cell_id"] = [f"c{i}" for i in range(cells)]
    table["image_id"] = [f"i{i // 16}" for i in range(cells)]
    table["patient_id"] = [f"p{p}" for p in patient]
    table["label_index"] = patient % 2
    table["label"] = np.where(patient % 2, "b", "a")
    table["fold"] = patient % 2
    table[["bbox_r0", "bbox_c0"]] = size // 4
    table[["bbox_r1", "bbox_c1"]] = 3 * size // 4
    group.attrs.update(
        {"classes": ["a", "b"], "size": size, "divisor": 255.0, "cell_ids_sha256": _ids_hash(table["cell_id"])}
    )
    table.to_parquet(run / "cells.parquet", index=False)
    return run


def _protocol(run: Path, arch: str, options: dict, batch: int, amp: bool, workers: int):
    from cellbg.protocol import Protocol

    return Protocol.model_validate(
        {
            "name": "gpu-check",
            "output": str(run),
            "models": [{"arch": arch, **options}],
            "variants": {"train": ["only_fg"], "test": ["original"]},
            "training": {
                "batch_size": batch,
                "amp": amp,
                "num_workers": workers,
                "split": {"folds": 2},
                "memory_budget": "0",
            },
        }
    )


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def check_architecture(
    run: Path, arch: str, options: dict, *, device, batch: int, steps: int, amp: bool, workers: int = 4
) -> dict:
    """Pure-step and pipeline throughput, and peak memory, of one architecture."""
    import torch

    from cellbg.models import get_model
    from cellbg.planning import plan_jobs
    from cellbg.train import _epoch_loader, _job_seeds, _read_crops, patient_split, train_epoch

    protocol = _protocol(run, arch, options, batch, amp, workers)
    spec = plan_jobs(protocol)[0]
    crops = _read_crops(run, budget="0")
    split = patient_split(crops.cells, fold=0, val_fraction=0.0)
    torch.manual_seed(0)
    model = get_model(arch, in_channels=3, num_classes=2, **options).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    use_amp = amp and device.type == "cuda"
    fp16 = use_amp and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    x = torch.rand(batch, 3, crops.size, crops.size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    pure = [(x, y)] * steps
    train_epoch(model, pure[:2], opt, scaler=scaler, device=device, amp=use_amp)  # warm-up (cudnn autotune)
    _sync(device)
    t0 = time.perf_counter()
    train_epoch(model, pure, opt, scaler=scaler, device=device, amp=use_amp)
    _sync(device)
    pure_rate = batch * steps / (time.perf_counter() - t0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loader = iter(_epoch_loader(crops, split.train, protocol, spec, _job_seeds(protocol, spec), 1, device=device))
    train_epoch(model, itertools.islice(loader, 2), opt, scaler=scaler, device=device, amp=use_amp)
    _sync(device)
    t0 = time.perf_counter()
    _, _, seen = train_epoch(model, itertools.islice(loader, steps), opt, scaler=scaler, device=device, amp=use_amp)
    _sync(device)
    pipe_rate = seen / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {
        "arch": arch,
        "amp": use_amp,
        "pure": pure_rate,
        "pipeline": pipe_rate,
        "ratio": pipe_rate / pure_rate,
        "peak_gb": peak / 1e9,
    }


def check_oom_fallback(arch: str, options: dict, *, device, size: int) -> str:
    """The documented fallback for a batch that does not fit (see the module doc)."""
    import torch

    from cellbg.models import get_model
    from cellbg.train import train_epoch

    torch.manual_seed(0)
    model = get_model(arch, in_channels=3, num_classes=2, **options).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay, gradients are compared
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # a batch whose activations cannot fit: the first step runs out of memory for real
        n = 1024
        while n * 3 * size * size * 4 * 200 < free:
            n *= 2
        x = torch.rand(n, 3, size, size)
        y = torch.randint(0, 2, (n,))
        memo: dict = {}
        train_epoch(model, [(x, y)], opt, device=device, memo=memo)
        micro = memo.get("micro_batch")
        assert micro is not None and micro < n, "the huge batch fitted: no out-of-memory was provoked"
        return f"a {n}-cell batch ran out of GPU memory and trained in micro-batches of {micro}: PASS"
    x = torch.rand(16, 3, size, size)
    y = torch.randint(0, 2, (16,))
    model.eval()  # BatchNorm in eval mode: whole-batch and micro-batch gradients must agree
    grads = []
    for memo in ({}, {"micro_batch": 4}):
        opt.zero_grad()
        train_epoch(model, [(x, y)], opt, device=device, memo=memo, train_mode=False)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    ok = torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert ok, "micro-batch gradients differ from the whole batch's"
    return "CPU: no device memory limit; micro-batches of 4 give the whole batch's gradients: PASS"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small models, 32 x 32 crops, CPU (the test suite)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="cells per batch (default 256; tiny 16)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30; tiny 2)")
    parser.add_argument("--workers", type=int, default=4, help="data-loader worker processes (tiny: 0)")
    args = parser.parse_args(argv)

    import torch

    from cellbg.models import list_models
    from cellbg.train import select_device

    device = torch.device("cpu") if args.tiny else select_device(args.device)
    sizes = TINY if args.tiny else FULL
    size = 32 if args.tiny else 64
    batch = args.batch or (16 if args.tiny else 256)
    steps = args.steps or (2 if args.tiny else 30)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print("device: CPU" + ("" if args.tiny else " (no GPU found: the numbers are CPU numbers)"))
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run = make_store(Path(tmp), cells=batch * (steps + 4) * 2 + 64, size=size)
        print(f"{'arch':<14}{'amp':>5}{'pure cells/s':>14}{'pipeline':>10}{'ratio':>7}{'peak GB':>9}")
        for arch in list_models():
            for amp in (False, True) if device.type == "cuda" else (False,):
                r = check_architecture(
                    run,
                    arch,
                    sizes[arch],
                    device=device,
                    batch=batch,
                    steps=steps,
                    amp=amp,
                    workers=0 if args.tiny else args.workers,
                )
                print(
                    f"{arch:<14}{'on' if r['amp'] else 'off':>5}{r['pure']:>14.0f}{r['pipeline']:>10.0f}"
                    f"{r['ratio']:>7.2f}{r['peak_gb']:>9.2f}",
                    flush=True,
                )
        print("out-of-memory fallback:", check_oom_fallback("resnet", sizes["resnet"], device=device, size=size))
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
