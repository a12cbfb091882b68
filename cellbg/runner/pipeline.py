"""The cellbg pipeline as stages: data, segment, crops, train, predict, predictions,
saliency-maps, saliency, stats, detect, detect_stats, report.

Training and testing are separate jobs: a training job is keyed by what the model depends
on (never the test variants), a prediction job by the trained model's key and one test
variant, and so is a saliency job (with the saliency settings). Adding a test variant to a
finished run therefore runs its prediction (and saliency) jobs only, and the maps of a run
spread over workers and batch jobs like its predictions.

Each ``_plan_*`` function turns the resolved protocol and the keys of the finished
upstream stages into jobs; the job functions (``_job_*``) import their stage module on the
worker, so the client never imports torch. :func:`run_protocol` runs them all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellbg._io import atomic_dir
from cellbg.runner.jobs import FileDigests, Job, NotReady, RunContext, RunSummary, Stage, hash_key
from cellbg.runner.loop import run_stages


def _section(protocol, *path: str) -> Any:
    """A part of the resolved protocol as plain JSON data (for keys)."""
    obj = json.loads(protocol.model_dump_json())
    for p in path:
        obj = obj[p]
    return obj


def _job_synth(protocol) -> None:
    """Make the synthetic dataset in ``<run>/data`` (replacing an older one only when done)."""
    from cellbg import synth

    with atomic_dir(protocol.run_dir / "data") as tmp:
        synth.make_dataset(tmp, **protocol.data.synthetic.model_dump())


def _job_segment(protocol, table) -> None:
    from cellbg import segment

    segment.run_segmentation(protocol, table=table)


def _prepare_segment(ctx: RunContext, todo: list[Job]) -> None:
    """Clear what the segment jobs to run would otherwise keep.

    ``run_segmentation`` keeps label images whose ``segmentation/params.json`` matches the
    settings; here the runner's keys decide (they also see changed image bytes), so the
    stale label images of the batches to run and the shared params file go first, in this
    process, before batches run side by side.
    """
    (ctx.run_dir / "segmentation" / "params.json").unlink(missing_ok=True)
    for job in todo:
        for out in job.outputs:
            Path(out).unlink(missing_ok=True)


def _job_crops(protocol) -> None:
    from cellbg import crops

    crops.run_crops(protocol)


def _job_train(protocol, spec, job_dir: str) -> None:
    from cellbg import _progress, train

    epochs = protocol.training.epochs

    def epoch_done(epoch: int, row: dict) -> None:
        line = (
            f"epoch {epoch}/{epochs} loss {row['train_loss']:.4f} acc {row['train_accuracy']:.3f} "
            f"val loss {row['val_loss']:.4f} val acc {row['val_accuracy']:.3f} ({row['seconds']:.1f} s)"
        )
        _progress.report(
            done=epoch,
            total=epochs,
            unit="epochs",
            loss=row["train_loss"],
            acc=row["train_accuracy"],
            val_acc=row["val_accuracy"],
            epoch_seconds=row["seconds"],
            line=line,
        )

    _progress.report(done=0, total=epochs, unit="epochs")
    train.run_job(protocol, spec, job_dir=Path(job_dir), on_epoch_end=epoch_done)


def _job_predict(protocol, spec, job_dir: str) -> None:
    from cellbg import train

    train.run_prediction(protocol, spec, job_dir=Path(job_dir))


def _job_collect(run_dir: str) -> None:
    from cellbg import train

    train.collect_predictions(Path(run_dir))


def _job_saliency(protocol, spec, job_dir: str) -> None:
    from cellbg import _progress, saliency

    def mapped(number: int, n_methods: int) -> None:
        _progress.report(done=number, total=n_methods, unit="methods", line=f"method {number}/{n_methods} mapped")

    saliency.saliency_job(protocol, spec, job_dir=Path(job_dir), progress=mapped)


def _job_saliency_collect(protocol) -> None:
    from cellbg import saliency

    saliency.collect_saliency(protocol)


def _job_stats(run_dir: str) -> None:
    from cellbg import stats

    stats.run_stats(Path(run_dir))


def _job_report(run_dir: str) -> None:
    from cellbg import report

    report.write_report(Path(run_dir))


#: Images per segmentation job. Fixed (never from the worker count) so that cache keys do
#: not depend on the executor.
SEGMENT_BATCH = 16


def _digests(ctx: RunContext) -> FileDigests:
    """The run's file digests (:func:`run_stages` sets them before any stage is planned)."""
    assert ctx.digests is not None, "run_stages sets the file digests before planning"
    return ctx.digests


