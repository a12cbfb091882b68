"""Training jobs as data: what jobs a protocol holds and the content key of each.

Kept free of torch so that planning a run, checking its cache and ``cellbg status`` are
instant; :mod:`cellbg.train` runs the jobs planned here, and the runner plans with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cellbg import __version__
from cellbg._checks import CellbgError, look_up_option

__all__ = ["DONE", "JobSpec", "JobResult", "plan_jobs", "crops_fingerprint", "job_key"]

DONE = "DONE"


# --------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class JobSpec:
    """One training job.

    Attributes
    ----------
    model : str
        The model's key in the protocol (``spec.key``: its label or architecture).
    train_variant : str
        Variant spec applied to the training (and validation) crops.
    seed : int
        Drives every random draw of the job.
    fold : int
        Test fold (the ``fold`` column of ``cells.parquet``).
    """

    model: str
    train_variant: str
    seed: int
    fold: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        return cls(model=str(d["model"]), train_variant=str(d["train_variant"]), seed=int(d["seed"]),
                   fold=int(d["fold"]))


@dataclass(frozen=True)
class JobResult:
    """What a job produced (statsmodels-style result; the files hold the details).

    Attributes
    ----------
    spec : JobSpec
    key : str
        The job's content hash (its folder name).
    job_dir : Path
    done : bool
        False when the job stopped early on purpose (``max_epochs_this_call``).
    epochs : int
        Epochs trained in total (over all calls).
    best_epoch : int
        Epoch whose weights were kept (lowest validation loss), 1-based.
    best_val_loss : float
        NaN without a validation split.
    accuracy : dict
        Test accuracy per test variant (empty unless done).
    seconds : float
        Wall time of this call.
    """

    spec: JobSpec
    key: str
    job_dir: Path
    done: bool
    epochs: int
    best_epoch: int
    best_val_loss: float
    accuracy: dict = field(default_factory=dict)
    seconds: float = 0.0


def _model_spec(protocol, name: str):
    keys = [m.key for m in protocol.models]
    look_up_option(name, keys, what="model")
    return protocol.models[keys.index(name)]


def _folds(protocol) -> list[int]:
    split = protocol.training.split
    folds = [0] if split.kind == "fixed" else list(range(split.folds))
    if protocol.training.max_folds is not None:
        folds = folds[: protocol.training.max_folds]
    return folds


def plan_jobs(protocol) -> list[JobSpec]:
    """Every job of a protocol: model x train variant x seed x fold, in that nesting order.

    Parameters
    ----------
    protocol : Protocol

    Returns
    -------
    list of JobSpec
    """
    return [
        JobSpec(model=m.key, train_variant=v, seed=int(s), fold=f)
        for m in protocol.models
        for v in protocol.variants.train
        for s in protocol.training.seeds
        for f in _folds(protocol)
    ]


_FINGERPRINTS: dict[tuple, str] = {}


def crops_fingerprint(run_dir: str | Path) -> str:
    """A SHA-256 (hex, 16 chars) of the bytes of ``cells.parquet`` and every file of ``crops.zarr``.

    Memoised on the files' sizes and modification times, so repeated calls are cheap.

    Raises
    ------
    CellbgError
        When the crops are missing (run ``cellbg crops`` first).
    """
    run_dir = Path(run_dir)
    cells, store = run_dir / "cells.parquet", run_dir / "crops.zarr"
    if not cells.is_file() or not store.is_dir():
        raise CellbgError(f"no crops in {run_dir} (cells.parquet and crops.zarr); run 'cellbg crops' first")
    files = [cells] + sorted(p for p in store.rglob("*") if p.is_file())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stats not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(run_dir)).encode() + b"\0")
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _FINGERPRINTS[stats] = h.hexdigest()[:16]
    return _FINGERPRINTS[stats]


def _key_payload(protocol, spec: JobSpec, crops_hash: str) -> dict:
    model = _model_spec(protocol, spec.model)
    # seeds/max_folds only choose which jobs exist; num_workers cannot change the numbers
    # (batches are seeded by index); so none of them belongs in a job's key.
    training = protocol.training.model_dump(mode="json", exclude={"seeds", "max_folds", "num_workers"})
    variants = protocol.variants.model_dump(mode="json", exclude={"train"})
    return {
        "cellbg": __version__,
        "crops": crops_hash,
        "model": model.model_dump(mode="json"),
        "training": training,
        "variants": variants,
        "protocol_seed": protocol.seed,
        "job": spec.to_dict(),
    }


def job_key(protocol, spec: JobSpec, *, crops_hash: str | None = None) -> str:
    """The content hash naming a job's folder (hex, 16 chars).

    It changes when the crops (their bytes), the job's model spec, the training settings,
    the variant settings (test variants, fill, seed), the protocol seed, the job spec or the
    cellbg version change, and not when another model's settings, the list of seeds, other
    train variants or ``num_workers`` change.

    Parameters
    ----------
    protocol : Protocol
    spec : JobSpec
    crops_hash : str, optional
        :func:`crops_fingerprint` of the run, when the caller already has it (or the crops
        do not exist yet and the caller fingerprints them another way).
    """
    if crops_hash is None:
        crops_hash = crops_fingerprint(protocol.run_dir)
    blob = json.dumps(_key_payload(protocol, spec, crops_hash), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
