"""Sample data: the quickstart run (``protocols/quickstart.yaml``), made by ``make demo``."""

from __future__ import annotations

from pathlib import Path

__all__ = ["quickstart_run", "quickstart_run_dir"]


def quickstart_run_dir() -> Path:
    """Where ``protocols/quickstart.yaml`` writes its run (``runs/quickstart`` in the checkout).

    The environment variable ``CELLBG_QUICKSTART_RUN`` names another folder.
    """
    import os

    if os.environ.get("CELLBG_QUICKSTART_RUN"):
        return Path(os.environ["CELLBG_QUICKSTART_RUN"])
    import cellbg
    from cellbg.protocol import load_protocol

    protocol_path = Path(cellbg.__file__).resolve().parents[1] / "protocols" / "quickstart.yaml"
    if not protocol_path.exists():
        from cellbg._checks import CellbgError

        raise CellbgError(
            f"the quickstart protocol is not at {protocol_path} (cellbg is not installed from a checkout); "
            "set CELLBG_QUICKSTART_RUN to a finished run folder"
        )
    return Path(load_protocol(protocol_path, check_paths=False).run_dir)


def quickstart_run() -> list[tuple]:
    """The layers of the quickstart run, or a one-line error saying how to make it.

    The run takes a few minutes of CPU (``make demo``), too long to start from a menu
    without warning, so it is not made here.
    """
    from cellbg._checks import CellbgError
    from napari_cellbg._reader import read_run

    run_dir = quickstart_run_dir()
    if not (run_dir / "protocol.resolved.yaml").exists() or not (run_dir / "saliency.parquet").exists():
        raise CellbgError(
            f"the quickstart run is not finished at {run_dir}: make it with `make demo` "
            "(or `cellbg run protocols/quickstart.yaml`, a few minutes on a laptop CPU), then open this sample again"
        )
    return read_run(run_dir)
