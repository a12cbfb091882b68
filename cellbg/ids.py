"""Identifiers shared by the stages: an image's id from its path.

Kept apart from :mod:`cellbg.data` and :mod:`cellbg.synth` so that both can use it without
importing each other.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

__all__ = ["image_id", "unique_image_ids"]


def image_id(rel: str) -> str:
    """A readable id from a relative image path: the path without its extension, with
    separators and other characters that are unsafe in file names made ``_``.

    Letters and digits of any script are kept (``Zelle ä`` and ``Zelle ö`` stay apart), in
    Unicode normal form NFC so that a name typed on one system and listed on another match.

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
    >>> image_id("sick/Zelle ä.tif")
    'sick_Zelle_ä'
    """
    stem = re.sub(r"\.[^./]+$", "", unicodedata.normalize("NFC", rel))
    return re.sub(r"[^\w-]+", "_", stem).strip("_")


def unique_image_ids(rels: Iterable[str]) -> list[str]:
    """:func:`image_id` of each path, made unique: ids that two paths share get a suffix.

    Different paths can map to one id (``a b.tif`` and ``a_b.tif``, ``x.tif`` and
    ``x.png``); each of those gets ``-`` and 8 hex digits of a BLAKE2b hash of its own path,
    so ids stay readable, unique, and independent of the order the files are listed in.

    Examples
    --------
    >>> unique_image_ids(["a b.tif", "a_b.tif", "c.tif"])
    ['a_b-b1acb57c', 'a_b-483dd2de', 'c']
    """
    rels = [str(r) for r in rels]
    ids = [image_id(r) for r in rels]
    counts = Counter(ids)
    return [
        f"{i}-{hashlib.blake2b(r.encode('utf-8', 'surrogateescape'), digest_size=4).hexdigest()}"
        if counts[i] > 1
        else i
        for i, r in zip(ids, rels, strict=True)
    ]
