"""The tests, their result objects and one comparison's battery (pure functions, no files)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy import stats as sps

from cellbg._checks import CellbgError, did_you_mean, look_up_option
from cellbg.stats._common import (
    _PAIR_COLUMNS,
    NAN,
    _as_1d,
    _check_alpha,
    _check_columns,
    _correct_values,
    _split_condition,
    _tolerance,
)


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TestResult:
    """The result of one test: effect, interval, statistic, p-value and sample sizes.

    Attributes
    ----------
    method : str
        Test name, e.g. ``"paired t (patients)"``.
    estimate : float
        The effect, condition B minus condition A, on the scale named by ``scale``.
    ci_low, ci_high : float
        Confidence interval of ``estimate`` (NaN when the test gives none).
    ci_method : str
        How the interval was made.
    statistic, df, pvalue : float
        Test statistic, its degrees of freedom (NaN when none) and the two-sided p-value.
    n_cells, n_patients, n_seeds : int
        Distinct cells, patients and training seeds the test used.
    scale : str
        What ``estimate`` measures (``"accuracy difference"``, ``"log odds ratio"``, ...).
    mcnemar_b, mcnemar_c : float
        Discordant pairs (A right B wrong, A wrong B right); NaN unless McNemar.
    n_resamples : int
        Bootstrap resamples (0 unless a bootstrap).
    alpha : float
        1 - confidence level of the interval.
    note : str
        Caveats (conditional inference, degenerate data, ...).
    se : float
        Standard error of ``estimate`` (the one the test's statistic or interval uses; NaN for
        rank, sign and exact tests).
    effect_size, effect_size_name : float, str
        A standardised effect size and its name: Cohen's d_z (mean / SD of the per-patient
        differences) for paired t and the bootstrap of patient differences; the
        matched-pairs rank-biserial r for Wilcoxon; the log odds ratio for the logistic
        GEE; the log conditional odds ratio log(c / b) for McNemar. NaN (and "") where none
        applies.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class

    method: str
    estimate: float
    ci_low: float = NAN
    ci_high: float = NAN
    ci_method: str = ""
    statistic: float = NAN
    df: float = NAN
    pvalue: float = NAN
    n_cells: int = 0
    n_patients: int = 0
    n_seeds: int = 0
    scale: str = "accuracy difference"
    mcnemar_b: float = NAN
    mcnemar_c: float = NAN
    n_resamples: int = 0
    alpha: float = 0.05
    note: str = ""
    se: float = NAN
    effect_size: float = NAN
    effect_size_name: str = ""

    @property
    def ci(self) -> tuple[float, float]:
        """``(ci_low, ci_high)``."""
        return (self.ci_low, self.ci_high)

    def replace(self, **changes) -> TestResult:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_row(self) -> dict:
        """The result as a flat dict (one row of ``stats/tests.csv``)."""
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A few aligned lines: method, effect with CI, statistic, p and sample sizes."""
        level = f"{100 * (1 - self.alpha):g}%"
        lines = [
            f"{self.method}",
            f"  estimate ({self.scale}): {self.estimate:.4g}",
        ]
        if not (math.isnan(self.ci_low) and math.isnan(self.ci_high)):
            lines.append(f"  {level} CI: [{self.ci_low:.4g}, {self.ci_high:.4g}]  ({self.ci_method})")
        stat = f"  statistic: {self.statistic:.4g}"
        if not math.isnan(self.df):
            stat += f"  df: {self.df:g}"
        stat += f"  p: {self.pvalue:.4g}" if np.isfinite(self.pvalue) else "  p: not computed"
        lines.append(stat)
        if np.isfinite(self.se):
            lines.append(f"  standard error: {self.se:.4g}")
        if self.effect_size_name:
            lines.append(f"  effect size ({self.effect_size_name}): {self.effect_size:.4g}")
        if not math.isnan(self.mcnemar_b):
            lines.append(f"  discordant pairs: b = {self.mcnemar_b:g} (A right, B wrong), c = {self.mcnemar_c:g}")
        if self.n_resamples:
            lines.append(f"  resamples: {self.n_resamples}")
        counts = ((self.n_cells, "cells"), (self.n_patients, "patients"), (self.n_seeds, "seeds"))
        sizes = [f"{v} {k}" for v, k in counts if v]
        if sizes:
            lines.append("  n: " + ", ".join(sizes))
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class GEEFit:
    """A GEE fit with t-reference inference (df = clusters - 1).

    Attributes
    ----------
    params, bse, tvalues, pvalues : pandas.Series
        Coefficients, standard errors (of ``cov_type``), t statistics and two-sided p-values
        from a t distribution with ``df`` degrees of freedom.
    conf_int : pandas.DataFrame
        Columns ``low`` and ``high`` (t-based, level ``1 - alpha``).
    df : float
        Reference degrees of freedom: number of clusters - 1.
    cov_type : str
        ``"bias_reduced"`` (Mancl-DeRouen), ``"robust"`` or ``"naive"``.
    n_obs, n_groups : int
    family, cov_struct : str
    dep_params : float
        The working correlation (exchangeable) or NaN.
    converged : bool
        Whether statsmodels' iterations converged (its ``converged`` flag).
    warnings : tuple of str
        Every warning the fit raised (convergence, singular matrices, ...), recorded rather
        than silenced.
    separation : bool
        Binomial family only: some fitted probabilities are numerically 0 or 1 (within 1e-8),
        the sign of (quasi-)complete separation. statsmodels then reports a converged fit
        with a huge coefficient and a meaningless p-value; do not use it.
    """

    params: pd.Series
    bse: pd.Series
    tvalues: pd.Series
    pvalues: pd.Series
    conf_int: pd.DataFrame
    cov_params: pd.DataFrame
    df: float
    cov_type: str
    n_obs: int
    n_groups: int
    family: str
    cov_struct: str
    dep_params: float
    alpha: float = 0.05
    converged: bool = True
    warnings: tuple[str, ...] = ()
    separation: bool = False

    def summary(self) -> str:
        """A coefficient table as text."""
        table = pd.DataFrame({"coef": self.params, "std err": self.bse, "t": self.tvalues, "P>|t|": self.pvalues}).join(
            self.conf_int
        )
        head = (
            f"GEE {self.family}, {self.cov_struct} working correlation ({self.dep_params:.3g}), "
            f"{self.cov_type} covariance, t reference df = {self.df:g}; "
            f"{self.n_obs} observations in {self.n_groups} clusters"
        )
        tail = "" if self.converged else "\nWARNING: the fit did not converge; do not use these estimates"
        if self.separation:
            tail += (
                "\nWARNING: fitted probabilities numerically 0 or 1 (separation): estimates and SEs are not reliable"
            )
        tail += "".join(f"\nwarning: {w}" for w in self.warnings)
        return head + "\n" + table.to_string(float_format=lambda v: f"{v:.4g}") + tail

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- pairing
def paired_outcomes(predictions: pd.DataFrame, a: str, b: str, *, model: str | None = None) -> pd.DataFrame:
    """Pair the correctness of each cell under conditions ``a`` and ``b``.

    Rows are matched on cell, seed and fold, so a cell is compared with itself under the
    same training seed and split.

    Parameters
    ----------
    predictions : pandas.DataFrame
        The predictions table (``predictions.parquet``).
    a, b : str
        Conditions ``"train_variant:test_variant"``.
    model : str, optional
        Model key; required when the table holds several models.

    Returns
    -------
    pandas.DataFrame
        Columns ``cell_id, patient_id, label, seed, fold, correct_a, correct_b`` (bool).

    Raises
    ------
    CellbgError
        When a condition or the model is not in the table, or rows are duplicated.

    Examples
    --------
    >>> p = pd.DataFrame({"cell_id": ["c1", "c1"], "patient_id": "p1", "label": "x",
    ...     "model": "m", "train_variant": "original", "test_variant": ["original", "only_fg"],
    ...     "seed": 0, "fold": 0, "correct": [True, False]})
    >>> paired_outcomes(p, "original:original", "original:only_fg")[["correct_a", "correct_b"]].values.tolist()
    [[True, False]]
    """
    _check_columns(predictions, _PAIR_COLUMNS, "predictions")
    models = predictions["model"].unique()
    if model is None:
        if len(models) != 1:
            raise CellbgError(f"the predictions hold several models {sorted(models)}; pass model=")
        model = models[0]
    else:
        look_up_option(model, sorted(map(str, models)), what="model")
    sub = predictions[predictions["model"] == model]
    keys = ["cell_id", "seed", "fold"]
    parts = []
    for cond, suffix in ((a, "_a"), (b, "_b")):
        train, test = _split_condition(cond)
        rows = sub[(sub["train_variant"] == train) & (sub["test_variant"] == test)]
        if rows.empty:
            have = sorted(set(sub["train_variant"].astype(str) + ":" + sub["test_variant"].astype(str)))
            raise CellbgError(
                f"condition '{cond}' has no predictions for model '{model}'{did_you_mean(cond, have)}; "
                f"available: {', '.join(have)}"
            )
        if rows.duplicated(keys).any():
            dup = rows.loc[rows.duplicated(keys), keys].iloc[0].tolist()
            raise CellbgError(
                f"predictions: condition {cond} of model '{model}' has duplicate rows for cell/seed/fold {dup}"
            )
        part = rows[keys + ["patient_id", "label", "correct"]].rename(columns={"correct": "correct" + suffix})
        part["correct" + suffix] = _correct_values(rows["correct"], f"predictions (condition {cond}, model '{model}')")
        parts.append(part)
    merged = parts[0].merge(parts[1].drop(columns=["patient_id", "label"]), on=keys, how="inner")
    if merged.empty:
        raise CellbgError(f"conditions {a} and {b} of model '{model}' share no cell/seed/fold to pair")
    return merged[["cell_id", "patient_id", "label", "seed", "fold", "correct_a", "correct_b"]].reset_index(drop=True)


def patient_accuracy(paired: pd.DataFrame) -> pd.DataFrame:
    """Per-patient accuracy under both conditions, averaged over cells, seeds and folds.

    Parameters
    ----------
    paired : pandas.DataFrame
        Output of :func:`paired_outcomes`.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``patient_id``: ``n`` (paired rows), ``correct_a``, ``correct_b`` (sums),
        ``acc_a``, ``acc_b``, ``diff`` (``acc_b - acc_a``).
    """
    _check_columns(paired, ("patient_id", "correct_a", "correct_b"), "paired outcomes")
    counts = "n" in paired.columns  # counts (paired_counts) are summed; cell rows are counted
    if not counts:
        paired = paired.assign(
            correct_a=_correct_values(paired["correct_a"], "paired outcomes", "correct_a"),
            correct_b=_correct_values(paired["correct_b"], "paired outcomes", "correct_b"),
        )
    g = paired.groupby("patient_id", sort=True, observed=True)
    out = pd.DataFrame(
        {
            "n": g["n"].sum().astype(float) if counts else g.size(),
            "correct_a": g["correct_a"].sum().astype(float),
            "correct_b": g["correct_b"].sum().astype(float),
        }
    )
    out["acc_a"] = out["correct_a"] / out["n"]
    out["acc_b"] = out["correct_b"] / out["n"]
    out["diff"] = out["acc_b"] - out["acc_a"]
    return out


# --------------------------------------------------------------------------- patient-level tests
def paired_t_test(a, b, *, alpha: float = 0.05) -> TestResult:
    """Paired t-test of ``b - a`` with its t-interval (scipy).

    Parameters
    ----------
    a, b : (N,) array_like
        Paired values, e.g. per-patient accuracies under conditions A and B.
    alpha : float, optional
        1 - confidence level of the interval.

    Returns
    -------
    TestResult
        ``estimate`` = mean of ``b - a``, df = N - 1.

    Examples
    --------
    R's ``sleep`` data (``t.test(extra ~ group, paired = TRUE)``: t = -4.0621, df = 9):

    >>> g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    >>> g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    >>> r = paired_t_test(g2, g1)
    >>> round(r.statistic, 4), r.df, round(r.pvalue, 6)
    (-4.0621, 9.0, 0.002833)
    """
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    alpha = _check_alpha(alpha)
    if a.shape != b.shape:
        raise CellbgError(f"a and b must pair up; got lengths {a.size} and {b.size}")
    n = a.size
    if n < 2:
        raise CellbgError(f"a paired t-test needs at least 2 pairs; got {n}")
    d = b - a
    df = float(n - 1)
    method = "paired t"
    tol = _tolerance(a, b)
    if float(np.ptp(d)) <= tol:
        # Every difference is the same (to rounding): the t statistic is 0/0 or c/0. Decided
        # here, not by rounding: all zero is p = 1 (no difference at all); a constant non-zero
        # difference has no p-value from the t-test (R: "data are essentially constant").
        est = float(np.median(d))
        if abs(est) <= tol:
            return TestResult(
                method,
                0.0,
                0.0,
                0.0,
                f"t, df={n - 1}",
                0.0,
                df,
                1.0,
                alpha=alpha,
                note="every paired difference is zero",
            )
        return TestResult(
            method,
            est,
            NAN,
            NAN,
            f"t, df={n - 1}",
            NAN,
            df,
            NAN,
            alpha=alpha,
            note=f"not computed: every paired difference is {est:.6g} (no variation, the t statistic "
            "is undefined); see the exact sign test",
        )
    est = float(d.mean())
    sd = float(d.std(ddof=1))
    res = sps.ttest_rel(b, a)
    ci = res.confidence_interval(confidence_level=1 - alpha)
    return TestResult(
        method,
        est,
        float(ci.low),
        float(ci.high),
        f"t, df={n - 1}",
        float(res.statistic),
        df,
        float(res.pvalue),
        alpha=alpha,
        se=sd / math.sqrt(n),
        effect_size=est / sd,
        effect_size_name="Cohen's d_z",
    )


def _signif(x: np.ndarray, digits: int = 12) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits (R's ``signif``; 0 stays 0)."""
    x = np.asarray(x, dtype=float)
    out = x.copy()
    nz = x != 0
    mag = 10.0 ** np.floor(np.log10(np.abs(x[nz])))
    out[nz] = np.round(x[nz] / mag, digits - 1) * mag
    return out


