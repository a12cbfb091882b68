"""Training jobs: fit one model on one train variant, checkpoint, predict every test variant.

One job is ``(model, train variant, seed, fold)``. It reads the crops of a run
(``<run>/crops.zarr`` and ``<run>/cells.parquet``, see ``docs/contracts.md``), splits the cells
by patient (test fold, a patient-grouped validation split of the other patients, the rest for
training), fits with AdamW and a cosine schedule, stops early on the validation loss (and
restores the best weights), and predicts every test variant of the held-out cells. Its files
go to ``<run>/jobs/<key>/``::

    spec.json            the job, the model spec, classes, patients of each split, seeds, the device
                         used (cpu, cuda:N) and its AMP dtype
    checkpoint.pt        written (atomically) after every epoch; a killed job resumes from it
    history.csv          loss and accuracy per epoch, with the seeds
    predictions.parquet  one row per held-out cell x test variant
    DONE                 written last: the job is finished

``<key>`` is :func:`job_key`, a content hash of everything the job's numbers depend on, so a
job is rerun only when one of them changes.

Determinism: every random draw comes from a generator seeded from the job's seed (model
initialisation, batch order, the variant's random fills and pairings, augmentation). Batch
``b`` of epoch ``e`` is prepared from its own generator seeded from ``(seed, e, b)``, so
data-loader workers never repeat each other's augmentations, results do not depend on the
number of workers, and a resumed job continues exactly where it stopped. On CPU the same
protocol and seed give the same predictions.

Examples
--------
>>> from cellbg.planning import plan_jobs
>>> from cellbg.protocol import Protocol
>>> p = Protocol.model_validate({"name": "demo", "training": {"seeds": [0, 1],
...     "split": {"folds": 3}}, "variants": {"train": ["original"]}})
>>> [(j.model, j.train_variant, j.seed, j.fold) for j in plan_jobs(p)][:4]
[('resnet', 'original', 0, 0), ('resnet', 'original', 0, 1), ('resnet', 'original', 0, 2), ('resnet', 'original', 1, 0)]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from monai.transforms import Flip, Rotate90, Transform
from torch import nn

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import atomic_path, write_json_atomic, write_parquet_atomic, write_text_atomic
from cellbg.models import get_model
from cellbg.planning import (
    DONE,
    PREDICT_BLOCK,
    JobResult,
    JobSpec,
    PredictSpec,
    _model_spec,
    crops_fingerprint,
    job_folder,
    job_key,
    plan_jobs,
    plan_predictions,
    predict_key,
    unfinished_jobs,
)

if TYPE_CHECKING:
    from cellbg.crops import CropStore

__all__ = [
    "Split",
    "patient_split",
    "run_job",
    "run_prediction",
    "test_job",
    "run_training",
    "collect_predictions",
    "check_probabilities",
    "prediction_files",
    "memory_budget",
    "window_order",
    "load_job_model",
    "RandDihedral",
    "RandIntensityJitter",
    "select_device",
    "num_threads",
    "train_epoch",
]

_CELL_COLUMNS = ("cell_id", "patient_id", "label", "label_index", "fold", "bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1")


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """Row indices (into ``cells.parquet``) and patients of the train / val / test sets."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    train_patients: list
    val_patients: list
    test_patients: list


def patient_split(
    cells: pd.DataFrame,
    *,
    fold: int,
    val_fraction: float = 0.2,
    val_patients: list[str] | None = None,
    seed: int = 0,
) -> Split:
    """Split cells by patient: the test fold, a validation split, the rest for training.

    The test set is every cell whose ``fold`` equals ``fold``. Of the other patients
    (fold -1 means "never tested", as with a fixed split), ``val_patients`` form the
    validation set when given; otherwise a share ``val_fraction`` of them is drawn per class
    (stratified by each patient's majority class, at least one patient of a class that has
    two or more, seeded with ``seed``).

    Parameters
    ----------
    cells : DataFrame
        With columns ``patient_id``, ``label`` and ``fold``.
    fold : int
        The test fold.
    val_fraction : float
        Share of the training patients held out for validation (0: none).
    val_patients : list of str, optional
        Fixed validation patients.
    seed : int

    Returns
    -------
    Split

    Raises
    ------
    CellbgError
        A patient with cells in the test fold and in another fold (named), an empty test
        fold, no training patients, or an unknown validation patient.

    Examples
    --------
    >>> cells = pd.DataFrame({"patient_id": list("aabbccdd"), "label": list("xxxxyyyy"),
    ...                       "fold": [0, 0, 1, 1, 0, 0, 1, 1]})
    >>> s = patient_split(cells, fold=0, val_fraction=0.0)
    >>> s.test_patients, s.train_patients
    (['a', 'c'], ['b', 'd'])
    """
    folds = cells["fold"].to_numpy()
    patients = cells["patient_id"].astype(str).to_numpy()
    is_test = folds == fold
    if not is_test.any():
        raise CellbgError(f"no cells in test fold {fold} (cells.parquet has folds {sorted(set(folds.tolist()))})")
    test_p = sorted(set(patients[is_test]))
    leak = sorted(set(test_p) & set(patients[~is_test]))
    if leak:
        other = sorted(set(folds[(patients == leak[0]) & ~is_test].tolist()))
        raise CellbgError(
            f"patient '{leak[0]}' is in both the test set (fold {fold}) and the training set "
            f"(fold {other}); cells of one patient must share one fold"
            + (f" ({len(leak)} such patients)" if len(leak) > 1 else "")
        )
    pool = cells.loc[~is_test]
    pool_p = pool.groupby(pool["patient_id"].astype(str))["label"].agg(lambda s: s.value_counts().index[0])
    if val_patients:
        val_p = sorted(map(str, val_patients))
        bad = [p for p in val_p if p not in pool_p.index]
        if bad:
            raise CellbgError(
                f"training.split.val_patients: patient '{bad[0]}' is not among the training patients of fold {fold}"
            )
    else:
        rng = np.random.default_rng(np.random.SeedSequence([seed, fold]))
        val_p = []
        for label in sorted(pool_p.unique()):
            members = np.array(sorted(pool_p.index[pool_p == label]))
            k = int(round(val_fraction * len(members)))
            if val_fraction > 0 and len(members) >= 2:
                k = min(max(k, 1), len(members) - 1)
            val_p += members[rng.permutation(len(members))][:k].tolist()
        val_p = sorted(val_p)
    train_p = sorted(set(pool_p.index) - set(val_p))
    if not train_p:
        raise CellbgError(f"fold {fold} leaves no training patients; lower training.split.val_fraction")
    idx = np.arange(len(cells))
    return Split(
        train=idx[np.isin(patients, train_p)],
        val=idx[np.isin(patients, val_p)],
        test=idx[is_test],
        train_patients=train_p,
        val_patients=val_p,
        test_patients=test_p,
    )


