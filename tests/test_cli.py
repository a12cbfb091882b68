"""The command line: exit codes, one-line errors, no tracebacks."""

import subprocess
import sys
from pathlib import Path

import numpy as np
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
