"""Figures: accuracy heatmap, forest plot, factor sweeps, bars, training curves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

#: Okabe & Ito (2008) colour-blind-safe palette (black last).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


#: Print widths of journal figures, in inches: one column and two columns (double).
SINGLE_COLUMN = 3.5
DOUBLE_COLUMN = 7.2
#: Smallest font size at print size, in points (journals ask for 6-8 pt).
MIN_FONT_PT = 7.0
#: Figure style at print size: nothing below 7 pt; TrueType fonts embedded in the PDF.
PAPER_RC = {
    "font.family": "DejaVu Sans",
    "font.size": 7.5,
    "axes.titlesize": 8.0,
    "axes.labelsize": 7.5,
    "xtick.labelsize": 7.0,
    "ytick.labelsize": 7.0,
    "legend.fontsize": 7.0,
    "legend.title_fontsize": 7.0,
    "figure.titlesize": 8.5,
    "axes.linewidth": 0.6,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "lines.linewidth": 1.0,
    "lines.markersize": 3.5,
    "pdf.fonttype": 42,
    "legend.frameon": False,
}


class _Figures:
    """Makes matplotlib figures without pyplot (no global backend state) and keeps them.

    Figures are made at their print width (:data:`SINGLE_COLUMN` or :data:`DOUBLE_COLUMN`)
    inside :meth:`style`, and saved as a vector PDF and a 300-dpi PNG of that size.
    """

    def __init__(self, out_dir: Path, enabled: bool):
        self.out_dir = out_dir
        self.enabled = enabled

    def style(self):
        """A context in which figures get the paper style (:data:`PAPER_RC`)."""
        import contextlib

        if not self.enabled:
            return contextlib.nullcontext()
        import matplotlib

        return matplotlib.rc_context(PAPER_RC)

    def new(self, width: float, height: float):
        from matplotlib.figure import Figure

        return Figure(figsize=(width, height), layout="constrained")

    def save(self, fig, name: str) -> bytes:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # No dates or software names: the same run gives the same bytes.
        fig.savefig(self.out_dir / f"{name}.pdf", format="pdf", metadata={"CreationDate": None, "Producer": None})
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=300, metadata={"Software": None})
        png = buf.getvalue()
        (self.out_dir / f"{name}.png").write_bytes(png)
        return png


def condition_words(condition: str) -> str:
    """``"original:mixed_rand"`` -> ``"trained on original, tested on mixed_rand"``.

    Examples
    --------
    >>> condition_words("only_fg:original")
    'trained on only_fg, tested on original'
    """
    train, _, test = str(condition).partition(":")
    return f"trained on {train}, tested on {test}" if test else str(condition)


def comparison_words(a: str, b: str, name: str = "") -> str:
    """The difference b − a in words, naming what the two conditions share once.

    Examples
    --------
    >>> comparison_words("original:original", "original:only_fg")
    'trained on original: tested on only_fg − original'
    >>> comparison_words("original:mixed_rand", "original:mixed_same", "BG-GAP (original)")
    'BG-GAP, trained on original: tested on mixed_same − mixed_rand'
    """
    ta, _, va = str(a).partition(":")
    tb, _, vb = str(b).partition(":")
    if ta == tb:
        text = f"trained on {ta}: tested on {vb} − {va}"
    elif va == vb:
        text = f"tested on {va}: trained on {tb} − {ta}"
    else:
        text = f"({condition_words(b)}) − ({condition_words(a)})"
    return ("BG-GAP, " + text) if str(name).startswith("BG-GAP") else text


def _series_colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _heatmap(figs: _Figures, acc: pd.DataFrame, models: list[str], trains: list[str], tests: list[str]):
    n = len(models)
    width = DOUBLE_COLUMN if len(tests) > 4 else SINGLE_COLUMN
    fig = figs.new(width, 0.4 + (0.28 * len(trains) + 1.15) * n)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    im = None
    for ax, model in zip(axes, models, strict=True):
        sub = acc[acc["model"] == model].set_index(["train_variant", "test_variant"])
        rows = [t for t in trains if t in sub.index.get_level_values(0)]
        cols = [t for t in tests if t in sub.index.get_level_values(1)]
        mat = np.full((len(rows), len(cols)), np.nan)
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                if (r, c) in sub.index:
                    mat[i, j] = 100 * sub.loc[(r, c), "mean"]
        im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                if np.isfinite(mat[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{mat[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if mat[i, j] > 60 else "white",
                    )
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), [f"trained on {r}" for r in rows])
        ax.set_title(f"{model}: accuracy (%)", loc="left")
    axes[-1].set_xlabel("tested on")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="accuracy (%)")
    return fig


def _forest(figs: _Figures, tests: pd.DataFrame):
    models = list(dict.fromkeys(tests["model"].astype(str)))
    heights = [max(len(tests[tests["model"].astype(str) == m]), 1) for m in models]
    fig = figs.new(DOUBLE_COLUMN, 0.7 + 0.17 * sum(heights) + 0.35 * len(models))
    axes = fig.subplots(len(models), 1, squeeze=False, sharex=True, gridspec_kw={"height_ratios": heights})[:, 0]
    families = list(dict.fromkeys(tests["family"].astype(str)))
    markers = "osD^v"
    for ax, model in zip(axes, models, strict=True):
        sub = tests[tests["model"].astype(str) == model].reset_index(drop=True)
        y = np.arange(len(sub))[::-1]
        for k, fam in enumerate(families):
            sel = (sub["family"].astype(str) == fam).to_numpy()
            if not sel.any():
                continue
            est = sub["estimate"].to_numpy(float)[sel]
            lo = sub["ci_low"].to_numpy(float)[sel]
            hi = sub["ci_high"].to_numpy(float)[sel]
            err = np.vstack([est - lo, hi - est])
            err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(
                est,
                y[sel],
                xerr=err,
                fmt=markers[k % len(markers)],
                color=_series_colour(k),
                ecolor=_series_colour(k),
                capsize=2,
                label=fam,
                markersize=4,
            )
        ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
        names = sub["label"].astype(str) if "label" in sub.columns else sub["comparison"].astype(str)
        if names.duplicated(keep=False).any():  # the same pair under two tests: name the test
            names = names + "  [" + sub["method"].astype("string").fillna("").astype(str) + "]"
        ax.set_yticks(y, names)
        ax.set_ylim(-0.6, len(sub) - 0.4)
        ax.set_title(model, loc="left")
        ax.grid(axis="x", color="0.9")
    axes[-1].set_xlabel("difference in accuracy (percentage points) with 95% CI")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, title="test family", loc="outside lower center", ncols=max(len(labels), 1))
    return fig


def _sweep_plot(figs: _Figures, series: list[dict], *, xlabel: str, title: str, refs: list[dict]):
    """Lines of accuracy against a numeric setting, one panel per model, with reference levels.

    Each series has ``panel`` (the model), ``key``, ``x``, ``y``, ``sd`` and ``label``; each
    reference has the ``key`` of its series, a ``name``, a line style ``ls`` and a level ``y``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys(s["panel"] for s in series))
    fig = figs.new(SINGLE_COLUMN if len(panels) == 1 else DOUBLE_COLUMN, 2.6)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    ref_styles = {}
    for ax, panel in zip(axes, panels, strict=True):
        for i, s in enumerate(x for x in series if x["panel"] == panel):
            colour = _series_colour(i)
            ax.errorbar(
                s["x"],
                100 * np.asarray(s["y"], float),
                yerr=100 * np.nan_to_num(np.asarray(s["sd"], float)),
                fmt="-o",
                color=colour,
                capsize=2,
                label=s["label"],
            )
            for ref in refs:
                if ref["key"] == s["key"] and np.isfinite(ref["y"]):
                    ax.axhline(100 * ref["y"], color=colour, ls=ref["ls"], lw=1.0)
                    ref_styles[ref["name"]] = ref["ls"]
        ax.set_title(f"{panel}", loc="left")
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="0.92")
    # one legend below the panels: inside an axes it covers the curves wherever it goes
    handles, labels = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", ls=ls, lw=1.0) for ls in ref_styles.values()]
    labels += [f"{name} level" for name in ref_styles]
    fig.legend(handles, labels, loc="outside lower center", ncols=2)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(title)
    return fig