# --------------------------------------------------------------------------- augmentation
class RandDihedral(Transform):
    """Random flips and 90-degree rotations of a batch ``(n, C, H, W)``, one draw per image.

    Each image gets one of the 8 symmetries of the square (rotation by ``k`` quarter turns,
    then an optional flip). Images sharing a symmetry are transformed together with MONAI's
    :class:`~monai.transforms.Rotate90` and :class:`~monai.transforms.Flip`, so a batch costs at
    most 8 calls. Randomness comes only from a :class:`torch.Generator`
    (:meth:`set_random_state`).

    Examples
    --------
    >>> x = torch.rand(16, 3, 8, 8)
    >>> t = RandDihedral().set_random_state(0)
    >>> t.randomize(16)
    >>> y = t(x)
    >>> bool(torch.equal(y.flatten(1).sort(1).values, x.flatten(1).sort(1).values))
    True
    """

    def __init__(self, prob: float = 1.0):
        self.prob = prob
        self.generator = torch.Generator().manual_seed(0)
        self._ops: torch.Tensor | None = None

    def set_random_state(self, seed: int | None = None, generator: torch.Generator | None = None) -> RandDihedral:
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed or 0))
        return self

    def randomize(self, n: int) -> None:
        ops = torch.randint(0, 8, (n,), generator=self.generator)
        apply = torch.rand(n, generator=self.generator) < self.prob
        self._ops = torch.where(apply, ops, torch.zeros_like(ops))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._ops is None or len(self._ops) != len(images):
            raise RuntimeError("call randomize(n) with the batch size first")
        n, c, h, w = images.shape
        if h != w:
            raise CellbgError(f"RandDihedral needs square images; got {h}x{w}")
        order = torch.argsort(self._ops, stable=True)
        parts: list[torch.Tensor] = []
        for op, count in zip(*torch.unique_consecutive(self._ops[order], return_counts=True), strict=True):
            sel = order[sum(len(p) for p in parts) :][: int(count)]
            # MONAI treats the first axis as channels: fold (images, channels) into it.
            x = images.index_select(0, sel).reshape(-1, h, w)
            k, flip = int(op) % 4, int(op) >= 4
            if k:
                x = Rotate90(k=k, spatial_axes=(0, 1))(x)
            if flip:
                x = Flip(spatial_axis=1)(x)
            parts.append(torch.as_tensor(x).reshape(int(count), c, h, w))
        # Gather back into batch order (index_put would be slow in deterministic mode).
        return torch.cat(parts).index_select(0, torch.argsort(order))


class RandIntensityJitter(Transform):
    """Per-image random contrast and brightness: ``x * a + b``, clipped to [0, 1].

    ``a`` is uniform in ``[1 - scale, 1 + scale]``, ``b`` in ``[-shift, shift]``, one draw per
    image shared by its channels, so colour (the ratio between channels) is kept: a
    background cue carried by colour must not be augmented away.

    Examples
    --------
    >>> t = RandIntensityJitter(scale=0.0, shift=0.0).set_random_state(0)
    >>> t.randomize(2)
    >>> x = torch.rand(2, 3, 4, 4)
    >>> bool(torch.equal(t(x), x))
    True
    """

    def __init__(self, scale: float = 0.1, shift: float = 0.05):
        self.scale, self.shift = scale, shift
        self.generator = torch.Generator().manual_seed(0)
        self._a: torch.Tensor | None = None
        self._b: torch.Tensor | None = None

    def set_random_state(
        self, seed: int | None = None, generator: torch.Generator | None = None
    ) -> RandIntensityJitter:
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed or 0))
        return self

    def randomize(self, n: int) -> None:
        u = torch.rand((2, n), generator=self.generator) * 2 - 1
        self._a = 1 + self.scale * u[0]
        self._b = self.shift * u[1]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._a is None or self._b is None or len(self._a) != len(images):
            raise RuntimeError("call randomize(n) with the batch size first")
        a = self._a.to(images.dtype)[:, None, None, None]
        b = self._b.to(images.dtype)[:, None, None, None]
        return (images * a + b).clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- data