def _signrank_exact_sf(ranks2: np.ndarray, v2: float) -> tuple[float, float]:
    """``P(V <= v)`` and ``P(V >= v)`` of the signed-rank statistic given the (doubled) ranks.

    Exact permutation distribution: each difference keeps its rank and takes either sign with
    probability 1/2. ``ranks2`` are twice the mid-ranks (integers), so ties are exact.
    """
    r = ranks2.astype(np.int64)
    dist = np.zeros(int(r.sum()) + 1)
    dist[0] = 1.0
    for k in r:
        shifted = np.zeros_like(dist)
        shifted[k:] = dist[: dist.size - k]
        dist = 0.5 * (dist + shifted)
    v = int(round(v2))
    return float(dist[: v + 1].sum()), float(dist[v:].sum())


WILCOXON_METHODS = ("exact", "approx", "R")


def wilcoxon_test(a, b, *, method: str = "exact") -> TestResult:
    """Wilcoxon signed-rank test of ``b - a`` with an explicit method.

    Zero differences are dropped (Wilcoxon's 1945 rule, as R and scipy's default). Before
    zeros and ties are found the differences are rounded to 12 significant digits (R's
    ``digits.rank``), so that accuracy differences equal in exact arithmetic tie.

    Parameters
    ----------
    a, b : (N,) array_like
        Paired values, e.g. per-patient accuracies under conditions A and B.
    method : {"exact", "approx", "R"}, optional
        ``"exact"``: the exact permutation distribution of V given the observed mid-ranks
        (every sign pattern equally likely), exact with ties as well; computed by
        convolution, O(N^3), fine to a few hundred pairs. ``"approx"``: the normal
        approximation with continuity correction and tie-corrected variance
        (``scipy.stats.wilcoxon(method="approx", correction=True)``). ``"R"``: what R's
        ``wilcox.test(x, y, paired = TRUE)`` does by default: exact when there are fewer than
        50 non-zero differences and no ties or zeros, else ``"approx"``; the result names
        the method used.

    Returns
    -------
    TestResult
        ``estimate`` = median of ``b - a``; ``statistic`` = V, the sum of the ranks of the
        positive differences ``b - a`` (R's V of ``wilcox.test(b, a, paired = TRUE)``);
        ``pvalue`` two-sided; ``note`` says how many zeros were dropped and whether there
        were ties.

    Examples
    --------
    R's ``sleep`` data: ``wilcox.test(extra[1:10], extra[11:20], paired = TRUE)`` gives
    V = 0, p-value = 0.009091 (normal approximation with continuity correction, with
    warnings about ties and zeroes):

    >>> g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    >>> g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    >>> r = wilcoxon_test(g2, g1, method="R")
    >>> r.statistic, round(r.pvalue, 6), r.method
    (0.0, 0.009091, 'Wilcoxon signed-rank (normal approximation, continuity corrected)')
    >>> wilcoxon_test([1, 2, 3, 4, 5, 6], [2, 4, 5, 7, 8, 10]).pvalue  # all six positive: 2 / 2**6
    0.03125
    """
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    method = look_up_option(method, WILCOXON_METHODS, what="Wilcoxon method")
    if a.shape != b.shape:
        raise CellbgError(f"a and b must pair up; got lengths {a.size} and {b.size}")
    d = b - a
    est = float(np.median(d)) if d.size else NAN
    tol = _tolerance(a, b)
    d = np.where(np.abs(d) <= tol, 0.0, _signif(d))
    zeros = int(np.sum(d == 0))
    d = d[d != 0]
    n = d.size
    if n == 0:
        return TestResult(
            "Wilcoxon signed-rank",
            est,
            statistic=0.0,
            pvalue=1.0 if zeros else NAN,
            note="every paired difference is zero" if zeros else "no pairs",
        )
    ranks = sps.rankdata(np.abs(d))
    ties = bool(np.unique(np.abs(d)).size < n)
    v = float(ranks[d > 0].sum())
    notes = []
    if zeros:
        notes.append(f"{zeros} zero difference(s) dropped")
    if ties:
        notes.append("tied |differences| (mid-ranks)")
    if method == "R":
        method = "exact" if (n < 50 and not ties and not zeros) else "approx"
        notes.append(f"R wilcox.test default: {'exact' if method == 'exact' else 'normal approximation'}")
    if method == "exact":
        lo, hi = _signrank_exact_sf(np.round(2 * ranks), 2 * v)
        p = min(1.0, 2 * min(lo, hi))
        name = "Wilcoxon signed-rank (exact" + (", conditional on ties)" if ties else ")")
    else:
        res = sps.wilcoxon(d, zero_method="wilcox", correction=True, method="approx")
        p = float(res.pvalue)
        name = "Wilcoxon signed-rank (normal approximation, continuity corrected)"
    r_rb = 2 * v / (n * (n + 1) / 2) - 1  # (R+ - R-) / (R+ + R-), Kerby (2014)
    return TestResult(
        name,
        est,
        statistic=v,
        pvalue=p,
        note="; ".join(notes),
        effect_size=float(r_rb),
        effect_size_name="matched-pairs rank-biserial r",
    )


