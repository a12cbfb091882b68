"""The command line: exit codes, one-line errors, no tracebacks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import yaml
from typer.testing import CliRunner

from cellbg import __version__
from cellbg.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.stdout
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "validate" in r.stdout and "data" in r.stdout


def test_validate_quickstart_prints_resolved_protocol():
    r = runner.invoke(app, ["validate", str(REPO / "protocols" / "quickstart.yaml")])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("# cellbg resolved protocol")
    resolved = yaml.safe_load(r.stdout)
    assert resolved["name"] == "quickstart"
    assert resolved["crops"]["min_area"] == 20  # a default filled in
    assert Path(resolved["output"]).is_absolute()


def test_validate_bad_protocols_exit_2_with_one_line(tmp_path):
    cases = {
        "name: x\ncrops:\n  sise: 3\n": "p.yaml:3: crops.sise: unknown key 'sise'",
        "name: x\ntraining:\n  epochs: lots\n": "p.yaml:3: training.epochs:",
        "name: x\ndata:\n  source: folders\n  root: nowhere\n": "p.yaml:4: data.root: path does not exist",
    }
    for text, expected in cases.items():
        p = tmp_path / "p.yaml"
        p.write_text(text)
        r = runner.invoke(app, ["validate", str(p)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], r.stderr
        assert "Traceback" not in r.output


def test_missing_protocol_file_exit_2(tmp_path):
    r = runner.invoke(app, ["validate", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "protocol file not found" in r.stderr


def test_data_summary(tmp_path):
    (tmp_path / "im").mkdir()
    rows = []
    for i, (label, patient) in enumerate([("a", "p1"), ("a", "p2"), ("b", "p3"), ("b", "p3")]):
        tifffile.imwrite(tmp_path / "im" / f"{i}.tif", np.zeros((8, 8), np.uint8))
        rows.append(f"im/{i}.tif,{label},{patient}")
    (tmp_path / "m.csv").write_text("path,label,patient\n" + "\n".join(rows) + "\n")
    p = tmp_path / "p.yaml"
    p.write_text("name: x\ndata:\n  source: manifest\n  manifest: m.csv\nsegmentation:\n  method: threshold\n")
    r = runner.invoke(app, ["data", str(p)])
    assert r.exit_code == 0, r.output
    assert "class a: 2 patients, 2 images" in r.stdout
    assert "class b: 1 patients, 2 images" in r.stdout


def test_console_script_user_error_has_no_traceback(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("name: x\nvariants:\n  train: []\n")
    exe = Path(sys.executable).with_name("cellbg")
    r = subprocess.run([str(exe), "validate", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "variants.train" in r.stderr
    r = subprocess.run([str(exe), "--debug", "validate", str(p)], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


# --------------------------------------------------------------------------- init
def _tree(root: Path, *, classes=("healthy", "sezary"), patients=("p1", "p2"), masks="_cp_masks"):
    yy, xx = np.mgrid[:64, :64]
    for label in classes:
        for p in patients:
            d = root / label / p
            d.mkdir(parents=True)
            truth = np.zeros((64, 64), np.uint16)
            for j, (r, c) in enumerate([(18, 18), (22, 44), (46, 30)]):
                truth[np.hypot(yy - r, xx - c) <= 7] = j + 1
            image = (20 + 150 * (truth > 0)).astype(np.uint8)
            tifffile.imwrite(d / "im.tif", image)
            if masks:
                tifffile.imwrite(d / f"im{masks}.tif", truth)
    return root


def test_init_writes_a_protocol_that_validates_and_runs(tmp_path):
    root = _tree(tmp_path / "data")
    proto = tmp_path / "study.yaml"
    r = runner.invoke(app, ["init", str(root), "-o", str(proto)])
    assert r.exit_code == 0, r.output
    assert "class healthy: 2 images, 2 patients" in r.output
    assert "masks beside the images: 4 of 4 (_cp_masks: 4" in r.output
    text = proto.read_text()
    assert text.startswith("# cellbg protocol written by `cellbg init`") and "method: masks" in text
    assert "folds: 2" in text and "root: data" in text
    assert runner.invoke(app, ["validate", str(proto)]).exit_code == 0
    r = runner.invoke(app, ["segment", str(proto), "--evaluate"])
    assert r.exit_code == 0, r.output
    assert "F1@0.5 1.000" in r.output  # the masks beside the images are the segmentation
    r = runner.invoke(app, ["crops", str(proto)])
    assert r.exit_code == 0, r.output
    assert "12 cells from 4 images" in r.output
    r = runner.invoke(app, ["run", str(proto), "--dry-run"])
    assert r.exit_code == 0, r.output
    # Without masks: the threshold backend, with a diameter estimated from the images.
    bare = _tree(tmp_path / "bare", masks=None)
    r = runner.invoke(app, ["init", str(bare), "-o", str(tmp_path / "bare.yaml")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "bare.yaml").read_text()
    assert "method: threshold" in text and "diameter: 15" in text
    r = runner.invoke(app, ["segment", str(tmp_path / "bare.yaml")])
    assert r.exit_code == 0, r.output
    assert "4 label images (threshold)" in r.output and "diameter: median 15.0 px" in r.output
    chosen = pd.read_csv(tmp_path / "runs" / "bare" / "segmentation" / "threshold.csv")
    assert (chosen["diameter"] == 15).all() and not chosen["diameter_estimated"].any()


def test_init_one_class_and_plain_folder_are_segmentation_only(tmp_path):
    one = _tree(tmp_path / "one", classes=("tcells",))
    r = runner.invoke(app, ["init", str(one), "-o", str(tmp_path / "one.yaml")])
    assert r.exit_code == 0, r.output
    assert "Segmentation only (one class)" in (tmp_path / "one.yaml").read_text()
    r = runner.invoke(app, ["segment", str(tmp_path / "one.yaml"), "--evaluate"])
    assert r.exit_code == 0 and "F1@0.5 1.000" in r.output, r.output
    plain = tmp_path / "plain"
    plain.mkdir()
    for k in range(2):
        tifffile.imwrite(plain / f"im{k}.tif", np.zeros((32, 32), np.uint8))
    r = runner.invoke(app, ["init", str(plain), "-o", str(tmp_path / "plain.yaml")])
    assert r.exit_code == 0 and "layout: plain folder" in r.output, r.output
    assert runner.invoke(app, ["segment", str(tmp_path / "plain.yaml")]).exit_code == 0


def test_init_names_every_bad_layout_in_one_line(tmp_path):
    def bad(folder, message, *extra):
        r = runner.invoke(app, ["init", str(folder), "-o", str(tmp_path / "out.yaml"), *extra])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and message in r.output, r.output
        assert "Traceback" not in r.output

    bad(tmp_path / "nope", "folder not found")
    (tmp_path / "file.tif").write_bytes(b"x")
    bad(tmp_path / "file.tif", "is a file; give the folder")
    (tmp_path / "empty").mkdir()
    bad(tmp_path / "empty", "no images or class folders in")
    masks_only = tmp_path / "masks_only"
    masks_only.mkdir()
    tifffile.imwrite(masks_only / "a_masks.tif", np.zeros((8, 8), np.uint16))
    bad(masks_only, "no images or class folders in")
    mixed = _tree(tmp_path / "mixed")
    tifffile.imwrite(mixed / "stray.tif", np.zeros((8, 8), np.uint8))
    bad(mixed, "holds images both directly (stray.tif")
    empty_class = _tree(tmp_path / "empty_class")
    (empty_class / "third").mkdir()
    bad(empty_class, "class 'third' has no images")
    half = _tree(tmp_path / "half")
    tifffile.imwrite(half / "healthy" / "loose.tif", np.zeros((8, 8), np.uint8))
    bad(half, "class 'healthy' holds images both in patient folders and directly")
    ok = _tree(tmp_path / "ok")
    (tmp_path / "out.yaml").write_text("name: keep\n")
    bad(ok, "out.yaml exists; choose another file with -o or pass --force")
    assert (tmp_path / "out.yaml").read_text() == "name: keep\n"  # nothing overwritten
    assert runner.invoke(app, ["init", str(ok), "-o", str(tmp_path / "out.yaml"), "--force"]).exit_code == 0


def test_init_reads_patients_from_file_names_or_says_it_cannot(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "named" / label).mkdir(parents=True)
        (tmp_path / "anon" / label).mkdir(parents=True)
        for name in ("P01_f1", "P01_f2", "P02_f1"):
            tifffile.imwrite(tmp_path / "named" / label / f"{label}{name}.tif", np.zeros((16, 16), np.uint8))
        for name in ("x", "y"):
            tifffile.imwrite(tmp_path / "anon" / label / f"{name}.tif", np.zeros((16, 16), np.uint8))
    r = runner.invoke(app, ["init", str(tmp_path / "named"), "-o", str(tmp_path / "named.yaml")])
    assert r.exit_code == 0 and "class a: 3 images, 2 patients" in r.output, r.output
    assert "patient_pattern:" in (tmp_path / "named.yaml").read_text()
    assert runner.invoke(app, ["data", str(tmp_path / "named.yaml")]).exit_code == 0
    r = runner.invoke(app, ["init", str(tmp_path / "anon"), "-o", str(tmp_path / "anon.yaml")])
    assert r.exit_code == 0 and "layout: classes, no patients" in r.output, r.output
    text = (tmp_path / "anon.yaml").read_text()
    assert "Segmentation only" in text and "# patient_pattern:" in text