def _seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dataclass
class _Crops:
    """A run's crops for training and prediction: the store, and its pixels in memory when
    they fit the memory budget (:func:`_read_crops`). :meth:`take` gives the same numbers
    either way."""

    store: CropStore
    cells: pd.DataFrame
    classes: list[str]
    bboxes: np.ndarray
    labels: np.ndarray
    memory: tuple | None = None  # stored pixels (source dtype), masks, others masks (or None)
    options: dict | None = None  # apply_variant's reference and background pools

    @property
    def in_memory(self) -> bool:
        return self.memory is not None

    @property
    def channels(self) -> int:
        return self.store.channels

    @property
    def size(self) -> int:
        return self.store.size

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (float32 in [0, 1]) and masks of rows ``idx`` (in that order)."""
        from cellbg.crops import scale_pixels

        idx = np.asarray(idx, dtype=np.int64)
        if self.memory is not None:
            raw, masks = self.memory[0][idx], self.memory[1][idx]
        else:
            raw, masks = self.store.read_raw(idx)
        return torch.from_numpy(scale_pixels(raw, self.store.divisor)), torch.from_numpy(masks)

    def others(self, idx: np.ndarray) -> torch.Tensor | None:
        """The ``others`` masks of rows ``idx`` (None for a store without them)."""
        idx = np.asarray(idx, dtype=np.int64)
        if self.memory is not None:
            return torch.from_numpy(self.memory[2][idx]) if self.memory[2] is not None else None
        if self.store.others is None:
            return None
        return torch.from_numpy(self.store.read_raw(idx, others=True)[2])

    def variant(self, spec: str, idx: np.ndarray, images, masks, *, fill: str, seed: int):
        """``apply_variant`` on rows ``idx`` (given their images and masks), with the run's options."""
        return _apply_variant(
            spec,
            images,
            masks,
            bboxes=self.bboxes[idx],
            labels=self.labels[idx],
            fill=fill,
            seed=seed,
            others=self.others(idx),
            **(self.options or {}),
        )


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def memory_budget(setting: str = "auto") -> int:
    """Bytes of crops a job may hold in memory: ``training.memory_budget``.

    ``"auto"`` is a quarter of the memory free now (several jobs may share the machine);
    otherwise the size given (``"8GB"``, ``0`` = always stream).
    """
    from cellbg.protocol import parse_size

    if str(setting).strip().lower() == "auto":
        return _available_memory() // 4
    return parse_size(setting, what="training.memory_budget")


#: Cells per shuffle window: an epoch visits the store's chunks in a random order, a window
#: of chunks at a time, and shuffles the cells within each window; a mini-batch thus decodes
#: a few chunks, each once per epoch (see :func:`window_order`).
SHUFFLE_WINDOW = 4096


def _read_crops(
    run_dir: Path,
    *,
    in_memory: str | bool = "auto",
    budget: str = "auto",
    log: bool = False,
    cache_chunks: int | None = None,
) -> _Crops:
    """The run's crops (:class:`cellbg.crops.CropStore`), held in memory when they fit ``budget``.

    The stored pixels (source dtype) and masks are what an in-memory copy holds; the choice
    is printed (to the job's log) when ``log``.
    """
    from cellbg.crops import open_store

    store = open_store(run_dir)
    cells = store.cells
    table = Path(run_dir) / "cells.parquet"
    missing = [c for c in _CELL_COLUMNS if c not in cells.columns]
    if missing:
        raise CellbgError(f"{table}: missing column(s) {missing}")
    classes = [str(c) for c in cells.attrs.get("classes", [])]
    if len(classes) < 2:
        raise CellbgError(f"{Path(run_dir) / 'crops.zarr'}: needs at least two classes; got {classes}")
    if tuple(store.masks.shape) != (store.n, store.size, store.size) or store.images.ndim != 4:
        raise CellbgError(
            f"{Path(run_dir) / 'crops.zarr'}: images {tuple(store.images.shape)} and masks {tuple(store.masks.shape)} "
            "are not (n, C, S, S) and (n, S, S)"
        )
    store.cache_chunks = cache_chunks or 2 * max(1, SHUFFLE_WINDOW // store.chunk_rows) + 2
    need, limit = store.source_nbytes, memory_budget(budget) if in_memory == "auto" else 0
    hold = in_memory is True or (in_memory == "auto" and need <= limit)
    memory = None
    if hold:
        others = np.asarray(store.others[...], dtype=bool) if store.others is not None else None
        memory = (np.asarray(store.images[...]), np.asarray(store.masks[...], dtype=bool), others)
    if log:
        where = "in memory" if hold else "streamed from the store"
        print(
            f"crops: {store.n} cells, {need / 1e9:.2f} GB as stored ({store.dtype}); {where}"
            + (f" (memory budget {limit / 1e9:.2f} GB)" if in_memory == "auto" else ""),
            flush=True,
        )
    return _Crops(
        store=store,
        cells=cells,
        classes=classes,
        bboxes=cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(np.int64),
        labels=cells["label_index"].to_numpy(np.int64),
        memory=memory,
    )


def window_order(
    rows: np.ndarray, chunk_rows: int, rng: np.random.Generator, *, window: int = SHUFFLE_WINDOW
) -> np.ndarray:
    """Shuffle store rows chunk-aligned: chunks in a random order, cells shuffled per window.

    The chunks the rows fall in (``row // chunk_rows``) are put in a random order and
    grouped ``window // chunk_rows`` at a time; the rows of a window are shuffled among
    themselves. Consecutive mini-batches then read the chunks of one window, each decoded
    once per epoch, while each batch still mixes cells of many chunks.

    Parameters
    ----------
    rows : (n,) int
        Store rows (repeats allowed, e.g. a class-balanced draw).
    chunk_rows : int
        Rows per store chunk.
    rng : numpy.random.Generator
    window : int
        Cells per shuffle window (rounded to whole chunks).

    Returns
    -------
    (n,) int64 ndarray
        ``rows`` reordered.

    Examples
    --------
    >>> out = window_order(np.arange(8), 2, np.random.default_rng(0), window=4)
    >>> sorted(out.tolist()) == list(range(8)), sorted({int(r) // 4 for r in out[:4]}) != [0, 1]
    (True, True)
    """
    rows = np.asarray(rows, dtype=np.int64)
    chunk = rows // max(int(chunk_rows), 1)
    uniq, inverse = np.unique(chunk, return_inverse=True)
    rank = rng.permutation(len(uniq))
    win = rank[inverse] // max(1, int(window) // max(int(chunk_rows), 1))
    return rows[np.lexsort((rng.random(len(rows)), win))]


def _variant_options(protocol, crops: _Crops, specs) -> dict:
    """``reference`` and the background pools of ``bg_image`` for the run's crops."""
    from cellbg.variants import protocol_backgrounds

    pools = protocol_backgrounds(protocol, specs, size=int(crops.size), channels=int(crops.channels))
    return {
        "reference": protocol.variants.reference,
        "backgrounds": pools or None,
        "others_fill": protocol.variants.others_fill,
    }


def _apply_variant(spec: str, images, masks, *, bboxes, labels, fill: str, seed: int, **options):
    from cellbg.variants import apply_variant

    return apply_variant(spec, images, masks, bboxes=bboxes, labels=labels, fill=fill, seed=seed, **options)


def _background_ids(res, test_variant: str, options: dict | None) -> np.ndarray:
    """``<source>/<id>`` of the background each cell was drawn (``bg_image``), "" otherwise."""
    drawn = getattr(res, "background", None)
    if drawn is None or (np.asarray(drawn) < 0).all():
        return np.full(len(res.partner), "", dtype=object)
    from cellbg.variants import parse_variant

    source = str(parse_variant(test_variant).args[0])
    pool = (options or {}).get("backgrounds", {})[source]
    ids = np.asarray([f"{source}/{i}" for i in pool.ids], dtype=object)
    return np.where(np.asarray(drawn) >= 0, ids[np.clip(drawn, 0, None)], "")


class _TrainBatches(torch.utils.data.Dataset):
    """Batch ``b`` of one epoch, fully prepared (crops -> variant -> augmentation).

    Each batch draws from its own generators seeded from ``(seed, epoch, b)``: data-loader
    workers do not repeat each other's draws and the result does not depend on their number.
    A worker process holds its own copy of the store reader (and its decoded chunks).
    """

    def __init__(
        self,
        crops: _Crops,
        order: np.ndarray,
        *,
        batch_size: int,
        variant: str,
        fill: str,
        augment: bool,
        seed: int,
        epoch: int,
    ):
        self.crops, self.variant, self.fill, self.augment = crops, variant, fill, augment
        self.seed, self.epoch = seed, epoch
        n_batches = max(1, math.ceil(len(order) / batch_size))
        self.batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
        if len(self.batches) > 1 and len(self.batches[-1]) < 2:
            self.batches.pop()  # BatchNorm cannot train on a batch of one
        self.dihedral = RandDihedral()
        self.jitter = RandIntensityJitter()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        idx = self.batches[b]
        images, masks = self.crops.take(idx)
        labels = self.crops.labels[idx]
        images = self.crops.variant(
            self.variant, idx, images, masks, fill=self.fill, seed=_seed(self.seed, self.epoch, b, 1)
        ).images
        if self.augment:
            g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, b, 2))
            self.dihedral.set_random_state(generator=g).randomize(len(idx))
            self.jitter.set_random_state(generator=g).randomize(len(idx))
            images = self.jitter(self.dihedral(images))
        return images.contiguous(), torch.from_numpy(labels)


