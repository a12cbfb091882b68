"""Statistics: is the accuracy gap between two conditions real?

Pure functions over the predictions table (one row per cell x model x train variant x test
variant x seed x fold). A *condition* is ``"train_variant:test_variant"``. Every test returns
a frozen :class:`TestResult` that prints well and becomes one row of ``stats/tests.csv``.

The unit of inference is the **patient**: cells are nested in patients, and removing the
background can help one patient and hurt another, so cell-level tests (McNemar) reject a true
null far too often. The primary test averages correctness within each patient and compares
the per-patient accuracies with a paired t-test (df = patients - 1); a GEE logistic model
clustered by patient with the bias-reduced (Mancl-DeRouen) covariance is the alternative for
very unequal cell counts. See ``docs/statistics.md``.

Library code is used where it exists (scipy: t, Wilcoxon; statsmodels: McNemar, Holm/BH,
GEE). Written here, because no library has them: the patient cluster bootstrap-t, the
Nadeau-Bengio corrected resampled t-test and Dietterich's 5x2cv t-test.

The package's files name their parts: ``_core`` (the tests, their result objects and one
comparison's battery), ``_table`` (the predictions table read lazily and reduced to counts),
``_stage`` (``run_stats``: the stage that writes ``stats/``), ``_common`` (input checks).

This package never imports torch.

Examples
--------
>>> r = paired_t_test([0.7, 0.8, 0.6, 0.9], [0.6, 0.8, 0.5, 0.7])
>>> round(r.estimate, 3), r.df
(-0.1, 3.0)
"""

from cellbg.stats._common import _split_condition  # noqa: F401  (cellbg.report uses it)
from cellbg.stats._core import (
    GEEFit,
    TestResult,
    accuracy_table,
    adjust_pvalues,
    cluster_sums,
    compare_conditions,
    corrected_resampled_t_test,
    five_by_two_cv_test,
    gee_fit,
    gee_test,
    mcnemar_test,
    paired_counts,
    paired_outcomes,
    paired_t_test,
    paired_table,
    patient_accuracy,
    patient_bootstrap,
    sign_test,
    simulate_paired_correctness,
    wilcoxon_test,
)
from cellbg.stats._stage import TESTS_COLUMNS, run_stats

__all__ = [
    "TestResult",
    "GEEFit",
    "paired_outcomes",
    "patient_accuracy",
    "paired_t_test",
    "wilcoxon_test",
    "sign_test",
    "cluster_sums",
    "patient_bootstrap",
    "paired_table",
    "paired_counts",
    "mcnemar_test",
    "gee_fit",
    "gee_test",
    "corrected_resampled_t_test",
    "five_by_two_cv_test",
    "adjust_pvalues",
    "accuracy_table",
    "compare_conditions",
    "simulate_paired_correctness",
    "run_stats",
    "TESTS_COLUMNS",
]
