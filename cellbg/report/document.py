"""The report as a list of blocks, written out as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import pandas as pd

from cellbg.report.tables import _html_table, _inline_html, _md_table


@dataclass
class _Doc:
    """The report as a list of blocks, rendered to Markdown and to HTML alike."""

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def absent(self, text: str) -> None:
        """A part that could not be made, and why: stated in the text and listed up top."""
        self.missing.append(text)
        self.blocks.append(("absent", text))

    def table(self, df: pd.DataFrame, caption: str, tex_name: str | None = None, notes: list[str] = ()) -> None:
        self.blocks.append(("table", (df, caption, tex_name, list(notes))))

    def figure(self, name: str, caption: str, png: bytes) -> None:
        self.blocks.append(("figure", (name, caption, png)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "para":
                out += [value, ""]
            elif kind == "absent":
                out += [f"> **Not available:** {value}", ""]
            elif kind == "table":
                df, caption, tex, notes = value
                note = f" (LaTeX: `tables/{tex}.tex`)" if tex else ""
                out += [f"*{caption}*{note}", "", _md_table(df), ""]
                out += [f"Note: {n}" + "\n" for n in notes]
            elif kind == "figure":
                name, caption, _ = value
                out += [f"![{caption}](figures/{name}.png)", "", f"*{caption}* (vector: `figures/{name}.pdf`)", ""]
            elif kind == "code":
                out += ["```", value, "```", ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            elif kind == "para":
                body.append(f"<p>{_inline_html(value)}</p>")
            elif kind == "absent":
                body.append(f'<p class="absent"><strong>Not available:</strong> {_inline_html(value)}</p>')
            elif kind == "table":
                df, caption, tex, notes = value
                note = f" <span class='file'>(LaTeX: tables/{html.escape(tex)}.tex)</span>" if tex else ""
                below = "".join(f"<p class='note'>Note: {_inline_html(n)}</p>" for n in notes)
                body.append(
                    f"<figure class='table'><figcaption>{_inline_html(caption)}{note}</figcaption>"
                    f"<div class='scroll'>{_html_table(df)}</div>{below}</figure>"
                )
            elif kind == "figure":
                name, caption, png = value
                data = base64.b64encode(png).decode("ascii")
                body.append(
                    f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
                )
            elif kind == "code":
                body.append(f"<pre>{html.escape(value)}</pre>")
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
