"""Model registry: the classifiers whose use of the background is measured.

Four architectures, each built for any number of input channels and classes:

``resnet``
    MONAI's :class:`monai.networks.nets.ResNet` in 2-D with basic blocks (depth 10, 18 or
    34), channel widths ``(64, 128, 256, 512)`` scaled by ``width``, and an optional small-image
    stem (3x3, stride 1, no max-pool) that keeps the resolution of 64-pixel crops.
``shufflenet_v2``
    torchvision's ShuffleNetV2 (``weights=None``) with its first convolution rebuilt for the
    crop's channel count.
``efficientnet_b0``
    torchvision's EfficientNet-B0 (the model of Hashmi & Li's non-target-object experiments),
    untrained or from a local weights file, with its stem convolution rebuilt for the crop's
    channel count and its classifier for the class count.
``cellyolo``
    A YOLO-style classifier: a compact CSP-Darknet backbone (Conv-BN-SiLU, C2f stages, SPPF)
    with YOLO width/depth multiples (n = 0.25/0.33, s = 0.5/0.33, m = 0.75/0.67) and a
    classification head, written here (see ``docs/training.md`` for why not timm).

Each model names the layer Grad-CAM should hook (:func:`target_layer`). Build models by
name with :func:`get_model`; :func:`list_models` lists the names.

Examples
--------
>>> import torch
>>> net = get_model("resnet", in_channels=3, num_classes=2, depth=10, width=0.25)
>>> net(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 2])
>>> target_layer(net)
'layer4'
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cellbg._checks import CellbgError, did_you_mean, look_up_option

__all__ = [
    "register_model",
    "get_model",
    "list_models",
    "target_layer",
    "count_parameters",
    "CellYolo",
    "C2f",
    "SPPF",
    "ConvBNSiLU",
]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TARGET_LAYERS: dict[str, str] = {}


def register_model(name: str, *, target: str) -> Callable:
    """Decorator registering a model builder under ``name`` with its Grad-CAM layer ``target``.

    The builder takes ``in_channels`` and ``num_classes`` keywords plus its own options.
    (Modelled on torchvision's ``register_model``.)
    """

    def wrapper(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"a model is already registered as '{name}'")
        _MODELS[name] = fn
        _TARGET_LAYERS[name] = target
        return fn

    return wrapper


def list_models() -> list[str]:
    """The registered architecture names, sorted.

    Examples
    --------
    >>> list_models()
    ['cellyolo', 'efficientnet_b0', 'resnet', 'shufflenet_v2']
    """
    return sorted(_MODELS)


def get_model(arch: str, *, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build an untrained model by architecture name.

    Parameters
    ----------
    arch : str
        One of :func:`list_models`; a typo is answered with "did you mean".
    in_channels : int
        Channels of the input crops (1 for grey, 3 for RGB, any number for fluorescence).
    num_classes : int
        Number of output logits (>= 2).
    **kwargs
        Options of the architecture (the fields of its protocol spec): ``resnet``: ``depth``
        (10, 18, 34), ``width`` (> 0), ``small_stem`` (bool); ``shufflenet_v2``: ``width``
        (0.5, 1.0, 1.5, 2.0); ``cellyolo``: ``width``, ``depth`` (> 0); ``efficientnet_b0``:
        ``weights`` (None or a local state-dict file), ``dropout``.

    Returns
    -------
    torch.nn.Module
        Maps ``(n, in_channels, H, W)`` float tensors to ``(n, num_classes)`` logits.

    Raises
    ------
    CellbgError
        Unknown architecture or option, or a bad value; the message names it.

    Examples
    --------
    >>> import torch
    >>> net = get_model("cellyolo", in_channels=1, num_classes=3, width=0.25, depth=0.33)
    >>> net(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 3])
    """
    arch = look_up_option(arch, list_models(), what="model architecture")
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise CellbgError(f"in_channels must be a positive integer; got {in_channels!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise CellbgError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    builder = _MODELS[arch]
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("in_channels", "num_classes")]
    for key in kwargs:
        if key not in allowed:
            raise CellbgError(
                f"unknown option '{key}' for model '{arch}'{did_you_mean(key, allowed)}; options: {', '.join(allowed)}"
            )
    return builder(in_channels=in_channels, num_classes=num_classes, **kwargs)


def target_layer(model_or_arch: nn.Module | str) -> str:
    """The name of the module Grad-CAM should hook (the last spatial feature map).

    Parameters
    ----------
    model_or_arch : torch.nn.Module or str
        A model built by :func:`get_model`, or an architecture name.

    Returns
    -------
    str
        A name usable with ``dict(model.named_modules())``.

    Examples
    --------
    >>> target_layer("shufflenet_v2")
    'conv5'
    """
    if isinstance(model_or_arch, str):
        return _TARGET_LAYERS[look_up_option(model_or_arch, list_models(), what="model architecture")]
    arch = _arch_of(model_or_arch)
    return _TARGET_LAYERS[arch]


def _arch_of(model: nn.Module) -> str:
    from monai.networks.nets import ResNet
    from torchvision.models import EfficientNet, ShuffleNetV2

    if isinstance(model, ResNet):
        return "resnet"
    if isinstance(model, ShuffleNetV2):
        return "shufflenet_v2"
    if isinstance(model, EfficientNet):
        return "efficientnet_b0"
    if isinstance(model, CellYolo):
        return "cellyolo"
    raise CellbgError(f"{type(model).__name__} is not a cellbg model; build one with get_model()")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_width(width, *, arch: str) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise CellbgError(f"model '{arch}': width must be a number > 0; got {width!r}")
    return float(width)


# --------------------------------------------------------------------------- resnet
_RESNET_LAYERS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@register_model("resnet", target="layer4")
def _resnet(*, in_channels: int, num_classes: int, depth: int = 18, width: float = 1.0, small_stem: bool = True):
    from monai.networks.nets import ResNet

    if depth not in _RESNET_LAYERS:
        raise CellbgError(f"model 'resnet': depth must be one of 10, 18, 34; got {depth!r}")
    width = _check_width(width, arch="resnet")
    # Scale the widths here (not with MONAI's widen_factor) so a tiny width never rounds to 0.
    planes = [max(4, int(round(c * width))) for c in (64, 128, 256, 512)]
    stem: dict[str, Any] = (
        dict(conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)
        if small_stem
        else dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False)
    )
    return ResNet(
        block="basic",
        layers=_RESNET_LAYERS[depth],
        block_inplanes=planes,
        spatial_dims=2,
        n_input_channels=in_channels,
        num_classes=num_classes,
        **stem,
    )


