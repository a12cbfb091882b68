"""Reports: table numbers against the predictions they came from, LaTeX that compiles,
figures and HTML that hold what they should, and missing parts said in words."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from cellbg import CellbgError
from cellbg.cli import app
from cellbg.protocol import Protocol, protocol_hash, write_resolved
from cellbg.report import bg_gap_table, latex_table, parse_condition, significance_tables, write_report
from cellbg.stats import run_stats

REPO = Path(__file__).resolve().parents[1]

TRAIN = ["original", "only_fg"]
TEST = [
    "original",
    "only_fg",
    "mixed_same",
    "mixed_rand",
    "bg_ring(2)",
    "bg_ring(8)",
    "bg_color(1,0,1)",
    "bg_blur(2)",
    "mask_erode(2)+only_fg",
    "mask_dilate(2)+only_fg",
]
MODELS = ["resnet", "shufflenet_v2"]
SEEDS = [0, 1]
PATIENTS = [f"P{i}" for i in range(6)]
CELLS_PER_PATIENT = 5
CLASSES = ["healthy", "sezary"]
SIZE = 16


# --------------------------------------------------------------------------- fixture run
def _protocol(run_dir: Path, **overrides) -> Protocol:
    raw = {
        "name": "fixture",
        "output": str(run_dir),
        "segmentation": {"method": "cellpose", "model": "cpsam"},
        "crops": {"size": SIZE},
        "variants": {"train": TRAIN, "test": TEST},
        "models": [{"arch": "resnet", "depth": 10, "width": 0.25}, {"arch": "shufflenet_v2", "width": 0.5}],
        "training": {"epochs": 3, "seeds": SEEDS, "split": {"folds": 3}},
        "saliency": {"methods": ["gradcam"]},
        # The BG-GAP pair as a planned comparison keeps the stats stage small (no exploratory sweep).
        "stats": {
            "bootstrap": 200,
            "exploratory": False,
            "confirmatory": [
                {"a": "original:original", "b": "original:only_fg"},
                {"a": "original:mixed_rand", "b": "original:mixed_same"},
            ],
        },
    }
    raw.update(overrides)
    return Protocol.model_validate(raw)


def _cells() -> pd.DataFrame:
    rows = []
    for p_i, patient in enumerate(PATIENTS):
        label = CLASSES[p_i % 2]
        for k in range(CELLS_PER_PATIENT):
            rows.append(
                {
                    "cell_id": f"{patient}-img-{k:04d}",
                    "image_id": f"{patient}-img",
                    "patient_id": patient,
                    "label": label,
                    "label_index": CLASSES.index(label),
                    "fold": p_i % 3,
                }
            )
    return pd.DataFrame(rows)


def _predictions(cells: pd.DataFrame) -> pd.DataFrame:
    """Predictions with condition-dependent accuracy; one condition planted exactly."""
    rng = np.random.default_rng(7)
    base = {"original": 0.95, "only_fg": 0.85, "mixed_same": 0.9, "mixed_rand": 0.6}
    frames = []
    n = len(cells)
    for model in MODELS:
        for train in TRAIN:
            for test in TEST:
                for seed in SEEDS:
                    p = base.get(test, 0.75)
                    correct = rng.random(n) < p
                    if (model, train, test) == ("resnet", "original", "original"):
                        # planted: 24/30 correct for seed 0, 27/30 for seed 1 -> 85.0 +- 7.1 %
                        correct = np.arange(n) < (24 if seed == 0 else 27)
                    pred_index = np.where(correct, cells["label_index"], 1 - cells["label_index"])
                    prob = np.where(pred_index == 1, 0.8, 0.2)
                    frames.append(
                        cells.assign(
                            model=model,
                            train_variant=train,
                            test_variant=test,
                            seed=seed,
                            pred=[CLASSES[i] for i in pred_index],
                            pred_index=pred_index,
                            correct=correct,
                            prob_healthy=1 - prob,
                            prob_sezary=prob,
                            partner_cell_id=cells["cell_id"].iloc[::-1].to_numpy() if test.startswith("mixed") else "",
                        )
                    )
    return pd.concat(frames, ignore_index=True)


def _patient_acc(preds: pd.DataFrame, model: str, cond: str) -> pd.Series:
    train, test = cond.split(":")
    sub = preds[(preds["model"] == model) & (preds["train_variant"] == train) & (preds["test_variant"] == test)]
    return sub.groupby("patient_id")["correct"].mean()


def _write_stats(run_dir: Path) -> pd.DataFrame:
    """The real stats stage on the fixture predictions; the report formats what it wrote."""
    run_stats(run_dir)
    return pd.read_csv(run_dir / "stats" / "tests.csv")


def _write_jobs(run_dir: Path) -> None:
    import json

    for m_i, model in enumerate(MODELS):
        for train in TRAIN:
            for seed in SEEDS:
                job = run_dir / "jobs" / f"{model}-{train}-{seed}"
                job.mkdir(parents=True)
                (job / "spec.json").write_text(
                    json.dumps(
                        {"key": job.name, "job": {"model": model, "train_variant": train, "seed": seed, "fold": 0}}
                    )
                )
                epochs = np.arange(1, 4)
                shift = 0.1 * m_i + 0.05 * TRAIN.index(train) + 0.02 * seed
                pd.DataFrame(
                    {
                        "epoch": epochs,
                        "train_loss": 0.7 / epochs + shift,
                        "train_accuracy": 1 - 0.3 / epochs - shift,
                        "val_loss": 0.8 / epochs + shift,
                        "val_accuracy": 1 - 0.35 / epochs - shift,
                        "lr": 1e-3,
                        "best": True,
                        "seconds": 1.5,
                    }
                ).to_csv(job / "history.csv", index=False)
                (job / "DONE").write_text("")


def _write_crops_and_saliency(run_dir: Path, cells: pd.DataFrame) -> pd.DataFrame:
    n = len(cells)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    masks = np.broadcast_to((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 4) ** 2, (n, SIZE, SIZE)).copy()
    background = 0.15 + 0.1 * rng.random((n, 1, SIZE, SIZE))
    tint = np.array([0.8, 0.35, 0.7])[None, :, None, None]
    images = np.where(masks[:, None], tint, background).astype("float32")
    g = zarr.open_group(str(run_dir / "crops.zarr"), mode="w")
    g.create_array("images", data=images)
    g.create_array("masks", data=masks)
    g.attrs["classes"] = CLASSES
    cells.to_parquet(run_dir / "cells.parquet", index=False)
    rows, maps = [], []
    for model_i, model in enumerate(MODELS):
        for i in range(0, n, 3):
            # a blob that drifts off the cell for the second model; its share is known exactly
            r0, c0 = SIZE / 2 + model_i * SIZE / 4, SIZE / 2 - model_i * (i % 2) * SIZE / 5
            m = np.exp(-((yy - r0) ** 2 + (xx - c0) ** 2) / (2 * (SIZE / 6) ** 2)).astype("float32")
            share = float(m[~masks[i]].sum() / m.sum())
            rows.append(
                {
                    "cell_id": cells["cell_id"][i],
                    "patient_id": cells["patient_id"][i],
                    "label": cells["label"][i],
                    "model": model,
                    "train_variant": "original",
                    "seed": 0,
                    "fold": int(cells["fold"][i]),
                    "method": "gradcam",
                    "target": "predicted",
                    "background_share": share,
                    "background_ratio": share / (1 - share),
                    "sanity_rank_corr": 0.1,
                    "map_index": len(maps),
                }
            )
            maps.append(m)
    s = zarr.open_group(str(run_dir / "saliency.zarr"), mode="w")
    s.create_array("maps", data=np.stack(maps))
    sal = pd.DataFrame(rows)
    sal.to_parquet(run_dir / "saliency.parquet", index=False)
    return sal


SEG_TP, SEG_FP, SEG_FN = [5, 4, 6], [1, 0, 1], [0, 2, 1]


def _write_segmentation_evaluation(run_dir: Path) -> None:
    """``segmentation/evaluation.csv`` as :func:`cellbg.segment.evaluate_run` writes it."""
    tp, fp, fn = (np.array(x, float) for x in (SEG_TP, SEG_FP, SEG_FN))
    (run_dir / "segmentation").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "n_true": tp + fn,
            "n_pred": tp + fp,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "ap": [0.7, 0.6, 0.8],
            "mean_matched_iou": [0.8, 0.75, 0.85],
        },
    ).to_csv(run_dir / "segmentation" / "evaluation.csv", index=False)


def make_run(
    run_dir: Path,
    *,
    with_predictions=True,
    with_stats=True,
    with_jobs=True,
    with_saliency=True,
    with_segmentation=True,
    **protocol,
) -> dict:
    p = _protocol(run_dir, **protocol)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(p)
    cells = _cells()
    out = {"protocol": p, "cells": cells}
    if with_predictions:
        out["predictions"] = _predictions(cells)
        out["predictions"].to_parquet(run_dir / "predictions.parquet", index=False)
        if with_stats:
            out["tests"] = _write_stats(run_dir)
    if with_jobs:
        _write_jobs(run_dir)
    if with_segmentation and out["protocol"].segmentation.method != "masks":
        _write_segmentation_evaluation(run_dir)
    if with_saliency:
        out["saliency"] = _write_crops_and_saliency(run_dir, cells)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run with every input, reported in a fresh interpreter that must never import torch."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    made = make_run(run_dir, report={"formats": ["md", "html", "tex", "pdf"]})
    code = (
        "import sys\nimport cellbg.report as r\nassert 'torch' not in sys.modules, 'import'\n"
        f"r.write_report({str(run_dir)!r}, gallery_cells=2)\n"
        "assert 'torch' not in sys.modules, 'write_report'\nprint('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    made["no_torch"] = (res.returncode, res.stdout.strip(), res.stderr[-2000:])
    made["report"] = run_dir / "report"
    made["run_dir"] = run_dir
    return made


# --------------------------------------------------------------------------- helpers
def _tex_rows(text: str) -> list[list[str]]:
    """The cells of every tabular row between \\midrule and \\bottomrule."""
    body = text.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    return [[c.strip() for c in row.split(" & ")] for row in body.strip().split("\\\\") if row.strip()]


def _tex_header(text: str) -> list[str]:
    head = text.split("\\toprule", 1)[1].split("\\midrule", 1)[0]
    return [c.strip() for c in head.strip().rstrip("\\").strip().split(" & ")]


def _expected_acc(preds: pd.DataFrame, model: str, train: str, test: str) -> str:
    """Independent recomputation: accuracy per seed, then mean +- SD over seeds, in %."""
    accs = []
    for seed in SEEDS:
        sub = preds[
            (preds.model == model)
            & (preds.train_variant == train)
            & (preds.test_variant == test)
            & (preds.seed == seed)
        ]
        accs.append(sub["correct"].sum() / len(sub))
    return f"{100 * np.mean(accs):.1f} $\\pm$ {100 * np.std(accs, ddof=1):.1f}"


def _esc(s: str) -> str:
    return s.replace("_", "\\_")


# --------------------------------------------------------------------------- numbers
def test_accuracy_tex_matches_predictions(full_run):
    preds = full_run["predictions"]
    for model in MODELS:
        text = (full_run["report"] / "tables" / f"accuracy_{model}.tex").read_text()
        # test variants down, training variants across (fits one column of a two-column article)
        assert _tex_header(text)[1:] == [f"trained on {_esc(t)}" for t in TRAIN]
        rows = _tex_rows(text)
        assert [r[0] for r in rows] == [_esc(t) for t in TEST]
        for r, test in zip(rows, TEST, strict=True):
            assert r[1:] == [_expected_acc(preds, model, train, test) for train in TRAIN]
    planted = _tex_rows((full_run["report"] / "tables" / "accuracy_resnet.tex").read_text())[0][1]
    assert planted == "85.0 $\\pm$ 7.1"
    md = (full_run["report"] / "report.md").read_text()
    assert "| original | 85.0 ± 7.1 |" in md


def test_bg_gap_matches_predictions(full_run):
    preds, tests = full_run["predictions"], full_run["tests"]
    rows = _tex_rows((full_run["report"] / "tables" / "bg_gap.tex").read_text())
    assert len(rows) == len(MODELS) * len(TRAIN)
    for r in rows:
        model, train = r[0].replace("\\_", "_"), r[1].replace("\\_", "_")
        gaps = []
        for seed in SEEDS:
            s = preds[(preds.model == model) & (preds.train_variant == train) & (preds.seed == seed)]
            gaps.append(
                s[s.test_variant == "mixed_same"]["correct"].mean()
                - s[s.test_variant == "mixed_rand"]["correct"].mean()
            )
        assert r[4] == f"{100 * np.mean(gaps):.1f} $\\pm$ {100 * np.std(gaps, ddof=1):.1f}"
        # the stats stage tests it as b - a with a = mixed_rand, b = mixed_same (primary row)
        hit = tests[
            (tests.model == model)
            & (tests.a == f"{train}:mixed_rand")
            & (tests.b == f"{train}:mixed_same")
            & (tests.role == "primary")
        ]
        if train == "original":
            hit = hit.iloc[0]
            assert r[5] == f"[{100 * hit.ci_low:.1f}, {100 * hit.ci_high:.1f}]"
            assert r[6] == _fmt_p(hit.pvalue) and r[7] == hit.method
        else:  # not among the planned comparisons
            assert hit.empty and (r[5], r[6], r[7]) == ("--", "--", "not tested")


def test_bg_gap_table_sign_from_stats_row():
    preds = pd.DataFrame(
        {
            "model": "m",
            "train_variant": "t",
            "seed": 0,
            "patient_id": "p",
            "test_variant": ["mixed_same"] * 4 + ["mixed_rand"] * 4,
            "cell_id": list("abcdabcd"),
            "correct": [True, True, True, False, True, False, False, False],
        }
    )
    tests = pd.DataFrame(
        {
            "model": ["m"],
            "a": ["t:mixed_rand"],
            "b": ["t:mixed_same"],
            "ci_low": [0.1],
            "ci_high": [0.9],
            "ci_method": ["bootstrap"],
            "pvalue": [0.01],
            "method": ["x"],
        }
    )
    g = bg_gap_table(preds, tests).iloc[0]
    assert g["gap"] == pytest.approx(0.5) and (g["ci_low"], g["ci_high"]) == (0.1, 0.9)
    flipped = tests.assign(a="t:mixed_same", b="t:mixed_rand", ci_low=-0.9, ci_high=-0.1)
    g = bg_gap_table(preds, flipped).iloc[0]
    assert (g["ci_low"], g["ci_high"]) == pytest.approx((0.1, 0.9))


def _fmt_p(p: float) -> str:
    return "--" if np.isnan(p) else ("$<$0.001" if p < 0.001 else f"{p:.3f}")


def _pp(x: float) -> str:
    v = round(100 * x, 1)
    return "0.0" if v == 0 else f"{v:.1f}".replace("-", "$-$")


def test_significance_tex_matches_stats(full_run):
    tests = full_run["tests"]
    text = (full_run["report"] / "tables" / "significance.tex").read_text()
    assert "\\begin{table*}" in text  # spans both columns of a two-column article
    rows = _tex_rows(text)
    primary = tests[tests.role == "primary"]
    assert len(rows) == len(primary) == 4  # 2 models x 2 confirmatory comparisons; no exploratory grid
    head = _tex_header(text)
    assert head[3:] == ["$\\Delta$ = b $-$ a, pp [95\\% CI]", "SE (pp)", "effect size", "patients", "p", "p adj."]
    for r, t in zip(rows, primary.itertuples(index=False), strict=True):
        assert r[0] == t.family and r[1] == _esc(t.model)
        assert r[2].endswith(_esc(f"{t.a} vs {t.b}"))
        # percentage points, with the CI, SE and effect size, then patients, p and the family's (Holm) adjustment
        assert r[3] == f"{_pp(t.estimate)} [{_pp(t.ci_low)}, {_pp(t.ci_high)}]"
        assert r[4] == _pp(t.se) and t.effect_size_name == "Cohen's d_z"
        assert r[5] == f"{t.effect_size:.2f}".replace("-", "$-$") + " d\\_z"
        assert r[6:] == [str(int(t.n_patients)), _fmt_p(t.pvalue), f"{_fmt_p(t.p_holm)} (Holm)"]
    assert "d\\_z = Cohen's d\\_z, the mean of the per-patient differences over their SD" in text
    assert "Test: paired t (patients)." in text  # one test for all rows: named once
    assert rows[1][2].startswith("BG-GAP (original): ")
    # the fixture's paired estimate really is the mean per-patient difference
    preds = full_run["predictions"]
    d = _patient_acc(preds, "resnet", "original:only_fg") - _patient_acc(preds, "resnet", "original:original")
    assert float(rows[0][3].split()[0].replace("$-$", "-")) == pytest.approx(100 * d.mean(), abs=0.05)
    assert float(rows[0][5].split()[0].replace("$-$", "-")) == pytest.approx(d.mean() / d.std(ddof=1), abs=0.005)
    # every other test is in the secondary table, labelled conditional, McNemar among them
    text2 = (full_run["report"] / "tables" / "significance_secondary.tex").read_text()
    rows2 = _tex_rows(text2)
    assert len(rows2) == len(tests) - len(primary)
    assert "(conditional)" in text2 and "not adjusted and are conditional" in text2
    head2 = _tex_header(text2)
    mc = [dict(zip(head2, r, strict=True)) for r in rows2 if r[4].startswith("McNemar")]
    assert len(mc) == 4 and all(re.fullmatch(r"\d+/\d+", r["McNemar b/c"]) for r in mc)
    assert "-0.0" not in text + text2 and "$-$0.0 " not in text + text2


def _label_columns(df: pd.DataFrame) -> list[str]:
    return [
        c
        for c in df.columns
        if c in ("family", "model", "comparison (a vs b)", "measure", "saliency map", "target class", "role", "test")
    ]


def test_significance_rows_have_distinct_labels():
    """Rows that differ only in saliency method or target class, and a planned comparison the
    exploratory grid tests again: every row of the main table reads differently."""
    base = {
        "model": "m",
        "estimate": 0.1,
        "ci_low": 0.0,
        "ci_high": 0.2,
        "pvalue": 0.01,
        "p_holm": 0.02,
        "p_bh": 0.03,
        "n_patients": 6,
        "n_cells": 60,
        "method": "paired t (patients)",
        "name": "",
        "measure": "accuracy",
        "saliency_method": "",
    }
    rows = [
        {**base, "family": "confirmatory", "role": "primary", "a": "original:mixed_rand", "b": "original:mixed_same"},
        {
            **base,
            "family": "confirmatory",
            "role": "secondary",
            "a": "original:mixed_rand",
            "b": "original:mixed_same",
            "method": "McNemar exact (binomial)",
            "mcnemar_b": 3,
            "mcnemar_c": 9,
        },
        {
            **base,
            "family": "exploratory",
            "role": "primary",
            "a": "original:mixed_rand",
            "b": "original:mixed_same",
            "name": "BG-GAP (original)",
            "p_bh": 0.043,
        },
        {
            **base,
            "family": "exploratory",
            "role": "secondary",
            "a": "original:mixed_rand",
            "b": "original:mixed_same",
            "name": "BG-GAP (original)",
            "method": "McNemar exact (binomial)",
        },
        {
            **base,
            "family": "exploratory",
            "role": "primary",
            "a": "original:original",
            "b": "original:only_fg",
            "estimate": -0.0000001,
        },
    ]
    for method in ("gradcam", "integrated_gradients"):
        for target in ("predicted", "true"):
            rows.append(
                {
                    **base,
                    "family": "saliency",
                    "role": "primary",
                    "a": "original:original",
                    "b": "only_fg:original",
                    "measure": "background_share",
                    "saliency_method": f"{method} ({target} class)",
                }
            )
    main, secondary, notes, secondary_notes = significance_tables(pd.DataFrame(rows))
    labels = main[_label_columns(main)]
    assert len(main) == 6 and not labels.duplicated().any()
    assert set(zip(main["saliency map"], main["target class"], strict=True)) >= {
        ("gradcam", "predicted"),
        ("gradcam", "true"),
        ("integrated_gradients", "predicted"),
        ("integrated_gradients", "true"),
    }
    # the BG-GAP pair is shown once, in the confirmatory family, and the note says why
    assert (main["comparison (a vs b)"].str.startswith("BG-GAP (original)")).sum() == 1
    assert len(notes) == 1 and "p BH = 0.043" in notes[0] and "Holm" in notes[0]
    assert main.loc[main["family"] == "confirmatory", "p adj."].iloc[0] == "0.020 (Holm)"
    assert main.loc[main["family"] == "exploratory", "p adj."].iloc[0] == "0.030 (BH)"
    assert main.iloc[1]["Δ = b − a, pp [95% CI]"] == "0.0 [0.0, 20.0]"  # no "−0.0"
    assert len(secondary) == 1 and secondary.iloc[0]["McNemar b/c"] == "3/9" and secondary_notes
    assert not secondary[_label_columns(secondary)].duplicated().any()


def test_segmentation_table_pools_counts(full_run):
    rows = {
        r[0].replace("\\_", "_"): r[1:]
        for r in _tex_rows((full_run["report"] / "tables" / "segmentation.tex").read_text())
    }
    tp, fp, fn = sum(SEG_TP), sum(SEG_FP), sum(SEG_FN)
    assert rows["precision"][1] == f"{tp / (tp + fp):.3f}" == "0.882"
    assert rows["recall"][1] == f"{tp / (tp + fn):.3f}" == "0.833"
    assert rows["f1"][1] == f"{2 * tp / (2 * tp + fp + fn):.3f}" == "0.857"
    assert rows["ap"] == ["0.700 $\\pm$ 0.100", "--"]
    assert rows["tp"] == ["5.0 $\\pm$ 1.0", "15 (total)"]


# --------------------------------------------------------------------------- LaTeX
def _columns_in_spec(spec: str) -> int:
    """Columns of a tabular spec: l/r/c and p{...} at brace depth 0; >{...} adds none."""
    depth, n = 0, 0
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif depth == 0 and ch in "lrcp":
            n += 1
    return n


def _structural_check(text: str) -> None:
    assert text.count("{") - text.count("\\{") == text.count("}") - text.count("\\}")
    assert text.count("\\begin{tabular}") == text.count("\\end{tabular}") == 1
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert text.count(rule) == 1
    start = text.index("\\begin{tabular}{") + len("\\begin{tabular}{")
    depth, end = 1, start
    while depth:
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        end += 1
    n_columns = _columns_in_spec(text[start : end - 1])
    for row in [_tex_header(text)] + _tex_rows(text):
        assert len(row) == n_columns


#: A two-column article as journals set it (10 pt, A4, 2 cm margins: 3.35 in columns).
_TWO_COLUMN = (
    "\\documentclass[twocolumn,10pt]{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{mathptmx}\n"
    "\\usepackage{booktabs,graphicx,array}\n\\usepackage[a4paper,margin=2cm]{geometry}\n"
    "\\begin{document}\n%s\n\\end{document}\n"
)


def test_tex_tables_compile(full_run, tmp_path):
    tables = sorted((full_run["report"] / "tables").glob("*.tex"))
    assert {t.stem for t in tables} == {
        "accuracy_resnet",
        "accuracy_shufflenet_v2",
        "bg_gap",
        "significance",
        "significance_secondary",
        "segmentation",
    }
    for t in tables:
        _structural_check(t.read_text())
    if shutil.which("pdflatex") is None:  # structural check above is then the whole test
        pytest.skip("no pdflatex (scripts/system-deps.sh installs TeX Live): only the structure was checked")
    body = "\n".join(f"\\input{{{t.as_posix()}}}" for t in tables)
    (tmp_path / "doc.tex").write_text(_TWO_COLUMN % body)
    res = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:]
    log = (tmp_path / "doc.log").read_text(errors="replace")
    overfull = [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert all(x <= 1.0 for x in overfull), overfull
    assert "Float too large" not in log and "Overfull \\vbox" not in log
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_long_table_splits_into_floats_that_fit(tmp_path):
    """A 100-row significance-like table: four table* floats (the later ones "continued"),
    each on a page, none wider than the page."""
    df = pd.DataFrame(
        {
            "comparison (a vs b)": [f"original:original vs mask_dilate({i})+bg_blur(2)" for i in range(100)],
            "p": ["0.500"] * 100,
        }
    )
    text = latex_table(
        df,
        caption="Long. More.",
        label="tab:long",
        wide=True,
        max_rows=30,
        size="scriptsize",
        align=">{\\raggedright\\arraybackslash}p{4cm}r",
        notes=["a note"],
    )
    assert text.count("\\begin{table*}") == 4 and text.count("(continued) Long.") == 3 and "a note" in text
    assert text.count("\\label{tab:long}") == 1
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex")
    (tmp_path / "doc.tex").write_text(_TWO_COLUMN % text)
    res = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout[-2000:]
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert "Overfull \\hbox" not in log and "Float too large" not in log


def test_latex_table_escapes_and_counts_columns():
    text = latex_table(pd.DataFrame({"a_b": ["50% & more"], "c": ["1.0 ± 0.1"]}), caption="x_y", label="tab:x")
    assert "a\\_b & c \\\\" in text and "50\\% \\& more & 1.0 $\\pm$ 0.1 \\\\" in text
    assert "\\caption{x\\_y}" in text
    _structural_check(text)


# --------------------------------------------------------------------------- figures and html
def test_figures_and_html_are_self_contained(full_run):
    figs = full_run["report"] / "figures"
    names = {
        "accuracy_heatmap",
        "forest_gaps",
        "ring_width",
        "colour_blur",
        "mask_quality",
        "training_curves",
        "validation_curves",
        "saliency_gallery",
    }
    assert {p.stem for p in figs.glob("*.png")} == names
    assert {p.stem for p in figs.glob("*.pdf")} == names
    html = (full_run["report"] / "report.html").read_text()
    srcs = re.findall(r"src='([^']*)'", html)
    assert len(srcs) == len(names) and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {p.read_bytes() for p in figs.glob("*.png")}
    assert "href=" not in html and "<link" not in html
    # a print stylesheet: tables wrap to the page instead of scrolling (no column cut off)
    print_css = html.split("@media print", 1)[1]
    assert ".scroll { overflow: visible; }" in print_css and "table { width: 100%;" in print_css
    assert "85.0 ± 7.1" in html
    # background share of the gallery's table: mean over the sampled cells, per model
    sal = full_run["saliency"]
    for _model, g in sal.groupby("model"):
        assert f"{g['background_share'].mean():.3f} ± {g['background_share'].std():.3f}" in html


def _pdf_page_size_and_fonts(path: Path) -> tuple[tuple[float, float], list[float]]:
    """The first MediaBox (points) and every font size set with ``Tf`` in a PDF's streams."""
    import zlib

    data = path.read_bytes()
    box = re.search(rb"/MediaBox\s*\[\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*\]", data)
    size = (float(box[3]) - float(box[1]), float(box[4]) - float(box[2]))
    sizes = []
    for m in re.finditer(rb"stream\r?\n", data):
        end = data.find(b"endstream", m.end())
        raw = data[m.end() : end]
        try:
            raw = zlib.decompress(raw)
        except zlib.error:
            pass
        sizes += [float(x) for x in re.findall(rb"/F\d+\s+([\d.]+)\s+Tf", raw)]
    return size, sizes


