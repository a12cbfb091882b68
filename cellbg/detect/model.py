"""torchvision Faster R-CNN detectors, built from names with no download.

``fasterrcnn_mobilenet_v3_large_fpn`` is torchvision's builder as it is; ``fasterrcnn_resnet_fpn``
is a ResNet-18/34/50 with a feature pyramid whose width and box-head width are settings, so a
detector small enough for a CPU test is the same code as the full one. Without a local weights
file every layer is drawn at random (BatchNorm trains, as torchvision does when no weights
are given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellbg._checks import CellbgError, look_up_option

__all__ = ["DETECTORS", "get_detector", "replace_predictor"]

DETECTORS = ("fasterrcnn_resnet_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
#: Anchor sides of ``fasterrcnn_resnet_fpn``, one per pyramid level (torchvision's are 32-512).
ANCHOR_SIZES = ((8,), (16,), (32,), (64,), (128,))


def _resnet_fpn(depth: int, fpn_channels: int, representation_size: int, size: int):
    from torchvision.models import resnet18, resnet34, resnet50
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if int(depth) == 10:  # one basic block per stage: half of ResNet-18's compute, for CPU runs
        body = ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=nn.BatchNorm2d)
    else:
        body = {18: resnet18, 34: resnet34, 50: resnet50}[int(depth)](weights=None, norm_layer=nn.BatchNorm2d)
    widths = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=widths,
        out_channels=fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )
    box_head = TwoMLPHead(fpn_channels * 7 * 7, representation_size)
    # cells are 20-40 px and what sits beside them a few px: anchors from 8 px (strides 4-64)
    anchors = AnchorGenerator(sizes=ANCHOR_SIZES, aspect_ratios=((0.5, 1.0, 2.0),) * len(ANCHOR_SIZES))
    return FasterRCNN(
        backbone,
        num_classes=None,
        box_head=box_head,
        box_predictor=FastRCNNPredictor(representation_size, 2),
        rpn_anchor_generator=anchors,
        min_size=size,
        max_size=size,
    )


def get_detector(
    arch: str = "fasterrcnn_resnet_fpn",
    *,
    num_classes: int,
    image_size: int,
    depth: int = 18,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    weights: str | Path | None = None,
) -> nn.Module:
    """A Faster R-CNN for ``num_classes`` classes (background included), with no download.

    Parameters
    ----------
    arch : {'fasterrcnn_resnet_fpn', 'fasterrcnn_mobilenet_v3_large_fpn'}
    num_classes : int
        Object classes + 1 (index 0 is the background, torchvision's convention).
    image_size : int
        Side the images are resized to (the fields' side keeps their pixel size).
    depth, fpn_channels, representation_size : int
        ``fasterrcnn_resnet_fpn`` only: ResNet depth, pyramid width, box-head width.
    weights : path, optional
        A local ``state_dict`` file of a detector. Tensors whose shape differs (a box
        predictor for another number of classes) are left at their random initialisation.

    Returns
    -------
    torch.nn.Module
        A torchvision ``FasterRCNN``.

    Raises
    ------
    CellbgError
        An unknown architecture, a weights file that is missing, unreadable or shares no
        tensor with the detector.

    Examples
    --------
    >>> m = get_detector(num_classes=3, image_size=64, fpn_channels=16, representation_size=32)
    >>> m.roi_heads.box_predictor.cls_score.out_features
    3
    """
    arch = look_up_option(arch, DETECTORS, what="detector")
    if int(num_classes) < 2:
        raise CellbgError(f"num_classes counts the background too and must be >= 2; got {num_classes}")
    if arch == "fasterrcnn_resnet_fpn":
        model = _resnet_fpn(depth, fpn_channels, representation_size, image_size)
    else:
        from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

        model = fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=2, min_size=image_size, max_size=image_size
        )
    replace_predictor(model, num_classes)
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


def replace_predictor(model: nn.Module, num_classes: int) -> nn.Module:
    """Give ``model`` a new box predictor (class scores and box deltas) for ``num_classes``."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    roi_heads: Any = model.roi_heads  # torchvision's FasterRCNN attributes are untyped Modules
    in_features = roi_heads.box_predictor.cls_score.in_features
    roi_heads.box_predictor = FastRCNNPredictor(in_features, int(num_classes))
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise CellbgError(f"detection.detector.weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
        raise CellbgError(f"detection.detector.weights: cannot read {path}: {type(exc).__name__}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not usable:
        raise CellbgError(f"detection.detector.weights: {path} shares no tensor with a {type(model).__name__}")
    model.load_state_dict(usable, strict=False)
