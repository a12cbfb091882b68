"""Figures: accuracy heatmap, forest plot, factor sweeps, bars, training curves.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

#: Okabe & Ito (2008) colour-blind-safe palette (black last).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


class _Figures:
    """Makes matplotlib figures without pyplot (no global backend state) and keeps them."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.out_dir = out_dir
        self.enabled = enabled

    def new(self, width: float, height: float):
        from matplotlib.figure import Figure

        return Figure(figsize=(width, height), layout="constrained")

    def save(self, fig, name: str) -> bytes:
        import matplotlib

        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Fixed hash salt and no dates keep the files identical from run to run.
        with matplotlib.rc_context({"svg.hashsalt": "cellbg", "svg.fonttype": "none"}):
            fig.savefig(self.out_dir / f"{name}.svg", format="svg", metadata={"Date": None})
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        png = buf.getvalue()
        (self.out_dir / f"{name}.png").write_bytes(png)
        return png


def _series_colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _heatmap(figs: _Figures, acc: pd.DataFrame, models: list[str], trains: list[str], tests: list[str]):
    n = len(models)
    fig = figs.new(min(2.0 + 0.95 * len(tests), 11.0) , 0.6 + (0.55 * len(trains) + 1.3) * n)
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
                    ax.text(j, i, f"{mat[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="black" if mat[i, j] > 60 else "white")
        ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_ylabel("train variant")
        ax.set_title(f"{model}: accuracy (%)", fontsize=10)
    axes[-1].set_xlabel("test variant")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="accuracy (%)")
    return fig


def _forest(figs: _Figures, tests: pd.DataFrame):
    models = list(dict.fromkeys(tests["model"].astype(str)))
    heights = [max(len(tests[tests["model"].astype(str) == m]), 1) for m in models]
    fig = figs.new(8.0, 1.0 + 0.28 * sum(heights) + 0.5 * len(models))
    axes = fig.subplots(len(models), 1, squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": heights})[:, 0]
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
            ax.errorbar(est, y[sel], xerr=err, fmt=markers[k % len(markers)], color=_series_colour(k),
                        ecolor=_series_colour(k), capsize=3, label=fam, markersize=5)
        ax.axvline(0.0, color="0.4", lw=0.8, ls="--")
        names = sub["comparison"].astype(str)
        if names.duplicated(keep=False).any():  # the same pair under two tests: name the test
            names = names + "  [" + sub["method"].astype("string").fillna("").astype(str) + "]"
        ax.set_yticks(y, names, fontsize=7)
        ax.set_title(model, fontsize=10, loc="left")
        ax.grid(axis="x", color="0.9")
    axes[-1].set_xlabel("estimate (b − a) with 95% CI")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7, title="family", title_fontsize=7, loc="outside lower center",
               ncols=max(len(labels), 1))
    return fig


def _sweep_plot(figs: _Figures, series: list[dict], *, xlabel: str, title: str, refs: list[dict]):
    """Lines of accuracy against a numeric setting, one panel per model, with reference levels.

    Each series has ``panel`` (the model), ``key``, ``x``, ``y``, ``sd`` and ``label``; each
    reference has the ``key`` of its series, a ``name``, a line style ``ls`` and a level ``y``.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = list(dict.fromkeys(s["panel"] for s in series))
    fig = figs.new(min(1.0 + 4.2 * len(panels), 13.0), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    ref_styles = {}
    for ax, panel in zip(axes, panels, strict=True):
        for i, s in enumerate(x for x in series if x["panel"] == panel):
            colour = _series_colour(i)
            ax.errorbar(s["x"], 100 * np.asarray(s["y"], float), yerr=100 * np.nan_to_num(np.asarray(s["sd"], float)),
                        fmt="-o", color=colour, capsize=3, label=s["label"], markersize=4)
            for ref in refs:
                if ref["key"] == s["key"] and np.isfinite(ref["y"]):
                    ax.axhline(100 * ref["y"], color=colour, ls=ref["ls"], lw=1.0)
                    ref_styles[ref["name"]] = ref["ls"]
        ax.set_title(f"{panel}", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(color="0.92")
        handles, labels = ax.get_legend_handles_labels()
        handles += [Line2D([], [], color="0.3", ls=ls, lw=1.0) for ls in ref_styles.values()]
        labels += [f"{name} level" for name in ref_styles]
        ax.legend(handles, labels, fontsize=7, loc="best")
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(title, fontsize=10)
    return fig


def _bars(figs: _Figures, panels: list[tuple[str, list[str]]], acc: pd.DataFrame, groups: list[tuple[str, str]]):
    fig = figs.new(min(3.0 + 1.6 * sum(len(v) for _, v in panels), 12.0), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    idx = acc.set_index(["model", "train_variant", "test_variant"])
    width = 0.8 / max(len(groups), 1)
    for ax, (title, variants) in zip(axes, panels, strict=True):
        x = np.arange(len(variants))
        for g, (model, train) in enumerate(groups):
            mean = [idx["mean"].get((model, train, v), np.nan) for v in variants]
            sd = [idx["sd"].get((model, train, v), np.nan) for v in variants]
            ax.bar(x + (g - (len(groups) - 1) / 2) * width, 100 * np.asarray(mean, float), width,
                   yerr=100 * np.nan_to_num(np.asarray(sd, float)), capsize=2, color=_series_colour(g),
                   label=f"{model} / train {train}")
        ax.set_xticks(x, variants, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", color="0.92")
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=min(len(labels), 4))
    return fig


def _curves(figs: _Figures, histories: list[tuple[dict, pd.DataFrame]], order: list[tuple[str, str]]):
    metrics = []
    for _, h in histories:
        for c in h.columns:
            if c != "epoch" and pd.api.types.is_numeric_dtype(h[c]) and ("loss" in c or "acc" in c):
                if c not in metrics:
                    metrics.append(c)
    kinds = [k for k in ("loss", "acc") if any(k in m for m in metrics)]
    fig = figs.new(5.0 * len(kinds), 3.8)
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

    handles = [Line2D([], [], color=_series_colour(i), label=f"{m} / train {t}") for i, (m, t) in enumerate(groups)]
    handles += [Line2D([], [], color="0.3", ls=ls, label=k) for k, ls in styles.items()]
    axes[-1].legend(handles=handles, fontsize=7, loc="best")
    return fig