def test_figures_print_size_and_fonts(full_run):
    """Every figure is a journal width (3.5 or 7.2 in) as a vector PDF and a 300-dpi PNG, and
    its smallest text is at least 7 pt at that size (read from the saved files)."""
    from PIL import Image

    figs = sorted((full_run["report"] / "figures").glob("*.pdf"))
    assert len(figs) == 8
    widths = set()
    for pdf in figs:
        (w, h), sizes = _pdf_page_size_and_fonts(pdf)
        assert round(w / 72, 2) in (3.5, 7.2), (pdf.name, w / 72)
        widths.add(round(w / 72, 2))
        assert sizes and min(sizes) >= 7.0, (pdf.name, sorted(set(sizes)))
        png = Image.open(pdf.with_suffix(".png"))
        assert png.size == (round(w / 72 * 300), round(h / 72 * 300)), pdf.name
        assert png.info["dpi"] == pytest.approx((300, 300), abs=0.01)
    assert widths == {3.5, 7.2}
    # labels in words, not condition codes
    forest = full_run["report"] / "figures" / "forest_gaps.pdf"
    assert forest.exists()
    md = (full_run["report"] / "report.md").read_text()
    assert "each label reads as the difference it shows" in md


def test_figure_labels_in_words():
    from cellbg.report.figures import comparison_words, condition_words

    assert condition_words("original:mixed_rand") == "trained on original, tested on mixed_rand"
    assert comparison_words("original:original", "only_fg:original") == (
        "tested on original: trained on only_fg − original"
    )
    assert comparison_words("original:original", "only_fg:mixed_next") == (
        "(trained on only_fg, tested on mixed_next) − (trained on original, tested on original)"
    )


