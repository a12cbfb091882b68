"""The confirmatory result of a run in one sentence, for the end of ``cellbg run`` and the top
of the report.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellbg.report.figures import comparison_words
from cellbg.report.tables import _is_bg_gap, _isnan, _p, _pp


def confirmatory_sentence(tests: pd.DataFrame, *, alpha: float = 0.05) -> str | None:
    """The primary confirmatory tests of ``stats/tests.csv`` in one sentence.

    Parameters
    ----------
    tests : DataFrame
        ``stats/tests.csv``.
    alpha : float
        The protocol's significance level (for the verdict on the Holm-adjusted p).

    Returns
    -------
    str or None
        None when the run has no confirmatory test.

    Examples
    --------
    >>> t = pd.DataFrame({"family": ["confirmatory"], "role": ["primary"], "model": ["resnet"],
    ...     "a": ["original:mixed_rand"], "b": ["original:mixed_same"], "estimate": [0.254],
    ...     "ci_low": [0.125], "ci_high": [0.383], "pvalue": [0.004], "p_holm": [0.004],
    ...     "method": ["paired t (patients)"], "n_patients": [6]})
    >>> print(confirmatory_sentence(t))  # doctest: +NORMALIZE_WHITESPACE
    Confirmatory result: resnet, BG-GAP, trained on original: tested on mixed_same − mixed_rand,
    25.4 percentage points (95% CI 12.5 to 38.3), p = 0.004, Holm p = 0.004
    (paired t (patients), 6 patients): significant at alpha = 0.05.
    """
    if tests is None or tests.empty or "family" not in tests.columns:
        return None
    sel = tests["family"].astype(str) == "confirmatory"
    if "role" in tests.columns:
        sel &= tests["role"].astype(str) == "primary"
    rows = tests[sel]
    if rows.empty:
        return None
    parts = []
    for r in rows.itertuples(index=False):
        label = comparison_words(r.a, r.b, "BG-GAP" if _is_bg_gap(r.a, r.b) else "")
        unit = "percentage points"
        if _isnan(r.pvalue):
            verdict = "not computed"
        else:
            verdict = ("significant" if float(r.p_holm) < alpha else "not significant") + f" at alpha = {alpha:g}"
        ci = "" if _isnan(r.ci_low) else f" (95% CI {_pp(r.ci_low)} to {_pp(r.ci_high)})"
        n = getattr(r, "n_patients", float("nan"))
        how = f" ({r.method}" + ("" if _isnan(n) else f", {int(n)} patients") + ")"
        parts.append(
            f"{r.model}, {label}, {_pp(r.estimate)} {unit}{ci}, {_p_is('p', r.pvalue)}, "
            f"{_p_is('Holm p', r.p_holm)}{how}: {verdict}"
        )
    head = "Confirmatory result: " if len(parts) == 1 else "Confirmatory results: "
    return head + "; ".join(parts) + "."


def run_headline(run_dir: str | Path) -> str | None:
    """:func:`confirmatory_sentence` of a run folder's ``stats/tests.csv`` (None without one)."""
    path = Path(run_dir) / "stats" / "tests.csv"
    if not path.exists():
        return None
    try:
        tests = pd.read_csv(path)
        from cellbg.protocol import load_run

        alpha = load_run(Path(run_dir)).stats.alpha
    except Exception:  # noqa: BLE001 - a headline is a courtesy; the report says the rest
        return None
    return confirmatory_sentence(tests, alpha=alpha)


def _p_is(name: str, p) -> str:
    """``p = 0.034`` or ``p < 0.001`` (never ``p = < 0.001``)."""
    text = _p(p)
    return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"
