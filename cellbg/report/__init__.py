"""Reports for papers: tables, figures, a methods paragraph and provenance from a run folder.

:func:`write_report` reads what the earlier stages left in ``<run>/`` and writes
``<run>/report/``: ``report.md``, a self-contained ``report.html`` (figures embedded as
base64 PNG, with a print stylesheet), ``report.pdf`` (pdflatex), ``tables/*.tex`` (booktabs,
ready for ``\\input`` into a two-column article) and ``figures/*.pdf|png`` (journal widths).
Every part whose inputs are missing is named in the report with the reason, never left
out silently.

This package only formats results: the tests, CIs and corrections come from
``<run>/stats/tests.csv`` (:mod:`cellbg.stats`); accuracies are recomputed from
``predictions.parquet`` with :func:`cellbg.stats.accuracy_table` (per seed, pooled over
folds; then mean and SD over seeds). It never imports torch.

The parts, one file each:

``reading``
    the run folder's tables, checked for their columns;
``tables``
    numbers (BG-GAP, condition labels) and tables as Markdown, HTML and LaTeX;
``figures``
    matplotlib figures, made without pyplot;
``sections``
    one function per report section;
``methods``
    the methods paragraph and the provenance block;
``document``
    the report as blocks, written as Markdown and HTML;
``pdf``
    the same blocks as a LaTeX document, and ``report.pdf`` from it;
``headline``
    the confirmatory result in one sentence;
``export``
    per-cell predictions (wide) and the tests as CSV (``cellbg export``);
``build``
    :func:`write_report`, which puts them together.

Examples
--------
>>> parse_condition("mask_erode(2)+only_fg")
([('mask_erode', ('2',))], 'only_fg', ())
"""

from cellbg.report.build import write_report
from cellbg.report.figures import OKABE_ITO
from cellbg.report.tables import bg_gap_table, latex_table, parse_condition, significance_tables

__all__ = [
    "write_report",
    "bg_gap_table",
    "latex_table",
    "parse_condition",
    "significance_tables",
    "OKABE_ITO",
]