def test_pdf_report(full_run, tmp_path):
    """report.pdf is a real PDF of the whole report; its first page renders to an image."""
    pdf = full_run["report"] / "report.pdf"
    if shutil.which("pdflatex") is None:
        assert not pdf.exists()
        assert "no `report.pdf`" in (full_run["report"] / "report.md").read_text()
        pytest.skip("no pdflatex: the report says why there is no PDF")
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert (full_run["report"] / "report.tex").exists()
    assert not list(full_run["report"].glob("*.aux")) and not list(full_run["report"].glob("*.log"))
    if shutil.which("pdftoppm") is not None:
        subprocess.run(
            ["pdftoppm", "-r", "40", "-png", "-f", "1", "-l", "1", str(pdf), str(tmp_path / "p")],
            check=True,
            timeout=60,
        )
        from PIL import Image

        page = np.asarray(Image.open(next(tmp_path.glob("p*.png"))).convert("L"))
        assert page.shape[0] > page.shape[1] and (page < 128).mean() > 0.005  # A4 portrait, with text on it
    if shutil.which("pdftotext") is not None:
        text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, timeout=60).stdout
        for words in ("Significance tests", "BG-GAP", "Methods", "Provenance", "85.0"):
            assert words in text, words


# --------------------------------------------------------------------------- methods, provenance
def test_methods_and_provenance(full_run):
    from importlib.metadata import version

    md = (full_run["report"] / "report.md").read_text()
    methods = md.split("## Methods", 1)[1].split("## Provenance", 1)[0]
    for phrase in (
        "Cellpose (model `cpsam`",
        f"{SIZE} × {SIZE} pixel crop",
        "`mask_erode(2)+only_fg`",
        "ResNet-10",
        "ShuffleNetV2 × 0.5",
        "up to 3 epochs",
        "2 seeds (0 and 1)",
        "3-fold cross-validation with folds grouped by patient",
        "unit of analysis was the patient",
        "Holm",
        "alpha = 0.05",
        "30 cells from 6 patients",
        f"numpy {version('numpy')}",
    ):
        assert phrase in methods, phrase
    # the BG-GAP pair is named as such, the only_fg drop is not
    assert "`original:mixed_rand` vs `original:mixed_same` (BG-GAP:" in methods
    assert "`original:original` vs `original:only_fg` (BG-GAP" not in methods
    prov = md.split("## Provenance", 1)[1]
    assert f"protocol hash: {protocol_hash(full_run['protocol'])}" in prov
    assert f"numpy {version('numpy')}" in prov and f"pandas {version('pandas')}" in prov
    assert "training time: 0.6 min summed over 8 jobs" in prov  # 8 jobs x 3 epochs x 1.5 s