def _epoch_rows(crops: _Crops, train: np.ndarray, protocol, seeds: dict, epoch: int) -> np.ndarray:
    """The training rows of one epoch in batch order: a seeded (or class-balanced) draw,
    shuffled chunk-aligned (:func:`window_order`)."""
    rng = np.random.default_rng(_seed(seeds["sampler_seed"], epoch))
    if protocol.training.balanced_sampling:
        labels = crops.labels[train]
        counts = np.bincount(labels, minlength=len(crops.classes)).astype(np.float64)
        weights = 1.0 / counts[labels]
        rows = train[rng.choice(len(train), size=len(train), replace=True, p=weights / weights.sum())]
    else:
        rows = train
    return window_order(rows, crops.store.chunk_rows, rng)


def _epoch_loader(
    crops: _Crops, train: np.ndarray, protocol, spec: JobSpec, seeds: dict, epoch: int, *, device: torch.device
) -> torch.utils.data.DataLoader:
    """The batches of one epoch (:func:`_epoch_rows`), prepared by ``training.num_workers``
    processes, pinned and prefetched on a GPU."""
    cfg = protocol.training
    batches = _TrainBatches(
        crops,
        _epoch_rows(crops, train, protocol, seeds, epoch),
        batch_size=cfg.batch_size,
        variant=spec.train_variant,
        fill=protocol.variants.fill,
        augment=cfg.augment,
        seed=seeds["batch_seed"],
        epoch=epoch,
    )
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def _blocks(rows: np.ndarray, size: int = PREDICT_BLOCK) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, len(rows), size)] or [rows]


def _shown(crops: _Crops, rows: np.ndarray, variant: str, *, fill: str, seed: int):
    """The variant of the crops of ``rows`` (one block: its pairing pool), as :func:`_apply_variant`."""
    images, masks = crops.take(rows)
    return crops.variant(variant, rows, images, masks, fill=fill, seed=seed)


def _evaluate_rows(
    model: nn.Module,
    crops: _Crops,
    rows: np.ndarray,
    variant: str,
    *,
    fill: str,
    seed: int,
    device,
    batch_size: int,
    amp: bool,
) -> tuple:
    """Loss, accuracy, probabilities, partners and background ids of ``model`` on ``variant`` of ``rows``.

    Streamed in blocks of :data:`PREDICT_BLOCK` rows (in the order given); block ``j`` gets
    the variant with seed ``seed + j``. Memory stays one block whatever the number of rows.
    """
    probs, partners, backgrounds, loss_sum = [], [], [], 0.0
    for j, block in enumerate(_blocks(rows)):
        res = _shown(crops, block, variant, fill=fill, seed=seed + j)
        labels = torch.from_numpy(crops.labels[block])
        loss, _, p = _evaluate(model, res.images, labels, device=device, batch_size=batch_size, amp=amp)
        loss_sum += loss * len(block)
        probs.append(p)
        partner = np.asarray(res.partner)
        partners.append(np.where(partner >= 0, block[np.clip(partner, 0, None)], -1))
        backgrounds.append(_background_ids(res, variant, crops.options))
    p = torch.cat(probs) if probs else torch.zeros(0, len(crops.classes))
    y = crops.labels[rows]
    acc = float((p.argmax(1).numpy() == y).mean()) if len(rows) else float("nan")
    return (
        loss_sum / max(len(rows), 1),
        acc,
        p,
        np.concatenate(partners) if partners else np.zeros(0, np.int64),
        np.concatenate(backgrounds) if backgrounds else np.zeros(0, dtype=object),
    )


