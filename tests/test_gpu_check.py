"""benchmarks/gpu_check.py runs (on CPU, tiny models) so that it cannot rot."""

import importlib.util
from pathlib import Path


def test_gpu_check_runs_tiny_on_cpu(capsys, monkeypatch):
    monkeypatch.setenv("CELLBG_NUM_THREADS", "1")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny", "--steps", "1", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    for arch in ("cellyolo", "resnet", "shufflenet_v2"):
        line = next(x for x in out.splitlines() if x.startswith(arch))
        pure, pipeline = (float(v) for v in line.split()[2:4])
        assert pure > 0 and pipeline > 0
    assert "out-of-memory fallback: CPU" in out and "PASS" in out