def test_methods_text_for_threshold_segmentation(tmp_path):
    """The methods paragraph names the threshold rule and the smoothing (default: from the diameter)."""
    from cellbg.report.methods import _methods
    from cellbg.report.reading import _Run

    default = _protocol(tmp_path, segmentation={"method": "threshold"})
    text = _methods(_Run(run_dir=tmp_path, protocol=default))
    assert "segmented by robust thresholding after Gaussian smoothing (sigma diameter / 16)" in text
    otsu = _protocol(tmp_path, segmentation={"method": "threshold", "threshold": {"threshold": "otsu", "sigma": 1.5}})
    text = _methods(_Run(run_dir=tmp_path, protocol=otsu))
    assert "segmented by otsu thresholding after Gaussian smoothing (sigma 1.5)" in text


# --------------------------------------------------------------------------- missing parts
def test_missing_parts_are_stated(tmp_path):
    run_dir = tmp_path / "run"
    make_run(
        run_dir,
        with_stats=False,
        with_jobs=False,
        with_saliency=False,
        variants={"train": ["original"], "test": ["original", "only_fg"]},
        segmentation={"method": "masks"},
        stats={"exploratory": False, "confirmatory": [{"a": "original:original", "b": "original:only_fg"}]},
    )
    # predictions for the narrower protocol: keep only its conditions
    preds = pd.read_parquet(run_dir / "predictions.parquet")
    preds = preds[(preds.train_variant == "original") & preds.test_variant.isin(["original", "only_fg"])]
    preds.to_parquet(run_dir / "predictions.parquet", index=False)
    out = write_report(run_dir)
    md = (out / "report.md").read_text()
    for sentence in (
        "no statistics were computed",
        "no saliency was computed",
        "no training histories were found",
        "needs both `mixed_same` and `mixed_rand`",
        "no `bg_ring(k)` test variants were run",
        "no `bg_color` or `bg_blur` test variants",
        "no `mask_erode(k)` / `mask_dilate(k)`",
        "masks were supplied with the data",
    ):
        assert sentence in md, sentence
    assert {p.stem for p in (out / "figures").glob("*.png")} == {"accuracy_heatmap"}
    figures = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    assert {p.name: p.read_bytes() for p in (write_report(run_dir) / "figures").iterdir()} == figures  # deterministic
    assert {p.stem for p in (out / "tables").glob("*.tex")} == {"accuracy_resnet", "accuracy_shufflenet_v2"}
    assert "Parts not available in this run:" in md

    # a run with nothing but its protocol still gives a report that says so
    bare = tmp_path / "bare"
    make_run(
        bare,
        with_predictions=False,
        with_jobs=False,
        with_saliency=False,
        with_segmentation=False,
        saliency={"enabled": False},
    )
    md = (write_report(bare) / "report.md").read_text()
    assert "no predictions were found" in md and "saliency was switched off in the protocol" in md
    assert not list((bare / "report").glob("tables/*.tex"))


