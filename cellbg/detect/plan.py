"""Detection jobs as data: the fields of view, the jobs of a protocol and the key of each.

Free of torch, like :mod:`cellbg.planning`, so planning a run and checking its cache stay
instant; :mod:`cellbg.detect.train` runs the jobs planned here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from cellbg import __version__
from cellbg._checks import CellbgError

__all__ = [
    "CONDITIONS",
    "DetectJobSpec",
    "conditions",
    "plan_detect_jobs",
    "detection_fields",
    "fields_digest",
    "detect_job_key",
    "detect_dir",
    "file_digest",
    "DONE",
]

DONE = "DONE"

#: The two training conditions: the correlated structure annotated as a class, or not.
CONDITIONS = ("without", "with")


@dataclass(frozen=True)
class DetectJobSpec:
    """One detection job: a condition (``with`` or ``without`` the correlated class), a seed, a fold."""

    condition: str
    seed: int
    fold: int

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"detect/{self.condition}/s{self.seed}/f{self.fold}"


def detect_dir(protocol) -> Path:
    """``<run>/detect``: the study's jobs (``jobs/<key>/``) and tables."""
    return Path(protocol.run_dir) / "detect"


def conditions(protocol) -> list[str]:
    """``["without", "with"]``, or ``["without"]`` when the protocol names no correlated structure."""
    return list(CONDITIONS) if protocol.detection.correlated.source != "none" else ["without"]


def _folds(protocol) -> list[int]:
    from cellbg.planning import split_folds

    return split_folds(protocol.training.split, protocol.detection.max_folds)


def plan_detect_jobs(protocol) -> list[DetectJobSpec]:
    """Every detection job: condition x seed x fold, in that nesting order.

    Examples
    --------
    >>> from cellbg.protocol import Protocol
    >>> p = Protocol.model_validate({"name": "d", "detection": {"enabled": True, "seeds": [0, 1],
    ...     "correlated": {"source": "objects"}}, "training": {"split": {"folds": 2}}})
    >>> [s.name for s in plan_detect_jobs(p)][:3]
    ['detect/without/s0/f0', 'detect/without/s0/f1', 'detect/without/s1/f0']
    >>> len(plan_detect_jobs(p))
    8
    """
    return [
        DetectJobSpec(condition=c, seed=int(s), fold=f)
        for c in conditions(protocol)
        for s in protocol.detection.seeds
        for f in _folds(protocol)
    ]


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex, 16 digits) of a file's bytes, the digest the runner's cache uses."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _correlated_path(protocol, row) -> str:
    """Where the correlated structure's instance mask of one image is ('' when none)."""
    cfg = protocol.detection.correlated
    if cfg.source == "none":
        return ""
    if cfg.source == "masks":
        folder = Path(cfg.mask_dir)
        name = Path(row.path).name
        for candidate in (folder / name, folder / (Path(name).stem + ".tif"), folder / (Path(name).stem + ".png")):
            if candidate.is_file():
                return str(candidate)
        raise CellbgError(
            f"detection.correlated.mask_dir {folder} has no mask for image {row.path} "
            f"(looked for {name} and {Path(name).stem}.tif/.png)"
        )
    # objects: the image table's objects label images (the synthetic co-occurrence cue writes
    # them; a manifest names them in its 'objects' column); a field without one has none
    path = str(getattr(row, "objects_path", "") or "")
    if not path and protocol.data.source == "synthetic":  # an image table that does not list objects
        candidate = Path(protocol.run_dir) / "data" / "objects" / Path(row.path).name
        path = str(candidate) if candidate.is_file() else ""
    return path


def detection_fields(protocol, *, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The fields of view of the detection study: one row per image.

    Columns: ``image_id, path, label, patient_id, seg_path`` (the instance labels of the
    target cells, ``<run>/segmentation/<image_id>.tif``), ``correlated_path`` (the correlated
    structure's instance mask, or ``''``) and ``fold`` (patient-grouped, as the
    classification study's: :func:`cellbg.data.assign_folds` with ``training.split``).

    Parameters
    ----------
    protocol : Protocol
    table : DataFrame, optional
        The image table (:func:`cellbg.data.discover`); discovered when None.

    Raises
    ------
    CellbgError
        A correlated mask that is missing; too few patients for the folds.
    """
    from cellbg.data import assign_folds, discover

    if table is None:
        table = discover(protocol)
    table = table.sort_values("image_id", kind="stable").reset_index(drop=True)
    split = protocol.training.split
    folds = assign_folds(
        table, kind=split.kind, folds=split.folds, test_patients=split.test_patients, seed=protocol.seed
    )
    seg_dir = Path(protocol.run_dir) / "segmentation"
    out = pd.DataFrame(
        {
            "image_id": table["image_id"].astype(str),
            "path": table["path"].astype(str),
            "label": table["label"].astype(str),
            "patient_id": table["patient_id"].astype(str),
            "seg_path": [str(seg_dir / f"{i}.tif") for i in table["image_id"]],
            "correlated_path": [_correlated_path(protocol, r) for r in table.itertuples()],
            "fold": folds.to_numpy(),
        }
    )
    targets = protocol.detection.targets
    if targets:
        unknown = sorted(set(targets) - set(out["label"]))
        if unknown:
            raise CellbgError(
                f"detection.targets names class(es) {unknown} that the dataset lacks "
                f"(it has {sorted(out['label'].unique())})"
            )
    if protocol.detection.correlated.source == "objects" and not (out["correlated_path"] != "").any():
        raise CellbgError(
            "detection.correlated.source is 'objects' but no image has an objects label image (for synthetic "
            "data set data.synthetic.cooccurrence > 0; for a manifest add an 'objects' column)"
        )
    return out


def fields_digest(fields: pd.DataFrame, digest: Callable[[str], str] = file_digest) -> str:
    """One hash of the fields' content: image, label image and correlated mask bytes, labels, patients."""
    rows = sorted(
        [
            r.image_id,
            r.label,
            r.patient_id,
            int(r.fold),
            digest(r.path),
            digest(r.seg_path),
            digest(r.correlated_path) if r.correlated_path else "",
        ]
        for r in fields.itertuples()
    )
    blob = json.dumps(rows, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def detect_job_key(protocol, spec: DetectJobSpec, fields_hash: str) -> str:
    """The content hash naming a detection job's folder (hex, 16 chars).

    It changes with the fields (their bytes), the detection settings (not the list of seeds,
    ``max_folds``, ``enabled`` or ``only``), the split, the protocol seed, the channels, the job
    and the cellbg version.
    """
    det = protocol.detection.model_dump(mode="json", exclude={"seeds", "max_folds", "enabled", "only"})
    weights = protocol.detection.detector.weights
    payload = {
        "weights": file_digest(weights) if weights is not None and Path(weights).is_file() else None,
        "cellbg": __version__,
        "fields": fields_hash,
        "detection": det,
        "split": protocol.training.split.model_dump(mode="json"),
        "channels": protocol.data.channels,
        "protocol_seed": protocol.seed,
        "job": spec.to_dict(),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