# --------------------------------------------------------------------------- shufflenet
@register_model("shufflenet_v2", target="conv5")
def _shufflenet_v2(*, in_channels: int, num_classes: int, width: float = 1.0):
    import torchvision.models as tvm

    builders = {
        0.5: tvm.shufflenet_v2_x0_5,
        1.0: tvm.shufflenet_v2_x1_0,
        1.5: tvm.shufflenet_v2_x1_5,
        2.0: tvm.shufflenet_v2_x2_0,
    }
    if width not in builders:
        raise CellbgError(f"model 'shufflenet_v2': width must be one of 0.5, 1.0, 1.5, 2.0; got {width!r}")
    net = builders[width](weights=None, num_classes=num_classes)
    old = net.conv1[0]
    if in_channels != old.in_channels:
        # torchvision hard-codes 3 input channels; rebuild the first convolution for C.
        net.conv1[0] = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=False,
        )
    return net


# --------------------------------------------------------------------------- efficientnet
@register_model("efficientnet_b0", target="features.8")
def _efficientnet_b0(*, in_channels: int, num_classes: int, weights: str | None = None, dropout: float = 0.2):
    """torchvision's EfficientNet-B0; ``weights``: None (random) or a local state-dict file.

    A weights file (e.g. ImageNet weights saved with ``torch.save(model.state_dict())``) is
    read with ``weights_only=True``; its classifier is dropped when the class count differs,
    and for ``in_channels != 3`` the stem kernels are averaged over RGB and repeated. Nothing is
    downloaded. The Grad-CAM layer is ``features.8`` (the last 1x1 convolution, 1280 maps).
    """
    import torchvision.models as tvm

    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CellbgError(f"model 'efficientnet_b0': dropout must be in [0, 1); got {dropout!r}")
    net = tvm.efficientnet_b0(weights=None, num_classes=num_classes, dropout=float(dropout))
    state = None
    if weights is not None:
        from pathlib import Path

        path = Path(weights).expanduser()
        if not path.is_file():
            raise CellbgError(f"model 'efficientnet_b0': weights file {path} not found (weights: a local file or null)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CellbgError(
                f"model 'efficientnet_b0': cannot read weights {path}: {str(exc).splitlines()[0]}"
            ) from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise CellbgError(f"model 'efficientnet_b0': {path} holds no state dict")
        head = state.get("classifier.1.weight")
        if head is not None and head.shape[0] != num_classes:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    old = net.features[0][0]
    if in_channels != old.in_channels:
        net.features[0][0] = nn.Conv2d(
            in_channels,
            old.out_channels,
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            bias=False,
        )
        if state is not None and "features.0.0.weight" in state:
            w = state["features.0.0.weight"]
            state["features.0.0.weight"] = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
    if state is not None:
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith("classifier.")] + list(unexpected)
        if bad:
            raise CellbgError(f"model 'efficientnet_b0': weights {weights} do not fit EfficientNet-B0 (e.g. {bad[0]})")
    return net


