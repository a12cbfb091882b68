"""Checks of a protocol against the world before any work: the data listing, the weights, the GPU.

:func:`cellbg.protocol.load_protocol` checks the protocol file on its own (keys, types,
paths). What it cannot see is checked here, so that ``cellbg validate`` (and ``cellbg run``
before it starts) finds in seconds what would otherwise fail after segmentation or training:
more folds than patients, unknown test patients, missing Cellpose weights, and a CUDA device
asked for where there is none.
"""

from __future__ import annotations

from cellbg._checks import CellbgError

__all__ = ["preflight"]


def preflight(protocol, *, source: str = "protocol") -> None:
    """Check what a protocol needs beyond its own file; raise listing every problem.

    Parameters
    ----------
    protocol : Protocol
        A loaded protocol (paths resolved).
    source : str
        The protocol file, named at the start of each problem line.

    Raises
    ------
    CellbgError
        One line per problem: an unreadable data listing, folds that the patients cannot
        fill (or unknown ``test_patients``), Cellpose weights that are not there, or
        ``training.device: cuda`` on a machine without a CUDA GPU (checked only for the
        local executor: batch jobs run on other nodes).
    """
    problems = []
    split = protocol.training.split
    if protocol.data.source == "synthetic":
        n = protocol.data.synthetic.patients
        if split.kind == "kfold" and n < split.folds:
            problems.append(
                f"training.split.folds: {n} patients (data.synthetic.patients) cannot fill {split.folds} "
                "patient-grouped folds; lower training.split.folds"
            )
    else:
        from cellbg.data import assign_folds, discover

        table = discover(protocol)  # a listing error is the first thing to fix
        try:
            assign_folds(
                table, kind=split.kind, folds=split.folds, test_patients=split.test_patients, seed=protocol.seed
            )
        except CellbgError as exc:
            problems.append(f"training.split: {exc}")
    from cellbg.segment import check_weights

    problems += check_weights(protocol)  # present, and a Cellpose 4 state dict
    if protocol.training.device == "cuda" and protocol.executor.kind == "local":
        import torch

        if not torch.cuda.is_available():
            problems.append(
                "training.device: 'cuda' but this machine has no CUDA GPU that PyTorch can use; "
                "set training.device to 'auto' (GPU when there is one) or 'cpu'"
            )
    if problems:
        raise CellbgError("\n".join(f"{source}: {p}" for p in problems))