def _bars(figs: _Figures, panels: list[tuple[str, list[str]]], acc: pd.DataFrame, groups: list[tuple[str, str]]):
    fig = figs.new(DOUBLE_COLUMN, 2.9)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    idx = acc.set_index(["model", "train_variant", "test_variant"])
    width = 0.8 / max(len(groups), 1)
    for ax, (title, variants) in zip(axes, panels, strict=True):
        x = np.arange(len(variants))
        for g, (model, train) in enumerate(groups):
            mean = [idx["mean"].get((model, train, v), np.nan) for v in variants]
            sd = [idx["sd"].get((model, train, v), np.nan) for v in variants]
            ax.bar(
                x + (g - (len(groups) - 1) / 2) * width,
                100 * np.asarray(mean, float),
                width,
                yerr=100 * np.nan_to_num(np.asarray(sd, float)),
                capsize=2,
                color=_series_colour(g),
                label=f"{model}, trained on {train}",
            )
        ax.set_xticks(x, variants, rotation=30, ha="right")
        ax.set_title(title, loc="left")
        ax.set_ylim(0, 105)
        ax.grid(axis="y", color="0.92")
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3))
    return fig


def _curves(figs: _Figures, histories: list[tuple[dict, pd.DataFrame]], order: list[tuple[str, str]]):
    metrics = []
    for _, h in histories:
        for c in h.columns:
            if c != "epoch" and pd.api.types.is_numeric_dtype(h[c]) and ("loss" in c or "acc" in c):
                if c not in metrics:
                    metrics.append(c)
    kinds = [k for k in ("loss", "acc") if any(k in m for m in metrics)]
    fig = figs.new(DOUBLE_COLUMN if len(kinds) > 1 else SINGLE_COLUMN, 2.6)
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    from matplotlib.ticker import MaxNLocator

    seen = list(dict.fromkeys((str(s.get("model", "?")), str(s.get("train_variant", "?"))) for s, _ in histories))
    groups = [g for g in order if g in seen] + [g for g in seen if g not in order]
    styles = {"train": "-", "val": "--"}
    for ax, kind in zip(axes, kinds, strict=True):
        for spec, h in histories:
            g = groups.index((str(spec.get("model", "?")), str(spec.get("train_variant", "?"))))
            x = h["epoch"].to_numpy() if "epoch" in h.columns else np.arange(1, len(h) + 1)
            for m in metrics:
                if kind not in m:
                    continue
                ls = next((v for k, v in styles.items() if m.startswith(k)), ":")
                ax.plot(x, h[m].to_numpy(float), ls=ls, color=_series_colour(g), lw=1.0, alpha=0.8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss" if kind == "loss" else "accuracy")
        ax.grid(color="0.92")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_series_colour(i), label=f"{m}, trained on {t}") for i, (m, t) in enumerate(groups)]
    handles += [
        Line2D([], [], color="0.3", ls=ls, label={"train": "training", "val": "validation"}[k])
        for k, ls in styles.items()
    ]
    fig.legend(handles=handles, loc="outside right upper")
    return fig


