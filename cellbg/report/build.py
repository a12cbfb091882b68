"""Writing a run's report folder: :func:`write_report`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg import _progress
from cellbg._checks import CellbgError
from cellbg._io import atomic_dir
from cellbg.report.detection import _section_detection
from cellbg.report.document import Para, _Doc
from cellbg.report.figures import _Figures
from cellbg.report.methods import _methods, _provenance
from cellbg.report.pdf import compile_pdf, first_error, latex_document, pdflatex
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
        The report folder. It holds ``report.md``, ``report.html``, ``report.pdf`` (with its
        source ``report.tex``) when the protocol's ``report.formats`` list them,
        ``tables/*.tex`` (``tex``) and ``figures/*.pdf|png`` (``report.figures``). The
        folder is replaced as a whole, so a failed report never leaves a half-written one.

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
        detection_only = run.protocol.detection.enabled and run.protocol.detection.only
        acc: pd.DataFrame | None = None  # the accuracy table, made by the first section and read by the factors one
        sections: list[Callable[[], object]] = (
            []
            if detection_only
            else [
                lambda: _section_accuracy(doc, run, figs, tex),
                lambda: _section_bg_gap(doc, run, tex),
                lambda: _section_tests(doc, run, figs, tex),
                lambda: _section_factors(doc, run, acc, figs),
                lambda: _section_training(doc, run, figs),
                lambda: _section_saliency(doc, run, figs, gallery_cells),
                lambda: _section_segmentation(doc, run, tex),
            ]
        )
        sections.append(lambda: _section_detection(doc, run, figs, tex))
        with figs.style():  # figures at print size: fonts >= 7 pt
            for done, section in enumerate(sections):
                _progress.report(done=done, total=len(sections) + 1, unit="report sections")
                made = section()
                if done == 0 and not detection_only and isinstance(made, pd.DataFrame):
                    acc = made
        if not detection_only:
            doc.heading("Methods")
            doc.para(_methods(run))
        doc.heading("Provenance")
        doc.code(_provenance(run, started))
        if "pdf" in cfg.formats and pdflatex() is None:
            doc.absent(
                "no `report.pdf`: the protocol asks for it (`report.formats`), but this machine has no "
                "TeX engine (`pdflatex`); install TeX Live (`bash scripts/system-deps.sh` as root, or "
                "`apt-get install texlive-latex-base texlive-latex-recommended texlive-fonts-recommended`) "
                "and run `cellbg report` again, or print `report.html`."
            )
        n_missing = _say_missing(doc, 0)
        if "tex" in cfg.formats:
            (tmp / "tables").mkdir(exist_ok=True)
            for name, text in tex.items():
                (tmp / "tables" / f"{name}.tex").write_text(text, encoding="utf-8")
        if "pdf" in cfg.formats:
            _progress.report(done=len(sections), total=len(sections) + 1, unit="report sections", line="pdflatex")
            _write_pdf(doc, tex, tmp)
            _say_missing(doc, n_missing)
        if "md" in cfg.formats:
            (tmp / "report.md").write_text(doc.markdown(), encoding="utf-8")
        if "html" in cfg.formats:
            (tmp / "report.html").write_text(doc.html(), encoding="utf-8")
    return target


def _say_missing(doc: _Doc, shown: int) -> int:
    """Say up front what the report lacks (each item is repeated in its section); replaces the
    list already shown (``shown`` items) when more went missing since. Returns the count."""
    if doc.missing and len(doc.missing) != shown:
        block = Para(
            "**Parts not available in this run:** " + " ".join(f"({i}) {m}" for i, m in enumerate(doc.missing, 1))
        )
        if shown:
            doc.blocks[1] = block
        else:
            doc.blocks.insert(1, block)
    return len(doc.missing)


def _write_pdf(doc: _Doc, tex: dict[str, str], folder: Path) -> None:
    """``report.tex`` and ``report.pdf`` in ``folder`` (figures already in ``figures/``).

    When pdflatex fails, ``report.tex`` and its log (``report-pdf.log``) are kept and the
    report says so; the other formats are written as usual.
    """
    if pdflatex() is None:
        return  # said in the report (see write_report)
    source = folder / "report.tex"
    source.write_text(latex_document(doc.title, doc.blocks, tex), encoding="utf-8")
    pdf, log = compile_pdf(source)
    if pdf is None:
        (folder / "report-pdf.log").write_text(log, encoding="utf-8")
        doc.absent(
            f"no `report.pdf`: pdflatex stopped at {first_error(log)} (the source is `report.tex`, "
            "the log `report-pdf.log`)."
        )
