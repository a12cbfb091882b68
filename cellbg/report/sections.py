"""The report's sections, each from the run's tables: overview, accuracy, BG-GAP, tests,
factor sweeps, training, saliency, segmentation.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import cast

import numpy as np
import pandas as pd

from cellbg import __version__
from cellbg.report.document import _Doc
from cellbg.report.figures import (
    DOUBLE_COLUMN,
    SINGLE_COLUMN,
    _bars,
    _curves,
    _Figures,
    _forest,
    _heatmap,
    _sweep_plot,
    _validation_curves,
    comparison_words,
)
from cellbg.report.reading import _ordered, _Run
from cellbg.report.tables import (
    _is_bg_gap,
    _isnan,
    _mean_sd,
    _p_test,
    _pct,
    _pp,
    bg_gap_table,
    latex_table,
    parse_condition,
    significance_tables,
)


def _section_overview(doc: _Doc, run: _Run) -> None:
    p = run.protocol
    doc.para(
        f"Run folder `{run.run_dir}`; protocol **{p.name}**. Report written "
        f"{_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} by cellbg {__version__}. "
        "Accuracies are percentages: per seed over all tested cells (pooled over folds), "
        "then mean ± SD over seeds."
    )
    from cellbg.report.headline import confirmatory_sentence

    sentence = confirmatory_sentence(run.tests, alpha=p.stats.alpha) if run.tests is not None else None
    if sentence:
        doc.para(f"**{sentence}**")


def _section_accuracy(doc: _Doc, run: _Run, figs: _Figures, tex: dict[str, str]) -> pd.DataFrame | None:
    doc.heading("Accuracy: train variant × test variant")
    if run.predictions is None:
        doc.absent(
            "no predictions were found (`predictions.parquet` is missing), so there are no "
            "accuracy tables or accuracy figures; run `cellbg train` for this protocol."
        )
        return None
    p = run.protocol
    acc = _accuracy(run.predictions)
    models = _ordered(acc["model"], [m.key for m in p.models])
    trains = _ordered(acc["train_variant"], p.variants.train)
    tests = _ordered(acc["test_variant"], p.variants.test)
    for model in models:
        sub = acc[acc["model"] == model].set_index(["train_variant", "test_variant"])
        cols = [t for t in tests if t in sub.index.get_level_values(1)]
        rows = [t for t in trains if t in sub.index.get_level_values(0)]
        n_seeds = int(sub["n_seeds"].max())
        # Test variants down, training variants across: a table that fits one column of a
        # two-column article however many test variants there are.
        table = pd.DataFrame(
            [
                [c] + [_mean_sd(sub["mean"].get((r, c), np.nan), sub["sd"].get((r, c), np.nan)) for r in rows]
                for c in cols
            ],
            columns=["test variant"] + [f"trained on {r}" for r in rows],
        )
        tex_table = pd.DataFrame(
            [
                [c] + [_mean_sd(sub["mean"].get((r, c), np.nan), sub["sd"].get((r, c), np.nan), tex=True) for r in rows]
                for c in cols
            ],
            columns=table.columns,
        )
        spread = f"mean ± SD over {n_seeds} seeds" if n_seeds > 1 else "one seed, so no SD"
        n_cells = int(sub["n_cells"].max())
        n_pat = int(sub["n_patients"].max())
        caption = (
            f"Accuracy (%) of {model}; rows: test variant, columns: training variant; "
            f"{spread}; {n_cells} cells from {n_pat} patients."
        )
        name = f"accuracy_{_slug(model)}"
        doc.table(table, caption, name)
        tex[name] = latex_table(
            tex_table, caption=caption, label=f"tab:{name}", size="footnotesize", wide=len(rows) > 3
        )
    if figs.enabled:
        png = figs.save(_heatmap(figs, acc, models, trains, tests), "accuracy_heatmap")
        doc.figure(
            "accuracy_heatmap",
            "Accuracy (%) per training variant (rows) and test variant (columns), mean over seeds; viridis scale.",
            png,
        )
    return acc


def _accuracy(predictions: pd.DataFrame) -> pd.DataFrame:
    """The stats stage's accuracy table, with ``mean`` and ``sd`` (fractions) for plotting."""
    from cellbg.stats import accuracy_table

    acc = accuracy_table(predictions)
    return acc.rename(columns={"accuracy": "mean", "accuracy_sd": "sd"})


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_") or "model"


