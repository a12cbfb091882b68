"""Identifiers shared by the stages: an image's id from its path.

Kept apart from :mod:`cellbg.data` and :mod:`cellbg.synth` so that both can use it without
importing each other.
"""

from __future__ import annotations

import re

__all__ = ["image_id"]


def image_id(rel: str) -> str:
    """A readable id from a relative image path: the path without its extension, with
    separators and other characters that are unsafe in file names made ``_``.

    Parameters
    ----------
    rel : str
        The image's path relative to the dataset root.

    Returns
    -------
    str

    Examples
    --------
    >>> image_id("healthy/P01/img 1.tif")
    'healthy_P01_img_1'
    """
    stem = re.sub(r"\.[^./]+$", "", rel)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
