"""Variant spec strings: the registry of names and the parser (no torch, so that the
protocol, stats and report can validate specs without importing it).

Public API lives in :mod:`cellbg.variants`, which re-exports these.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import cast

from cellbg._checks import CellbgError, look_up_option

__all__ = ["VariantSpec", "list_variants", "parse_variant", "check_fill"]


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Def:
    kind: str  # "image" or "mask"
    params: tuple[str, ...]  # argument names; ("*color",) = 1 or more numbers
    random: bool = False
    doc: str = ""


_REGISTRY: dict[str, _Def] = {
    "original": _Def("image", (), doc="the crop as it is"),
    "only_fg": _Def("image", (), doc="the cell; background replaced by the fill"),
    "no_fg": _Def("image", (), doc="the background; the cell replaced by the fill"),
    "only_bg_b": _Def("image", (), doc="the background; the cell's bounding box filled black"),
    "only_bg_t": _Def("image", (), doc="the background; the box filled with tiles of the remaining background"),
    "mixed_same": _Def("image", (), True, "the cell on the only_bg_t of another cell of the same class"),
    "mixed_rand": _Def("image", (), True, "the cell on the only_bg_t of a cell of a random class"),
    "mixed_next": _Def("image", (), True, "the cell on the only_bg_t of a cell of the next class (y + 1) mod K"),
    "bg_color": _Def("image", ("*color",), doc="the cell on a solid colour (one value or one per channel, in [0, 1])"),
    "bg_blur": _Def("image", ("sigma",), doc="the cell on its own background, gaussian-blurred (sigma in pixels)"),
    "bg_ring": _Def("image", ("width",), doc="the cell plus a width-pixel ring of its own background; the rest filled"),
    "bg_image": _Def(
        "image",
        ("source",),
        True,
        "the cell over a background drawn (seeded) from a named source: cell-free synthetic fields, a folder, "
        "a constant",
    ),
    "context": _Def(
        "image",
        ("f",),
        doc="the crop's central window of f x its side resampled to the crop size (bilinear): "
        "the cell f^-1 times larger",
    ),
    "no_others": _Def("image", (), doc="other segmented objects in the crop replaced by the fill"),
    "mask_erode": _Def("mask", ("k",), doc="shrink the mask by k pixels (Euclidean disk)"),
    "mask_dilate": _Def("mask", ("k",), doc="grow the mask by k pixels (Euclidean disk)"),
}

#: Image variants that may also come in front, as a first step: ``no_others+mixed_rand``
#: removes the other objects from every crop of the batch (partners included), then mixes.
PREFIX_VARIANTS = ("no_others",)

_PART = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")


def list_variants() -> list[str]:
    """Names of the variants and mask perturbations, in registry order.

    Examples
    --------
    >>> list_variants()[:3]
    ['original', 'only_fg', 'no_fg']
    """
    return list(_REGISTRY)


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant spec: the mask perturbations, then one image variant.

    Attributes
    ----------
    spec : str
        Normalised spec string (``mask_erode(2)+only_fg``), usable as a name in results.
    name : str
        The image variant.
    args : tuple of float
        Its arguments.
    perturbations : tuple of (str, tuple of float)
        Mask perturbations (and ``no_others``) applied in order before the variant.
    """

    spec: str
    name: str
    args: tuple[float | str, ...] = ()
    perturbations: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def random(self) -> bool:
        """Whether the variant draws random numbers (pairings)."""
        return _REGISTRY[self.name].random


def _fmt(name: str, args: tuple[float | str, ...]) -> str:
    if not args:
        return name
    return f"{name}({','.join(a if isinstance(a, str) else f'{a:g}' for a in args)})"


_SOURCE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
#: Largest ``context(f)``: beyond the stored crop the surround is the fill, so a wider view
#: than four crops shows little but fill.
CONTEXT_MAX = 4.0