# --------------------------------------------------------------------------- runtime
def select_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cuda"`` fails clearly when absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CellbgError("training.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


def num_threads() -> int:
    """Threads for torch: ``CELLBG_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the cores this
    process may use (its CPU affinity, which Slurm and Dask workers restrict)."""
    for var in ("CELLBG_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise CellbgError(f"environment variable {var} must be an integer; got {value!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def job_runtime(device: torch.device) -> Iterator[None]:
    """Thread count and deterministic algorithms for one job; restores the previous settings.

    Used by every job that trains or predicts (classifiers here, detectors in
    :mod:`cellbg.detect.train`), so all of them are deterministic on CPU in the same way.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(num_threads())
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _autocast(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device, batch_size: int, amp: bool
) -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and class probabilities of ``model`` on in-memory tensors."""
    model.eval()
    probs, losses = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device, non_blocking=True)
            y = labels[i : i + batch_size].to(device)
            with _autocast(device, amp):
                logits = model(x)
            logits = logits.float()
            losses.append(nn.functional.cross_entropy(logits, y, reduction="sum").item())
            probs.append(torch.softmax(logits, dim=1).cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, 2)
    n = max(1, len(images))
    return sum(losses) / n, float((p.argmax(1) == labels).float().mean()) if len(labels) else float("nan"), p


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def train_epoch(
    model: nn.Module,
    batches,
    optimizer,
    *,
    scaler=None,
    device=None,
    amp: bool = False,
    memo: dict | None = None,
    train_mode: bool = True,
) -> tuple[float, int, int]:
    """One pass of forward, backward and optimizer step over ``batches`` of ``(x, y)``.

    Returns the summed loss, the number of correct predictions and the number of samples.
    (Shared by :func:`run_job` and the benchmarks, which feed it tensors already in memory.)

    Out of GPU memory: a batch that does not fit is split into micro-batches whose gradients
    are accumulated (each micro-batch's loss weighted by its share of the batch), so every
    optimizer step still sees the whole batch; the micro-batch size halves until the batch
    fits, is printed once, and is kept for the following batches (in ``memo["micro_batch"]``,
    which a job keeps in its checkpoint). BatchNorm then normalises over micro-batches, so
    the numbers differ slightly from a run that fitted. A single cell that does not fit
    raises :class:`~cellbg.CellbgError`.
    """
    device = device if device is not None else torch.device("cpu")
    if train_mode:
        model.train()
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    memo = memo if memo is not None else {}
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = len(y)
        while True:
            micro = min(int(memo.get("micro_batch") or n), n)
            try:
                optimizer.zero_grad(set_to_none=True)
                batch_loss, batch_correct = 0.0, 0
                for s in range(0, n, micro):
                    xs, ys = x[s : s + micro], y[s : s + micro]
                    with _autocast(device, amp):
                        logits = model(xs)
                        loss = nn.functional.cross_entropy(logits.float(), ys)
                    scaler.scale(loss if micro >= n else loss * (len(ys) / n)).backward()
                    batch_loss += loss.item() * len(ys)
                    batch_correct += int((logits.argmax(1) == ys).sum())
                break
            except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
                if not _is_oom(exc) or device.type != "cuda":
                    raise
                optimizer.zero_grad(set_to_none=True)
                del exc
                torch.cuda.empty_cache()
                if micro <= 1:
                    raise CellbgError(
                        "out of GPU memory with a single cell per step; use a smaller model or crop, "
                        "or training.device: cpu"
                    ) from None
                memo["micro_batch"] = micro // 2
                print(
                    f"out of GPU memory at {micro} cells per step: accumulating gradients over micro-batches of "
                    f"{micro // 2}",
                    flush=True,
                )
        scaler.step(optimizer)
        scaler.update()
        loss_sum += batch_loss
        correct += batch_correct
        seen += n
    return loss_sum, correct, seen


# --------------------------------------------------------------------------- one job
def _job_meta(protocol, spec: JobSpec, key: str, crops: _Crops, split: Split, seeds: dict) -> dict:
    model = _model_spec(protocol, spec.model)
    return {
        "key": key,
        "job": spec.to_dict(),
        "arch": model.arch,
        "model_spec": model.model_dump(mode="json"),
        "model_kwargs": model.kwargs(),
        "in_channels": int(crops.channels),
        "classes": crops.classes,
        "crop_size": int(crops.size),
        "fill": protocol.variants.fill,
        "variant_seed": protocol.variants.seed,
        "training": protocol.training.model_dump(mode="json"),
        "patients": {"train": split.train_patients, "val": split.val_patients, "test": split.test_patients},
        "n_cells": {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test))},
        "seeds": seeds,
        "run_dir": str(protocol.run_dir),
        "cellbg": __version__,
    }


def _result_from_files(spec: JobSpec, key: str, job_dir: Path, seconds: float = 0.0, accuracy=None) -> JobResult:
    history = pd.read_csv(job_dir / "history.csv")
    acc = dict(accuracy or {})
    best = history.loc[history["best"].astype(bool)]
    best_row = best.iloc[-1] if len(best) else history.iloc[-1]
    return JobResult(
        spec=spec,
        key=key,
        job_dir=job_dir,
        done=True,
        epochs=int(history["epoch"].max()),
        best_epoch=int(best_row["epoch"]),
        best_val_loss=float(best_row["val_loss"]),
        accuracy=acc,
        seconds=seconds,
    )


def _job_seeds(protocol, spec: JobSpec) -> dict:
    """Every seed of a job, derived from its seed and fold (recorded in history.csv).

    The initialisation and batch-order seeds do not depend on the train variant, so models
    trained on different variants start from the same weights and see the cells in the
    same order (paired comparisons).
    """
    return {
        "seed": spec.seed,
        "init_seed": _seed(spec.seed, spec.fold, 0),
        "sampler_seed": _seed(spec.seed, spec.fold, 1),
        "batch_seed": _seed(spec.seed, spec.fold, 2, _text_seed(spec.train_variant), protocol.variants.seed),
        "val_split_seed": protocol.seed,
        "test_variant_seed": protocol.variants.seed,
    }


