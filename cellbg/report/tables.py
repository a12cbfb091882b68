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
    cols = [
        "model",
        "train_variant",
        "acc_same",
        "acc_rand",
        "gap",
        "gap_sd",
        "n_seeds",
        "ci_low",
        "ci_high",
        "ci_method",
        "pvalue",
        "method",
    ]
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
            "model": model,
            "train_variant": train,
            "acc_same": g["mixed_same"].mean(),
            "acc_rand": g["mixed_rand"].mean(),
            "gap": g["gap"].mean(),
            "gap_sd": g["gap"].std() if len(g) > 1 else np.nan,
            "n_seeds": float(len(g)),
            "ci_low": np.nan,
            "ci_high": np.nan,
            "ci_method": "",
            "pvalue": np.nan,
            "method": "",
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
            return {
                "ci_low": min(lo, hi),
                "ci_high": max(lo, hi),
                "ci_method": str(r.get("ci_method", "")),
                "pvalue": float(r.get("pvalue", np.nan)),
                "method": str(r.get("method", "")),
            }
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
    parsed: list[tuple[str, tuple[str, ...]]] = []
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
    text = f"{x:.{digits}f}"
    return text[1:] if float(text) == 0 and text.startswith("-") else text  # never "-0.000"


def _pp(x, digits: int = 1) -> str:
    """A difference of fractions in percentage points: ``12.3``, ``−4.0``; never ``−0.0``."""
    if _isnan(x):
        return "–"
    v = round(100 * float(x), digits)
    return f"{v + 0.0:.{digits}f}".replace("-", "−") if v != 0 else f"{0:.{digits}f}"


def _pp_ci(est, lo, hi) -> str:
    """``12.3 [5.1, 19.4]`` in percentage points (the estimate alone without a CI)."""
    if _isnan(est):
        return "–"
    return _pp(est) + ("" if _isnan(lo) or _isnan(hi) else f" [{_pp(lo)}, {_pp(hi)}]")


def _int(x) -> str:
    return "–" if _isnan(x) else str(int(round(float(x))))


_NOT_COMPUTED = "not computed"


def _p_test(x) -> str:
    """A test's p-value; NaN means the test could not be computed, never "not significant"."""
    return _NOT_COMPUTED if _isnan(x) else _p(x)


def _p(x) -> str:
    if _isnan(x):
        return "–"
    x = float(x)
    return "< 0.001" if x < 0.001 else f"{x:.3f}"


def _ci(lo, hi) -> str:
    return "–" if _isnan(lo) or _isnan(hi) else f"[{float(lo):.3f}, {float(hi):.3f}]"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
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
_TEX_UNICODE = {
    "–": "--",
    "−": "$-$",
    "±": "$\\pm$",
    "Δ": "$\\Delta$",
    "×": "$\\times$",
    "≥": "$\\geq$",
    "≤": "$\\leq$",
    "α": "$\\alpha$",
    "σ": "$\\sigma$",
}


