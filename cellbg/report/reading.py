"""Reading a run folder: the resolved protocol, predictions, tests and the other stages' outputs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError
from cellbg.report.tables import _require_columns

if TYPE_CHECKING:
    from cellbg.protocol import Protocol

_PRED_COLUMNS = ("model", "train_variant", "test_variant", "seed", "fold", "cell_id", "patient_id", "label", "correct")
_TEST_COLUMNS = (
    "family",
    "model",
    "comparison",
    "a",
    "b",
    "estimate",
    "ci_low",
    "ci_high",
    "ci_method",
    "statistic",
    "df",
    "pvalue",
    "p_holm",
    "p_bh",
    "method",
    "n_cells",
    "n_patients",
    "n_seeds",
    "mcnemar_b",
    "mcnemar_c",
)


@dataclass
class _Run:
    run_dir: Path
    protocol: Protocol
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


def _read_predictions(path: Path) -> pd.DataFrame | None:
    """The predictions table with only the columns the report uses (``_PRED_COLUMNS``).

    Class probabilities, image ids, partners and backgrounds stay on disk: at ten million
    rows they are most of the table's memory and no report section reads them.
    """
    if not path.exists():
        return None
    try:
        import pyarrow.parquet as pq

        names = set(pq.read_schema(path).names)
        return pd.read_parquet(path, columns=[c for c in _PRED_COLUMNS if c in names])
    except Exception as exc:  # a damaged file is a user-facing problem, said in one line
        raise CellbgError(f"cannot read predictions {path}: {type(exc).__name__}: {exc}") from None


def _read_run(run_dir: Path) -> _Run:
    import json

    from cellbg.protocol import load_run

    run = _Run(run_dir=run_dir, protocol=load_run(run_dir))
    run.predictions = _read_predictions(run_dir / "predictions.parquet")
    if run.predictions is not None:
        _require_columns(run.predictions, _PRED_COLUMNS, what=str(run_dir / "predictions.parquet"))
    run.tests = _read_table(run_dir / "stats" / "tests.csv", "stats table")
    if run.tests is not None:
        _require_columns(
            run.tests, ("family", "model", "comparison", "estimate"), what=str(run_dir / "stats/tests.csv")
        )
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
    for name in (
        "segmentation/evaluation.csv",
        "segmentation/evaluation.parquet",
        "segmentation_evaluation.csv",
        "segmentation/eval.csv",
    ):
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