def run_job(
    protocol,
    spec: JobSpec,
    job_dir: str | Path | None = None,
    *,
    max_epochs_this_call: int | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> JobResult:
    """Train one job, checkpointing every epoch; :func:`run_prediction` then tests it.

    Callable in a fresh process (a Dask worker, another node) given only the protocol and the
    spec: it reads the crops from ``protocol.run_dir``. A finished job (``DONE`` present) is
    not rerun; an interrupted one resumes from ``checkpoint.pt``.

    Parameters
    ----------
    protocol : Protocol
    spec : JobSpec
    job_dir : path, optional
        Default ``<run>/jobs/<job_key>``.
    max_epochs_this_call : int, optional
        Stop (checkpointed, not done) after this many epochs in this call; a later call
        resumes. For time-limited allocations and for testing resumption.
    on_epoch_end : callable, optional
        Called as ``on_epoch_end(epoch, history_row)`` after each epoch's checkpoint is written.

    Returns
    -------
    JobResult

    Raises
    ------
    CellbgError
        Missing crops, an unknown model or variant, a patient in both train and test.
    """
    t0 = time.perf_counter()
    run_dir = Path(protocol.run_dir)
    key = job_key(protocol, spec)
    job_dir = Path(job_dir) if job_dir is not None else run_dir / "jobs" / key
    if (job_dir / DONE).exists():
        return _result_from_files(spec, key, job_dir)
    model_spec = _model_spec(protocol, spec.model)
    cfg = protocol.training
    from cellbg.variants import parse_variant

    parse_variant(spec.train_variant)
    crops = _read_crops(run_dir, budget=cfg.memory_budget, log=True)
    crops.options = _variant_options(protocol, crops, [spec.train_variant])
    split = patient_split(
        crops.cells,
        fold=spec.fold,
        val_fraction=cfg.split.val_fraction,
        val_patients=cfg.split.val_patients if cfg.split.kind == "fixed" else None,
        seed=protocol.seed,
    )
    seeds = _job_seeds(protocol, spec)
    device = select_device(cfg.device)
    amp = bool(cfg.amp and device.type == "cuda")
    fp16 = amp and not torch.cuda.is_bf16_supported()
    meta = _job_meta(protocol, spec, key, crops, split, seeds)
    # the device this job actually used (not the setting "auto"), and its mixed precision
    meta["device"] = str(device)
    if device.type == "cuda":
        meta["device"] = f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    meta["amp_dtype"] = ("float16" if fp16 else "bfloat16") if amp else "off"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job_dir / "spec.json", meta)
    with job_runtime(device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds["init_seed"])  # layer initialisers draw from the global RNG
            model = get_model(
                model_spec.arch, in_channels=meta["in_channels"], num_classes=len(crops.classes), **model_spec.kwargs()
            )
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # the training state a checkpoint carries (train_epoch also keeps "micro_batch" in it)
        state: dict[str, Any] = {
            "epoch": 0,
            "best_val_loss": math.inf,
            "best_epoch": 0,
            "stale": 0,
            "best_model": None,
            "history": [],
            "stopped": False,
        }
        ckpt_path = job_dir / "checkpoint.pt"
        if ckpt_path.exists():
            try:
                ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
            except Exception:  # a checkpoint is only ever replaced atomically; unreadable = foreign
                ckpt = None
            if ckpt is not None and ckpt.get("key") == key:
                model.load_state_dict(ckpt["model"])
                if not ckpt.get("finished"):  # a finished checkpoint keeps only the weights
                    optimizer.load_state_dict(ckpt["optimizer"])
                    scheduler.load_state_dict(ckpt["scheduler"])
                    scaler.load_state_dict(ckpt["scaler"])
                state = ckpt["state"]

        has_val = len(split.val) > 0

        epochs_this_call = 0
        while state["epoch"] < cfg.epochs and not state["stopped"]:
            if max_epochs_this_call is not None and epochs_this_call >= max_epochs_this_call:
                break
            epoch = state["epoch"] + 1
            te = time.perf_counter()
            loader = _epoch_loader(crops, split.train, protocol, spec, seeds, epoch, device=device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(seeds["init_seed"], epoch))  # for any layer that draws (dropout)
                loss_sum, correct, seen = train_epoch(
                    model, loader, optimizer, scaler=scaler, device=device, amp=amp, memo=state
                )
            if not math.isfinite(loss_sum):
                raise CellbgError(
                    f"training job {_job_label(spec)}: the training loss is {loss_sum / max(seen, 1)} "
                    f"at epoch {epoch}; "
                    "check the crops for NaN or infinite pixels (cellbg refuses them when it reads images) "
                    "or lower training.lr"
                )
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if has_val:
                val_loss, val_acc, _, _, _ = _evaluate_rows(
                    model,
                    crops,
                    split.val,
                    spec.train_variant,
                    fill=protocol.variants.fill,
                    seed=_seed(seeds["batch_seed"], 0xFFFF),
                    device=device,
                    batch_size=cfg.batch_size,
                    amp=amp,
                )
            else:
                val_loss, val_acc = float("nan"), float("nan")
            improved = not has_val or val_loss < state["best_val_loss"]
            if improved:
                state["best_val_loss"] = val_loss if has_val else math.nan
                state["best_epoch"] = epoch
                state["stale"] = 0
                state["best_model"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                state["stale"] += 1
                state["stopped"] = state["stale"] >= cfg.patience
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": lr,
                "best": improved,
                "seconds": time.perf_counter() - te,
                **seeds,
            }
            state["history"].append(row)
            state["epoch"] = epoch
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "key": key,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "state": state,
                    },
                    tmp,
                )
            write_text_atomic(job_dir / "history.csv", pd.DataFrame(state["history"]).to_csv(index=False))
            epochs_this_call += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

        finished = state["epoch"] >= cfg.epochs or state["stopped"]
        if not finished:
            return JobResult(
                spec=spec,
                key=key,
                job_dir=job_dir,
                done=False,
                epochs=state["epoch"],
                best_epoch=state["best_epoch"],
                best_val_loss=state["best_val_loss"],
                seconds=time.perf_counter() - t0,
            )
        if state["best_model"] is None:  # every validation loss was NaN
            raise CellbgError(
                f"training job {_job_label(spec)}: no epoch gave a finite validation loss; check the crops for "
                "NaN or infinite pixels or lower training.lr"
            )
        # history.csv again from the checkpoint: a job redone after its history was damaged
        write_text_atomic(job_dir / "history.csv", pd.DataFrame(state["history"]).to_csv(index=False))
        model.load_state_dict(state["best_model"])
        with atomic_path(ckpt_path) as tmp:
            torch.save({"key": key, "model": model.state_dict(), "state": state, "finished": True}, tmp)
    write_text_atomic(job_dir / DONE, f"{key}\n")
    return _result_from_files(spec, key, job_dir, seconds=time.perf_counter() - t0)


