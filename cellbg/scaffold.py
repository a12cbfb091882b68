"""``cellbg init``: look at a folder of images and write a commented protocol for it.

:func:`scan_folder` reads the folder tree the way :func:`cellbg.data.discover_folders`
does (classes, patients, masks beside the images) and names a bad layout in one line;
:func:`protocol_text` writes a protocol that validates and runs on it.

Examples
--------
>>> import tempfile, pathlib, numpy as np, tifffile
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> for label in ("a", "b"):
...     for patient in ("p1", "p2"):
...         (root / label / patient).mkdir(parents=True)
...         tifffile.imwrite(root / label / patient / "im.tif", np.zeros((8, 8), np.uint8))
>>> scan = scan_folder(root)
>>> scan.layout, scan.classes, scan.n_patients
('classes/patients', {'a': 2, 'b': 2}, 4)
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cellbg._checks import CellbgError
from cellbg.data import MASK_SUFFIXES, discover_folders, is_mask_file

__all__ = ["FolderScan", "scan_folder", "protocol_text", "init_protocol", "DEFAULT_EXTENSIONS"]

DEFAULT_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
#: Tried in order on file names when class folders hold their images directly.
_PATIENT_PATTERNS = (r"^(?P<patient>[A-Za-z0-9]+)[_\- ]",)


@dataclass
class FolderScan:
    """What :func:`scan_folder` found."""

    root: Path
    layout: str  # 'classes/patients', 'classes + patient_pattern', 'classes, no patients', 'plain folder'
    classes: dict[str, int]  # images per class ('' = a plain folder)
    patients: dict[str, int]  # patients per class
    n_images: int
    n_masks: int
    mask_suffixes: dict[str, int]  # masks found per suffix
    patient_pattern: str | None = None
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    orphan_masks: list[str] = field(default_factory=list)
    sample_images: list[str] = field(default_factory=list)

    @property
    def n_patients(self) -> int:
        return sum(self.patients.values())

    @property
    def can_train(self) -> bool:
        """Two classes or more, each with patients: the whole pipeline can run."""
        return (
            len(self.classes) >= 2
            and all(self.patients.get(c, 0) >= 1 for c in self.classes)
            and (self.layout in ("classes/patients", "classes + patient_pattern"))
        )

    def summary_lines(self) -> list[str]:
        """Counts, one line each, as `cellbg init` prints them."""
        lines = [f"{self.root}: {self.n_images} images, layout: {self.layout}"]
        for c, n in self.classes.items():
            who = f", {self.patients[c]} patients" if self.patients.get(c) else ""
            lines.append(f"  class {c or '(none: a plain folder)'}: {n} images{who}")
        if self.patient_pattern:
            pattern = self.patient_pattern
            lines.append(f"  patients read from file names with patient_pattern {pattern!r} (guessed; check)")
        found = ", ".join(f"{k}: {v}" for k, v in self.mask_suffixes.items() if v) or "none"
        lines.append(f"  masks beside the images: {self.n_masks} of {self.n_images} ({found})")
        if self.orphan_masks:
            lines.append(f"  {len(self.orphan_masks)} mask(s) without an image, e.g. {self.orphan_masks[0]}")
        return lines


def _guess_pattern(names: list[str], by_class: dict[str, list[str]]) -> str | None:
    for pattern in _PATIENT_PATTERNS:
        rx = re.compile(pattern)
        matches = [m for n in names if (m := rx.search(n)) is not None]
        if len(matches) != len(names):
            continue
        patients = {m.group("patient") for m in matches}
        if 2 <= len(patients) < len(names):
            return pattern
    return None


def scan_folder(
    root: str | Path,
    *,
    extensions: tuple[str, ...] | list[str] = DEFAULT_EXTENSIONS,
    mask_suffixes: tuple[str, ...] | list[str] = MASK_SUFFIXES,
) -> FolderScan:
    """Classes, patients and masks of a folder tree.

    Layouts read: ``root/<label>/<patient>/<image>``; ``root/<label>/<image>`` (patients read
    from the file names when a pattern fits); a plain folder ``root/<image>`` (segmentation
    only). Masks are files named ``<image stem><suffix>.<ext>`` beside their image.

    Raises
    ------
    CellbgError
        One line naming the bad layout: no such folder, no images, loose images beside class
        folders, a class folder without images, a class mixing loose images and patient
        folders.
    """
    root = Path(root)
    if not root.exists():
        raise CellbgError(f"folder not found: {root}")
    if not root.is_dir():
        raise CellbgError(f"{root} is a file; give the folder that holds the images")
    exts = tuple(e.lower() for e in extensions)
    table = discover_folders(root, extensions=exts, mask_suffixes=mask_suffixes, need_classes=False)
    if table.empty:
        raise CellbgError(f"no images in {root} (extensions {', '.join(exts)})")
    rel = [Path(p).relative_to(root) for p in table["path"]]
    plain = (table["label"] == "").all()
    classes = dict(Counter(table["label"]))
    patients: dict[str, int] = {}
    pattern = None
    if plain:
        layout = "plain folder"
    else:
        pairs = list(zip(rel, table["label"], strict=True))
        depth = {c: {len(r.parts) >= 3 for r, lab in pairs if lab == c} for c in classes}
        mixed = [c for c, d in depth.items() if d == {True, False}]
        if mixed:
            loose = next(r for r, lab in zip(rel, table["label"], strict=True) if lab == mixed[0] and len(r.parts) == 2)
            raise CellbgError(
                f"class '{mixed[0]}' holds images both in patient folders and directly ({root / loose}); "
                f"put each image in {root / mixed[0]}/<patient>/"
            )
        if all(d == {True} for d in depth.values()):
            layout = "classes/patients"
            patients = {c: int(table.loc[table["label"] == c, "patient_id"].nunique()) for c in classes}
        else:
            names = [r.name for r in rel]
            by_class = {c: [r.name for r, lab in zip(rel, table["label"], strict=True) if lab == c] for c in classes}
            pattern = _guess_pattern(names, by_class)
            if pattern is not None:
                layout = "classes + patient_pattern"
                rx = re.compile(pattern)
                # every name matches: _guess_pattern only returns a pattern that matches them all
                patients = {
                    c: len({m.group("patient") for n in ns if (m := rx.search(n)) is not None})
                    for c, ns in by_class.items()
                }
            else:
                layout = "classes, no patients"
    masks = table["mask_path"][table["mask_path"] != ""]
    per_suffix = dict.fromkeys(mask_suffixes, 0)
    for m in masks:  # each mask counts for the first suffix it carries (_cp_masks also ends in _masks)
        sfx = next((s for s in mask_suffixes if s and Path(m).stem.endswith(s)), None)
        if sfx is not None:
            per_suffix[sfx] += 1
    used = set(masks)
    orphans = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in exts and is_mask_file(p, mask_suffixes) and str(p) not in used
    )
    step = max(1, len(table) // 3)
    return FolderScan(
        root=root,
        layout=layout,
        classes=classes,
        patients=patients,
        n_images=len(table),
        n_masks=len(masks),
        mask_suffixes=per_suffix,
        patient_pattern=pattern,
        extensions=exts,
        orphan_masks=orphans,
        sample_images=list(table["path"].iloc[::step][:3]),
    )


def _estimate_diameter(paths: list[str]) -> float | None:
    from cellbg.data import read_image
    from cellbg.segment import estimate_diameter

    values = []
    for p in paths:
        try:
            d = estimate_diameter(read_image(p))
        except CellbgError:
            continue
        if d > 0:
            values.append(d)
    if not values:
        return None
    values.sort()
    return float(round(values[len(values) // 2]))


def _yaml_str(value: str) -> str:
    import yaml

    return yaml.safe_dump(value, default_style=None).strip().removesuffix("\n...").strip()


def protocol_text(
    scan: FolderScan, *, protocol_path: str | Path, name: str | None = None, diameter: float | None = None
) -> str:
    """A commented protocol for a scanned folder (paths relative to ``protocol_path``)."""
    protocol_path = Path(protocol_path)
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", scan.root.resolve().name) or "cellbg"
    root_rel = os.path.relpath(scan.root.resolve(), protocol_path.resolve().parent)
    all_masks = scan.n_masks == scan.n_images
    counts = "; ".join(
        f"{c or 'no class'}: {n} images" + (f", {scan.patients[c]} patients" if scan.patients.get(c) else "")
        for c, n in scan.classes.items()
    )
    found = ", ".join(f"{k}: {v}" for k, v in scan.mask_suffixes.items() if v) or "none"
    lines = [
        f"# cellbg protocol written by `cellbg init` on {_dt.date.today().isoformat()} for",
        f"#   {scan.root.resolve()}",
        f"# layout: {scan.layout}; {counts}",
        f"# masks beside the images: {scan.n_masks} of {scan.n_images} ({found})",
        f"# Check: cellbg validate {protocol_path.name}   Look: cellbg data {protocol_path.name}",
    ]
    if scan.can_train:
        file = protocol_path.name
        lines.append(f"# Run:   cellbg segment {file} --evaluate   (then cellbg run {file})")
    else:
        why = "one class" if len(scan.classes) == 1 and not scan.layout.startswith("plain") else scan.layout
        lines.append(
            f"# Segmentation only ({why}): cellbg segment {protocol_path.name}"
            + (" --evaluate" if scan.n_masks else "")
            + "; training needs two classes or more, each in patient folders (docs/data.md)."
        )
    lines += [
        "",
        f"name: {_yaml_str(name)}",
        f"output: {_yaml_str('runs/' + name)}   # the run folder, relative to this file",
        "",
        "data:",
        "  source: folders",
        f"  root: {_yaml_str(root_rel)}   # relative to this file",
    ]
    if scan.patient_pattern:
        lines.append(f"  patient_pattern: {_yaml_str(scan.patient_pattern)}   # guessed from the file names: check it")
    elif scan.layout == "classes, no patients":
        lines.append("  # patient_pattern: '^(?P<patient>[^_]+)_'   # needed to train: the patient in each file name")
    lines += [
        f"  mask_suffixes: [{', '.join(MASK_SUFFIXES)}]   # masks beside images: <name>_cp_masks.png, <name>_masks.tif",
        "  # mask_dir: masks   # or a folder of masks with the same relative paths as the images",
        f"  extensions: [{', '.join(scan.extensions)}]",
        "  # channels: [0]   # keep only these channels (0-based); all when left out",
        "",
        "segmentation:",
    ]
    if all_masks:
        lines.append("  method: masks   # every image has a mask beside it; threshold or cellpose segment instead")
    else:
        lines += [
            "  method: threshold   # classical, no weights needed; masks: use the masks beside the images",
            "  # method: cellpose   # first choice for T-cells; needs the weights offline (`cellbg models`)",
        ]
    if diameter:
        n = len(scan.sample_images)
        lines.append(f"  diameter: {diameter:g}   # cell diameter in pixels, estimated from {n} image(s)")
    else:
        lines.append("  diameter: null   # threshold/cellpose: cell diameter in pixels; null = estimated per image")
    if scan.can_train:
        folds = max(2, min(5, min(scan.patients.values()) if scan.patients else 2))
        lines += [
            "",
            "training:",
            "  split:",
            f"    folds: {folds}   # patient-grouped folds; at most the patients of the smallest class",
        ]
    return "\n".join(lines) + "\n"


def init_protocol(
    folder: str | Path, out: str | Path, *, force: bool = False, name: str | None = None
) -> tuple[Path, FolderScan]:
    """Scan ``folder``, write a commented protocol to ``out`` (atomically) and check it loads.

    Raises
    ------
    CellbgError
        A bad layout (see :func:`scan_folder`), or ``out`` exists and ``force`` is False.
    """
    from cellbg._io import write_text_atomic
    from cellbg.protocol import parse_protocol

    out = Path(out)
    if out.exists() and not force:
        raise CellbgError(f"{out} exists; choose another file with -o or pass --force to overwrite it")
    scan = scan_folder(folder)
    diameter = None if scan.n_masks == scan.n_images else _estimate_diameter(scan.sample_images)
    text = protocol_text(scan, protocol_path=out, name=name, diameter=diameter)
    parse_protocol(text, source=str(out), base_dir=out.resolve().parent)  # what it writes validates
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    return out, scan
