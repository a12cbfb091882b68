"""Atomic writes: a file or folder appears complete under its final name, or not at all.

A killed run must never leave a half-written file that a later run takes as finished, so
every stage writes to a temporary name beside the target and renames it into place
(``os.replace`` is atomic on one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_text_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
]


def _named(exc: BaseException, target: Path) -> BaseException:
    """A write failure that names the file it was writing: an ``OSError`` without a file
    name (a failed ``write()``), or a library's wrapper of "No space left on device"
    (pyarrow, ``torch.save``), becomes an ``OSError`` naming ``target``."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
        return OSError(exc.errno, exc.strerror, str(target))
    if not isinstance(exc, OSError | KeyboardInterrupt) and "No space left on device" in str(exc):
        return OSError(errno.ENOSPC, "No space left on device", str(target))
    return exc


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; rename it to ``target`` on success.

    On an exception the temporary file is removed and ``target`` is left untouched; a
    failed write that does not name its file (disk full) is raised as an ``OSError``
    naming ``target``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied),
        # so that the rest of a lab's group can read a run folder on a shared filesystem.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        named = _named(exc, target)
        if named is exc:
            raise
        raise named from exc


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``.

    Used for stores that are folders (zarr). An existing ``target`` is removed only after
    the new folder is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        named = _named(exc, target)
        if named is exc:
            raise
        raise named from exc


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(df, path: str | Path) -> Path:
    """Write a pandas DataFrame to parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)