def latex_table(
    df: pd.DataFrame,
    *,
    caption: str,
    label: str,
    align: str | None = None,
    size: str = "small",
    wide: bool = False,
    notes: Iterable[str] = (),
    max_rows: int | None = None,
) -> str:
    """A booktabs ``table`` float holding ``df`` as text cells, ready for ``\\input``.

    Needs ``\\usepackage{booktabs,graphicx}`` in the document. Cell text is escaped for
    LaTeX; ``±`` becomes ``$\\pm$``. A table wider than the column (or page, for ``wide``)
    is scaled down to fit (``\\resizebox`` only when the natural width is larger), so it
    never runs into the margin of a two-column article.

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
    notes : iterable of str
        Lines set small under the table (in the last part).
    max_rows : int, optional
        Split a longer table into floats of at most this many rows, the later ones
        captioned "(continued)" under the same table number.

    Returns
    -------
    str

    Examples
    --------
    >>> print(latex_table(pd.DataFrame({"a": ["x_1"]}), caption="C", label="tab:c"))  # doctest: +ELLIPSIS
    \\begin{table}[tbp]
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
    rows = [" & ".join(_tex_cell(v) for v in row) + " \\\\" for row in df.itertuples(index=False)]
    step = max_rows if max_rows and max_rows > 0 else max(len(rows), 1)
    chunks = [rows[i : i + step] for i in range(0, len(rows), step)] or [[]]
    notes = [n for n in notes if n]
    out: list[str] = []
    for k, chunk in enumerate(chunks):
        if k == 0:
            head = [f"\\caption{{{_tex_cell(caption)}}}", f"\\label{{{label}}}"]
        else:  # the same table number, continued
            head = ["\\addtocounter{table}{-1}", f"\\caption{{(continued) {_tex_cell(_first_sentence(caption))}}}"]
        out += [
            f"\\begin{{{env}}}[tbp]",
            "\\centering",
            f"\\{size}",
            *(["\\setlength{\\tabcolsep}{3pt}"] if df.shape[1] > 6 else []),
            *head,
            # scaled down only when wider than the line (\\width is the natural width)
            "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
            f"\\begin{{tabular}}{{{align}}}",
            "\\toprule",
            " & ".join(_tex_cell(c) for c in df.columns) + " \\\\",
            "\\midrule",
            *chunk,
            "\\bottomrule",
            "\\end{tabular}}",
        ]
        if notes and k == len(chunks) - 1:
            out += ["\\par\\smallskip", "{\\scriptsize\\raggedright", *(_tex_cell(n) + "\\par" for n in notes), "}"]
        out += [f"\\end{{{env}}}", ""]
    return "\n".join(out)


def _first_sentence(text: str) -> str:
    head = re.split(r"(?<=[.;])\s", str(text), maxsplit=1)[0]
    return head.rstrip(".;") + "."


def _md_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(df.shape[1])) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


_NUMBER_LIKE = re.compile(r"^[\s\d.,±+\-–−<>\[\]/%]*$")


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


# =========================================================================== significance
#: The adjustment that applies in each family (``stats/tests.csv`` gives Holm and BH for all).
_FAMILY_ADJUSTMENT = {"confirmatory": ("p_holm", "Holm"), "exploratory": ("p_bh", "BH"), "saliency": ("p_holm", "Holm")}


def _text(x) -> str:
    return "" if _isnan(x) else str(x)


def _is_bg_gap(a: str, b: str) -> str:
    """The training variant when ``a`` vs ``b`` is its mixed_rand vs mixed_same, else ``""``."""
    ta, _, va = str(a).partition(":")
    tb, _, vb = str(b).partition(":")
    return ta if ta == tb and {va, vb} == {"mixed_rand", "mixed_same"} else ""


def _comparison_label(r) -> str:
    """``a vs b``, prefixed by the comparison's name (``BG-GAP (original)``) when it has one."""
    name = _text(getattr(r, "name", ""))
    if not name and _is_bg_gap(r.a, r.b):
        name = f"BG-GAP ({_is_bg_gap(r.a, r.b)})"
    return (f"{name}: " if name else "") + f"{r.a} vs {r.b}"


def _split_saliency_method(text: str) -> tuple[str, str]:
    """``"gradcam (predicted class)"`` -> ``("gradcam", "predicted")``."""
    m = re.match(r"^(.*?)\s*\((\w+) class\)$", str(text))
    return (m[1], m[2]) if m else (str(text), "")


#: Short names of the stats stage's standardised effect sizes, and what they are.
_EFFECT_SHORT = {
    "Cohen's d_z": "d_z",
    "matched-pairs rank-biserial r": "r_rb",
    "log conditional odds ratio log(c/b)": "log OR_c",
    "log odds ratio": "log OR",
}
_EFFECT_MEANING = {
    "Cohen's d_z": "Cohen's d_z, the mean of the per-patient differences over their SD",
    "matched-pairs rank-biserial r": "matched-pairs rank-biserial r (Kerby 2014)",
    "log conditional odds ratio log(c/b)": "log conditional odds ratio log(c/b) of the discordant cells",
    "log odds ratio": "log odds ratio of the GEE model (b against a)",
}