def _section_tests(doc: _Doc, run: _Run, figs: _Figures, tex: dict[str, str]) -> None:
    doc.heading("Significance tests")
    if run.tests is None:
        doc.absent(
            "no statistics were computed (`stats/tests.csv` is missing), so there is no "
            "significance table and no forest plot; run `cellbg stats RUN_DIR`."
        )
        return
    t = run.tests
    if t.empty:
        doc.absent("`stats/tests.csv` holds no tests, so there is no significance table and no forest plot.")
        return
    main, secondary, main_notes, secondary_notes = significance_tables(t)
    alpha = run.protocol.stats.alpha
    caption = (
        "Primary tests, one per comparison, from `stats/tests.csv`: Δ is condition b minus condition a in "
        "percentage points (accuracy, or the share of attribution on the background for the saliency family), "
        "with its 95% CI; conditions are training variant:test variant; patients is the number of paired "
        "patients; p adj. is adjusted within the family (Holm for the confirmatory and saliency families, "
        f"Benjamini–Hochberg for the exploratory grid); alpha = {alpha:g}."
    )
    n_label = 3 + ("measure" in main.columns) + 2 * ("saliency map" in main.columns)
    if len(main) and main["test"].nunique() == 1:  # one test for every row: say it once, in the caption
        caption += f" Test: {main['test'].iloc[0]}."
        main = main.drop(columns="test")
    if "SE (pp)" in main.columns:
        caption += " SE: the standard error of Δ, in percentage points."
    doc.table(main, caption, "significance", notes=main_notes)
    tex["significance"] = latex_table(
        main,
        caption=caption,
        label="tab:significance",
        size="scriptsize",
        wide=True,
        notes=main_notes,
        max_rows=30,
        align=_significance_align(main.columns, n_label, test_width=None),
    )
    if len(secondary):
        caption2 = (
            "Sensitivity checks and secondary tests (conditional): the other tests of the confirmatory "
            "comparisons and the cell-level McNemar test of every comparison; Δ in percentage points as in "
            "the main table; McNemar b/c are the discordant cell counts (a right and b wrong / a wrong and b "
            "right)."
        )
        doc.table(secondary, caption2, "significance_secondary", notes=secondary_notes)
        tex["significance_secondary"] = latex_table(
            secondary,
            caption=caption2,
            label="tab:significance_secondary",
            size="scriptsize",
            wide=True,
            notes=secondary_notes,
            max_rows=30,
            align=_significance_align(secondary.columns, n_label, test_width="3.2cm"),
        )
    prose = _summary_prose(run.summary_md or "")
    if prose:
        doc.para("In words, from the statistics stage (`stats/summary.md`, which also holds its tables):")
        for line in prose:
            doc.para(line)
    # One scale per plot: accuracy differences of the primary tests (saliency rows and
    # secondary/sensitivity re-tests of the same pair stay in the table).
    keep = np.isfinite(t["estimate"].astype(float))
    if "role" in t.columns:
        keep &= t["role"].astype(str) == "primary"
    if "measure" in t.columns:
        keep &= t["measure"].astype("string").fillna("accuracy").astype(str).isin(["accuracy", ""])
    forest = t[keep].copy()
    # A planned (confirmatory) pair that the exploratory sweep tests again is drawn once.
    pair = forest["model"].astype(str) + "|" + forest["a"].astype(str) + "|" + forest["b"].astype(str)
    planned = set(pair[forest["family"].astype(str) == "confirmatory"])
    forest = forest[~((forest["family"].astype(str) == "exploratory") & pair.isin(planned))]
    named = forest["name"].astype("string").fillna("").astype(str)  # all-empty reads back as float NaN
    forest["label"] = [
        comparison_words(a, b, n or ("BG-GAP" if _is_bg_gap(a, b) else ""))
        for a, b, n in zip(forest["a"].astype(str), forest["b"].astype(str), named, strict=True)
    ]
    for c in ("estimate", "ci_low", "ci_high"):  # percentage points, as in the tables
        forest[c] = 100 * forest[c].astype(float)
    if figs.enabled and len(forest):
        png = figs.save(_forest(figs, forest), "forest_gaps")
        doc.figure(
            "forest_gaps",
            "Accuracy differences (percentage points) with 95% CIs from the primary test of "
            "each comparison, per model; each label reads as the difference it shows; colour and marker give "
            "the test family; dashed line at no difference. A comparison planned and also in the exploratory "
            "grid is drawn once.",
            png,
        )
    elif figs.enabled:
        doc.absent("no primary accuracy test has a finite estimate, so there is no forest plot.")


