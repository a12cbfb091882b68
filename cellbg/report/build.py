"""Writing a run's report folder: :func:`write_report`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cellbg._checks import CellbgError
from cellbg._io import atomic_dir
from cellbg.report.document import _Doc
from cellbg.report.figures import _Figures
from cellbg.report.methods import _methods, _provenance
from cellbg.report.reading import _read_run
from cellbg.report.sections import (
    _section_accuracy,
    _section_bg_gap,
    _section_factors,
    _section_overview,
    _section_saliency,
    _section_segmentation,
    _section_tests,
    _section_training,
)


def write_report(run_dir: str | Path, *, gallery_cells: int = 4) -> Path:
    """Write ``<run>/report/`` from a run folder: Markdown, HTML, LaTeX tables and figures.

    Parameters
    ----------
    run_dir : str or Path
        The run folder (holding ``protocol.resolved.yaml``).
    gallery_cells : int, optional
        Cells (rows) in the saliency gallery.

    Returns
    -------
    Path
        The report folder. It holds ``report.md`` and ``report.html`` (when the protocol's
        ``report.formats`` list them), ``tables/*.tex`` (``tex``) and ``figures/*.png|svg``
        (``report.figures``). The folder is replaced as a whole, so a failed report never
        leaves a half-written one.

    Raises
    ------
    CellbgError
        Not a run folder, or an input table that cannot be read or lacks its columns.

    Examples
    --------
    >>> write_report("runs/quickstart")  # doctest: +SKIP
    PosixPath('runs/quickstart/report')
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not isinstance(gallery_cells, int | np.integer) or gallery_cells < 1:
        raise CellbgError(f"gallery_cells must be a positive integer, got {gallery_cells!r}")
    run = _read_run(run_dir)
    cfg = run.protocol.report
    target = run_dir / "report"
    with atomic_dir(target) as tmp:
        figs = _Figures(tmp / "figures", enabled=cfg.figures)
        tex: dict[str, str] = {}
        doc = _Doc(title=cfg.title or f"cellbg report: {run.protocol.name}")
        _section_overview(doc, run)
        if not cfg.figures:
            doc.absent("figures are switched off in the protocol (`report.figures: false`).")
        acc = _section_accuracy(doc, run, figs, tex)
        _section_bg_gap(doc, run, tex)
        _section_tests(doc, run, figs, tex)
        _section_factors(doc, run, acc, figs)
        _section_training(doc, run, figs)
        _section_saliency(doc, run, figs, gallery_cells)
        _section_segmentation(doc, run, tex)
        doc.heading("Methods")
        doc.para(_methods(run))
        doc.heading("Provenance")
        doc.code(_provenance(run, started))
        if doc.missing:
            # Say up front what the report lacks; each item is repeated in its section.
            doc.blocks.insert(1, ("para", "**Parts not available in this run:** " + " ".join(
                f"({i}) {m}" for i, m in enumerate(doc.missing, 1))))
        if "tex" in cfg.formats:
            (tmp / "tables").mkdir(exist_ok=True)
            for name, text in tex.items():
                (tmp / "tables" / f"{name}.tex").write_text(text, encoding="utf-8")
        if "md" in cfg.formats:
            (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        if "html" in cfg.formats:
            (tmp / "report.html").write_text(doc.html(), encoding="utf-8")
    return target