def sign_test(a, b, *, alpha: float = 0.05) -> TestResult:
    """Exact sign test of ``b - a`` (scipy ``binomtest``) with the order-statistic CI of the median.

    Zero differences (to rounding) are dropped. The test of choice when every difference
    has the same value (the paired t is then undefined): with N equal non-zero differences
    p = 2 / 2**N.

    Returns
    -------
    TestResult
        ``estimate`` = median of ``b - a``; ``statistic`` = number of positive differences;
        CI = the distribution-free interval ``[d_(k), d_(N+1-k)]`` of the median (NaN when N
        is too small for the level).

    Examples
    --------
    >>> r = sign_test([0.9] * 6, [0.8] * 6)
    >>> round(r.estimate, 6), r.pvalue  # 2 / 2**6
    (-0.1, 0.03125)
    """
    a = _as_1d(a, "a")
    b = _as_1d(b, "b")
    alpha = _check_alpha(alpha)
    if a.shape != b.shape:
        raise CellbgError(f"a and b must pair up; got lengths {a.size} and {b.size}")
    d = b - a
    tol = _tolerance(a, b)
    d = np.where(np.abs(d) <= tol, 0.0, d)
    est = float(np.median(d)) if d.size else NAN
    nz = d[d != 0]
    n = nz.size
    name = "exact sign test"
    if n == 0:
        return TestResult(
            name, est, statistic=0.0, pvalue=1.0 if d.size else NAN, alpha=alpha, note="every paired difference is zero"
        )
    pos = int(np.sum(nz > 0))
    p = float(sps.binomtest(pos, n, 0.5).pvalue)
    # largest k with P(Bin(N, 1/2) <= k - 1) <= alpha / 2
    k = int(sps.binom.ppf(alpha / 2, d.size, 0.5))
    if sps.binom.cdf(k, d.size, 0.5) > alpha / 2:
        k -= 1
    srt = np.sort(d)
    lo, hi = (float(srt[k]), float(srt[d.size - 1 - k])) if k >= 0 else (NAN, NAN)
    note = f"{d.size - n} zero difference(s) dropped" if d.size > n else ""
    return TestResult(
        name, est, lo, hi, "order statistics (sign test inversion)", float(pos), NAN, p, alpha=alpha, note=note
    )


