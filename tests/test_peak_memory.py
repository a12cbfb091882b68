"""benchmarks/peak_memory.py measures a child's own peak memory, not its parent's."""

import importlib.util
import sys
from pathlib import Path

import numpy as np


def _module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peak_memory.py"
    spec = importlib.util.spec_from_file_location("peak_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("peak_memory", module)  # a dataclass looks its module up there
    spec.loader.exec_module(sys.modules["peak_memory"])
    return sys.modules["peak_memory"]


def test_a_child_peak_excludes_the_parents_peak():
    big = np.ones(400_000_000 // 8)  # this process peaks at 400 MB more than the child will
    big += 1
    del big
    child = "import numpy as np; a = np.ones(100_000_000 // 8); a += 1; print('done')"
    m = _module().run_measured([sys.executable, "-c", child])
    assert m.returncode == 0 and m.stdout.strip() == "done"
    # the child's 100 MB array and its interpreter, not this process's 400 MB
    assert 100e6 < m.peak_rss < 300e6, m.peak_rss
    assert m.seconds > 0 and m.cpu_seconds > 0


def test_a_failing_command_reports_its_exit_code():
    m = _module().run_measured([sys.executable, "-c", "import sys; sys.stderr.write('bad'); sys.exit(3)"])
    assert m.returncode == 3 and "bad" in m.stderr
