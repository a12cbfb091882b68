"""Detector training throughput (images/s): cellbg's detection epoch against a bare torchvision loop.

One epoch over the training fields of a synthetic dataset with the co-occurrence cue is
timed twice, with the same detector (reset to the same weights before every round), the same
fields in the same order and the same optimizer:

* cellbg: the path of ``cellbg.detect.train.run_detect_job``: the batch of fields built from
  the images in memory (boxes of the cells and the correlated structure, seeded flips), then
  ``train_detector_epoch`` (forward, the four loss parts kept per batch, backward, step);
* bare: the same batches built beforehand, fed to the loop of torchvision's reference
  detection script: ``loss = sum(model(images, targets).values())``, backward, step.

The printed ratio is cellbg / bare images per second, each the fastest of ``--repeats`` rounds
(the figure least disturbed by other processes, as in ``timeit``).

    CELLBG_NUM_THREADS=1 python benchmarks/bench_detect.py          # CPU defaults
    python benchmarks/bench_detect.py --device cuda --depth 18 --fpn 256 --head 1024
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--cells-per-patient", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--fpn", type=int, default=32, help="FPN channels")
    parser.add_argument("--head", type=int, default=128, help="box-head width")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from cellbg.detect.model import get_detector
    from cellbg.detect.plan import detection_fields
    from cellbg.detect.train import _batches, load_fields, train_detector_epoch
    from cellbg.protocol import parse_protocol
    from cellbg.segment import run_segmentation
    from cellbg.train import num_threads, select_device

    torch.set_num_threads(num_threads())
    device = select_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        text = f"""
name: bench-detect
output: {tmp}/run
data:
  source: synthetic
  synthetic: {{patients: {args.patients}, cells_per_patient: {args.cells_per_patient}, cells_per_image: 4,
              image_size: {args.image_size}, signal: 0.0, cooccurrence: 1.0}}
segmentation: {{method: masks}}
training: {{split: {{folds: 2}}}}
detection: {{enabled: true, correlated: {{source: objects}}}}
"""
        protocol = parse_protocol(text, base_dir=Path(tmp))
        run_segmentation(protocol)
        fields = load_fields(protocol, detection_fields(protocol))
    order = np.arange(len(fields.images))
    torch.manual_seed(0)
    model = get_detector(
        num_classes=4,
        image_size=args.image_size,
        depth=args.depth,
        fpn_channels=args.fpn,
        representation_size=args.head,
    ).to(device)
    start = copy.deepcopy(model.state_dict())

    def fresh():
        model.load_state_dict(start)
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def make_batches():
        return _batches(fields, order, batch_size=args.batch_size, with_structure=True, augment=True, seed=0)

    def cellbg_epoch():
        optimizer = fresh()
        torch.manual_seed(1)
        t0 = time.perf_counter()
        _, seen = train_detector_epoch(model, make_batches(), optimizer, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - t0)

    ready = [
        ([x.to(device) for x in xs], [{k: v.to(device) for k, v in t.items()} for t in ts]) for xs, ts in make_batches()
    ]

    def bare_epoch():
        optimizer = fresh()
        torch.manual_seed(1)
        model.train()
        t0 = time.perf_counter()
        seen = 0
        for images, targets in ready:
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - t0)

    cellbg_epoch()  # warm-up (allocator, first-call dispatch)
    ours, bare = [], []
    for _ in range(args.repeats):
        bare.append(bare_epoch())
        ours.append(cellbg_epoch())
    size = f"{len(order)} fields of {args.image_size} px, batch {args.batch_size}"
    print(
        f"device {device}, {torch.get_num_threads()} threads, ResNet-{args.depth} FPN {args.fpn}, head {args.head}; "
        f"{size}"
    )
    print(f"bare torchvision loop:  {max(bare):7.2f} images/s (best of {args.repeats})")
    print(f"cellbg detection epoch: {max(ours):7.2f} images/s (best of {args.repeats})")
    print(f"ratio cellbg / bare: {max(ours) / max(bare):.3f}")


if __name__ == "__main__":
    main()