def _significance_align(columns, n_label: int, *, test_width: str | None) -> str:
    """Column spec: label columns left (the comparison wraps), the test left (wrapping when
    ``test_width``), the role left, numbers right."""
    wrap = ">{\\raggedright\\arraybackslash}p{%s}"
    spec = []
    for i, c in enumerate(columns):
        if c == "comparison (a vs b)":
            spec.append(wrap % "4.2cm")
        elif c == "test":
            spec.append(wrap % test_width if test_width else "l")
        elif i < n_label or c == "role":
            spec.append("l")
        else:
            spec.append("r")
    return "".join(spec)


def _summary_prose(text: str) -> list[str]:
    """The sentences of ``stats/summary.md``: its paragraphs and bullets, not its tables
    or headings (the report shows the same numbers in its own tables)."""
    out: list[str] = []
    block: list[str] = []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|")):
            if block:
                out.append(" ".join(block))
                block = []
            continue
        if stripped.startswith(("- ", "* ")):
            if block:
                out.append(" ".join(block))
            block = [stripped[2:]]
        else:
            block.append(stripped)
    return out


def _section_bg_gap(doc: _Doc, run: _Run, tex: dict[str, str]) -> None:
    doc.heading("BG-GAP")
    if run.predictions is None:
        doc.absent("no predictions, so no BG-GAP.")
        return
    gap = bg_gap_table(run.predictions, run.tests)
    if gap.empty:
        doc.absent(
            "BG-GAP = acc(mixed_same) − acc(mixed_rand) needs both `mixed_same` and `mixed_rand` "
            "among the test variants; this run did not test both."
        )
        return
    rows = []
    for r in gap.itertuples(index=False):
        pp = _pp(r.gap)
        sd = "" if _isnan(r.gap_sd) else f" ± {100 * r.gap_sd:.1f}"
        ci = "–" if _isnan(r.ci_low) else f"[{_pp(r.ci_low)}, {_pp(r.ci_high)}]"
        rows.append(
            [
                str(r.model),
                str(r.train_variant),
                _pct(r.acc_same),
                _pct(r.acc_rand),
                pp + sd,
                ci,
                _p_test(r.pvalue) if r.method else "–",
                r.method or "not tested",
            ]
        )
    header = [
        "model",
        "train variant",
        "acc mixed_same (%)",
        "acc mixed_rand (%)",
        "BG-GAP (pp)",
        "95% CI (pp)",
        "p",
        "test",
    ]
    caption = (
        "BG-GAP = acc(mixed_same) − acc(mixed_rand) in percentage points, mean ± SD over seeds; "
        "CI and p from the stats stage where it tested this pair."
    )
    df = pd.DataFrame(rows, columns=header)
    doc.table(df, caption, "bg_gap")
    tex["bg_gap"] = latex_table(
        df,
        caption=caption,
        label="tab:bg_gap",
        size="footnotesize",
        wide=True,
        align="ll" + "r" * 5 + ">{\\raggedright\\arraybackslash}p{3.4cm}",
    )
    # Measured with benchmarks/validate_null_pipeline.py: with no background cue the only_fg
    # drop of an original-trained model averages ~6 points while BG-GAP stays at 0, so the
    # report says which question each number answers.
    doc.para(
        "How to read it: for a model trained on `original`, the drop from `original` to `only_fg` "
        "is how much the model depends on its background, the effect of an unfamiliar surround "
        "included, so it need not be zero when the background carries no class information. "
        "BG-GAP compares two real backgrounds that differ only in the class of the cell they came "
        "from, so it measures the model's use of class information in the background. A model "
        "trained on `only_fg` never saw a background: its BG-GAP is a negative control."
    )


