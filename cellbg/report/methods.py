"""The methods paragraph (from the resolved protocol) and the provenance block."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cellbg import __version__
from cellbg.report.reading import _Run
from cellbg.report.tables import _isnan

#: Libraries whose versions go into the provenance block (read with importlib.metadata,
#: which does not import them).
_LIBRARIES = (
    "numpy",
    "pandas",
    "scipy",
    "statsmodels",
    "scikit-image",
    "matplotlib",
    "pyarrow",
    "zarr",
    "pydantic",
    "torch",
    "torchvision",
    "monai",
    "cellpose",
    "dask",
    "distributed",
)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            continue
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    if shutil.which("git") is None:
        return None
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def _arch_text(m) -> str:
    if m.arch == "resnet":
        return f"{m.key} (MONAI ResNet-{m.depth}, width × {m.width:g}{', small stem' if m.small_stem else ''})"
    if m.arch == "shufflenet_v2":
        return f"{m.key} (torchvision ShuffleNetV2 × {m.width:g})"
    return f"{m.key} (CellYolo, width {m.width:g}, depth {m.depth:g})"


def _join(items: Sequence[object]) -> str:
    """``a``, ``a and b``, ``a, b and c``; ``""`` for no items."""
    words = [str(i) for i in items]
    if len(words) <= 1:
        return words[0] if words else ""
    return ", ".join(words[:-1]) + " and " + words[-1]


def _methods(run: _Run) -> str:
    p = run.protocol
    seg = p.segmentation
    if seg.method == "masks":
        seg_text = "Cells were taken from the instance masks supplied with the images"
    elif seg.method == "cellpose":
        seg_text = (
            f"Cells were segmented with Cellpose (model `{seg.model}`, diameter "
            f"{'estimated' if seg.diameter is None else f'{seg.diameter:g} px'}, flow threshold "
            f"{seg.flow_threshold:g}, cell-probability threshold {seg.cellprob_threshold:g})"
        )
    else:
        th = seg.threshold
        sigma = "diameter / 16" if th.sigma is None else f"{th.sigma:g}"
        seg_text = (
            f"Cells were segmented by {th.threshold} thresholding after Gaussian smoothing "
            f"(sigma {sigma}) with a seeded watershed"
        )
    if p.data.source == "synthetic":
        s = p.data.synthetic
        data_text = (
            f"The data were synthetic Sezary-like cells made by cellbg ({s.patients} patients, planted "
            f"background signal {s.signal:g}, seed {s.seed}). "
        )
    else:
        data_text = ""
    counts = ""
    src = run.cells if run.cells is not None else run.predictions
    if src is not None and {"cell_id", "patient_id"} <= set(src.columns):
        n_cls = src["label"].nunique() if "label" in src.columns else None
        counts = (
            f" This gave {src['cell_id'].nunique()} cells from {src['patient_id'].nunique()} patients"
            + (f" in {n_cls} classes" if n_cls else "")
            + "."
        )
    scale = (
        "at the image's pixel size"
        if p.crops.scale == "keep"
        else f"scaled so the cell spans {p.crops.fit_fraction:g} of the crop"
    )
    c = p.crops
    crops_text = (
        f" Each cell was cut out as a {c.size} × {c.size} pixel crop centred on it, {scale}"
        f"{', excluding cells touching the image border' if c.exclude_border else ''}"
        f" (minimum area {c.min_area} px)."
    )
    v = p.variants
    var_text = (
        f" Models were trained on the background variants {_join([f'`{x}`' for x in v.train])} and tested on "
        f"{_join([f'`{x}`' for x in v.test])} (after Xiao et al., 2021; fill `{v.fill}`, pairing seed {v.seed}"
        + (
            "; only_bg_b, only_bg_t and mixed_* exactly as the authors' generation code makes them"
            if getattr(v, "reference", "cellbg") == "xiao"
            else ""
        )
        + ")."
    )
    t = p.training
    sp = t.split
    if sp.kind == "kfold":
        used = f", of which the first {t.max_folds} were run" if t.max_folds and t.max_folds < sp.folds else ""
        split_text = (
            f"{sp.folds}-fold cross-validation with folds grouped by patient (no patient in both "
            f"training and test) and stratified by class{used}"
        )
    else:
        split_text = f"a fixed split holding out patients {_join(sp.test_patients)}"
    train_text = (
        f" The models were {_join([_arch_text(m) for m in p.models])}, trained from scratch for up to "
        f"{t.epochs} epochs (batch {t.batch_size}, learning rate {t.lr:g}, weight decay {t.weight_decay:g}, "
        f"early stopping after {t.patience} epochs without a better validation loss"
        f"{', with augmentation' if t.augment else ''}), with {len(t.seeds)} seed"
        f"{'s' if len(t.seeds) != 1 else ''} ({_join(t.seeds)}) and {split_text}; "
        f"{sp.val_fraction:.0%} of the training patients were held out for validation."
    )
    st = p.stats
    primary = (
        "a paired t-test on per-patient accuracies"
        if st.primary == "patient_t"
        else "a GEE logistic model of cell correctness clustered by patient"
    )
    conf = _join([f"`{cmp.a}` vs `{cmp.b}`" + _bg_gap_label(cmp.a, cmp.b) for cmp in st.confirmatory or []])
    conf = f"Confirmatory comparisons were {conf}" if conf else "No confirmatory comparison was planned"
    stats_text = (
        f" The unit of analysis was the patient: the primary test was {primary}, with cell-level "
        f"McNemar tests as a secondary, conditional result. {conf}"
        f"{'; every other condition was compared with original:original as exploratory' if st.exploratory else ''}. "
        f"{_ci_text(run)} p-values were adjusted within each family (Holm; Benjamini–Hochberg) "
        f"at alpha = {st.alpha:g}."
    )
    if p.saliency.enabled:
        sal_text = (
            f" Attribution maps ({_join(p.saliency.methods)}) were computed for {p.saliency.cells_per_job} "
            f"cells per job on the {_join([f'`{v}`' for v in p.saliency.test_variants])} images (each the image "
            "the model was tested on), and the share of attribution falling outside the cell mask was reported."
        )
    else:
        sal_text = ""
    vers = _versions()
    soft = ", ".join(
        f"{k} {vers[k]}"
        for k in (
            "python",
            "numpy",
            "torch",
            "monai",
            "torchvision",
            "cellpose",
            "scikit-image",
            "statsmodels",
            "scipy",
        )
        if k in vers
    )
    return (
        f"{data_text}{seg_text}.{counts}{crops_text}{var_text}{train_text}{stats_text}{sal_text}"
        f" Analyses used cellbg {__version__} ({soft})."
    )


def _bg_gap_label(a: str, b: str) -> str:
    """`` (BG-GAP, ...)`` when ``a`` vs ``b`` is one training variant's mixed_rand vs mixed_same."""
    from cellbg.stats import _split_condition

    (train_a, test_a), (train_b, test_b) = _split_condition(a), _split_condition(b)
    if train_a == train_b and {test_a, test_b} == {"mixed_rand", "mixed_same"}:
        return " (BG-GAP: accuracy with a background from a cell of the same class vs a random class)"
    return ""


