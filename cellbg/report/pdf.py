"""The report as a LaTeX document, and ``report.pdf`` made from it with pdflatex.

The PDF is the same document as ``report.md`` and ``report.html``: the tables are the very
``tables/*.tex`` a paper ``\\input``s, the figures the vector ``figures/*.pdf`` at their
print width. pdflatex (TeX Live, from Debian: ``scripts/system-deps.sh``) is used because
the LaTeX tables are the paper's tables, and the same engine checks in the tests that they
fit a two-column article; an HTML renderer would print different tables.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

from cellbg.report.document import Absent, Block, Code, FigureBlock, Heading, Para, TableBlock
from cellbg.report.tables import _tex_cell, latex_table

#: The preamble: Times (Type 1 fonts from TeX Live's fonts-recommended), a text width of
#: 7.27 in so that double-column figures (7.2 in) print at their size.
_PREAMBLE = r"""\documentclass[10pt]{article}
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage{mathptmx}
\usepackage[scaled=0.9]{helvet}
\usepackage{courier}
\usepackage{booktabs,graphicx,array,float}
\usepackage[a4paper,hmargin=0.5in,vmargin=0.7in]{geometry}
\setlength{\parindent}{0pt}
\setlength{\parskip}{0.5em}
\begin{document}
"""

#: Characters pdflatex does not set up by default, and their LaTeX.
_UNICODE = {
    "→": r"$\rightarrow$",
    "’": "'",
    "‘": "`",
    "“": "``",
    "”": "''",
    "…": "...",
    "—": "---",
    "·": r"$\cdot$",
    "\u2009": r"\,",
    "≈": r"$\approx$",
    "μ": r"$\mu$",
    "β": r"$\beta$",
}


def tex_text(text: str) -> str:
    """Markdown-ish report text (``code``, **bold**) as LaTeX, with every character set up."""
    text = re.sub(r"\*\*([^*]+)\*\*", "\0B\\1\0E", str(text))
    out = _tex_cell(text).replace("\0B", r"\textbf{").replace("\0E", "}")
    for uni, tex in _UNICODE.items():
        out = out.replace(uni, tex)
    # Anything else outside Latin-1 would stop pdflatex: say it in words instead.
    return "".join(ch if ord(ch) < 256 else "?" for ch in out)


def _float_here(table_tex: str) -> str:
    """A table file's floats placed where they stand in the report (one column: no ``table*``)."""
    return re.sub(
        r"\\(begin|end)\{table\*?\}(\[tbp\])?",
        lambda m: f"\\{m[1]}{{table}}" + ("[H]" if m[1] == "begin" else ""),
        table_tex,
    )


def latex_document(title: str, blocks: list[Block], tables: dict[str, str]) -> str:
    """The report's blocks as one LaTeX document (figures read from ``figures/<name>.pdf``)."""
    body = [_PREAMBLE, f"{{\\LARGE\\bfseries {tex_text(title)}\\par}}\\bigskip", ""]
    for block in blocks:
        if isinstance(block, Heading):
            body.append(("\\section*{" if block.level <= 2 else "\\subsection*{") + tex_text(block.text) + "}")
        elif isinstance(block, Para):
            body += [tex_text(block.text), ""]
        elif isinstance(block, Absent):
            body += [f"\\textbf{{Not available:}} {tex_text(block.text)}", ""]
        elif isinstance(block, TableBlock):
            name = block.tex_name
            tex = tables.get(name) if name else None
            if tex is None:
                tex = latex_table(
                    block.df,
                    caption=block.caption,
                    label=f"tab:{name or len(body)}",
                    size="footnotesize",
                    notes=block.notes,
                )
            body.append(_float_here(tex))
        elif isinstance(block, FigureBlock):
            body += [
                "\\begin{figure}[H]",
                "\\centering",
                f"\\includegraphics{{figures/{block.name}.pdf}}",
                f"\\caption{{{tex_text(block.caption)}}}",
                "\\end{figure}",
                "",
            ]
        elif isinstance(block, Code):
            lines = [w for line in block.text.splitlines() for w in (textwrap.wrap(line, 110) or [""])]
            body += ["{\\footnotesize", "\\begin{verbatim}", *lines, "\\end{verbatim}", "}"]
    body.append("\\end{document}\n")
    return "\n".join(body)


def pdflatex() -> str | None:
    """The pdflatex on PATH, or None."""
    return shutil.which("pdflatex")


def compile_pdf(tex_path: Path, *, timeout: float = 300) -> tuple[Path | None, str]:
    """Run pdflatex on ``tex_path`` in its folder; return ``(pdf or None, log text)``.

    The PDF is reproducible (``SOURCE_DATE_EPOCH``); the auxiliary files are removed. A
    failure returns None with pdflatex's log, which names the line.
    """
    exe = pdflatex()
    if exe is None:
        return None, "no pdflatex on PATH"
    env = {**os.environ, "SOURCE_DATE_EPOCH": "0", "FORCE_SOURCE_DATE": "1"}
    tex_path = Path(tex_path)
    try:
        res = subprocess.run(
            [exe, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", tex_path.name],
            cwd=tex_path.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"pdflatex did not run: {exc}"
    log_path = tex_path.with_suffix(".log")
    log = log_path.read_text(encoding="utf-8", errors="replace") if log_path.exists() else res.stdout
    for ext in (".aux", ".log", ".out"):
        tex_path.with_suffix(ext).unlink(missing_ok=True)
    pdf = tex_path.with_suffix(".pdf")
    if res.returncode != 0 or not pdf.exists():
        pdf.unlink(missing_ok=True)
        return None, log
    return pdf, log


def first_error(log: str) -> str:
    """The first ``!`` error line of a LaTeX log (with its line number when given)."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("!"):
            where = next((ln.strip() for ln in lines[i + 1 : i + 6] if ln.startswith("l.")), "")
            return f"{line[1:].strip()} {where}".strip()
    return lines[-1].strip() if lines else "unknown error"
