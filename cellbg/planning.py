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

__all__ = [
    "DONE",
    "JobSpec",
    "PredictSpec",
    "JobResult",
    "plan_jobs",
    "plan_predictions",
    "crops_fingerprint",
    "job_key",
    "predict_key",
    "plan_saliency",
    "saliency_key",
    "job_folder",
    "describe_job",
    "unfinished_jobs",
    "PREDICT_BLOCK",
]

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
        return cls(
            model=str(d["model"]), train_variant=str(d["train_variant"]), seed=int(d["seed"]), fold=int(d["fold"])
        )


@dataclass(frozen=True)
class PredictSpec:
    """One prediction job: a trained model (its :class:`JobSpec`) shown one test variant.

    Attributes
    ----------
    train : JobSpec
        The training job whose checkpoint predicts.
    test_variant : str
        Variant spec applied to the held-out crops.
    """

    train: JobSpec
    test_variant: str

    def to_dict(self) -> dict:
        return {"train": self.train.to_dict(), "test_variant": self.test_variant}

    @classmethod
    def from_dict(cls, d: dict) -> PredictSpec:
        return cls(train=JobSpec.from_dict(d["train"]), test_variant=str(d["test_variant"]))


#: Held-out cells shown to a model per block: the variant (its ``mixed_*`` pairing pool, its
#: ``mean`` fill and noise) is applied per block of this many cells, in store order, with
#: seed ``variants.seed + block``. Fixed, so predictions never depend on the memory at hand.
PREDICT_BLOCK = 4096


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


def split_folds(split, max_folds: int | None = None) -> list[int]:
    """The held-out folds a split makes jobs for: ``[0]`` for a fixed split, else ``0 .. folds-1``,
    the first ``max_folds`` of them when given (classifier and detector jobs alike).

    Examples
    --------
    >>> from cellbg.protocol import SplitConfig
    >>> split_folds(SplitConfig(kind="kfold", folds=5), max_folds=2)
    [0, 1]
    """
    folds = [0] if split.kind == "fixed" else list(range(split.folds))
    return folds if max_folds is None else folds[:max_folds]


def _folds(protocol) -> list[int]:
    return split_folds(protocol.training.split, protocol.training.max_folds)


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


def plan_predictions(protocol) -> list[PredictSpec]:
    """Every prediction job: each training job of :func:`plan_jobs` x each test variant.

    Examples
    --------
    >>> from cellbg.protocol import Protocol
    >>> p = Protocol.model_validate({"name": "demo", "variants": {"train": ["original"],
    ...     "test": ["original", "only_fg"]}, "training": {"max_folds": 1}})
    >>> [(s.train.fold, s.test_variant) for s in plan_predictions(p)]
    [(0, 'original'), (0, 'only_fg')]
    """
    return [PredictSpec(train=j, test_variant=v) for j in plan_jobs(protocol) for v in protocol.variants.test]


def plan_saliency(protocol) -> list[PredictSpec]:
    """Every saliency job: each training job of :func:`plan_jobs` x each of
    ``saliency.test_variants`` (none when saliency is off).

    A saliency job maps one trained model's sampled held-out cells in one test variant, so
    the maps of a run spread over workers and batch jobs, and adding a saliency test variant
    adds jobs and changes none.

    Examples
    --------
    >>> from cellbg.protocol import Protocol
    >>> p = Protocol.model_validate({"name": "demo", "variants": {"train": ["original"],
    ...     "test": ["original", "mixed_rand"]}, "training": {"max_folds": 2},
    ...     "saliency": {"test_variants": ["original", "mixed_rand"]}})
    >>> [(s.train.fold, s.test_variant) for s in plan_saliency(p)]
    [(0, 'original'), (0, 'mixed_rand'), (1, 'original'), (1, 'mixed_rand')]
    """
    if not protocol.saliency.enabled:
        return []
    return [PredictSpec(train=j, test_variant=v) for j in plan_jobs(protocol) for v in protocol.saliency.test_variants]


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


_NOT_IN_KEY = {"seeds", "max_folds", "num_workers", "memory_budget"}


def _key_payload(protocol, spec: JobSpec, crops_hash: str) -> dict:
    model = _model_spec(protocol, spec.model)
    # seeds/max_folds only choose which jobs exist; num_workers and memory_budget cannot
    # change the numbers (batches are seeded by index and read in the same order from memory
    # or from the store); so none of them belongs in a job's key. The test variants are the
    # prediction jobs' business (predict_key): adding one never retrains.
    training = protocol.training.model_dump(mode="json", exclude=_NOT_IN_KEY)
    variants = protocol.variants.model_dump(mode="json", exclude={"train", "test"})
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
    the variant settings (fill, seed), the protocol seed, the job spec or the cellbg version
    change, and not when another model's settings, the list of seeds, other train variants,
    the test variants, ``num_workers`` or ``memory_budget`` change.

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