def _groups(acc: pd.DataFrame, p) -> list[tuple[str, str]]:
    models = _ordered(acc["model"], [m.key for m in p.models])
    trains = _ordered(acc["train_variant"], p.variants.train)
    have = set(zip(acc["model"], acc["train_variant"], strict=True))
    return [(m, t) for m in models for t in trains if (m, t) in have]


def _section_factors(doc: _Doc, run: _Run, acc: pd.DataFrame | None, figs: _Figures) -> None:
    doc.heading("Background factors")
    if acc is None:
        doc.absent("no predictions, so no background-factor figures.")
        return
    p = run.protocol
    tested = _ordered(acc["test_variant"], p.variants.test)
    parsed = {v: parse_condition(v) for v in tested}
    idx = acc.set_index(["model", "train_variant", "test_variant"])
    groups = _groups(acc, p)
    if not figs.enabled:
        doc.absent("figures are switched off in the protocol (`report.figures: false`).")
        return

    # background size: bg_ring(k) between only_fg and original
    rings = sorted(
        ((float(a[0]), v) for v, (mask, n, a) in parsed.items() if n == "bg_ring" and not mask and a),
        key=lambda t: t[0],
    )
    if rings:
        series, refs = [], []
        for model, train in groups:
            key = (model, train)
            ys = [idx["mean"].get((model, train, v), np.nan) for _, v in rings]
            sds = [idx["sd"].get((model, train, v), np.nan) for _, v in rings]
            series.append(
                {
                    "panel": model,
                    "key": key,
                    "x": [k for k, _ in rings],
                    "y": ys,
                    "sd": sds,
                    "label": f"trained on {train}",
                }
            )
            for name, ls in (("only_fg", ":"), ("original", "--")):
                refs.append({"key": key, "name": name, "ls": ls, "y": idx["mean"].get((model, train, name), np.nan)})
        png = figs.save(
            _sweep_plot(
                figs,
                series,
                xlabel="background ring width (pixels)",
                title="Accuracy against background size",
                refs=refs,
            ),
            "ring_width",
        )
        doc.figure(
            "ring_width",
            "Accuracy (mean ± SD over seeds) when a ring of k pixels of the cell's own "
            "background is kept, one panel per model; horizontal lines: the only_fg (dotted) and original "
            "(dashed) levels of the same model and training variant, in its colour.",
            png,
        )
    else:
        doc.absent(
            "no `bg_ring(k)` test variants were run, so there is no accuracy-against-ring-width "
            "figure (use a ring-sweep protocol)."
        )

    colours = [v for v, (mask, n, _) in parsed.items() if n == "bg_color" and not mask]
    blurs = sorted(
        (v for v, (mask, n, a) in parsed.items() if n == "bg_blur" and not mask),
        key=lambda v: float(parsed[v][2][0]) if parsed[v][2] else 0.0,
    )
    if colours or blurs:
        ref_variants = [v for v in ("original", "only_fg") if v in tested]
        panels = [
            (t, ref_variants + vs) for t, vs in (("background colour", colours), ("background blur", blurs)) if vs
        ]
        png = figs.save(_bars(figs, panels, acc, groups), "colour_blur")
        doc.figure(
            "colour_blur",
            "Accuracy (mean ± SD over seeds) with the background replaced by a solid "
            "colour (`bg_color(r,g,b)`) or blurred (`bg_blur(sigma)`), beside original and only_fg.",
            png,
        )
    else:
        doc.absent("no `bg_color` or `bg_blur` test variants were run, so there are no colour/blur bars.")

    perturbed: dict[str, list[tuple[float, str]]] = {}
    for v, (mask, name, args) in parsed.items():
        if len(mask) == 1 and mask[0][1]:
            sign = -1.0 if mask[0][0] == "mask_erode" else 1.0
            base = name + (f"({','.join(args)})" if args else "")
            perturbed.setdefault(base, []).append((sign * float(mask[0][1][0]), v))
    if perturbed:
        series = []
        for base, pts in perturbed.items():
            if base in tested:
                pts = pts + [(0.0, base)]
            pts = sorted(pts)
            for model, train in groups:
                series.append(
                    {
                        "panel": model,
                        "key": (model, train, base),
                        "x": [k for k, _ in pts],
                        "y": [idx["mean"].get((model, train, v), np.nan) for _, v in pts],
                        "sd": [idx["sd"].get((model, train, v), np.nan) for _, v in pts],
                        "label": f"trained on {train}, tested on {base}",
                    }
                )
        png = figs.save(
            _sweep_plot(
                figs,
                series,
                xlabel="mask change (pixels; < 0 eroded, > 0 dilated)",
                title="Accuracy against mask erosion / dilation",
                refs=[],
            ),
            "mask_quality",
        )
        doc.figure(
            "mask_quality",
            "Accuracy (mean ± SD over seeds) when the test masks are eroded (negative) or "
            "dilated (positive) by k pixels before the background variant is applied.",
            png,
        )
    else:
        doc.absent(
            "no `mask_erode(k)` / `mask_dilate(k)` test variants were run, so there is no "
            "mask-quality sensitivity figure."
        )
    _section_study_factors(doc, acc, figs, parsed, groups, tested)


