"""Dataset discovery and image readers.

Two layouts are read:

* **class folders**: ``root/<label>/<patient>/<image>``, or ``root/<label>/<image>`` with
  ``data.patient_pattern`` (a regex with a named group ``patient``) read from the file name;
  optional instance masks beside the images (``<name>_cp_masks.png``, ``<name>_masks.tif``:
  ``data.mask_suffixes``) or in ``data.mask_dir`` with the same relative paths; for
  segmentation alone also a plain folder of images;
* **manifest CSV**: columns ``path,label,patient[,mask][,objects]``, paths relative to the
  CSV; ``objects`` names a label image of non-target objects (platelets, debris...) that the
  crops stage counts as other objects (``no_others``).

The result is an image table (:func:`discover`): one row per image with ``image_id``,
``path``, ``label``, ``patient_id``, ``mask_path`` and ``objects_path`` (empty when there is
none).
Every error names the file and the reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cellbg._checks import CellbgError, check_file
from cellbg.ids import unique_image_ids

__all__ = [
    "read_image",
    "read_mask",
    "discover",
    "discover_folders",
    "discover_manifest",
    "summarize",
    "check_masks",
    "check_channels",
    "IMAGE_COLUMNS",
    "MASK_SUFFIXES",
    "find_mask",
    "mask_path_for",
    "write_mask",
    "is_mask_file",
    "assign_folds",
]

IMAGE_COLUMNS = ["image_id", "path", "label", "patient_id", "mask_path", "objects_path"]
_TIFF = (".tif", ".tiff")
#: Axes in a TIFF's metadata that are never colour channels (tifffile's axis codes).
_STACK_AXES = {"Z": "depth", "T": "time"}


def _read_tiff(path: Path) -> np.ndarray:
    """Read a TIFF/OME-TIFF as (C, H, W) using the series axes tifffile reports."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes.upper()
        data = series.asarray()
    # Drop singleton non-spatial axes, then put channels ('C' or samples 'S') first.
    keep = [i for i, a in enumerate(axes) if data.shape[i] > 1 or a in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    chan = [i for i, a in enumerate(axes) if a in "CS"]
    other = [i for i, a in enumerate(axes) if a not in "CSYX"]
    if "Y" not in axes or "X" not in axes:
        raise CellbgError(f"cannot find image rows/columns in {path} (axes {series.axes})")
    stack = [a for a in axes if a in _STACK_AXES]
    if stack:
        # A Z-stack or time series whose planes would otherwise be read as colour channels.
        names = ", ".join(f"{a} ({_STACK_AXES[a]}, {data.shape[axes.index(a)]} planes)" for a in stack)
        raise CellbgError(
            f"{path} is a stack with axes {series.axes}: {names}; cellbg reads one plane per file "
            "(2-D, optional channels): save each plane as its own file, or a projection such as the maximum over Z"
        )
    if len(chan) + len(other) > 1:
        raise CellbgError(
            f"{path} has axes {series.axes} with shape {series.shape}; cellbg reads 2-D images "
            "with optional channels (one plane per file: split Z/T stacks first)"
        )
    lead = chan + other  # multi-page without a channel axis: each page is a channel
    order = lead + [axes.index("Y"), axes.index("X")]
    data = np.transpose(data, order)
    return data if data.ndim == 3 else data[None]


def read_image(path: str | Path, *, channels: list[int] | None = None) -> np.ndarray:
    """Read one image as a channels-first array.

    Parameters
    ----------
    path : str or Path
        A TIFF / OME-TIFF (multi-page and multi-channel), PNG or JPEG file.
    channels : list of int, optional
        Channels to keep (0-based). All channels when None.

    Returns
    -------
    image : (C, M, N) ndarray
        In the file's dtype; a grayscale image has C = 1.

    Raises
    ------
    CellbgError
        The file is missing or unreadable, a stack with Z or T axes (one plane per file),
        has NaN or infinite pixels, or a channel index is out of range.

    Examples
    --------
    >>> import tempfile, pathlib, tifffile, numpy as np
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.tif"
    >>> tifffile.imwrite(p, np.zeros((5, 6), np.uint8))
    >>> read_image(p).shape
    (1, 5, 6)
    """
    path = check_file(path, what="image")
    try:
        if path.suffix.lower() in _TIFF:
            image = _read_tiff(path)
        else:
            import imageio.v3 as iio

            image = np.asarray(iio.imread(path))
            image = image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)
    except CellbgError:
        raise
    except Exception as exc:  # any decoder failure is a user-facing "unreadable image"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CellbgError(f"cannot read image {path}: {reason}") from None
    if image.ndim != 3 or image.shape[1] < 2 or image.shape[2] < 2:
        raise CellbgError(f"{path} is not a 2-D image (shape {image.shape})")
    if np.issubdtype(image.dtype, np.inexact):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        if bad:
            raise CellbgError(
                f"image {path} has {bad} non-finite pixel(s) (NaN or infinity); cellbg refuses them because "
                "they would spread into crops, fills and predictions: replace them (e.g. with 0) in the file"
            )
    if channels:
        out_of_range = [c for c in channels if not 0 <= c < image.shape[0]]
        if out_of_range:
            raise CellbgError(
                f"channel(s) {out_of_range} out of range for {path}, which has {image.shape[0]} channel(s)"
            )
        image = image[list(channels)]
    return image


