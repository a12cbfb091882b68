"""Progress inside a job, reported by the stages and shown by whoever runs them.

A stage calls :func:`report` as its work goes (``done`` of ``total`` ``unit``, plus any
figures such as a training loss); nothing happens unless a sink is installed for the
current thread with :func:`sink`. The runner installs one per job that writes the job's
progress file, which the run display, the run log and ``cellbg status`` read. This module
imports nothing from cellbg, so every stage can use it.

Examples
--------
>>> seen = []
>>> with sink(seen.append):
...     report(done=1, total=3, unit="images")
>>> seen
[{'done': 1, 'total': 3, 'unit': 'images'}]
>>> report(done=2, total=3)  # no sink: nothing happens
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

_SINK: contextvars.ContextVar[Callable[[dict], Any] | None] = contextvars.ContextVar("cellbg_progress", default=None)


def report(**fields: Any) -> None:
    """Report progress to the current sink, if any (``done``, ``total``, ``unit``, ...)."""
    fn = _SINK.get()
    if fn is not None:
        fn(dict(fields))


@contextlib.contextmanager
def sink(fn: Callable[[dict], Any]) -> Iterator[None]:
    """Send :func:`report` calls made in this context to ``fn``."""
    token = _SINK.set(fn)
    try:
        yield
    finally:
        _SINK.reset(token)
