"""Input-pipeline overhead of a training epoch (issue 6; target: ratio <= 1.10).

For each train variant, one epoch is timed twice with the same model and the same number of
optimizer steps:

* pipeline: the real input pipeline of ``cellbg.train.run_job`` (crops gathered from
  memory, the background variant applied on the batch, MONAI flips/rotations and intensity
  jitter, the DataLoader, the copy to the device), then forward/backward/step;
* baseline: the same batches prepared beforehand and already on the device, fed straight to
  forward/backward/step (``cellbg.train.train_epoch`` in both cases).

The printed ratio is pipeline time / baseline time, each the fastest of ``--repeats`` rounds
(the minimum is the figure least disturbed by other processes, as in ``timeit``).

    CELLBG_NUM_THREADS=1 python benchmarks/bench_input_pipeline.py   # CPU defaults
    python benchmarks/bench_input_pipeline.py --device cuda --workers 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--cells-per-patient", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="crop side")
    parser.add_argument("--depth", type=int, default=10, help="resnet depth")
    parser.add_argument("--width", type=float, default=0.25, help="resnet width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--variants", default="original,only_fg,mixed_rand")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-dir", type=Path, default=None, help="reuse/keep crops here")
    args = parser.parse_args()

    from cellbg.crops import run_crops
    from cellbg.models import get_model
    from cellbg.planning import JobSpec
    from cellbg.protocol import Protocol
    from cellbg.train import (
        _autocast,
        _epoch_loader,
        _job_seeds,
        _read_crops,
        job_runtime,
        num_threads,
        patient_split,
        select_device,
        train_epoch,
    )

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="cellbg-bench-")) / "run"
    config = {
        "name": "bench-input-pipeline",
        "output": str(run_dir),
        "data": {
            "source": "synthetic",
            "synthetic": {
                "patients": args.patients,
                "cells_per_patient": args.cells_per_patient,
                "cells_per_image": 4,
                "image_size": 128,
                "signal": 0.8,
            },
        },
        "segmentation": {"method": "masks", "workers": 1},
        "crops": {"size": args.size, "exclude_border": False, "workers": 1},
        "models": [{"arch": "resnet", "depth": args.depth, "width": args.width, "small_stem": True}],
        "variants": {"train": args.variants.split(","), "fill": "mean"},
        "training": {
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "device": args.device,
            "split": {"folds": 2},
        },
    }
    protocol = Protocol.model_validate(config)
    if not (run_dir / "cells.parquet").exists():
        run_crops(protocol)
    crops = _read_crops(run_dir)
    split = patient_split(crops.cells, fold=0, val_fraction=0.0)
    device = select_device(args.device)
    amp = device.type == "cuda"
    print(
        f"device {device}, torch threads {num_threads()}, {len(split.train)} training crops of "
        f"{tuple(crops.images.shape[1:])}, resnet{args.depth} x{args.width}, batch {args.batch_size}, "
        f"loader workers {args.workers}"
    )

    def fresh_model():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = get_model(
                "resnet",
                in_channels=crops.images.shape[1],
                num_classes=len(crops.classes),
                depth=args.depth,
                width=args.width,
            ).to(device)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ratios = {}
    with job_runtime(device), _autocast(device, False):
        for variant in args.variants.split(","):
            spec = JobSpec("resnet", variant, 0, 0)
            seeds = _job_seeds(protocol, spec)
            pipe_t, base_t, prep_t = [], [], []
            for rep in range(args.repeats + 1):  # the first round warms up and is not counted
                # baseline batches: the same epoch, prepared beforehand, already on the device
                ready = [
                    (x.to(device), y.to(device))
                    for x, y in _epoch_loader(crops, split.train, protocol, spec, seeds, rep, device=device)
                ]
                model, opt = fresh_model()
                sync()
                t0 = time.perf_counter()
                train_epoch(model, ready, opt, device=device, amp=amp)
                sync()
                base = time.perf_counter() - t0
                model, opt = fresh_model()
                loader = _epoch_loader(crops, split.train, protocol, spec, seeds, rep, device=device)
                sync()
                t0 = time.perf_counter()
                train_epoch(model, loader, opt, device=device, amp=amp)
                sync()
                pipe = time.perf_counter() - t0
                t0 = time.perf_counter()  # the input pipeline alone, without training
                for x, _ in _epoch_loader(crops, split.train, protocol, spec, seeds, rep, device=device):
                    x.to(device)
                sync()
                prep = time.perf_counter() - t0
                if rep:
                    pipe_t.append(pipe)
                    base_t.append(base)
                    prep_t.append(prep)
            p, b, q = min(pipe_t), min(base_t), min(prep_t)
            ratios[variant] = p / b
            print(
                f"{variant:>12}: pipeline epoch {p:7.3f} s, in-memory steps {b:7.3f} s, "
                f"ratio {p / b:5.3f} ({len(ready)} steps); input pipeline alone {q:6.3f} s "
                f"= {q / b:5.1%} of the steps"
            )
    worst = max(ratios.values())
    print(f"worst ratio {worst:.3f} (target <= 1.10): {'OK' if worst <= 1.10 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
