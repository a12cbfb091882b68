"""The ``cellbg`` command line: thin typer commands that call the stage functions.

Exit codes: 0 success, 2 user error (one red line on stderr, no traceback), 1 internal
failure. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cellbg import __version__
from cellbg._checks import CellbgError

app = typer.Typer(
    name="cellbg",
    help="How much of a cell classifier's accuracy comes from the cell, and how much from its background.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
_state = {"debug": False}

ProtocolArg = Annotated[Path, typer.Argument(help="protocol YAML file", show_default=False)]
RunDirArg = Annotated[Path, typer.Argument(help="run folder (the protocol's output)", show_default=False)]


@contextlib.contextmanager
def _handle():
    """Turn a user error into one red line and exit 2; anything else into exit 1."""
    try:
        yield
    except typer.Exit:
        raise
    except CellbgError as exc:
        if _state["debug"]:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]; finished work is kept, run again to resume")
        raise typer.Exit(code=130) from None
    except Exception as exc:
        if _state["debug"]:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {msg} (run with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=1) from None


def _load(protocol: Path, *, check_paths: bool = True):
    from cellbg.protocol import load_protocol

    return load_protocol(protocol, check_paths=check_paths)


def _version(value: bool) -> None:
    if value:
        out.print(f"cellbg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show Python tracebacks on errors")] = False,
) -> None:
    _state["debug"] = debug


def _df_table(df, title: str | None = None) -> Table:
    table = Table(title=title, show_lines=False)
    for c in df.columns:
        table.add_column(str(c))
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    return table


@app.command(rich_help_panel="Set-up")
def validate(protocol: ProtocolArg) -> None:
    """Check a protocol; print it with every default filled in."""
    with _handle():
        from cellbg.protocol import resolved_yaml

        p = _load(protocol)
        typer.echo(resolved_yaml(p), nl=False)


@app.command(rich_help_panel="Set-up")
def data(protocol: ProtocolArg) -> None:
    """What the dataset holds: classes, patients, images."""
    with _handle():
        from cellbg.data import discover, summarize

        p = _load(protocol)
        table = discover(p)
        summary = summarize(table)
        out.print(_df_table(summary, title=f"{p.name}: {len(table)} images"))
        per_class = table.groupby("label").agg(patients=("patient_id", "nunique"), images=("path", "size"))
        for label, r in per_class.iterrows():
            out.print(f"class {label}: {r.patients} patients, {r.images} images")


# --- synth command (issue 3) ---

# --- models / segment commands (issue 4) ---

# --- crops command (issue 4) ---

# --- variants command (issue 5) ---

# --- train command (issue 6) ---

# --- saliency command (issue 8) ---

# --- stats command (issue 7) ---

# --- report command (issue 10) ---

# --- run / status commands (issue 9) ---


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
