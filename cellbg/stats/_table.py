"""The predictions table, read lazily and reduced to counts.

A study's predictions table has one row per cell x model x train variant x test variant x
seed x fold: ten million rows for a cohort of 40k cells under ``protocols/sezary.yaml``.
Every statistic ``cellbg stats`` reports is a function of counts per patient x seed x fold
(and, for the accuracy table, per seed x class), so the table is read once, column by column
(pyarrow dataset, only the columns the tests need, strings as dictionary codes), and reduced
to integer codes; each comparison then costs one pass over its cells' codes and everything
after that grows with patients x conditions, not with rows.

The table may be one parquet file or a folder of parquet files (one per prediction job).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, did_you_mean, look_up_option
from cellbg.stats._common import _PAIR_COLUMNS, _check_columns, _correct_values, _first_line, _split_condition

#: Columns kept as codes (strings or any hashable values in the file).
_KEY_COLUMNS = ("model", "train_variant", "test_variant", "cell_id", "patient_id", "label")
#: Integer columns.
_INT_COLUMNS = ("seed", "fold")
#: Combined keys are counted with ``np.bincount`` up to this many bins, else hashed.
_MAX_BINS = 50_000_000


def _missing_error(what: str, column: str, mask: np.ndarray) -> CellbgError:
    rows = np.flatnonzero(mask)
    shown = ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")
    return CellbgError(f"{what}: column '{column}' is missing (null/NaN) in {rows.size} row(s) (row {shown})")


def _sorted_codes(codes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-number codes so that code order is the sorted order of their labels."""
    order = np.argsort(labels, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank[codes].astype(np.int32 if order.size < 2**31 else np.int64), labels[order]


def _int_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of integer values in sorted order: a lookup table when their range is small, else hashing."""
    if values.dtype.kind in "iu" and values.size:
        lo, hi = int(values.min()), int(values.max())
        if hi - lo < 1_000_000:
            seen = np.bincount(values - lo, minlength=hi - lo + 1) > 0
            lookup = np.cumsum(seen) - 1
            return lookup[values - lo].astype(np.int32), np.flatnonzero(seen) + lo
    code, uniq = pd.factorize(values, sort=True)
    return code.astype(np.int32), np.asarray(uniq)


class _StringCoder:
    """Global integer codes for the values of an arrow column read batch by batch.

    Parquet gives every row group (and every file) its own dictionary. Identical
    dictionaries (the same cells in the same order under every condition) are recognised by
    a memory compare and mapped once; only a new dictionary's entries are looked up.
    """

    def __init__(self) -> None:
        self._code: dict = {}
        self._cache: dict = {}

    def codes(self, arr) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if not pa.types.is_dictionary(arr.type):
            arr = pc.dictionary_encode(arr)
        d = arr.dictionary
        key = (len(d), d[0].as_py() if len(d) else None, d[len(d) - 1].as_py() if len(d) else None)
        mapping = next((m for known, m in self._cache.get(key, ()) if known.equals(d)), None)
        if mapping is None:
            values = d.cast(pa.string()).to_numpy(zero_copy_only=False)
            code = self._code
            mapping = np.fromiter((code.setdefault(v, len(code)) for v in values), dtype=np.int64, count=len(values))
            self._cache.setdefault(key, []).append((d, mapping))
        return mapping[arr.indices.to_numpy(zero_copy_only=False)].astype(np.int32)

    def labels(self) -> np.ndarray:
        out = np.empty(len(self._code), dtype=object)
        out[list(self._code.values())] = list(self._code.keys())
        return out


def _distinct_per_group(group: np.ndarray, value: np.ndarray, n_groups: int, n_values: int) -> np.ndarray:
    """Number of distinct ``value`` per ``group`` (both integer codes)."""
    if n_groups * n_values <= _MAX_BINS:
        seen = np.bincount(group.astype(np.int64) * n_values + value, minlength=n_groups * n_values)
        return (seen.reshape(n_groups, n_values) > 0).sum(1)
    pairs = pd.unique(group.astype(np.int64) * n_values + value)
    return np.bincount(pairs // n_values, minlength=n_groups)


@dataclass
class CodedPredictions:
    """The predictions table as integer codes: ``codes[c]`` indexes ``labels[c]`` (sorted).

    Build one with :meth:`from_path` (lazy, column-projected read of a parquet file or a
    folder of parquet files) or :meth:`from_frame`.
    """

    codes: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    correct: np.ndarray
    source: str = "predictions"
    _units: dict | None = field(default=None, repr=False)

    @property
    def n_rows(self) -> int:
        return int(self.correct.size)

    def card(self, column: str) -> int:
        return int(self.labels[column].size)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_frame(cls, predictions: pd.DataFrame, *, what: str = "predictions") -> CodedPredictions:
        """Codes of an in-memory predictions table (the contract's columns)."""
        _check_columns(predictions, _PAIR_COLUMNS, what)
        codes, labels = {}, {}
        for c in _KEY_COLUMNS + _INT_COLUMNS:
            values = predictions[c]
            missing = values.isna().to_numpy()
            if missing.any():
                raise _missing_error(what, c, missing)
            code, uniq = pd.factorize(values, sort=True)
            codes[c], labels[c] = code.astype(np.int32), np.asarray(uniq)
        correct = _correct_values(predictions["correct"], what)
        return cls(codes, labels, correct, what)

    @classmethod
    def from_path(cls, path: str | Path) -> CodedPredictions:
        """Read a parquet file or a folder of parquet files lazily: only the needed columns,
        strings as dictionary codes (never one Python string per row)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        path = Path(path)
        what = str(path)
        try:
            fmt = ds.ParquetFileFormat(read_options=ds.ParquetReadOptions(dictionary_columns=list(_KEY_COLUMNS)))
            dataset = ds.dataset(str(path), format=fmt)
            names = set(dataset.schema.names)
            missing = [c for c in _PAIR_COLUMNS if c not in names]
            if missing:
                raise CellbgError(f"{what} lacks columns {missing}; it has {sorted(names)}")
            coders = {c: _StringCoder() for c in _KEY_COLUMNS}
            parts: dict[str, list] = {c: [] for c in _PAIR_COLUMNS}
            offset = 0
            # Batch by batch, so only integer codes accumulate (never the decoded strings).
            for batch in dataset.to_batches(
                columns=list(_PAIR_COLUMNS),
                batch_size=1 << 17,
                use_threads=False,
                batch_readahead=0,
                fragment_readahead=0,
            ):
                for c in _PAIR_COLUMNS:
                    arr = batch.column(c)
                    if arr.null_count and c != "correct":
                        raise _missing_error(
                            what, c, np.r_[np.zeros(offset, bool), pc.is_null(arr).to_numpy(zero_copy_only=False)]
                        )
                    if c in coders:
                        parts[c].append(coders[c].codes(arr))
                    elif c == "correct" and (arr.null_count or not pa.types.is_boolean(arr.type)):
                        series = pd.Series(arr.to_pandas()).set_axis(pd.RangeIndex(offset, offset + len(arr)))
                        parts[c].append(_correct_values(series, what))
                    else:
                        parts[c].append(arr.to_numpy(zero_copy_only=False))
                offset += batch.num_rows
        except CellbgError:
            raise
        except Exception as exc:  # pyarrow raises many types for a damaged file
            raise CellbgError(f"cannot read {what}: {_first_line(exc)}") from None
        if offset == 0:
            raise CellbgError(f"{what} holds no rows")
        codes, labels = {}, {}
        for c in _KEY_COLUMNS:
            codes[c], labels[c] = _sorted_codes(np.concatenate(parts.pop(c)), coders[c].labels())
        for c in _INT_COLUMNS:
            codes[c], labels[c] = _int_codes(np.concatenate(parts.pop(c)))
        correct = np.concatenate(parts.pop("correct")).astype(bool)
        return cls(codes, labels, correct, what)

    # ------------------------------------------------------------------ units: model x cell x seed x fold
    def _build_units(self) -> dict:
        """One unit per model x cell x seed x fold; a matrix unit x condition of correctness."""
        if self._units is not None:
            return self._units
        c = self.codes
        ncell, nseed, nfold = self.card("cell_id"), self.card("seed"), self.card("fold")
        # A unit is model x cell x seed (x fold). When a cell has one fold per seed (every split
        # cellbg makes) the unit code is the dense index model x cell x seed, no hashing.
        dense = self.card("model") * ncell * nseed
        unit = (c["model"].astype(np.int64) * ncell + c["cell_id"]) * nseed + c["seed"]
        fold_u = np.full(dense, -1, dtype=np.int64) if dense <= _MAX_BINS else None
        if fold_u is not None:
            fold_u[unit] = c["fold"]
        if fold_u is not None and np.array_equal(fold_u[unit], c["fold"]):
            uniq = np.arange(dense)
            fold_u = np.maximum(fold_u, 0)
        else:  # general case: hash model x cell x seed x fold
            unit, uniq = pd.factorize(unit * nfold + c["fold"])
            fold_u = uniq % nfold
            uniq = uniq // nfold
        n_units = uniq.size
        seed_u = uniq % nseed
        rest = uniq // nseed
        cell_u = rest % ncell
        model_u = rest // ncell
        ntest = self.card("test_variant")
        nconds = self.card("train_variant") * ntest
        cond = c["train_variant"].astype(np.int64) * ntest + c["test_variant"]
        flat = unit * nconds + cond
        if n_units * nconds <= _MAX_BINS:
            dup = np.bincount(flat, minlength=n_units * nconds) > 1
            first_dup = np.flatnonzero(dup[flat])[:1]
        else:
            first_dup = np.flatnonzero(pd.Series(flat).duplicated().to_numpy())[:1]
        if first_dup.size:
            i = int(first_dup[0])
            model = self.labels["model"][c["model"][i]]
            train = self.labels["train_variant"][c["train_variant"][i]]
            cond_label = f"{train}:{self.labels['test_variant'][c['test_variant'][i]]}"
            dup_key = [
                self.labels["cell_id"][c["cell_id"][i]],
                self.labels["seed"][c["seed"][i]],
                self.labels["fold"][c["fold"][i]],
            ]
            raise CellbgError(
                f"predictions: condition {cond_label} of model '{model}' has duplicate rows for "
                f"cell/seed/fold {dup_key}"
            )
        matrix = np.full(n_units * nconds, -1, dtype=np.int8)
        matrix[flat] = self.correct
        del flat
        patient_u = np.zeros(n_units, dtype=np.int64)
        patient_u[unit] = c["patient_id"]
        bad = np.flatnonzero(patient_u[unit] != c["patient_id"])[:1]
        if bad.size:
            cell = self.labels["cell_id"][c["cell_id"][bad[0]]]
            raise CellbgError(f"{self.source}: cell {cell!r} has more than one patient_id")
        label_u = np.zeros(n_units, dtype=np.int64)
        label_u[unit] = c["label"]
        present = (
            np.bincount(c["model"].astype(np.int64) * nconds + cond, minlength=self.card("model") * nconds).reshape(
                self.card("model"), nconds
            )
            > 0
        )
        order = np.argsort(model_u, kind="stable")
        bounds = np.searchsorted(model_u[order], np.arange(self.card("model") + 1))
        self._units = {
            "matrix": matrix.reshape(n_units, nconds),
            "model": model_u,
            "cell": cell_u,
            "seed": seed_u,
            "fold": fold_u,
            "patient": patient_u,
            "label": label_u,
            "present": present,
            "ntest": ntest,
            "of_model": [order[bounds[m] : bounds[m + 1]] for m in range(self.card("model"))],
        }
        return self._units

    # ------------------------------------------------------------------ queries
    def models(self) -> list[str]:
        return [str(m) for m in self.labels["model"]]

    def conditions(self, model: str) -> list[str]:
        """The conditions ``train:test`` with predictions for ``model``, sorted."""
        u = self._build_units()
        m = self._model_code(model)
        ntest = u["ntest"]
        return sorted(
            f"{self.labels['train_variant'][k // ntest]}:{self.labels['test_variant'][k % ntest]}"
            for k in np.flatnonzero(u["present"][m])
        )

    def _model_code(self, model: str) -> int:
        look_up_option(str(model), self.models(), what="model")
        return self.models().index(str(model))

    def _condition_code(self, model: str, condition: str) -> int:
        train, test = _split_condition(condition)
        u = self._build_units()
        m = self._model_code(model)
        trains = [str(v) for v in self.labels["train_variant"]]
        tests = [str(v) for v in self.labels["test_variant"]]
        k = trains.index(train) * u["ntest"] + tests.index(test) if train in trains and test in tests else -1
        if k < 0 or not u["present"][m, k]:
            have = self.conditions(model)
            raise CellbgError(
                f"condition '{condition}' has no predictions for model '{model}'{did_you_mean(condition, have)}; "
                f"available: {', '.join(have)}"
            )
        return k

    def paired_counts(self, model: str, a: str, b: str) -> tuple[pd.DataFrame, int]:
        """:func:`cellbg.stats.paired_counts` of conditions ``a`` and ``b`` and the number of distinct cells.

        Pairs each cell with itself on the same seed and fold, as :func:`~cellbg.stats.paired_outcomes`.
        """
        u = self._build_units()
        ka, kb = self._condition_code(model, a), self._condition_code(model, b)
        idx = u["of_model"][self._model_code(model)]
        xa, xb = u["matrix"][idx, ka], u["matrix"][idx, kb]
        both = (xa >= 0) & (xb >= 0)
        if not both.any():
            raise CellbgError(f"conditions {a} and {b} of model '{model}' share no cell/seed/fold to pair")
        sel = idx[both]
        xa, xb = xa[both].astype(bool), xb[both].astype(bool)
        nseed, nfold = self.card("seed"), self.card("fold")
        group = (u["patient"][sel] * nseed + u["seed"][sel]) * nfold + u["fold"][sel]
        gi, gu = pd.factorize(group, sort=True)
        ng = gu.size

        def count(weights=None) -> np.ndarray:
            return np.bincount(gi, weights=weights, minlength=ng).astype(np.int64)

        counts = pd.DataFrame(
            {
                "patient_id": self.labels["patient_id"][gu // (nseed * nfold)],
                "seed": self.labels["seed"][(gu // nfold) % nseed],
                "fold": self.labels["fold"][gu % nfold],
                "n": count(),
                "correct_a": count(xa),
                "correct_b": count(xb),
                "discordant_a": count(xa & ~xb),
                "discordant_b": count(~xa & xb),
            }
        )
        n_cells = int(np.unique(u["cell"][sel]).size)
        return counts, n_cells

    def accuracy(self) -> pd.DataFrame:
        """:func:`cellbg.stats.accuracy_table` from the codes (bincounts over rows)."""
        c = self.codes
        ntrain, ntest, nseed = self.card("train_variant"), self.card("test_variant"), self.card("seed")
        nlab = self.card("label")
        gkey = (c["model"].astype(np.int64) * ntrain + c["train_variant"]) * ntest + c["test_variant"]
        gi, gu = pd.factorize(gkey, sort=True)
        ng = gu.size
        w = self.correct.astype(float)
        gs = gi * nseed + c["seed"]
        rows_gs = np.bincount(gs, minlength=ng * nseed).reshape(ng, nseed)
        right_gs = np.bincount(gs, weights=w, minlength=ng * nseed).reshape(ng, nseed)
        gsl = gs * nlab + c["label"]
        rows_gsl = np.bincount(gsl, minlength=ng * nseed * nlab).reshape(ng, nseed, nlab)
        right_gsl = np.bincount(gsl, weights=w, minlength=ng * nseed * nlab).reshape(ng, nseed, nlab)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = right_gs / rows_gs  # NaN where a seed is absent
            recall = np.where(rows_gsl > 0, right_gsl / np.maximum(rows_gsl, 1), 0.0)
            bal = recall.sum(2) / (rows_gsl > 0).sum(2)  # mean recall over the classes present

        def mean_sd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            ok = ~np.isnan(x)
            n = ok.sum(1)
            mean = np.where(ok, x, 0.0).sum(1) / n
            sd = np.sqrt(np.where(ok, (x - mean[:, None]) ** 2, 0.0).sum(1) / np.maximum(n - 1, 1))
            return mean, np.where(n > 1, sd, np.nan)

        acc_m, acc_sd = mean_sd(acc)
        bal_m, bal_sd = mean_sd(bal)
        model = gu // (ntrain * ntest)
        train = (gu // ntest) % ntrain
        test = gu % ntest
        out = pd.DataFrame(
            {
                "model": self.labels["model"][model],
                "train_variant": self.labels["train_variant"][train],
                "test_variant": self.labels["test_variant"][test],
            }
        )
        out["condition"] = out["train_variant"].astype(str) + ":" + out["test_variant"].astype(str)
        out["accuracy"], out["accuracy_sd"] = acc_m, acc_sd
        out["balanced_accuracy"], out["balanced_accuracy_sd"] = bal_m, bal_sd
        out["n_cells"] = _distinct_per_group(gi, c["cell_id"], ng, self.card("cell_id"))
        out["n_patients"] = _distinct_per_group(gi, c["patient_id"], ng, self.card("patient_id"))
        out["n_seeds"] = (rows_gs > 0).sum(1)
        out["n_folds"] = _distinct_per_group(gi, c["fold"], ng, self.card("fold"))
        out["n_rows"] = rows_gs.sum(1)
        for col in ("n_cells", "n_patients", "n_seeds", "n_folds", "n_rows"):
            out[col] = out[col].astype(np.int64)
        return out


def predictions_path(run_dir: str | Path) -> Path:
    """Where a run's predictions are: ``predictions.parquet`` (a file or a folder of parquet
    files), else the ``predictions/`` folder of per-job parquet files."""
    run_dir = Path(run_dir)
    for candidate in (run_dir / "predictions.parquet", run_dir / "predictions"):
        if candidate.is_file() or (candidate.is_dir() and any(candidate.rglob("*.parquet"))):
            return candidate
    raise CellbgError(f"no predictions in {run_dir} (predictions.parquet missing; run `cellbg train` first)")