def _job_label(spec: JobSpec) -> str:
    return f"{spec.model}/{spec.train_variant}/s{spec.seed}/f{spec.fold}"


def check_probabilities(preds: pd.DataFrame, *, where: str) -> None:
    """Raise unless every ``prob_*`` column of a prediction table is finite (written only then).

    A NaN probability would be predicted as the first class and could be counted correct,
    so no stage writes one.

    Raises
    ------
    CellbgError
        Naming ``where``, how many rows, and the first cell and test variant.
    """
    cols = [c for c in preds.columns if c.startswith("prob_")]
    if not cols:
        raise CellbgError(f"{where}: the predictions have no prob_<class> columns")
    bad = ~np.isfinite(preds[cols].to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any():
        row = preds.loc[bad].iloc[0]
        raise CellbgError(
            f"{where}: {int(bad.sum())} of {len(preds)} prediction rows have non-finite probabilities, e.g. cell "
            f"{row.get('cell_id', '?')} (test variant {row.get('test_variant', '?')}); nothing was written: check "
            "the images for NaN or infinite pixels"
        )


def run_prediction(
    protocol, spec: PredictSpec, job_dir: str | Path | None = None, *, train_dir: str | Path | None = None
) -> Path:
    """Show one trained model one test variant of its held-out cells; write the predictions.

    The held-out cells (the training job's test fold, in store order) are read from the
    store in blocks of :data:`~cellbg.planning.PREDICT_BLOCK` cells; block ``j`` gets the
    variant with seed ``variants.seed + j`` (its ``mixed_*`` pairing pool is the block).
    Memory stays one block however many cells a fold holds. A finished job (``DONE``
    present) is not rerun.

    Parameters
    ----------
    protocol : Protocol
    spec : PredictSpec
    job_dir : path, optional
        Default ``<run>/jobs/<predict_key>``.
    train_dir : path, optional
        The finished training job; default ``<run>/jobs/<job_key>``.

    Returns
    -------
    Path
        ``<job_dir>/predictions.parquet``: one row per held-out cell, columns ``cell_id,
        image_id, patient_id, label, label_index, model, train_variant, test_variant, seed,
        fold, pred, pred_index, correct, prob_<class>..., partner_cell_id, background_id``.

    Raises
    ------
    CellbgError
        The training job is not finished, an unknown variant.
    """
    from cellbg.variants import parse_variant

    run_dir = Path(protocol.run_dir)
    train_key, key, job_dir = job_folder(protocol, spec, predict_key, job_dir=job_dir)
    out = job_dir / "predictions.parquet"
    if (job_dir / DONE).exists():
        return out
    parse_variant(spec.test_variant)
    cfg = protocol.training
    device = select_device(cfg.device)
    amp = bool(cfg.amp and device.type == "cuda")
    t0 = time.perf_counter()
    with job_runtime(device):
        model, meta = load_job_model(
            Path(train_dir) if train_dir is not None else run_dir / "jobs" / train_key, device=device
        )
        crops = _read_crops(run_dir, in_memory=False)
        crops.options = _variant_options(protocol, crops, [spec.test_variant])
        idx = np.flatnonzero(crops.cells["fold"].to_numpy() == spec.train.fold)
        _, _, probs, partner, background = _evaluate_rows(
            model,
            crops,
            idx,
            spec.test_variant,
            fill=protocol.variants.fill,
            seed=protocol.variants.seed,
            device=device,
            batch_size=cfg.batch_size,
            amp=amp,
        )
    labels = crops.labels[idx]
    cells = crops.cells.iloc[idx].reset_index(drop=True)
    all_ids = crops.cells["cell_id"].astype(str).to_numpy()
    pred_index = probs.argmax(1).numpy() if len(idx) else np.zeros(0, np.int64)
    df = pd.DataFrame(
        {
            "cell_id": all_ids[idx],
            "image_id": cells["image_id"].astype(str) if "image_id" in cells else "",
            "patient_id": cells["patient_id"].astype(str),
            "label": cells["label"].astype(str),
            "label_index": labels.astype(np.int64),
            "model": spec.train.model,
            "train_variant": spec.train.train_variant,
            "test_variant": spec.test_variant,
            "seed": spec.train.seed,
            "fold": spec.train.fold,
            "pred": np.asarray(crops.classes, dtype=object)[pred_index],
            "pred_index": pred_index.astype(np.int64),
            "correct": pred_index == labels,
        }
    )
    for k, name in enumerate(crops.classes):
        df[f"prob_{name}"] = probs[:, k].numpy().astype(np.float64) if len(idx) else np.zeros(0)
    df["partner_cell_id"] = np.where(partner >= 0, all_ids[np.clip(partner, 0, None)], "")
    df["background_id"] = background
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        job_dir / "spec.json",
        {
            "key": key,
            "train_key": train_key,
            "job": spec.to_dict(),
            "cells": int(len(idx)),
            "seconds": time.perf_counter() - t0,
            "cellbg": __version__,
        },
    )
    check_probabilities(df, where=f"prediction job {_job_label(spec.train)}/{spec.test_variant} ({job_dir})")
    write_parquet_atomic(df, out)
    write_text_atomic(job_dir / DONE, f"{key}\n")
    return out


