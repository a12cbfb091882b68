"""Saliency throughput: 200 cells x 3 methods for one small model (issue 8: < 1 minute).

The model is the protocol default (MONAI ResNet-10, width 0.25, small stem) on 64-pixel RGB
crops, with the protocol's default method settings (occlusion window 8 tiling the crop,
integrated gradients with 8 path points). Baselines measured in the same run on the same
crops: one forward pass and one forward+backward pass of the 200 cells, and, for the effect
of batching, every method with batch size 1 on a 20-cell subset (scaled to 200).

Run::

    .venv/bin/python benchmarks/bench_saliency.py [--cells 200] [--sanity]

``--sanity`` also times the built-in sanity check (every map again with re-randomised
weights), which doubles the work.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cellbg.models import get_model
from cellbg.protocol import SaliencyConfig
from cellbg.saliency import METHODS, attribute, randomize_weights


def _options(method: str, cfg: SaliencyConfig, batch_size: int) -> dict:
    if method == "occlusion":
        return {"window": cfg.occlusion_window, "overlap": cfg.occlusion_overlap, "batch_size": batch_size}
    if method == "integrated_gradients":
        return {"steps": cfg.ig_steps, "batch_size": batch_size}
    return {"batch_size": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sanity", action="store_true", help="also time the randomised-weights maps")
    args = parser.parse_args()

    cfg = SaliencyConfig()
    gen = torch.Generator().manual_seed(0)
    net = get_model("resnet", in_channels=3, num_classes=2, depth=10, width=0.25, small_stem=True).eval()
    x = torch.rand(args.cells, 3, args.size, args.size, generator=gen)
    targets = np.arange(args.cells) % 2
    print(f"torch threads: {torch.get_num_threads()}; {args.cells} cells, {args.size}x{args.size} RGB, resnet-10 w0.25")

    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in x.split(64):
            net(chunk)
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for chunk in x.split(64):
        xc = chunk.clone().requires_grad_(True)
        net(xc)[:, 1].sum().backward()
    backward_s = time.perf_counter() - t0
    print(f"baseline forward pass:          {forward_s:7.2f} s")
    print(f"baseline forward+backward pass: {backward_s:7.2f} s")

    models = {"trained": net}
    if args.sanity:
        models["randomised"] = randomize_weights(net, seed=0)
    total = cpu_total = 0.0
    for label, model in models.items():
        for method in METHODS:
            t0, c0 = time.perf_counter(), time.process_time()
            attribute(model, x, targets, method=method, **_options(method, cfg, 64))
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            total += dt
            cpu_total += cpu
            print(
                f"{label:10s} {method:22s} {dt:7.2f} s wall, {cpu:7.2f} s CPU  "
                f"({dt / backward_s:5.1f} x forward+backward)"
            )
    print(
        f"TOTAL {args.cells} cells x {len(METHODS)} methods x {len(models)} model(s): {total:.1f} s wall "
        f"(target < 60 s; {total / backward_s:.1f} x one forward+backward pass)"
    )
    # On a shared machine wall time depends on the other processes; CPU time does not
    # (much): CPU seconds / threads is the wall time this process would need alone.
    print(
        f"CPU time {cpu_total:.1f} s over {torch.get_num_threads()} threads: "
        f"about {cpu_total / torch.get_num_threads():.1f} s wall on an otherwise idle machine"
    )

    sub = max(1, args.cells // 20)
    unbatched = 0.0
    for method in METHODS:
        t0 = time.perf_counter()
        attribute(net, x[:sub], targets[:sub], method=method, **_options(method, cfg, 1))
        unbatched += time.perf_counter() - t0
    unbatched *= args.cells / sub
    print(
        f"unbatched baseline (batch 1, {sub} cells scaled to {args.cells}): {unbatched:.1f} s; "
        f"batching speed-up {unbatched / (total / len(models)):.1f} x"
    )


if __name__ == "__main__":
    main()
