"""Batched background variants vs a straightforward per-image loop, same crops, same run.

    .venv/bin/python benchmarks/bench_variants.py [--n 10000] [--size 64] [--batch 512]

Baseline 1 (the issue's): the per-image loop a script runs, one crop at a time: numpy
slicing / ``np.where`` / ``np.tile`` per crop, ``scipy.ndimage.gaussian_filter`` and
``distance_transform_edt`` per crop, ``skimage.morphology`` per mask, one partner drawn per
cell, written into one output array. Baseline 2 (printed separately): the same per-crop code
in a torch ``Dataset.__getitem__``, consumed through a ``DataLoader`` (``num_workers=0``,
``batch_size=--batch``), as a training script would. The batched side calls
:func:`cellbg.variants.apply_variant` on batches of ``--batch`` crops (the way the training
loader uses it; ``--batch 0`` = all crops at once). Every side produces the same images
(checked on a sample before timing). Prints seconds per side, the ratios per variant and
overall, and the machine's load average (the machine is shared; timings are noisy).

Floor and ceiling (measured in the same run): every variant reads each crop and writes a
new one, so no implementation can beat a bare copy of the same batches on this machine
(the fastest of a fresh ``copy``, ``np.copyto`` into a preallocated array, and torch's
``copy_`` with ``--threads`` threads, per batch).
``bg_blur`` also needs ``2 * (2r + 1)`` multiply-adds per value (two passes of a
``2r + 1``-tap filter; a symmetric kernel saves multiplies, not instructions), which cannot
run faster than the multiply-add rate of a large float32 GEMM at the same thread count.
``ceiling = loop / floor`` is the highest ratio any batched implementation could print
here; the last lines say whether the issue's 20x is within it.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.ndimage as ndi
import torch
from skimage.morphology import disk, erosion

from cellbg.variants import _gaussian_kernel, apply_variant, parse_variant


def make_crops(n, size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, 3, size, size), dtype=np.float32)
    rr, cc = np.mgrid[:size, :size]
    cen = rng.integers(size // 4, 3 * size // 4, (n, 2))[:, :, None, None]
    rad = rng.integers(size // 10, size // 4, (n, 2))[:, :, None, None]
    masks = ((rr - cen[:, 0]) / rad[:, 0]) ** 2 + ((cc - cen[:, 1]) / rad[:, 1]) ** 2 <= 1
    rows, cols = masks.any(2), masks.any(1)
    bboxes = np.stack(
        [rows.argmax(1), cols.argmax(1), size - rows[:, ::-1].argmax(1), size - cols[:, ::-1].argmax(1)], 1
    ).astype(np.int64)
    labels = rng.integers(0, 2, n)
    return images, masks, bboxes, labels


# --------------------------------------------------------------------------- per-image loop
def loop_only_bg_t(img, box):
    r0, c0, r1, c1 = box
    _, h, w = img.shape
    left, right, top, bottom = c0, w - c1, r0, h - r1
    out = img.copy()
    if max(left, right) * h >= max(top, bottom) * w:
        if max(left, right) == 0:
            out[:, r0:r1, c0:c1] = 0
            return out
        strip = img[:, :, :c0] if left >= right else img[:, :, c1:]
        tiled = np.tile(strip, (1, 1, -(-w // strip.shape[2])))[:, :, :w]
    else:
        strip = img[:, :r0] if top >= bottom else img[:, r1:]
        tiled = np.tile(strip, (1, -(-h // strip.shape[1]), 1))[:, :h]
    out[:, r0:r1, c0:c1] = tiled[:, r0:r1, c0:c1]
    return out


def loop_partner(i, labels, rule, rng):
    if rule == "same":
        pool = np.flatnonzero((labels == labels[i]) & (np.arange(len(labels)) != i))
    else:
        pool = np.flatnonzero(labels == (labels[i] + 1) % 2)
    return pool[rng.integers(len(pool))]


def variant_of_one(spec, i, images, masks, bboxes, labels, rng):
    """The variant of crop ``i`` alone, the way a script computes it (numpy/scipy/skimage)."""
    img, m, box = images[i], masks[i], bboxes[i]
    if spec == "original":
        return img.copy()
    if spec == "only_fg":
        return img * m
    if spec == "no_fg":
        return img * ~m
    if spec == "only_bg_b":
        o = img.copy()
        o[:, box[0] : box[2], box[1] : box[3]] = 0
        return o
    if spec == "only_bg_t":
        return loop_only_bg_t(img, box)
    if spec in ("mixed_same", "mixed_next"):
        j = loop_partner(i, labels, spec[6:], rng)
        return np.where(m, img, loop_only_bg_t(images[j], bboxes[j]))
    if spec == "bg_color(0,0,1)":
        return np.where(m, img, np.array([0, 0, 1], np.float32)[:, None, None])
    if spec == "bg_blur(2)":
        return np.where(m, img, ndi.gaussian_filter(img, (0, 2, 2), mode="nearest"))
    if spec == "bg_ring(4)":
        return np.where(ndi.distance_transform_edt(~m) <= 4, img, 0)
    if spec == "mask_erode(2)+only_fg":
        return img * erosion(m, disk(2))
    raise ValueError(spec)


def run_loop(spec, images, masks, bboxes, labels):
    """Baseline 1: a plain loop over the crops, one variant image at a time, into one array."""
    out = np.empty_like(images)
    rng = np.random.default_rng(0)
    for i in range(len(images)):
        out[i] = variant_of_one(spec, i, images, masks, bboxes, labels, rng)
    return out


class PerCropDataset(torch.utils.data.Dataset):
    """Baseline 2: the per-item Dataset a training script writes (variant in ``__getitem__``)."""

    def __init__(self, spec, images, masks, bboxes, labels):
        self.spec, self.arrays = spec, (images, masks, bboxes, labels)
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return len(self.arrays[0])

    def __getitem__(self, i):
        return torch.from_numpy(variant_of_one(self.spec, i, *self.arrays, self.rng))


def run_dataloader(spec, images, masks, bboxes, labels, batch):
    """Baseline 2 consumed the usual way: a DataLoader collating batches (no workers)."""
    return torch.utils.data.DataLoader(
        PerCropDataset(spec, images, masks, bboxes, labels), batch_size=batch or len(images), num_workers=0
    )


def run_batched(spec, images, masks, bboxes, labels, batch):
    step = batch or len(images)
    for s in range(0, len(images), step):
        apply_variant(
            spec,
            images[s : s + step],
            masks[s : s + step],
            bboxes=bboxes[s : s + step],
            labels=labels[s : s + step],
            seed=0,
        )


def run_per_crop_calls(spec, images, masks, bboxes, labels):
    """The batched function called on one crop at a time (what a per-item Dataset does)."""
    for i in range(len(images)):
        apply_variant(spec, images[i : i + 1], masks[i : i + 1], bboxes=bboxes[i : i + 1], labels=labels[i : i + 1])


def copy_floor(images, batch, repeat):
    """Seconds for a bare copy of the crops in the benchmark's batches: no variant can be faster."""
    step = batch or len(images)
    out = np.empty_like(images)
    out[...] = 0  # touch the pages once, so the copy below does not pay for page faults

    def fresh():
        for s in range(0, len(images), step):
            images[s : s + step].copy()

    def into():
        for s in range(0, len(images), step):
            np.copyto(out[s : s + step], images[s : s + step])

    src, dst = torch.from_numpy(images), torch.from_numpy(out)

    def torch_into():  # torch's copy uses all of torch's threads
        for s in range(0, len(images), step):
            dst[s : s + step].copy_(src[s : s + step])

    return min(timed(fresh, repeat), timed(into, repeat), timed(torch_into, repeat))


