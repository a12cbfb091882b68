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
    Integrated gradients (Sundararajan et al. 2017) from Captum, from a black baseline,
    summed over channels.

A built-in sanity check (Adebayo et al. 2018) recomputes every map with the same
architecture and re-randomised weights (:func:`randomize_weights`) and records the Spearman
rank correlation of the two maps (:func:`rank_correlation`): a map that barely changes when
the weights are destroyed says nothing about what the model learned.

:func:`run_saliency` applies all of this to the trained jobs of a protocol and writes
``<run>/saliency.zarr`` and ``<run>/saliency.parquet``; :func:`write_montage` draws crops
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
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellbg._checks import CellbgError, check_nd, did_you_mean, look_up_option

__all__ = [
    "METHODS",
    "BackgroundShare",
    "background_share",
    "gradcam",
    "occlusion",
    "integrated_gradients",
    "attribute",
    "randomize_weights",
    "rank_correlation",
    "sample_cells",
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
            raise CellbgError(f"masks must be boolean (cell = True); got dtype {masks.dtype} with values other than 0/1")
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
        raise CellbgError(
            f"Grad-CAM needs a layer with an (n, C, h, w) feature map; layer '{name[4:]}' gives {got}"
        )


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
    fill : float or {'mean_img', 'mean_patch', 'gaussian'}, optional
        Value written into the window (0 = black, as the ``only_fg`` fill), or a MONAI mode.
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
    if isinstance(fill, str):
        fill = look_up_option(fill, ("mean_img", "mean_patch", "gaussian"), what="occlusion fill")
    else:
        fill = float(fill)
    x = _as_batch(images).to(_device_of(model))
    n, _, h, w = x.shape
    if n and (window > h or window > w):
        raise CellbgError(f"occlusion window {window} is larger than the crop ({h} x {w}); use a smaller window")
    out = np.zeros((n, h, w), dtype=np.float32)
    if n == 0:
        return out
    with _EvalCopy(model) as wrapped, torch.no_grad():
        t = _as_targets(targets, n, _num_classes(wrapped, x))
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


def integrated_gradients(
    model, images, targets, *, steps: int = 8, baseline: float = 0.0, batch_size: int = 64
) -> np.ndarray:
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
    baseline : float, optional
        The reference image's value (0 = black, as the ``only_fg`` fill).
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
    with _EvalCopy(model) as wrapped:
        t = _as_targets(targets, n, _num_classes(wrapped, x)).to(x.device)
        ig = IntegratedGradients(wrapped)
        per_chunk = max(1, batch_size // steps)
        for start in range(0, n, per_chunk):
            sl = slice(start, start + per_chunk)
            with torch.enable_grad():
                attr = ig.attribute(
                    x[sl], baselines=float(baseline), target=t[sl], n_steps=int(steps), internal_batch_size=batch_size
                )
            out[sl] = attr.sum(dim=1).detach().cpu().numpy()
    return out


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
    fn = {"gradcam": gradcam, "occlusion": occlusion, "integrated_gradients": integrated_gradients}[method]
    return fn(model, images, targets, **options)


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
                if getattr(module, "running_mean", None) is not None:
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