def _section_study_factors(
    doc: _Doc, acc: pd.DataFrame, figs: _Figures, parsed: dict, groups: list, tested: list[str]
) -> None:
    """Hashmi & Li's factors: the cell's size in the crop, generic backgrounds, co-occurring objects.

    Each part appears only when its test variants were run (``context(f)``; ``bg_image``;
    ``no_others``).
    """
    from matplotlib.ticker import AutoLocator

    idx = acc.set_index(["model", "train_variant", "test_variant"])
    mean = idx["mean"]

    contexts = sorted(
        ((float(a[0]), v) for v, (mask, n, a) in parsed.items() if n == "context" and not mask and a),
        key=lambda t: -t[0],
    )
    if contexts:
        series, refs = [], []
        for model, train in groups:
            key = (model, train)
            series.append(
                {
                    "panel": model,
                    "key": key,
                    "x": [1.0 / f for f, _ in contexts],
                    "y": [mean.get((model, train, v), np.nan) for _, v in contexts],
                    "sd": [idx["sd"].get((model, train, v), np.nan) for _, v in contexts],
                    "label": f"trained on {train}",
                }
            )
            for name, ls in (("only_fg", ":"), ("original", "--")):
                refs.append({"key": key, "name": name, "ls": ls, "y": mean.get((model, train, name), np.nan)})
        fig = _sweep_plot(
            figs,
            series,
            xlabel="cell size relative to the crop as cut (1/f)",
            title="Accuracy against the cell's size in the crop",
            refs=refs,
        )
        for ax in fig.axes:
            ax.xaxis.set_major_locator(AutoLocator())
        png = figs.save(fig, "context_size")
        doc.figure(
            "context_size",
            "Accuracy (mean ± SD over seeds) when the crop's central window of side f "
            "(as a fraction of the crop) is resampled to the model's input size (`context(f)`, bilinear): "
            "the cell appears 1/f times larger (right) or smaller (left) with correspondingly less or more "
            "background, at a fixed input size; 1 is the crop as cut. Lines: only_fg (dotted) and original "
            "(dashed) levels.",
            png,
        )

    generic = [v for v, (mask, n, _) in parsed.items() if n == "bg_image" and not mask]
    cooc = [
        v
        for v in ("no_others", "no_others+mixed_same", "no_others+mixed_rand", "mixed_same", "mixed_rand")
        if v in tested
    ]
    panels = []
    if generic:
        panels.append(("generic background", [v for v in ("original", "only_fg") if v in tested] + generic))
    if "no_others" in tested:
        panels.append(("co-occurring objects", ["original", *cooc] if "original" in tested else cooc))
    if not panels:
        return
    png = figs.save(_bars(figs, panels, acc, groups), "generic_cooccurrence")
    doc.figure(
        "generic_cooccurrence",
        "Accuracy (mean ± SD over seeds) with the cell's foreground over a background "
        "from another source (`bg_image(source)`: cell-free synthetic fields, a folder, a constant), and "
        "with the other segmented objects of the crop removed (`no_others`), before and after mixing "
        "backgrounds.",
        png,
    )
    rows = []
    for model, train in groups:
        orig = mean.get((model, train, "original"), np.nan)
        row = {"model": model, "trained on": train}
        for v in generic:
            row[f"{v} − original"] = _pp(mean.get((model, train, v), np.nan) - orig)
        if "no_others" in tested:
            row["no_others − original"] = _pp(mean.get((model, train, "no_others"), np.nan) - orig)
        if "no_others+mixed_same" in tested and "no_others+mixed_rand" in tested:
            row["halo BG-GAP"] = _pp(
                mean.get((model, train, "no_others+mixed_same"), np.nan)
                - mean.get((model, train, "no_others+mixed_rand"), np.nan)
            )
        rows.append(row)
    doc.table(
        pd.DataFrame(rows),
        "Accuracy differences in percentage points (mean over seeds): the generic-background "
        "drop (the cell over another source's background against its own), the co-occurring-objects drop "
        "(`no_others` against `original`: a model that uses neighbouring objects loses accuracy), and the "
        "BG-GAP of crops without other objects (`no_others+mixed_same` − `no_others+mixed_rand`: a model that "
        "uses the cell's own surround, e.g. a halo, loses accuracy on mixed_rand). Their tests, at the patient "
        "level, are in the significance tables.",
        None,
    )


