"""Attribution maps and the background share of attribution.

Accuracy differences between background variants say *that* a model uses the background;
an attribution map says *where* it looks. This module turns the maps into one number per
cell that can be tested like accuracy: the **background share**, the fraction of a map's
positive attribution that falls on background pixels, and its ratio to the background's
share of the crop's area (1 = the model looks at the background exactly as much as its area
predicts; above 1 = more).

Three attribution methods, all on batches and all for an explicit target class:

``gradcam``
    Grad-CAM (Selvaraju et al. 2017) through :class:`monai.visualize.GradCAM` on the layer
    the model names (:func:`cellbg.models.target_layer`), bilinearly upsampled, not rescaled.
``occlusion``
    Occlusion sensitivity through :class:`monai.visualize.OcclusionSensitivity`: the drop of
    the target-class probability when a window of the crop is filled with ``fill`` (positive =
    the window supports the class). The occluded copies of a crop run in batches.
``integrated_gradients``
    Integrated gradients (Sundararajan et al. 2017) from Captum, summed over channels, from
    a uniform baseline image; in a run the baseline is the run's median background colour
    (:func:`background_colour`), an empty field, not black (see ``docs/saliency.md``).

A built-in sanity check (Adebayo et al. 2018) recomputes every map with the same
architecture and re-randomised weights (:func:`randomize_weights`) and records the Spearman
rank correlation of the two maps (:func:`rank_correlation`): a map that barely changes when
the weights are destroyed says nothing about what the model learned.

:func:`run_saliency` applies all of this to the trained jobs of a protocol, one
:func:`saliency_job` per trained model and test variant, and :func:`collect_saliency`
writes ``<run>/saliency.zarr`` and ``<run>/saliency.parquet``; :func:`write_montage` draws crops
with their maps for the report.

Examples
--------
>>> import numpy as np
>>> maps = np.ones((1, 4, 4)); masks = np.zeros((1, 4, 4), bool); masks[0, :2] = True
>>> bs = background_share(maps, masks)
>>> float(bs.share[0]), float(bs.ratio[0])
(0.5, 1.0)
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from cellbg._checks import CellbgError, check_nd, did_you_mean, look_up_option

if TYPE_CHECKING:
    from cellbg.variants import VariantResult

__all__ = [
    "METHODS",
    "BackgroundShare",
    "background_share",
    "gradcam",
    "occlusion",
    "integrated_gradients",
    "attribute",
    "background_colour",
    "randomize_weights",
    "rank_correlation",
    "sample_cells",
    "held_out_variant",
    "saliency_job",
    "collect_saliency",
    "run_saliency",
    "load_saliency",
    "montage",
    "write_montage",
]

#: The attribution methods, in the order they are computed and reported.
METHODS = ("gradcam", "occlusion", "integrated_gradients")


# --------------------------------------------------------------------------- background share
@dataclass(frozen=True)
class BackgroundShare:
    """Background share of positive attribution, per map.

    Attributes
    ----------
    share : (n,) ndarray of float64
        Positive attribution on background pixels / total positive attribution; NaN where a
        map has no positive attribution.
    background_fraction : (n,) ndarray of float64
        Background pixels / all pixels of the crop.
    ratio : (n,) ndarray of float64
        ``share / background_fraction``: 1 = as much attribution on the background as its
        area predicts; NaN where the share is NaN or the crop has no background.
    """

    share: np.ndarray
    background_fraction: np.ndarray
    ratio: np.ndarray

    def __iter__(self):
        return iter((self.share, self.background_fraction, self.ratio))


def background_share(maps, masks) -> BackgroundShare:
    """The fraction of each map's positive attribution that lies on the background.

    Parameters
    ----------
    maps : (n, M, N) or (M, N) array_like of float
        Attribution maps; larger = more evidence for the target class. Negative values
        (evidence against the class) are ignored.
    masks : same shape as ``maps``, bool
        The cell (foreground) of each crop; ``False`` pixels are background (other cells in
        the crop count as background).

    Returns
    -------
    BackgroundShare
        ``share``, ``background_fraction`` and ``ratio``, each of shape ``(n,)`` (``(1,)``
        for a single map).

    Raises
    ------
    CellbgError
        Shapes differ, masks are not boolean, or maps hold NaN or infinite values.

    Examples
    --------
    A map that is positive only on the background, with a background of a quarter of the
    crop, puts all its attribution there: share 1, ratio 4.

    >>> import numpy as np
    >>> masks = np.ones((4, 4), bool); masks[:2, :2] = False
    >>> maps = np.where(masks, -1.0, 2.0)
    >>> bs = background_share(maps, masks)
    >>> float(bs.share[0]), float(bs.ratio[0])
    (1.0, 4.0)
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    check_nd(maps, (2, 3), arg_name="maps")
    if maps.shape != masks.shape:
        raise CellbgError(f"masks shape {masks.shape} does not match maps shape {maps.shape}")
    if masks.dtype != bool:
        if masks.size and not np.isin(masks, (0, 1)).all():
            raise CellbgError(
                f"masks must be boolean (cell = True); got dtype {masks.dtype} with values other than 0/1"
            )
        masks = masks.astype(bool)
    if not np.isfinite(maps).all():
        raise CellbgError("maps hold NaN or infinite values; attribution maps must be finite")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    positive = np.clip(maps, 0.0, None).reshape(len(maps), -1)
    background = ~masks.reshape(len(masks), -1)
    total = positive.sum(axis=1)
    on_background = (positive * background).sum(axis=1)
    fraction = background.mean(axis=1) if background.shape[1] else np.full(len(maps), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, on_background / np.where(total > 0, total, 1.0), np.nan)
        ratio = np.where(fraction > 0, share / np.where(fraction > 0, fraction, 1.0), np.nan)
    return BackgroundShare(share=share, background_fraction=fraction, ratio=ratio)


# --------------------------------------------------------------------------- inputs
def _as_batch(images):
    """(n, C, H, W) float32 tensor from numpy or torch input."""
    import torch

    check_nd(images, 4, arg_name="images")
    if isinstance(images, torch.Tensor):
        return images.detach().float()
    return torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)


def _as_targets(targets, n: int, num_classes: int):
    """(n,) int64 tensor of class indices, checked against the batch and the classes."""
    import torch

    if targets is None:
        raise CellbgError("targets must be given explicitly (the predicted or the true class of each image)")
    t = np.asarray(targets.detach().cpu() if isinstance(targets, torch.Tensor) else targets)
    if t.ndim == 0:
        t = np.full(n, int(t))
    if t.shape != (n,):
        raise CellbgError(f"targets must have shape ({n},), one class per image; got shape {t.shape}")
    if t.size and (not np.issubdtype(t.dtype, np.integer) or t.min() < 0 or t.max() >= num_classes):
        raise CellbgError(
            f"targets must be class indices in [0, {num_classes - 1}]; got values {np.unique(t)[:10].tolist()}"
        )
    return torch.as_tensor(t.astype(np.int64))


