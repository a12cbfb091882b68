"""The detection study's section: loss-part curves, the AP table and comparison, the paired tests.

Reads only the tables :mod:`cellbg.detect.analysis` wrote to ``<run>/detect/`` (never torch).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellbg.report.document import _Doc
from cellbg.report.figures import DOUBLE_COLUMN, SINGLE_COLUMN, _Figures, _series_colour
from cellbg.report.reading import _read_table, _Run
from cellbg.report.tables import _ci, _int, _isnan, _num, _p, latex_table

#: torchvision's Faster R-CNN loss parts (the order of the study's Figs. 3.13-3.14), then their sum.
LOSS_PARTS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss")
_LABELS = {"with": "with the correlated class", "without": "target classes only"}


def _read(run: _Run) -> dict[str, pd.DataFrame | None]:
    folder = run.run_dir / "detect"
    return {
        name: _read_table(folder / f"{name}.csv", f"detection {name} table")
        for name in ("losses", "ap", "recall", "tests")
    }


def _loss_curves(figs: _Figures, losses: pd.DataFrame):
    """One panel per loss part; colour: condition; solid: training, dashed: validation; mean over jobs."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    parts = [p for p in LOSS_PARTS if f"train_{p}" in losses.columns]
    fig = figs.new(SINGLE_COLUMN if len(parts) == 1 else DOUBLE_COLUMN, 2.6)  # journal widths
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    conds = list(dict.fromkeys(losses["condition"].astype(str)))
    for ax, part in zip(axes, parts, strict=True):
        for i, cond in enumerate(conds):
            sub = losses[losses["condition"].astype(str) == cond]
            for split, ls in (("train", "-"), ("val", "--")):
                col = f"{split}_{part}"
                if col not in sub.columns or sub[col].isna().all():
                    continue
                g = sub.groupby("epoch")[col]
                mean, lo, hi = g.mean(), g.min(), g.max()
                ax.plot(mean.index, mean.to_numpy(float), ls=ls, color=_series_colour(i), lw=1.2)
                if split == "train" and (hi > lo).any():
                    ax.fill_between(
                        mean.index, lo.to_numpy(float), hi.to_numpy(float), color=_series_colour(i), alpha=0.15, lw=0
                    )
        ax.set_title(part, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="0.92")
    handles = [Line2D([], [], color=_series_colour(i), label=_LABELS.get(c, c)) for i, c in enumerate(conds)]
    handles += [
        Line2D([], [], color="0.3", ls="-", label="training"),
        Line2D([], [], color="0.3", ls="--", label="validation"),
    ]
    fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncols=len(handles))
    return fig


def _ap_summary(ap: pd.DataFrame, recall: pd.DataFrame | None) -> pd.DataFrame:
    keys = ["class", "test_variant", "condition"]
    g = ap.groupby(keys, sort=False)
    out = g.agg(
        ap50=("ap50", "mean"), ap50_sd=("ap50", "std"), ap=("ap", "mean"), ap_sd=("ap", "std"), jobs=("ap50", "size")
    ).reset_index()
    if recall is not None and len(recall):
        # recall pooled over the patients of a job, then mean over jobs
        per_job = recall.groupby([*keys, "seed", "fold"]).agg(n=("n_boxes", "sum"), k=("n_found", "sum"))
        per_job["recall"] = per_job["k"] / per_job["n"]
        r = per_job.groupby(keys)["recall"].agg(["mean", "std"]).rename(columns={"mean": "recall", "std": "recall_sd"})
        out = out.merge(r.reset_index(), on=keys, how="left")
    return out