# --------------------------------------------------------------------------- cellyolo
def _divisible(x: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor`` (at least ``divisor``), as YOLO does."""
    return max(divisor, int(math.ceil(x / divisor) * divisor))


class ConvBNSiLU(nn.Sequential):
    """Conv2d (no bias, 'same' padding) -> BatchNorm -> SiLU: YOLO's ``Conv``."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 1, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.SiLU(inplace=True),
        )


class _Bottleneck(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = ConvBNSiLU(channels, channels, 3)
        self.cv2 = ConvBNSiLU(channels, channels, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP stage with two convolutions and ``n`` bottlenecks whose outputs are all concatenated.

    The input is projected and split in two halves; one half passes through the bottlenecks,
    each bottleneck's output is kept, and all pieces are fused by a 1x1 convolution (YOLOv8).
    """

    def __init__(self, c_in: int, c_out: int, n: int = 1):
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBNSiLU(c_in, 2 * self.hidden, 1)
        self.blocks = nn.ModuleList(_Bottleneck(self.hidden) for _ in range(n))
        self.cv2 = ConvBNSiLU((2 + n) * self.hidden, c_out, 1)

    def forward(self, x):
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained max-pools concatenated (YOLOv5/8)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBNSiLU(c_in, hidden, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)
        self.cv2 = ConvBNSiLU(4 * hidden, c_out, 1)

    def forward(self, x):
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, dim=1))


class CellYolo(nn.Module):
    """CSP-Darknet classifier: stem, four stride-2 C2f stages, SPPF, 1x1 head, pool, linear.

    Parameters
    ----------
    in_channels, num_classes : int
        Input channels and output logits.
    width, depth : float
        YOLO width and depth multiples applied to the base channels ``(64, 128, 256, 512,
        1024)`` and the base stage repeats ``(3, 6, 6, 3)``.
    """

    def __init__(self, in_channels: int, num_classes: int, *, width: float = 0.25, depth: float = 0.33):
        super().__init__()
        ch = [_divisible(c * width) for c in (64, 128, 256, 512, 1024)]
        reps = [max(1, round(n * depth)) for n in (3, 6, 6, 3)]
        self.stem = ConvBNSiLU(in_channels, ch[0], 3, 2)
        self.stages = nn.Sequential(
            *(nn.Sequential(ConvBNSiLU(ch[i], ch[i + 1], 3, 2), C2f(ch[i + 1], ch[i + 1], reps[i])) for i in range(4))
        )
        self.sppf = SPPF(ch[4], ch[4])
        head = _divisible(1280 * width)
        self.head = ConvBNSiLU(ch[4], head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.sppf(self.stages(self.stem(x)))
        return self.fc(self.pool(self.head(x)).flatten(1))


@register_model("cellyolo", target="sppf")
def _cellyolo(*, in_channels: int, num_classes: int, width: float = 0.25, depth: float = 0.33):
    width = _check_width(width, arch="cellyolo")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not depth > 0:
        raise CellbgError(f"model 'cellyolo': depth must be a number > 0; got {depth!r}")
    return CellYolo(in_channels, num_classes, width=width, depth=float(depth))