def multiply_add_rate(repeat) -> float:
    """Multiply-adds per second of a 1024^3 float32 GEMM (the best case of the FMA units)."""
    a = torch.rand(1024, 1024)
    b = torch.rand(1024, 1024)
    return 1024**3 / timed(lambda: torch.mm(a, b), max(repeat, 3))


def blur_multiply_adds(spec: str, images) -> float:
    """Multiply-adds a separable gaussian of ``bg_blur(sigma)`` needs: two passes of its kernel."""
    taps = _gaussian_kernel(float(parse_variant(spec).args[0]), torch.float32, "cpu").numel()
    return images.size * 2 * taps


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


SPECS = [
    "original",
    "only_fg",
    "no_fg",
    "only_bg_b",
    "only_bg_t",
    "mixed_same",
    "mixed_next",
    "bg_color(0,0,1)",
    "bg_blur(2)",
    "bg_ring(4)",
    "mask_erode(2)+only_fg",
]


def load() -> str:
    """The 1-minute load average and the cores: the machine is shared, timings are noisy."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--specs", nargs="*", default=SPECS)
    ap.add_argument(
        "--no-per-crop", dest="per_crop", action="store_false", help="skip the apply_variant-per-crop column"
    )
    ap.add_argument(
        "--no-dataloader",
        dest="dataloader",
        action="store_false",
        help="skip baseline 2 (DataLoader over a per-crop Dataset)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, like the numpy loop; 0: torch's default)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, masks, bboxes, labels = make_crops(args.n, args.size)
    print(
        f"{args.n} crops 3x{args.size}x{args.size}, batch {args.batch or args.n}, torch threads "
        f"{torch.get_num_threads()}, best of {args.repeat}; {load()}"
    )
    # Same answers on a sample, from every side (the pairing variants draw their partners
    # differently; compare the deterministic ones).
    k = 64
    for spec in args.specs:
        if not spec.startswith("mixed"):
            want = run_loop(spec, images[:k], masks[:k], bboxes[:k], labels[:k])
            got = apply_variant(spec, images[:k], masks[:k], bboxes=bboxes[:k], labels=labels[:k]).images
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=spec)
            loaded = torch.cat(list(run_dataloader(spec, images[:k], masks[:k], bboxes[:k], labels[:k], 16))).numpy()
            np.testing.assert_array_equal(loaded, want, err_msg=spec)
    print(
        "baseline 1 (the issue's baseline): numpy loop, one crop at a time, into one array\n"
        "baseline 2: torch DataLoader (num_workers=0, batch_size=--batch) over a Dataset whose\n"
        "  __getitem__ computes one crop's variant with the same code\n"
        "per-crop: apply_variant called with n=1 (mixed_* cannot pair alone: n/a)\n"
        "batched: apply_variant on batches of --batch; ratios = baseline / batched"
    )
    floor_copy = copy_floor(images, args.batch, args.repeat)
    mac_rate = multiply_add_rate(args.repeat)
    print(
        f"floor: a bare copy of the {args.n} crops in these batches takes {floor_copy:.4f} s "
        f"({2 * images.nbytes / floor_copy / 1e9:.0f} GB/s read + write); a float32 GEMM runs "
        f"{mac_rate / 1e9:.1f} G multiply-adds/s"
    )
    print(
        f"{'variant':<24}{'loop s':>9}{'loader s':>10}{'per-crop s':>12}{'batched s':>11}"
        f"{'loop/batched':>14}{'loader/batched':>16}{'per-crop/batched':>18}{'floor s':>9}{'ceiling':>9}"
    )
    tot_loop = tot_loader = tot_batch = tot_floor = 0.0

    def drain(spec):
        for _ in run_dataloader(spec, images, masks, bboxes, labels, args.batch):
            pass

    for spec in args.specs:
        t_loop = timed(lambda spec=spec: run_loop(spec, images, masks, bboxes, labels), args.repeat)
        t_batch = timed(lambda spec=spec: run_batched(spec, images, masks, bboxes, labels, args.batch), args.repeat)
        t_loader = timed(lambda spec=spec: drain(spec), args.repeat) if args.dataloader else float("nan")
        t_call = (
            float("nan")
            if spec.startswith("mixed") or not args.per_crop
            else timed(lambda spec=spec: run_per_crop_calls(spec, images, masks, bboxes, labels), 1)
        )
        t_floor = floor_copy
        if spec.startswith("bg_blur("):
            t_floor = max(t_floor, blur_multiply_adds(spec, images) / mac_rate)
        tot_loop += t_loop
        tot_loader += t_loader
        tot_batch += t_batch
        tot_floor += t_floor
        print(
            f"{spec:<24}{t_loop:9.3f}{t_loader:10.3f}{t_call:12.3f}{t_batch:11.3f}{t_loop / t_batch:13.1f}x"
            f"{t_loader / t_batch:15.1f}x{t_call / t_batch:17.1f}x{t_floor:9.4f}{t_loop / t_floor:8.1f}x",
            flush=True,
        )
    print(
        f"{'all variants':<24}{tot_loop:9.3f}{tot_loader:10.3f}{'':>12}{tot_batch:11.3f}"
        f"{tot_loop / tot_batch:13.1f}x{tot_loader / tot_batch:15.1f}x{'':>17}{tot_floor:9.4f}"
        f"{tot_loop / tot_floor:8.1f}x"
    )
    second = (
        f" and {tot_loader / tot_batch:.1f}x baseline 2 (DataLoader over a per-crop Dataset)" if args.dataloader else ""
    )
    print(f"overall: batched is {tot_loop / tot_batch:.1f}x baseline 1 (numpy per-crop loop){second}; {load()}")
    target = 20.0
    print(
        f"{target:g}x overall would need the batched total <= {tot_loop / target:.3f} s; the floor "
        f"(copies, and the blur's multiply-adds) is {tot_floor:.3f} s, so the ceiling here is "
        f"{tot_loop / tot_floor:.1f}x: {target:g}x is "
        + ("within reach" if tot_loop / tot_floor >= target else "out of reach of any implementation")
    )


if __name__ == "__main__":
    main()