def test_formats_and_figures_follow_protocol(tmp_path):
    run_dir = tmp_path / "run"
    make_run(
        run_dir, with_stats=False, with_jobs=False, with_saliency=False, report={"formats": ["md"], "figures": False}
    )
    out = write_report(run_dir)
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]
    assert "figures are switched off" in (out / "report.md").read_text()


# --------------------------------------------------------------------------- errors, CLI, no torch
def test_bad_inputs_are_one_line_errors_and_keep_the_old_report(full_run, tmp_path):
    with pytest.raises(CellbgError, match="not a cellbg run folder"):
        write_report(tmp_path)
    with pytest.raises(CellbgError, match="run folder not found"):
        write_report(tmp_path / "nowhere")
    run_dir = tmp_path / "run"
    shutil.copytree(full_run["run_dir"], run_dir)
    before = (run_dir / "report" / "report.md").read_bytes()
    (run_dir / "predictions.parquet").write_bytes(b"not parquet")
    with pytest.raises(CellbgError, match="cannot read predictions"):
        write_report(run_dir)
    assert (run_dir / "report" / "report.md").read_bytes() == before
    pd.DataFrame({"cell_id": ["a"]}).to_parquet(run_dir / "predictions.parquet")
    with pytest.raises(CellbgError, match="lacks column"):
        write_report(run_dir)
    r = CliRunner().invoke(app, ["report", str(run_dir)])
    assert r.exit_code == 2 and "lacks column" in r.output and "Traceback" not in r.output