def _effect(value, name) -> str:
    """``0.85 d_z``; ``–`` when the test gives none."""
    if _isnan(value):
        return "–"
    text = f"{float(value):.2f}"
    text = "0.00" if float(text) == 0 else text.replace("-", "−")
    short = _EFFECT_SHORT.get(_text(name), _text(name))
    return f"{text} {short}".strip()


def significance_tables(tests: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    """The report's two significance tables from ``stats/tests.csv``, as text cells.

    The main table holds the primary test of every comparison (confirmatory, exploratory
    and saliency families), one row per test, estimates and CIs in percentage points, with
    p and the p adjusted within the test's family (Holm for the confirmatory and saliency
    families, Benjamini-Hochberg for the exploratory grid). A comparison that is both
    planned (confirmatory) and part of the exploratory grid is shown once, in the
    confirmatory family, with a note. The secondary table holds the sensitivity checks and
    the cell-level (McNemar) and fold-level tests, which are conditional on the trained
    models and the tested cells.

    Parameters
    ----------
    tests : DataFrame
        ``stats/tests.csv``.

    Returns
    -------
    main, secondary : DataFrame
        Text cells; the label columns (family, model, comparison and, when present,
        measure, saliency map and target class) tell every row apart.
    main_notes, secondary_notes : list of str
        Sentences to print under each table.

    Examples
    --------
    >>> t = pd.DataFrame({"family": ["confirmatory"], "role": ["primary"], "model": ["m"],
    ...     "a": ["original:mixed_rand"], "b": ["original:mixed_same"], "estimate": [-0.00001],
    ...     "ci_low": [-0.05], "ci_high": [0.05], "pvalue": [0.9], "p_holm": [0.9], "p_bh": [0.9],
    ...     "n_patients": [6], "method": ["paired t (patients)"]})
    >>> main, secondary, notes, _ = significance_tables(t)
    >>> main.iloc[0, 2:].tolist()  # doctest: +NORMALIZE_WHITESPACE
    ['BG-GAP (original): original:mixed_rand vs original:mixed_same', '0.0 [−5.0, 5.0]',
     'paired t (patients)', '6', '0.900', '0.900 (Holm)']
    """
    t = tests.copy()
    for c in (
        "role",
        "name",
        "measure",
        "saliency_method",
        "method",
        "mcnemar_b",
        "mcnemar_c",
        "n_cells",
        "n_patients",
        "p_holm",
        "p_bh",
        "ci_low",
        "ci_high",
        "pvalue",
    ):
        if c not in t.columns:
            t[c] = np.nan
    t["role"] = t["role"].map(lambda v: _text(v) or "primary")
    pair = t["model"].astype(str) + "|" + t["a"].astype(str) + "|" + t["b"].astype(str)
    planned = set(pair[t["family"].astype(str) == "confirmatory"])
    duplicate = (t["family"].astype(str) == "exploratory") & pair.isin(planned)
    n_conf = int(((t["family"].astype(str) == "confirmatory") & (t["role"] == "primary")).sum())
    main_notes: list[str] = []
    secondary_notes: list[str] = []
    for r in t[duplicate & (t["role"] == "primary")].itertuples(index=False):
        main_notes.append(
            f"{_comparison_label(r)} ({r.model}) is a planned (confirmatory) comparison and also part of the "
            f"exploratory grid (there p BH = {_p(r.p_bh)}); it is shown once, in the confirmatory family, where "
            f"Holm's adjustment over the {n_conf} confirmatory test{'s' if n_conf != 1 else ''} applies."
        )
    t = t[~duplicate]
    saliency = t["saliency_method"].map(_text)
    measures = t["measure"].map(lambda v: _text(v) or "accuracy").str.replace("_", " ")
    with_saliency = bool((saliency != "").any())
    with_measure = measures.nunique() > 1

    def labels(r, measure: str, sal: str) -> list[str]:
        out = [str(r.family), str(r.model), _comparison_label(r)]
        if with_measure:
            out.append(measure)
        if with_saliency:
            out += list(_split_saliency_method(sal)) if sal else ["", ""]
        return out

    head = ["family", "model", "comparison (a vs b)"] + (["measure"] if with_measure else [])
    head += ["saliency map", "target class"] if with_saliency else []
    primary = t["role"] == "primary"
    # standard error and standardised effect size, where the stats stage gives them
    with_se = "se" in t.columns and bool(np.isfinite(pd.to_numeric(t.loc[primary, "se"], errors="coerce")).any())
    with_effect = "effect_size" in t.columns and bool(
        np.isfinite(pd.to_numeric(t["effect_size"], errors="coerce")).any()
    )

    def extra(r, se: bool) -> list[str]:
        out = [_pp(getattr(r, "se", np.nan))] if se else []
        return out + (
            [_effect(getattr(r, "effect_size", np.nan), getattr(r, "effect_size_name", ""))] if with_effect else []
        )

    extra_head = (["SE (pp)"] if with_se else []) + (["effect size"] if with_effect else [])
    main_rows = []
    for r, m, s in zip(t[primary].itertuples(index=False), measures[primary], saliency[primary], strict=True):
        col, how = _FAMILY_ADJUSTMENT.get(str(r.family), ("p_holm", "Holm"))
        adj = getattr(r, col)
        main_rows.append(
            labels(r, m, s)
            + [
                _pp_ci(r.estimate, r.ci_low, r.ci_high),
                *extra(r, with_se),
                _text(r.method),
                _int(r.n_patients),
                _p_test(r.pvalue),
                _p_test(adj) if _isnan(adj) else f"{_p(adj)} ({how})",
            ]
        )
    main = pd.DataFrame(
        main_rows, columns=head + ["Δ = b − a, pp [95% CI]", *extra_head, "test", "patients", "p", "p adj."]
    )
    sec_rows = []
    for r, m, s in zip(t[~primary].itertuples(index=False), measures[~primary], saliency[~primary], strict=True):
        bc = "–" if _isnan(r.mcnemar_b) else f"{_int(r.mcnemar_b)}/{_int(r.mcnemar_c)}"
        sec_rows.append(
            labels(r, m, s)
            + [
                str(r.role),
                _text(r.method),
                _pp_ci(r.estimate, r.ci_low, r.ci_high),
                *extra(r, False),
                _p_test(r.pvalue),
                bc,
                _int(r.n_cells),
            ]
        )
    secondary = pd.DataFrame(
        sec_rows,
        columns=head
        + ["role", "test", "Δ, pp [95% CI]", *(["effect size"] if with_effect else []), "p", "McNemar b/c", "cells"],
    )
    if with_effect and "effect_size_name" in t.columns:
        for sel, notes in ((primary, main_notes), (~primary, secondary_notes)):
            shown = t[sel & np.isfinite(pd.to_numeric(t["effect_size"], errors="coerce"))]
            names = sorted({str(n) for n in shown["effect_size_name"] if _text(n)})
            if names:
                notes.append(
                    "Effect size: "
                    + "; ".join(f"{_EFFECT_SHORT.get(n, n)} = {_EFFECT_MEANING.get(n, n)}" for n in names)
                    + "."
                )
    for rows, notes in ((main, main_notes), (secondary, secondary_notes)):
        if len(rows) and (rows["p"] == _NOT_COMPUTED).any():
            notes.append(
                f"p {_NOT_COMPUTED}: the test could not be computed for these data (the row's note in "
                "stats/tests.csv says why, e.g. separation or no variation); it is not a negative result."
            )
    if len(secondary):
        secondary_notes.append(
            "These p are not adjusted and are conditional: cell-level tests (McNemar) treat the cells as "
            "independent and hold for these trained models and these cells only; fold-level tests depend on the "
            "split. Quote the patient-level primary tests of the main table for inference about patients."
        )
    return main, secondary, main_notes, secondary_notes