def _section_training(doc: _Doc, run: _Run, figs: _Figures) -> None:
    doc.heading("Training curves")
    if not run.histories:
        doc.absent("no training histories were found (`jobs/*/history.csv`), so there are no training curves.")
        return
    from cellbg.report.methods import _devices

    done = sum(bool(s.get("_done")) for s in run.job_specs)
    devices = _devices(run)
    doc.para(
        f"{len(run.job_specs)} training jobs in `jobs/`, {done} finished (DONE marker); "
        f"{len(run.histories)} have a history. Device used: "
        + (devices or f"not recorded by the jobs (setting: `{run.protocol.training.device}`)")
        + "."
    )
    if figs.enabled:
        usable = [(s, h) for s, h in run.histories if any(("loss" in c or "acc" in c) for c in h.columns)]
        if not usable:
            doc.absent("the training histories have no loss or accuracy column to plot.")
            return
        p = run.protocol
        order = [(m.key, t) for m in p.models for t in p.variants.train]
        png = figs.save(_curves(figs, usable, order), "training_curves")
        doc.figure(
            "training_curves",
            "Loss and accuracy per epoch for every job (seed and fold); colour: "
            "model and training variant; solid: training, dashed: validation.",
            png,
        )
        overlay = _validation_curves(figs, usable, order)
        if overlay is not None:
            png = figs.save(overlay, "validation_curves")
            doc.figure(
                "validation_curves",
                "Validation loss and accuracy per epoch, one line per training variant "
                "(mean over seeds and folds; band: ± SD), overlaid per model: the original-trained model "
                "against each training variant, as in Hashmi & Li's curves.",
                png,
            )


def _section_saliency(doc: _Doc, run: _Run, figs: _Figures, n_cells: int) -> None:
    doc.heading("Saliency")
    p = run.protocol
    if run.saliency is None:
        why = (
            "saliency was switched off in the protocol (`saliency.enabled: false`)"
            if not p.saliency.enabled
            else "`saliency.parquet` is missing; run `cellbg saliency`"
        )
        doc.absent(f"no saliency was computed: {why}.")
        return
    sal = run.saliency
    if sal.empty:
        doc.absent("no saliency was computed: `saliency.parquet` holds no maps.")
        return
    keys = [k for k in ("model", "train_variant", "test_variant", "method") if k in sal.columns]
    summary = sal.groupby(keys, sort=False)["background_share"].agg(["mean", "std", "size"]).reset_index()
    table = summary[keys].astype(str).rename(columns={"train_variant": "train variant", "test_variant": "test variant"})
    table["background share"] = [
        f"{m:.3f}" + ("" if _isnan(sd) else f" ± {sd:.3f}")
        for m, sd in zip(summary["mean"], summary["std"], strict=True)
    ]
    table["maps"] = summary["size"].astype(int)
    doc.table(
        table,
        "Share of attribution that falls on the background, outside the cell mask "
        "(mean ± SD over the sampled cells, seeds and folds).",
        None,
    )
    if not figs.enabled:
        return
    if not (run.run_dir / "saliency.zarr").exists() or "map_index" not in sal.columns:
        doc.absent("no saliency gallery: `saliency.zarr` (the maps) is missing.")
        return
    made = _gallery(figs, run, sal, n_cells)
    if made is None:
        doc.absent("no saliency gallery: no cell has maps from every model.")
        return
    png, train, seed, test = made
    doc.figure(
        "saliency_gallery",
        f"Saliency maps (absolute, scaled to their maximum; inferno) of models trained on "
        f"`{train}` (seed {seed}) and tested on `{test}`, for sampled cells (rows), one column per model and "
        "method, over the image the map was computed on (the crop in the first column); white line: the cell "
        "mask; under each map, its background share.",
        png,
    )