def _parse_part(part: str, spec: str) -> tuple[str, tuple[float | str, ...]]:
    m = _PART.match(part)
    if not m:
        raise CellbgError(f"cannot read variant '{part}' in spec '{spec}'; write name or name(arg, ...)")
    where = "variant" if part.strip() == spec.strip() else f"variant (in spec '{spec}')"
    name = look_up_option(m.group(1), _REGISTRY, what=where)
    raw = m.group(2)
    args: list[float] = []
    if _REGISTRY[name].params == ("source",):
        source = (raw or "").strip()
        if not _SOURCE.match(source):
            raise CellbgError(
                f"{name} in spec '{spec}' takes one background source name, e.g. {name}(synthetic) or the name of "
                f"an entry of variants.backgrounds; got '{raw or ''}'"
            )
        return name, (source,)
    if raw is not None and raw.strip():
        for a in raw.split(","):
            try:
                args.append(float(a))
            except ValueError:
                raise CellbgError(f"argument '{a.strip()}' of {name} in spec '{spec}' is not a number") from None
    params = _REGISTRY[name].params
    if params == ("*color",):
        if not args or any(not 0 <= a <= 1 or not math.isfinite(a) for a in args):
            raise CellbgError(
                f"{name} in spec '{spec}' needs one value or one per channel in [0, 1], e.g. {name}(0,0,1)"
            )
    elif len(args) != len(params):
        want = f"({', '.join(params)})" if params else "no arguments"
        raise CellbgError(f"{name} in spec '{spec}' takes {want}; got {len(args)} argument(s)")
    for p, a in zip(params, args, strict=False):  # a '*color' spec takes one value or one per channel
        if p in ("k", "width") and (a < 0 or a != int(a)):
            raise CellbgError(f"{name}({p}) in spec '{spec}' must be a whole number >= 0; got {a:g}")
        if p == "sigma" and (a < 0 or not math.isfinite(a)):
            raise CellbgError(f"{name}(sigma) in spec '{spec}' must be >= 0; got {a:g}")
        if p == "f" and not (0 < a <= CONTEXT_MAX):
            raise CellbgError(f"{name}(f) in spec '{spec}' must be in (0, {CONTEXT_MAX:g}]; got {a:g}")
    return name, tuple(args)


def parse_variant(spec: str | VariantSpec) -> VariantSpec:
    """Parse a variant spec string; unknown names get a "did you mean".

    Parameters
    ----------
    spec : str
        ``name``, ``name(arg, ...)``, mask perturbations (and ``no_others``) in front joined
        by ``+``.

    Returns
    -------
    VariantSpec

    Raises
    ------
    CellbgError
        Unknown name, wrong arguments, or a mask perturbation not in front.

    Examples
    --------
    >>> v = parse_variant("mask_erode(2) + only_fg")
    >>> v.spec, v.name, v.perturbations
    ('mask_erode(2)+only_fg', 'only_fg', (('mask_erode', (2.0,)),))
    """
    if isinstance(spec, VariantSpec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise CellbgError(f"variant spec must be a non-empty string; got {spec!r}")
    parts = [_parse_part(p, spec) for p in spec.split("+")]
    *front, (name, args) = parts
    for pname, _ in front:
        if _REGISTRY[pname].kind != "mask" and pname not in PREFIX_VARIANTS:
            raise CellbgError(
                f"in spec '{spec}' only mask perturbations (mask_erode, mask_dilate) and no_others may come before "
                f"'+'; got {pname}"
            )
    if [p for p, _ in front].count("no_others") > 1:
        raise CellbgError(f"spec '{spec}' names no_others twice")
    if _REGISTRY[name].kind != "image":
        raise CellbgError(
            f"spec '{spec}' ends with the mask perturbation {name}; put a variant after it, e.g. '{spec}+only_fg'"
        )
    text = "+".join(_fmt(n, a) for n, a in parts)
    # only mask perturbations and no_others come before '+' (checked above): their arguments are numbers
    perturbations = tuple((p, cast(tuple[float, ...], a)) for p, a in front)
    return VariantSpec(text, name, args, perturbations)


def check_fill(fill) -> str:
    """Validate a protocol's ``variants.fill`` string: black, mean, noise or 'r,g,b' in [0, 1]."""
    key = str(fill).strip().lower()
    if key in ("black", "mean", "noise"):
        return key
    try:
        values = [float(v) for v in key.split(",")]
    except ValueError:
        raise CellbgError(
            f"fill must be 'black', 'mean', 'noise' or a colour 'r,g,b' in [0, 1]; got '{fill}'"
        ) from None
    if any(not 0 <= v <= 1 for v in values):
        raise CellbgError(f"fill colour values must be in [0, 1]; got '{fill}'")
    return key
