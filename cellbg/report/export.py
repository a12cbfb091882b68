"""A run's results as plain CSV: per-cell predictions (wide) and the tests table.

:func:`export_run` is what ``cellbg export RUN [--cells CSV] [--tests CSV]`` calls.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cellbg._checks import CellbgError
from cellbg.report.reading import _PRED_COLUMNS, _read_table
from cellbg.report.tables import _require_columns

#: The per-cell columns that lead the wide table, when the run has them.
_CELL_COLUMNS = ("cell_id", "image_id", "patient_id", "label", "fold")


def cell_predictions_wide(predictions: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per cell, two columns per condition: the predicted class and whether it is right.

    Parameters
    ----------
    predictions : DataFrame
        ``predictions.parquet`` (one row per cell × model × train variant × test variant ×
        seed × fold).
    cells : DataFrame, optional
        ``cells.parquet``; adds the image id and keeps the cell table's order.

    Returns
    -------
    DataFrame
        ``cell_id, image_id, patient_id, label, fold``, then ``pred|MODEL|TRAIN|TEST`` and
        ``correct|MODEL|TRAIN|TEST`` for every condition (with ``|sSEED`` appended when the
        run has several seeds), in the protocol's order of appearance. A cell a condition
        did not predict is empty there.

    Raises
    ------
    CellbgError
        A predictions table without its columns, or a cell predicted twice under one condition.

    Examples
    --------
    >>> p = pd.DataFrame({"cell_id": ["a", "a", "b", "b"], "patient_id": "p", "label": "x", "fold": 0,
    ...     "model": "m", "train_variant": "original", "test_variant": ["original", "only_fg"] * 2,
    ...     "seed": 0, "pred": ["x", "y", "x", "x"], "correct": [True, False, True, True]})
    >>> cell_predictions_wide(p).columns.tolist()  # doctest: +NORMALIZE_WHITESPACE
    ['cell_id', 'patient_id', 'label', 'fold', 'pred|m|original|original', 'correct|m|original|original',
     'pred|m|original|only_fg', 'correct|m|original|only_fg']
    """
    _require_columns(predictions, _PRED_COLUMNS + ("pred",), what="predictions")
    p = predictions.copy()
    several_seeds = p["seed"].nunique() > 1
    p["condition"] = p["model"].astype(str) + "|" + p["train_variant"].astype(str) + "|" + p["test_variant"].astype(str)
    if several_seeds:
        p["condition"] += "|s" + p["seed"].astype(str)
    twice = p.duplicated(["cell_id", "condition"], keep=False)
    if twice.any():
        r = p[twice].iloc[0]
        raise CellbgError(
            f"predictions hold cell {r['cell_id']} twice under {r['condition']} (seed {r['seed']}); "
            "a cell is tested in one fold per seed"
        )
    order = list(dict.fromkeys(p["condition"]))
    pred = p.pivot(index="cell_id", columns="condition", values="pred")
    right = p.pivot(index="cell_id", columns="condition", values="correct")
    wide = pd.concat({"pred": pred, "correct": right}, axis=1)
    wide.columns = [f"{kind}|{cond}" for kind, cond in wide.columns]
    wide = wide[[f"{kind}|{c}" for c in order for kind in ("pred", "correct")]]
    lead = [c for c in _CELL_COLUMNS if c in p.columns and c != "cell_id"]
    per_cell = p.drop_duplicates("cell_id").set_index("cell_id")[lead]
    if several_seeds and "fold" in lead and p.groupby("cell_id")["fold"].nunique().max() > 1:
        per_cell = per_cell.drop(columns="fold")  # the fold differs by seed; it is in the predictions
    if cells is not None and "cell_id" in cells.columns:
        extra = [c for c in _CELL_COLUMNS if c in cells.columns and c not in per_cell.columns and c != "cell_id"]
        per_cell = per_cell.join(cells.set_index("cell_id")[extra], how="left")
        ordered = [c for c in cells["cell_id"] if c in per_cell.index]
        per_cell = per_cell.loc[ordered + [c for c in per_cell.index if c not in set(ordered)]]
    per_cell = per_cell[[c for c in _CELL_COLUMNS if c in per_cell.columns]]
    out = per_cell.join(wide, how="left").reset_index()
    return out.rename(columns={"index": "cell_id"})


def export_run(run_dir: str | Path, *, cells: str | Path | None = None, tests: str | Path | None = None) -> dict:
    """Write a run's per-cell predictions (wide) and its tests table as CSV files.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    cells : str or Path, optional
        Where to write :func:`cell_predictions_wide` of ``predictions.parquet``.
    tests : str or Path, optional
        Where to write ``stats/tests.csv`` (every test, every column).

    Returns
    -------
    dict
        ``{"cells": (path, rows), "tests": (path, rows)}`` for what was written.

    Raises
    ------
    CellbgError
        Not a run folder, or the table asked for is missing (with the command that makes it).
    """
    from cellbg._io import atomic_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CellbgError(f"run folder not found: {run_dir}")
    if cells is None and tests is None:
        raise CellbgError("nothing to export: give --cells CSV and/or --tests CSV")
    written = {}
    if cells is not None:
        preds = _read_table(run_dir / "predictions.parquet", "predictions")
        if preds is None:
            raise CellbgError(f"{run_dir} has no predictions.parquet; run `cellbg train` (or `cellbg run`) first")
        table = cell_predictions_wide(preds, _read_table(run_dir / "cells.parquet", "cell table"))
        with atomic_path(Path(cells)) as tmp:
            table.to_csv(tmp, index=False)
        written["cells"] = (Path(cells), len(table))
    if tests is not None:
        t = _read_table(run_dir / "stats" / "tests.csv", "stats table")
        if t is None:
            raise CellbgError(f"{run_dir} has no stats/tests.csv; run `cellbg stats {run_dir}` first")
        with atomic_path(Path(tests)) as tmp:
            t.to_csv(tmp, index=False)
        written["tests"] = (Path(tests), len(t))
    return written
