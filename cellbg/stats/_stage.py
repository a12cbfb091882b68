"""The stats stage: read a run's predictions, test every planned comparison, write ``stats/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError
from cellbg.stats._common import _SAL_COLUMNS, NAN, _check_columns, _first_line
from cellbg.stats._core import (
    TestResult,
    _counts_table,
    adjust_pvalues,
    compare_conditions,
    mcnemar_test,
    paired_t_test,
)
from cellbg.stats._table import CodedPredictions, predictions_path

#: Columns of ``stats/tests.csv`` in order (the contract's columns first).
TESTS_COLUMNS = [
    "family", "role", "model", "comparison", "a", "b", "estimate", "ci_low", "ci_high",
    "ci_method", "statistic", "df", "pvalue", "p_holm", "p_bh", "method", "n_cells",
    "n_patients", "n_seeds", "mcnemar_b", "mcnemar_c",
    # extras
    "name", "measure", "scale", "saliency_method", "alpha", "n_resamples", "note", "p_bonferroni",
    "se", "effect_size", "effect_size_name",
]  # fmt: skip


# --------------------------------------------------------------------------- the stage
def _row(family: str, role: str, model: str, a: str, b: str, r: TestResult, **extra) -> dict:
    row = r.to_row()
    row.update(family=family, role=role, model=model, a=a, b=b, comparison=f"{a} vs {b}")
    row.setdefault("name", "")
    row.setdefault("measure", "accuracy")
    row.setdefault("saliency_method", "")
    row.update(extra)
    return row


def _saliency_rows(run_dir: Path, protocol, alpha: float) -> list[dict]:
    path = run_dir / "saliency.parquet"
    if not path.exists():
        return []
    try:
        sal = pd.read_parquet(path)
    except Exception as exc:
        raise CellbgError(f"cannot read {path}: {_first_line(exc)}") from None
    _check_columns(sal, _SAL_COLUMNS, str(path))
    sal = sal[np.isfinite(sal["background_share"].astype(float))]
    rows = []
    order = list(protocol.variants.train)
    # With saliency.target 'both' every cell has a map for the predicted and one for the true
    # class; they are separate analyses, never pooled (a correct cell would count twice). So
    # are the test variants the maps were computed on.
    if "target" not in sal.columns:
        sal = sal.assign(target="")
    if "test_variant" not in sal.columns:
        sal = sal.assign(test_variant=protocol.saliency.test_variants[0])
    tested = list(protocol.saliency.test_variants)
    sal = sal.assign(_order=sal["test_variant"].map({v: i for i, v in enumerate(tested)}).fillna(len(tested)))
    groups = sal.sort_values("_order", kind="stable").groupby(
        ["model", "_order", "test_variant", "method", "target"], sort=True
    )
    for (model, _, test_variant, method, target), sub in groups:
        present = [v for v in order if v in set(sub["train_variant"])]
        present += sorted(set(sub["train_variant"]) - set(present))
        if len(present) < 2:
            continue
        ref = present[0]
        per = sub.groupby(["train_variant", "patient_id"])["background_share"].mean().unstack("train_variant")
        for other in present[1:]:
            both = per[[ref, other]].dropna()
            a, b = f"{ref}:{test_variant}", f"{other}:{test_variant}"
            used = sub[sub["train_variant"].isin([ref, other]) & sub["patient_id"].isin(both.index)]
            sizes: dict[str, Any] = dict(
                n_cells=int(used["cell_id"].nunique()), n_patients=len(both), n_seeds=int(used["seed"].nunique())
            )
            if len(both) >= 2:
                r = paired_t_test(both[ref], both[other], alpha=alpha)
                r = r.replace(method="paired t (patients)", **sizes)
            else:
                note = f"needs at least 2 patients; got {len(both)}"
                r = TestResult("paired t (patients)", NAN, alpha=alpha, note=note, **sizes)
            rows.append(
                _row(
                    "saliency",
                    "primary",
                    str(model),
                    a,
                    b,
                    r.replace(scale="background share difference"),
                    measure="background_share",
                    saliency_method=f"{method} ({target} class)" if target else str(method),
                )
            )
    return rows


def run_stats(run_dir: str | Path) -> pd.DataFrame:
    """Test every planned comparison of a run; write ``<run>/stats/``.

    Reads the predictions lazily (``predictions.parquet``, a file or a folder of parquet files,
    else the ``predictions/`` folder; only the columns the tests need, reduced to counts per
    patient x seed x fold, see :class:`~cellbg.stats._table.CodedPredictions`), ``saliency.parquet``
    when present, and the run's resolved protocol (section ``stats``). Writes, atomically:

    - ``stats/tests.csv``: one row per test (columns :data:`TESTS_COLUMNS`). Families:
      ``confirmatory`` (the protocol's comparisons, for each model: primary test,
      sensitivity checks, secondary tests; Holm over the primary tests), ``exploratory``
      (every condition against the reference ``original:original``, and BG-GAP =
      ``mixed_same`` minus ``mixed_rand`` per training variant; primary test and McNemar;
      Benjamini-Hochberg), ``saliency`` (background share between training variants).
      ``p_holm`` and ``p_bh`` are adjusted within the family over its primary rows.
    - ``stats/accuracy.csv``: :func:`accuracy_table`.
    - ``stats/summary.md``: the primary results in words and tables.

    Returns
    -------
    pandas.DataFrame
        The tests table.
    """
    from cellbg._io import atomic_path, write_text_atomic
    from cellbg.protocol import load_run

    run_dir = Path(run_dir)
    protocol = load_run(run_dir)
    cfg = protocol.stats
    preds = CodedPredictions.from_path(predictions_path(run_dir))
    alpha = cfg.alpha
    rows: list[dict] = []
    have = preds.models()
    models = [m.key for m in protocol.models if m.key in have]
    models += sorted(set(have) - set(models))

    for model in models:
        for k, comp in enumerate(cfg.confirmatory or []):
            counts, n_cells = preds.paired_counts(model, comp.a, comp.b)
            seed = np.random.SeedSequence([cfg.seed, models.index(model), k])
            for role, r in compare_conditions(
                counts, primary=cfg.primary, alpha=alpha, n_resamples=cfg.bootstrap, seed=seed, n_cells=n_cells
            ):
                rows.append(_row("confirmatory", role, model, comp.a, comp.b, r))

    if cfg.exploratory:
        for model in models:
            conds = preds.conditions(model)
            ref = "original:original" if "original:original" in conds else conds[0]
            pairs = [(ref, c, "") for c in conds if c != ref]
            for train in sorted({c.split(":")[0] for c in conds}):
                same, rand = f"{train}:mixed_same", f"{train}:mixed_rand"
                if same in conds and rand in conds:
                    pairs.append((rand, same, f"BG-GAP ({train})"))
            for a, b, name in pairs:
                counts, n_cells = preds.paired_counts(model, a, b)
                ((role, r),) = compare_conditions(
                    counts, primary=cfg.primary, alpha=alpha, secondary=False, n_cells=n_cells
                )
                rows.append(_row("exploratory", role, model, a, b, r, name=name))
                mc = mcnemar_test(_counts_table(counts))
                mc = mc.replace(n_patients=r.n_patients, n_seeds=r.n_seeds, alpha=alpha)
                rows.append(_row("exploratory", "secondary", model, a, b, mc, name=name))

    rows += _saliency_rows(run_dir, protocol, alpha)
    table = pd.DataFrame(rows)
    for c in TESTS_COLUMNS:
        if c not in table.columns:
            table[c] = (
                np.nan
                if c not in ("note", "name", "measure", "saliency_method", "ci_method", "effect_size_name")
                else ""
            )
    for col in ("p_holm", "p_bh", "p_bonferroni"):
        table[col] = np.nan
    for fam in table["family"].unique() if len(table) else []:
        sel = (table["family"] == fam) & (table["role"] == "primary")
        for col, how in (("p_holm", "holm"), ("p_bh", "bh"), ("p_bonferroni", "bonferroni")):
            table.loc[sel, col] = adjust_pvalues(table.loc[sel, "pvalue"], how)
    table = table[TESTS_COLUMNS + [c for c in table.columns if c not in TESTS_COLUMNS]]

    acc = preds.accuracy()
    out_dir = run_dir / "stats"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "tests.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out_dir / "accuracy.csv") as tmp:
        acc.to_csv(tmp, index=False)
    write_text_atomic(out_dir / "summary.md", _summary_md(protocol, table, acc))
    return table


def _fmt(v, digits: int = 3, *, integer: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if integer and v == round(v):
            return str(int(v))
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
    return str(v)


def _md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        cells = (_fmt(v, integer=c == "df" or c.startswith(("n_", "mcnemar_"))) for c, v in zip(cols, row, strict=True))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _verdict(p: float, alpha: float, note: str = "") -> str:
    """ "significant" / "not significant" / "not computed (reason)": a NaN p is never a negative result."""
    if p is None or not np.isfinite(p):
        reason = str(note).split(";")[0].removeprefix("not computed: ") if isinstance(note, str) and note else ""
        return "not computed" + (f" ({reason})" if reason else "")
    return "significant" if p < alpha else "not significant"


def _summary_md(protocol, table: pd.DataFrame, acc: pd.DataFrame) -> str:
    cfg = protocol.stats
    level = f"{100 * (1 - cfg.alpha):g}%"
    primary_text = (
        "a paired t-test on per-patient accuracy differences (df = patients - 1)"
        if cfg.primary == "patient_t"
        else "GEE logistic regression clustered by patient (binomial counts per patient and condition, "
        "independence working correlation, bias-reduced covariance, t reference with patients - 1 df)"
    )
    parts = [
        f"# Statistics: {protocol.name}",
        "",
        "The unit of inference is the patient. The primary test averages correctness within each "
        "patient (over cells, seeds and folds, paired on seed and fold) and compares conditions "
        f"with {primary_text}. "
        "Estimates are condition B minus condition A. "
        f"Intervals are {level}. Holm adjusts the confirmatory family, Benjamini-Hochberg the "
        "exploratory grid (both, and Bonferroni, are given for every family). McNemar is cell-level and "
        "conditional on these trained models and these cells. A p-value shown as – was not computed "
        "(the row's note in tests.csv says why); it is not a negative result.",
        "",
    ]
    n_pat = int(table["n_patients"].max()) if len(table) else 0
    if n_pat >= 30:
        parts.append("Percentile patient bootstrap intervals are reported (>= 30 patients).")
    else:
        parts.append(
            f"Percentile bootstrap intervals are not reported: {n_pat} patients < 30; "
            "the studentized (bootstrap-t) patient cluster bootstrap is given instead."
        )
    parts.append("")
    cols = ["model", "comparison", "estimate", "ci_low", "ci_high", "statistic", "df", "pvalue", "p_holm", "p_bh",
            "n_patients"]  # fmt: skip
    for fam in ("confirmatory", "exploratory", "saliency"):
        sub = table[(table["family"] == fam) & (table["role"] == "primary")]
        if sub.empty:
            continue
        parts += [f"## {fam.capitalize()} (primary tests)", ""]
        show = sub[cols + (["name"] if fam == "exploratory" else ["saliency_method"] if fam == "saliency" else [])]
        parts += [_md_table(show), ""]
        if fam == "confirmatory":
            for r in sub.itertuples():
                verdict = _verdict(r.p_holm, cfg.alpha, r.note)
                ci = f"{level} CI {_fmt(r.ci_low)} to {_fmt(r.ci_high)}" if np.isfinite(r.ci_low) else "no CI computed"
                if np.isfinite(r.pvalue):
                    ps = f"p = {_fmt(r.pvalue)}, Holm p = {_fmt(r.p_holm)}: {verdict} at alpha {cfg.alpha}"
                else:
                    ps = f"p {verdict}"
                es = (
                    f", {r.effect_size_name} {_fmt(r.effect_size)}"
                    if isinstance(r.effect_size_name, str) and r.effect_size_name and np.isfinite(r.effect_size)
                    else ""
                )
                parts.append(
                    f"- {r.model}, {r.comparison} ({r.method}): {r.scale} {_fmt(r.estimate)} ({ci}{es}), {ps}."
                )
            parts.append("")
    others = table[(table["family"] == "confirmatory") & (table["role"] != "primary")]
    if not others.empty:
        parts += ["## Confirmatory: sensitivity and secondary tests", ""]
        ocols = ["model", "comparison", "role", "method", "estimate", "ci_low", "ci_high", "pvalue", "mcnemar_b",
                 "mcnemar_c"]  # fmt: skip
        parts += [_md_table(others[ocols]), ""]
    parts += ["## Accuracy (mean and SD over seeds)", ""]
    acols = ["model", "condition", "accuracy", "accuracy_sd", "balanced_accuracy", "n_cells", "n_patients", "n_seeds"]
    parts += [_md_table(acc[acols]), ""]
    return "\n".join(parts)