# --------------------------------------------------------------------------- all jobs
def run_training(protocol, *, progress: Callable[[JobResult], None] | None = None) -> list[JobResult]:
    """Run every training job, then every prediction job, of the protocol serially (skipping
    finished ones), then :func:`collect_predictions`. The runner (:mod:`cellbg.runner`) runs
    them in parallel.

    Returns
    -------
    list of JobResult
        One per training job, ``accuracy`` holding its test accuracy per test variant.
    """
    import dataclasses

    from cellbg.protocol import write_resolved

    write_resolved(protocol)  # collect_predictions and later stages read the run's protocol
    results = []
    for spec in plan_jobs(protocol):
        result = run_job(protocol, spec)
        result = dataclasses.replace(result, accuracy=test_job(protocol, spec))
        results.append(result)
        if progress is not None:
            progress(result)
    collect_predictions(protocol.run_dir, protocol=protocol)
    return results


def test_job(
    protocol, spec: JobSpec, *, train_dir: str | Path | None = None, out_dir: str | Path | None = None
) -> dict[str, float]:
    """Run the prediction job of every test variant for one finished training job.

    Parameters
    ----------
    protocol : Protocol
    spec : JobSpec
    train_dir : path, optional
        The finished training job (default its folder in the run).
    out_dir : path, optional
        Put the prediction jobs in ``out_dir/<test variant>`` instead of the run's ``jobs/``.

    Returns
    -------
    dict
        Test accuracy per test variant.
    """
    accuracy = {}
    for variant in protocol.variants.test:
        job_dir = Path(out_dir) / variant if out_dir is not None else None
        path = run_prediction(protocol, PredictSpec(train=spec, test_variant=variant), job_dir, train_dir=train_dir)
        accuracy[variant] = float(pd.read_parquet(path, columns=["correct"])["correct"].mean())
    return accuracy


test_job.__test__ = False  # type: ignore[attr-defined]  # pytest's collection flag, set on a function


#: The run's predictions as a dataset: one parquet file per prediction job (same columns),
#: for readers that scan lazily (``pyarrow.dataset.dataset(<run>/predictions)``).
PREDICTIONS_DATASET = "predictions"


def prediction_files(run_dir: str | Path, *, protocol=None) -> list[Path]:
    """The ``predictions.parquet`` of every prediction job of the run's protocol.

    Raises
    ------
    CellbgError
        When some jobs are not finished (their number and the first one).
    """
    run_dir = Path(run_dir)
    if protocol is None:
        from cellbg.protocol import load_run

        protocol = load_run(run_dir)
    crops_hash = crops_fingerprint(run_dir)
    train_keys = {s: job_key(protocol, s, crops_hash=crops_hash) for s in plan_jobs(protocol)}
    files, missing = [], []
    for spec in plan_predictions(protocol):
        job_dir = run_dir / "jobs" / predict_key(protocol, spec, train_key=train_keys[spec.train])
        if not (job_dir / DONE).exists():
            missing.append(spec)
            continue
        files.append(job_dir / "predictions.parquet")
    if missing:
        raise unfinished_jobs("prediction", missing, run_dir, "cellbg train")
    return files


def collect_predictions(run_dir: str | Path, *, protocol=None) -> Path:
    """Gather the predictions of the protocol's finished prediction jobs.

    Writes ``<run>/predictions/`` (:data:`PREDICTIONS_DATASET`: one file per job, hard links
    to the jobs' files where the file system allows) and ``<run>/predictions.parquet`` (the
    same rows in one file, written job by job with constant memory). Only the jobs of the
    run's protocol (``protocol.resolved.yaml``, or ``protocol``) are read, so stale job
    folders from earlier protocol versions are ignored.

    Raises
    ------
    CellbgError
        When some jobs are not finished (their number and the first one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cellbg._io import atomic_dir

    run_dir = Path(run_dir)
    files = prediction_files(run_dir, protocol=protocol)
    with atomic_dir(run_dir / PREDICTIONS_DATASET) as tmp:
        for f in files:
            target = Path(tmp) / f"part-{f.parent.name}.parquet"
            try:
                os.link(f, target)
            except OSError:
                import shutil

                shutil.copyfile(f, target)
    out = run_dir / "predictions.parquet"
    with atomic_path(out) as tmp:
        writer, schema = None, None
        try:
            for f in files:
                table = pq.read_table(f)
                if writer is None:
                    schema = table.schema.remove_metadata()
                    writer = pq.ParquetWriter(str(tmp), schema)
                table = table.replace_schema_metadata(None)
                if not table.schema.equals(schema):
                    table = table.cast(schema)
                writer.write_table(table)
            if writer is None:
                writer = pq.ParquetWriter(str(tmp), pa.schema([]))
        finally:
            if writer is not None:
                writer.close()
    return out


def load_job_model(job_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a finished job (in eval mode) and its ``spec.json``.

    Returns
    -------
    model : torch.nn.Module
        Best weights, on ``device``, in eval mode.
    spec : dict
        ``spec.json``: ``job`` (model, train_variant, seed, fold), ``arch``, ``model_kwargs``,
        ``in_channels``, ``classes``, ``crop_size``, ``patients``, ``seeds``, ...
    """
    job_dir = Path(job_dir)
    if not (job_dir / DONE).exists():
        raise CellbgError(f"training job {job_dir} is not finished (no {DONE} marker); run 'cellbg train' first")
    spec = json.loads((job_dir / "spec.json").read_text(encoding="utf-8"))
    model = get_model(
        spec["arch"], in_channels=spec["in_channels"], num_classes=len(spec["classes"]), **spec["model_kwargs"]
    )
    ckpt = torch.load(job_dir / "checkpoint.pt", map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), spec