def test_cli_report_is_deterministic(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run["run_dir"], run_dir, ignore=shutil.ignore_patterns("report", "saliency*", "jobs"))
    # the same run with figures off (cheaper); the tables must not change
    resolved = run_dir / "protocol.resolved.yaml"
    resolved.write_text(resolved.read_text().replace("  figures: true", "  figures: false"))
    r = CliRunner().invoke(app, ["report", str(run_dir), "--gallery-cells", "2"])
    assert r.exit_code == 0, r.output
    assert "report written to" in r.output and "tables/significance.tex" in r.output
    out = run_dir / "report"
    md = (out / "report.md").read_text()
    assert "no saliency was computed" in md and "figures are switched off" in md
    assert not (out / "figures").exists()
    # Same predictions and stats, another process: the same bytes for every table.
    tables = sorted((out / "tables").glob("*.tex"))
    assert len(tables) == 6
    for p in tables:
        assert p.read_bytes() == (full_run["report"] / "tables" / p.name).read_bytes(), p.name


def test_report_never_imports_torch(full_run):
    returncode, stdout, stderr = full_run["no_torch"]
    assert returncode == 0 and stdout == "ok", stderr


def test_parse_condition():
    assert parse_condition("only_fg") == ([], "only_fg", ())
    assert parse_condition("bg_color(1, 0, 1)") == ([], "bg_color", ("1", "0", "1"))
    assert parse_condition("mask_erode(2)+only_fg") == ([("mask_erode", ("2",))], "only_fg", ())
    assert parse_condition("mask_dilate(1)") == ([("mask_dilate", ("1",))], "original", ())


