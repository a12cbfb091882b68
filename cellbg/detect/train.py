"""One detection job: train a Faster R-CNN on the training patients' fields, test on the held-out ones.

A job is ``(condition, seed, fold)``. ``without``: the target cells are the only annotated
objects (one class per target class); ``with``: the correlated structure is annotated as one
more class. Both conditions start from the same weights (the box predictor aside, whose size
differs) and see the fields in the same order, so their numbers pair by seed and fold.

Its files go to ``<run>/detect/jobs/<key>/``::

    spec.json            the job, classes, patients of each split, seeds
    checkpoint.pt        written (atomically) after every epoch; a killed job resumes from it
    history.csv          per epoch: the four loss parts and their sum, training and validation
    metrics.csv          per test variant x class: AP@0.5, AP@0.5:0.95 (COCO, pycocotools), boxes
    truth.parquet        per target box x test variant: found (class and IoU), best IoU and score
    detections.parquet   per detected box x test variant: box, class, score, matched box
    DONE                 written last

Test variants: ``original`` and, when the fields have a correlated structure,
``no_correlated``: the structure's pixels (dilated by ``correlated.dilate``, target cells
never touched) replaced by the fill. A detector that finds a target class through the
structure loses recall there (the reliance test).

Determinism: the initialisation, the order of the fields, the flips and the detector's own
sampling of anchors and proposals draw from generators seeded from ``(seed, fold, epoch,
batch)``; on CPU the same protocol and seed give the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import atomic_path, write_json_atomic, write_parquet_atomic, write_text_atomic
from cellbg.detect.boxes import boxes_from_labels, remove_structure
from cellbg.detect.model import get_detector, replace_predictor
from cellbg.detect.plan import DONE, DetectJobSpec, detect_dir, detect_job_key, detection_fields, fields_digest

__all__ = ["LOSS_PARTS", "TEST_VARIANTS", "run_detect_job", "train_detector_epoch", "load_fields", "Fields"]

#: torchvision's Faster R-CNN loss parts, in the order of the study's figures.
LOSS_PARTS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
#: The test images: as they are, and with the correlated structure removed.
TEST_VARIANTS = ("original", "no_correlated")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# --------------------------------------------------------------------------- fields
@dataclass
class Fields:
    """The fields of view in memory: images, target boxes and the correlated structure.

    Attributes
    ----------
    table : DataFrame
        :func:`cellbg.detect.plan.detection_fields`, row i = field i.
    images : list of (M, N, C) ndarray
        As read (source dtype, channels last, 3 channels).
    cell_labels : list of (M, N) ndarray
        Instance labels of the target cells.
    cell_boxes : list of (K, 4) ndarray
        ``row0, col0, row1, col1`` of each target cell; ``cell_ids`` their labels.
    structure : list of (M, N) ndarray or None
        Instance labels of the correlated structure (None: no source).
    structure_boxes : list of (L, 4) ndarray
    classes : list of str
        The image classes (sorted); class ``k`` is detector label ``k + 1``.
    """

    table: pd.DataFrame
    images: list
    cell_labels: list
    cell_boxes: list
    cell_ids: list
    structure: list
    structure_boxes: list
    classes: list


def _three_channels(image: np.ndarray, path: str) -> np.ndarray:
    """(C, M, N) -> (M, N, 3): gray repeated, two channels padded with zeros."""
    c = image.shape[0]
    if c == 1:
        image = np.repeat(image, 3, axis=0)
    elif c == 2:
        image = np.concatenate([image, np.zeros_like(image[:1])])
    elif c > 3:
        raise CellbgError(f"{path} has {c} channels; the detector takes 1 to 3 (choose them with data.channels)")
    return np.ascontiguousarray(np.moveaxis(image, 0, -1))


def load_fields(protocol, fields: pd.DataFrame) -> Fields:
    """Read the fields' images, target label images and correlated masks.

    Raises
    ------
    CellbgError
        A missing label image (run the segmentation first), a mask whose shape differs from its image.
    """
    from cellbg.data import read_image, read_mask

    images, labels, boxes, ids, structure, sboxes = [], [], [], [], [], []
    for r in fields.itertuples():
        img = _three_channels(read_image(r.path, channels=protocol.data.channels), r.path)
        if not Path(r.seg_path).is_file():
            raise CellbgError(f"no label image {r.seg_path} for {r.path}; run 'cellbg segment' first")
        lab = read_mask(r.seg_path)
        if lab.shape != img.shape[:2]:
            raise CellbgError(f"label image {r.seg_path} is {lab.shape}, its image {r.path} is {img.shape[:2]}")
        b, i = boxes_from_labels(lab)
        s = None
        sb = np.zeros((0, 4), np.int64)
        if r.correlated_path:
            s = read_mask(r.correlated_path)
            if s.shape != img.shape[:2]:
                raise CellbgError(
                    f"correlated mask {r.correlated_path} is {s.shape}, its image {r.path} is {img.shape[:2]}"
                )
            sb, _ = boxes_from_labels(s)
        images.append(img)
        labels.append(lab)
        boxes.append(b)
        ids.append(i)
        structure.append(s)
        sboxes.append(sb)
    return Fields(
        fields.reset_index(drop=True), images, labels, boxes, ids, structure, sboxes, sorted(fields["label"].unique())
    )


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    scale = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else 1.0
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32) / scale)


def _xyxy(boxes: np.ndarray) -> torch.Tensor:
    """(row0, col0, row1, col1) -> torchvision's (x1, y1, x2, y2)."""
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    return b[:, [1, 0, 3, 2]]