def _rgb(image: np.ndarray) -> np.ndarray:
    """A ``(C, H, W)`` crop in [0, 1] as something ``imshow`` draws: gray or RGB."""
    image = np.clip(np.asarray(image, dtype=float), 0, 1)
    return image[0] if image.shape[0] != 3 else np.moveaxis(image, 0, -1)


def _gallery(figs: _Figures, run: _Run, sal: pd.DataFrame, n_cells: int) -> tuple[bytes, str, int, str] | None:
    """Cells (rows) x (model, method) (columns) over the image each map was computed on (the
    first saliency test variant); None when no cell has them all."""
    import zarr

    p = run.protocol
    train = _ordered(sal["train_variant"], p.variants.train)[0]
    sal = sal[sal["train_variant"] == train]
    test = _ordered(sal["test_variant"], p.saliency.test_variants)[0] if "test_variant" in sal else ""
    if test:
        sal = sal[sal["test_variant"] == test]
    seed = int(sal["seed"].min())
    sal = sal[sal["seed"] == seed]
    models = _ordered(sal["model"], [m.key for m in p.models])
    methods = _ordered(sal["method"], p.saliency.methods)
    columns = [(m, meth) for m in models for meth in methods]
    have = sal.groupby("cell_id").apply(
        lambda g: len(set(zip(g["model"], g["method"], strict=True))), include_groups=False
    )
    full = sorted(have.index[have == len(columns)])
    if not full:  # fall back to one method, if every model has that for some cell
        columns = [(m, methods[0]) for m in models]
        sal = sal[sal["method"] == methods[0]]
        have = sal.groupby("cell_id")["model"].nunique()
        full = sorted(have.index[have == len(models)])
        if not full:
            return None
    labels = sal.drop_duplicates("cell_id").set_index("cell_id")["label"].astype(str)
    # Alternate the classes so the gallery shows each, in a fixed (sorted) order.
    by_class = {c: [x for x in full if labels[x] == c] for c in sorted(labels[full].unique())}
    chosen: list[str] = []
    while len(chosen) < min(n_cells, len(full)):
        for c in by_class:
            if by_class[c] and len(chosen) < n_cells:
                chosen.append(by_class[c].pop(0))
    # a group's member is typed Array | Group; these are arrays, as the saliency and crops stages write them
    store = zarr.open_group(str(run.run_dir / "saliency.zarr"), mode="r")
    maps = cast("zarr.Array", store["maps"])
    shown = cast("zarr.Array", store["shown"]) if "shown" in store and "shown_index" in sal.columns else None
    crop_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if run.cells is not None and (run.run_dir / "crops.zarr").exists():
        group = zarr.open_group(str(run.run_dir / "crops.zarr"), mode="r")
        images, masks = cast("zarr.Array", group["images"]), cast("zarr.Array", group["masks"])
        row_of = dict(zip(run.cells["cell_id"].astype(str), range(len(run.cells)), strict=True))
        divisor = float(cast(float, group.attrs.get("divisor", 1.0)))  # the store keeps the source dtype
        for cell in chosen:
            if cell in row_of:
                image = np.asarray(images[row_of[cell]], float) / divisor
                crop_of[cell] = (_rgb(image), np.asarray(masks[row_of[cell]], float))
    lead = 1 if crop_of else 0  # a first column with the plain crop, for context
    n_cols = len(columns) + lead
    width = SINGLE_COLUMN if n_cols <= 3 else DOUBLE_COLUMN
    fig = figs.new(width, (width - 0.5) / n_cols * len(chosen) + 0.6)
    axes = fig.subplots(len(chosen), len(columns) + lead, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i, cell in enumerate(chosen):
        crop = crop_of.get(cell)
        axes[i, 0].set_ylabel(f"{cell}\n({labels[cell]})", fontsize=7)
        if lead and crop is not None:
            axes[i, 0].imshow(crop[0], cmap="gray" if crop[0].ndim == 2 else None)
            axes[i, 0].contour(crop[1], levels=[0.5], colors="white", linewidths=0.8)
        if i == 0 and lead:
            axes[0, 0].set_title("crop")
        for j, (model, method) in enumerate(columns):
            ax = axes[i, j + lead]
            r = sal[(sal["cell_id"] == cell) & (sal["model"] == model) & (sal["method"] == method)].iloc[0]
            heat = np.abs(np.asarray(maps[int(r["map_index"])], dtype=float))
            heat = heat / heat.max() if heat.max() > 0 else heat
            under = _rgb(np.asarray(shown[int(r["shown_index"])])) if shown is not None else None
            if under is None and crop is not None:
                under = crop[0]
            if under is not None:
                ax.imshow(under, cmap="gray" if under.ndim == 2 else None)
                ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=1)
                if crop is not None:
                    ax.contour(crop[1], levels=[0.5], colors="white", linewidths=0.8)
            else:
                ax.imshow(heat, cmap="inferno", vmin=0, vmax=1)
            ax.set_xlabel(f"background\nshare {float(r['background_share']):.2f}")
            if i == 0:
                ax.set_title(f"{model}\n{method}" if len(methods) > 1 else model)
    return figs.save(fig, "saliency_gallery"), train, seed, test