# --------------------------------------------------------------------------- export
def test_export_cells_wide_and_tests(full_run, tmp_path):
    r = CliRunner().invoke(
        app,
        ["export", str(full_run["run_dir"]), "--cells", str(tmp_path / "c.csv"), "--tests", str(tmp_path / "t.csv")],
    )
    assert r.exit_code == 0, r.output
    assert "cells: 30 rows written" in r.output and f"tests: {len(full_run['tests'])} rows written" in r.output
    wide = pd.read_csv(tmp_path / "c.csv")
    preds = full_run["predictions"]
    assert len(wide) == wide["cell_id"].nunique() == preds["cell_id"].nunique() == 30
    assert list(wide.columns[:5]) == ["cell_id", "image_id", "patient_id", "label", "fold"]
    conditions = len(MODELS) * len(TRAIN) * len(TEST) * len(SEEDS)
    assert wide.shape[1] == 5 + 2 * conditions
    # every cell of every condition is the prediction it came from
    for row in preds.sample(50, random_state=0).itertuples(index=False):
        key = f"{row.model}|{row.train_variant}|{row.test_variant}|s{row.seed}"
        got = wide.set_index("cell_id").loc[row.cell_id]
        assert got[f"pred|{key}"] == row.pred and bool(got[f"correct|{key}"]) == bool(row.correct)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), full_run["tests"])
    # bad input: one line, exit 2
    r = CliRunner().invoke(app, ["export", str(tmp_path / "nowhere"), "--tests", str(tmp_path / "x.csv")])
    assert r.exit_code == 2 and "run folder not found" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["export", str(full_run["run_dir"])])
    assert r.exit_code == 2 and "nothing to export" in r.output