def _validation_curves(figs: _Figures, histories: list[tuple[dict, pd.DataFrame]], order: list[tuple[str, str]]):
    """Validation loss and accuracy per epoch, one line per training variant, overlaid (Hashmi & Li's figure).

    One row per model; a line is the mean over that training variant's jobs (seeds, folds) at
    each epoch, the band its SD. Returns None when no history has validation columns.
    """
    metrics = [m for m in ("val_loss", "val_accuracy") if any(m in h.columns for _, h in histories)]
    if not metrics:
        return None
    frames = []
    for spec, h in histories:
        if "epoch" not in h.columns:
            continue
        cols = [m for m in metrics if m in h.columns]
        f = h[["epoch", *cols]].copy()
        f["model"], f["train_variant"] = str(spec.get("model", "?")), str(spec.get("train_variant", "?"))
        frames.append(f)
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True)
    models = list(dict.fromkeys([m for m, _ in order] + data["model"].tolist()))
    models = [m for m in models if m in set(data["model"])]
    trains = list(dict.fromkeys([t for _, t in order] + data["train_variant"].tolist()))
    fig = figs.new(DOUBLE_COLUMN, 0.6 + 1.9 * len(models))
    axes = fig.subplots(len(models), len(metrics), squeeze=False)
    from matplotlib.ticker import MaxNLocator

    for r, model in enumerate(models):
        sub = data[data["model"] == model]
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            for i, train in enumerate(trains):
                curve = (
                    sub[sub["train_variant"] == train]
                    .groupby("epoch")[metric]
                    .agg(["mean", "std"])
                    .dropna(subset=["mean"])
                )
                if curve.empty:
                    continue
                x = curve.index.to_numpy(float)
                y = curve["mean"].to_numpy(float) * (100 if metric == "val_accuracy" else 1)
                sd = np.nan_to_num(curve["std"].to_numpy(float)) * (100 if metric == "val_accuracy" else 1)
                ax.plot(x, y, color=_series_colour(i), label=f"trained on {train}")
                ax.fill_between(x, y - sd, y + sd, color=_series_colour(i), alpha=0.15, lw=0)
            ax.set_title(f"{model}: validation {'loss' if metric == 'val_loss' else 'accuracy (%)'}", loc="left")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(color="0.92")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(max(len(labels), 1), 4))
    return fig
