"""One cell of a run as the models saw it: its crop, every test variant, predictions, saliency.

A viewer (the napari plugin, a notebook) asks two questions of a finished run: which cells
are there, with what results for one model and training variant (:func:`cell_table`), and
what did that model see and where did it look for one cell (:func:`load_cell`). Both read
the run's files (``cells.parquet``, ``crops.zarr``, ``predictions.parquet``,
``saliency.parquet`` / ``saliency.zarr``) and recompute nothing but the test variants of the
cell's held-out set (:func:`cellbg.saliency.held_out_variant`), which reproduces the images
(and ``mixed_*`` partners) the model was tested on.

Examples
--------
>>> from cellbg.cellview import condition_label
>>> condition_label("correct", "mixed_rand")
'correct on mixed_rand'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, look_up_option

__all__ = ["CellView", "analyses", "cell_table", "condition_label", "load_cell"]


def condition_label(what: str, test_variant: str, method: str | None = None) -> str:
    """A table column name in words: ``'correct on mixed_rand'``,
    ``'background share, gradcam on mixed_rand'``."""
    return f"{what}, {method} on {test_variant}" if method else f"{what} on {test_variant}"


def _read(run_dir: Path, name: str, *, filters=None) -> pd.DataFrame | None:
    path = run_dir / name
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path, filters=filters)
    except Exception as exc:  # pyarrow raises many types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CellbgError(f"cannot read {path}: {first}") from None


def analyses(run_dir) -> pd.DataFrame:
    """The (model, train variant, seed) analyses of a run with predictions, in protocol order.

    Returns
    -------
    DataFrame
        Columns ``model, train_variant, seed``; one row each.

    Raises
    ------
    CellbgError
        The run has no ``predictions.parquet``.
    """
    from cellbg.protocol import load_run

    run_dir = Path(run_dir)
    preds = _read(run_dir, "predictions.parquet")
    if preds is None:
        raise CellbgError(f"no predictions.parquet in {run_dir}; run 'cellbg train' first")
    protocol = load_run(run_dir)
    order = {v: i for i, v in enumerate(protocol.variants.train)}
    out = preds[["model", "train_variant", "seed"]].drop_duplicates()
    out = out.assign(_o=out["train_variant"].map(order).fillna(len(order)))
    return out.sort_values(["model", "_o", "seed"]).drop(columns="_o").reset_index(drop=True)


def _choose(frame: pd.DataFrame, model: str, train_variant: str, seed: int | None):
    models = sorted(frame["model"].astype(str).unique())
    model = look_up_option(model, models, what="model")
    frame = frame[frame["model"] == model]
    train_variant = look_up_option(train_variant, sorted(frame["train_variant"].unique()), what="training variant")
    frame = frame[frame["train_variant"] == train_variant]
    seed = int(frame["seed"].min()) if seed is None else int(seed)
    if not (frame["seed"] == seed).any():
        raise CellbgError(f"no results for seed {seed}; seeds: {sorted(frame['seed'].unique().tolist())}")
    return frame[frame["seed"] == seed], model, train_variant, seed


def cell_table(
    run_dir, *, model: str, train_variant: str, seed: int | None = None, target: str = "predicted"
) -> pd.DataFrame:
    """One row per cell with one model's results, columns named in words.

    Parameters
    ----------
    run_dir : str or Path
        A run folder with ``cells.parquet`` and ``predictions.parquet``.
    model, train_variant : str
        The analysis shown (one model trained on one variant; never pooled).
    seed : int, optional
        The training seed; default the smallest.
    target : {'predicted', 'true'}
        Which class the saliency maps explain, where both were computed.

    Returns
    -------
    DataFrame
        ``cell, patient, class``; for each saliency test variant and method ``background
        share, <method> on <variant>`` (NaN where the cell was not sampled); for each test
        variant ``correct on <variant>`` (1 or 0), then ``probability on <variant>`` (of the
        predicted class), then ``predicted on <variant>``; last ``image, fold, area (px)``.
        Cells the model did not predict (not held out for it) keep NaN.

    Examples
    --------
    See :func:`load_cell`.
    """
    from cellbg.protocol import load_run

    run_dir = Path(run_dir)
    cells = _read(run_dir, "cells.parquet")
    if cells is None:
        raise CellbgError(f"no cells.parquet in {run_dir}; run 'cellbg crops' first")
    preds = _read(run_dir, "predictions.parquet")
    if preds is None:
        raise CellbgError(f"no predictions.parquet in {run_dir}; run 'cellbg train' first")
    protocol = load_run(run_dir)
    preds, model, train_variant, seed = _choose(preds, model, train_variant, seed)
    table = pd.DataFrame(
        {
            "cell": cells["cell_id"].astype(str).to_numpy(),
            "patient": cells["patient_id"].astype(str).to_numpy(),
            "class": cells["label"].astype(str).to_numpy(),
            "image": cells["image_id"].astype(str).to_numpy(),
            "fold": cells["fold"].to_numpy() if "fold" in cells else np.nan,
            "area (px)": cells["area"].to_numpy(np.float64) if "area" in cells else np.nan,
        }
    )
    sal = _read(run_dir, "saliency.parquet")
    if sal is not None and len(sal):
        sal = sal[(sal["model"] == model) & (sal["train_variant"] == train_variant) & (sal["seed"] == seed)]
        if "target" in sal and (sal["target"] == target).any():
            sal = sal[sal["target"] == target]
        variants = [v for v in protocol.saliency.test_variants if v in set(sal["test_variant"])]
        variants += sorted(set(sal["test_variant"]) - set(variants))
        for variant in variants:
            for method in [m for m in protocol.saliency.methods if m in set(sal["method"])]:
                sub = sal[(sal["test_variant"] == variant) & (sal["method"] == method)]
                share = sub.drop_duplicates("cell_id").set_index("cell_id")["background_share"]
                table[condition_label("background share", variant, method)] = (
                    table["cell"].map(share).astype(np.float64).to_numpy()
                )
    first = preds.sort_values("fold", kind="stable").drop_duplicates(["cell_id", "test_variant"])
    tested = [v for v in protocol.variants.test if v in set(first["test_variant"])]
    per = {v: first[first["test_variant"] == v].set_index("cell_id") for v in tested}
    for variant, sub in per.items():
        table[condition_label("correct", variant)] = (
            table["cell"].map(sub["correct"].astype(np.float64)).to_numpy(np.float64)
        )
    for variant, sub in per.items():
        table[condition_label("probability", variant)] = table["cell"].map(_prob_of_pred(sub)).to_numpy(np.float64)
    for variant, sub in per.items():
        table[condition_label("predicted", variant)] = table["cell"].map(sub["pred"].astype(str))
    last = ["image", "fold", "area (px)"]
    table = table[[c for c in table.columns if c not in last] + last]
    table.attrs.update({"model": model, "train_variant": train_variant, "seed": seed})
    return table


def _prob_of_pred(preds: pd.DataFrame) -> pd.Series:
    """The probability of the predicted class of each row (from its ``prob_<class>`` column)."""
    out = pd.Series(np.nan, index=preds.index, dtype=np.float64)
    for name in preds["pred"].astype(str).unique():
        col = f"prob_{name}"
        if col in preds:
            hit = preds["pred"].astype(str) == name
            out[hit] = preds.loc[hit, col].astype(np.float64)
    return out


@dataclass(frozen=True)
class CellView:
    """One cell as one model (trained on one variant, one seed) saw it.

    Attributes
    ----------
    cell_id, label, patient_id : str
    model, train_variant : str
    seed, fold : int
        The training seed and the fold in which the cell was held out.
    crop : (C, S, S) ndarray of float32
        The crop as stored.
    mask : (S, S) ndarray of bool
        The cell's mask.
    variants : dict of str -> (C, S, S) ndarray of float32
        Every test variant of the protocol, as the model was tested on it (for ``mixed_*``
        the cell on its partner's background, the partner drawn from the same held-out set).
    partners : dict of str -> str
        The partner cell of each ``mixed_*`` variant (as recorded in ``predictions.parquet``).
    predictions : DataFrame
        One row per test variant (index): ``pred``, ``probability`` (of the predicted
        class), ``correct`` and every ``prob_<class>``.
    saliency : DataFrame
        The rows of ``saliency.parquet`` for this cell and analysis (one target class),
        one per (test variant, method), with ``background_share`` and ``background_ratio``.
    maps : dict of (str, str) -> (S, S) ndarray of float32
        ``(test_variant, method) -> map``, computed on ``shown[test_variant]``.
    shown : dict of str -> (C, S, S) ndarray of float32
        The stored images the maps were computed on, per saliency test variant.
    """

    cell_id: str
    label: str
    patient_id: str
    model: str
    train_variant: str
    seed: int
    fold: int
    crop: np.ndarray
    mask: np.ndarray
    variants: dict = field(default_factory=dict)
    partners: dict = field(default_factory=dict)
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)
    saliency: pd.DataFrame = field(default_factory=pd.DataFrame)
    maps: dict = field(default_factory=dict)
    shown: dict = field(default_factory=dict)

    def background_share(self, test_variant: str, method: str) -> float:
        """The cell's own background share for one map (NaN when not computed)."""
        rows = self.saliency[(self.saliency["test_variant"] == test_variant) & (self.saliency["method"] == method)]
        return float(rows["background_share"].iloc[0]) if len(rows) else float("nan")


@lru_cache(maxsize=2)
def _lazy_crops(run_dir: str, stamp: tuple):
    """The run's crops read on demand (cached: every cell viewed shares them)."""
    from cellbg.crops import load_crops, load_others

    images, masks, cells = load_crops(run_dir, lazy=True)
    return images, masks, cells, load_others(run_dir, lazy=True)


@lru_cache(maxsize=16)
def _variant_pool(run_dir: str, job: str, variant: str, block: int, stamp: tuple):
    """One prediction block of a job's held-out set in one test variant, as the job showed it
    (cached: the block's cells share it; a block, not the whole held-out set, so that viewing
    cells of a cohort of a million costs a few blocks of memory)."""
    from cellbg.protocol import load_run
    from cellbg.saliency import held_out_variant

    images, masks, cells, others = _lazy_crops(run_dir, stamp[:1])  # the cells file only: shared by all jobs
    rows, shown = held_out_variant(
        load_run(run_dir),
        Path(run_dir) / "jobs" / job,
        variant,
        images=images,
        masks=masks,
        cells=cells,
        others=others,
        block=block,
    )
    return np.asarray(shown.images), np.asarray(shown.partner)


def _job_dir(run_dir: Path, protocol, model: str, train_variant: str, seed: int, fold: int) -> Path:
    import json

    from cellbg.planning import DONE, crops_fingerprint, job_key, plan_jobs

    crops_hash = crops_fingerprint(run_dir)
    for spec in plan_jobs(protocol):
        if (spec.model, spec.train_variant, spec.seed, spec.fold) == (model, train_variant, seed, fold):
            path = run_dir / "jobs" / job_key(protocol, spec, crops_hash=crops_hash)
            if (path / DONE).exists():
                return path
    # A run made by another cellbg version names its jobs by other keys: the finished job whose
    # spec.json names this model, training variant, seed and fold (the newest, if several).
    found = []
    for spec_file in (run_dir / "jobs").glob("*/spec.json"):
        job = json.loads(spec_file.read_text()).get("job", {})
        if (job.get("model"), job.get("train_variant"), job.get("seed"), job.get("fold")) == (
            model,
            train_variant,
            seed,
            fold,
        ) and (spec_file.parent / DONE).exists():
            found.append(spec_file.parent)
    if found:
        return max(found, key=lambda d: (d / DONE).stat().st_mtime_ns)
    raise CellbgError(
        f"no finished training job for model '{model}', training variant '{train_variant}', seed {seed}, "
        f"fold {fold} in {run_dir}; run 'cellbg train' first"
    )


def load_cell(
    run_dir, cell_id: str, *, model: str, train_variant: str, seed: int | None = None, target: str = "predicted"
) -> CellView:
    """Everything one model saw and said about one cell: variants, predictions, saliency.

    Parameters
    ----------
    run_dir : str or Path
        A finished run folder.
    cell_id : str
        A cell of ``cells.parquet``.
    model, train_variant : str
        The analysis (one model trained on one variant).
    seed : int, optional
        The training seed; default the smallest.
    target : {'predicted', 'true'}
        Which class the maps explain, where both were computed.

    Returns
    -------
    CellView

    Raises
    ------
    CellbgError
        An unknown cell, model or training variant, a cell the model never predicted, or a
        run without crops or predictions.

    Examples
    --------
    >>> view = load_cell("runs/quickstart", "images_P01_000-0001", model="resnet",
    ...                  train_variant="original")  # doctest: +SKIP
    >>> view.predictions.loc["mixed_rand", "pred"], view.maps["mixed_rand", "gradcam"].shape  # doctest: +SKIP
    ('healthy', (48, 48))
    """
    import zarr

    from cellbg.crops import load_crops
    from cellbg.protocol import load_run

    run_dir = Path(run_dir)
    protocol = load_run(run_dir)
    if not (run_dir / "cells.parquet").exists():
        load_crops(run_dir, lazy=True)  # its clear error
    cells_stamp = (("cells.parquet", (run_dir / "cells.parquet").stat().st_mtime_ns),)
    images, masks, cells, _ = _lazy_crops(str(run_dir), cells_stamp)
    ids = cells["cell_id"].astype(str).to_numpy()
    hits = np.flatnonzero(ids == str(cell_id))
    if not len(hits):
        raise CellbgError(f"cell '{cell_id}' is not in {run_dir / 'cells.parquet'}")
    row = int(hits[0])
    # only this cell's rows: a cohort's table has millions (read whole: seconds and GBs a click)
    preds = _read(run_dir, "predictions.parquet", filters=[("cell_id", "==", str(cell_id))])
    if preds is None:
        raise CellbgError(f"no predictions.parquet in {run_dir}; run 'cellbg train' first")
    if preds.empty:
        raise CellbgError(f"no model predicted cell '{cell_id}' (it was not held out by any trained job)")
    preds, model, train_variant, seed = _choose(preds, model, train_variant, seed)
    mine = preds[preds["cell_id"].astype(str) == str(cell_id)]
    if mine.empty:
        raise CellbgError(
            f"model '{model}' trained on '{train_variant}' (seed {seed}) never predicted cell '{cell_id}' "
            "(it was not held out for that model)"
        )
    fold = int(mine["fold"].min())
    mine = mine[mine["fold"] == fold].drop_duplicates("test_variant").set_index("test_variant")
    order = [v for v in protocol.variants.test if v in mine.index]
    table = mine.loc[order]
    predictions = pd.DataFrame(
        {
            "pred": table["pred"].astype(str),
            "probability": _prob_of_pred(table),
            "correct": table["correct"].astype(bool),
            **{c: table[c] for c in table.columns if c.startswith("prob_")},
        }
    )
    job = _job_dir(run_dir, protocol, model, train_variant, seed, fold)
    stamp = (*cells_stamp, ("checkpoint.pt", (job / "checkpoint.pt").stat().st_mtime_ns))
    from cellbg.planning import PREDICT_BLOCK
    from cellbg.saliency import _job_cells

    rows = _job_cells(job, _lazy_crops(str(run_dir), stamp[:1])[2])  # the held-out set, in prediction order
    position = int(np.flatnonzero(rows == row)[0])
    block, i = divmod(position, PREDICT_BLOCK)
    variants, partners = {}, {}
    for variant in order:
        shown, partner = _variant_pool(str(run_dir), job.name, variant, block, stamp)
        variants[variant] = shown[i]
        if partner[i] >= 0:
            partners[variant] = ids[rows[partner[i]]]
    sal = _read(run_dir, "saliency.parquet")
    maps, shown_images, sal_rows = {}, {}, pd.DataFrame()
    if sal is not None and len(sal):
        sal_rows = sal[
            (sal["cell_id"].astype(str) == str(cell_id))
            & (sal["model"] == model)
            & (sal["train_variant"] == train_variant)
            & (sal["seed"] == seed)
            & (sal["fold"] == fold)
        ]
        if "target" in sal_rows and (sal_rows["target"] == target).any():
            sal_rows = sal_rows[sal_rows["target"] == target]
        sal_rows = sal_rows.drop_duplicates(["test_variant", "method"]).reset_index(drop=True)
        if len(sal_rows):
            group = zarr.open_group(str(run_dir / "saliency.zarr"), mode="r")
            for r in sal_rows.itertuples():
                maps[r.test_variant, r.method] = np.asarray(cast(zarr.Array, group["maps"])[int(r.map_index)])
                if "shown" in group and "shown_index" in sal_rows:
                    shown_images[r.test_variant] = np.asarray(cast(zarr.Array, group["shown"])[int(r.shown_index)])
    return CellView(
        cell_id=str(cell_id),
        label=str(cells["label"].iloc[row]),
        patient_id=str(cells["patient_id"].iloc[row]),
        model=model,
        train_variant=train_variant,
        seed=seed,
        fold=fold,
        crop=np.asarray(images[row], np.float32),
        mask=np.asarray(masks[row], bool),
        variants=variants,
        partners=partners,
        predictions=predictions,
        saliency=sal_rows,
        maps=maps,
        shown=shown_images,
    )
