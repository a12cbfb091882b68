"""The detection study's tables and tests, from its finished jobs (no torch).

:func:`analyze_detection` reads every finished job of the run's protocol and writes
``<run>/detect/``:

``losses.csv``
    per job and epoch: the four loss parts and their total, training and validation;
``ap.csv``
    per job, test variant and class: AP@0.5 and AP@0.5:0.95 (COCO definition, pycocotools);
``recall.csv``
    per job, test variant, class and patient: target boxes, boxes found, recall;
``detections.parquet``
    every detected box of every job;
``tests.csv``
    the paired tests (:mod:`cellbg.stats`), one row each.

Two families of tests, each Holm-corrected over its rows:

``annotation``
    trained with the correlated class annotated vs without, on the original test images:
    per target class, AP@0.5 and AP@0.5:0.95 paired by (seed, fold), and recall paired by
    patient (each patient's recall averaged over seeds; a patient is tested once per seed);
``reliance``
    the same detector on the original test images vs with the correlated structure removed
    (``no_correlated``), per training condition and target class: recall paired by patient
    and AP@0.5 paired by (seed, fold). A drop in recall says the detector finds the class
    partly through the structure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError
from cellbg._io import write_parquet_atomic, write_text_atomic
from cellbg.detect.plan import DONE, detect_dir, detect_job_key, detection_fields, fields_digest, plan_detect_jobs

__all__ = ["analyze_detection", "patient_recall", "detection_tests", "TESTS_COLUMNS"]

TESTS_COLUMNS = [
    "family", "condition", "class", "measure", "a", "b", "estimate", "ci_low", "ci_high", "statistic",
    "df", "pvalue", "p_holm", "method", "unit", "n_units", "n_patients", "n_seeds", "mean_a", "mean_b", "note",
]  # fmt: skip


def patient_recall(truth: pd.DataFrame) -> pd.DataFrame:
    """Recall per job, test variant, class and patient from the per-box table.

    Parameters
    ----------
    truth : DataFrame
        One row per target box and test variant (``truth.parquet`` of the jobs): ``condition,
        seed, fold, test_variant, patient_id, class, found, found_any_class``.

    Returns
    -------
    DataFrame
        ``condition, seed, fold, test_variant, class, patient_id, n_boxes, n_found, recall,
        recall_any_class``.

    Examples
    --------
    >>> t = pd.DataFrame({"condition": "with", "seed": 0, "fold": 0, "test_variant": "original",
    ...                   "class": "a", "patient_id": ["p", "p", "q"], "found": [True, False, True],
    ...                   "found_any_class": [True, True, True]})
    >>> patient_recall(t)["recall"].tolist()
    [0.5, 1.0]
    """
    keys = ["condition", "seed", "fold", "test_variant", "class", "patient_id"]
    g = truth.groupby(keys, sort=True)
    out = g.agg(n_boxes=("found", "size"), n_found=("found", "sum"), any_found=("found_any_class", "sum"))
    out["recall"] = out["n_found"] / out["n_boxes"]
    out["recall_any_class"] = out.pop("any_found") / out["n_boxes"]
    return out.reset_index()


def _row(family: str, condition: str, cls: str, measure: str, a: str, b: str, r, unit: str, **extra) -> dict:
    return {
        "family": family,
        "condition": condition,
        "class": cls,
        "measure": measure,
        "a": a,
        "b": b,
        "estimate": r.estimate,
        "ci_low": r.ci_low,
        "ci_high": r.ci_high,
        "statistic": r.statistic,
        "df": r.df,
        "pvalue": r.pvalue,
        "method": r.method,
        "unit": unit,
        "note": r.note,
        **extra,
    }


def _paired(x: pd.Series, y: pd.Series, alpha: float):
    """Paired t-test of y - x over the units both have (cellbg.stats), or None with fewer than 2."""
    from cellbg.stats import paired_t_test

    both = pd.concat([x.rename("x"), y.rename("y")], axis=1).dropna()
    if len(both) < 2:
        return None, both
    return paired_t_test(both["x"].to_numpy(float), both["y"].to_numpy(float), alpha=alpha), both


def _add(rows: list, family, condition, cls, measure, a, b, x, y, unit, alpha, n_seeds):
    from cellbg.stats import TestResult

    r, both = _paired(x, y, alpha)
    extra = {
        "n_units": len(both),
        "n_seeds": n_seeds,
        "n_patients": len(both) if unit == "patient" else math.nan,
        "mean_a": float(both["x"].mean()) if len(both) else math.nan,
        "mean_b": float(both["y"].mean()) if len(both) else math.nan,
    }
    if r is None:
        r = TestResult("paired t", math.nan, note=f"fewer than 2 paired {unit}s; no test")
    rows.append(_row(family, condition, cls, measure, a, b, r, unit, **extra))


def detection_tests(ap: pd.DataFrame, recall: pd.DataFrame, *, targets: list[str], alpha: float = 0.05) -> pd.DataFrame:
    """The annotation and reliance tests (see the module docstring), Holm-corrected per family.

    Parameters
    ----------
    ap : DataFrame
        ``condition, seed, fold, test_variant, class, ap50, ap``.
    recall : DataFrame
        :func:`patient_recall`.
    targets : list of str
        The target classes tested.
    alpha : float, optional

    Returns
    -------
    DataFrame
        :data:`TESTS_COLUMNS`; ``estimate`` is b minus a.
    """
    from cellbg.stats import adjust_pvalues

    rows: list[dict] = []
    n_seeds = int(ap["seed"].nunique()) if len(ap) else 0
    conds = list(dict.fromkeys(ap["condition"])) if len(ap) else []

    def by_job(cond, variant, cls, measure):
        sel = ap[(ap["condition"] == cond) & (ap["test_variant"] == variant) & (ap["class"] == cls)]
        return sel.set_index(["seed", "fold"])[measure]

    def by_patient(cond, variant, cls):
        sel = recall[(recall["condition"] == cond) & (recall["test_variant"] == variant) & (recall["class"] == cls)]
        return sel.groupby("patient_id")["recall"].mean()

    for cls in targets:
        if {"with", "without"} <= set(conds):
            for measure in ("ap50", "ap"):
                _add(
                    rows,
                    "annotation",
                    "with vs without",
                    cls,
                    measure,
                    "without",
                    "with",
                    by_job("without", "original", cls, measure),
                    by_job("with", "original", cls, measure),
                    "seed x fold",
                    alpha,
                    n_seeds,
                )
            _add(
                rows,
                "annotation",
                "with vs without",
                cls,
                "recall",
                "without",
                "with",
                by_patient("without", "original", cls),
                by_patient("with", "original", cls),
                "patient",
                alpha,
                n_seeds,
            )
        for cond in conds:
            if not (ap["test_variant"] == "no_correlated").any():
                continue
            _add(
                rows,
                "reliance",
                cond,
                cls,
                "recall",
                "original",
                "no_correlated",
                by_patient(cond, "original", cls),
                by_patient(cond, "no_correlated", cls),
                "patient",
                alpha,
                n_seeds,
            )
            _add(
                rows,
                "reliance",
                cond,
                cls,
                "ap50",
                "original",
                "no_correlated",
                by_job(cond, "original", cls, "ap50"),
                by_job(cond, "no_correlated", cls, "ap50"),
                "seed x fold",
                alpha,
                n_seeds,
            )
    table = pd.DataFrame(rows, columns=[c for c in TESTS_COLUMNS if c != "p_holm"])
    table["p_holm"] = np.nan
    for _, idx in table.groupby("family").groups.items():
        table.loc[idx, "p_holm"] = adjust_pvalues(table.loc[idx, "pvalue"].to_numpy(float), "holm")
    return table[TESTS_COLUMNS]


def analyze_detection(run_dir: str | Path, *, protocol=None) -> pd.DataFrame:
    """Collect the finished detection jobs of a run; write the tables and tests of ``<run>/detect/``.

    Parameters
    ----------
    run_dir : path
        The run folder (its ``protocol.resolved.yaml`` names the jobs).
    protocol : Protocol, optional
        Used instead of the run's resolved protocol.

    Returns
    -------
    DataFrame
        The tests (``tests.csv``).

    Raises
    ------
    CellbgError
        When some detection jobs are not finished (their number and the first one).
    """
    run_dir = Path(run_dir)
    if protocol is None:
        from cellbg.protocol import load_run

        protocol = load_run(run_dir)
    fields = detection_fields(protocol)
    fhash = fields_digest(fields)
    out = detect_dir(protocol)
    frames: dict[str, list] = {"history": [], "metrics": [], "truth": [], "detections": []}
    missing = []
    for spec in plan_detect_jobs(protocol):
        job = out / "jobs" / detect_job_key(protocol, spec, fhash)
        if not (job / DONE).exists():
            missing.append(spec)
            continue
        frames["history"].append(pd.read_csv(job / "history.csv"))
        frames["metrics"].append(pd.read_csv(job / "metrics.csv"))
        frames["truth"].append(pd.read_parquet(job / "truth.parquet"))
        frames["detections"].append(pd.read_parquet(job / "detections.parquet"))
    if missing:
        raise CellbgError(
            f"{len(missing)} detection job(s) not finished in {run_dir}, e.g. {missing[0].name}; "
            "run 'cellbg detect' first"
        )
    losses = pd.concat(frames["history"], ignore_index=True)
    ap = pd.concat(frames["metrics"], ignore_index=True)
    truth = pd.concat(frames["truth"], ignore_index=True)
    recall = patient_recall(truth)
    targets = protocol.detection.targets or sorted(fields["label"].unique())
    tests = detection_tests(ap, recall, targets=list(targets), alpha=protocol.stats.alpha)
    write_text_atomic(out / "losses.csv", losses.to_csv(index=False))
    write_text_atomic(out / "ap.csv", ap.to_csv(index=False))
    write_text_atomic(out / "recall.csv", recall.to_csv(index=False))
    write_parquet_atomic(pd.concat(frames["detections"], ignore_index=True), out / "detections.parquet")
    write_text_atomic(out / "tests.csv", tests.to_csv(index=False))
    return tests