def _class_logits(model):
    """Wrap ``model`` so that it always returns ``(n, K)`` logits with ``K >= 2``.

    A single-logit binary model (output ``(n,)`` or ``(n, 1)``, sigmoid of class 1) becomes
    ``[-z/2, z/2]``: its softmax equals ``[1 - sigmoid(z), sigmoid(z)]``, so class 0 gets the
    evidence ``-z`` (halved) instead of a constant without gradient.
    """
    import torch
    from torch import nn

    class ClassLogits(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            if out.ndim == 1:
                out = out[:, None]
            if out.ndim != 2:
                raise CellbgError(f"model output must be (n, classes) logits; got shape {tuple(out.shape)}")
            if out.shape[1] == 1:
                half = out / 2
                out = torch.cat([-half, half], dim=1)
            return out

    return ClassLogits(model)


def _num_classes(wrapped, x) -> int:
    import torch

    with torch.no_grad():
        return int(wrapped(x[:1]).shape[1])


class _EvalCopy:
    """Context manager: a deep copy of the model in eval mode on the input's device.

    A copy because MONAI registers hooks that cannot be removed and switches off in-place
    activations, and because the caller's model must keep its mode and gradients.
    """

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        net = copy.deepcopy(self.model).eval()
        for p in net.parameters():
            p.requires_grad_(True)
        return _class_logits(net).eval()

    def __exit__(self, *exc):
        return False


def _device_of(model):
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _check_model(model) -> None:
    from torch import nn

    if not isinstance(model, nn.Module):
        raise CellbgError(f"model must be a torch.nn.Module; got {type(model).__name__}")


# --------------------------------------------------------------------------- methods
def _check_layer(model, layer: str) -> None:
    names = [name for name, _ in model.named_modules() if name]
    if layer not in names:
        raise CellbgError(
            f"target layer '{layer}' is not a layer of {type(model).__name__}{did_you_mean(layer, names)}; "
            f"valid layers: {', '.join(names)}"
        )


def gradcam(model, images, targets, *, layer: str | None = None, batch_size: int = 64) -> np.ndarray:
    """Grad-CAM maps for an explicit target class per image (MONAI ``GradCAM``).

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning ``(n, K)`` logits, or ``(n, 1)`` / ``(n,)`` for a single-logit
        binary model. It is used in eval mode on a copy; the caller's model is not changed.
    images : (n, C, H, W) ndarray or torch.Tensor
        The crops, as the model sees them.
    targets : (n,) array_like of int
        The class each map explains (for example the predicted or the true class).
    layer : str, optional
        The module whose feature map is weighted, a name from ``model.named_modules()``.
        Default: :func:`cellbg.models.target_layer` of the model.
    batch_size : int, optional
        Images per forward/backward pass.

    Returns
    -------
    (n, H, W) ndarray of float32
        Non-negative maps, bilinearly upsampled to the crop, not rescaled (so maps of one
        model are comparable).

    Raises
    ------
    CellbgError
        An unknown layer (the message lists the valid names), a layer without a spatial
        feature map, or bad images or targets.

    Examples
    --------
    >>> import torch
    >>> from cellbg.models import get_model
    >>> net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    >>> gradcam(net, torch.rand(2, 1, 32, 32), [0, 1]).shape
    (2, 32, 32)
    """
    import torch
    from monai.visualize import GradCAM

    _check_model(model)
    if layer is None:
        from cellbg.models import target_layer

        layer = target_layer(model)
    _check_layer(model, layer)
    # An input that requires grad lets the layer's full backward hook fire as documented.
    x = _as_batch(images).to(_device_of(model)).requires_grad_(True)
    out = np.zeros((x.shape[0], *x.shape[2:]), dtype=np.float32)
    if x.shape[0] == 0:
        return out
    with _EvalCopy(model) as wrapped:
        t = _as_targets(targets, x.shape[0], _num_classes(wrapped, x))
        _check_spatial_layer(wrapped, f"net.{layer}", x)
        # MONAI scores ``logits[:, class_idx]`` with one class for the batch, so each target
        # class is its own batch; the identity post-processing keeps the raw (ReLU'd) scale.
        cam = GradCAM(nn_module=wrapped, target_layers=f"net.{layer}", postprocessing=lambda m: m)
        for cls in torch.unique(t).tolist():
            idx = torch.nonzero(t == cls).flatten()
            for chunk in idx.split(batch_size):
                with torch.enable_grad():
                    maps = cam(x[chunk], class_idx=int(cls))
                out[chunk.cpu().numpy()] = maps[:, 0].detach().cpu().numpy()
    return out


def _check_spatial_layer(wrapped, name: str, x) -> None:
    """Raise unless the named layer outputs an ``(n, C, h, w)`` feature map."""
    import torch

    module = dict(wrapped.named_modules())[name]
    shapes = []
    handle = module.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            wrapped(x[:1])
    finally:
        handle.remove()
    if not shapes or len(shapes[0]) != 4:
        got = shapes[0] if shapes else "no output (the layer is not used in forward)"
        raise CellbgError(f"Grad-CAM needs a layer with an (n, C, h, w) feature map; layer '{name[4:]}' gives {got}")


def occlusion(
    model,
    images,
    targets,
    *,
    window: int = 8,
    overlap: float = 0.0,
    fill: float | str = 0.0,
    batch_size: int = 64,
) -> np.ndarray:
    """Occlusion-sensitivity maps (MONAI ``OcclusionSensitivity``) for a target class.

    Each window of the crop is filled in turn; the map is the target-class probability of
    the intact crop minus that of the occluded one, averaged over the windows covering a
    pixel. Positive = the region supports the target class.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier (see :func:`gradcam`), used in eval mode on a copy.
    images : (n, C, H, W) ndarray or torch.Tensor
    targets : (n,) array_like of int
        The class each map explains.
    window : int, optional
        Side of the occluding square in pixels.
    overlap : float, optional
        Overlap of neighbouring windows in [0, 1); 0 tiles the crop (fastest).
    fill : float, (C,) array_like or {'mean_img', 'mean_patch', 'gaussian'}, optional
        Value written into the window (0 = black), one value per channel (a colour, e.g.
        :func:`background_colour`: the window becomes empty background), or a MONAI mode.
    batch_size : int, optional
        Occluded copies per forward pass.

    Returns
    -------
    (n, H, W) ndarray of float32

    Examples
    --------
    >>> import torch
    >>> from cellbg.models import get_model
    >>> net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    >>> occlusion(net, torch.rand(1, 1, 16, 16), [1], window=8).shape
    (1, 16, 16)
    """
    import torch
    from monai.visualize import OcclusionSensitivity

    _check_model(model)
    if not isinstance(window, int | np.integer) or window < 1:
        raise CellbgError(f"window must be a positive integer number of pixels; got {window!r}")
    if not 0 <= overlap < 1:
        raise CellbgError(f"overlap must be in [0, 1); got {overlap!r}")
    x = _as_batch(images).to(_device_of(model))
    shift = None
    if isinstance(fill, str):
        fill = look_up_option(fill, ("mean_img", "mean_patch", "gaussian"), what="occlusion fill")
    elif np.ndim(fill) == 0:
        fill = float(fill)
    else:
        # A colour: MONAI fills with one number (its callable modes fail in 1.6), so the
        # model sees x - colour + colour and the window is filled with 0 in shifted space.
        shift = _as_baseline(fill, x[:1])[:1]
        fill = 0.0
    n, _, h, w = x.shape
    if n and (window > h or window > w):
        raise CellbgError(f"occlusion window {window} is larger than the crop ({h} x {w}); use a smaller window")
    out = np.zeros((n, h, w), dtype=np.float32)
    if n == 0:
        return out
    with _EvalCopy(model) as wrapped, torch.no_grad():
        t = _as_targets(targets, n, _num_classes(wrapped, x))
        if shift is not None:
            wrapped, x = _Shifted(wrapped, shift), x - shift
        intact = torch.cat([wrapped(chunk).softmax(1) for chunk in x.split(batch_size)])
        # ``activate`` as a callable: MONAI's own choice (sigmoid vs softmax) looks at the
        # image's channel count, not at the number of classes.
        occ = OcclusionSensitivity(
            nn_module=wrapped,
            mask_size=window,
            n_batch=batch_size,
            verbose=False,
            mode=fill,
            overlap=overlap,
            activate=lambda logits: logits.softmax(1),
        )
        for i in range(n):
            with warnings.catch_warnings():
                # MONAI 1.6 indexes with lists; torch warns about it on every window batch.
                warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
                probs, _ = occ(x[i : i + 1])
            cls = int(t[i])
            out[i] = (intact[i, cls] - probs[0, cls]).cpu().numpy()
    return out


def _Shifted(net, shift):
    """``net(x + shift)``: lets MONAI's constant-0 occlusion fill with a colour."""
    from torch import nn

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("shift", shift)

        def forward(self, x):
            return self.net(x + self.shift)

    return Shifted().eval()


def integrated_gradients(model, images, targets, *, steps: int = 8, baseline=0.0, batch_size: int = 64) -> np.ndarray:
    """Integrated-gradients maps (Captum ``IntegratedGradients``) for a target class.

    Attribution of each pixel, summed over channels, along the straight path from a constant
    ``baseline`` image to the crop (Gauss-Legendre quadrature with ``steps`` points).

    Parameters
    ----------
    model : torch.nn.Module
        A classifier (see :func:`gradcam`), used in eval mode on a copy.
    images : (n, C, H, W) ndarray or torch.Tensor
    targets : (n,) array_like of int
    steps : int, optional
        Points on the integration path (>= 2).
    baseline : float, (C,) array_like or (n, C, H, W) array_like, optional
        The reference image: one value, one value per channel (a uniform colour, e.g.
        :func:`background_colour`), or one image per crop. The attribution of a pixel is
        zero where the crop equals the baseline, so the baseline decides what counts as
        "nothing": black suits dark-field images, a brightfield background colour suits
        brightfield ones.
    batch_size : int, optional
        Path images per forward/backward pass.

    Returns
    -------
    (n, H, W) ndarray of float32
        Signed maps; they sum (over pixels) to about logit(crop) - logit(baseline) of the
        target class (completeness).

    Examples
    --------
    >>> import torch
    >>> from cellbg.models import get_model
    >>> net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    >>> integrated_gradients(net, torch.rand(2, 1, 16, 16), [1, 0], steps=4).shape
    (2, 16, 16)
    """
    import torch
    from captum.attr import IntegratedGradients

    _check_model(model)
    if not isinstance(steps, int | np.integer) or steps < 2:
        raise CellbgError(f"steps must be an integer >= 2; got {steps!r}")
    x = _as_batch(images).to(_device_of(model))
    n = x.shape[0]
    out = np.zeros((n, *x.shape[2:]), dtype=np.float32)
    if n == 0:
        return out
    base = _as_baseline(baseline, x)
    with _EvalCopy(model) as wrapped:
        t = _as_targets(targets, n, _num_classes(wrapped, x)).to(x.device)
        ig = IntegratedGradients(wrapped)
        per_chunk = max(1, batch_size // steps)
        for start in range(0, n, per_chunk):
            sl = slice(start, start + per_chunk)
            with torch.enable_grad():
                attr = ig.attribute(
                    x[sl], baselines=base[sl], target=t[sl], n_steps=int(steps), internal_batch_size=batch_size
                )
            out[sl] = attr.sum(dim=1).detach().cpu().numpy()
    return out


def _as_baseline(baseline, x):
    """The baseline as an (n, C, H, W) tensor like ``x``."""
    import torch

    b = torch.as_tensor(np.asarray(baseline, dtype=np.float32), device=x.device)
    n, c = x.shape[:2]
    if b.ndim == 0:
        return torch.full_like(x, float(b))
    if b.shape == (c,):
        return b.view(1, c, 1, 1).expand_as(x).contiguous()
    if tuple(b.shape) == tuple(x.shape):
        return b
    raise CellbgError(
        f"baseline must be a number, one value per channel ({c},) or one image per crop {tuple(x.shape)}; "
        f"got shape {tuple(b.shape)}"
    )


def background_colour(images, masks, *, max_crops: int = 512) -> np.ndarray:
    """Median colour of the background pixels of a set of crops, per channel.

    The integrated-gradients baseline of a run: a uniform field of this colour is an
    "empty" crop of the dataset (white-ish in brightfield, dark in fluorescence).

    Parameters
    ----------
    images : (n, C, H, W) array_like
    masks : (n, H, W) bool
        Cells; the other pixels are background.
    max_crops : int, optional
        Use at most this many crops, evenly spaced (the median is stable long before).

    Returns
    -------
    (C,) ndarray of float32
        Zeros when there are no background pixels.

    Examples
    --------
    >>> import numpy as np
    >>> images = np.ones((2, 3, 4, 4)) * np.array([0.9, 0.8, 0.7])[:, None, None]
    >>> masks = np.zeros((2, 4, 4), bool); masks[:, 1:3, 1:3] = True
    >>> [round(float(v), 2) for v in background_colour(images, masks)]
    [0.9, 0.8, 0.7]
    """
    check_nd(images, 4, arg_name="images")
    n = len(images)
    if tuple(np.shape(masks)) != (n, *np.shape(images)[2:]):
        raise CellbgError(f"masks shape {np.shape(masks)} does not match images shape {np.shape(images)}")
    take = np.unique(np.linspace(0, n - 1, min(n, max_crops)).round().astype(int)) if n else np.zeros(0, int)
    pixels = np.moveaxis(_take_rows(images, take, np.float32), 1, -1)[~_take_rows(masks, take, bool)]
    if not len(pixels):
        return np.zeros(np.shape(images)[1], np.float32)
    return np.median(pixels, axis=0).astype(np.float32)


def attribute(model, images, targets, *, method: str, **options) -> np.ndarray:
    """Attribution maps by method name: ``gradcam``, ``occlusion`` or ``integrated_gradients``.

    Examples
    --------
    >>> import torch
    >>> from cellbg.models import get_model
    >>> net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    >>> attribute(net, torch.rand(1, 1, 16, 16), [0], method="gradcam").shape
    (1, 16, 16)
    """
    method = look_up_option(method, METHODS, what="saliency method")
    methods: dict[str, Callable[..., np.ndarray]] = {
        "gradcam": gradcam,
        "occlusion": occlusion,
        "integrated_gradients": integrated_gradients,
    }
    return methods[method](model, images, targets, **options)


# --------------------------------------------------------------------------- sanity check
def randomize_weights(model, *, seed: int = 0):
    """A copy of ``model`` with every weight re-drawn from a seeded generator.

    Convolutions and linear layers get PyTorch's default initialisation (Kaiming-uniform
    weights, uniform biases), normalisation layers the identity (weight 1, bias 0, running
    mean 0 and variance 1), any other parameter N(0, 0.02). The architecture and layer names
    stay, so the same target layer can be hooked (Adebayo et al. 2018, model randomisation).

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(3, 2)
    >>> a = randomize_weights(net, seed=1); b = randomize_weights(net, seed=1)
    >>> bool(torch.equal(a.weight, b.weight)), bool(torch.equal(a.weight, net.weight))
    (True, False)
    """
    import torch
    from torch import nn

    _check_model(model)
    rng = torch.Generator().manual_seed(int(seed))
    net = copy.deepcopy(model)
    done: set[int] = set()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                weight = module.weight
                new = torch.empty(weight.shape, dtype=weight.dtype)
                nn.init.kaiming_uniform_(new, a=math.sqrt(5), generator=rng)
                weight.copy_(new)
                done.add(id(weight))
                if module.bias is not None:
                    fan_in = weight[0].numel()
                    bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
                    new = torch.empty(module.bias.shape, dtype=module.bias.dtype)
                    module.bias.copy_(nn.init.uniform_(new, -bound, bound, generator=rng))
                    done.add(id(module.bias))
            elif isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
                if getattr(module, "weight", None) is not None:
                    module.weight.fill_(1.0)
                    done.add(id(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                    done.add(id(module.bias))
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                    module.reset_running_stats()
        for p in net.parameters():
            if id(p) not in done:
                new = torch.empty(p.shape, dtype=p.dtype)
                p.copy_(nn.init.normal_(new, 0.0, 0.02, generator=rng))
    return net


def rank_correlation(maps_a, maps_b) -> np.ndarray:
    """Spearman rank correlation of each pair of maps (pixels as observations).

    Parameters
    ----------
    maps_a, maps_b : (n, M, N) array_like
        Two sets of maps, pairs aligned on the first axis.

    Returns
    -------
    (n,) ndarray of float64
        NaN where either map is constant (Grad-CAM of a random model is often all zero).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.arange(16.0).reshape(1, 4, 4)
    >>> rank_correlation(a, a**2).tolist(), rank_correlation(a, -a).tolist()
    ([1.0], [-1.0])
    """
    from scipy.stats import rankdata

    a = np.asarray(maps_a, dtype=np.float64)
    b = np.asarray(maps_b, dtype=np.float64)
    if a.shape != b.shape:
        raise CellbgError(f"maps_b shape {b.shape} does not match maps_a shape {a.shape}")
    check_nd(a, 3, arg_name="maps_a")
    ra = rankdata(a.reshape(len(a), -1), axis=1)
    rb = rankdata(b.reshape(len(b), -1), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(axis=1) / np.where(denom > 0, denom, 1.0), np.nan)


# --------------------------------------------------------------------------- sampling
def sample_cells(cells, n: int, *, seed: int = 0) -> np.ndarray:
    """Row positions of up to ``n`` cells, spread evenly over patients, in a seeded order.

    Cells are shuffled with ``numpy.random.default_rng(seed)`` and taken round-robin over
    patients (the first cell of every patient, then the second, ...), so that a
    patient-level test has cells from every patient.

    Parameters
    ----------
    cells : DataFrame
        With a ``patient_id`` column.
    n : int
        Cells to take (all of them when there are fewer).
    seed : int

    Returns
    -------
    (min(n, len(cells)),) ndarray of int
        Positions in ``cells``, sorted.

    Examples
    --------
    >>> import pandas as pd
    >>> cells = pd.DataFrame({"patient_id": ["a"] * 6 + ["b"] * 2})
    >>> sorted(cells.patient_id.iloc[sample_cells(cells, 4, seed=0)])
    ['a', 'a', 'b', 'b']
    """
    import pandas as pd

    if n < 1:
        raise CellbgError(f"n must be a positive number of cells; got {n!r}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(cells))
    patients = pd.Series(cells["patient_id"].to_numpy()[order])
    rank = patients.groupby(patients, sort=False).cumcount().to_numpy()
    chosen = order[np.lexsort((np.arange(len(order)), rank))[:n]]
    return np.sort(chosen)


# --------------------------------------------------------------------------- whole runs
_COLUMNS = [
    "cell_id",
    "patient_id",
    "label",
    "label_index",
    "model",
    "train_variant",
    "test_variant",
    "seed",
    "fold",
    "method",
    "target",
    "target_index",
    "pred_index",
    "correct",
    "background_share",
    "background_ratio",
    "background_fraction",
    "sanity_rank_corr",
    "map_index",
    "job_key",
    "partner_cell_id",
    "shown_index",
]


def _reference(name: str, colour) -> float | np.ndarray:
    """A named reference colour: 'black', 'white' or the run's 'background' colour."""
    return {"black": 0.0, "white": 1.0}.get(name, colour)


def _method_options(cfg, method: str, *, colour=0.0) -> dict:
    if method == "occlusion":
        return {
            "window": cfg.occlusion_window,
            "overlap": cfg.occlusion_overlap,
            "batch_size": cfg.batch_size,
            "fill": _reference(cfg.occlusion_fill, colour),
        }
    if method == "integrated_gradients":
        return {"steps": cfg.ig_steps, "batch_size": cfg.batch_size, "baseline": _reference(cfg.ig_baseline, colour)}
    return {"batch_size": cfg.batch_size}


def _job_cells(job_dir: Path, cells) -> np.ndarray:
    """Crop rows of a training job's held-out cells (its test fold, from ``spec.json``), in
    store order: the order its prediction jobs predicted them (:func:`cellbg.train.run_prediction`)."""
    import json

    try:
        fold = int(json.loads((Path(job_dir) / "spec.json").read_text(encoding="utf-8"))["job"]["fold"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CellbgError(f"{job_dir}: no readable spec.json naming the job's fold; run 'cellbg train' again") from None
    return np.flatnonzero(cells["fold"].to_numpy() == fold)


def _job_maps(model, images, masks, rows, pred, *, cfg, layer: str, random_model, colour) -> dict:
    """Maps and background shares of one job's sampled cells for every method and target."""
    targets = {"predicted": pred, "true": rows["label_index"].to_numpy(np.int64)}
    kinds = ["predicted", "true"] if cfg.target == "both" else [cfg.target]
    # One map per distinct (cell, class): when the prediction is right both targets share it.
    cell = np.concatenate([np.arange(len(rows)) for _ in kinds])
    cls = np.concatenate([targets[k] for k in kinds])
    pairs, inverse = np.unique(np.stack([cell, cls], axis=1), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = {}
    for method in cfg.methods:
        options = _method_options(cfg, method, colour=colour)
        if method == "gradcam":
            options["layer"] = layer
        maps = attribute(model, images[pairs[:, 0]], pairs[:, 1], method=method, **options)
        if random_model is not None:
            random_maps = attribute(random_model, images[pairs[:, 0]], pairs[:, 1], method=method, **options)
            corr = rank_correlation(maps, random_maps)
        else:
            random_maps, corr = None, np.full(len(pairs), np.nan)
        bs = background_share(maps, masks[pairs[:, 0]])
        out[method] = {
            "kinds": kinds,
            "cell": cell,
            "cls": cls,
            "inverse": inverse,
            "maps": maps,
            "random_maps": random_maps,
            "share": bs.share,
            "ratio": bs.ratio,
            "fraction": bs.background_fraction,
            "corr": corr,
        }
    return out


def _take_rows(array, rows: np.ndarray, dtype) -> np.ndarray:
    """``array[rows]`` for a numpy array or a lazy store array (read sorted, put back in order)."""
    if not hasattr(array, "oindex"):  # in memory
        return np.asarray(np.asarray(array)[rows], dtype=dtype)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype)
    out[order] = np.asarray(array.oindex[rows[order]], dtype=dtype)  # zarr reads sorted rows fastest
    return out


def _variant_blocks(
    protocol, rows, variant: str, *, images, masks, cells, others, backgrounds, positions=None
) -> VariantResult:
    """The variant of ``rows`` (a held-out set, in prediction order) as its prediction job made it.

    Block ``j`` is ``rows[j * PREDICT_BLOCK:(j + 1) * PREDICT_BLOCK]`` with seed
    ``variants.seed + j`` (:func:`cellbg.train.run_prediction`). With ``positions`` (indices
    into ``rows``) only the blocks holding them are read and varied, so memory is one block
    however large the held-out set; the result then holds those positions, in that order,
    with ``partner`` still an index into ``rows``.
    """
    from cellbg.planning import PREDICT_BLOCK
    from cellbg.variants import VariantResult, apply_variant

    rows = np.asarray(rows, np.int64)
    bboxes = cells[["bbox_r0", "bbox_c0", "bbox_r1", "bbox_c1"]].to_numpy(np.int64)
    labels = cells["label_index"].to_numpy(np.int64)
    if positions is None:
        blocks = list(range(max(1, -(-len(rows) // PREDICT_BLOCK))))
    else:
        positions = np.asarray(positions, np.int64)
        blocks = sorted({int(b) for b in positions // PREDICT_BLOCK})
    parts, where = [], []
    for j in blocks:
        block = rows[j * PREDICT_BLOCK : (j + 1) * PREDICT_BLOCK]
        r = apply_variant(
            variant,
            _take_rows(images, block, np.float32),
            _take_rows(masks, block, bool),
            bboxes=bboxes[block],
            labels=labels[block],
            fill=protocol.variants.fill,
            seed=protocol.variants.seed + j,
            reference=protocol.variants.reference,
            others=_take_rows(others, block, bool) if others is not None else None,
            backgrounds=backgrounds or None,
            others_fill=protocol.variants.others_fill,
        )
        partner = np.asarray(r.partner)
        partner = np.where(partner >= 0, partner + j * PREDICT_BLOCK, -1)
        background = None if r.background is None else np.asarray(r.background)
        if positions is None:
            take = np.arange(len(block))
        else:
            take = positions[positions // PREDICT_BLOCK == j] - j * PREDICT_BLOCK
            where.append(np.flatnonzero(positions // PREDICT_BLOCK == j))
        parts.append(
            VariantResult(
                np.asarray(r.images)[take],
                np.asarray(r.masks)[take],
                partner[take],
                r.spec,
                background=None if background is None else background[take],
            )
        )
    if len(parts) == 1 and positions is None:
        return parts[0]
    if not parts:  # positions given, but none
        size = (0, *images.shape[1:])
        return VariantResult(np.zeros(size, np.float32), np.zeros((0, *masks.shape[1:]), bool), np.zeros(0, np.int64))
    order = np.argsort(np.concatenate(where), kind="stable") if positions is not None else slice(None)
    return VariantResult(
        np.concatenate([p.images for p in parts])[order],
        np.concatenate([p.masks for p in parts])[order],
        np.concatenate([p.partner for p in parts])[order],
        parts[0].spec,
        background=None if parts[0].background is None else np.concatenate([p.background for p in parts])[order],
    )


def held_out_variant(
    protocol,
    job_dir,
    variant: str,
    *,
    images=None,
    masks=None,
    cells=None,
    others=None,
    backgrounds=None,
    block: int | None = None,
):
    """A trained job's held-out cells in one test variant, exactly as the job predicted them.

    The variant is applied to the job's held-out set in the order its predictions were made,
    block by block (:data:`cellbg.planning.PREDICT_BLOCK` cells, block ``j`` with seed
    ``variants.seed + j``), with the protocol's fill, as :func:`cellbg.train.run_prediction`
    does: the ``mixed_*`` variants draw their partners from the block, so the images (and
    partners) are the ones the model saw.

    Parameters
    ----------
    protocol : Protocol
        The run's protocol (its ``variants.fill`` and ``variants.seed`` are used).
    job_dir : str or Path
        A finished training job folder (``<run>/jobs/<key>``).
    variant : str
        A test variant, e.g. ``"mixed_rand"``.
    images, masks, cells : optional
        The run's crops (:func:`cellbg.crops.load_crops`, in memory or lazy); read lazily
        from the run when omitted.
    others : (n, S, S) bool, optional
        The run's other-object masks (:func:`cellbg.crops.load_others`); read when the crops are.
    backgrounds : dict, optional
        Background pools for ``bg_image`` (:func:`cellbg.variants.protocol_backgrounds`);
        drawn from the protocol when omitted.
    block : int, optional
        Only this prediction block: positions ``block * PREDICT_BLOCK`` up to the next block
        of ``rows`` (memory of one block, however large the held-out set; a viewer showing
        one cell needs no more).

    Returns
    -------
    rows : (h,) ndarray of int
        Crop rows of the held-out cells, in prediction order (all of them, with ``block`` too).
    shown : VariantResult
        ``images`` (h, C, S, S) float32, ``masks`` (h, S, S) and ``partner`` (h,) (an index into
        ``rows``; -1 unless the variant is a ``mixed_*`` one); with ``block``, those of the
        block's positions only.
    """
    from cellbg.crops import load_crops, load_others
    from cellbg.variants import protocol_backgrounds

    job_dir = Path(job_dir)
    if images is None or masks is None or cells is None:
        images, masks, cells = load_crops(job_dir.parent.parent, lazy=True)
        others = load_others(job_dir.parent.parent, lazy=True)
    if backgrounds is None:
        backgrounds = protocol_backgrounds(
            protocol, [variant], size=int(images.shape[-1]), channels=int(images.shape[1])
        )
    rows = _job_cells(job_dir, cells)
    positions = None
    if block is not None:
        from cellbg.planning import PREDICT_BLOCK

        if not 0 <= block < max(1, -(-len(rows) // PREDICT_BLOCK)):
            raise CellbgError(f"block {block} is not a prediction block of {job_dir}'s {len(rows)} held-out cells")
        positions = np.arange(block * PREDICT_BLOCK, min((block + 1) * PREDICT_BLOCK, len(rows)))
    shown = _variant_blocks(
        protocol,
        rows,
        variant,
        images=images,
        masks=masks,
        cells=cells,
        others=others,
        backgrounds=backgrounds,
        positions=positions,
    )
    return rows, shown


@dataclass
class _RunCrops:
    """A run's crops, read lazily, and what every saliency job of the run shares."""

    images: Any  # ScaledImages (lazy)
    masks: Any  # zarr array
    cells: Any  # DataFrame
    others: Any  # zarr array or None
    colour: np.ndarray


_RUN_CROPS: dict[tuple[str, str], _RunCrops] = {}


def _run_crops(run_dir: Path) -> _RunCrops:
    """The run's lazy crops and background colour, kept per worker process for the next job."""
    from cellbg.crops import load_crops, load_others
    from cellbg.planning import crops_fingerprint

    cache_key = (str(Path(run_dir).resolve()), crops_fingerprint(run_dir))
    if cache_key not in _RUN_CROPS:
        images, masks, cells = load_crops(run_dir, lazy=True)
        _RUN_CROPS.clear()
        _RUN_CROPS[cache_key] = _RunCrops(
            images, masks, cells, load_others(run_dir, lazy=True), background_colour(images, masks)
        )
    return _RUN_CROPS[cache_key]


def _map_job(protocol, spec, train_dir: Path, crops: _RunCrops, *, device, progress=None):
    """The table rows and arrays of one saliency job (one trained model, one test variant)."""
    import pandas as pd
    import torch

    from cellbg.models import target_layer
    from cellbg.train import load_job_model
    from cellbg.variants import protocol_backgrounds

    cfg = protocol.saliency
    variant = spec.test_variant
    cells = crops.cells
    model, _ = load_job_model(train_dir, device=device)
    random_model = randomize_weights(model, seed=spec.train.seed) if cfg.sanity_check else None
    pools = protocol_backgrounds(protocol, [variant], size=crops.images.shape[-1], channels=crops.images.shape[1])
    held_out = _job_cells(train_dir, cells)
    pick = sample_cells(
        cells.iloc[held_out],
        cfg.cells_per_job,
        seed=int(np.random.SeedSequence([protocol.seed, spec.train.fold]).generate_state(1)[0]),
    )
    shown = _variant_blocks(
        protocol,
        held_out,
        variant,
        images=crops.images,
        masks=crops.masks,
        cells=cells,
        others=crops.others,
        backgrounds=pools,
        positions=pick,
    )
    x = torch.as_tensor(np.asarray(shown.images), dtype=torch.float32)
    fg = np.asarray(shown.masks).astype(bool)
    partner = np.asarray(shown.partner)
    cell_ids = cells["cell_id"].astype(str).to_numpy()
    partner_ids = np.where(partner >= 0, cell_ids[held_out[np.clip(partner, 0, None)]], "")
    rows = cells.iloc[held_out[pick]].reset_index(drop=True)
    # the images depend on the held-out set and the sample, not on the model: jobs of one
    # fold share them in the run's store (see collect_saliency)
    shown_key = f"{variant}:{hashlib.sha1(held_out[pick].tobytes() + held_out.tobytes()).hexdigest()}"
    with torch.no_grad():
        logits = (
            torch.cat([model(c.to(device)).cpu() for c in x.split(cfg.batch_size)]) if len(x) else torch.zeros(0, 2)
        )
    pred = logits.argmax(1).numpy().astype(np.int64) if logits.shape[1] > 1 else (logits[:, 0] > 0).long().numpy()
    results = _job_maps(
        model, x, fg, rows, pred, cfg=cfg, layer=target_layer(model), random_model=random_model, colour=crops.colour
    )
    frames, maps, random_maps, masks = [], [], [], []
    n_maps = 0
    labels = rows["label_index"].to_numpy(np.int64)
    for method, r in results.items():
        n_rows = len(r["cell"])
        frames.append(
            pd.DataFrame(
                {
                    "cell_id": rows["cell_id"].astype(str).to_numpy()[r["cell"]],
                    "patient_id": rows["patient_id"].astype(str).to_numpy()[r["cell"]],
                    "label": rows["label"].astype(str).to_numpy()[r["cell"]],
                    "label_index": labels[r["cell"]],
                    "model": spec.train.model,
                    "train_variant": spec.train.train_variant,
                    "test_variant": variant,
                    "seed": spec.train.seed,
                    "fold": spec.train.fold,
                    "method": method,
                    "target": np.repeat(r["kinds"], len(rows)),
                    "target_index": r["cls"],
                    "pred_index": pred[r["cell"]],
                    "correct": pred[r["cell"]] == labels[r["cell"]],
                    "background_share": r["share"][r["inverse"]],
                    "background_ratio": r["ratio"][r["inverse"]],
                    "background_fraction": r["fraction"][r["inverse"]],
                    "sanity_rank_corr": r["corr"][r["inverse"]],
                    "map_index": np.arange(n_maps, n_maps + n_rows),
                    "job_key": train_dir.name,
                    "partner_cell_id": partner_ids[r["cell"]],
                    "shown_index": r["cell"],
                }
            )
        )
        n_maps += n_rows
        maps.append(r["maps"][r["inverse"]])
        masks.append(fg[r["cell"]])
        if r["random_maps"] is not None:
            random_maps.append(r["random_maps"][r["inverse"]])
        if progress is not None:
            progress(len(frames), len(results))
    size = tuple(crops.images.shape[-2:])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_COLUMNS)
    arrays = {
        "maps": np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *size), np.float32),
        "masks": np.concatenate(masks) if masks else np.zeros((0, *size), bool),
        "shown": x.numpy().astype(np.float32),
    }
    if cfg.sanity_check:
        arrays["random_maps"] = (
            np.concatenate(random_maps).astype(np.float32) if random_maps else np.zeros((0, *size), np.float32)
        )
    return table[_COLUMNS], arrays, shown_key


def _write_arrays(folder: Path, arrays: dict, attrs: dict) -> None:
    """A small zarr group of whole arrays, replaced atomically."""
    import zarr

    from cellbg._io import atomic_dir

    with atomic_dir(folder) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        for name, data in arrays.items():
            group.create_array(name, data=data, chunks=(max(1, min(len(data), 256)), *data.shape[1:]))
        group.attrs.update(attrs)


def saliency_job(protocol, spec, job_dir=None, *, train_dir=None, progress=None) -> Path:
    """Maps of one trained model on its sampled held-out cells in one test variant.

    The unit of work that :func:`run_saliency` (and the runner, one job per worker) runs:
    ``spec`` is a :class:`~cellbg.planning.PredictSpec` of :func:`cellbg.planning.plan_saliency`.
    The crops are read lazily, only the :data:`~cellbg.planning.PREDICT_BLOCK` blocks that
    hold a sampled cell, so memory does not grow with the cohort. A finished job (``DONE``
    present) is not rerun.

    Parameters
    ----------
    protocol : Protocol
    spec : PredictSpec
        The trained model and one of ``saliency.test_variants``.
    job_dir : path, optional
        Default ``<run>/jobs/<saliency_key>``.
    train_dir : path, optional
        The finished training job; default ``<run>/jobs/<job_key>``.
    progress : callable, optional
        Called as ``progress(methods_done, n_methods)``.

    Returns
    -------
    Path
        ``<job_dir>/saliency.parquet`` (rows as in :func:`run_saliency`, ``map_index`` and
        ``shown_index`` counted within the job); the arrays are in ``<job_dir>/maps.zarr``.

    Raises
    ------
    CellbgError
        The training job is not finished, an unknown test variant.
    """

    from cellbg import __version__
    from cellbg._io import write_json_atomic, write_parquet_atomic, write_text_atomic
    from cellbg.planning import DONE, describe_job, job_folder, saliency_key
    from cellbg.train import select_device
    from cellbg.variants import parse_variant

    run_dir = Path(protocol.run_dir)
    train_key, key, job_dir = job_folder(protocol, spec, saliency_key, job_dir=job_dir)
    out = job_dir / "saliency.parquet"
    if (job_dir / DONE).exists():
        return out
    parse_variant(spec.test_variant)
    train_dir = Path(train_dir) if train_dir is not None else run_dir / "jobs" / train_key
    if not (train_dir / DONE).exists():
        raise CellbgError(
            f"the training job of {describe_job(spec.train)} is not finished ({train_dir}); run 'cellbg train' first"
        )
    crops = _run_crops(run_dir)
    table, arrays, shown_key = _map_job(
        protocol, spec, train_dir, crops, device=select_device(protocol.training.device), progress=progress
    )
    job_dir.mkdir(parents=True, exist_ok=True)
    _write_arrays(
        job_dir / "maps.zarr",
        arrays,
        {"shown_key": shown_key, "background_colour": crops.colour.astype(float).tolist()},
    )
    write_json_atomic(
        job_dir / "spec.json", {"key": key, "train_key": train_key, "saliency": spec.to_dict(), "cellbg": __version__}
    )
    write_parquet_atomic(table, out)
    write_text_atomic(job_dir / DONE, f"{key}\n")
    return out


def _saliency_specs(protocol) -> list:
    """Each training job x each of ``saliency.test_variants`` (whether or not the runner's
    saliency stage is enabled: ``cellbg saliency`` maps on demand)."""
    from cellbg.planning import plan_saliency

    return plan_saliency(
        protocol.model_copy(update={"saliency": protocol.saliency.model_copy(update={"enabled": True})})
    )


def _saliency_dirs(protocol) -> list[Path]:
    """The folders of the protocol's saliency jobs, in plan order; an error when one is unfinished."""
    from cellbg.planning import DONE, crops_fingerprint, job_key, saliency_key, unfinished_jobs

    run_dir = Path(protocol.run_dir)
    crops_hash = crops_fingerprint(run_dir)
    specs = _saliency_specs(protocol)
    dirs = [
        run_dir / "jobs" / saliency_key(protocol, s, train_key=job_key(protocol, s.train, crops_hash=crops_hash))
        for s in specs
    ]
    missing = [s for s, d in zip(specs, dirs, strict=True) if not (d / DONE).exists()]
    if missing:
        raise unfinished_jobs("saliency", missing, run_dir, "cellbg saliency")
    return dirs


def collect_saliency(protocol):
    """Gather the protocol's finished saliency jobs into ``<run>/saliency.parquet`` and ``saliency.zarr``.

    Jobs are read one at a time, in plan order (model x train variant x seed x fold, then
    test variant), and their arrays written into the run's store slice by slice, so memory
    holds one job's maps. The images a map was computed on are stored once per (test
    variant, held-out set, sample): jobs of one fold share them.

    Returns
    -------
    DataFrame
        The rows of ``saliency.parquet`` (see :func:`run_saliency`).

    Raises
    ------
    CellbgError
        Some saliency jobs are not finished (their number and the first one).
    """
    import pandas as pd
    import zarr

    from cellbg._io import atomic_dir, write_parquet_atomic

    cfg = protocol.saliency
    run_dir = Path(protocol.run_dir)
    dirs = _saliency_dirs(protocol)
    groups = [zarr.open_group(str(d / "maps.zarr"), mode="r") for d in dirs]
    tables, shown_at, n_maps, n_shown = [], {}, 0, 0
    placement = []  # per job: (first map row, first shown row or None when already stored)
    for d, group in zip(dirs, groups, strict=True):
        table = pd.read_parquet(d / "saliency.parquet")
        shown_key = str(group.attrs["shown_key"])
        new = shown_key not in shown_at
        if new:
            shown_at[shown_key] = n_shown
        table["map_index"] = table["map_index"].to_numpy(np.int64) + n_maps
        table["shown_index"] = table["shown_index"].to_numpy(np.int64) + shown_at[shown_key]
        placement.append((n_maps, shown_at[shown_key] if new else None))
        n_maps += len(table)
        n_shown += int(cast("zarr.Array", group["shown"]).shape[0]) if new else 0
        tables.append(table)
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=_COLUMNS)
    table = table[_COLUMNS]
    if groups:
        size = tuple(cast("zarr.Array", groups[0]["maps"]).shape[1:])
        channels = int(cast("zarr.Array", groups[0]["shown"]).shape[1])
        colour = list(cast("list[float]", groups[0].attrs["background_colour"]))
    else:
        from cellbg.crops import load_crops

        images, masks, _ = load_crops(run_dir, lazy=True)
        size, channels = tuple(images.shape[-2:]), int(images.shape[1])
        colour = background_colour(images, masks).astype(float).tolist()
    shapes = {
        "maps": ((n_maps, *size), np.float32),
        "masks": ((n_maps, *size), bool),
        "shown": ((n_shown, channels, *size), np.float32),
    }
    if cfg.sanity_check:
        shapes["random_maps"] = ((n_maps, *size), np.float32)
    # The store is complete before the table that indexes it appears.
    with atomic_dir(run_dir / "saliency.zarr") as tmp:
        out = zarr.open_group(str(tmp), mode="w")
        arrays = {
            name: out.create_array(name, shape=shape, dtype=dtype, chunks=(max(1, min(shape[0], 256)), *shape[1:]))
            for name, (shape, dtype) in shapes.items()
        }
        for group, (map_start, shown_start) in zip(groups, placement, strict=True):
            for name, array in arrays.items():
                if name == "shown" and shown_start is None:
                    continue
                data = np.asarray(cast("zarr.Array", group[name])[:])
                start = shown_start if name == "shown" else map_start
                if len(data):
                    array[start : start + len(data)] = data
        out.attrs.update(
            {
                "methods": list(cfg.methods),
                "target": cfg.target,
                "test_variants": list(cfg.test_variants),
                "background_colour": colour,
                "ig_baseline": cfg.ig_baseline,
                "occlusion_fill": cfg.occlusion_fill,
                "rows": "row j of maps, masks, random_maps belongs to row j of saliency.parquet (map_index = j); "
                "shown[shown_index] is the image a row's map was computed on",
            }
        )
    write_parquet_atomic(table, run_dir / "saliency.parquet")
    return table


def run_saliency(protocol, *, progress=None):
    """Attribution maps and background shares for a sample of cells of every trained job.

    For each job of the protocol (model x train variant x seed x fold, all finished), the
    same ``saliency.cells_per_job`` held-out cells of the fold (spread over patients, seeded
    by ``protocol.seed`` and the fold, so that train variants are compared on the same
    cells) are shown to the trained model in each of ``saliency.test_variants``, as the very
    image the model was tested on (:func:`held_out_variant`: a ``mixed_*`` cell on the same
    partner's background, recorded as ``partner_cell_id``), and each method in
    ``saliency.methods`` explains the predicted and/or the true class. With
    ``saliency.sanity_check`` every map is also computed with a re-randomised copy of the
    model (seeded by the job's seed) and the rank correlation of the two is recorded.
    Integrated gradients starts from ``saliency.ig_baseline`` and occlusion fills with
    ``saliency.occlusion_fill``; ``background`` is :func:`background_colour` of the run's
    crops.

    Each (trained model, test variant) is one saliency job (:func:`saliency_job`, in
    ``<run>/jobs/<key>``; a finished one is kept), then :func:`collect_saliency` gathers
    them. The runner runs the same jobs on its workers.

    Parameters
    ----------
    protocol : Protocol
        A loaded protocol whose crops and training jobs exist.
    progress : callable, optional
        Called as ``progress(job_number, n_jobs)`` after each saliency job.

    Returns
    -------
    DataFrame
        The rows of ``<run>/saliency.parquet``: ``cell_id, patient_id, label, label_index,
        model, train_variant, test_variant, seed, fold, method, target ('predicted' or
        'true'), target_index, pred_index, correct, background_share, background_ratio,
        background_fraction, sanity_rank_corr, map_index, job_key (the training job's),
        partner_cell_id ('' unless mixed), shown_index``. A map is identified by (cell,
        model, train variant, test variant, seed, fold, method, target).

    Writes ``<run>/saliency.zarr``: arrays ``maps`` float32 ``(k, S, S)``, ``masks`` bool
    ``(k, S, S)`` (the cell mask the share is computed with) and, with the sanity check,
    ``random_maps``; row j belongs to row j of ``saliency.parquet`` (``map_index`` = j).
    ``shown`` float32 ``(m, C, S, S)`` holds the images the maps were computed on, once per
    (test variant, held-out set, cell): jobs of one fold share them; a row's image is
    ``shown[shown_index]``. Both files are replaced atomically.

    Raises
    ------
    CellbgError
        No crops, unfinished training jobs, or an unknown test variant.
    """
    from cellbg.crops import load_crops
    from cellbg.planning import DONE, crops_fingerprint, job_key, plan_jobs, unfinished_jobs
    from cellbg.variants import parse_variant

    run_dir = Path(protocol.run_dir)
    for variant in protocol.saliency.test_variants:
        parse_variant(variant)
    load_crops(run_dir, lazy=True)  # a clear error when there are no crops
    crops_hash = crops_fingerprint(run_dir)
    specs = plan_jobs(protocol)
    missing = [s for s in specs if not (run_dir / "jobs" / job_key(protocol, s, crops_hash=crops_hash) / DONE).exists()]
    if missing:
        raise unfinished_jobs("training", missing, run_dir, "cellbg train")
    jobs = _saliency_specs(protocol)
    for number, spec in enumerate(jobs, start=1):
        saliency_job(protocol, spec)
        if progress is not None:
            progress(number, len(jobs))
    return collect_saliency(protocol)


def load_saliency(run_dir) -> tuple:
    """Read ``saliency.parquet`` and the maps of ``saliency.zarr``.

    Returns
    -------
    table : DataFrame
    maps : (k, S, S) float32 ndarray
    masks : (k, S, S) bool ndarray
    """
    import pandas as pd
    import zarr

    run_dir = Path(run_dir)
    store, path = run_dir / "saliency.zarr", run_dir / "saliency.parquet"
    for p in (store, path):
        if not p.exists():
            raise CellbgError(f"no {p.name} in {run_dir}; run 'cellbg saliency PROTOCOL' first")
    group = zarr.open_group(str(store), mode="r")
    table = pd.read_parquet(path)
    maps = np.asarray(cast(zarr.Array, group["maps"])[:])
    masks = np.asarray(cast(zarr.Array, group["masks"])[:])
    if len(maps) != len(table):
        raise CellbgError(f"{store} holds {len(maps)} maps but {path.name} has {len(table)} rows; run saliency again")
    return table, maps, masks


# --------------------------------------------------------------------------- montage
def montage(images, masks, maps: dict, *, shares: dict | None = None, titles: Sequence[str] | None = None):
    """A figure of crops (rows) with one attribution map per column.

    Parameters
    ----------
    images : (n, C, H, W) array_like
        Crops in [0, 1]; one or three channels are shown as they are, others as their mean.
    masks : (n, H, W) bool
        Cell masks; their outline is drawn on every panel.
    maps : dict of str -> (n, H, W) array_like
        Column title -> maps. Each map is scaled to its own positive maximum.
    shares : dict of str -> (n,) array_like, optional
        Column title -> background share, printed under each map.
    titles : sequence of str, optional
        Row titles (cell ids).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> fig = montage(np.zeros((2, 1, 8, 8)), np.ones((2, 8, 8), bool), {"gradcam": np.ones((2, 8, 8))})
    >>> len(fig.axes)
    4
    """
    from matplotlib.figure import Figure

    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    check_nd(images, 4, arg_name="images")
    n = len(images)
    shares = shares or {}
    fig = Figure(figsize=(1.6 * (1 + len(maps)), 1.75 * max(n, 1)), layout="constrained")
    axes = fig.subplots(max(n, 1), 1 + len(maps), squeeze=False)
    rgb = images if images.shape[1] in (1, 3) else images.mean(axis=1, keepdims=True)
    for i in range(n):
        crop = np.clip(np.moveaxis(rgb[i], 0, -1), 0, 1)
        axes[i, 0].imshow(crop[..., 0] if crop.shape[-1] == 1 else crop, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i] if titles is not None else "crop", fontsize=6)
        for j, (name, m) in enumerate(maps.items(), start=1):
            panel = np.asarray(m[i], dtype=np.float32)
            top = float(panel.max()) if panel.max() > 0 else 1.0
            axes[i, j].imshow(np.clip(panel / top, 0, 1), cmap="inferno", vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=6)
            if name in shares:
                axes[i, j].set_xlabel(f"bg share {float(np.asarray(shares[name])[i]):.2f}", fontsize=6)
        for ax in axes[i]:
            if masks[i].any():
                ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def write_montage(
    run_dir,
    path,
    *,
    cells: int = 6,
    target: str = "predicted",
    model: str | None = None,
    seed: int | None = None,
    fold: int | None = None,
) -> Path:
    """Draw crops with their maps for every train variant and method; save as PNG.

    Takes the first ``cells`` cells of one (model, seed, fold) of ``saliency.parquet`` (by
    default the first), which every train variant saw, and writes one row per cell and one
    column per (train variant, method), each with its background share.

    Returns
    -------
    Path
        ``path``, written atomically.
    """
    from cellbg._io import atomic_path
    from cellbg.crops import load_crops

    run_dir = Path(run_dir)
    table, maps, _ = load_saliency(run_dir)
    if table.empty:
        raise CellbgError(f"{run_dir}/saliency.parquet has no rows to draw")
    target = look_up_option(target, sorted(table["target"].unique()), what="saliency target")
    first = table.iloc[0]
    model = first["model"] if model is None else look_up_option(model, sorted(table["model"].unique()), what="model")
    seed = int(first["seed"]) if seed is None else int(seed)
    fold = int(first["fold"]) if fold is None else int(fold)
    sel = table[
        (table["model"] == model) & (table["seed"] == seed) & (table["fold"] == fold) & (table["target"] == target)
    ]
    if sel.empty:
        raise CellbgError(f"no saliency rows for model '{model}', seed {seed}, fold {fold}, target '{target}'")
    cell_ids = list(dict.fromkeys(sel["cell_id"]))[:cells]
    images, masks, crop_cells = load_crops(run_dir)
    row_of = {c: i for i, c in enumerate(crop_cells["cell_id"].astype(str))}
    idx = np.array([row_of[c] for c in cell_ids])
    columns, shares = {}, {}
    for (variant, method), group in sel.groupby(["train_variant", "method"], sort=False):
        g = group.drop_duplicates("cell_id").set_index("cell_id").reindex(cell_ids)
        if g["map_index"].isna().any():
            continue
        name = f"{variant}\n{method}"
        columns[name] = maps[g["map_index"].to_numpy(np.int64)]
        shares[name] = g["background_share"].to_numpy()
    fig = montage(images[idx], masks[idx], columns, shares=shares, titles=cell_ids)
    fig.suptitle(f"{model}, seed {seed}, fold {fold}; maps of the {target} class", fontsize=7)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    return path