def test_final_lines_name_the_report_and_the_confirmatory_result(full_run):
    from cellbg.runner import final_lines

    lines = final_lines(full_run["run_dir"])
    report = full_run["report"]
    first = "report.pdf" if (report / "report.pdf").exists() else "report.html"
    assert lines[0].startswith(f"report: {report / first} (also ")
    t = full_run["tests"]
    t = t[(t.family == "confirmatory") & (t.role == "primary")]
    assert len(lines) == 2 and lines[1].startswith("Confirmatory results: ") and lines[1].count("; ") == len(t) - 1

    def said(name, p):  # "p = 0.034", but "p < 0.001" (never "p = < 0.001")
        text = _fmt_p(p).replace("$<$", "< ")
        return f"{name} {text}" if text.startswith("<") else f"{name} = {text}"

    for r in t.itertuples(index=False):
        verdict = "significant" if r.p_holm < 0.05 else "not significant"
        assert (
            f"{r.model}, " in lines[1]
            and f"{_pp(r.estimate).replace('$-$', '−')} percentage points "
            f"(95% CI {_pp(r.ci_low).replace('$-$', '−')} to {_pp(r.ci_high).replace('$-$', '−')}), "
            f"{said('p', r.pvalue)}, {said('Holm p', r.p_holm)} "
            f"(paired t (patients), 6 patients): {verdict} at alpha = 0.05"
        ) in lines[1]
    assert "BG-GAP, trained on original: tested on mixed_same − mixed_rand" in lines[1]
    # the same sentence heads the report
    assert f"**{lines[1]}**" in (report / "report.md").read_text()


def test_study_factors_context_generic_background_cooccurrence_and_validation_curves(tmp_path, monkeypatch):
    """The cell-size curve, the generic-background and co-occurring-object bars and table, and
    the validation curves overlaid per training variant, from a run that tested them."""
    extra = [
        "context(0.5)",
        "context(0.75)",
        "bg_image(synthetic)",
        "no_others",
        "no_others+mixed_same",
        "no_others+mixed_rand",
    ]
    monkeypatch.setitem(globals(), "TEST", TEST + extra)
    run_dir = tmp_path / "run"
    made = make_run(run_dir, with_stats=False, with_saliency=False, segmentation={"method": "masks"})
    out = write_report(run_dir)
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"context_size", "generic_cooccurrence", "validation_curves"} <= names
    md = (out / "report.md").read_text()
    preds = made["predictions"]

    def acc(model, train, test):
        sub = preds[(preds.model == model) & (preds.train_variant == train) & (preds.test_variant == test)]
        return sub.groupby("seed")["correct"].mean().mean()

    from cellbg.report.tables import _pp

    for model in MODELS:
        for train in TRAIN:
            halo = _pp(acc(model, train, "no_others+mixed_same") - acc(model, train, "no_others+mixed_rand"))
            drop = _pp(acc(model, train, "no_others") - acc(model, train, "original"))
            generic = _pp(acc(model, train, "bg_image(synthetic)") - acc(model, train, "original"))
            row = next(
                line for line in md.splitlines() if line.startswith(f"| {model} | {train} |") and line.count("|") == 6
            )
            assert row.split("|")[3:6] == [f" {generic} ", f" {drop} ", f" {halo} "], row


def test_the_headline_writes_p_below_the_threshold_as_less_than():
    from cellbg.report.headline import _p_is

    assert _p_is("p", 0.0004) == "p < 0.001"
    assert _p_is("Holm p", 0.034) == "Holm p = 0.034"
    assert _p_is("p", float("nan")) == "p = –"