def _pm(mean, sd) -> str:
    if _isnan(mean):
        return "–"
    return f"{mean:.3f}" if _isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _ap_bars(figs: _Figures, summary: pd.DataFrame):
    classes = list(dict.fromkeys(summary["class"]))
    groups = list(dict.fromkeys(zip(summary["condition"], summary["test_variant"], strict=True)))
    fig = figs.new(DOUBLE_COLUMN, 2.8)  # journal width
    axes = fig.subplots(1, 2, squeeze=False)[0]
    width = 0.8 / max(len(groups), 1)
    idx = summary.set_index(["class", "condition", "test_variant"])
    for ax, (col, title) in zip(axes, (("ap50", "AP@0.5"), ("recall", "recall of target boxes")), strict=True):
        if col not in idx.columns:
            ax.set_visible(False)
            continue
        x = np.arange(len(classes))
        for g, (cond, variant) in enumerate(groups):
            mean = [idx[col].get((c, cond, variant), np.nan) for c in classes]
            sd = [idx[f"{col}_sd"].get((c, cond, variant), np.nan) for c in classes]
            hatch = "//" if variant != "original" else None
            ax.bar(
                x + (g - (len(groups) - 1) / 2) * width,
                np.asarray(mean, float),
                width,
                yerr=np.nan_to_num(np.asarray(sd, float)),
                capsize=2,
                color=_series_colour(["without", "with"].index(cond) if cond in ("without", "with") else g),
                hatch=hatch,
                edgecolor="white",
                label=f"{_LABELS.get(cond, cond)}, {variant}",
            )
        ax.set_xticks(x, classes, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", color="0.92")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


def _section_detection(doc: _Doc, run: _Run, figs: _Figures, tex: dict[str, str]) -> None:
    """The detection study: what ran, loss-part curves, AP and recall, and the paired tests."""
    p = run.protocol
    det = getattr(p, "detection", None)
    if det is None or not det.enabled:
        return
    doc.heading("Detection with a correlated class")
    t = _read(run)
    if t["ap"] is None or t["tests"] is None:
        doc.absent(
            "the detection study has no results yet (`detect/ap.csv`, `detect/tests.csv`); "
            "run `cellbg detect` or `cellbg run` for this protocol."
        )
        return
    ap, tests, losses, recall = t["ap"], t["tests"], t["losses"], t["recall"]
    d = det.detector
    arch = d.arch + (
        f" (ResNet-{d.depth}, FPN width {d.fpn_channels}, box head {d.representation_size})"
        if d.arch == "fasterrcnn_resnet_fpn"
        else ""
    )
    conds = list(dict.fromkeys(ap["condition"].astype(str)))
    structure = det.correlated.name
    doc.para(
        f"A torchvision Faster R-CNN, {arch}, {'from ' + d.weights.name if d.weights else 'randomly initialised'}, "
        f"trained {det.epochs} epochs ({det.optimizer}, lr {det.lr:g}, batch {det.batch_size}) per seed and "
        f"patient-grouped fold: {ap['seed'].nunique()} seed(s) × {ap['fold'].nunique()} fold(s) × "
        f"{len(conds)} condition(s): the target cells annotated "
        + (
            f"alone (`without`) and with the correlated structure **{structure}** annotated as one more class (`with`)"
            if len(conds) > 1
            else "alone"
        )
        + ". AP is the COCO definition (pycocotools through torchmetrics) on the held-out patients' fields; "
        f"recall counts a target box found by a detection of its class with score ≥ {det.score_threshold:g} "
        f"at IoU ≥ {det.iou_threshold:g}. Test variant `no_correlated`: the structure removed (dilated by "
        f"{det.correlated.dilate} px, replaced by the {det.fill} fill; target cells untouched)."
    )
    if losses is not None and len(losses) and figs.enabled:
        png = figs.save(_loss_curves(figs, losses), "detection_loss_parts")
        doc.figure(
            "detection_loss_parts",
            "Faster R-CNN loss parts per epoch (mean over seeds and folds; band: "
            "range of the training curves); colour: condition; solid: training, dashed: validation "
            "(held-out training patients). Hashmi & Li compare these between the two conditions.",
            png,
        )
    summary = _ap_summary(ap, recall)
    table = pd.DataFrame(
        {
            "class": summary["class"],
            "test images": summary["test_variant"],
            "condition": summary["condition"],
            "AP@0.5": [_pm(m, s) for m, s in zip(summary["ap50"], summary["ap50_sd"], strict=True)],
            "AP@0.5:0.95": [_pm(m, s) for m, s in zip(summary["ap"], summary["ap_sd"], strict=True)],
            "recall": [
                _pm(m, s) for m, s in zip(summary.get("recall", np.nan), summary.get("recall_sd", np.nan), strict=True)
            ]
            if "recall" in summary
            else "–",
            "jobs": summary["jobs"].astype(int).astype(str),
        }
    )
    caption = "Detection: AP and recall per class, test images and training condition; mean ± SD over seeds and folds."
    doc.table(table, caption, "detection_ap")
    tex["detection_ap"] = latex_table(table, caption=caption, label="tab:detection-ap")
    if figs.enabled:
        png = figs.save(_ap_bars(figs, summary), "detection_ap")
        doc.figure(
            "detection_ap",
            "AP@0.5 and recall per class; colour: training condition; hatched: the "
            "correlated structure removed from the test images.",
            png,
        )
    rows = pd.DataFrame(
        {
            "family": tests["family"],
            "condition": tests["condition"],
            "class": tests["class"],
            "measure": tests["measure"],
            "a → b": tests["a"].astype(str) + " → " + tests["b"].astype(str),
            "mean a": [_num(x) for x in tests["mean_a"]],
            "mean b": [_num(x) for x in tests["mean_b"]],
            "b − a": [_num(x) for x in tests["estimate"]],
            "95% CI": [_ci(lo, hi) for lo, hi in zip(tests["ci_low"], tests["ci_high"], strict=True)],
            "p": [_p(x) for x in tests["pvalue"]],
            "Holm p": [_p(x) for x in tests["p_holm"]],
            "unit": tests["unit"],
            "n": [_int(x) for x in tests["n_units"]],
        }
    )
    caption = (
        "Detection tests: paired t-tests (cellbg.stats) of b − a; recall paired by patient (each "
        "patient's recall averaged over seeds), AP paired by seed and fold; Holm within each family."
    )
    doc.table(rows, caption, "detection_tests")
    tex["detection_tests"] = latex_table(
        rows, caption=caption, label="tab:detection-tests", size="footnotesize", wide=True
    )
    doc.para(
        "**How to read.** `annotation`: does annotating the structure change how well the target cells are "
        "found (their AP and recall), with the same weights at the start and the same fields in the same order. "
        "`reliance`: the same detector on the same fields with the structure removed; a significant drop in a "
        "class's recall says the detector finds that class partly through the structure next to it. Without a "
        "co-occurrence in the data the reliance test should find nothing (the false-positive rate is in "
        "docs/detection.md)."
    )
