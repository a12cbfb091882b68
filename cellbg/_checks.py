"""Shared input checks and the user-error type.

Every stage validates at its boundary with these helpers so that a user mistake becomes a
single :class:`CellbgError` line that names what and where, never a traceback from deep
inside a library. The CLI turns a :class:`CellbgError` into one red line and exit code 2.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "CellbgError",
    "did_you_mean",
    "look_up_option",
    "check_file",
    "check_nd",
    "check_same_shape",
    "describe_os_error",
]


class CellbgError(ValueError):
    """A user error: bad protocol, missing file, unreadable image, inconsistent data.

    The message is one line that says what is wrong and where; the CLI prints it and exits 2.
    """


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def look_up_option(value: str, choices: Iterable[str], *, what: str = "option") -> str:
    """Return ``value`` if it is one of ``choices``, else raise with a "did you mean".

    Examples
    --------
    >>> look_up_option("only_fg", ["only_fg", "no_fg"], what="variant")
    'only_fg'
    """
    choices = list(choices)
    if value in choices:
        return value
    raise CellbgError(
        f"unknown {what} '{value}'{did_you_mean(value, choices)}; choose from: {', '.join(map(str, choices))}"
    )


def check_file(path: str | Path, *, what: str = "file") -> Path:
    """Return ``path`` as a :class:`Path` if it is an existing file, else raise."""
    path = Path(path)
    if not path.exists():
        raise CellbgError(f"{what} not found: {path}")
    if not path.is_file():
        raise CellbgError(f"{what} is not a file: {path}")
    return path


def check_nd(array, ndim: int | Iterable[int], *, arg_name: str = "image") -> None:
    """Raise if ``array.ndim`` is not one of ``ndim``; the message names ``arg_name``."""
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if np.ndim(array) not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise CellbgError(f"{arg_name} must be {want}; got {np.ndim(array)}-D with shape {tuple(np.shape(array))}")


def check_same_shape(a, b, *, names: tuple[str, str] = ("image", "mask"), where: str = "") -> None:
    """Raise if the two arrays' shapes differ; ``where`` names the file or cell."""
    if tuple(np.shape(a)) != tuple(np.shape(b)):
        loc = f" in {where}" if where else ""
        raise CellbgError(
            f"{names[1]} shape {tuple(np.shape(b))} does not match {names[0]} shape {tuple(np.shape(a))}{loc}"
        )


#: File-system failures that are the machine's or the user's to fix (space, permissions, a
#: file where a folder should be), never cellbg's: reported as one line with the path, exit 2.
_FS_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a file is in the way (a folder is needed there)",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "a folder is in the way (a file is needed there)",
}


def describe_os_error(exc: BaseException, *, where: str | Path | None = None) -> str | None:
    """One line for a file-system failure (disk full, read-only, a file in the way), naming
    the path (or the folder ``where`` it was written, when the error does not say); None for
    any other error.

    Examples
    --------
    >>> import errno
    >>> describe_os_error(OSError(errno.EROFS, "Read-only file system", "/runs/a/cells.parquet"))
    'cannot write /runs/a/cells.parquet: read-only file system; choose a writable output folder'
    >>> describe_os_error(ValueError("x")) is None
    True
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and "No space left on device" in str(exc):
        code = errno.ENOSPC  # a library's own writer (pyarrow, torch.save) wraps the OS error
    if code not in _FS_ERRNOS:
        return None
    path = getattr(exc, "filename", None) or (f"a file in {where}" if where is not None else "a file")
    reason = _FS_ERRNOS[code]
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = "free space or choose another output folder (finished work is kept: run again to resume)"
    elif code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        advice = "move it away or choose another output folder"
    else:
        advice = "choose a writable output folder"
    return f"cannot write {path}: {reason}; {advice}"