def _section_segmentation(doc: _Doc, run: _Run, tex: dict[str, str]) -> None:
    doc.heading("Segmentation quality")
    seg = run.protocol.segmentation
    if run.segmentation is None or run.segmentation_path is None:  # the reader sets both or neither
        if seg.method == "masks":
            doc.absent(
                "segmentation quality was not evaluated: the masks were supplied with the data "
                "(`segmentation.method: masks`), so there is no separate ground truth to compare with."
            )
        else:
            doc.absent(
                "segmentation quality was not evaluated: no evaluation against ground-truth masks "
                "was found (run `cellbg segment PROTOCOL --evaluate` with masks in the data)."
            )
        return
    t = run.segmentation
    numeric = [c for c in t.columns if pd.api.types.is_numeric_dtype(t[c]) and not pd.api.types.is_bool_dtype(t[c])]
    counts = [c for c in ("n_true", "n_pred", "tp", "fp", "fn") if c in numeric]
    rates = [c for c in numeric if c not in counts and c not in ("instance", "fold", "seed")]
    pooled: dict[str, float] = {}
    if {"tp", "fp", "fn"} <= set(counts):
        # Pooled over images (micro average), beside the per-image mean (macro average).
        tp, fp, fn = (float(t[c].sum()) for c in ("tp", "fp", "fn"))
        pooled = {
            "precision": tp / (tp + fp) if tp + fp else np.nan,
            "recall": tp / (tp + fn) if tp + fn else np.nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan,
        }
    rows = [
        [
            c,
            f"{t[c].mean():.3f}" + ("" if len(t) < 2 else f" ± {t[c].std():.3f}"),
            "–" if c not in pooled or _isnan(pooled[c]) else f"{pooled[c]:.3f}",
        ]
        for c in rates
    ]
    rows += [
        [c, f"{t[c].mean():.1f}" + ("" if len(t) < 2 else f" ± {t[c].std():.1f}"), f"{int(t[c].sum())} (total)"]
        for c in counts
    ]
    df = pd.DataFrame(rows, columns=["measure", "per image (mean ± SD)", "pooled over images"])
    caption = (
        f"Segmentation quality ({seg.method}) against ground truth on {len(t)} images "
        f"(`{run.segmentation_path.relative_to(run.run_dir)}`); precision, recall and F1 at IoU 0.5, "
        "AP averaged over IoU 0.5 to 0.95."
    )
    doc.table(df, caption, "segmentation")
    tex["segmentation"] = latex_table(df, caption=caption, label="tab:segmentation", align="lrr")
