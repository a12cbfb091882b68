"""Tests of the synthetic Sezary-like dataset generator (issue 3).

The known-answer tests train simple classifiers (Fisher discriminants in numpy) on
hand-picked features of some patients and measure the ROC AUC on held-out patients:
background-only features must find nothing at ``signal=0`` and the planted cue at
``signal=1``; morphology features must separate the classes at every signal strength.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.stats import rankdata

from cellbg import synth
from cellbg._checks import CellbgError
from cellbg.data import discover_manifest, read_image, read_mask
from cellbg.synth import CLASSES, make_dataset, random_stain, synth_field

RING = 12  # pixels of background around each cell used by the background features
FAR = 24  # pixels farther than this from every cell are beyond the reach of any cue
LOCAL = 24  # the local reference background lies within FAR + LOCAL of the cell outline


# ----------------------------------------------------------------------------- helpers
def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney probability that a positive outscores a negative."""
    positive = np.asarray(positive, bool)
    ranks = rankdata(scores)
    n1, n0 = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def fisher_scores(x_train, y_train, x_test) -> np.ndarray:
    """Fisher's linear discriminant (ridge-stabilised) fitted on train, applied to test."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    cov = np.cov(a.T) + 1e-3 * np.eye(a.shape[1])
    w = np.linalg.solve(cov, a[y_train].mean(0) - a[~y_train].mean(0))
    return b @ w


def held_out_auc(features: pd.DataFrame, columns: list[str]) -> float:
    """Two-fold patient cross-validation: each half of the patients is scored by a
    discriminant trained on the other half; AUC of the pooled held-out scores."""
    patients = np.array(sorted(features["patient"].unique()))
    halves = [patients[::2], patients[1::2]]
    x = features[columns].to_numpy(float)
    y = (features["label"] == "sezary").to_numpy()
    scores = np.empty(len(features))
    for test in halves:
        held = features["patient"].isin(test).to_numpy()
        scores[held] = fisher_scores(x[~held], y[~held], x[held])
    return auc(scores, y)


def cell_features(out_dir: Path) -> pd.DataFrame:
    """Per-cell background and morphology features measured from the written files."""
    manifest = discover_manifest(out_dir / "manifest.csv")
    truth = pd.read_csv(out_dir / "cells_truth.csv")
    frames = []
    for r in manifest.itertuples():
        image = read_image(r.path).astype(np.float32)  # (3, H, W)
        mask = read_mask(r.mask_path)
        n = int(mask.max()) + 1
        od = -np.log((image + 1.0) / 256.0).reshape(3, -1)  # optical density per channel
        background = mask == 0
        # distance to the nearest cell pixel, and which cell that is
        dist, (ir, ic) = ndimage.distance_transform_edt(background, return_indices=True)
        owner = mask[ir, ic].ravel()
        flat_labels = mask.ravel()

        def per_cell(w, labels=flat_labels, n=n):
            return np.bincount(labels, weights=w, minlength=n)[1:]

        # background ring: pixels within RING of a cell, given to the nearest cell
        ring = (background & (dist <= RING)).ravel()
        ring_n = np.bincount(owner[ring], minlength=n)[1:]
        ring_od = np.stack([np.bincount(owner[ring], od[c, ring], n)[1:] for c in range(3)], 1)
        ring_od /= np.maximum(ring_n, 1)[:, None]
        # local reference: background beyond the cue's reach from every cell, yet near this
        # one (removes smooth illumination and plasma variations within the field)
        area = per_cell(None)
        rr, cc = np.indices(mask.shape)
        cy = per_cell(rr.ravel().astype(float)) / area
        cx = per_cell(cc.ravel().astype(float)) / area
        radius = np.sqrt(area / np.pi)
        d_centre = np.hypot(rr.ravel()[None] - cy[:, None], cc.ravel()[None] - cx[:, None])
        far = (dist.ravel() > FAR)[None] & (d_centre <= (radius + FAR + LOCAL)[:, None])
        far = far.astype(np.float32)
        local_ref = (far @ od.T) / np.maximum(far.sum(1), 1)[:, None]
        # morphology: size, nucleus share (dark pixels), nucleus outline and texture
        green = od[1] - np.median(od[1, background.ravel()])
        nucleus = (mask > 0) & (green.reshape(mask.shape) > 0.6)
        edge = (nucleus & ~ndimage.binary_erosion(nucleus)).ravel()
        nucleus = nucleus.ravel()
        nuc_area = np.maximum(per_cell(nucleus.astype(float)), 1.0)
        g_mean = per_cell(green * nucleus) / nuc_area
        g_var = per_cell(green**2 * nucleus) / nuc_area - g_mean**2
        frames.append(
            pd.DataFrame(
                {
                    "image_id": r.image_id,
                    "instance": np.arange(1, n),
                    "patient": r.patient_id,
                    "label": r.label,
                    "bg_r": ring_od[:, 0] - local_ref[:, 0],
                    "bg_g": ring_od[:, 1] - local_ref[:, 1],
                    "bg_b": ring_od[:, 2] - local_ref[:, 2],
                    "log_area": np.log(area),
                    "nc_share": nuc_area / area,
                    "nuc_roughness": per_cell(edge.astype(float)) ** 2 / nuc_area,
                    "nuc_texture": np.sqrt(np.maximum(g_var, 0)),
                }
            )
        )
    feats = pd.concat(frames, ignore_index=True)
    return feats.merge(truth[["image_id", "instance", "cue"]], on=["image_id", "instance"])


BACKGROUND = ["bg_r", "bg_g", "bg_b"]
MORPHOLOGY = ["log_area", "nc_share", "nuc_roughness", "nuc_texture"]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def known_answer_sets(tmp_path_factory):
    """Datasets at signal 0, 0.5 and 1 and their cell features (60 cells per patient; the
    null set is larger: its AUC must lie within +-0.07 of 0.5, about 3.5 standard errors)."""
    out = {}
    for signal, patients in ((0.0, 24), (0.5, 12), (1.0, 12)):
        d = tmp_path_factory.mktemp(f"signal{signal}")
        make_dataset(d, patients=patients, cells_per_patient=60, cells_per_image=6, signal=signal, seed=11)
        out[signal] = cell_features(d)
    return out


# ----------------------------------------------------------------------------- known answers
def test_background_features_find_nothing_without_signal(known_answer_sets):
    feats = known_answer_sets[0.0]
    assert len(feats) == 24 * 60 and not feats["cue"].any()
    assert abs(held_out_auc(feats, BACKGROUND) - 0.5) <= 0.07


def test_background_features_find_the_planted_cue(known_answer_sets):
    full = held_out_auc(known_answer_sets[1.0], BACKGROUND)
    half = held_out_auc(known_answer_sets[0.5], BACKGROUND)
    assert known_answer_sets[1.0]["cue"].all()
    assert full >= 0.9
    # half the cells carry the cue: the background is informative, but less so
    assert 0.6 < half < full


@pytest.mark.parametrize("signal", [0.0, 0.5, 1.0])
def test_morphology_separates_classes_at_every_signal(known_answer_sets, signal):
    value = held_out_auc(known_answer_sets[signal], MORPHOLOGY)
    assert value >= 0.85
    # the classes overlap: size alone is a good but imperfect classifier
    size_only = held_out_auc(known_answer_sets[signal], ["log_area"])
    assert 0.7 < size_only < 0.97


# ----------------------------------------------------------------------------- layout, masks
def test_dataset_layout_is_read_by_data_and_agrees_with_files(tmp_path):
    manifest = make_dataset(
        tmp_path, patients=3, cells_per_patient=10, cells_per_image=4, image_size=128, signal=0.5, seed=2
    )
    assert list(manifest.columns) == ["path", "label", "patient", "mask"]
    table = discover_manifest(tmp_path / "manifest.csv")
    assert len(table) == len(manifest) == 3 * 4  # 5 cells per class -> 2 images each
    truth = pd.read_csv(tmp_path / "cells_truth.csv")
    assert len(truth) == 3 * 10
    assert set(truth["image_id"]) == set(table["image_id"])
    for r in manifest.itertuples():
        image = read_image(tmp_path / r.path)
        mask = read_mask(tmp_path / r.mask)
        assert image.shape == (3, 128, 128) and image.dtype == np.uint8
        cells = truth[truth["path"] == r.path]
        assert (cells["label"] == r.label).all() and (cells["patient"] == r.patient).all()
        assert sorted(np.unique(mask[mask > 0])) == sorted(cells["instance"])
        areas = np.bincount(mask.ravel())[cells["instance"]]
        np.testing.assert_array_equal(areas, cells["area"])
    # every patient has both classes with label_by="cell"
    assert (manifest.groupby("patient")["label"].nunique() == 2).all()


def test_masks_are_exact_and_never_overlap():
    # full fields of the largest cells; a faint platelet stain so that the only dark pixels
    # are nuclei, which must all lie inside their cell's mask
    import dataclasses

    stain = random_stain(5)
    stain = dataclasses.replace(stain, platelet=stain.platelet * 0.3, debris=stain.debris * 0.3)
    for seed in range(8):
        fov = synth_field("sezary", n_cells=16, stain=stain, seed=seed, cue_probability=1.0)
        mask, image = fov.mask.astype(int), fov.image
        assert mask.max() == 16 and len(np.unique(mask)) == 17
        for cell in fov.cells.itertuples():
            region = mask == cell.instance
            _, n_parts = ndimage.label(region)
            assert n_parts == 1  # an overlap would give a label split in two parts
            assert mask[int(round(cell.centre_r)), int(round(cell.centre_c))] == cell.instance
            expected = np.pi * cell.cell_radius**2
            assert abs(region.sum() - expected) < 0.12 * expected
        dark = image[..., 1] < 0.45 * np.median(image[..., 1])
        assert dark.sum() > 500 and (mask[dark] > 0).all()


def test_cue_is_local_background_only():
    stain = random_stain(2)
    for label in CLASSES:
        plain = synth_field(label, stain=stain, seed=4, cue_probability=0.0)
        cued = synth_field(label, stain=stain, seed=4, cue_probability=1.0)
        np.testing.assert_array_equal(plain.mask, cued.mask)
        changed = np.abs(cued.image.astype(int) - plain.image).max(-1) > 0
        assert not changed[plain.mask > 0].any()  # the foreground is untouched
        dist = ndimage.distance_transform_edt(plain.mask == 0)
        assert changed.sum() > 1000 and dist[changed].max() <= 22  # within a crop
        assert changed[(dist > 0) & (dist <= 6)].mean() > 0.5


def test_background_does_not_depend_on_class_without_signal():
    stain = random_stain(9)
    a = synth_field("healthy", stain=stain, seed=3)
    b = synth_field("sezary", stain=stain, seed=3)
    outside = (a.mask == 0) & (b.mask == 0)
    np.testing.assert_array_equal(a.image[outside], b.image[outside])
    assert a.cells["cell_radius"].mean() < b.cells["cell_radius"].mean()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(patients=2, cells_per_patient=6, cells_per_image=3, image_size=128, signal=0.5)
    make_dataset(tmp_path / "a", seed=7, **kw)
    make_dataset(tmp_path / "b", seed=7, **kw)
    make_dataset(tmp_path / "c", seed=8, **kw)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 2 * 2 * 2 + 3
    changed = [k for k in a if k.startswith("images/") and a[k] != c[k]]
    assert len(changed) == 4


def test_label_by_patient_gives_one_class_per_patient(tmp_path):
    manifest = make_dataset(
        tmp_path, patients=5, cells_per_patient=8, image_size=128, cells_per_image=4, label_by="patient", seed=0
    )
    per_patient = manifest.groupby("patient")["label"].agg(["nunique", "first"])
    assert (per_patient["nunique"] == 1).all()
    assert sorted(per_patient["first"].value_counts().tolist()) == [2, 3]


def test_patient_specific_cue_strength(tmp_path):
    def cue_rates(sd):
        d = tmp_path / f"sd{sd}"
        make_dataset(
            d, patients=12, cells_per_patient=32, cells_per_image=16, signal=0.5, signal_sd_between_patients=sd, seed=1
        )
        return pd.read_csv(d / "cells_truth.csv").groupby("patient")["cue"].mean()

    same, varied = cue_rates(0.0), cue_rates(0.6)
    # sd 0: binomial spread only (about 0.09); sd 0.6: most patients near 0 or 1
    assert abs(same.mean() - 0.5) < 0.1 and same.std() < 0.15
    assert varied.std() > 0.25 and ((varied < 0.15) | (varied > 0.85)).sum() >= 4


def test_gray_mode_is_fluorescence_like(tmp_path):
    manifest = make_dataset(
        tmp_path, patients=2, cells_per_patient=4, cells_per_image=2, image_size=128, mode="gray", seed=3
    )
    image = read_image(tmp_path / manifest["path"][0])
    mask = read_mask(tmp_path / manifest["mask"][0])
    assert image.shape == (1, 128, 128) and image.dtype == np.uint8
    assert image[0][mask > 0].mean() > 2 * image[0][mask == 0].mean()


def test_rerun_replaces_an_earlier_dataset(tmp_path):
    make_dataset(tmp_path, patients=3, cells_per_patient=8, image_size=128, cells_per_image=4, seed=0)
    manifest = make_dataset(tmp_path, patients=2, cells_per_patient=8, image_size=128, cells_per_image=4, seed=0)
    on_disk = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "images").iterdir())
    assert on_disk == sorted(manifest["path"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"signal": 1.5}, r"signal must be in \[0.0, 1.0\]"),
        ({"signal_sd_between_patients": -1}, "signal_sd_between_patients"),
        ({"cells_per_image": 20}, "cells_per_image=20 does not fit"),
        ({"label_by": "patients"}, "did you mean 'patient'"),
        ({"mode": "rbg"}, "did you mean 'rgb'"),
        ({"patients": 0}, "patients must be an integer >= 1"),
    ],
)
def test_bad_parameters_name_the_argument(tmp_path, kwargs, match):
    with pytest.raises(CellbgError, match=match):
        make_dataset(tmp_path / "x", **kwargs)


def test_protocol_with_synthetic_source_is_generated_on_first_use(tmp_path):
    from cellbg.data import discover
    from cellbg.protocol import parse_protocol

    text = (
        "name: synth-test\n"
        f"output: {tmp_path}\n"
        "data:\n  source: synthetic\n"
        "  synthetic: {patients: 2, cells_per_patient: 4, cells_per_image: 2, image_size: 128}\n"
    )
    protocol = parse_protocol(text, source="test", base_dir=tmp_path)
    table = discover(protocol)
    assert len(table) == 4 and (table["mask_path"] != "").all()
    assert set(table["label"]) == set(CLASSES)
    assert (Path(protocol.run_dir) / "data" / "cells_truth.csv").exists()


def test_a_killed_run_is_replaced_not_refused(tmp_path):
    make_dataset(tmp_path, patients=2, cells_per_patient=4, cells_per_image=2, image_size=128, seed=0)
    (tmp_path / "manifest.csv").unlink()  # as if killed before the manifest was written
    (tmp_path / "cells_truth.csv").unlink()
    manifest = make_dataset(tmp_path, patients=2, cells_per_patient=4, cells_per_image=2, image_size=128, seed=0)
    assert len(discover_manifest(tmp_path / "manifest.csv")) == len(manifest) == 4


def test_refuses_a_folder_that_is_not_a_synthetic_dataset(tmp_path):
    (tmp_path / "results.csv").write_text("precious\n")
    with pytest.raises(CellbgError, match="not empty"):
        make_dataset(tmp_path, patients=2, cells_per_patient=2, seed=0)
    assert (tmp_path / "results.csv").read_text() == "precious\n"


def test_synth_field_rejects_unknown_class():
    with pytest.raises(CellbgError, match="did you mean 'sezary'"):
        synth_field("sezarry")


def test_cli_synth(tmp_path):
    from typer.testing import CliRunner

    from cellbg.cli import app

    runner = CliRunner()
    out = tmp_path / "ds"
    result = runner.invoke(
        app,
        [
            "synth",
            str(out),
            "--patients",
            "2",
            "--cells-per-patient",
            "4",
            "--image-size",
            "128",
            "--cells-per-image",
            "2",
            "--signal",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 4 images" in result.output
    assert len(discover_manifest(out / "manifest.csv")) == 4
    bad = runner.invoke(app, ["synth", str(tmp_path / "y"), "--cells-per-image", "99"])
    assert bad.exit_code == 2 and "does not fit" in bad.output


def test_module_exports():
    assert set(synth.__all__) >= {"make_dataset", "synth_field", "random_stain", "CLASSES"}


@pytest.mark.slow
def test_null_auc_is_centred_over_seeds(tmp_path):
    """Over ten seeds the held-out background AUC at signal 0 is centred on 0.5."""
    values = []
    for seed in range(10):
        d = tmp_path / f"s{seed}"
        make_dataset(d, patients=24, cells_per_patient=60, cells_per_image=6, signal=0.0, seed=seed)
        values.append(held_out_auc(cell_features(d), BACKGROUND))
    values = np.array(values)
    assert abs(values.mean() - 0.5) < 0.025, values
    assert np.all(np.abs(values - 0.5) <= 0.07), values


# ----------------------------------------------------------------------------- co-occurrence cue
def test_cooccurring_objects_change_only_their_own_pixels():
    stain = random_stain(2)
    for cue in (0.0, 1.0):  # independent of the halo cue
        plain = synth_field("sezary", stain=stain, seed=4, cue_probability=cue)
        cooc = synth_field("sezary", stain=stain, seed=4, cue_probability=cue, cooccurrence_probability=1.0)
        np.testing.assert_array_equal(plain.mask, cooc.mask)
        assert not plain.objects.any() and len(plain.object_table) == 0
        assert not plain.cells["cooccurrence"].any() and (plain.cells["objects"] == 0).all()
        changed = np.abs(cooc.image.astype(int) - plain.image).max(-1) > 0
        objects = cooc.objects > 0
        assert not changed[cooc.mask > 0].any() and not objects[cooc.mask > 0].any()
        # every changed pixel lies within 2 px of a labelled object, and objects are visible
        assert not (changed & ~ndimage.binary_dilation(objects, iterations=2)).any()
        assert changed[objects].mean() > 0.9
        # three objects per cell, labelled 1..m, each near its own cell
        table = cooc.object_table
        assert len(table) == 3 * len(cooc.cells) and sorted(np.unique(cooc.objects[objects])) == list(table["object"])
        np.testing.assert_array_equal(np.bincount(cooc.objects.ravel())[1:], table["area"])
        cells = cooc.cells.set_index("instance").loc[table["cell_instance"]]
        gap = (
            np.hypot(
                table["centre_r"].to_numpy() - cells["centre_r"].to_numpy(),
                table["centre_c"].to_numpy() - cells["centre_c"].to_numpy(),
            )
            - cells["cell_radius"].to_numpy()
        )
        assert (gap > 2).all() and (gap < 15).all()
        assert (cooc.cells["objects"] == 3).all() and cooc.cells["cooccurrence"].all()


def test_cooccurrence_flags_are_nested_and_follow_the_probability():
    stain = random_stain(3)
    rates = []
    for seed in range(20):
        half = synth_field("healthy", stain=stain, seed=seed, n_cells=16, cooccurrence_probability=0.5)
        full = synth_field("healthy", stain=stain, seed=seed, n_cells=16, cooccurrence_probability=1.0)
        flags = half.cells["cooccurrence"].to_numpy()
        assert full.cells["cooccurrence"].all()
        # a flagged cell gets the same objects whatever the probability
        kept = full.object_table[flags[full.object_table["cell_instance"] - 1]].reset_index(drop=True)
        pd.testing.assert_frame_equal(
            kept.drop(columns=["object", "area"]), half.object_table.drop(columns=["object", "area"])
        )
        rates.append(flags.mean())
    assert abs(np.mean(rates) - 0.5) < 0.08


def test_dataset_records_cooccurring_objects_for_one_class(tmp_path):
    kw = dict(
        patients=2,
        cells_per_patient=8,
        cells_per_image=4,
        image_size=128,
        signal=0.0,
        cooccurrence=1.0,
        cooccurrence_class="healthy",
    )
    manifest = make_dataset(tmp_path / "a", seed=5, **kw)
    make_dataset(tmp_path / "b", seed=5, **kw)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert list(manifest.columns) == ["path", "label", "patient", "mask", "objects"]
    truth = pd.read_csv(tmp_path / "a" / "cells_truth.csv")
    objects = pd.read_csv(tmp_path / "a" / "objects_truth.csv")
    assert list(objects.columns) == synth.OBJECT_COLUMNS
    assert (truth["cooccurrence"] == (truth["label"] == "healthy")).all()
    assert set(objects["label"]) == {"healthy"} and len(objects) == 3 * truth["cooccurrence"].sum()
    for r in manifest.itertuples():
        labels = read_mask(tmp_path / "a" / r.objects)
        rows = objects[objects["objects_path"] == r.objects]
        assert int(labels.max()) == len(rows)
        np.testing.assert_array_equal(np.bincount(labels.ravel(), minlength=len(rows) + 1)[1:], rows["area"])
        assert not (labels[read_mask(tmp_path / "a" / r.mask) > 0]).any()
    # a plain dataset made over it again has no objects left behind
    plain = make_dataset(tmp_path / "a", seed=5, **{**kw, "cooccurrence": 0.0})
    assert "objects" not in plain.columns
    assert not (tmp_path / "a" / "objects_truth.csv").exists()
    assert not list((tmp_path / "a" / "objects").glob("*.tif"))
    with pytest.raises(CellbgError, match="cooccurrence"):
        make_dataset(tmp_path / "c", cooccurrence=1.5)
    with pytest.raises(CellbgError, match="cooccurrence_class"):
        make_dataset(tmp_path / "c", cooccurrence=0.5, cooccurrence_class="sezery")