def read_mask(path: str | Path) -> np.ndarray:
    """Read an instance-label mask as an (M, N) int32 array (0 = background).

    Raises
    ------
    CellbgError
        The mask has several channels, non-integer or negative values, or labels too large
        for int32; the message names the file.
    """
    mask = read_image(path)
    if mask.shape[0] != 1:
        raise CellbgError(f"mask {path} has {mask.shape[0]} channels; a mask is one label plane")
    mask = mask[0]
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        frac = np.mod(mask, 1) != 0
        if frac.any():
            r, c = np.argwhere(frac)[0]
            raise CellbgError(
                f"mask {path} holds non-integer values (e.g. {mask[r, c].item()!r} at row {r}, column {c}); "
                "expected instance labels 0, 1, 2, ..."
            )
    if mask.dtype != bool and mask.size:
        low, high = mask.min(), mask.max()
        if low < 0:
            r, c = np.argwhere(mask < 0)[0]
            raise CellbgError(
                f"mask {path} holds negative labels (e.g. {low.item()} at row {r}, column {c}); "
                "expected instance labels 0 (background), 1, 2, ..."
            )
        if high > np.iinfo(np.int32).max:
            raise CellbgError(f"mask {path} holds label {high}, beyond the int32 range of instance labels")
    return mask.astype(np.int32)


#: Suffixes of instance masks saved beside their images (Cellpose's ``_cp_masks``, and ``_masks``).
MASK_SUFFIXES = ("_cp_masks", "_masks")


def is_mask_file(path: str | Path, mask_suffixes: tuple[str, ...] | list[str] = MASK_SUFFIXES) -> bool:
    """Whether a file's name (without its extension) ends with one of the mask suffixes."""
    stem = Path(path).stem
    return any(stem.endswith(sfx) for sfx in mask_suffixes if sfx)


def find_mask(
    image: Path,
    *,
    mask_suffixes: tuple[str, ...] | list[str] = MASK_SUFFIXES,
    mask_dir: Path | None = None,
    rel: Path | None = None,
    extensions: tuple[str, ...] | list[str] = (".tif", ".tiff", ".png"),
) -> Path | None:
    """The instance mask of an image, or None.

    With ``mask_dir``: ``mask_dir/<rel>`` (same relative path and name as the image), else
    ``mask_dir/<rel folder>/<stem><suffix><ext>``. Without: ``<stem><suffix><ext>`` beside the
    image, for each suffix in order and each extension (the image's own first).
    """
    folder = image.parent if mask_dir is None else Path(mask_dir) / (rel.parent if rel is not None else Path())
    if mask_dir is not None and rel is not None and (Path(mask_dir) / rel).is_file():
        return Path(mask_dir) / rel
    exts = [image.suffix] + [e for e in extensions if e.lower() != image.suffix.lower()]
    for sfx in mask_suffixes:
        if not sfx:
            continue
        for ext in exts:
            cand = folder / f"{image.stem}{sfx}{ext}"
            if cand.is_file():
                return cand
    return None


def mask_path_for(image: str | Path, *, suffix: str = "_masks", folder: str | Path | None = None) -> Path:
    """Where :func:`discover_folders` looks for an image's mask: ``<stem><suffix>.tif`` beside
    it (or in ``folder``)."""
    image = Path(image)
    if not suffix:
        raise CellbgError("a mask suffix is needed (e.g. '_masks'): without one the mask would replace the image")
    return (Path(folder) if folder is not None else image.parent) / f"{image.stem}{suffix}.tif"


