"""Shared input checks and small helpers of :mod:`cellbg.stats` (no statistics here)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError

NAN = float("nan")

_PAIR_COLUMNS = ("cell_id", "patient_id", "label", "model", "train_variant", "test_variant", "seed", "fold", "correct")
_PRED_COLUMNS = _PAIR_COLUMNS + ("pred",)
_SAL_COLUMNS = ("cell_id", "patient_id", "model", "train_variant", "seed", "fold", "method", "background_share")


# --------------------------------------------------------------------------- helpers
def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise CellbgError(f"{name} must be 1-D; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CellbgError(f"{name} holds NaN or infinite values")
    return arr


def _correct_values(values, what: str, column: str = "correct") -> np.ndarray:
    """A correctness column as bool; NaN/None or a value other than 0/1 is an error naming the rows.

    A missing prediction is neither right nor wrong: counting it as either would move the
    accuracy, so every function that reads correctness refuses it (never ``astype(bool)``,
    which makes NaN True).
    """
    series = values if isinstance(values, pd.Series) else pd.Series(np.asarray(values).ravel())
    missing = series.isna().to_numpy()
    if missing.any():
        rows = series.index[missing]
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise CellbgError(
            f"{what}: column '{column}' is missing (NaN/None) in {len(rows)} row(s) (index {shown}); "
            "a missing prediction is neither right nor wrong: fix or drop those rows"
        )
    if series.dtype == bool:
        return series.to_numpy()
    try:
        num = series.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise CellbgError(
            f"{what}: column '{column}' must hold True/False (or 1/0); got dtype {series.dtype}"
        ) from None
    bad = (num != 0) & (num != 1)
    if bad.any():
        rows = series.index[bad]
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise CellbgError(
            f"{what}: column '{column}' must hold True/False (or 1/0); {len(rows)} row(s) hold other values "
            f"(index {shown}, e.g. {series[rows[0]]!r})"
        )
    return num.astype(bool)


def _tolerance(*arrays: np.ndarray) -> float:
    """Rounding tolerance of a difference of these values (16 ulps of the largest magnitude)."""
    scale = max((float(np.max(np.abs(a))) for a in arrays if np.size(a)), default=0.0)
    return 16 * np.finfo(float).eps * max(scale, 1.0)


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise CellbgError(f"alpha must be in (0, 1); got {alpha}")
    return float(alpha)


def _split_condition(condition: str) -> tuple[str, str]:
    if not isinstance(condition, str) or condition.count(":") != 1:
        raise CellbgError(f"a condition is 'train_variant:test_variant'; got {condition!r}")
    train, test = condition.split(":")
    return train, test


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CellbgError(f"{what} lacks columns {missing}; it has {list(df.columns)}")
