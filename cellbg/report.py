"""Reports for papers: tables, figures, a methods paragraph and provenance from a run folder.

:func:`write_report` reads what the earlier stages left in ``<run>/`` and writes
``<run>/report/``: ``report.md``, a self-contained ``report.html`` (figures embedded as
base64 PNG), ``tables/*.tex`` (booktabs, ready for ``\\input``) and ``figures/*.png|svg``.
Every part whose inputs are missing is named in the report with the reason, never left
out silently.

This module only formats results: the tests, CIs and corrections come from
``<run>/stats/tests.csv`` (:mod:`cellbg.stats`); accuracies are recomputed from
``predictions.parquet`` with :func:`cellbg.stats.accuracy_table` (per seed, pooled over
folds; then mean and SD over seeds). It never imports torch.

Examples
--------
>>> parse_condition("mask_erode(2)+only_fg")
([('mask_erode', ('2',))], 'only_fg', ())
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg import __version__
from cellbg._checks import CellbgError
from cellbg._io import atomic_dir

__all__ = [
    "write_report",
    "bg_gap_table",
    "latex_table",
    "parse_condition",
    "OKABE_ITO",
]

#: Okabe & Ito (2008) colour-blind-safe palette (black last).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

#: Libraries whose versions go into the provenance block (read with importlib.metadata,
#: which does not import them).
_LIBRARIES = (
    "numpy", "pandas", "scipy", "statsmodels", "scikit-image", "matplotlib", "pyarrow", "zarr",
    "pydantic", "torch", "torchvision", "monai", "cellpose", "dask", "distributed",
)

_PRED_COLUMNS = ("model", "train_variant", "test_variant", "seed", "fold", "cell_id", "patient_id", "label", "correct")
_TEST_COLUMNS = (
    "family", "model", "comparison", "a", "b", "estimate", "ci_low", "ci_high", "ci_method",
    "statistic", "df", "pvalue", "p_holm", "p_bh", "method", "n_cells", "n_patients",
    "n_seeds", "mcnemar_b", "mcnemar_c",
)


# =========================================================================== numbers
def bg_gap_table(predictions: pd.DataFrame, tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """BG-GAP (Xiao et al. 2021) = acc(``mixed_same``) - acc(``mixed_rand``) per model and
    train variant, mean and SD over seeds, with the stats test of that gap when there is one.

    Parameters
    ----------
    predictions : DataFrame
        The predictions table (``model, train_variant, test_variant, seed, correct``).
    tests : DataFrame, optional
        ``stats/tests.csv``. A row comparing ``T:mixed_same`` with ``T:mixed_rand`` for the
        same model supplies ``ci_low, ci_high, ci_method, pvalue, method`` (its sign
        flipped when it was computed as same minus rand the other way round).

    Returns
    -------
    DataFrame
        ``model, train_variant, acc_same, acc_rand, gap, gap_sd, n_seeds, ci_low, ci_high,
        ci_method, pvalue, method``. Empty when no model was tested on both variants.

    Examples
    --------
    >>> p = pd.DataFrame({"model": "m", "train_variant": "original",
    ...     "test_variant": ["mixed_same", "mixed_same", "mixed_rand", "mixed_rand"],
    ...     "seed": 0, "correct": [True, True, True, False]})
    >>> float(bg_gap_table(p)["gap"].iloc[0])
    0.5
    """
    _require_columns(predictions, ("model", "train_variant", "test_variant", "seed", "correct"), what="predictions")
    cols = ["model", "train_variant", "acc_same", "acc_rand", "gap", "gap_sd", "n_seeds",
            "ci_low", "ci_high", "ci_method", "pvalue", "method"]
    sub = predictions[predictions["test_variant"].isin(["mixed_same", "mixed_rand"])]
    if sub.empty:
        return pd.DataFrame(columns=cols)
    per_seed = (
        sub.assign(correct=sub["correct"].astype(float))
        .groupby(["model", "train_variant", "seed", "test_variant"], sort=False)["correct"]
        .mean()
        .unstack("test_variant")
    )
    if not {"mixed_same", "mixed_rand"} <= set(per_seed.columns):
        return pd.DataFrame(columns=cols)
    per_seed = per_seed.dropna(subset=["mixed_same", "mixed_rand"])
    per_seed["gap"] = per_seed["mixed_same"] - per_seed["mixed_rand"]
    rows = []
    for (model, train), g in per_seed.groupby(level=["model", "train_variant"], sort=False):
        row = {
            "model": model, "train_variant": train,
            "acc_same": g["mixed_same"].mean(), "acc_rand": g["mixed_rand"].mean(),
            "gap": g["gap"].mean(), "gap_sd": g["gap"].std() if len(g) > 1 else np.nan,
            "n_seeds": float(len(g)), "ci_low": np.nan, "ci_high": np.nan, "ci_method": "",
            "pvalue": np.nan, "method": "",
        }
        row.update(_gap_test(tests, model, train))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _gap_test(tests: pd.DataFrame | None, model: str, train: str) -> dict:
    """The stats row testing mixed_same vs mixed_rand, as same-minus-rand."""
    if tests is None or tests.empty or not {"a", "b", "model"} <= set(tests.columns):
        return {}
    same, rand = f"{train}:mixed_same", f"{train}:mixed_rand"
    m = tests["model"].astype(str) == str(model)
    for a, b, sign in ((rand, same, 1.0), (same, rand, -1.0)):  # estimate is b - a
        hit = tests[m & (tests["a"] == a) & (tests["b"] == b)]
        if "role" in hit.columns and (hit["role"] == "primary").any():
            hit = hit[hit["role"] == "primary"]
        if len(hit):
            r = hit.iloc[0]
            lo, hi = sign * float(r.get("ci_low", np.nan)), sign * float(r.get("ci_high", np.nan))
            return {"ci_low": min(lo, hi), "ci_high": max(lo, hi), "ci_method": str(r.get("ci_method", "")),
                    "pvalue": float(r.get("pvalue", np.nan)), "method": str(r.get("method", ""))}
    return {}


_CALL = re.compile(r"^(?P<name>[a-z_]+)(?:\((?P<args>[^()]*)\))?$")


def parse_condition(spec: str) -> tuple[list[tuple[str, tuple[str, ...]]], str, tuple[str, ...]]:
    """Split a variant spec into its mask perturbations and its background variant.

    Parameters
    ----------
    spec : str
        A variant spec such as ``"bg_ring(4)"`` or ``"mask_erode(2)+only_fg"``.

    Returns
    -------
    perturbations : list of (name, args)
        The ``mask_*`` steps in front, in order.
    name : str
        The background variant's name.
    args : tuple of str
        Its arguments.

    Examples
    --------
    >>> parse_condition("mask_dilate(3)+bg_ring(4)")
    ([('mask_dilate', ('3',))], 'bg_ring', ('4',))
    """
    parts = [p.strip() for p in str(spec).split("+")]
    parsed = []
    for p in parts:
        m = _CALL.match(p.replace(" ", ""))
        if m is None:
            parsed.append((p, ()))
        else:
            args = tuple(a for a in (m["args"] or "").split(",") if a != "")
            parsed.append((m["name"], args))
    if len(parsed) > 1 or parsed[0][0].startswith("mask_"):
        *mask, last = parsed if not parsed[-1][0].startswith("mask_") else (*parsed, ("original", ()))
    else:
        mask, last = [], parsed[0]
    return list(mask), last[0], last[1]


# =========================================================================== formatting
def _require_columns(df: pd.DataFrame, columns: Iterable[str], *, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CellbgError(f"{what} lacks column(s) {missing}; found {list(df.columns)}")


def _isnan(x) -> bool:
    try:
        return x is None or bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def _pct(x: float) -> str:
    return "–" if _isnan(x) else f"{100 * x:.1f}"


def _mean_sd(mean: float, sd: float, *, tex: bool = False) -> str:
    """``95.0 ± 1.2`` in percent; the mean alone when there is no SD (one seed)."""
    if _isnan(mean):
        return "–"
    if _isnan(sd):
        return _pct(mean)
    return f"{_pct(mean)} $\\pm$ {_pct(sd)}" if tex else f"{_pct(mean)} ± {_pct(sd)}"


def _num(x, digits: int = 3) -> str:
    if _isnan(x):
        return "–"
    x = float(x)
    if x == int(x) and abs(x) < 1e6 and digits != 3:
        return str(int(x))
    return f"{x:.{digits}f}"


def _int(x) -> str:
    return "–" if _isnan(x) else str(int(round(float(x))))


def _p(x) -> str:
    if _isnan(x):
        return "–"
    x = float(x)
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def _ci(lo, hi) -> str:
    return "–" if _isnan(lo) or _isnan(hi) else f"[{float(lo):.3f}, {float(hi):.3f}]"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _tex_cell(text: str) -> str:
    """Escape a cell, keeping the ``$\\pm$`` and ``$<$`` this module writes itself."""
    text = str(text)
    out = _tex_escape(text.replace("$\\pm$", "\0PM\0"))
    out = out.replace("\0PM\0", "$\\pm$")
    for uni, tex in _TEX_UNICODE.items():
        out = out.replace(uni, tex)
    out = re.sub(r"`([^`]+)`", r"\\texttt{\1}", out)  # Markdown code spans in captions
    return out.replace("< 0.001", "$<$0.001")


#: The non-ASCII characters this module writes, in LaTeX that needs no extra package.
_TEX_UNICODE = {"–": "--", "−": "$-$", "±": "$\\pm$", "Δ": "$\\Delta$", "×": "$\\times$", "≥": "$\\geq$",
                "≤": "$\\leq$", "α": "$\\alpha$", "σ": "$\\sigma$"}


def latex_table(
    df: pd.DataFrame,
    *,
    caption: str,
    label: str,
    align: str | None = None,
    size: str = "small",
    wide: bool = False,
) -> str:
    """A booktabs ``table`` float holding ``df`` as text cells, ready for ``\\input``.

    Needs ``\\usepackage{booktabs}`` in the document. Cell text is escaped for LaTeX;
    ``±`` becomes ``$\\pm$``.

    Parameters
    ----------
    df : DataFrame
        The cells, already formatted as strings; the column names become the header.
    caption, label : str
        ``\\caption`` and ``\\label`` (``label`` is used as it is, e.g. ``tab:accuracy``).
    align : str, optional
        The tabular column specification; default ``l`` for the first column, ``r`` after.
    size : str
        A font size command name (``small``, ``footnotesize``, ...).
    wide : bool
        Use ``table*`` (spanning both columns of a two-column layout).

    Returns
    -------
    str

    Examples
    --------
    >>> print(latex_table(pd.DataFrame({"a": ["x_1"]}), caption="C", label="tab:c"))  # doctest: +ELLIPSIS
    \\begin{table}[htbp]
    ...
    \\toprule
    a \\\\
    \\midrule
    x\\_1 \\\\
    \\bottomrule
    ...
    """
    if align is None:
        align = "l" + "r" * (df.shape[1] - 1)
    env = "table*" if wide else "table"
    lines = [
        f"\\begin{{{env}}}[htbp]",
        "\\centering",
        f"\\{size}",
        *(["\\setlength{\\tabcolsep}{3pt}"] if df.shape[1] > 8 else []),
        f"\\caption{{{_tex_cell(caption)}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{align}}}",
        "\\toprule",
        " & ".join(_tex_cell(c) for c in df.columns) + " \\\\",
        "\\midrule",
    ]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(_tex_cell(v) for v in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\end{{{env}}}", ""]
    return "\n".join(lines)


def _md_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(df.shape[1])) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


_NUMBER_LIKE = re.compile(r"^[\s\d.,±+\-–<>\[\]/%]*$")


def _html_table(df: pd.DataFrame) -> str:
    # Numbers right-aligned, text left-aligned, as in a printed table.
    numeric = [all(_NUMBER_LIKE.match(str(v)) for v in df.iloc[:, j]) for j in range(df.shape[1])]
    cls = ["num" if n else "txt" for n in numeric]
    head = "".join(f"<th class='{c}'>{html.escape(str(h))}</th>" for h, c in zip(df.columns, cls, strict=True))
    body = "".join(
        "<tr>" + "".join(f"<td class='{c}'>{html.escape(str(v))}</td>" for v, c in zip(row, cls, strict=True)) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown ``code`` and **bold** used in this module into HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


# =========================================================================== document
@dataclass
class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML alike."""

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def absent(self, text: str) -> None:
        """A part that could not be made, and why: stated in the text and listed up top."""
        self.missing.append(text)
        self.blocks.append(("absent", text))

    def table(self, df: pd.DataFrame, caption: str, tex_name: str | None = None) -> None:
        self.blocks.append(("table", (df, caption, tex_name)))

    def figure(self, name: str, caption: str, png: bytes) -> None:
        self.blocks.append(("figure", (name, caption, png)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "para":
                out += [value, ""]
            elif kind == "absent":
                out += [f"> **Not available:** {value}", ""]
            elif kind == "table":
                df, caption, tex = value
                note = f" (LaTeX: `tables/{tex}.tex`)" if tex else ""
                out += [f"*{caption}*{note}", "", _md_table(df), ""]
            elif kind == "figure":
                name, caption, _ = value
                out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}* (also `figures/{name}.svg`)", ""]
            elif kind == "code":
                out += ["```", value, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            elif kind == "para":
                body.append(f"<p>{_inline_html(value)}</p>")
            elif kind == "absent":
                body.append(f'<p class="absent"><strong>Not available:</strong> {_inline_html(value)}</p>')
            elif kind == "table":
                df, caption, tex = value
                note = f" <span class='file'>(LaTeX: tables/{html.escape(tex)}.tex)</span>" if tex else ""
                body.append(
                    f"<figure class='table'><figcaption>{_inline_html(caption)}{note}</figcaption>"
                    f"<div class='scroll'>{_html_table(df)}</div></figure>"
                )
            elif kind == "figure":
                name, caption, png = value
                data = base64.b64encode(png).decode("ascii")
                body.append(
                    f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
                )
            elif kind == "code":
                body.append(f"<pre>{html.escape(value)}</pre>")
        return _HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; max-width: 1240px; margin: 2em auto;
       padding: 0 1.5em; color: #1a1a1a; line-height: 1.45; }}
h1 {{ border-bottom: 2px solid #0072B2; padding-bottom: .2em; }}
h2 {{ margin-top: 1.8em; border-bottom: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 0.8em; margin: .3em 0 1em 0; }}
thead th {{ border-top: 2px solid #333; border-bottom: 1px solid #333; padding: .25em .45em; vertical-align: bottom; }}
tbody td {{ padding: .2em .45em; }}
.num {{ text-align: right; white-space: nowrap; }}
.txt {{ text-align: left; min-width: 6em; }}
tbody tr:last-child td {{ border-bottom: 2px solid #333; }}
tbody tr:nth-child(even) {{ background: #f4f6f8; }}
figure {{ margin: 1em 0 1.6em 0; }}
figure img {{ max-width: 100%; height: auto; border: 1px solid #e3e3e3; }}
figcaption {{ font-size: .9em; color: #444; margin: .3em 0; }}
.scroll {{ overflow-x: auto; }}
.file {{ color: #777; }}
p.absent {{ background: #fff6e0; border-left: 4px solid #E69F00; padding: .4em .8em; }}
pre {{ background: #f4f6f8; padding: .8em; overflow-x: auto; font-size: .85em; }}
code {{ background: #f0f0f0; padding: 0 .2em; border-radius: 3px; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


# =========================================================================== figures
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


# =========================================================================== reading the run
@dataclass
class _Run:
    run_dir: Path
    protocol: object
    predictions: pd.DataFrame | None = None
    tests: pd.DataFrame | None = None
    summary_md: str | None = None
    cells: pd.DataFrame | None = None
    saliency: pd.DataFrame | None = None
    histories: list[tuple[dict, pd.DataFrame]] = field(default_factory=list)
    job_specs: list[dict] = field(default_factory=list)
    segmentation: pd.DataFrame | None = None
    segmentation_path: Path | None = None


def _read_table(path: Path, what: str) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except Exception as exc:  # a damaged file is a user-facing problem, said in one line
        raise CellbgError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None


def _read_run(run_dir: Path) -> _Run:
    import json

    from cellbg.protocol import load_run

    run = _Run(run_dir=run_dir, protocol=load_run(run_dir))
    run.predictions = _read_table(run_dir / "predictions.parquet", "predictions")
    if run.predictions is not None:
        _require_columns(run.predictions, _PRED_COLUMNS, what=str(run_dir / "predictions.parquet"))
    run.tests = _read_table(run_dir / "stats" / "tests.csv", "stats table")
    if run.tests is not None:
        _require_columns(run.tests, ("family", "model", "comparison", "estimate"), what=str(run_dir / "stats/tests.csv"))
        for c in _TEST_COLUMNS:
            if c not in run.tests.columns:
                run.tests[c] = np.nan
    if (run_dir / "stats" / "summary.md").exists():
        run.summary_md = (run_dir / "stats" / "summary.md").read_text(encoding="utf-8")
    run.cells = _read_table(run_dir / "cells.parquet", "cell table")
    run.saliency = _read_table(run_dir / "saliency.parquet", "saliency table")
    for job in sorted((run_dir / "jobs").glob("*/")) if (run_dir / "jobs").is_dir() else []:
        spec = {}
        if (job / "spec.json").exists():
            try:
                spec = json.loads((job / "spec.json").read_text(encoding="utf-8"))
            except ValueError:
                spec = {}
        spec = spec if isinstance(spec, dict) else {}
        if isinstance(spec.get("job"), dict):  # cellbg.train writes the job under "job"
            spec = {**spec, **spec["job"]}
        spec["_done"] = (job / "DONE").exists()
        run.job_specs.append(spec)
        h = _read_table(job / "history.csv", "training history")
        if h is not None and len(h):
            run.histories.append((spec, h))
    for name in ("segmentation/evaluation.csv", "segmentation/evaluation.parquet",
                 "segmentation_evaluation.csv", "segmentation/eval.csv"):
        t = _read_table(run_dir / name, "segmentation evaluation")
        if t is not None:
            run.segmentation, run.segmentation_path = t, run_dir / name
            break
    return run


def _ordered(values: Iterable[str], preferred: Iterable[str]) -> list[str]:
    """``values`` in the protocol's order, unknown ones after in order of appearance."""
    values = list(dict.fromkeys(map(str, values)))
    first = [v for v in preferred if v in values]
    return first + [v for v in values if v not in first]


# =========================================================================== sections
def _section_overview(doc: _Doc, run: _Run) -> None:
    p = run.protocol
    doc.para(
        f"Run folder `{run.run_dir}`; protocol **{p.name}**. Report written "
        f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by cellbg {__version__}. "
        "Accuracies are percentages: per seed over all tested cells (pooled over folds), "
        "then mean ± SD over seeds."
    )


def _section_accuracy(doc: _Doc, run: _Run, figs: _Figures, tex: dict[str, str]) -> pd.DataFrame | None:
    doc.heading("Accuracy: train variant × test variant")
    if run.predictions is None:
        doc.absent("no predictions were found (`predictions.parquet` is missing), so there are no "
                   "accuracy tables or accuracy figures; run `cellbg train` for this protocol.")
        return None
    p = run.protocol
    acc = _accuracy(run.predictions)
    models = _ordered(acc["model"], [m.key for m in p.models])
    trains = _ordered(acc["train_variant"], p.variants.train)
    tests = _ordered(acc["test_variant"], p.variants.test)
    for model in models:
        sub = acc[acc["model"] == model].set_index(["train_variant", "test_variant"])
        cols = [t for t in tests if t in sub.index.get_level_values(1)]
        rows = [t for t in trains if t in sub.index.get_level_values(0)]
        n_seeds = int(sub["n_seeds"].max())
        table = pd.DataFrame(
            [[r] + [_mean_sd(sub["mean"].get((r, c), np.nan), sub["sd"].get((r, c), np.nan)) for c in cols]
             for r in rows],
            columns=["train \\ test"] + cols,
        )
        tex_table = pd.DataFrame(
            [[r] + [_mean_sd(sub["mean"].get((r, c), np.nan), sub["sd"].get((r, c), np.nan), tex=True)
                    for c in cols] for r in rows],
            columns=["train $\\backslash$ test"] + cols,
        )
        spread = f"mean ± SD over {n_seeds} seeds" if n_seeds > 1 else "one seed, so no SD"
        n_cells = int(sub["n_cells"].max())
        n_pat = int(sub["n_patients"].max())
        caption = (f"Accuracy (%) of {model}; rows: training variant, columns: test variant; "
                   f"{spread}; {n_cells} cells from {n_pat} patients.")
        name = f"accuracy_{_slug(model)}"
        doc.table(table, caption, name)
        tex[name] = _latex_raw_header(tex_table, caption=caption, label=f"tab:{name}")
    if figs.enabled:
        png = figs.save(_heatmap(figs, acc, models, trains, tests), "accuracy_heatmap")
        doc.figure("accuracy_heatmap", "Accuracy (%) per training variant (rows) and test variant (columns), "
                   "mean over seeds; viridis scale.", png)
    return acc


def _accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """The stats stage's accuracy table, with ``mean`` and ``sd`` (fractions) for plotting."""
    from cellbg.stats import accuracy_table

    acc = accuracy_table(predictions)
    return acc.rename(columns={"accuracy": "mean", "accuracy_sd": "sd"})


def _latex_raw_header(df: pd.DataFrame, *, caption: str, label: str) -> str:
    """:func:`latex_table` where the first header cell is already LaTeX."""
    first = df.columns[0]
    text = latex_table(df.rename(columns={first: "\0HEAD\0"}), caption=caption, label=label)
    return text.replace(_tex_escape("\0HEAD\0"), first, 1)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "model"


def _section_tests(doc: _Doc, run: _Run, figs: _Figures, tex: dict[str, str]) -> None:
    doc.heading("Significance tests")
    if run.tests is None:
        doc.absent("no statistics were computed (`stats/tests.csv` is missing), so there is no "
                   "significance table and no forest plot; run `cellbg stats RUN_DIR`.")
        return
    t = run.tests
    if t.empty:
        doc.absent("`stats/tests.csv` holds no tests, so there is no significance table and no forest plot.")
        return
    md_rows, tex_rows = [], []
    for r in t.itertuples(index=False):
        bc = "–" if _isnan(r.mcnemar_b) else f"{_int(r.mcnemar_b)}/{_int(r.mcnemar_c)}"
        base = [
            str(r.model), str(r.comparison) + (f" ({r.name})" if isinstance(getattr(r, "name", ""), str) and getattr(r, "name", "") else ""),
            str(r.family) + (f" / {r.role}" if isinstance(getattr(r, "role", None), str) else ""),
            _num(r.estimate) + ("" if _isnan(r.ci_low) else f" {_ci(r.ci_low, r.ci_high)}"), "" if _isnan(r.ci_method) else str(r.ci_method),
            "" if _isnan(r.method) else str(r.method), _num(r.statistic, 2), _num(r.df, 1),
            _p(r.pvalue), _p(r.p_holm), _p(r.p_bh), _int(r.n_cells), _int(r.n_patients), _int(r.n_seeds), bc,
        ]
        md_rows.append(base)
        tex_rows.append(base)
    header = ["model", "comparison (a vs b)", "family", "Δ = b − a [95% CI]", "CI method", "test",
              "statistic", "df", "p", "p Holm", "p BH", "cells", "patients", "seeds", "McNemar b/c"]
    caption = ("Paired tests from `stats/tests.csv`; Δ is b minus a (accuracy as a fraction; background share "
               "for the saliency family); p Holm and p BH are adjusted within each family over its primary tests; "
               "cells, patients and seeds are the numbers each test used; McNemar b/c are the discordant counts "
               "(cell level).")
    doc.table(pd.DataFrame(md_rows, columns=header), caption, "significance")
    tex["significance"] = latex_table(pd.DataFrame(tex_rows, columns=header), caption=caption,
                                      label="tab:significance", size="scriptsize", wide=True,
                                      # long names wrap in paragraph columns (plain LaTeX, no package)
                                      align="lp{3.2cm}lrp{1.6cm}p{2.6cm}" + "r" * (len(header) - 6))
    prose = _summary_prose(run.summary_md or "")
    if prose:
        doc.para("In words, from the statistics stage (`stats/summary.md`, which also holds its tables):")
        for line in prose:
            doc.para(line)
    # One scale per plot: accuracy differences of the primary tests (saliency rows and
    # secondary/sensitivity re-tests of the same pair stay in the table).
    keep = np.isfinite(t["estimate"].astype(float))
    if "role" in t.columns:
        keep &= t["role"].astype(str) == "primary"
    if "measure" in t.columns:
        keep &= t["measure"].astype("string").fillna("accuracy").astype(str).isin(["accuracy", ""])
    forest = t[keep].copy()
    # A planned (confirmatory) pair that the exploratory sweep tests again is drawn once.
    pair = forest["model"].astype(str) + "|" + forest["a"].astype(str) + "|" + forest["b"].astype(str)
    planned = set(pair[forest["family"].astype(str) == "confirmatory"])
    forest = forest[~((forest["family"].astype(str) == "exploratory") & pair.isin(planned))]
    if "name" in forest.columns:
        named = forest["name"].astype("string").fillna("").astype(str)  # all-empty reads back as float NaN
        forest["comparison"] = np.where(named != "", named + ": " + forest["comparison"].astype(str),
                                        forest["comparison"].astype(str))
    if figs.enabled and len(forest):
        png = figs.save(_forest(figs, forest), "forest_gaps")
        doc.figure("forest_gaps", "Accuracy differences b − a (as fractions) with 95% CIs from the primary test of "
                   "each comparison, per model; colour and marker give the test family; dashed line at no "
                   "difference.", png)
    elif figs.enabled:
        doc.absent("no primary accuracy test has a finite estimate, so there is no forest plot.")


def _summary_prose(text: str) -> list[str]:
    """The sentences of ``stats/summary.md``: its paragraphs and bullets, not its tables
    or headings (the report shows the same numbers in its own tables)."""
    out, block = [], []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|")):
            if block:
                out.append(" ".join(block))
                block = []
            continue
        if stripped.startswith(("- ", "* ")):
            if block:
                out.append(" ".join(block))
            block = [stripped[2:]]
        else:
            block.append(stripped)
    return out


def _section_bg_gap(doc: _Doc, run: _Run, tex: dict[str, str]) -> None:
    doc.heading("BG-GAP")
    if run.predictions is None:
        doc.absent("no predictions, so no BG-GAP.")
        return
    gap = bg_gap_table(run.predictions, run.tests)
    if gap.empty:
        doc.absent("BG-GAP = acc(mixed_same) − acc(mixed_rand) needs both `mixed_same` and `mixed_rand` "
                   "among the test variants; this run did not test both.")
        return
    rows = []
    for r in gap.itertuples(index=False):
        pp = "–" if _isnan(r.gap) else f"{100 * r.gap:.1f}"
        sd = "" if _isnan(r.gap_sd) else f" ± {100 * r.gap_sd:.1f}"
        ci = "–" if _isnan(r.ci_low) else f"[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        rows.append([str(r.model), str(r.train_variant), _pct(r.acc_same), _pct(r.acc_rand), pp + sd, ci,
                     _p(r.pvalue), r.method or "not tested"])
    header = ["model", "train variant", "acc mixed_same (%)", "acc mixed_rand (%)", "BG-GAP (pp)",
              "95% CI (pp)", "p", "test"]
    caption = ("BG-GAP = acc(mixed_same) − acc(mixed_rand) in percentage points, mean ± SD over seeds; "
               "CI and p from the stats stage where it tested this pair.")
    df = pd.DataFrame(rows, columns=header)
    doc.table(df, caption, "bg_gap")
    tex["bg_gap"] = latex_table(df, caption=caption, label="tab:bg_gap", align="ll" + "r" * 6)
    # Measured with benchmarks/validate_null_pipeline.py: with no background cue the only_fg
    # drop of an original-trained model averages ~6 points while BG-GAP stays at 0, so the
    # report says which question each number answers.
    doc.para("How to read it: for a model trained on `original`, the drop from `original` to `only_fg` "
             "is how much the model depends on its background, the effect of an unfamiliar surround "
             "included, so it need not be zero when the background carries no class information. "
             "BG-GAP compares two real backgrounds that differ only in the class of the cell they came "
             "from, so it measures the model's use of class information in the background. A model "
             "trained on `only_fg` never saw a background: its BG-GAP is a negative control.")


def _groups(acc: pd.DataFrame, p) -> list[tuple[str, str]]:
    models = _ordered(acc["model"], [m.key for m in p.models])
    trains = _ordered(acc["train_variant"], p.variants.train)
    have = set(zip(acc["model"], acc["train_variant"], strict=True))
    return [(m, t) for m in models for t in trains if (m, t) in have]


def _section_factors(doc: _Doc, run: _Run, acc: pd.DataFrame | None, figs: _Figures) -> None:
    doc.heading("Background factors")
    if acc is None:
        doc.absent("no predictions, so no background-factor figures.")
        return
    p = run.protocol
    tested = _ordered(acc["test_variant"], p.variants.test)
    parsed = {v: parse_condition(v) for v in tested}
    idx = acc.set_index(["model", "train_variant", "test_variant"])
    groups = _groups(acc, p)
    if not figs.enabled:
        doc.absent("figures are switched off in the protocol (`report.figures: false`).")
        return

    # background size: bg_ring(k) between only_fg and original
    rings = sorted(((float(a[0]), v) for v, (mask, n, a) in parsed.items() if n == "bg_ring" and not mask and a),
                   key=lambda t: t[0])
    if rings:
        series, refs = [], []
        for model, train in groups:
            key = (model, train)
            ys = [idx["mean"].get((model, train, v), np.nan) for _, v in rings]
            sds = [idx["sd"].get((model, train, v), np.nan) for _, v in rings]
            series.append({"panel": model, "key": key, "x": [k for k, _ in rings], "y": ys, "sd": sds,
                           "label": f"train {train}"})
            for name, ls in (("only_fg", ":"), ("original", "--")):
                refs.append({"key": key, "name": name, "ls": ls, "y": idx["mean"].get((model, train, name), np.nan)})
        png = figs.save(_sweep_plot(figs, series, xlabel="background ring width (pixels)",
                                    title="Accuracy against background size", refs=refs), "ring_width")
        doc.figure("ring_width", "Accuracy (mean ± SD over seeds) when a ring of k pixels of the cell's own "
                   "background is kept, one panel per model; horizontal lines: the only_fg (dotted) and original "
                   "(dashed) levels of the same model and training variant, in its colour.", png)
    else:
        doc.absent("no `bg_ring(k)` test variants were run, so there is no accuracy-against-ring-width "
                   "figure (use a ring-sweep protocol).")

    colours = [v for v, (mask, n, _) in parsed.items() if n == "bg_color" and not mask]
    blurs = sorted((v for v, (mask, n, a) in parsed.items() if n == "bg_blur" and not mask),
                   key=lambda v: float(parsed[v][2][0]) if parsed[v][2] else 0.0)
    if colours or blurs:
        refs = [v for v in ("original", "only_fg") if v in tested]
        panels = [(t, refs + vs) for t, vs in (("background colour", colours), ("background blur", blurs)) if vs]
        png = figs.save(_bars(figs, panels, acc, groups), "colour_blur")
        doc.figure("colour_blur", "Accuracy (mean ± SD over seeds) with the background replaced by a solid "
                   "colour (`bg_color(r,g,b)`) or blurred (`bg_blur(sigma)`), beside original and only_fg.", png)
    else:
        doc.absent("no `bg_color` or `bg_blur` test variants were run, so there are no colour/blur bars.")

    perturbed: dict[str, list[tuple[float, str]]] = {}
    for v, (mask, name, args) in parsed.items():
        if len(mask) == 1 and mask[0][1]:
            sign = -1.0 if mask[0][0] == "mask_erode" else 1.0
            base = name + (f"({','.join(args)})" if args else "")
            perturbed.setdefault(base, []).append((sign * float(mask[0][1][0]), v))
    if perturbed:
        series = []
        for base, pts in perturbed.items():
            if base in tested:
                pts = pts + [(0.0, base)]
            pts = sorted(pts)
            for model, train in groups:
                series.append({
                    "panel": model, "key": (model, train, base), "x": [k for k, _ in pts],
                    "y": [idx["mean"].get((model, train, v), np.nan) for _, v in pts],
                    "sd": [idx["sd"].get((model, train, v), np.nan) for _, v in pts],
                    "label": f"train {train} / test {base}",
                })
        png = figs.save(_sweep_plot(figs, series, xlabel="mask change (pixels; < 0 eroded, > 0 dilated)",
                                    title="Accuracy against mask erosion / dilation", refs=[]), "mask_quality")
        doc.figure("mask_quality", "Accuracy (mean ± SD over seeds) when the test masks are eroded (negative) or "
                   "dilated (positive) by k pixels before the background variant is applied.", png)
    else:
        doc.absent("no `mask_erode(k)` / `mask_dilate(k)` test variants were run, so there is no "
                   "mask-quality sensitivity figure.")


def _section_training(doc: _Doc, run: _Run, figs: _Figures) -> None:
    doc.heading("Training curves")
    if not run.histories:
        doc.absent("no training histories were found (`jobs/*/history.csv`), so there are no training curves.")
        return
    done = sum(bool(s.get("_done")) for s in run.job_specs)
    doc.para(f"{len(run.job_specs)} training jobs in `jobs/`, {done} finished (DONE marker); "
             f"{len(run.histories)} have a history.")
    if figs.enabled:
        usable = [(s, h) for s, h in run.histories if any(("loss" in c or "acc" in c) for c in h.columns)]
        if not usable:
            doc.absent("the training histories have no loss or accuracy column to plot.")
            return
        p = run.protocol
        order = [(m.key, t) for m in p.models for t in p.variants.train]
        png = figs.save(_curves(figs, usable, order), "training_curves")
        doc.figure("training_curves", "Loss and accuracy per epoch for every job (seed and fold); colour: "
                   "model and training variant; solid: training, dashed: validation.", png)


def _section_saliency(doc: _Doc, run: _Run, figs: _Figures, n_cells: int) -> None:
    doc.heading("Saliency")
    p = run.protocol
    if run.saliency is None:
        why = ("saliency was switched off in the protocol (`saliency.enabled: false`)"
               if not p.saliency.enabled else "`saliency.parquet` is missing; run `cellbg saliency`")
        doc.absent(f"no saliency was computed: {why}.")
        return
    sal = run.saliency
    if sal.empty:
        doc.absent("no saliency was computed: `saliency.parquet` holds no maps.")
        return
    keys = [k for k in ("model", "train_variant", "method") if k in sal.columns]
    summary = sal.groupby(keys, sort=False)["background_share"].agg(["mean", "std", "size"]).reset_index()
    table = summary[keys].astype(str).rename(columns={"train_variant": "train variant"})
    table["background share"] = [f"{m:.3f}" + ("" if _isnan(sd) else f" ± {sd:.3f}")
                                 for m, sd in zip(summary["mean"], summary["std"], strict=True)]
    table["maps"] = summary["size"].astype(int)
    doc.table(table, "Share of attribution that falls on the background, outside the cell mask "
              "(mean ± SD over the sampled cells, seeds and folds).", None)
    if not figs.enabled:
        return
    if not (run.run_dir / "saliency.zarr").exists() or "map_index" not in sal.columns:
        doc.absent("no saliency gallery: `saliency.zarr` (the maps) is missing.")
        return
    made = _gallery(figs, run, sal, n_cells)
    if made is None:
        doc.absent("no saliency gallery: no cell has maps from every model.")
        return
    png, train, seed = made
    doc.figure("saliency_gallery", f"Saliency maps (absolute, scaled to their maximum; inferno) of models trained on "
               f"`{train}` (seed {seed}) for sampled cells (rows), one column per model and method, over the crop "
               "(first column); white line: the cell mask; under each map, its background share.", png)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` crop in [0, 1] as something ``imshow`` draws: gray or RGB."""
    image = np.clip(np.asarray(image, dtype=float), 0, 1)
    return image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)


def _gallery(figs: _Figures, run: _Run, sal: pd.DataFrame, n_cells: int) -> tuple[bytes, str, int] | None:
    """Cells (rows) x (model, method) (columns) over the crop; None when no cell has them all."""
    import zarr

    p = run.protocol
    train = _ordered(sal["train_variant"], p.variants.train)[0]
    sal = sal[sal["train_variant"] == train]
    seed = int(sal["seed"].min())
    sal = sal[sal["seed"] == seed]
    models = _ordered(sal["model"], [m.key for m in p.models])
    methods = _ordered(sal["method"], p.saliency.methods)
    columns = [(m, meth) for m in models for meth in methods]
    have = sal.groupby("cell_id").apply(lambda g: len(set(zip(g["model"], g["method"], strict=True))),
                                        include_groups=False)
    full = sorted(have.index[have == len(columns)])
    if not full:  # fall back to one method, if every model has that for some cell
        columns = [(m, methods[0]) for m in models]
        sal = sal[sal["method"] == methods[0]]
        have = sal.groupby("cell_id")["model"].nunique()
        full = sorted(have.index[have == len(models)])
        if not full:
            return None
    labels = sal.drop_duplicates("cell_id").set_index("cell_id")["label"].astype(str)
    # Alternate the classes so the gallery shows each, in a fixed (sorted) order.
    by_class = {c: [x for x in full if labels[x] == c] for c in sorted(labels[full].unique())}
    chosen: list[str] = []
    while len(chosen) < min(n_cells, len(full)):
        for c in by_class:
            if by_class[c] and len(chosen) < n_cells:
                chosen.append(by_class[c].pop(0))
    maps = zarr.open_group(str(run.run_dir / "saliency.zarr"), mode="r")["maps"]
    crop_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if run.cells is not None and (run.run_dir / "crops.zarr").exists():
        group = zarr.open_group(str(run.run_dir / "crops.zarr"), mode="r")
        row_of = dict(zip(run.cells["cell_id"].astype(str), range(len(run.cells)), strict=True))
        for cell in chosen:
            if cell in row_of:
                crop_of[cell] = (_rgb(group["images"][row_of[cell]]), np.asarray(group["masks"][row_of[cell]], float))
    lead = 1 if crop_of else 0  # a first column with the plain crop, for context
    fig = figs.new(1.65 * (len(columns) + lead) + 0.6, 1.85 * len(chosen) + 0.5)
    axes = fig.subplots(len(chosen), len(columns) + lead, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, cell in enumerate(chosen):
        crop = crop_of.get(cell)
        axes[i, 0].set_ylabel(f"{cell}\n({labels[cell]})", fontsize=7)
        if lead and crop is not None:
            axes[i, 0].imshow(crop[0], cmap="gray" if crop[0].ndim == 2 else None)
            axes[i, 0].contour(crop[1], levels=[0.5], colors="white", linewidths=0.8)
        if i == 0 and lead:
            axes[0, 0].set_title("crop", fontsize=8)
        for j, (model, method) in enumerate(columns):
            ax = axes[i, j + lead]
            r = sal[(sal["cell_id"] == cell) & (sal["model"] == model) & (sal["method"] == method)].iloc[0]
            heat = np.abs(np.asarray(maps[int(r["map_index"])], dtype=float))
            heat = heat / heat.max() if heat.max() > 0 else heat
            if crop is not None:
                ax.imshow(crop[0], cmap="gray" if crop[0].ndim == 2 else None)
                ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
                ax.contour(crop[1], levels=[0.5], colors="white", linewidths=0.8)
            else:
                ax.imshow(heat, cmap="inferno", vmin=0, vmax=1)
            ax.set_xlabel(f"bg share {float(r['background_share']):.2f}", fontsize=8)
            if i == 0:
                ax.set_title(f"{model}\n{method}" if len(methods) > 1 else model, fontsize=8)
    return figs.save(fig, "saliency_gallery"), train, seed


def _section_segmentation(doc: _Doc, run: _Run, tex: dict[str, str]) -> None:
    doc.heading("Segmentation quality")
    seg = run.protocol.segmentation
    if run.segmentation is None:
        if seg.method == "masks":
            doc.absent("segmentation quality was not evaluated: the masks were supplied with the data "
                       "(`segmentation.method: masks`), so there is no separate ground truth to compare with.")
        else:
            doc.absent("segmentation quality was not evaluated: no evaluation against ground-truth masks "
                       "was found (run `cellbg segment PROTOCOL --evaluate` with masks in the data).")
        return
    t = run.segmentation
    numeric = [c for c in t.columns if pd.api.types.is_numeric_dtype(t[c]) and not pd.api.types.is_bool_dtype(t[c])]
    counts = [c for c in ("n_true", "n_pred", "tp", "fp", "fn") if c in numeric]
    rates = [c for c in numeric if c not in counts and c not in ("instance", "fold", "seed")]
    pooled: dict[str, float] = {}
    if {"tp", "fp", "fn"} <= set(counts):
        # Pooled over images (micro average), beside the per-image mean (macro average).
        tp, fp, fn = (float(t[c].sum()) for c in ("tp", "fp", "fn"))
        pooled = {"precision": tp / (tp + fp) if tp + fp else np.nan,
                  "recall": tp / (tp + fn) if tp + fn else np.nan,
                  "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan}
    rows = [[c, f"{t[c].mean():.3f}" + ("" if len(t) < 2 else f" ± {t[c].std():.3f}"),
             "–" if c not in pooled or _isnan(pooled[c]) else f"{pooled[c]:.3f}"] for c in rates]
    rows += [[c, f"{t[c].mean():.1f}" + ("" if len(t) < 2 else f" ± {t[c].std():.1f}"), f"{int(t[c].sum())} (total)"]
             for c in counts]
    df = pd.DataFrame(rows, columns=["measure", "per image (mean ± SD)", "pooled over images"])
    caption = (f"Segmentation quality ({seg.method}) against ground truth on {len(t)} images "
               f"(`{run.segmentation_path.relative_to(run.run_dir)}`); precision, recall and F1 at IoU 0.5, "
               "AP averaged over IoU 0.5 to 0.95.")
    doc.table(df, caption, "segmentation")
    tex["segmentation"] = latex_table(df, caption=caption, label="tab:segmentation", align="lrr")


# =========================================================================== methods & provenance
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
        res = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def _arch_text(m) -> str:
    if m.arch == "resnet":
        return f"{m.key} (MONAI ResNet-{m.depth}, width × {m.width:g}{', small stem' if m.small_stem else ''})"
    if m.arch == "shufflenet_v2":
        return f"{m.key} (torchvision ShuffleNetV2 × {m.width:g})"
    return f"{m.key} (CellYolo, width {m.width:g}, depth {m.depth:g})"


def _join(items: list[str]) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _methods(run: _Run) -> str:
    p = run.protocol
    seg = p.segmentation
    if seg.method == "masks":
        seg_text = "Cells were taken from the instance masks supplied with the images"
    elif seg.method == "cellpose":
        seg_text = (f"Cells were segmented with Cellpose (model `{seg.model}`, diameter "
                    f"{'estimated' if seg.diameter is None else f'{seg.diameter:g} px'}, flow threshold "
                    f"{seg.flow_threshold:g}, cell-probability threshold {seg.cellprob_threshold:g})")
    else:
        th = seg.threshold
        seg_text = (f"Cells were segmented by {th.method} thresholding after Gaussian smoothing "
                    f"(sigma {th.sigma:g}) with a seeded watershed")
    if p.data.source == "synthetic":
        s = p.data.synthetic
        data_text = (f"The data were synthetic Sezary-like cells made by cellbg ({s.patients} patients, planted "
                     f"background signal {s.signal:g}, seed {s.seed}). ")
    else:
        data_text = ""
    counts = ""
    src = run.cells if run.cells is not None else run.predictions
    if src is not None and {"cell_id", "patient_id"} <= set(src.columns):
        n_cls = src["label"].nunique() if "label" in src.columns else None
        counts = (f" This gave {src['cell_id'].nunique()} cells from {src['patient_id'].nunique()} patients"
                  + (f" in {n_cls} classes" if n_cls else "") + ".")
    scale = "at the image's pixel size" if p.crops.scale == "keep" else f"scaled so the cell spans {p.crops.fit_fraction:g} of the crop"
    c = p.crops
    crops_text = (f" Each cell was cut out as a {c.size} × {c.size} pixel crop centred on it, {scale}"
                  f"{', excluding cells touching the image border' if c.exclude_border else ''}"
                  f" (minimum area {c.min_area} px).")
    v = p.variants
    var_text = (f" Models were trained on the background variants {_join([f'`{x}`' for x in v.train])} and tested on "
                f"{_join([f'`{x}`' for x in v.test])} (after Xiao et al., 2021; fill `{v.fill}`, pairing seed {v.seed}).")
    t = p.training
    sp = t.split
    if sp.kind == "kfold":
        used = f", of which the first {t.max_folds} were run" if t.max_folds and t.max_folds < sp.folds else ""
        split_text = (f"{sp.folds}-fold cross-validation with folds grouped by patient (no patient in both "
                      f"training and test) and stratified by class{used}")
    else:
        split_text = f"a fixed split holding out patients {_join(sp.test_patients)}"
    train_text = (f" The models were {_join([_arch_text(m) for m in p.models])}, trained from scratch for up to "
                  f"{t.epochs} epochs (batch {t.batch_size}, learning rate {t.lr:g}, weight decay {t.weight_decay:g}, "
                  f"early stopping after {t.patience} epochs without a better validation loss"
                  f"{', with augmentation' if t.augment else ''}), with {len(t.seeds)} seed"
                  f"{'s' if len(t.seeds) != 1 else ''} ({_join(t.seeds)}) and {split_text}; "
                  f"{sp.val_fraction:.0%} of the training patients were held out for validation.")
    st = p.stats
    primary = ("a paired t-test on per-patient accuracies" if st.primary == "patient_t"
               else "a GEE logistic model of cell correctness clustered by patient")
    conf = _join([f"`{cmp.a}` vs `{cmp.b}`" + _bg_gap_label(cmp.a, cmp.b) for cmp in st.confirmatory])
    stats_text = (f" The unit of analysis was the patient: the primary test was {primary}, with cell-level "
                  f"McNemar tests as a secondary, conditional result. Confirmatory comparisons were {conf}"
                  f"{'; every other condition was compared with original:original as exploratory' if st.exploratory else ''}. "
                  f"{_ci_text(run)} p-values were adjusted within each family (Holm; Benjamini–Hochberg) "
                  f"at alpha = {st.alpha:g}.")
    if p.saliency.enabled:
        sal_text = (f" Attribution maps ({_join(p.saliency.methods)}) were computed for {p.saliency.cells_per_job} "
                    f"cells per job on the `{p.saliency.test_variant}` images, and the share of attribution falling "
                    "outside the cell mask was reported.")
    else:
        sal_text = ""
    vers = _versions()
    soft = ", ".join(f"{k} {vers[k]}" for k in ("python", "numpy", "torch", "monai", "torchvision", "cellpose",
                                                "scikit-image", "statsmodels", "scipy") if k in vers)
    return (f"{data_text}{seg_text}.{counts}{crops_text}{var_text}{train_text}{stats_text}{sal_text}"
            f" Analyses used cellbg {__version__} ({soft}).")


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
        return (f"Confidence intervals were to be 95% ({run.protocol.stats.bootstrap} bootstrap resamples, "
                f"seed {run.protocol.stats.seed}); no tests were run.")
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
    start = _dt.datetime.fromtimestamp(min(times), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{span / 60:.1f} min from the first to the last stage output (first at {start})"


def _training_time(run: _Run) -> str:
    secs = [float(h["seconds"].sum()) for _, h in run.histories if "seconds" in h.columns]
    if not secs:
        return "not recorded (no `seconds` column in jobs/*/history.csv)"
    return f"{sum(secs) / 60:.1f} min summed over {len(secs)} jobs (epoch times in history.csv)"


def _hardware(run: _Run) -> str:
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    text = f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs{mem_text}"
    devices = sorted({str(s["device"]) for s in run.job_specs if s.get("device")})
    if devices:
        text += f"; training device(s) recorded by the jobs: {', '.join(devices)}"
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


# =========================================================================== entry point
def write_report(run_dir: str | Path, *, gallery_cells: int = 4) -> Path:
    """Write ``<run>/report/`` from a run folder: Markdown, HTML, LaTeX tables and figures.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (holding ``protocol.resolved.yaml``).
    gallery_cells : int, optional
        Cells (rows) in the saliency gallery.

    Returns
    -------
    Path
        The report folder. It holds ``report.md`` and ``report.html`` (when the protocol's
        ``report.formats`` list them), ``tables/*.tex`` (``tex``) and ``figures/*.png|svg``
        (``report.figures``). The folder is replaced as a whole, so a failed report never
        leaves a half-written one.

    Raises
    ------
    CellbgError
        Not a run folder, or an input table that cannot be read or lacks its columns.

    Examples
    --------
    >>> write_report("runs/quickstart")  # doctest: +SKIP
    PosixPath('runs/quickstart/report')
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not isinstance(gallery_cells, int | np.integer) or gallery_cells < 1:
        raise CellbgError(f"gallery_cells must be a positive integer, got {gallery_cells!r}")
    run = _read_run(run_dir)
    cfg = run.protocol.report
    target = run_dir / "report"
    with atomic_dir(target) as tmp:
        figs = _Figures(tmp / "figures", enabled=cfg.figures)
        tex: dict[str, str] = {}
        doc = _Doc(title=cfg.title or f"cellbg report: {run.protocol.name}")
        _section_overview(doc, run)
        if not cfg.figures:
            doc.absent("figures are switched off in the protocol (`report.figures: false`).")
        acc = _section_accuracy(doc, run, figs, tex)
        _section_bg_gap(doc, run, tex)
        _section_tests(doc, run, figs, tex)
        _section_factors(doc, run, acc, figs)
        _section_training(doc, run, figs)
        _section_saliency(doc, run, figs, gallery_cells)
        _section_segmentation(doc, run, tex)
        doc.heading("Methods")
        doc.para(_methods(run))
        doc.heading("Provenance")
        doc.code(_provenance(run, started))
        if doc.missing:
            # Say up front what the report lacks; each item is repeated in its section.
            doc.blocks.insert(1, ("para", "**Parts not available in this run:** " + " ".join(
                f"({i}) {m}" for i, m in enumerate(doc.missing, 1))))
        if "tex" in cfg.formats:
            (tmp / "tables").mkdir(exist_ok=True)
            for name, text in tex.items():
                (tmp / "tables" / f"{name}.tex").write_text(text, encoding="utf-8")
        if "md" in cfg.formats:
            (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        if "html" in cfg.formats:
            (tmp / "report.html").write_text(doc.html(), encoding="utf-8")
    return target