# --------------------------------------------------------------------------- bootstrap
def cluster_sums(values, clusters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum ``values`` within each cluster (vectorised; the input to :func:`patient_bootstrap`).

    Parameters
    ----------
    values : (N,) array_like
        One value per row, e.g. ``correct_b - correct_a`` per paired cell.
    clusters : (N,) array_like
        Cluster (patient) of each row.

    Returns
    -------
    sums, counts : (P,) ndarray
        Sum and number of rows per cluster, in sorted cluster order.
    labels : (P,) ndarray
        The cluster labels.

    Examples
    --------
    >>> s, n, lab = cluster_sums([1, 0, 1, 1], ["p2", "p1", "p2", "p1"])
    >>> s.tolist(), n.tolist(), lab.tolist()
    ([1.0, 2.0], [2.0, 2.0], ['p1', 'p2'])
    """
    values = _as_1d(values, "values")
    clusters = np.asarray(clusters)
    if clusters.shape != values.shape:
        raise CellbgError(f"clusters must have one entry per value; got {clusters.shape} vs {values.shape}")
    labels, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=labels.size)
    counts = np.bincount(inverse, minlength=labels.size).astype(float)
    return sums, counts, labels


def _ratio_se(num: np.ndarray, den: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Cluster-robust (linearised) SE of sum(num)/sum(den) along the last axis.

    With den = 1 this is s / sqrt(P), the SE of a mean of cluster values.
    """
    p = num.shape[-1]
    sum_w = den.sum(-1)
    # sum((D - theta W)^2) expanded so that nothing of size (B, P) is made twice.
    ss = (num * num).sum(-1) - 2 * theta * (num * den).sum(-1) + theta**2 * (den * den).sum(-1)
    ss = np.maximum(ss, 0.0)
    return np.sqrt(p / (p - 1) * ss) / sum_w


def patient_bootstrap(
    sums,
    counts=None,
    *,
    n_resamples: int = 2000,
    method: str = "bootstrap-t",
    alpha: float = 0.05,
    seed: int | np.random.SeedSequence = 0,
    chunk: int = 2000,
) -> TestResult:
    """Patient cluster bootstrap of an accuracy difference, resampling per-patient sums.

    The estimate is ``sum(sums) / sum(counts)``: with ``counts`` omitted (all 1) and
    ``sums`` the per-patient accuracy differences, the mean of per-patient differences (the
    primary estimand); with per-patient sums of ``correct_b - correct_a`` and cell counts,
    the difference pooled over cells. Patients are drawn with replacement; only the
    per-patient sums are resampled, never the rows, so the cost does not grow with cells.

    Parameters
    ----------
    sums : (P,) array_like
        Per-patient sums (or values).
    counts : (P,) array_like, optional
        Per-patient denominators (cells); default 1 each.
    n_resamples : int, optional
        Bootstrap resamples.
    method : {"bootstrap-t", "percentile"}, optional
        ``"bootstrap-t"`` (studentized with the cluster-robust SE of each resample; the
        default) or ``"percentile"`` (only with >= 30 patients: with fewer its intervals
        are too narrow).
    alpha : float, optional
        1 - confidence level.
    seed : int or numpy.random.SeedSequence, optional
        Seed of the resampling generator.
    chunk : int, optional
        Resamples drawn at a time (bounds memory at ``chunk x P``).

    Returns
    -------
    TestResult
        CI from the bootstrap; ``statistic`` = estimate / SE; ``pvalue`` from the bootstrap
        distribution of the studentized statistic (bootstrap-t) or of the estimate
        (percentile), ``(k + 1) / (B + 1)``.

    References
    ----------
    Davison & Hinkley (1997), Bootstrap Methods and their Application, sec. 5.2.1 and 3.8.

    Examples
    --------
    >>> r = patient_bootstrap([0.1, 0.0, 0.2, 0.05, 0.15], n_resamples=999, seed=1)
    >>> round(r.estimate, 3), r.ci_low < 0.1 < r.ci_high
    (0.1, True)
    """
    sums = _as_1d(sums, "sums")
    counts = np.ones_like(sums) if counts is None else _as_1d(counts, "counts")
    if counts.shape != sums.shape:
        raise CellbgError(f"counts must match sums; got {counts.shape} vs {sums.shape}")
    if np.any(counts <= 0):
        raise CellbgError("counts must be positive")
    method = look_up_option(method, ("bootstrap-t", "percentile"), what="bootstrap method")
    alpha = _check_alpha(alpha)
    if int(n_resamples) < 1:
        raise CellbgError(f"n_resamples must be >= 1; got {n_resamples}")
    n_resamples = int(n_resamples)
    p = sums.size
    if p < 2:
        raise CellbgError(f"a patient bootstrap needs at least 2 patients; got {p}")
    if method == "percentile" and p < 30:
        raise CellbgError(
            f"percentile bootstrap needs >= 30 patients (got {p}); its intervals are too narrow "
            "with few clusters, use method='bootstrap-t'"
        )
    theta = float(sums.sum() / counts.sum())
    # the observed SE from the residuals themselves (the expanded form in _ratio_se cancels badly
    # when every patient has the same value, and that case must read as "no variation")
    resid = sums - theta * counts
    se = math.sqrt(p / (p - 1) * float(resid @ resid)) / float(counts.sum())
    rng = np.random.default_rng(seed)
    boot_theta = np.empty(n_resamples)
    boot_se = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, p, size=(stop - start, p))
        num, den = sums[idx], counts[idx]
        th = num.sum(1) / den.sum(1)
        boot_theta[start:stop] = th
        boot_se[start:stop] = _ratio_se(num, den, th)
    common = dict(n_cells=0, n_patients=p, n_resamples=n_resamples, alpha=alpha, se=se)
    if np.all(counts == 1) and se > 0:  # mean of per-patient values: Cohen's d_z = mean / SD
        common.update(effect_size=theta / (se * math.sqrt(p)), effect_size_name="Cohen's d_z")
    if method == "percentile":
        lo, hi, pval = _equal_tailed(boot_theta, 0.0, alpha)
        stat = theta / se if se > 0 else NAN
        return TestResult(
            "patient cluster bootstrap (percentile)",
            theta,
            lo,
            hi,
            f"percentile bootstrap, B={n_resamples}",
            stat,
            NAN,
            pval,
            **common,
        )
    if se <= _tolerance(sums / counts):
        return TestResult(
            "patient cluster bootstrap-t",
            theta,
            NAN,
            NAN,
            f"bootstrap-t, B={n_resamples}",
            NAN,
            NAN,
            NAN,
            note="not computed: no variation between patients",
            **common,
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = (boot_theta - theta) / boot_se
    # A resample of identical patients has SE 0 and no studentized value; it is dropped.
    t_star = t_star[np.isfinite(t_star)]
    t_obs = theta / se
    q_lo, q_hi, pval = _equal_tailed(t_star, t_obs, alpha)
    return TestResult(
        "patient cluster bootstrap-t",
        theta,
        float(theta - q_hi * se),
        float(theta - q_lo * se),
        f"bootstrap-t, B={n_resamples}",
        float(t_obs),
        NAN,
        float(pval),
        **common,
    )


def _equal_tailed(boot: np.ndarray, observed: float, alpha: float) -> tuple[float, float, float]:
    """Equal-tailed bootstrap quantiles and the p-value that inverts the same interval.

    With B resamples, ``j = ceil((B + 1) alpha / 2) - 1``: the interval's ends are the j-th
    smallest and j-th largest resampled values, and ``p = 2 min(#(boot >= obs) + 1,
    #(boot <= obs) + 1) / (B + 1)`` (capped at 1). Then ``observed`` lies beyond an end of
    the interval exactly when ``p < alpha``, for every data set: the CI excludes 0 if and
    only if p < alpha. For the percentile bootstrap ``boot`` are the resampled estimates and
    ``observed`` is 0; for the bootstrap-t they are the studentized values and ``t_obs``
    (the interval is then ``theta - q_hi se, theta - q_lo se``). With too few resamples for
    the level (j = 0) the interval is unbounded (NaN) and p >= alpha.
    """
    b = np.sort(boot)
    n = b.size
    upper = int(np.sum(b >= observed))
    lower = int(np.sum(b <= observed))
    pval = min(1.0, 2 * (min(upper, lower) + 1) / (n + 1))
    j = math.ceil((n + 1) * alpha / 2 - 1e-9) - 1
    if j < 1:
        return NAN, NAN, pval
    return float(b[j - 1]), float(b[n - j]), pval


# --------------------------------------------------------------------------- McNemar
def paired_table(correct_a, correct_b) -> np.ndarray:
    """The 2x2 table of paired correctness: rows A right/wrong, columns B right/wrong.

    Examples
    --------
    >>> paired_table([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]).tolist()
    [[2, 1], [2, 0]]
    """
    a = _correct_values(correct_a, "paired table", "correct_a")
    b = _correct_values(correct_b, "paired table", "correct_b")
    if a.shape != b.shape:
        raise CellbgError(f"correct_a and correct_b must pair up; got {a.size} and {b.size}")
    return np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.int64)


MCNEMAR_METHODS = ("auto", "exact", "mid-p", "chi2")


