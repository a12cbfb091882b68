"""Wall time and peak memory of a command, measured without the caller's own peak.

Linux keeps a process's peak RSS across ``exec``, and Python starts a child with ``vfork``
(sharing the parent's memory until the ``exec``): a child's ``ru_maxrss``, read by itself or
through ``wait4``, is at least the *parent's* peak. A benchmark that made a large cohort in
the parent and then timed a small job in a child would report the cohort's memory. Here a
small launcher process forks (its fork starts with the launcher's few MB) and execs the
command, then reports the command's own ``ru_maxrss``.

    from peak_memory import run_measured
    m = run_measured([sys.executable, "-m", "cellbg.cli", "stats", "run"])
    m.seconds, m.peak_rss, m.returncode
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

_LAUNCHER = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
code = os.waitstatus_to_exitcode(status)
report = {"seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024, "returncode": code,
          "cpu_seconds": usage.ru_utime + usage.ru_stime}
sys.stderr.write("\n@peak_memory " + json.dumps(report) + "\n")
sys.exit(code & 0xFF)
"""


@dataclass(frozen=True)
class Measured:
    """A finished command: wall seconds, peak RSS in bytes, exit code, CPU seconds, output."""

    seconds: float
    peak_rss: int
    returncode: int
    cpu_seconds: float
    stdout: str
    stderr: str


def run_measured(cmd: list[str], *, env: dict | None = None) -> Measured:
    """Run ``cmd`` (output captured) and measure its own wall time and peak RSS."""
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    head, sep, tail = proc.stderr.rpartition("\n@peak_memory ")
    if not sep:
        raise RuntimeError(f"the launcher did not report (exit {proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(tail.splitlines()[0])
    return Measured(
        report["seconds"], int(report["peak_rss"]), report["returncode"], report["cpu_seconds"], proc.stdout, head
    )
