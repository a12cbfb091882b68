"""The report as a list of blocks, written out as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from cellbg.report.tables import _html_table, _inline_html, _md_table


@dataclass(frozen=True)
class Heading:
    """A section heading (level 2 = section, 3 = subsection)."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph of Markdown-ish text (``code``, **bold**)."""

    text: str


@dataclass(frozen=True)
class Absent:
    """A part that could not be made, and why."""

    text: str


@dataclass(frozen=True)
class TableBlock:
    """A table with its caption, the name of its LaTeX file (if any) and notes below it."""

    df: pd.DataFrame
    caption: str
    tex_name: str | None
    notes: list[str]


@dataclass(frozen=True)
class FigureBlock:
    """A figure: its file stem under ``figures/``, caption and PNG bytes."""

    name: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class Code:
    """Preformatted text."""

    text: str


Block = Heading | Para | Absent | TableBlock | FigureBlock | Code


@dataclass
class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML alike."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(level, text))

    def para(self, text: str) -> None:
        self.blocks.append(Para(text))

    def absent(self, text: str) -> None:
        """A part that could not be made, and why: stated in the text and listed up top."""
        self.missing.append(text)
        self.blocks.append(Absent(text))

    def table(self, df: pd.DataFrame, caption: str, tex_name: str | None = None, notes: Sequence[str] = ()) -> None:
        self.blocks.append(TableBlock(df, caption, tex_name, list(notes)))

    def figure(self, name: str, caption: str, png: bytes) -> None:
        self.blocks.append(FigureBlock(name, caption, png))

    def code(self, text: str) -> None:
        self.blocks.append(Code(text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                out += ["#" * block.level + " " + block.text, ""]
            elif isinstance(block, Para):
                out += [block.text, ""]
            elif isinstance(block, Absent):
                out += [f"> **Not available:** {block.text}", ""]
            elif isinstance(block, TableBlock):
                caption, tex = block.caption, block.tex_name
                note = f" (LaTeX: `tables/{tex}.tex`)" if tex else ""
                out += [f"*{caption}*{note}", "", _md_table(block.df), ""]
                out += [f"Note: {n}" + "\n" for n in block.notes]
            elif isinstance(block, FigureBlock):
                name, caption = block.name, block.caption
                out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}* (vector: `figures/{name}.pdf`)", ""]
            elif isinstance(block, Code):
                out += ["```", block.text, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            if isinstance(block, Heading):
                level = block.level
                body.append(f"<h{level}>{_inline_html(block.text)}</h{level}>")
            elif isinstance(block, Para):
                body.append(f"<p>{_inline_html(block.text)}</p>")
            elif isinstance(block, Absent):
                body.append(f'<p class="absent"><strong>Not available:</strong> {_inline_html(block.text)}</p>')
            elif isinstance(block, TableBlock):
                df, caption, tex, notes = block.df, block.caption, block.tex_name, block.notes
                note = f" <span class='file'>(LaTeX: tables/{html.escape(tex)}.tex)</span>" if tex else ""
                below = "".join(f"<p class='note'>Note: {_inline_html(n)}</p>" for n in notes)
                body.append(
                    f"<figure class='table'><figcaption>{_inline_html(caption)}{note}</figcaption>"
                    f"<div class='scroll'>{_html_table(df)}</div>{below}</figure>"
                )
            elif isinstance(block, FigureBlock):
                caption, png = block.caption, block.png
                data = base64.b64encode(png).decode("ascii")
                body.append(
                    f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
                )
            elif isinstance(block, Code):
                body.append(f"<pre>{html.escape(block.text)}</pre>")
        return _HTML_PAGE.format(title=html.escape(self.title), body="\n".join(body))


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; max-width: 1240px; margin: 2em auto;
       padding: 0 1.5em; color: #1a1a1a; line-height: 1.45; }}
h1 {{ border-bottom: 2px solid #0072B2; padding-bottom: .2em; }}
h2 {{ margin-top: 1.8em; border-bottom: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 0.8em; margin: .3em 0 1em 0; }}
thead th {{ border-top: 2px solid #333; border-bottom: 1px solid #333; padding: .25em .45em; vertical-align: bottom; }}
tbody td {{ padding: .2em .45em; }}
.num {{ text-align: right; white-space: nowrap; }}
.txt {{ text-align: left; min-width: 6em; }}
tbody tr:last-child td {{ border-bottom: 2px solid #333; }}
tbody tr:nth-child(even) {{ background: #f4f6f8; }}
figure {{ margin: 1em 0 1.6em 0; }}
figure img {{ max-width: 100%; height: auto; border: 1px solid #e3e3e3; }}
figcaption {{ font-size: .9em; color: #444; margin: .3em 0; }}
.scroll {{ overflow-x: auto; }}
.file {{ color: #777; }}
p.absent {{ background: #fff6e0; border-left: 4px solid #E69F00; padding: .4em .8em; }}
pre {{ background: #f4f6f8; padding: .8em; overflow-x: auto; font-size: .85em; }}
code {{ background: #f0f0f0; padding: 0 .2em; border-radius: 3px; }}
p.note {{ font-size: .8em; color: #444; margin: .2em 0; }}
@page {{ size: A4; margin: 14mm 12mm; }}
@media print {{
  /* Printing: every column on the page (tables wrap instead of scrolling), figures at
     column width, no break inside a figure or a table row, headings kept with what follows. */
  body {{ max-width: none; margin: 0; padding: 0; font-size: 9pt; line-height: 1.3; }}
  h1 {{ font-size: 15pt; }} h2 {{ font-size: 12pt; break-after: avoid; page-break-after: avoid; }}
  .scroll {{ overflow: visible; }}
  table {{ width: 100%; table-layout: auto; font-size: 6.2pt; }}
  thead th, tbody td {{ padding: .1em .2em; }}
  .txt {{ min-width: 0; word-break: break-word; }}
  thead {{ display: table-header-group; }}
  tr, figure, pre {{ break-inside: avoid; page-break-inside: avoid; }}
  figure.table {{ break-inside: auto; page-break-inside: auto; }}  /* long tables run on, row by row */
  figure img {{ max-width: 100%; border: none; }}
  tbody tr:nth-child(even) {{ background: none; }}
  pre {{ white-space: pre-wrap; word-break: break-all; font-size: 7pt; }}
}}
</style>
</head>
<body>
{body}
</body>
</html>
"""
