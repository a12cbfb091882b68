"""Numbers and tables: BG-GAP table, condition labels, number formats, and the same table
as Markdown, HTML and LaTeX (booktabs).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError


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