def _ci_text(run: _Run) -> str:
    """How the CIs were made: the methods the stats stage reports, else the protocol's plan."""
    if run.tests is None:
        return (
            f"Confidence intervals were to be 95% ({run.protocol.stats.bootstrap} bootstrap resamples, "
            f"seed {run.protocol.stats.seed}); no tests were run."
        )
    used = sorted({str(m) for m in run.tests["ci_method"] if not _isnan(m) and str(m)})
    tests = sorted({str(m) for m in run.tests["method"] if not _isnan(m) and str(m)})
    # The names hold commas themselves, so the lists are separated by semicolons.
    text = f"Tests run: {'; '.join(tests)}. " if tests else ""
    if not used:
        return text + "No confidence intervals were reported."
    return text + f"Confidence intervals are 95% ({'; '.join(used)}; bootstrap seed {run.protocol.stats.seed})."


def _run_time(run_dir: Path) -> str:
    paths = [run_dir / n for n in ("cells.parquet", "predictions.parquet", "saliency.parquet", "stats/tests.csv")]
    if (run_dir / "jobs").is_dir():
        paths += list((run_dir / "jobs").glob("*/spec.json")) + list((run_dir / "jobs").glob("*/DONE"))
    times = [q.stat().st_mtime for q in paths if q.exists()]
    if len(times) < 2:
        return "not known (too few stage outputs)"
    span = max(times) - min(times)
    start = _dt.datetime.fromtimestamp(min(times), _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{span / 60:.1f} min from the first to the last stage output (first at {start})"


def _training_time(run: _Run) -> str:
    secs = [float(h["seconds"].sum()) for _, h in run.histories if "seconds" in h.columns]
    if not secs:
        return "not recorded (no `seconds` column in jobs/*/history.csv)"
    return f"{sum(secs) / 60:.1f} min summed over {len(secs)} jobs (epoch times in history.csv)"


def _devices(run: _Run) -> str | None:
    """The devices the training jobs used, as each recorded in its spec.json: ``cpu (6 jobs)``,
    ``cuda:0 with bfloat16 AMP (4 jobs)``; None when no job recorded one."""
    from collections import Counter

    used = Counter(
        str(s["device"]) + (f" with {s['amp_dtype']} AMP" if s.get("amp_dtype") not in (None, "", "off") else "")
        for s in run.job_specs
        if s.get("device")
    )
    if not used:
        return None
    return ", ".join(f"{d} ({n} job{'s' if n != 1 else ''})" for d, n in sorted(used.items()))


def _hardware(run: _Run) -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    text = f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs{mem_text}"
    devices = _devices(run)
    if devices:
        text += f"; training device(s) recorded by the jobs: {devices}"
    else:
        text += f"; training device setting: {run.protocol.training.device}"
    return text


def _provenance(run: _Run, started: float) -> str:
    from cellbg.protocol import protocol_hash

    head = (run.run_dir / "protocol.resolved.yaml").read_text(encoding="utf-8").splitlines()[:3]
    stored = next((ln.split(":", 1)[1].strip() for ln in head if ln.startswith("# protocol_hash:")), None)
    lines = [
        f"protocol hash: {stored or protocol_hash(run.protocol)}",
        f"cellbg version: {__version__}",
        f"cellbg git commit: {_git_commit() or 'not a git checkout'}",
        f"run time: {_run_time(run.run_dir)}",
        f"training time: {_training_time(run)}",
        f"report machine: {_hardware(run)}",
        f"report written in: {time.perf_counter() - started:.1f} s",
        "libraries: " + ", ".join(f"{k} {v}" for k, v in _versions().items()),
    ]
    return "\n".join(lines)