def write_mask(
    labels: np.ndarray, image: str | Path, *, suffix: str = "_masks", folder: str | Path | None = None
) -> Path:
    """Save instance labels as the mask of an image, where a protocol finds them.

    Writes ``<image stem><suffix>.tif`` (int32, zlib) beside the image or in ``folder``,
    atomically; an existing mask there is replaced.

    Raises
    ------
    CellbgError
        The labels are not a 2-D integer array, or their shape differs from the image's.
    """
    import tifffile

    from cellbg._io import atomic_path

    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise CellbgError(f"labels must be a 2-D integer array; got shape {labels.shape}, dtype {labels.dtype}")
    image = check_file(image, what="image")
    shape = _image_shape(image, tifffile) or tuple(read_image(image).shape[1:])
    if tuple(shape) != labels.shape:
        raise CellbgError(f"labels have shape {labels.shape} but image {image} is {tuple(shape)}")
    out = mask_path_for(image, suffix=suffix, folder=folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tifffile.imwrite(tmp, labels.astype(np.int32), compression="zlib")
    return out


def _images_in(folder: Path, exts: set[str], mask_suffixes, *, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in files
        if p.is_file()
        and p.suffix.lower() in exts
        and not p.name.startswith(".")
        and not is_mask_file(p, mask_suffixes)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def discover_folders(
    root: str | Path,
    *,
    patient_pattern: str | None = None,
    mask_dir: str | Path | None = None,
    extensions: tuple[str, ...] | list[str] = (".tif", ".tiff", ".png", ".jpg", ".jpeg"),
    mask_suffixes: tuple[str, ...] | list[str] = MASK_SUFFIXES,
    need_classes: bool = True,
) -> pd.DataFrame:
    """Image table from class folders ``root/<label>/<patient>/<image>``.

    With ``patient_pattern``, images may sit directly in ``root/<label>/`` and the patient
    is the regex group ``patient`` of the file name. Files whose name ends with a mask suffix
    (``_cp_masks``, ``_masks``) are not images: they are the masks of the image of the same
    name without it (see :func:`find_mask`), as are files of the same relative path in
    ``mask_dir``.

    With ``need_classes=False`` (segmentation only) a plain folder of images is read too
    (label and patient empty), and an image without a patient gets an empty patient.

    Raises
    ------
    CellbgError
        The folder is missing, holds no images, mixes loose images with class folders, a class
        folder holds no image, a patient cannot be read (with ``need_classes``), or a mask
        given by ``mask_dir`` is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise CellbgError(f"data folder not found: {root}")
    exts = {e.lower() for e in extensions}
    rx = re.compile(patient_pattern) if patient_pattern else None
    if rx is not None and "patient" not in rx.groupindex:
        raise CellbgError(f"data.patient_pattern '{patient_pattern}' needs a named group (?P<patient>...)")
    loose = _images_in(root, exts, mask_suffixes, recursive=False)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [c for c in class_dirs if c != (Path(mask_dir) if mask_dir else None)]
    if loose and class_dirs and any(_images_in(c, exts, mask_suffixes, recursive=True) for c in class_dirs):
        raise CellbgError(
            f"{root} holds images both directly ({loose[0].name}, ...) and in class folders "
            f"({', '.join(c.name for c in class_dirs[:3])}); put every image in a class folder root/<label>/..."
        )
    groups: list[tuple[str, list[Path]]] = []
    if loose:
        if need_classes:
            raise CellbgError(
                f"the images in {root} are not in class folders; a classifier needs {root}/<label>/<patient>/<image> "
                "(segmenting alone works on a plain folder)"
            )
        groups.append(("", loose))
    else:
        if not class_dirs:
            raise CellbgError(
                f"no images or class folders in {root}; expected {root}/<label>/<patient>/<image> "
                f"with extensions {', '.join(sorted(exts))}"
            )
        for cdir in class_dirs:
            files = _images_in(cdir, exts, mask_suffixes, recursive=True)
            if not files:
                raise CellbgError(f"class '{cdir.name}' has no images in {cdir}")
            groups.append((cdir.name, files))
    rows = []
    for label, files in groups:
        for f in files:
            rel = f.relative_to(root)
            if rx is not None:
                m = rx.search(f.name)
                if m is None:
                    raise CellbgError(f"patient_pattern does not match file name {f}")
                patient = m.group("patient")
            elif len(rel.parts) >= 3:
                patient = rel.parts[1]
            elif not need_classes:
                patient = ""
            else:
                raise CellbgError(f"no patient for {f}: put it in {f.parent}/<patient>/ or set data.patient_pattern")
            mask = find_mask(f, mask_suffixes=mask_suffixes, mask_dir=Path(mask_dir) if mask_dir else None, rel=rel)
            if mask_dir is not None and mask is None:
                raise CellbgError(f"mask not found for {f}: expected {Path(mask_dir) / rel}")
            rows.append(
                {
                    "image_id": str(rel),  # made an id below, unique over the whole table
                    "path": str(f),
                    "label": label,
                    "patient_id": str(patient),
                    "mask_path": str(mask) if mask is not None else "",
                    "objects_path": "",
                }
            )
    table = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    table["image_id"] = unique_image_ids(table["image_id"])
    return table


def discover_manifest(manifest: str | Path) -> pd.DataFrame:
    """Image table from a manifest CSV with columns ``path,label,patient[,mask][,objects]``."""
    manifest = check_file(manifest, what="manifest")
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise CellbgError(f"cannot read manifest {manifest}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in ("path", "label", "patient") if c not in df.columns]
    if missing:
        raise CellbgError(f"manifest {manifest} lacks column(s) {missing}; expected path,label,patient[,mask]")
    if df.empty:
        raise CellbgError(f"manifest {manifest} lists no images")
    base = manifest.parent
    rows = []
    for i, r in df.iterrows():
        line = i + 2  # header is line 1
        for col in ("path", "label", "patient"):
            if not str(r[col]).strip():
                raise CellbgError(f"{manifest}:{line}: {col} is empty")
        path = Path(r["path"])
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise CellbgError(f"{manifest}:{line}: image not found: {path}")
        mask_path = ""
        if "mask" in df.columns and str(r["mask"]).strip():
            mp = Path(r["mask"])
            mp = mp if mp.is_absolute() else base / mp
            if not mp.exists():
                raise CellbgError(f"{manifest}:{line}: mask not found: {mp}")
            mask_path = str(mp)
        objects_path = ""
        if "objects" in df.columns and str(r["objects"]).strip():
            op = Path(r["objects"])
            op = op if op.is_absolute() else base / op
            if not op.exists():
                raise CellbgError(f"{manifest}:{line}: objects label image not found: {op}")
            objects_path = str(op)
        rows.append(
            {
                "image_id": str(r["path"]),  # made an id below, unique over the whole table
                "path": str(path),
                "label": str(r["label"]).strip(),
                "patient_id": str(r["patient"]).strip(),
                "mask_path": mask_path,
                "objects_path": objects_path,
            }
        )
    out = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    resolved = out["path"].map(lambda p: str(Path(p).resolve()))
    dup = resolved.duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        first = int(np.flatnonzero((resolved == resolved.iloc[i]).to_numpy())[0])
        raise CellbgError(f"{manifest}:{i + 2}: image {out['path'].iloc[i]} is listed twice (also on line {first + 2})")
    out["image_id"] = unique_image_ids(out["image_id"])
    return out


def check_masks(table: pd.DataFrame, *, channels: list[int] | None = None) -> None:
    """Check that every mask reads and matches its image's shape (names the file if not)."""
    import tifffile

    for r in table.itertuples():
        if not r.mask_path:
            continue
        mask = read_mask(r.mask_path)
        shape = _image_shape(Path(r.path), tifffile)
        if shape is None:
            shape = read_image(r.path, channels=channels).shape[1:]
        if tuple(mask.shape) != tuple(shape):
            raise CellbgError(f"mask {r.mask_path} has shape {tuple(mask.shape)} but image {r.path} is {tuple(shape)}")


def check_channels(table: pd.DataFrame, *, channels: list[int] | None = None) -> None:
    """Raise when images have different channel counts, naming the odd ones out.

    The count most images share is taken as the dataset's; the message names the images
    that differ from it (the minority), not whichever image happened to be read first.

    Raises
    ------
    CellbgError
        Naming the first odd image, its channel count, and how many images share the
        majority count.
    """
    counts = pd.Series([read_image(p, channels=channels).shape[0] for p in table["path"]], index=table.index)
    if counts.nunique() <= 1:
        return
    tally = counts.value_counts()
    usual = int(tally.index[0])  # most common; ties go to the larger count (value_counts is stable)
    odd = table.loc[counts != usual, "path"]
    first = odd.iloc[0]
    more = f" and {len(odd) - 1} other image(s)" if len(odd) > 1 else ""
    raise CellbgError(
        f"image {first}{more} has {int(counts[odd.index[0]])} channel(s) but {int(tally.iloc[0])} of "
        f"{len(table)} images have {usual}; convert the odd image(s) or set data.channels to pick the same "
        "channels from every image"
    )


def _image_shape(path: Path, tifffile) -> tuple[int, int] | None:
    """(rows, columns) from the file header without decoding pixels; None if unknown."""
    if path.suffix.lower() not in _TIFF:
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            s = tif.series[0]
            return (s.shape[s.axes.index("Y")], s.shape[s.axes.index("X")])
    except Exception:
        return None


def discover(protocol, *, need_classes: bool = True) -> pd.DataFrame:
    """The image table of a protocol's dataset, checked.

    ``need_classes=False`` is for segmentation alone: one class, no labels or a plain folder
    of images are then accepted (the class check stays where a classifier is trained).

    For ``data.source: synthetic`` the dataset is generated into ``<run>/data`` on first use
    (same seed, same bytes) and read through its manifest.

    Raises
    ------
    CellbgError
        A missing file, a label or patient missing, fewer than two classes, a mask whose
        shape differs from its image.
    """
    d = protocol.data
    if d.source == "synthetic":
        from cellbg import synth

        data_dir = Path(protocol.run_dir) / "data"
        manifest = data_dir / "manifest.csv"
        if not manifest.exists():
            synth.make_dataset(data_dir, **d.synthetic.model_dump())
        table = discover_manifest(manifest)
    elif d.source == "folders":
        table = discover_folders(
            d.root,
            patient_pattern=d.patient_pattern,
            mask_dir=d.mask_dir,
            extensions=d.extensions,
            mask_suffixes=d.mask_suffixes,
            need_classes=need_classes,
        )
    else:
        table = discover_manifest(d.manifest)
    n_classes = table["label"].nunique()
    if need_classes and n_classes < 2:
        raise CellbgError(
            f"the dataset has {n_classes} class ({', '.join(table['label'].unique())}); a classifier needs at least two"
        )
    if protocol.segmentation.method == "masks":
        lacking = table.loc[table["mask_path"] == "", "path"]
        if len(lacking):
            raise CellbgError(
                f"segmentation.method is 'masks' but image {lacking.iloc[0]} has no mask "
                "(add a mask column to the manifest, set data.mask_dir, or save it beside the image as "
                f"<name>{(list(d.mask_suffixes) or ['_masks'])[0]}.tif)"
            )
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Images per class and patient: one row per (label, patient_id) with ``images``."""
    return table.groupby(["label", "patient_id"], sort=True).size().rename("images").reset_index()


def assign_folds(
    table: pd.DataFrame,
    *,
    kind: str = "kfold",
    folds: int = 5,
    test_patients: list[str] | None = None,
    seed: int = 0,
) -> pd.Series:
    """Assign each row's patient to a test fold; every patient lies in exactly one fold.

    ``kind="kfold"``: patients are dealt to ``folds`` folds, stratified by each patient's
    majority class (patients of a class are shuffled with ``seed`` and dealt round-robin), so
    every fold holds patients of every class where there are enough. ``kind="fixed"``: the
    ``test_patients`` form fold 0 and all other patients get fold -1 (never tested).

    Parameters
    ----------
    table : DataFrame
        With columns ``patient_id`` and ``label``.

    Returns
    -------
    Series of int
        The fold of each row, aligned with ``table``.

    Raises
    ------
    CellbgError
        Fewer patients than folds, or an unknown test patient.

    Examples
    --------
    >>> t = pd.DataFrame({"patient_id": list("aabbccdd"), "label": list("xxyyxxyy")})
    >>> sorted(assign_folds(t, folds=2).groupby(t["patient_id"]).first().value_counts().tolist())
    [2, 2]
    """
    patients = table.groupby("patient_id")["label"].agg(lambda s: s.value_counts().index[0])
    if kind == "fixed":
        test = set(map(str, test_patients or []))
        unknown = sorted(test - set(patients.index))
        if unknown:
            raise CellbgError(f"training.split.test_patients names unknown patient(s) {unknown}")
        if not test:
            raise CellbgError("training.split.kind 'fixed' needs training.split.test_patients")
        fold_of = {p: (0 if p in test else -1) for p in patients.index}
    else:
        if len(patients) < folds:
            raise CellbgError(
                f"{len(patients)} patients cannot fill {folds} patient-grouped folds; lower training.split.folds"
            )
        rng = np.random.default_rng(seed)
        fold_of = {}
        start = 0
        for label in sorted(patients.unique()):
            members = np.array(sorted(patients.index[patients == label]))
            members = members[rng.permutation(len(members))]
            for i, p in enumerate(members):
                fold_of[p] = (start + i) % folds
            start = (start + len(members)) % folds
    return table["patient_id"].map(fold_of).astype(int).rename("fold")
