"""Tests of cellbg.stats: known answers through cellbg's own functions, calibration, the stage."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from cellbg._checks import CellbgError
from cellbg.protocol import Comparison, Protocol, write_resolved
from cellbg.stats import (
    TESTS_COLUMNS,
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
    run_stats,
    sign_test,
    simulate_paired_correctness,
    wilcoxon_test,
)

CONTRACT_COLUMNS = [
    "family", "role", "model", "comparison", "a", "b", "estimate", "ci_low", "ci_high", "ci_method",
    "statistic", "df", "pvalue", "p_holm", "p_bh", "method", "n_cells", "n_patients", "n_seeds",
    "mcnemar_b", "mcnemar_c",
]  # fmt: skip


# --------------------------------------------------------------------------- fixtures
def make_predictions(
    *,
    patients: int = 8,
    cells: int = 20,
    models=("resnet",),
    train=("original", "only_fg"),
    test=("original", "only_fg", "mixed_same", "mixed_rand"),
    seeds=(0, 1),
    folds: int = 2,
    effects: dict[str, float] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """A predictions table on the contract: logit(correct) = 1 + patient + cell + effect."""
    effects = effects or {}
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"P{i:02d}" for i in range(patients)], cells)
    cell_id = np.array([f"img{i // 5:03d}-{i % cells:04d}" for i in range(patients * cells)])
    cell_id = np.char.add(np.char.add(pid.astype(str), "-"), cell_id)
    label_index = np.tile(np.arange(cells) % 2, patients)
    labels = np.array(["healthy", "sezary"])[label_index]
    fold = np.repeat(np.arange(patients) % folds, cells)
    u = np.repeat(rng.normal(0, 0.7, patients), cells)
    e = rng.normal(0, 0.7, patients * cells)
    frames = []
    for model in models:
        for tr in train:
            for te in test:
                cond = f"{tr}:{te}"
                for s in seeds:
                    logit = 1.0 + u + e + effects.get(cond, 0.0) + rng.normal(0, 0.3, u.size)
                    correct = rng.random(u.size) < 1 / (1 + np.exp(-logit))
                    pred_index = np.where(correct, label_index, 1 - label_index)
                    p1 = np.where(pred_index == 1, 0.8, 0.2)
                    frames.append(
                        pd.DataFrame(
                            {
                                "cell_id": cell_id, "image_id": [c.rsplit("-", 1)[0] for c in cell_id],
                                "patient_id": pid, "label": labels, "label_index": label_index,
                                "model": model, "train_variant": tr, "test_variant": te, "seed": s,
                                "fold": fold, "pred": np.array(["healthy", "sezary"])[pred_index],
                                "pred_index": pred_index, "correct": correct, "prob_healthy": 1 - p1,
                                "prob_sezary": p1,
                                "partner_cell_id": np.roll(cell_id, 1) if te.startswith("mixed") else "",
                            }
                        )
                    )  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def make_run(tmp_path: Path, preds: pd.DataFrame, *, extra_test=(), **stats) -> Path:
    run = tmp_path / "run"
    models = [{"arch": "resnet", "depth": 10, "label": m} for m in sorted(preds["model"].unique())]
    p = Protocol.model_validate(
        {"name": "stats-test", "output": str(run), "models": models, "stats": {"bootstrap": 199, **stats},
         "variants": {"train": sorted(preds["train_variant"].unique(), key=lambda v: v != "original"),
                      "test": sorted(preds["test_variant"].unique()) + list(extra_test)}}
    )  # fmt: skip
    run.mkdir(parents=True, exist_ok=True)
    write_resolved(p)
    preds.to_parquet(run / "predictions.parquet", index=False)
    return run


# --------------------------------------------------------------------------- known answers
def test_mcnemar_agresti_presidential_approval():
    # Agresti (2002), Categorical Data Analysis, table 10.1.
    table = [[794, 150], [86, 570]]
    r = mcnemar_test(table)
    assert r.statistic == pytest.approx(16.818, abs=5e-4)
    assert r.pvalue == pytest.approx(4.115e-05, rel=1e-3)
    assert (r.mcnemar_b, r.mcnemar_c, r.df) == (150, 86, 1.0)
    assert r.estimate == pytest.approx((86 - 150) / 1600)
    r2 = mcnemar_test(table, correction=False)
    assert r2.statistic == pytest.approx(17.356, abs=5e-4)
    assert r2.pvalue == pytest.approx(3.099e-05, rel=1e-3)


def test_mcnemar_exact_when_few_discordant_pairs():
    r = mcnemar_test([[40, 3], [10, 30]])  # b + c = 13 < 25 -> exact binomial
    assert r.method.startswith("McNemar exact")
    assert r.pvalue == pytest.approx(sps.binomtest(3, 13, 0.5).pvalue)
    assert paired_table([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]).tolist() == [[2, 1], [2, 0]]


def test_paired_t_r_sleep():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)
    g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    r = paired_t_test(g2, g1)  # estimate = g1 - g2, as R's group1 - group2
    assert r.statistic == pytest.approx(-4.0621, abs=5e-5)
    assert r.df == 9
    assert r.pvalue == pytest.approx(0.002833, abs=5e-7)
    assert r.estimate == pytest.approx(-1.58)
    assert r.ci == pytest.approx((-2.4598858, -0.7001142), abs=1e-6)


BH_1995 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240,
           0.4262, 0.5719, 0.6528, 0.7590, 1.0000]  # fmt: skip


def test_benjamini_hochberg_1995_example():
    assert (adjust_pvalues(BH_1995, "bh") <= 0.05).sum() == 4
    assert (adjust_pvalues(BH_1995, "holm") <= 0.05).sum() == 3
    # NaNs are carried through, not adjusted
    out = adjust_pvalues([0.01, np.nan, 0.02], "holm")
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)


def _epil() -> pd.DataFrame:
    import statsmodels

    return pd.read_csv(Path(statsmodels.__file__).parent / "genmod" / "tests" / "results" / "epil.csv")


def test_gee_epil_matches_statsmodels_documentation():
    # statsmodels docs, "Generalized Estimating Equations": Poisson, exchangeable, robust SE.
    fit = gee_fit(_epil(), "y ~ age + trt + base", groups="subject", family="poisson", cov_type="robust")
    names = ["Intercept", "age", "trt[T.progabide]", "base"]
    assert fit.params[names].to_numpy() == pytest.approx([0.5730, 0.0223, -0.1519, 0.0226], abs=5e-5)
    assert fit.bse[names].to_numpy() == pytest.approx([0.361, 0.011, 0.171, 0.001], abs=5e-4)
    assert fit.df == 58 and fit.n_groups == 59 and fit.n_obs == 236
    t = fit.params / fit.bse
    assert fit.pvalues.to_numpy() == pytest.approx(2 * sps.t.sf(np.abs(t), 58))
    # Mancl-DeRouen inflates the sandwich; the coefficients do not change.
    br = gee_fit(_epil(), "y ~ age + trt + base", groups="subject", family="poisson")
    assert br.cov_type == "bias_reduced"
    assert br.params.to_numpy() == pytest.approx(fit.params.to_numpy())
    assert np.all(br.bse.to_numpy() > fit.bse.to_numpy())
    assert "bias_reduced" in str(br)


def test_nadeau_bengio_known_value_and_limit():
    r = corrected_resampled_t_test([0.02, 0.05, 0.01, 0.04, 0.03], test_train_ratio=0.25)
    assert r.statistic == pytest.approx(0.03 / math.sqrt((1 / 5 + 0.25) * 0.00025))
    assert r.df == 4
    # With no overlap correction it is the one-sample t-test.
    d = [0.02, 0.05, 0.01, 0.04, 0.035]
    tiny = corrected_resampled_t_test(d, test_train_ratio=1e-12)
    assert tiny.pvalue == pytest.approx(sps.ttest_1samp(d, 0).pvalue, rel=1e-6)


def test_five_by_two_cv_known_value():
    d = [[0.1, 0.0], [0.05, 0.05], [0.02, 0.08], [0.06, 0.04], [0.03, 0.07]]
    r = five_by_two_cv_test(d)
    # s_i^2 = 0.005, 0, 0.0018, 0.0002, 0.0008; t = 0.1 / sqrt(0.00156)
    assert r.statistic == pytest.approx(0.1 / math.sqrt(0.00156))
    assert r.pvalue == pytest.approx(2 * sps.t.sf(r.statistic, 5))
    with pytest.raises(CellbgError, match="shape"):
        five_by_two_cv_test(np.zeros((5, 3)))


def test_wilcoxon_exact_small_sample():
    r = wilcoxon_test([1, 2, 3, 4, 5, 6], [2, 4, 5, 7, 8, 10])
    assert r.pvalue == pytest.approx(2 / 2**6)
    assert r.estimate == pytest.approx(2.5)  # median of 1, 2, 2, 3, 3, 4


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_resampling_sums_equals_resampling_rows():
    rng = np.random.default_rng(3)
    patients = rng.integers(0, 6, 300)
    diff = rng.integers(-1, 2, 300).astype(float)
    sums, counts, labels = cluster_sums(diff, patients)
    r = patient_bootstrap(sums, counts, n_resamples=500, seed=11)
    # Brute force: the same patient draws, but concatenating the rows of each drawn patient.
    idx = np.random.default_rng(11).integers(0, labels.size, size=(500, labels.size))
    rows_of = [diff[patients == lab] for lab in labels]
    theta = diff.mean()
    thetas, ses = [], []
    for draw in idx:
        parts = [rows_of[i] for i in draw]
        pooled = np.concatenate(parts)
        th = pooled.mean()
        resid = np.array([p.sum() - th * p.size for p in parts])
        ses.append(math.sqrt(labels.size / (labels.size - 1) * (resid**2).sum()) / pooled.size)
        thetas.append(th)
    resid0 = np.array([p.sum() - theta * p.size for p in rows_of])
    se0 = math.sqrt(labels.size / (labels.size - 1) * (resid0**2).sum()) / diff.size
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = (np.array(thetas) - theta) / np.array(ses)
    t_star = np.sort(t_star[np.isfinite(t_star)])
    j = math.ceil((t_star.size + 1) * 0.025) - 1  # the j-th smallest and largest (equal-tailed, inverted p)
    q_lo, q_hi = t_star[j - 1], t_star[t_star.size - j]
    assert r.estimate == pytest.approx(theta)
    assert r.ci == pytest.approx((theta - q_hi * se0, theta - q_lo * se0))


def test_bootstrap_t_statistic_is_the_paired_t_and_deterministic():
    d = np.array([0.1, -0.05, 0.2, 0.0, 0.12, 0.07, -0.02])
    r = patient_bootstrap(d, n_resamples=999, seed=5)
    assert r.statistic == pytest.approx(sps.ttest_1samp(d, 0).statistic)
    assert r.ci_low < d.mean() < r.ci_high
    assert r == patient_bootstrap(d, n_resamples=999, seed=5)
    assert r.ci != patient_bootstrap(d, n_resamples=999, seed=6).ci


def test_percentile_bootstrap_refused_with_few_patients():
    with pytest.raises(CellbgError, match="30 patients"):
        patient_bootstrap(np.arange(10.0), method="percentile")
    r = patient_bootstrap(np.random.default_rng(0).normal(0.1, 0.1, 40), method="percentile", seed=0)
    assert r.ci_low < 0.1 < r.ci_high and "percentile" in r.ci_method


def test_bootstrap_t_covers_better_than_percentile_would_with_few_patients():
    # 10 patients, skewed per-patient differences: bootstrap-t coverage near 95%.
    rng = np.random.default_rng(1)
    hits = 0
    sims = 150
    for k in range(sims):
        d = rng.exponential(0.1, 10) - 0.1  # mean 0
        r = patient_bootstrap(d, n_resamples=399, seed=k)
        hits += r.ci_low <= 0 <= r.ci_high
    # Binomial SE at 0.95 with 150 sims is 0.018; accept 0.85..1.
    assert hits / sims >= 0.85


# --------------------------------------------------------------------------- calibration
def test_primary_test_is_calibrated_and_mcnemar_is_not():
    # Fast version of benchmarks/bench_stats_calibration.py: 400 runs. The binomial SE of a
    # 5% rejection rate is sqrt(0.05 * 0.95 / 400) = 0.011, so 3 SE gives the band 1.7%..8.3%.
    runs = 400
    a, b = simulate_paired_correctness(10, 50, runs=runs, effect_sd=0.5, seed=2024)
    acc_a, acc_b = a.mean(2), b.mean(2)
    p_t = np.array([paired_t_test(acc_a[i], acc_b[i]).pvalue for i in range(runs)])
    p_mc = np.array([mcnemar_test(paired_table(a[i], b[i])).pvalue for i in range(runs)])
    rate_t = np.mean(p_t < 0.05)
    rate_mc = np.mean(p_mc < 0.05)
    assert 0.017 <= rate_t <= 0.083, rate_t
    assert rate_mc > 0.10, rate_mc  # cell-level McNemar ignores the patient effect
    # With a true effect the primary test has power.
    a1, b1 = simulate_paired_correctness(10, 50, runs=100, effect_mean=1.0, effect_sd=0.5, seed=7)
    p1 = np.array([paired_t_test(a1[i].mean(1), b1[i].mean(1)).pvalue for i in range(100)])
    assert np.mean(p1 < 0.05) > 0.8


# --------------------------------------------------------------------------- pairing and effects
def test_paired_outcomes_and_patient_accuracy_by_hand():
    preds = make_predictions(patients=4, cells=6, seeds=(0,), test=("original", "only_fg"))
    paired = paired_outcomes(preds, "original:original", "original:only_fg")
    assert len(paired) == 24
    a = preds[(preds.train_variant == "original") & (preds.test_variant == "original")]
    b = preds[(preds.train_variant == "original") & (preds.test_variant == "only_fg")]
    pat = patient_accuracy(paired)
    want = b.groupby("patient_id")["correct"].mean() - a.groupby("patient_id")["correct"].mean()
    assert pat["diff"].to_numpy() == pytest.approx(want.sort_index().to_numpy())
    with pytest.raises(CellbgError, match="did you mean 'original:only_fg'"):
        paired_outcomes(preds, "original:original", "original:only_f")
    with pytest.raises(CellbgError, match="duplicate"):
        paired_outcomes(pd.concat([preds, preds.iloc[:1]]), "original:original", "original:only_fg")


def test_accuracy_table_means_over_seeds():
    preds = make_predictions(patients=4, cells=10, seeds=(0, 1, 2), test=("original",), train=("original",))
    acc = accuracy_table(preds)
    per_seed = preds.groupby("seed")["correct"].mean()
    row = acc.iloc[0]
    assert row["accuracy"] == pytest.approx(per_seed.mean())
    assert row["accuracy_sd"] == pytest.approx(per_seed.std(ddof=1))
    bal = preds.groupby(["seed", "label"])["correct"].mean().groupby("seed").mean()
    assert row["balanced_accuracy"] == pytest.approx(bal.mean())
    assert (row["n_cells"], row["n_patients"], row["n_seeds"], row["condition"]) == (40, 4, 3, "original:original")


def test_gee_test_detects_a_planted_effect():
    preds = make_predictions(
        patients=10, cells=30, seeds=(0,), test=("original", "only_fg"), effects={"original:only_fg": -1.5}
    )
    paired = paired_outcomes(preds, "original:original", "original:only_fg")
    r = gee_test(paired)
    assert r.pvalue < 0.01 and r.df == 9 and "log odds ratio" in r.note
    # the estimate is the marginal accuracy difference: with one binary covariate the GEE's
    # fitted marginal means are the observed accuracies
    pooled = paired["correct_b"].mean() - paired["correct_a"].mean()
    assert r.estimate == pytest.approx(pooled, abs=0.02) and r.ci_low < r.estimate < r.ci_high < 0


def test_compare_conditions_roles_and_fold_tests():
    preds = make_predictions(patients=10, cells=10, seeds=(0, 1, 2, 3, 4), folds=2, test=("original", "only_fg"))
    paired = paired_outcomes(preds, "original:original", "original:only_fg")
    tests = compare_conditions(paired, n_resamples=99, seed=0)
    methods = [r.method for _, r in tests]
    assert tests[0][0] == "primary" and tests[0][1].method == "paired t (patients)"
    assert any(m.startswith("Nadeau-Bengio") for m in methods)
    assert any(m.startswith("Dietterich 5x2cv") for m in methods)
    assert not any("percentile" in m for m in methods)  # 10 patients < 30
    primary = tests[0][1]
    pat = patient_accuracy(paired)
    assert primary.pvalue == pytest.approx(sps.ttest_rel(pat.acc_b, pat.acc_a).pvalue)
    assert (primary.n_cells, primary.n_patients, primary.n_seeds) == (100, 10, 5)


# --------------------------------------------------------------------------- result objects
def test_result_is_frozen_prints_and_becomes_a_row():
    r = mcnemar_test([[794, 150], [86, 570]])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.pvalue = 0.5  # type: ignore[misc]
    text = str(r)
    assert "McNemar" in text and "b = 150" in text and "conditional" in text
    row = r.to_row()
    assert row["mcnemar_b"] == 150 and row["statistic"] == pytest.approx(16.818, abs=5e-4)
    assert isinstance(r, TestResult)


def test_bad_input_is_one_line_error():
    with pytest.raises(CellbgError, match="pair up"):
        paired_t_test([1, 2, 3], [1, 2])
    with pytest.raises(CellbgError, match="2x2"):
        mcnemar_test([[1, 2, 3]])
    with pytest.raises(CellbgError, match="alpha"):
        paired_t_test([1, 2], [2, 3], alpha=5)
    with pytest.raises(CellbgError, match="did you mean 'holm'"):
        adjust_pvalues([0.1], "hollm")


def test_stats_never_imports_torch():
    code = "import sys, cellbg.stats; cellbg.stats.run_stats; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- the stage
def test_run_stats_writes_contract_files(tmp_path):
    preds = make_predictions(
        patients=8,
        cells=15,
        models=("resnet", "shufflenet"),
        effects={"original:only_fg": -1.2, "original:mixed_rand": -0.8},
    )
    run = make_run(tmp_path, preds, confirmatory=[Comparison(a="original:original", b="original:only_fg")])
    table = run_stats(run)
    on_disk = pd.read_csv(run / "stats" / "tests.csv")
    assert list(on_disk.columns[: len(CONTRACT_COLUMNS)]) == CONTRACT_COLUMNS
    assert list(on_disk.columns) == list(table.columns) and set(TESTS_COLUMNS) <= set(table.columns)
    conf = on_disk[(on_disk.family == "confirmatory") & (on_disk.role == "primary")]
    assert list(conf.model) == ["resnet", "shufflenet"]
    # estimate = mean over patients of per-patient accuracy differences, by hand
    for model in ("resnet", "shufflenet"):
        m = preds[(preds.model == model) & (preds.train_variant == "original")]
        acc = m.groupby(["test_variant", "patient_id"])["correct"].mean()
        d = acc["only_fg"] - acc["original"]
        row = conf[conf.model == model].iloc[0]
        assert row.estimate == pytest.approx(d.mean())
        assert row.pvalue == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
        assert (row.a, row.b, row.n_patients, row.n_seeds, row.df) == ("original:original", "original:only_fg", 8, 2, 7)
    # Holm over the two confirmatory primary tests
    p = np.sort(conf.pvalue.to_numpy())
    assert np.sort(conf.p_holm.to_numpy()) == pytest.approx([min(1, 2 * p[0]), min(1, max(2 * p[0], p[1]))])
    assert conf.pvalue.max() < 0.05  # planted effect is found
    # secondary rows carry McNemar counts; adjusted p only on primary rows
    mc = on_disk[(on_disk.family == "confirmatory") & on_disk.method.str.startswith("McNemar")]
    assert len(mc) == 2 and mc.mcnemar_b.notna().all() and mc.p_holm.isna().all()
    # exploratory: every condition vs original:original, BH-adjusted, and BG-GAP
    ex = on_disk[(on_disk.family == "exploratory") & (on_disk.role == "primary")]
    assert len(ex) == 2 * (7 + 2)  # 8 conditions - reference + one BG-GAP per train variant
    assert ex.p_bh.to_numpy() == pytest.approx(adjust_pvalues(ex.pvalue, "bh"))
    gap = ex[(ex.model == "resnet") & (ex.name == "BG-GAP (original)")].iloc[0]
    sub = preds[(preds.model == "resnet") & (preds.train_variant == "original")]
    acc = sub.groupby(["test_variant", "patient_id"])["correct"].mean()
    assert gap.estimate == pytest.approx((acc["mixed_same"] - acc["mixed_rand"]).mean())
    # accuracy.csv and summary.md
    acc_csv = pd.read_csv(run / "stats" / "accuracy.csv")
    assert len(acc_csv) == 2 * 2 * 4
    assert {"accuracy", "accuracy_sd", "n_cells", "balanced_accuracy"} <= set(acc_csv.columns)
    summary = (run / "stats" / "summary.md").read_text()
    assert "unit of inference is the patient" in summary and "not reported: 8 patients < 30" in summary
    # deterministic: a second run writes the same bytes
    first = (run / "stats" / "tests.csv").read_bytes()
    run_stats(run)
    assert (run / "stats" / "tests.csv").read_bytes() == first


def test_run_stats_gee_primary_and_saliency_family(tmp_path):
    preds = make_predictions(patients=6, cells=10, seeds=(0,), test=("original", "only_fg"))
    run = make_run(tmp_path, preds, primary="gee", exploratory=False)
    rng = np.random.default_rng(0)
    cells = preds.drop_duplicates("cell_id")[["cell_id", "patient_id", "label", "fold"]]
    sal = pd.concat(
        [cells.assign(model="resnet", train_variant=tv, seed=0, method="gradcam", target=target,
                      background_share=rng.uniform(0.1, 0.3, len(cells)) + shift,
                      background_ratio=1.0, sanity_rank_corr=0.1, map_index=0)
         for target in ("predicted", "true")
         for tv, shift in (("original", 0.3), ("only_fg", 0.0))]
    )  # fmt: skip
    sal.to_parquet(run / "saliency.parquet", index=False)
    table = run_stats(run)
    conf = table[(table.family == "confirmatory") & (table.role == "primary")].iloc[0]
    assert conf.method.startswith("GEE") and conf.df == 5 and conf.scale == "accuracy difference (GEE marginal)"
    assert (table.family == "exploratory").sum() == 0
    s = table[table.family == "saliency"]
    # maps for the predicted and for the true class are separate analyses, never pooled
    assert s.saliency_method.tolist() == ["gradcam (predicted class)", "gradcam (true class)"]
    for row, target in zip(s.itertuples(), ("predicted", "true"), strict=True):
        per = sal[sal.target == target].groupby(["train_variant", "patient_id"])["background_share"].mean()
        assert row.estimate == pytest.approx((per["only_fg"] - per["original"]).mean())
        assert row.n_cells == len(cells) and row.pvalue < 0.01
    assert s.p_holm.to_numpy() == pytest.approx(adjust_pvalues(s.pvalue, "holm"))


def test_run_stats_user_errors(tmp_path):
    with pytest.raises(CellbgError, match="run folder not found"):
        run_stats(tmp_path / "nope")
    preds = make_predictions(patients=3, cells=4, seeds=(0,), test=("original", "only_fg"))
    run = make_run(
        tmp_path, preds, confirmatory=[Comparison(a="original:original", b="original:no_fg")], extra_test=["no_fg"]
    )  # planned, but the predictions lack it
    want = (
        r"condition 'original:no_fg' has no predictions for model 'resnet' \(did you mean 'original:only_fg'\?\); "
        r"available: only_fg:only_fg"
    )
    with pytest.raises(CellbgError, match=want):
        run_stats(run)
    preds.drop(columns=["correct"]).to_parquet(run / "predictions.parquet")
    with pytest.raises(CellbgError, match=r"lacks columns \['correct'\]"):
        run_stats(run)
    (run / "predictions.parquet").unlink()
    with pytest.raises(CellbgError, match="run `cellbg train` first"):
        run_stats(run)
    assert not (run / "stats" / "tests.csv").exists()


def test_cli_stats(tmp_path):
    from cellbg.cli import app

    preds = make_predictions(patients=5, cells=6, seeds=(0,), test=("original", "only_fg"))
    run = make_run(tmp_path, preds)
    res = CliRunner().invoke(app, ["stats", str(run)])
    assert res.exit_code == 0, res.output
    written = pd.read_csv(run / "stats" / "tests.csv")
    assert f"{len(written)} tests; primary rows" in res.output
    assert "confirmatory resnet original:original vs original:only_fg" in res.output
    assert (run / "stats" / "summary.md").exists()
    bad = CliRunner().invoke(app, ["stats", str(tmp_path / "missing")])
    assert bad.exit_code == 2


def test_default_confirmatory_is_bg_gap_when_the_mixed_variants_are_tested(tmp_path):
    # A planted background cue (mixed_rand loses accuracy) is the default confirmatory test,
    # BG-GAP = acc(mixed_same) - acc(mixed_rand) per patient, Holm over the models.
    preds = make_predictions(
        patients=8, cells=15, models=("resnet", "shufflenet"), effects={"original:mixed_rand": -1.5}
    )
    table = run_stats(make_run(tmp_path, preds))
    conf = table[(table.family == "confirmatory") & (table.role == "primary")]
    gap = ("original:mixed_rand", "original:mixed_same")
    assert list(zip(conf.model, conf.a, conf.b, strict=True)) == [("resnet", *gap), ("shufflenet", *gap)]
    for row in conf.itertuples():
        m = preds[(preds.model == row.model) & (preds.train_variant == "original")]
        acc = m.groupby(["test_variant", "patient_id"])["correct"].mean()
        assert row.estimate == pytest.approx((acc["mixed_same"] - acc["mixed_rand"]).mean())
        assert row.estimate > 0 and row.p_holm < 0.05
    # Without the mixed variants the default falls back to the only_fg drop.
    few = make_predictions(patients=5, cells=6, seeds=(0,), test=("original", "only_fg"))
    table = run_stats(make_run(tmp_path / "few", few))
    conf = table[(table.family == "confirmatory") & (table.role == "primary")].iloc[0]
    assert (conf.a, conf.b) == ("original:original", "original:only_fg")


def test_percentile_bootstrap_only_from_30_patients(tmp_path):
    preds = make_predictions(patients=30, cells=4, seeds=(0,), folds=3, test=("original", "only_fg"))
    run = make_run(tmp_path, preds, exploratory=False)
    table = run_stats(run)
    pct = table[table.method == "patient cluster bootstrap (percentile)"]
    assert len(pct) == 1 and pct.iloc[0].n_patients == 30 and pct.iloc[0].n_resamples == 199
    assert "Percentile patient bootstrap intervals are reported" in (run / "stats" / "summary.md").read_text()


# --------------------------------------------------------------------------- degenerate cases (issue 16)
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_wilcoxon_methods_reproduce_r():
    # R: wilcox.test(extra[1:10], extra[11:20], paired = TRUE) on `sleep`:
    # "Wilcoxon signed rank test with continuity correction, V = 0, p-value = 0.009091"
    # (warnings: cannot compute exact p-value with ties / with zeroes).
    r = wilcoxon_test(SLEEP_2, SLEEP_1, method="R")
    assert r.statistic == 0 and r.pvalue == pytest.approx(0.009091, abs=5e-7)
    assert "normal approximation, continuity corrected" in r.method and "1 zero" in r.note and "tied" in r.note
    assert wilcoxon_test(SLEEP_2, SLEEP_1, method="approx").pvalue == r.pvalue
    # exact, conditional on the ties: the 9 non-zero differences all negative, 2 / 2**9
    ex = wilcoxon_test(SLEEP_2, SLEEP_1, method="exact")
    assert ex.pvalue == pytest.approx(2 / 2**9) and "conditional on ties" in ex.method
    # R ?wilcox.test, Hollander & Wolfe depression scores, no ties: exact,
    # wilcox.test(x, y, paired = TRUE, alternative = "greater"): V = 40, p-value = 0.01953 (= 10/512)
    x = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
    y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]
    hw = wilcoxon_test(y, x, method="R")
    assert hw.statistic == 40 and hw.pvalue == pytest.approx(2 * 10 / 512) and hw.method.endswith("(exact)")
    assert wilcoxon_test(y, x, method="exact").pvalue == hw.pvalue
    # the exact distribution with ties agrees with a brute-force enumeration of all sign patterns
    d = np.array([0.1, -0.2, 0.2, 0.3, 0.3, 0.3, -0.4, 0.5])
    ranks = sps.rankdata(np.abs(d))
    signs = np.array(np.meshgrid(*[[0, 1]] * d.size)).reshape(d.size, -1).T
    vs = signs @ ranks
    v = ranks[d > 0].sum()
    want = min(1.0, 2 * min(np.mean(vs <= v + 1e-9), np.mean(vs >= v - 1e-9)))
    assert wilcoxon_test(np.zeros(d.size), d, method="exact").pvalue == pytest.approx(want)
    with pytest.raises(CellbgError, match="did you mean 'exact'"):
        wilcoxon_test([1, 2], [2, 3], method="exakt")


def test_mcnemar_mid_p_fagerland_2013():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91: b = 1, c = 7.
    table = [[1, 1], [7, 12]]
    assert mcnemar_test(table, method="exact").pvalue == pytest.approx(0.0703125, abs=1e-12)
    mid = mcnemar_test(table, method="mid-p")
    assert mid.pvalue == pytest.approx(0.0390625, abs=1e-12) and mid.method == "McNemar mid-p"
    assert mcnemar_test([[5, 4], [4, 5]], method="mid-p").pvalue == 1.0  # b = c


def test_bonferroni_next_to_holm_and_bh():
    p = [0.01, 0.04, 0.03, 0.5]
    assert adjust_pvalues(p, "bonferroni").tolist() == pytest.approx([0.04, 0.16, 0.12, 1.0])
    assert np.all(adjust_pvalues(p, "holm") <= adjust_pvalues(p, "bonferroni"))
    assert (adjust_pvalues(BH_1995, "bonferroni") <= 0.05).sum() == 3


def test_constant_difference_is_decided_explicitly_not_by_rounding():
    # b - a is 0.1 in exact arithmetic but not in floating point (spread 6e-17: scipy's t = 7e15, p = 1e-78)
    a = np.array([1 / 3, 2 / 3, 0.7, 0.15, 0.6, 0.45])
    b = a + 0.1
    assert np.ptp(b - a) > 0
    for bb in (b, np.array([0.1 + x for x in a]), a + np.float64(0.1)):
        r = paired_t_test(a, bb)
        assert math.isnan(r.pvalue) and math.isnan(r.statistic) and r.estimate == pytest.approx(0.1)
        assert "not computed" in r.note and "0.1" in r.note
    zero = paired_t_test(a, a + 0.0)
    assert zero.pvalue == 1.0 and zero.estimate == 0.0
    # the sign test is defined: 6 equal positive differences, p = 2 / 2**6
    st = sign_test(a, b)
    assert st.pvalue == 2 / 2**6 and st.ci == pytest.approx((0.1, 0.1))
    # and is the primary when every patient changed by the same amount
    counts = pd.DataFrame(
        {
            "patient_id": [f"P{i}" for i in range(6)],
            "seed": 0,
            "fold": np.arange(6) % 2,
            "n": 10,
            "correct_a": 9,
            "correct_b": 8,
            "discordant_a": 1,
            "discordant_b": 0,
        }
    )
    (role, prim), *rest = compare_conditions(counts, n_resamples=99)
    assert prim.method == "exact sign test (patients; paired t undefined)"
    assert prim.pvalue == 2 / 2**6 and prim.estimate == pytest.approx(-0.1) and "not computed" in prim.note
    assert all(math.isnan(r.pvalue) for _, r in rest if r.method.startswith("patient cluster bootstrap-t"))


def test_bootstrap_ci_excludes_zero_iff_p_below_alpha():
    rng = np.random.default_rng(11)
    disagree = 0
    for k in range(300):
        d = rng.normal(rng.uniform(-0.06, 0.06), 0.08, 8)
        for method, dd in (("bootstrap-t", d), ("percentile", rng.normal(d.mean(), 0.1, 30))):
            r = patient_bootstrap(dd, n_resamples=199 + k % 3, seed=k, method=method)
            excludes = r.ci_low > 0 or r.ci_high < 0
            disagree += excludes != (r.pvalue < 0.05)
    assert disagree == 0


def _separated(patients=8, cells=20, seed=0):
    rng = np.random.default_rng(seed)
    pid = np.repeat([f"P{i}" for i in range(patients)], cells)
    return pd.DataFrame(
        {
            "cell_id": [f"c{i}" for i in range(pid.size)],
            "patient_id": pid,
            "label": "x",
            "seed": 0,
            "fold": 0,
            "correct_a": rng.random(pid.size) < 0.7,
            "correct_b": True,
        }
    )


def test_gee_separation_is_detected_and_falls_back_to_the_identity_link():
    paired = _separated()
    long = pd.DataFrame(
        {
            "correct": np.r_[paired.correct_a, paired.correct_b].astype(float),
            "condition": np.repeat([0.0, 1.0], len(paired)),
            "patient": paired.patient_id.tolist() * 2,
        }
    )
    # statsmodels alone "converges" to a log odds ratio of ~30 with a tiny p: gee_fit flags it
    fit = gee_fit(long, "correct ~ condition", groups="patient")
    assert fit.separation and "separation" in str(fit)
    r = gee_test(paired)
    assert r.method.startswith("GEE linear probability (identity link)")
    assert "condition B is right for every cell" in r.note and "separation" in r.note
    pat = patient_accuracy(paired)
    assert r.estimate == pytest.approx(pat["diff"].mean())  # equal cells per patient: pooled = mean
    t = paired_t_test(pat.acc_a, pat.acc_b)
    assert r.pvalue < 1e-3 and t.pvalue < 1e-3 and r.ci_low > 0
    # both conditions right for every cell: not estimable, with the reason; never "not significant"
    both = paired.assign(correct_a=True)
    nr = gee_test(both)
    assert math.isnan(nr.pvalue) and "not estimable" in nr.note and "same outcome" in nr.note


def test_gee_on_counts_equals_the_cell_level_gee():
    # issue 22: the GEE on binomial counts per patient x condition gives the estimates and the
    # (bias-reduced and robust) covariance of statsmodels' GEE on the cell rows, independence.
    preds = make_predictions(
        patients=7, cells=13, seeds=(0, 1), test=("original", "only_fg"), effects={"original:only_fg": -0.8}
    )
    preds = preds[~((preds.patient_id == "P00") & preds.cell_id.str.endswith(("1", "2", "3")))]  # unequal sizes
    paired = paired_outcomes(preds, "original:original", "original:only_fg")
    long = pd.DataFrame(
        {
            "correct": np.r_[paired.correct_a, paired.correct_b].astype(float),
            "condition": np.repeat([0.0, 1.0], len(paired)),
            "patient": np.r_[paired.patient_id.to_numpy(), paired.patient_id.to_numpy()],
        }
    )
    counts = paired_counts(paired)
    assert len(counts) < len(paired) and counts["n"].sum() == len(paired)
    for cov_type in ("bias_reduced", "robust"):
        cell = gee_fit(long, "correct ~ condition", groups="patient", cov_struct="independence", cov_type=cov_type)
        r = gee_test(counts, cov_type=cov_type)
        assert r.statistic == pytest.approx(cell.tvalues["condition"], rel=1e-6)
        assert r.pvalue == pytest.approx(cell.pvalues["condition"], rel=1e-6)
        assert r.df == cell.df == 6
        assert gee_test(paired, cov_type=cov_type) == r.replace(n_cells=paired.cell_id.nunique())
    # with equal cells per patient the exchangeable cell-level fit has the same estimate
    eq = paired_outcomes(
        make_predictions(patients=6, cells=10, seeds=(0,), test=("original", "only_fg")),
        "original:original",
        "original:only_fg",
    )
    long_eq = pd.DataFrame(
        {
            "correct": np.r_[eq.correct_a, eq.correct_b].astype(float),
            "condition": np.repeat([0.0, 1.0], len(eq)),
            "patient": np.r_[eq.patient_id.to_numpy(), eq.patient_id.to_numpy()],
        }
    )
    exch = gee_fit(long_eq, "correct ~ condition", groups="patient")
    assert float(gee_test(eq).note.split()[3]) == pytest.approx(exch.params["condition"], abs=5e-4)


def test_nan_correct_is_an_error_everywhere(tmp_path):
    preds = make_predictions(patients=4, cells=6, seeds=(0,), test=("original", "only_fg"))
    preds["correct"] = preds["correct"].astype(object)
    preds.loc[[3, 40], "correct"] = np.nan
    with pytest.raises(CellbgError, match=r"column 'correct' is missing \(NaN/None\) in 1 row\(s\) \(index 3\)"):
        paired_outcomes(preds, "original:original", "original:only_fg")
    paired = paired_outcomes(
        make_predictions(patients=4, cells=6, seeds=(0,), test=("original", "only_fg")),
        "original:original",
        "original:only_fg",
    )
    bad = paired.assign(correct_b=paired.correct_b.astype(float))
    bad.loc[5, "correct_b"] = np.nan
    for fn in (patient_accuracy, gee_test, paired_counts, compare_conditions):
        with pytest.raises(CellbgError, match=r"'correct_b' is missing .* \(index 5\)"):
            fn(bad)
    with pytest.raises(CellbgError, match="'correct_b' is missing"):
        paired_table(paired.correct_a, bad.correct_b)
    with pytest.raises(CellbgError, match="other values"):
        paired_table([1, 0, 2], [1, 1, 1])
    run = make_run(tmp_path, preds)
    with pytest.raises(CellbgError, match="'correct' is missing"):
        run_stats(run)
    assert not (run / "stats" / "tests.csv").exists()


def test_nan_p_reads_not_computed_never_not_significant(tmp_path):
    preds = make_predictions(patients=5, cells=6, seeds=(0,), test=("original", "only_fg"))
    preds["correct"] = True  # every cell right everywhere: no test can be computed
    run = make_run(tmp_path, preds, primary="gee", exploratory=False, bootstrap=0)
    table = run_stats(run)
    prim = table[(table.family == "confirmatory") & (table.role == "primary")].iloc[0]
    assert math.isnan(prim.pvalue) and "not estimable" in prim.note
    summary = (run / "stats" / "summary.md").read_text()
    line = next(ln for ln in summary.splitlines() if ln.startswith("- resnet"))
    assert "p not computed" in line and "not significant" not in line
    from cellbg.cli import app

    res = CliRunner().invoke(app, ["stats", str(run)])
    assert res.exit_code == 0 and "p not computed" in res.output and "p=nan" not in res.output


def test_report_with_no_confirmatory_comparison_and_a_not_computed_p(tmp_path):
    # issue 22: `confirmatory: []` made `cellbg report` fail with IndexError in _join;
    # issue 16: a NaN p must read "not computed" in the report too.
    from cellbg.report import write_report

    preds = make_predictions(patients=5, cells=6, seeds=(0,), test=("original", "only_fg"))
    preds.loc[preds.test_variant == "only_fg", "correct"] = True  # separation in every comparison with only_fg
    preds.loc[(preds.test_variant == "original") & (preds.train_variant == "original"), "correct"] = True
    run = make_run(tmp_path, preds, confirmatory=[], primary="gee", bootstrap=0)
    (run / "protocol.resolved.yaml").write_text(
        (run / "protocol.resolved.yaml").read_text().replace("figures: true", "figures: false")
    )
    table = run_stats(run)
    assert (table.family == "confirmatory").sum() == 0
    assert table[(table.family == "exploratory") & (table.role == "primary")].pvalue.isna().any()
    folder = write_report(run)
    text = (folder / "report.md").read_text()
    assert "No confirmatory comparison was planned" in text
    assert "not computed" in text and "it is not a negative result" in text


def test_validate_refuses_a_stats_section_that_cannot_be_carried_out(tmp_path):
    from cellbg.cli import app
    from cellbg.protocol import parse_protocol

    with pytest.raises(CellbgError, match="would test nothing"):
        parse_protocol("name: x\nstats: {confirmatory: [], exploratory: false}\n")
    with pytest.raises(CellbgError, match=r"'no_fgg' is not in variants.test .*did you mean 'no_fg'"):
        parse_protocol("name: x\nstats: {confirmatory: [{a: 'original:original', b: 'original:no_fgg'}]}\n")
    want = r"confirmatory\[0\].a = 'bg_blur\(2\):original': 'bg_blur\(2\)' is not in variants.train"
    with pytest.raises(CellbgError, match=want):
        parse_protocol("name: x\nstats: {confirmatory: [{a: 'bg_blur(2):original', b: 'original:only_fg'}]}\n")
    # no confirmatory comparison with the exploratory grid is a valid plan; spelling may differ
    assert parse_protocol("name: x\nstats: {confirmatory: []}\n").stats.confirmatory == []
    ok = (
        "name: x\nvariants: {test: [original, 'bg_blur(2)']}\n"
        "stats: {confirmatory: [{a: 'original:original', b: 'original:bg_blur(2.0)'}]}\n"
    )
    assert parse_protocol(ok).stats.confirmatory[0].b == "original:bg_blur(2.0)"
    proto = tmp_path / "p.yaml"
    proto.write_text("name: x\ndata: {source: synthetic}\nstats: {confirmatory: [], exploratory: false}\n")
    res = CliRunner().invoke(app, ["validate", str(proto)])
    assert res.exit_code == 2 and "would test nothing" in res.output


# --------------------------------------------------------------------------- large tables (issue 22)
def test_run_stats_from_counts_equals_the_cell_level_path(tmp_path):
    # The stage reduces the table to counts per patient x seed x fold; every row must equal
    # the cell-level functions on the paired cell rows.
    preds = make_predictions(
        patients=7,
        cells=9,
        models=("resnet", "shufflenet"),
        seeds=(0, 1, 2),
        folds=3,
        effects={"original:only_fg": -1.0},
    )
    preds = preds.sample(frac=1.0, random_state=0)  # row order must not matter
    preds = preds.drop(index=preds.index[(preds.seed == 2) & (preds.test_variant == "mixed_rand")][:20])
    run = make_run(tmp_path, preds, confirmatory=[Comparison(a="original:original", b="original:only_fg")])
    table = run_stats(run)
    models = ["resnet", "shufflenet"]
    for (model, family, a, b), rows in table.groupby(["model", "family", "a", "b"], sort=False):
        paired = paired_outcomes(preds, a, b, model=model)
        if family == "confirmatory":
            seed = np.random.SeedSequence([0, models.index(model), 0])
            want = [r for _, r in compare_conditions(paired, n_resamples=199, seed=seed)]
        else:
            want = [
                compare_conditions(paired, secondary=False)[0][1],
                mcnemar_test(paired_table(paired.correct_a, paired.correct_b)),
            ]
        assert len(rows) == len(want)
        for got, exp in zip(rows.itertuples(), want, strict=True):
            assert got.method == exp.method
            for col in ("estimate", "ci_low", "ci_high", "statistic", "pvalue"):
                g, e = getattr(got, col), getattr(exp, col)
                same = (math.isnan(g) and math.isnan(e)) or g == pytest.approx(e, rel=1e-9, abs=1e-12)
                assert same, (model, a, b, col)
            if family == "confirmatory":
                assert (got.n_cells, got.n_patients, got.n_seeds) == (exp.n_cells, exp.n_patients, exp.n_seeds)
    acc = pd.read_csv(run / "stats" / "accuracy.csv")
    ref = (
        preds.groupby(["model", "train_variant", "test_variant", "seed"])["correct"]
        .mean()
        .groupby(level=[0, 1, 2])
        .agg(["mean", "std"])
        .reset_index()
    )
    assert acc["accuracy"].to_numpy() == pytest.approx(ref["mean"].to_numpy())
    assert acc["accuracy_sd"].to_numpy() == pytest.approx(ref["std"].to_numpy())


def test_predictions_as_a_folder_of_parquet_files(tmp_path):
    # A run may hold its predictions as one file or as a folder of per-job files: same results.
    preds = make_predictions(patients=5, cells=6, seeds=(0, 1), test=("original", "only_fg", "mixed_same"))
    one = make_run(tmp_path / "one", preds)
    run_stats(one)
    many = make_run(tmp_path / "many", preds)
    (many / "predictions.parquet").unlink()
    folder = many / "predictions"
    folder.mkdir()
    for k, (_, part) in enumerate(preds.groupby(["test_variant", "seed"])):
        part.to_parquet(folder / f"part-{k:03d}.parquet", index=False)
    run_stats(many)
    for name in ("tests.csv", "accuracy.csv"):
        assert (one / "stats" / name).read_bytes() == (many / "stats" / name).read_bytes()
    # damaged: a missing value in a file of the folder is named with its row
    bad = preds[preds.test_variant == "original"].copy()
    bad["correct"] = bad["correct"].astype("boolean")
    bad.iloc[2, bad.columns.get_loc("correct")] = pd.NA
    bad.to_parquet(folder / "part-000.parquet", index=False)
    with pytest.raises(CellbgError, match=r"'correct' is missing"):
        run_stats(many)
    preds.iloc[:3].to_parquet(folder / "part-000.parquet", index=False)  # duplicates of rows in other files
    with pytest.raises(CellbgError, match="duplicate rows for cell/seed/fold"):
        run_stats(many)


def test_counts_when_a_cell_is_in_several_folds_of_a_seed():
    # The stage's dense unit index (model x cell x seed) holds when each cell has one fold per
    # seed; otherwise it pairs on model x cell x seed x fold, like paired_outcomes.
    from cellbg.stats._table import CodedPredictions

    preds = make_predictions(patients=4, cells=6, seeds=(0,), test=("original", "only_fg"))
    twice = pd.concat([preds, preds.assign(fold=preds.fold + 2, correct=~preds.correct)], ignore_index=True)
    for table in (preds, twice):
        counts, n_cells = CodedPredictions.from_frame(table).paired_counts(
            "resnet", "original:original", "original:only_fg"
        )
        paired = paired_outcomes(table, "original:original", "original:only_fg")
        pd.testing.assert_frame_equal(counts, paired_counts(paired), check_dtype=False)
        assert n_cells == paired.cell_id.nunique() == 24


def test_tests_csv_has_standard_errors_and_standardised_effect_sizes(tmp_path):
    # issue 18: every row carries the SE of its estimate and a named standardised effect size.
    preds = make_predictions(
        patients=8, cells=12, seeds=(0, 1), test=("original", "only_fg"), effects={"original:only_fg": -1.0}
    )
    run = make_run(tmp_path, preds, exploratory=False)
    run_stats(run)
    t = pd.read_csv(run / "stats" / "tests.csv").set_index("method")
    assert {"se", "effect_size", "effect_size_name"} <= set(t.columns)
    m = preds[preds.train_variant == "original"]
    acc = m.groupby(["test_variant", "patient_id"])["correct"].mean()
    d = (acc["only_fg"] - acc["original"]).to_numpy()
    prim = t.loc["paired t (patients)"]
    assert prim.se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size))
    assert prim.estimate / prim.se == pytest.approx(prim.statistic)
    assert prim.effect_size == pytest.approx(d.mean() / d.std(ddof=1)) and prim.effect_size_name == "Cohen's d_z"
    boot = t.loc["patient cluster bootstrap-t (mean of patient differences)"]
    assert boot.se == pytest.approx(prim.se) and boot.effect_size == pytest.approx(prim.effect_size)
    w = t.loc[[i for i in t.index if i.startswith("Wilcoxon")][0]]
    nz = d[d != 0]
    ranks = sps.rankdata(np.abs(nz))
    assert w.effect_size == pytest.approx((ranks[nz > 0].sum() - ranks[nz < 0].sum()) / ranks.sum())
    assert w.effect_size_name == "matched-pairs rank-biserial r" and np.isnan(w.se)
    gee = t.loc[[i for i in t.index if i.startswith("GEE")][0]]
    assert gee.effect_size_name == "log odds ratio"
    assert gee.effect_size == pytest.approx(float(gee.note.split()[3]), abs=1e-4)
    mc = t.loc[[i for i in t.index if i.startswith("McNemar")][0]]
    n = len(paired_outcomes(preds, "original:original", "original:only_fg"))
    b, c = mc.mcnemar_b, mc.mcnemar_c
    assert mc.se == pytest.approx(math.sqrt(b + c - (c - b) ** 2 / n) / n)
    assert mc.effect_size == pytest.approx(math.log(c / b))
    assert "standard error" in str(paired_t_test(acc["original"], acc["only_fg"]))
    line = next(ln for ln in (run / "stats" / "summary.md").read_text().splitlines() if ln.startswith("- resnet"))
    assert f"Cohen's d_z {prim.effect_size:.3f}" in line
