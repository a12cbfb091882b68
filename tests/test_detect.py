"""The detection study: boxes, structure removal, jobs and keys, the detector, the tests,
and the whole study through ``cellbg run`` on tiny synthetic fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cellbg._checks import CellbgError
from cellbg.detect import boxes_from_labels, plan_detect_jobs, remove_structure
from cellbg.protocol import Protocol, parse_protocol

# ---------------------------------------------------------------------------- boxes


def test_boxes_from_labels_known_answer():
    lab = np.zeros((10, 12), np.int32)
    lab[2:5, 3:9] = 4
    lab[7, 0] = 1
    lab[6:10, 10:12] = 2
    boxes, ids = boxes_from_labels(lab)
    assert ids.tolist() == [1, 2, 4]
    assert boxes.tolist() == [[7, 0, 8, 1], [6, 10, 10, 12], [2, 3, 5, 9]]
    boxes, ids = boxes_from_labels(lab, min_area=2)
    assert ids.tolist() == [2, 4]
    assert boxes_from_labels(np.zeros((4, 4), np.uint16))[0].shape == (0, 4)


@pytest.mark.parametrize(
    "bad, match",
    [(np.zeros((3, 3), bool), "boolean"), (np.zeros((2, 3, 3), int), "2-D"), (np.zeros((3, 3), float), "integer")],
)
def test_boxes_from_labels_rejects_non_labels(bad, match):
    with pytest.raises(CellbgError, match=match):
        boxes_from_labels(bad)


def test_remove_structure_changes_only_the_structure():
    rng = np.random.default_rng(0)
    image = rng.integers(50, 200, (20, 20, 3), dtype=np.uint8)
    structure = np.zeros((20, 20), np.uint16)
    structure[5:8, 5:8] = 1
    cells = np.zeros((20, 20), np.uint16)
    cells[8:12, 4:9] = 1  # touches the dilated structure: must stay as it is
    out = remove_structure(image, structure, keep=cells, fill="mean", dilate=1)
    changed = np.any(out != image, axis=-1)
    from scipy import ndimage as ndi

    region = ndi.binary_dilation(structure > 0, iterations=1) & (cells == 0)
    assert not changed[~region].any()
    assert np.array_equal(out[cells > 0], image[cells > 0])
    background = ~region & (cells == 0)
    expected = np.rint(image[background].astype(float).mean(0)).astype(np.uint8)
    assert np.array_equal(out[5, 5], expected)
    black = remove_structure(image, structure, fill="black", dilate=0)
    assert black[5:8, 5:8].max() == 0 and np.array_equal(black[:5], image[:5])
    gray = remove_structure(image[..., 0], structure, fill="1,1,1", dilate=0)
    assert gray[6, 6] == 255
    with pytest.raises(CellbgError, match="does not match"):
        remove_structure(image, structure[:10])


# ---------------------------------------------------------------------------- protocol and plan


def test_detection_section_defaults_and_errors(tmp_path):
    p = Protocol.model_validate({"name": "d"})
    assert p.detection.enabled is False and p.detection.correlated.source == "none"
    with pytest.raises(CellbgError, match="mask_dir"):
        parse_protocol("name: d\ndetection:\n  correlated: {source: masks}\n")
    with pytest.raises(CellbgError, match=r"<protocol>:3: detection.fill"):
        parse_protocol("name: d\ndetection:\n  fill: purple\n")
    with pytest.raises(CellbgError, match="did you mean 'epochs'"):
        parse_protocol("name: d\ndetection:\n  epoch: 3\n")
    proto = tmp_path / "p.yaml"
    proto.write_text("name: d\ndetection:\n  enabled: true\n  correlated: {source: masks, mask_dir: nowhere}\n")
    from cellbg.protocol import load_protocol

    with pytest.raises(CellbgError, match=r"p.yaml:4: detection.correlated.mask_dir: path does not exist"):
        load_protocol(proto)


def test_plan_and_keys():
    from cellbg.detect.plan import DetectJobSpec, detect_job_key

    raw = {
        "name": "d",
        "detection": {"enabled": True, "seeds": [3, 1], "correlated": {"source": "objects"}},
        "training": {"split": {"folds": 3}},
    }
    p = Protocol.model_validate(raw)
    jobs = plan_detect_jobs(p)
    assert len(jobs) == 2 * 2 * 3
    assert jobs[0] == DetectJobSpec("without", 3, 0) and jobs[-1] == DetectJobSpec("with", 1, 2)
    keys = {detect_job_key(p, j, "abc") for j in jobs}
    assert len(keys) == len(jobs)
    # the list of seeds, max_folds and enabled choose jobs; they do not change a job's numbers
    q = Protocol.model_validate({**raw, "detection": {**raw["detection"], "seeds": [1], "max_folds": 1}})
    assert detect_job_key(q, jobs[-1], "abc") == detect_job_key(p, jobs[-1], "abc")
    assert len(plan_detect_jobs(q)) == 2
    r = Protocol.model_validate({**raw, "detection": {**raw["detection"], "lr": 0.5}})
    assert detect_job_key(r, jobs[0], "abc") != detect_job_key(p, jobs[0], "abc")
    assert detect_job_key(p, jobs[0], "abd") != detect_job_key(p, jobs[0], "abc")
    none = Protocol.model_validate({"name": "d", "detection": {"enabled": True}})
    assert {j.condition for j in plan_detect_jobs(none)} == {"without"}


# ---------------------------------------------------------------------------- detector


def test_get_detector_sizes_and_local_weights(tmp_path):
    import torch

    from cellbg.detect.model import get_detector

    torch.manual_seed(0)
    small = dict(image_size=64, depth=10, fpn_channels=8, representation_size=16)
    a = get_detector(num_classes=4, **small)
    assert a.roi_heads.box_predictor.cls_score.out_features == 4
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b = get_detector(num_classes=3, weights=path, **small)  # another class count: predictor stays random
    assert torch.equal(b.backbone.body.conv1.weight, a.backbone.body.conv1.weight)
    assert b.roi_heads.box_predictor.cls_score.out_features == 3
    with pytest.raises(CellbgError, match="did you mean 'fasterrcnn_resnet_fpn'"):
        get_detector("fasterrcnn_resnet_fnp", num_classes=3, image_size=64)
    with pytest.raises(CellbgError, match="not found"):
        get_detector(num_classes=3, weights=tmp_path / "missing.pt", **small)
    torch.save({"nothing": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CellbgError, match="shares no tensor"):
        get_detector(num_classes=3, weights=tmp_path / "other.pt", **small)


# ---------------------------------------------------------------------------- statistics


def test_detection_tests_known_answers():
    from scipy import stats as sps

    from cellbg.detect.analysis import detection_tests, patient_recall

    rng = np.random.default_rng(1)
    ap_rows, truth_rows = [], []
    for cond in ("without", "with"):
        for seed in (0, 1):
            for fold in (0, 1):
                for variant in ("original", "no_correlated"):
                    base = 0.6 + 0.1 * (cond == "with") - 0.2 * (variant == "no_correlated")
                    ap_rows.append(
                        {
                            "condition": cond,
                            "seed": seed,
                            "fold": fold,
                            "test_variant": variant,
                            "class": "b",
                            "ap50": base + rng.normal(0, 0.02),
                            "ap": base / 2,
                        }
                    )
                    for patient in (f"p{fold}a", f"p{fold}b", f"p{fold}c"):
                        found = rng.random(6) < (0.9 if variant == "original" else 0.3)
                        truth_rows.append(
                            pd.DataFrame(
                                {
                                    "condition": cond,
                                    "seed": seed,
                                    "fold": fold,
                                    "test_variant": variant,
                                    "class": "b",
                                    "patient_id": patient,
                                    "found": found,
                                    "found_any_class": found,
                                }
                            )
                        )
    ap = pd.DataFrame(ap_rows)
    recall = patient_recall(pd.concat(truth_rows, ignore_index=True))
    tests = detection_tests(ap, recall, targets=["b"])
    rel = tests[(tests["family"] == "reliance") & (tests["condition"] == "with") & (tests["measure"] == "recall")]
    r = recall[(recall["condition"] == "with")]
    per = r.groupby(["test_variant", "patient_id"])["recall"].mean().unstack(0)
    expected = sps.ttest_rel(per["no_correlated"], per["original"])
    assert rel["pvalue"].iloc[0] == pytest.approx(expected.pvalue)
    assert rel["estimate"].iloc[0] == pytest.approx((per["no_correlated"] - per["original"]).mean())
    assert rel["n_units"].iloc[0] == 6 and rel["estimate"].iloc[0] < -0.4
    ann = tests[(tests["family"] == "annotation") & (tests["measure"] == "ap50")].iloc[0]
    a = ap[(ap.condition == "without") & (ap.test_variant == "original")].set_index(["seed", "fold"])["ap50"]
    b = ap[(ap.condition == "with") & (ap.test_variant == "original")].set_index(["seed", "fold"])["ap50"]
    assert ann["pvalue"] == pytest.approx(sps.ttest_rel(b, a.loc[b.index]).pvalue)
    assert ann["n_units"] == 4 and ann["estimate"] == pytest.approx(0.1, abs=0.05)
    fam = tests[tests["family"] == "reliance"]
    from statsmodels.stats.multitest import multipletests

    assert np.allclose(fam["p_holm"], multipletests(fam["pvalue"], method="holm")[1])


# ---------------------------------------------------------------------------- the whole study

TINY = {
    "name": "tiny-detect",
    "output": "run",
    "data": {
        "source": "synthetic",
        "synthetic": {
            "patients": 4,
            "cells_per_patient": 4,
            "cells_per_image": 1,
            "image_size": 64,
            "signal": 0.0,
            "cooccurrence": 1.0,
        },
    },
    "segmentation": {"method": "masks"},
    "training": {"split": {"kind": "fixed", "test_patients": ["P01", "P02"], "val_fraction": 0.5}},
    "detection": {
        "enabled": True,
        "only": True,
        "correlated": {"source": "objects", "name": "clump"},
        "detector": {"depth": 10, "fpn_channels": 8, "representation_size": 16},
        "epochs": 1,
        "batch_size": 4,
        "device": "cpu",
    },
    "report": {"formats": ["md"], "figures": True},
    "executor": {"workers": 1, "retries": 0},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cellbg.runner import run_protocol

    folder = tmp_path_factory.mktemp("detect")
    (folder / "protocol.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    summary = run_protocol(folder / "protocol.yaml", progress=False)
    assert summary.ok, summary.summary()
    return folder, summary


def test_cellbg_run_does_the_detection_study(tiny_run):
    from cellbg.detect.train import LOSS_PARTS

    folder, summary = tiny_run
    stages = {s.name: s for s in summary.stages}
    assert stages["detect"].total == 2 and stages["detect"].ran == 2
    assert stages["train"].total == 0 and stages["crops"].total == 0  # detection.only
    run = folder / "run"
    losses = pd.read_csv(run / "detect" / "losses.csv")
    for part in (*LOSS_PARTS, "loss"):
        for split in ("train", "val"):
            assert np.isfinite(losses[f"{split}_{part}"]).all()
    assert np.allclose(losses["train_loss"], losses[[f"train_{p}" for p in LOSS_PARTS]].sum(axis=1))
    ap = pd.read_csv(run / "detect" / "ap.csv")
    with_ = ap[(ap["condition"] == "with") & (ap["test_variant"] == "original")]
    assert set(with_["class"]) == {"healthy", "sezary", "clump"}
    assert set(ap.loc[ap["condition"] == "without", "class"]) == {"healthy", "sezary"}
    # one truth row per held-out target cell and test image variant, in each job
    truth = pd.read_parquet(run / "detect" / "detections.parquet")
    assert {"score", "class", "bbox_r0", "matched_instance"} <= set(truth.columns)
    recall = pd.read_csv(run / "detect" / "recall.csv")
    per_job = recall.groupby(["condition", "test_variant"])["n_boxes"].sum()
    assert (per_job == 8).all()  # 2 test patients x 4 fields x 1 cell
    assert set(recall["patient_id"]) == {"P01", "P02"}
    tests = pd.read_csv(run / "detect" / "tests.csv")
    assert set(tests["family"]) == {"annotation", "reliance"}
    report = (run / "report" / "report.md").read_text()
    assert "## Detection with a correlated class" in report
    assert "figures/detection_loss_parts.png" in report and (run / "report" / "figures" / "detection_ap.png").exists()
    assert "Accuracy: train variant" not in report  # detection.only: no classifier sections


def test_a_second_run_is_cached(tiny_run):
    from cellbg.runner import run_protocol

    folder, _ = tiny_run
    again = run_protocol(folder / "protocol.yaml", progress=False)
    assert again.ok and again.ran == 0


def test_resumed_job_gives_the_same_numbers(tiny_run, tmp_path):
    from cellbg.detect.plan import DetectJobSpec, detection_fields
    from cellbg.detect.train import run_detect_job
    from cellbg.protocol import load_protocol

    folder, _ = tiny_run
    p = load_protocol(folder / "protocol.yaml")
    p.detection.epochs = 2
    fields = detection_fields(p)
    spec = DetectJobSpec("with", 0, 0)
    whole = run_detect_job(p, spec, tmp_path / "whole", fields=fields)
    part = run_detect_job(p, spec, tmp_path / "part", fields=fields, max_epochs_this_call=1)
    assert not (part / "DONE").exists() and len(pd.read_csv(part / "history.csv")) == 1
    part = run_detect_job(p, spec, tmp_path / "part", fields=fields)
    assert (part / "DONE").exists()
    drop = ["seconds"]
    pd.testing.assert_frame_equal(
        pd.read_csv(whole / "history.csv").drop(columns=drop), pd.read_csv(part / "history.csv").drop(columns=drop)
    )
    pd.testing.assert_frame_equal(pd.read_csv(whole / "metrics.csv"), pd.read_csv(part / "metrics.csv"))
    spec_json = json.loads((whole / "spec.json").read_text())
    assert spec_json["patients"]["test"] == ["P01", "P02"] and spec_json["classes"][-1] == "clump"


def test_cli_detect_says_when_detection_is_off(tmp_path):
    from typer.testing import CliRunner

    from cellbg.cli import app

    proto = tmp_path / "p.yaml"
    proto.write_text("name: d\n")
    result = CliRunner().invoke(app, ["detect", str(proto)])
    assert result.exit_code == 2
    assert "detection.enabled is false" in result.stderr


def test_objects_source_without_objects_is_a_user_error(tmp_path):
    from cellbg.detect.plan import detection_fields

    raw = {
        **TINY,
        "output": str(tmp_path / "run"),
        "data": {"source": "synthetic", "synthetic": {**TINY["data"]["synthetic"], "cooccurrence": 0.0}},
    }
    with pytest.raises(CellbgError, match="no image has an objects label image"):
        detection_fields(Protocol.model_validate(raw))


def test_report_states_missing_detection_results(tmp_path):
    from cellbg.report.detection import _section_detection
    from cellbg.report.document import _Doc
    from cellbg.report.figures import _Figures
    from cellbg.report.reading import _Run

    run = _Run(run_dir=tmp_path, protocol=Protocol.model_validate(TINY))
    doc = _Doc("t")
    _section_detection(doc, run, _Figures(tmp_path / "f", enabled=False), {})
    assert doc.missing and "cellbg detect" in doc.missing[0]
    assert Path(tmp_path).exists()


# ---------------------------------------------------------------------------- known answer (slow)


def _paint_clumps(root: Path) -> None:
    """A dark clump beside every Sezary cell, its masks in ``root/clumps``: the planting of
    ``benchmarks/validate_detect.py`` (loaded from there, so the test and the script agree)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_detect.py"
    spec = importlib.util.spec_from_file_location("validate_detect", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.plant_clumps(root, cls="sezary", p_cls=1.0, p_other=0.0, seed=0)


@pytest.mark.slow
def test_strong_cooccurrence_is_relied_on(tmp_path, monkeypatch):
    """Every Sezary cell has a dark clump beside it: a detector trained with the clump annotated finds
    Sezary cells partly through it (recall drops when the clumps are removed), healthy cells not."""
    from cellbg.detect.train import run_detection
    from cellbg.synth import make_dataset

    monkeypatch.setenv("CELLBG_NUM_THREADS", "1")  # the figures below were measured with one thread
    data = tmp_path / "data"
    make_dataset(data, patients=8, cells_per_patient=16, cells_per_image=4, image_size=128, signal=0.0, seed=0)
    _paint_clumps(data)
    raw = {
        "name": "strong",
        "output": str(tmp_path / "run"),
        "data": {"source": "manifest", "manifest": str(data / "manifest.csv")},
        "training": {"split": {"folds": 2, "val_fraction": 0.0}},
        "detection": {
            "enabled": True,
            "correlated": {"source": "masks", "mask_dir": str(data / "clumps")},
            "detector": {"depth": 10, "fpn_channels": 32, "representation_size": 128},
            "epochs": 20,
            "batch_size": 4,
            "device": "cpu",
        },
    }
    tests = run_detection(Protocol.model_validate(raw)).set_index(["family", "condition", "class", "measure"])
    ap = pd.read_csv(tmp_path / "run" / "detect" / "ap.csv")
    original = ap[(ap["test_variant"] == "original") & ap["class"].isin(["healthy", "sezary"])]
    assert original["ap50"].min() > 0.8  # the detector works (0.87 to 0.99 per job and class)
    drop = tests.loc[("reliance", "with", "sezary", "recall")]
    assert drop["estimate"] < -0.1 and drop["pvalue"] < 0.05  # measured: 0.98 -> 0.81, p = 0.0001
    healthy = tests.loc[("reliance", "with", "healthy", "recall")]
    assert abs(healthy["estimate"]) < 0.05 and not healthy["pvalue"] < 0.05