def _targets(f: Fields, i: int, *, with_structure: bool) -> dict:
    k = f.classes.index(str(f.table.at[i, "label"])) + 1
    boxes = [f.cell_boxes[i]]
    labels = [np.full(len(f.cell_boxes[i]), k, np.int64)]
    if with_structure:
        boxes.append(f.structure_boxes[i])
        labels.append(np.full(len(f.structure_boxes[i]), len(f.classes) + 1, np.int64))
    return {"boxes": _xyxy(np.concatenate(boxes)), "labels": torch.from_numpy(np.concatenate(labels))}


def _flip(image: torch.Tensor, target: dict, vertical: bool, horizontal: bool) -> tuple[torch.Tensor, dict]:
    h, w = image.shape[-2:]
    boxes = target["boxes"].clone()
    if horizontal:
        image = image.flip(-1)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    if vertical:
        image = image.flip(-2)
        boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
    return image, {**target, "boxes": boxes}


# --------------------------------------------------------------------------- training
def train_detector_epoch(model, batches, optimizer, *, device: str | torch.device = "cpu") -> tuple[dict, int]:
    """One pass of forward, backward and step over ``batches`` of ``(images, targets)``.

    Returns the sum over images of each loss part (and of ``loss``, their total) and the
    number of images. Shared by :func:`run_detect_job` and ``benchmarks/bench_detect.py``.
    """
    model.train()
    sums = dict.fromkeys((*LOSS_PARTS, "loss"), 0.0)
    seen = 0
    for images, targets in batches:
        images = [x.to(device, non_blocking=True) for x in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        parts = model(images, targets)
        loss = sum(parts.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(images)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * n
        sums["loss"] += float(loss.detach()) * n
        seen += n
    return sums, seen


@contextlib.contextmanager
def _frozen_norm(model):
    """Training-mode forward (the losses) with BatchNorm on its running statistics (nothing updates)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.train()
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _val_losses(model, batches, *, device) -> tuple[dict, int]:
    sums = dict.fromkeys((*LOSS_PARTS, "loss"), 0.0)
    seen = 0
    with torch.no_grad(), _frozen_norm(model):
        for images, targets in batches:
            images = [x.to(device) for x in images]
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            parts = model(images, targets)
            n = len(images)
            for k, v in parts.items():
                sums[k] += float(v) * n
            sums["loss"] += float(sum(parts.values())) * n
            seen += n
    return sums, seen


def _batches(f: Fields, idx: np.ndarray, *, batch_size: int, with_structure: bool, augment: bool, seed: int):
    out = []
    for b in range(0, len(idx), batch_size):
        sel = idx[b : b + batch_size]
        g = torch.Generator().manual_seed(_seed(seed, b))
        flips = torch.rand((len(sel), 2), generator=g) < 0.5
        images, targets = [], []
        for j, i in enumerate(sel):
            x, t = _to_tensor(f.images[i]), _targets(f, int(i), with_structure=with_structure)
            if augment:
                x, t = _flip(x, t, bool(flips[j, 0]), bool(flips[j, 1]))
            images.append(x)
            targets.append(t)
        out.append((images, targets))
    return out


# --------------------------------------------------------------------------- evaluation
def _test_images(f: Fields, idx: np.ndarray, variant: str, fill: str, dilate: int) -> list[np.ndarray]:
    if variant == "original":
        return [f.images[i] for i in idx]
    return [
        remove_structure(f.images[i], f.structure[i], keep=f.cell_labels[i], fill=fill, dilate=dilate)
        if f.structure[i] is not None
        else f.images[i]
        for i in idx
    ]


def _predict(model, images: list[np.ndarray], *, device, batch_size: int) -> list[dict]:
    model.eval()
    out = []
    with torch.no_grad():
        for b in range(0, len(images), batch_size):
            xs = [_to_tensor(x).to(device) for x in images[b : b + batch_size]]
            out += [{k: v.cpu() for k, v in d.items()} for d in model(xs)]
    return out


def _match(pred: dict, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, *, score: float, iou: float):
    """Greedy class-aware matching (highest score first) of one image's detections to its boxes.

    Returns, per box, whether a detection of its class with at least ``score`` found it at
    IoU >= ``iou``, whether a detection of any class overlaps it that much, its best IoU with
    a same-class detection and that detection's score; and, per detection, the box it matched (-1).
    """
    from torchvision.ops import box_iou

    n, m = len(gt_boxes), len(pred["boxes"])
    found = np.zeros(n, bool)
    matched = np.full(m, -1, np.int64)
    best_iou = np.zeros(n)
    best_score = np.zeros(n)
    any_class = np.zeros(n, bool)
    if n == 0 or m == 0:
        return found, any_class, best_iou, best_score, matched
    ious = box_iou(gt_boxes, pred["boxes"]).numpy()
    same = gt_labels.numpy()[:, None] == pred["labels"].numpy()[None, :]
    scores = pred["scores"].numpy()
    confident = scores >= score
    any_class = ((ious >= iou) & confident[None, :]).any(1)
    same_iou = np.where(same, ious, 0.0)
    best = same_iou.argmax(1)
    best_iou = same_iou[np.arange(n), best]
    best_score = np.where(best_iou > 0, scores[best], 0.0)
    for j in np.argsort(-scores, kind="stable"):
        if not confident[j]:
            break
        cand = np.where(same[:, j] & ~found & (ious[:, j] >= iou), ious[:, j], -1.0)
        k = int(cand.argmax())
        if cand[k] >= iou:
            found[k] = True
            matched[j] = k
    return found, any_class, best_iou, best_score, matched


def _evaluate(
    model, f: Fields, idx: np.ndarray, protocol, spec: DetectJobSpec, class_names: list[str], *, device
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from torchmetrics.detection import MeanAveragePrecision

    cfg = protocol.detection
    has_structure = any(f.structure[i] is not None for i in idx)
    variants = list(TEST_VARIANTS) if has_structure else ["original"]
    metrics, truth, detections = [], [], []
    for variant in variants:
        images = _test_images(f, idx, variant, cfg.fill, cfg.correlated.dilate)
        preds = _predict(model, images, device=device, batch_size=cfg.batch_size)
        # the structure is a ground-truth object where it is annotated and still in the image
        keep_structure = spec.condition == "with" and variant == "original"
        targets = [_targets(f, int(i), with_structure=keep_structure) for i in idx]
        maps = {}
        for name, thresholds in (("ap", None), ("ap50", [0.5])):
            metric = MeanAveragePrecision(
                iou_type="bbox", class_metrics=True, backend="pycocotools", iou_thresholds=thresholds
            )
            metric.update(preds, targets)
            res = metric.compute()
            per = res["map_per_class"].reshape(-1).tolist()
            ids = res["classes"].reshape(-1).tolist()
            maps[name] = {int(c): (v if v >= 0 else math.nan) for c, v in zip(ids, per, strict=True)}
        for k, cls in enumerate(class_names, start=1):
            n_gt = int(sum(int((t["labels"] == k).sum()) for t in targets))
            metrics.append(
                {
                    "test_variant": variant,
                    "class": cls,
                    "ap50": maps["ap50"].get(k, math.nan),
                    "ap": maps["ap"].get(k, math.nan),
                    "n_boxes": n_gt,
                }
            )
        for j, i in enumerate(idx):
            row = f.table.iloc[int(i)]
            t = _targets(f, int(i), with_structure=False)  # recall is of the target cells
            found, any_class, best_iou, best_score, matched = _match(
                preds[j], t["boxes"], t["labels"], score=cfg.score_threshold, iou=cfg.iou_threshold
            )
            truth.append(
                pd.DataFrame(
                    {
                        "test_variant": variant,
                        "image_id": row["image_id"],
                        "patient_id": row["patient_id"],
                        "class": row["label"],
                        "instance": f.cell_ids[int(i)],
                        "found": found,
                        "found_any_class": any_class,
                        "best_iou": best_iou,
                        "best_score": best_score,
                    }
                )
            )
            p = preds[j]
            b = p["boxes"].numpy()
            labels = p["labels"].numpy()
            detections.append(
                pd.DataFrame(
                    {
                        "test_variant": variant,
                        "image_id": row["image_id"],
                        "patient_id": row["patient_id"],
                        "bbox_r0": b[:, 1],
                        "bbox_c0": b[:, 0],
                        "bbox_r1": b[:, 3],
                        "bbox_c1": b[:, 2],
                        "class": np.asarray(class_names, dtype=object)[labels - 1] if len(labels) else [],
                        "score": p["scores"].numpy().astype(np.float64),
                        "matched_instance": np.where(matched >= 0, f.cell_ids[int(i)][np.clip(matched, 0, None)], -1)
                        if len(f.cell_ids[int(i)])
                        else np.full(len(labels), -1),
                    }
                )
            )
    ident: dict[str, Any] = {"condition": spec.condition, "seed": spec.seed, "fold": spec.fold}
    out = []
    for frames in (metrics, truth, detections):
        df = (
            pd.DataFrame(frames)
            if frames and isinstance(frames[0], dict)
            else (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
        )
        for k, v in reversed(list(ident.items())):
            df.insert(0, k, v)
        out.append(df)
    return tuple(out)


# --------------------------------------------------------------------------- one job


def run_detect_job(
    protocol,
    spec: DetectJobSpec,
    job_dir: str | Path | None = None,
    *,
    fields: pd.DataFrame | None = None,
    fields_hash: str | None = None,
    max_epochs_this_call: int | None = None,
) -> Path:
    """Train one detection job (checkpointed every epoch), then test it on the held-out patients.

    Callable in a fresh process given the protocol and the spec. A finished job (``DONE``
    present) is not rerun; an interrupted one resumes from ``checkpoint.pt``.

    Parameters
    ----------
    protocol : Protocol
    spec : DetectJobSpec
    job_dir : path, optional
        Default ``<run>/detect/jobs/<key>``.
    fields : DataFrame, optional
        :func:`~cellbg.detect.plan.detection_fields` of the protocol (made when None).
    fields_hash : str, optional
        :func:`~cellbg.detect.plan.fields_digest` of ``fields`` (made when None).
    max_epochs_this_call : int, optional
        Stop (checkpointed, not done) after this many epochs; a later call resumes.

    Returns
    -------
    Path
        The job folder.

    Raises
    ------
    CellbgError
        Missing label images or masks, a patient in two folds, an unreadable weights file.
    """
    from cellbg.train import job_runtime, patient_split, select_device

    cfg = protocol.detection
    if spec.condition == "with" and cfg.correlated.source == "none":
        raise CellbgError("condition 'with' needs detection.correlated.source (masks or objects)")
    if fields is None:
        fields = detection_fields(protocol)
    if fields_hash is None:
        fields_hash = fields_digest(fields)
    key = detect_job_key(protocol, spec, fields_hash)
    job_dir = Path(job_dir) if job_dir is not None else detect_dir(protocol) / "jobs" / key
    if (job_dir / DONE).exists():
        return job_dir
    f = load_fields(protocol, fields)
    split = patient_split(
        f.table.assign(label=f.table["label"]),
        fold=spec.fold,
        val_fraction=protocol.training.split.val_fraction,
        val_patients=protocol.training.split.val_patients if protocol.training.split.kind == "fixed" else None,
        seed=protocol.seed,
    )
    with_structure = spec.condition == "with"
    class_names = list(f.classes) + ([cfg.correlated.name] if with_structure else [])
    seeds = {
        "seed": spec.seed,
        "init_seed": _seed(spec.seed, spec.fold, 0),
        "predictor_seed": _seed(spec.seed, spec.fold, 0, len(class_names)),
        "sampler_seed": _seed(spec.seed, spec.fold, 1),
        "batch_seed": _seed(spec.seed, spec.fold, 2),
    }
    size = int(max(max(im.shape[:2]) for im in f.images))
    job_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        job_dir / "spec.json",
        {
            "key": key,
            "job": spec.to_dict(),
            "classes": class_names,
            "detector": cfg.detector.model_dump(mode="json"),
            "image_size": size,
            "patients": {"train": split.train_patients, "val": split.val_patients, "test": split.test_patients},
            "fields": {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test))},
            "seeds": seeds,
            "run_dir": str(protocol.run_dir),
            "cellbg": __version__,
        },
    )
    device = select_device(cfg.device)
    d = cfg.detector
    with job_runtime(device):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds["init_seed"])
            model = get_detector(
                d.arch,
                num_classes=2,
                image_size=size,
                depth=d.depth,
                fpn_channels=d.fpn_channels,
                representation_size=d.representation_size,
            )
            # the same weights in both conditions, the box predictor (its size differs) aside
            torch.manual_seed(seeds["predictor_seed"])
            replace_predictor(model, len(class_names) + 1)
        if d.weights is not None:
            from cellbg.detect.model import _load_weights

            _load_weights(model, Path(d.weights))
        model.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
        state: dict[str, Any] = {"epoch": 0, "history": []}
        ckpt_path = job_dir / "checkpoint.pt"
        if ckpt_path.exists():
            try:
                ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
            except Exception:  # noqa: BLE001 - replaced atomically; unreadable means foreign
                ckpt = None
            if ckpt is not None and ckpt.get("key") == key:
                model.load_state_dict(ckpt["model"])
                if not ckpt.get("finished"):
                    optimizer.load_state_dict(ckpt["optimizer"])
                    scheduler.load_state_dict(ckpt["scheduler"])
                state = ckpt["state"]
        val = _batches(f, split.val, batch_size=cfg.batch_size, with_structure=with_structure, augment=False, seed=0)
        done_now = 0
        while state["epoch"] < cfg.epochs:
            if max_epochs_this_call is not None and done_now >= max_epochs_this_call:
                return job_dir
            epoch = state["epoch"] + 1
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(_seed(seeds["sampler_seed"], epoch))
            order = split.train[torch.randperm(len(split.train), generator=g).numpy()]
            batches = _batches(
                f,
                order,
                batch_size=cfg.batch_size,
                with_structure=with_structure,
                augment=cfg.augment,
                seed=_seed(seeds["batch_seed"], epoch),
            )
            lr = optimizer.param_groups[0]["lr"]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_seed(seeds["init_seed"], epoch))  # the RPN's and box head's sampling
                sums, seen = train_detector_epoch(model, batches, optimizer, device=device)
                vsums, vseen = _val_losses(model, val, device=device) if val else ({}, 0)
            scheduler.step()
            row = {"epoch": epoch, "lr": lr}
            row.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            row.update({f"val_{k}": (vsums[k] / vseen if vseen else math.nan) for k in sums})
            row["seconds"] = time.perf_counter() - t0
            row["train_images"] = seen
            state["history"].append(row)
            state["epoch"] = epoch
            with atomic_path(ckpt_path) as tmp:
                torch.save(
                    {
                        "key": key,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "state": state,
                    },
                    tmp,
                )
            history = pd.DataFrame(state["history"])
            history.insert(0, "condition", spec.condition)
            history.insert(1, "seed", spec.seed)
            history.insert(2, "fold", spec.fold)
            write_text_atomic(job_dir / "history.csv", history.to_csv(index=False))
            done_now += 1
        metrics, truth, detections = _evaluate(model, f, split.test, protocol, spec, class_names, device=device)
    write_text_atomic(job_dir / "metrics.csv", metrics.to_csv(index=False))
    write_parquet_atomic(truth, job_dir / "truth.parquet")
    write_parquet_atomic(detections, job_dir / "detections.parquet")
    with atomic_path(ckpt_path) as tmp:
        torch.save({"key": key, "model": model.state_dict(), "state": state, "finished": True}, tmp)
    write_text_atomic(job_dir / DONE, f"{key}\n")
    return job_dir


# --------------------------------------------------------------------------- all jobs
def run_detection(protocol, *, progress=None) -> pd.DataFrame:
    """The whole detection study of a protocol, serially: segmentation where missing, every
    job (finished ones skipped), then :func:`cellbg.detect.analysis.analyze_detection`.

    ``cellbg run`` runs the same jobs in parallel through the runner.

    Parameters
    ----------
    protocol : Protocol
    progress : callable, optional
        Called as ``progress(spec, job_dir)`` after each job.

    Returns
    -------
    DataFrame
        The tests (``<run>/detect/tests.csv``).
    """
    from cellbg.detect.analysis import analyze_detection
    from cellbg.detect.plan import plan_detect_jobs
    from cellbg.protocol import write_resolved
    from cellbg.segment import run_segmentation

    write_resolved(protocol)
    table = run_segmentation(protocol)
    fields = detection_fields(protocol, table=table)
    fhash = fields_digest(fields)
    for spec in plan_detect_jobs(protocol):
        job_dir = run_detect_job(protocol, spec, fields=fields, fields_hash=fhash)
        if progress is not None:
            progress(spec, job_dir)
    return analyze_detection(protocol.run_dir, protocol=protocol)