def predict_key(protocol, spec: PredictSpec, *, train_key: str | None = None, crops_hash: str | None = None) -> str:
    """The content hash naming a prediction job's folder (hex, 16 chars).

    The trained model's :func:`job_key`, the test variant, the variant settings (fill,
    seed), :data:`PREDICT_BLOCK` and the cellbg version: adding a test variant adds jobs and
    changes none.

    Parameters
    ----------
    protocol : Protocol
    spec : PredictSpec
    train_key : str, optional
        ``job_key(protocol, spec.train)`` when the caller has it.
    crops_hash : str, optional
        As for :func:`job_key`.
    """
    if train_key is None:
        train_key = job_key(protocol, spec.train, crops_hash=crops_hash)
    payload = {
        "cellbg": __version__,
        "train_key": train_key,
        "test_variant": spec.test_variant,
        "variants": protocol.variants.model_dump(mode="json", exclude={"train", "test"}),
        "block": PREDICT_BLOCK,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def saliency_key(protocol, spec: PredictSpec, *, train_key: str | None = None, crops_hash: str | None = None) -> str:
    """The content hash naming a saliency job's folder (hex, 16 chars).

    The trained model's :func:`job_key` (which covers the crops and the protocol seed that
    picks the sampled cells), the test variant, the variant settings, :data:`PREDICT_BLOCK`,
    the saliency settings other than the list of test variants, and the cellbg version.

    Parameters
    ----------
    protocol : Protocol
    spec : PredictSpec
        The trained model and one of ``saliency.test_variants``.
    train_key, crops_hash : str, optional
        As for :func:`predict_key`.
    """
    if train_key is None:
        train_key = job_key(protocol, spec.train, crops_hash=crops_hash)
    payload = {
        "cellbg": __version__,
        "stage": "saliency",
        "train_key": train_key,
        "test_variant": spec.test_variant,
        "variants": protocol.variants.model_dump(mode="json", exclude={"train", "test"}),
        "saliency": protocol.saliency.model_dump(mode="json", exclude={"test_variants", "enabled"}),
        "block": PREDICT_BLOCK,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def job_folder(
    protocol, spec: PredictSpec, key_of, *, job_dir=None, crops_hash: str | None = None
) -> tuple[str, str, Path]:
    """The training job's key, this job's key and folder, for a job on a trained model.

    Parameters
    ----------
    protocol : Protocol
    spec : PredictSpec
    key_of : callable
        :func:`predict_key` or :func:`saliency_key`.
    job_dir : path, optional
        The folder to use; default ``<run>/jobs/<key>``.
    crops_hash : str, optional
        As for :func:`job_key`.

    Returns
    -------
    train_key, key : str
    job_dir : Path
    """
    train_key = job_key(protocol, spec.train, crops_hash=crops_hash)
    key = key_of(protocol, spec, train_key=train_key)
    return train_key, key, Path(job_dir) if job_dir is not None else Path(protocol.run_dir) / "jobs" / key


def describe_job(spec: JobSpec | PredictSpec) -> str:
    """A job in words, for messages.

    Examples
    --------
    >>> describe_job(JobSpec("resnet", "only_fg", 0, 2))
    "model 'resnet', train variant 'only_fg', seed 0, fold 2"
    >>> describe_job(PredictSpec(JobSpec("resnet", "original", 1, 0), "mixed_rand"))
    "model 'resnet', train variant 'original', seed 1, fold 0, test variant 'mixed_rand'"
    """
    train = spec.train if isinstance(spec, PredictSpec) else spec
    words = f"model '{train.model}', train variant '{train.train_variant}', seed {train.seed}, fold {train.fold}"
    return words + (f", test variant '{spec.test_variant}'" if isinstance(spec, PredictSpec) else "")


def unfinished_jobs(kind: str, missing: list, run_dir, command: str) -> CellbgError:
    """The error for jobs that must be finished first: how many, the first, what to run."""
    return CellbgError(
        f"{len(missing)} {kind} job(s) not finished in {run_dir}, e.g. {describe_job(missing[0])}; "
        f"run '{command}' first"
    )