def _image_table(ctx: RunContext):
    """The discovered image table with a content digest per image and mask."""
    if "images" not in ctx.data:
        from cellbg.data import discover

        if ctx.protocol.data.source == "synthetic" and not (ctx.run_dir / "data" / "manifest.csv").exists():
            raise NotReady("data")
        table = discover(ctx.protocol)
        digests = _digests(ctx)
        table = table.assign(
            digest=[digests(p) for p in table["path"]],
            mask_digest=[digests(m) if m else "" for m in table["mask_path"]],
            objects_digest=[digests(o) if o else "" for o in table["objects_path"]],
        )
        ctx.data["images"] = table
    return ctx.data["images"]


def _plan_data(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    if p.data.source == "synthetic":
        return [
            Job(
                "data",
                "synthetic",
                hash_key("data", _section(p, "data")),
                _job_synth,
                (p,),
                where="client",
                outputs=(p.run_dir / "data" / "manifest.csv",),
            )
        ]
    return []  # user data: nothing to make; the digests below carry its content into the keys


def _segment_protocol(p):
    """The protocol the segment and crops jobs get.

    On a worker one batch is one process's work (the worker pool is the parallelism), so
    ``segmentation.workers`` is 1 there. The crops job gets the same protocol: its own call
    of ``run_segmentation`` then finds the label images current and keeps them.
    """
    if p.segmentation.method == "masks":
        return p
    return p.model_copy(update={"segmentation": p.segmentation.model_copy(update={"workers": 1})})


def _plan_segment(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    ctx.key("data")
    table = _image_table(ctx).sort_values("image_id", kind="stable").reset_index(drop=True)
    seg = _section(p, "segmentation")
    seg.pop("workers", None)  # how many processes cannot change a label image
    channels = _section(p, "data", "channels")
    seg_dir = p.run_dir / "segmentation"
    masks_only = p.segmentation.method == "masks"
    worker_protocol = _segment_protocol(p)
    size = len(table) if masks_only else SEGMENT_BATCH
    jobs = []
    for start in range(0, len(table), max(size, 1)):
        batch = table.iloc[start : start + size]
        content = batch[["image_id", "digest", "mask_digest"]].values.tolist()
        name = f"images-{start:05d}-{start + len(batch) - 1:05d}"
        jobs.append(
            Job(
                "segment",
                name,
                hash_key("segment", seg, channels, content),
                _job_segment,
                (worker_protocol, batch.drop(columns=["digest", "mask_digest", "objects_digest"])),
                # copying the user's masks is quick: no worker needed
                where="client" if masks_only else "worker",
                outputs=tuple(seg_dir / f"{i}.tif" for i in batch["image_id"]),
            )
        )
    return jobs


def _plan_crops(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    table = _image_table(ctx)
    content = sorted(table[["image_id", "label", "patient_id", "digest", "objects_digest"]].values.tolist())
    crops_section = _section(p, "crops")
    crops_section.pop("workers", None)
    key = hash_key(
        "crops",
        ctx.key("segment"),
        content,
        _section(p, "data"),
        crops_section,
        _section(p, "training", "split"),
        p.seed,
    )
    return [
        Job(
            "crops",
            "crops",
            key,
            _job_crops,
            (_segment_protocol(p),),
            where="client",
            outputs=(p.run_dir / "cells.parquet", p.run_dir / "crops.zarr"),
        )
    ]


def _spec_name(spec) -> str:
    parts = [getattr(spec, a, None) for a in ("model", "train_variant", "seed", "fold")]
    if any(v is None for v in parts):
        return str(spec)
    model, variant, seed, fold = parts
    return f"{model}/{variant}/s{seed}/f{fold}"


def _train_keys(ctx: RunContext) -> dict:
    """The training job of every spec and its key (the crops' fingerprint computed once)."""
    from cellbg import planning  # planning and keys only: no torch in the client

    if "train_keys" not in ctx.data:
        ctx.key("crops")
        p = ctx.protocol
        crops_hash = planning.crops_fingerprint(p.run_dir)
        ctx.data["train_keys"] = {s: planning.job_key(p, s, crops_hash=crops_hash) for s in planning.plan_jobs(p)}
    return ctx.data["train_keys"]


def _plan_train(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    jobs = []
    for spec, key in _train_keys(ctx).items():
        job_dir = p.run_dir / "jobs" / key
        jobs.append(
            Job(
                "train",
                _spec_name(spec),
                key,
                _job_train,
                (p, spec, str(job_dir)),
                marker=job_dir / "DONE",
                writes_marker=True,
                outputs=tuple(job_dir / f for f in ("checkpoint.pt", "history.csv", "spec.json")),
            )
        )
    return jobs


def _count_train(ctx: RunContext) -> int:
    from cellbg import planning

    return len(planning.plan_jobs(ctx.protocol))


def _trained_model_jobs(ctx: RunContext, stage: str, specs, key_of, func, outputs: tuple[str, ...]) -> list[Job]:
    """One job per trained model x test variant (``specs``), in ``<run>/jobs/<key>/``, keyed by
    ``key_of`` from the training job's key: a new test variant adds jobs and retrains nothing."""
    p = ctx.protocol
    keys = _train_keys(ctx)
    ctx.key("train")
    jobs = []
    for spec in specs:
        key = key_of(p, spec, train_key=keys[spec.train])
        job_dir = p.run_dir / "jobs" / key
        jobs.append(
            Job(
                stage,
                f"{_spec_name(spec.train)}/{spec.test_variant}",
                key,
                func,
                (p, spec, str(job_dir)),
                marker=job_dir / "DONE",
                writes_marker=True,
                outputs=tuple(job_dir / name for name in outputs),
            )
        )
    return jobs


def _plan_predict(ctx: RunContext) -> list[Job]:
    from cellbg import planning

    specs = planning.plan_predictions(ctx.protocol)
    return _trained_model_jobs(
        ctx, "predict", specs, planning.predict_key, _job_predict, ("predictions.parquet", "spec.json")
    )


def _count_predict(ctx: RunContext) -> int:
    from cellbg import planning

    return len(planning.plan_predictions(ctx.protocol))


def _plan_predictions(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    key = hash_key("predictions", ctx.key("predict"))
    return [
        Job(
            "predictions",
            "predictions",
            key,
            _job_collect,
            (str(p.run_dir),),
            where="client",
            outputs=(p.run_dir / "predictions.parquet", p.run_dir / "predictions"),
        )
    ]


def _plan_saliency_maps(ctx: RunContext) -> list[Job]:
    """One job per trained model x saliency test variant (keyed with the saliency settings):
    the maps spread over workers, and a new saliency test variant redoes no map."""
    from cellbg import planning

    specs = planning.plan_saliency(ctx.protocol)
    return _trained_model_jobs(
        ctx, "saliency-maps", specs, planning.saliency_key, _job_saliency, ("saliency.parquet", "maps.zarr")
    )


def _count_saliency_maps(ctx: RunContext) -> int:
    from cellbg import planning

    return len(planning.plan_saliency(ctx.protocol))


def _plan_saliency(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    if not p.saliency.enabled:
        return []
    key = hash_key("saliency", ctx.key("saliency-maps"), _section(p, "saliency"))
    return [
        Job(
            "saliency",
            "saliency",
            key,
            _job_saliency_collect,
            (p,),
            where="client",
            outputs=(p.run_dir / "saliency.parquet", p.run_dir / "saliency.zarr"),
        )
    ]


def _plan_stats(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    key = hash_key("stats", ctx.key("predictions"), ctx.key("saliency"), _section(p, "stats"))
    return [
        Job(
            "stats",
            "stats",
            key,
            _job_stats,
            (str(p.run_dir),),
            where="client",
            outputs=(p.run_dir / "stats" / "tests.csv",),
        )
    ]


def _job_detect(protocol, spec, fields, fields_hash: str, job_dir: str) -> None:
    from cellbg.detect import train as detect_train

    detect_train.run_detect_job(protocol, spec, Path(job_dir), fields=fields, fields_hash=fields_hash)


def _job_detect_stats(run_dir: str) -> None:
    from cellbg.detect.analysis import analyze_detection

    analyze_detection(Path(run_dir))


def _plan_detect(ctx: RunContext) -> list[Job]:
    """The detection study's jobs (condition x seed x fold), keyed on the fields' bytes."""
    p = ctx.protocol
    if not p.detection.enabled:
        return []
    from cellbg.detect.plan import DONE, detect_dir, detect_job_key, detection_fields, fields_digest, plan_detect_jobs

    ctx.key("segment")
    table = _image_table(ctx).drop(columns=["digest", "mask_digest"])
    fields = detection_fields(p, table=table)
    fields_hash = fields_digest(fields, _digests(ctx))
    jobs = []
    for spec in plan_detect_jobs(p):
        key = detect_job_key(p, spec, fields_hash)
        job_dir = detect_dir(p) / "jobs" / key
        jobs.append(
            Job(
                "detect",
                spec.name,
                key,
                _job_detect,
                (p, spec, fields, fields_hash, str(job_dir)),
                marker=job_dir / DONE,
                writes_marker=True,
                outputs=(job_dir / "metrics.csv",),
            )
        )
    return jobs


def _plan_detect_stats(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    if not p.detection.enabled:
        return []
    from cellbg.detect.plan import detect_dir

    key = hash_key("detect_stats", ctx.key("detect"), _section(p, "detection"), _section(p, "stats", "alpha"))
    return [
        Job(
            "detect_stats",
            "detect_stats",
            key,
            _job_detect_stats,
            (str(p.run_dir),),
            where="client",
            outputs=(detect_dir(p) / "tests.csv",),
        )
    ]


def _unless_detection_only(plan):
    """A classification stage's planner that plans nothing when ``detection.only`` is set."""

    def planner(ctx: RunContext):
        det = ctx.protocol.detection if ctx.protocol is not None else None
        if det is not None and det.enabled and det.only:
            return 0 if plan.__name__.startswith("_count") else []
        return plan(ctx)

    return planner


def _plan_report(ctx: RunContext) -> list[Job]:
    p = ctx.protocol
    detection = (ctx.key("detect_stats"),) if p.detection.enabled else ()
    key = hash_key(
        "report",
        ctx.key("stats"),
        ctx.key("predictions"),
        ctx.key("saliency"),
        _section(p, "report"),
        p.name,
        *detection,
    )
    return [
        Job("report", "report", key, _job_report, (str(p.run_dir),), where="client", outputs=(p.run_dir / "report",))
    ]


def pipeline_stages() -> list[Stage]:
    """The cellbg pipeline: data, segment, crops, train, predict, predictions, saliency-maps,
    saliency, stats, the detection study (detect, detect_stats; nothing unless ``detection.enabled``), report."""
    return [
        Stage("data", _plan_data),
        Stage("segment", _plan_segment, _prepare_segment, worker_modules=("cellbg.segment",)),
        Stage("crops", _unless_detection_only(_plan_crops)),
        Stage(
            "train",
            _unless_detection_only(_plan_train),
            worker_modules=("cellbg.train",),
            count=_unless_detection_only(_count_train),
        ),
        Stage(
            "predict",
            _unless_detection_only(_plan_predict),
            worker_modules=("cellbg.train",),
            count=_unless_detection_only(_count_predict),
        ),
        Stage("predictions", _unless_detection_only(_plan_predictions)),
        Stage(
            "saliency-maps",
            _unless_detection_only(_plan_saliency_maps),
            worker_modules=("cellbg.saliency",),
            count=_unless_detection_only(_count_saliency_maps),
        ),
        Stage("saliency", _unless_detection_only(_plan_saliency)),
        Stage("stats", _unless_detection_only(_plan_stats)),
        Stage("detect", _plan_detect, worker_modules=("cellbg.detect.train",)),
        Stage("detect_stats", _plan_detect_stats),
        Stage("report", _plan_report),
    ]


def run_protocol(
    protocol_path,
    *,
    executor: str | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
) -> RunSummary:
    """Run a whole protocol, skipping every job whose inputs have not changed.

    Parameters
    ----------
    protocol_path : path or Protocol
        The protocol file (or an already loaded :class:`~cellbg.protocol.Protocol`).
    executor : {"local", "slurm", "pbs", "sge", "lsf"}, optional
        Overrides ``executor.kind`` of the protocol.
    dry_run : bool
        Only list the jobs and which are cached.
    progress : bool, optional
        Live progress display; default when stderr is a terminal.

    Returns
    -------
    RunSummary
        ``summary.ok`` is False when a job failed; ``summary.failures`` name their logs.

    Examples
    --------
    >>> summary = run_protocol("protocols/quickstart.yaml", dry_run=True)  # doctest: +SKIP
    """
    from cellbg.protocol import Protocol, load_protocol, write_resolved

    protocol = protocol_path if isinstance(protocol_path, Protocol) else load_protocol(protocol_path)
    cfg = protocol.executor
    if executor is not None:
        from cellbg._checks import look_up_option

        kind = look_up_option(str(executor), ["local", "slurm", "pbs", "sge", "lsf"], what="executor")
        cfg = cfg.model_copy(update={"kind": kind})
    run_dir = Path(protocol.run_dir).resolve()
    ctx = RunContext(run_dir=run_dir, protocol=protocol)
    summary = run_stages(
        pipeline_stages(),
        run_dir,
        executor=cfg,
        dry_run=dry_run,
        progress=progress,
        context=ctx,
        on_start=lambda: write_resolved(protocol),  # stats and report read it
    )
    if not dry_run and summary.ok:
        from cellbg.runner.display import RunLog

        RunLog(run_dir).write("\n".join(final_lines(run_dir)))
    return summary


def final_lines(run_dir: str | Path) -> list[str]:
    """The last words of a finished run: where its report is and its confirmatory result.

    Examples
    --------
    >>> final_lines("runs/quickstart")  # doctest: +SKIP
    ['report: runs/quickstart/report/report.pdf (also report.html, report.md)',
     'Confirmatory result: resnet, BG-GAP, trained on original: ... significant at alpha = 0.05.']
    """
    from cellbg.report.headline import run_headline

    folder = Path(run_dir) / "report"
    made = [n for n in ("report.pdf", "report.html", "report.md") if (folder / n).exists()]
    lines = []
    if made:
        others = f" (also {', '.join(made[1:])})" if len(made) > 1 else ""
        lines.append(f"report: {folder / made[0]}{others}")
    sentence = run_headline(run_dir)
    lines.append(sentence or "no confirmatory result: the run has no confirmatory test (stats/tests.csv)")
    return lines