def mcnemar_test(table, *, method: str = "auto", correction: bool = True) -> TestResult:
    """McNemar's test on a paired 2x2 table (statsmodels; the mid-p written here).

    Cell-level and therefore conditional on these trained models and these cells; it
    ignores that cells are nested in patients and is a secondary test only.

    Parameters
    ----------
    table : (2, 2) array_like
        Counts; rows condition A right / wrong, columns condition B right / wrong (see
        :func:`paired_table`).
    method : {"auto", "exact", "mid-p", "chi2"}, optional
        ``"exact"``: the exact conditional binomial test on the discordant pairs;
        ``"mid-p"``: its mid-p version, ``2 [P(X <= m) - P(X = m) / 2]`` with
        ``m = min(b, c)``, ``X ~ Bin(b + c, 1/2)`` (Fagerland, Lydersen & Laake 2013: close to
        nominal size, less conservative than exact); ``"chi2"``: the chi-square statistic
        (df 1); ``"auto"``: exact when ``b + c < 25``, else chi-square.
    correction : bool, optional
        Continuity correction of the chi-square version.

    Returns
    -------
    TestResult
        ``estimate`` = ``(c - b) / n`` (accuracy of B minus A), ``mcnemar_b``,
        ``mcnemar_c`` the discordant counts; ``statistic`` is chi-square (df 1) or, exact and
        mid-p, ``min(b, c)``.

    References
    ----------
    Fagerland, Lydersen & Laake (2013), BMC Medical Research Methodology 13:91.

    Examples
    --------
    Agresti's presidential approval table:

    >>> r = mcnemar_test([[794, 150], [86, 570]])
    >>> round(r.statistic, 3), f"{r.pvalue:.3e}"
    (16.818, '4.115e-05')

    Fagerland et al. (2013), table 1 (b = 1, c = 7):

    >>> mcnemar_test([[1, 1], [7, 12]], method="exact").pvalue, mcnemar_test([[1, 1], [7, 12]], method="mid-p").pvalue
    (0.0703125, 0.0390625)
    """
    from statsmodels.stats.contingency_tables import mcnemar

    method = look_up_option(method, MCNEMAR_METHODS, what="McNemar method")
    t = np.asarray(table, dtype=float)
    if t.shape != (2, 2):
        raise CellbgError(f"McNemar needs a 2x2 table; got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t < 0) or np.any(t != np.round(t)):
        raise CellbgError("McNemar table must hold non-negative counts")
    b, c = t[0, 1], t[1, 0]
    n = t.sum()
    if method == "auto":
        method = "exact" if (b + c) < 25 else "chi2"
    est = float((c - b) / n) if n else NAN
    if b + c == 0:
        return TestResult(
            "McNemar", est, pvalue=1.0, n_cells=int(n), mcnemar_b=b, mcnemar_c=c, note="no discordant pairs"
        )
    note = "conditional on these trained models and these cells"
    # SE of the paired difference of proportions (c - b) / n; the conditional odds ratio c / b
    effect = dict(
        se=math.sqrt(max(b + c - (c - b) ** 2 / n, 0.0)) / n,
        effect_size=math.log(c / b) if b > 0 and c > 0 else NAN,
        effect_size_name="log conditional odds ratio log(c/b)",
    )
    if method == "mid-p":
        m, k = int(min(b, c)), int(b + c)
        if k <= 5000:  # exact integer arithmetic: 2 P(X < m) + P(X = m)
            p = (2 * sum(math.comb(k, i) for i in range(m)) + math.comb(k, m)) / 2**k
        else:
            p = 2 * sps.binom.cdf(m - 1, k, 0.5) + sps.binom.pmf(m, k, 0.5)
        p = min(1.0, p)
        return TestResult(
            "McNemar mid-p",
            est,
            statistic=float(m),
            pvalue=float(p),
            n_cells=int(n),
            mcnemar_b=b,
            mcnemar_c=c,
            note=note,
            **effect,
        )
    res = mcnemar(t, exact=method == "exact", correction=bool(correction))
    if method == "exact":
        name, df = "McNemar exact (binomial)", NAN
    else:
        name, df = "McNemar chi-square" + (" (continuity corrected)" if correction else ""), 1.0
    return TestResult(
        name,
        est,
        statistic=float(res.statistic),
        df=df,
        pvalue=float(res.pvalue),
        n_cells=int(n),
        mcnemar_b=b,
        mcnemar_c=c,
        note=note,
        **effect,
    )


# --------------------------------------------------------------------------- GEE
def gee_fit(
    data: pd.DataFrame,
    formula: str,
    *,
    groups: str,
    family: str = "binomial",
    cov_struct: str = "exchangeable",
    cov_type: str = "bias_reduced",
    alpha: float = 0.05,
) -> GEEFit:
    """Fit a GEE (statsmodels) and report t-reference inference with clusters - 1 df.

    With few clusters the sandwich covariance is biased down and the normal reference too
    liberal; the bias-reduced (Mancl-DeRouen) covariance with a t reference on
    ``clusters - 1`` degrees of freedom corrects most of both.

    Parameters
    ----------
    data : pandas.DataFrame
    formula : str
        Model formula, e.g. ``"correct ~ condition"``.
    groups : str
        Column of ``data`` naming the cluster (patient).
    family : {"binomial", "poisson", "gaussian"}, optional
    cov_struct : {"exchangeable", "independence"}, optional
    cov_type : {"bias_reduced", "robust", "naive"}, optional
    alpha : float, optional

    Returns
    -------
    GEEFit

    References
    ----------
    Mancl & DeRouen (2001), Biometrics 57:126-134.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> d = pd.DataFrame({"y": rng.integers(0, 2, 200), "x": np.tile([0, 1], 100),
    ...                   "g": np.repeat(np.arange(20), 10)})
    >>> fit = gee_fit(d, "y ~ x", groups="g")
    >>> fit.df
    19.0
    """
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    families = {"binomial": sm.families.Binomial, "poisson": sm.families.Poisson, "gaussian": sm.families.Gaussian}
    structs = {"exchangeable": sm.cov_struct.Exchangeable, "independence": sm.cov_struct.Independence}
    family = look_up_option(family, families, what="GEE family")
    cov_struct = look_up_option(cov_struct, structs, what="GEE working correlation")
    cov_type = look_up_option(cov_type, ("bias_reduced", "robust", "naive"), what="GEE covariance")
    alpha = _check_alpha(alpha)
    if groups not in data.columns:
        raise CellbgError(f"groups column '{groups}' is not in data; it has {list(data.columns)}")
    n_groups = int(data[groups].nunique())
    if n_groups < 2:
        raise CellbgError(f"GEE needs at least 2 clusters in '{groups}'; got {n_groups}")
    model = smf.gee(formula, groups, data, cov_struct=structs[cov_struct](), family=families[family]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = model.fit(cov_type=cov_type)
    messages = tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    if res is None:
        raise CellbgError(f"GEE did not fit ({'; '.join(messages) or 'statsmodels returned no result'})")
    params = pd.Series(np.asarray(res.params), index=model.exog_names)
    bse = pd.Series(np.sqrt(np.diag(np.asarray(res.cov_params()))), index=model.exog_names)
    df = float(n_groups - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tvalues = params / bse
    pvalues = pd.Series(2 * sps.t.sf(np.abs(tvalues), df), index=model.exog_names)
    q = sps.t.ppf(1 - alpha / 2, df)
    conf = pd.DataFrame({"low": params - q * bse, "high": params + q * bse})
    dep: Any = np.ravel(res.model.cov_struct.dep_params) if cov_struct == "exchangeable" else []
    cov = pd.DataFrame(np.asarray(res.cov_params()), index=model.exog_names, columns=model.exog_names)
    converged = bool(getattr(res, "converged", True)) and bool(np.all(np.isfinite(params)))
    separation = False
    if family == "binomial":
        fitted = np.asarray(res.fittedvalues, dtype=float)
        separation = bool(np.any((fitted < 1e-8) | (fitted > 1 - 1e-8)))
    return GEEFit(
        params,
        bse,
        tvalues,
        pvalues,
        conf,
        cov,
        df,
        cov_type,
        int(model.nobs),
        n_groups,
        family,
        cov_struct,
        float(dep[0]) if len(dep) else NAN,
        alpha,
        converged,
        messages,
        separation,
    )


def paired_counts(paired: pd.DataFrame) -> pd.DataFrame:
    """Reduce paired cell outcomes to counts per patient x seed x fold.

    Everything the comparison tests need (per-patient accuracies, McNemar's table, fold
    differences, the GEE on binomial counts) is a function of these counts, so their cost
    grows with patients x seeds x folds, not with cells.

    Parameters
    ----------
    paired : pandas.DataFrame
        Output of :func:`paired_outcomes` (``seed`` and ``fold`` are taken as 0 when absent).

    Returns
    -------
    pandas.DataFrame
        Columns ``patient_id, seed, fold, n`` (paired rows), ``correct_a, correct_b`` (right
        under A, under B), ``discordant_a`` (A right, B wrong: McNemar's b) and
        ``discordant_b`` (A wrong, B right: c), all integers.

    Examples
    --------
    >>> p = pd.DataFrame({"patient_id": ["p1"] * 3, "seed": 0, "fold": 0,
    ...                   "correct_a": [True, True, False], "correct_b": [True, False, True]})
    >>> paired_counts(p)[["n", "correct_a", "correct_b", "discordant_a", "discordant_b"]].values.tolist()
    [[3, 2, 2, 1, 1]]
    """
    _check_columns(paired, ("patient_id", "correct_a", "correct_b"), "paired outcomes")
    a = _correct_values(paired["correct_a"], "paired outcomes", "correct_a")
    b = _correct_values(paired["correct_b"], "paired outcomes", "correct_b")
    seed = paired["seed"].to_numpy() if "seed" in paired else 0  # one seed / fold when not given
    fold = paired["fold"].to_numpy() if "fold" in paired else 0
    df = pd.DataFrame(
        {
            "patient_id": paired["patient_id"].to_numpy(),
            "seed": seed,
            "fold": fold,
            "n": 1,
            "correct_a": a.astype(np.int64),
            "correct_b": b.astype(np.int64),
            "discordant_a": (a & ~b).astype(np.int64),
            "discordant_b": (~a & b).astype(np.int64),
        }
    )
    return df.groupby(["patient_id", "seed", "fold"], sort=True, observed=True).sum().reset_index()


def _gee_two_conditions(n, ka, kb, *, link: str, cov_type: str) -> tuple[np.ndarray, np.ndarray]:
    """GEE of correctness on condition (intercept + B indicator), independence working correlation.

    Closed form from per-cluster counts: with one binary covariate the estimating equations
    are solved by the pooled accuracies, and every cluster's contribution to the sandwich
    is a function of its counts. With ``S_i`` the cluster's information and ``U_i`` its
    score, the robust covariance is ``M^-1 (sum U_i U_i') M^-1`` (``M = sum S_i``) and the
    Mancl-DeRouen bias-reduced one ``sum (M - S_i)^-1 U_i U_i' (M - S_i)^-1`` (their
    ``D_i' V_i^-1 (I - H_ii)^-1 r_i`` reduces to ``M (M - S_i)^-1 U_i`` for a canonical link
    under independence). Equal to statsmodels' GEE on the cell rows with independence
    working correlation (tests/test_stats.py checks it), without the cell rows.

    Returns ``params`` (intercept, condition) and their 2x2 covariance.
    """
    n, ka, kb = (np.asarray(v, dtype=float) for v in (n, ka, kb))
    total = n.sum()
    mu_a, mu_b = ka.sum() / total, kb.sum() / total
    if link == "logit":
        va, vb = mu_a * (1 - mu_a), mu_b * (1 - mu_b)
        params = np.array([math.log(mu_a / (1 - mu_a)), math.log(mu_b / (1 - mu_b)) - math.log(mu_a / (1 - mu_a))])
    else:
        va = vb = 1.0
        params = np.array([mu_a, mu_b - mu_a])
    e00 = np.array([[1.0, 0.0], [0.0, 0.0]])
    e11 = np.ones((2, 2))
    info = n[:, None, None] * (va * e00 + vb * e11)  # S_i, (P, 2, 2)
    ra, rb = ka - n * mu_a, kb - n * mu_b
    score = np.stack([ra + rb, rb], axis=1)  # U_i, (P, 2)
    m = info.sum(0)
    if cov_type == "bias_reduced":
        w = np.linalg.solve(m[None] - info, score[:, :, None])[:, :, 0]
        cov = w.T @ w
    else:
        m_inv = np.linalg.inv(m)
        cov = m_inv @ (score.T @ score) @ m_inv
    return params, cov


def gee_test(paired: pd.DataFrame, *, alpha: float = 0.05, cov_type: str = "bias_reduced") -> TestResult:
    """GEE of cell correctness on condition, clustered by patient, from binomial counts.

    Logistic link, independence working correlation, bias-reduced (Mancl-DeRouen) or robust
    covariance and a t reference with patients - 1 df, fitted on the counts of right cells
    per patient x condition (summed over seeds and folds): the same estimates and the same
    covariance as the GEE on the cell rows (checked against statsmodels in the tests), at a
    cost that does not grow with cells.

    Separation is checked, not left to the optimiser: when one condition is right (or wrong)
    for every cell its log odds are infinite and the logistic model is not estimable. The
    test then falls back to the same GEE with the identity link (a linear probability model
    of the accuracy difference itself), named in ``method`` with the reason in ``note``. When
    that has no variation either (every cell right under both, or right under one and wrong
    under the other), the result is "not estimable": NaN statistic and p, the reason in
    ``note``.

    Parameters
    ----------
    paired : pandas.DataFrame
        Output of :func:`paired_outcomes` (cell rows) or :func:`paired_counts`.
    alpha : float, optional
    cov_type : {"bias_reduced", "robust"}, optional

    Returns
    -------
    TestResult
        ``estimate`` = accuracy under B minus under A (pooled over cells: the model's
        marginal accuracies); logistic: delta-method t-interval, ``statistic`` and ``pvalue``
        test the log odds ratio (given with its interval in ``note``); identity link: the
        t-interval and test of the difference itself.

    References
    ----------
    Mancl & DeRouen (2001), Biometrics 57:126-134. Heinze & Schemper (2002), Statistics in
    Medicine 21:2409-2419 (separation).
    """
    alpha = _check_alpha(alpha)
    cov_type = look_up_option(cov_type, ("bias_reduced", "robust"), what="GEE covariance")
    counts = paired if "n" in paired.columns else paired_counts(paired)
    _check_columns(counts, ("patient_id", "n", "correct_a", "correct_b"), "paired counts")
    sizes = _sizes(paired) if "n" not in paired.columns else _count_sizes(counts)
    pat = counts.groupby("patient_id", sort=True, observed=True)[["n", "correct_a", "correct_b"]].sum()
    n, ka, kb = (pat[c].to_numpy(float) for c in ("n", "correct_a", "correct_b"))
    n_pat = len(pat)
    scale = "accuracy difference (GEE marginal)"
    name = "GEE logistic (patients, independence, bias-reduced SE, t ref)"
    if cov_type == "robust":
        name = name.replace("bias-reduced", "robust")
    if n_pat < 2:
        return TestResult(
            name, NAN, scale=scale, alpha=alpha, note=f"not estimable: needs at least 2 patients; got {n_pat}", **sizes
        )
    total = n.sum()
    mu_a, mu_b = ka.sum() / total, kb.sum() / total
    est = mu_b - mu_a
    df = float(n_pat - 1)
    q = sps.t.ppf(1 - alpha / 2, df)
    boundary = [
        f"condition {c} is {'right' if mu == 1 else 'wrong'} for every cell"
        for c, mu in (("A", mu_a), ("B", mu_b))
        if mu in (0.0, 1.0)
    ]
    note = ""
    if not boundary:
        params, cov = _gee_two_conditions(n, ka, kb, link="logit", cov_type=cov_type)
        b0, b1 = params
        acc_a, acc_b = 1 / (1 + math.exp(-b0)), 1 / (1 + math.exp(-(b0 + b1)))
        grad = np.array([acc_b * (1 - acc_b) - acc_a * (1 - acc_a), acc_b * (1 - acc_b)])
        se_lor = math.sqrt(cov[1, 1]) if cov[1, 1] > 0 else NAN
        se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
        if np.all(np.isfinite(cov)) and se_lor > 0:
            t = b1 / se_lor
            note = (
                f"log odds ratio {b1:.4g} [{b1 - q * se_lor:.4g}, {b1 + q * se_lor:.4g}]; "
                "the test is on the log odds ratio"
            )
            return TestResult(
                name,
                est,
                est - q * se,
                est + q * se,
                f"delta method t, df={df:g}, {cov_type} SE",
                float(t),
                df,
                float(2 * sps.t.sf(abs(t), df)),
                scale=scale,
                alpha=alpha,
                note=note,
                se=se,
                effect_size=float(b1),
                effect_size_name="log odds ratio",
                **sizes,
            )
        note = "logistic GEE not estimable (no variation in the scores); "
    else:
        note = f"logistic GEE not estimable: {' and '.join(boundary)} (separation, infinite log odds); "
    # Fallback: the identity link estimates the accuracy difference directly.
    lin = name.replace("GEE logistic", "GEE linear probability (identity link)")
    params, cov = _gee_two_conditions(n, ka, kb, link="identity", cov_type=cov_type)
    se = math.sqrt(cov[1, 1]) if np.isfinite(cov[1, 1]) and cov[1, 1] > 0 else 0.0
    if se <= _tolerance(np.array([1.0])):
        reason = (
            "every cell has the same outcome under both conditions"
            if est == 0
            else "no variation between patients or cells"
        )
        return TestResult(
            lin,
            est,
            NAN,
            NAN,
            "",
            NAN,
            df,
            NAN,
            scale=scale,
            alpha=alpha,
            note=note + f"the identity link is not estimable either: {reason}",
            **sizes,
        )
    t = est / se
    return TestResult(
        lin,
        est,
        est - q * se,
        est + q * se,
        f"t, df={df:g}, {cov_type} SE",
        float(t),
        df,
        float(2 * sps.t.sf(abs(t), df)),
        scale=scale,
        alpha=alpha,
        se=se,
        note=note + "fell back to the identity link (test of the accuracy difference)",
        **sizes,
    )


def _count_sizes(counts: pd.DataFrame) -> dict:
    """Sample sizes from counts: n_cells is the largest per-seed total (every cell once per seed)."""
    return dict(
        n_cells=int(counts.groupby("seed", observed=True)["n"].sum().max()) if len(counts) else 0,
        n_patients=int(counts["patient_id"].nunique()),
        n_seeds=int(counts["seed"].nunique()),
    )


def _sizes(paired: pd.DataFrame) -> dict:
    return dict(
        n_cells=int(paired["cell_id"].nunique()) if "cell_id" in paired else len(paired),
        n_patients=int(paired["patient_id"].nunique()),
        n_seeds=int(paired["seed"].nunique()) if "seed" in paired else 1,
    )


# --------------------------------------------------------------------------- resampling designs
def corrected_resampled_t_test(differences, *, test_train_ratio: float, alpha: float = 0.05) -> TestResult:
    """Nadeau-Bengio corrected resampled t-test over cross-validation folds (hand-written).

    The folds' training sets overlap, so the fold differences are correlated and the plain
    variance ``s^2 / J`` is too small; it is replaced by ``(1/J + n_test/n_train) s^2``.

    Parameters
    ----------
    differences : (J,) array_like
        Accuracy of B minus A on each fold (x repetition / seed).
    test_train_ratio : float
        ``n_test / n_train`` of one fold.
    alpha : float, optional

    Returns
    -------
    TestResult
        df = J - 1.

    References
    ----------
    Nadeau & Bengio (2003), Machine Learning 52:239-281; Bouckaert & Frank (2004).

    Examples
    --------
    >>> r = corrected_resampled_t_test([0.02, 0.05, 0.01, 0.04, 0.03], test_train_ratio=0.25)
    >>> round(r.statistic, 4)  # 0.03 / sqrt((1/5 + 0.25) * 0.00025)
    2.8284
    """
    d = _as_1d(differences, "differences")
    alpha = _check_alpha(alpha)
    if not test_train_ratio > 0:
        raise CellbgError(f"test_train_ratio must be > 0; got {test_train_ratio}")
    j = d.size
    if j < 2:
        raise CellbgError(f"the corrected resampled t-test needs at least 2 folds; got {j}")
    est = float(d.mean())
    var = float(d.var(ddof=1))
    se = math.sqrt((1 / j + test_train_ratio) * var)
    df = float(j - 1)
    name = "Nadeau-Bengio corrected resampled t (folds)"
    if se == 0:
        return TestResult(
            name,
            est,
            est,
            est,
            f"t, df={j - 1}",
            NAN,
            df,
            1.0 if est == 0 else NAN,
            alpha=alpha,
            note="no variation between folds",
        )
    t = est / se
    q = sps.t.ppf(1 - alpha / 2, df)
    return TestResult(
        name,
        est,
        est - q * se,
        est + q * se,
        f"corrected t, df={j - 1}",
        t,
        df,
        float(2 * sps.t.sf(abs(t), df)),
        alpha=alpha,
        se=se,
    )


def five_by_two_cv_test(differences) -> TestResult:
    """Dietterich's 5x2cv paired t-test (hand-written).

    Parameters
    ----------
    differences : (5, 2) array_like
        Accuracy of B minus A in replication i (rows) and fold j (columns) of five
        replications of 2-fold cross-validation.

    Returns
    -------
    TestResult
        ``statistic`` = ``p_11 / sqrt(mean_i s_i^2)`` with df 5; ``estimate`` = the mean of
        the ten differences.

    References
    ----------
    Dietterich (1998), Neural Computation 10:1895-1923.

    Examples
    --------
    >>> d = [[0.1, 0.0], [0.05, 0.05], [0.02, 0.08], [0.06, 0.04], [0.03, 0.07]]
    >>> round(five_by_two_cv_test(d).df, 1)
    5.0
    """
    d = np.asarray(differences, dtype=float)
    if d.shape != (5, 2):
        raise CellbgError(f"5x2cv needs differences of shape (5, 2); got {d.shape}")
    if not np.all(np.isfinite(d)):
        raise CellbgError("differences hold NaN or infinite values")
    mean_i = d.mean(1, keepdims=True)
    s2 = ((d - mean_i) ** 2).sum(1)
    denom = math.sqrt(s2.mean())
    name = "Dietterich 5x2cv paired t"
    if denom == 0:
        return TestResult(name, float(d.mean()), df=5.0, pvalue=NAN, note="no variation within replications")
    t = float(d[0, 0] / denom)
    return TestResult(name, float(d.mean()), statistic=t, df=5.0, pvalue=float(2 * sps.t.sf(abs(t), 5)))


# --------------------------------------------------------------------------- multiplicity
def adjust_pvalues(pvalues, method: str = "holm") -> np.ndarray:
    """Adjust p-values for multiplicity (statsmodels ``multipletests``); NaNs stay NaN.

    Parameters
    ----------
    pvalues : (K,) array_like
    method : {"holm", "bh", "bonferroni"}, optional
        Holm (family-wise error, for the confirmatory family), Benjamini-Hochberg (false
        discovery rate, for exploratory grids) or Bonferroni (family-wise error; never more
        powerful than Holm, given because many journals ask for it).

    Examples
    --------
    >>> adjust_pvalues([0.01, 0.04, 0.03], "holm").round(3).tolist()
    [0.03, 0.06, 0.06]
    >>> adjust_pvalues([0.01, 0.04, 0.03], "bonferroni").round(3).tolist()
    [0.03, 0.12, 0.09]
    """
    from statsmodels.stats.multitest import multipletests

    method = look_up_option(method, ("holm", "bh", "bonferroni"), what="p-value adjustment")
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise CellbgError("p-values must lie in [0, 1]")
    if ok.any():
        out[ok] = multipletests(p[ok], method={"holm": "holm", "bh": "fdr_bh", "bonferroni": "bonferroni"}[method])[1]
    return out


# --------------------------------------------------------------------------- effect sizes
def accuracy_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Accuracy and balanced accuracy per model x train variant x test variant.

    Accuracy is computed per seed (pooled over folds and cells), then summarised as the mean
    and SD over seeds. Balanced accuracy is the mean over classes of the per-class recall.
    Computed with integer codes and bincounts (no grouping of strings), so ten million rows
    take seconds.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, train_variant, test_variant, condition, accuracy, accuracy_sd,
        balanced_accuracy, balanced_accuracy_sd, n_cells, n_patients, n_seeds, n_folds,
        n_rows``. SDs are NaN with one seed.
    """
    from cellbg.stats._table import CodedPredictions

    return CodedPredictions.from_frame(predictions).accuracy()


def _fold_differences(counts: pd.DataFrame) -> pd.DataFrame:
    """Accuracy difference per (seed, fold) with the fold's test-set size, from counts."""
    g = counts.groupby(["seed", "fold"], sort=True, observed=True)[["n", "correct_a", "correct_b"]].sum()
    out = pd.DataFrame({"n_test": g["n"], "acc_a": g["correct_a"] / g["n"], "acc_b": g["correct_b"] / g["n"]})
    out["diff"] = out["acc_b"] - out["acc_a"]
    return out.reset_index()


def _counts_table(counts: pd.DataFrame) -> np.ndarray:
    """McNemar's 2x2 table from :func:`paired_counts`."""
    total = int(counts["n"].sum())
    b, c = int(counts["discordant_a"].sum()), int(counts["discordant_b"].sum())
    both = int(counts["correct_a"].sum()) - b
    return np.array([[both, b], [c, total - both - b - c]], dtype=np.int64)


def compare_conditions(
    paired: pd.DataFrame,
    *,
    primary: str = "patient_t",
    alpha: float = 0.05,
    n_resamples: int = 2000,
    seed: int | np.random.SeedSequence = 0,
    secondary: bool = True,
    n_cells: int | None = None,
) -> list[tuple[str, TestResult]]:
    """Every test of one paired comparison, each with its role.

    Parameters
    ----------
    paired : pandas.DataFrame
        Output of :func:`paired_outcomes` (cell rows) or :func:`paired_counts` (counts per
        patient x seed x fold; every test here is a function of them).
    primary : {"patient_t", "gee"}, optional
        The primary test; the other is reported as a sensitivity check.
    n_resamples : int, optional
        Bootstrap resamples (0 = no bootstrap).
    secondary : bool, optional
        Also the cell-level and fold-level tests (McNemar, Nadeau-Bengio, 5x2cv) and the
        sensitivity checks; False gives only the primary test.
    n_cells : int, optional
        Distinct cells, reported in every row; default: from the cell ids (cell rows) or the
        largest per-seed count (counts).

    Returns
    -------
    list of (role, TestResult)
        Roles ``primary``, ``sensitivity`` and ``secondary``; the first is the primary test.
        When every patient's difference is the same non-zero value the paired t is undefined
        and the primary row is the exact sign test instead (named in ``method``).
    """
    primary = look_up_option(primary, ("patient_t", "gee"), what="primary test")
    if "n" in paired.columns:
        counts, sizes = paired, _count_sizes(paired)
    else:
        counts, sizes = paired_counts(paired), _sizes(paired)
    if n_cells is not None:
        sizes["n_cells"] = int(n_cells)
    return _compare_counts(
        counts, sizes, primary=primary, alpha=alpha, n_resamples=n_resamples, seed=seed, secondary=secondary
    )


def _compare_counts(counts, sizes, *, primary, alpha, n_resamples, seed, secondary):
    pat = patient_accuracy(counts)
    n_pat = len(pat)
    out: list[tuple[str, TestResult]] = []

    def patient_t() -> TestResult:
        if n_pat < 2:
            return TestResult(
                "paired t (patients)",
                float(pat["diff"].mean()) if n_pat else NAN,
                alpha=alpha,
                note=f"not computed: needs at least 2 patients; got {n_pat}",
                **sizes,
            )
        r = paired_t_test(pat["acc_a"], pat["acc_b"], alpha=alpha)
        r = r.replace(method="paired t (patients)", ci_method=f"t, df={n_pat - 1}", **sizes)
        if math.isnan(r.pvalue) and not math.isnan(r.estimate):
            # Every patient changed by the same amount: the t-test is undefined, the sign test is not.
            st = sign_test(pat["acc_a"], pat["acc_b"], alpha=alpha)
            r = st.replace(method="exact sign test (patients; paired t undefined)", note=r.note, **sizes)
        return r

    def gee() -> TestResult:
        return gee_test(counts, alpha=alpha).replace(**sizes)

    first, other = (patient_t, gee) if primary == "patient_t" else (gee, patient_t)
    out.append(("primary", first()))
    if not secondary:
        return out
    out.append(("sensitivity", other()))
    if n_pat >= 2:
        w = wilcoxon_test(pat["acc_a"], pat["acc_b"], method="exact")
        w = w.replace(
            method=w.method.replace("Wilcoxon signed-rank", "Wilcoxon signed-rank (patients)"),
            scale="median patient difference",
            alpha=alpha,
        )
        out.append(("sensitivity", w.replace(**sizes)))
    if n_resamples and n_pat >= 2:
        ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        s1, s2, s3 = ss.spawn(3)
        bt = patient_bootstrap(pat["diff"], n_resamples=n_resamples, alpha=alpha, seed=s1)
        bt = bt.replace(method="patient cluster bootstrap-t (mean of patient differences)")
        out.append(("sensitivity", bt.replace(**sizes)))
        diff_sums = pat["correct_b"] - pat["correct_a"]
        pooled = patient_bootstrap(diff_sums, pat["n"], n_resamples=n_resamples, alpha=alpha, seed=s2)
        out.append(("sensitivity", pooled.replace(method="patient cluster bootstrap-t (pooled over cells)", **sizes)))
        if n_pat >= 30:
            pc = patient_bootstrap(pat["diff"], n_resamples=n_resamples, alpha=alpha, seed=s3, method="percentile")
            out.append(("sensitivity", pc.replace(note=">= 30 patients: percentile bootstrap reported", **sizes)))
    mc = mcnemar_test(_counts_table(counts))
    out.append(("secondary", mc.replace(alpha=alpha, **sizes)))
    folds = _fold_differences(counts)
    n_folds = int(counts["fold"].nunique())
    if n_folds >= 2 and len(folds) >= 2:
        total = counts.groupby("seed", observed=True)["n"].sum().mean()
        ratio = float(np.mean(folds["n_test"] / np.maximum(total - folds["n_test"], 1)))
        nb = corrected_resampled_t_test(folds["diff"], test_train_ratio=ratio, alpha=alpha)
        nb = nb.replace(
            note=(nb.note + "; " if nb.note else "") + f"{len(folds)} seed x fold results, n_test/n_train = {ratio:.3g}"
        )
        out.append(("secondary", nb.replace(**sizes)))
    seeds = sorted(counts["seed"].unique())
    if n_folds == 2 and len(seeds) >= 5:
        grid = folds[folds["seed"].isin(seeds[:5])].pivot(index="seed", columns="fold", values="diff")
        if grid.shape == (5, 2) and np.all(np.isfinite(grid.to_numpy())):
            cv = five_by_two_cv_test(grid.to_numpy())
            note = "first 5 seeds x the 2 patient-grouped folds of the protocol's split"
            out.append(("secondary", cv.replace(alpha=alpha, note=note, **sizes)))
    return out


# --------------------------------------------------------------------------- simulation
def simulate_paired_correctness(
    patients: int = 10,
    cells: int = 50,
    *,
    runs: int = 1,
    accuracy: float = 0.8,
    patient_sd: float = 1.0,
    cell_sd: float = 1.0,
    effect_mean: float = 0.0,
    effect_sd: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate paired correctness of cells under two conditions, with patient effects.

    On the logit scale, cell j of patient i is correct under condition A with
    ``logit(accuracy) + u_i + e_ij - v_i / 2`` and under B with ``... + v_i / 2``:
    ``u_i ~ N(0, patient_sd)`` (patient difficulty), ``e_ij ~ N(0, cell_sd)`` (cell
    difficulty, shared by both conditions, so the pairs are correlated) and
    ``v_i ~ N(effect_mean, effect_sd)`` the patient-specific effect of the condition.
    Splitting ``v_i`` symmetrically makes the null exact: with ``effect_mean = 0`` the
    per-patient accuracy differences are symmetric about 0.

    Returns
    -------
    correct_a, correct_b : (runs, patients, cells) bool ndarray

    Examples
    --------
    >>> a, b = simulate_paired_correctness(4, 5, runs=2, seed=0)
    >>> a.shape, a.dtype
    ((2, 4, 5), dtype('bool'))
    """
    if not 0 < accuracy < 1:
        raise CellbgError(f"accuracy must be in (0, 1); got {accuracy}")
    if patients < 1 or cells < 1 or runs < 1:
        raise CellbgError("patients, cells and runs must be >= 1")
    rng = np.random.default_rng(seed)
    base = math.log(accuracy / (1 - accuracy))
    u = rng.normal(0, patient_sd, (runs, patients, 1))
    v = rng.normal(effect_mean, effect_sd, (runs, patients, 1))
    e = rng.normal(0, cell_sd, (runs, patients, cells))
    logit = base + u + e
    pa = 1 / (1 + np.exp(-(logit - v / 2)))
    pb = 1 / (1 + np.exp(-(logit + v / 2)))
    return rng.random(pa.shape) < pa, rng.random(pb.shape) < pb
