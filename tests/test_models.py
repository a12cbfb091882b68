"""Tests of the model registry (cellbg.models)."""

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet
from torchvision.models import ShuffleNetV2

from cellbg import CellbgError
from cellbg.models import C2f, CellYolo, count_parameters, get_model, list_models, target_layer
from cellbg.protocol import CellYoloSpec, Protocol, ResNetSpec, ShuffleNetSpec

SMALL = {
    "resnet": {"depth": 10, "width": 0.125},
    "shufflenet_v2": {"width": 0.5},
    "cellyolo": {"width": 0.125, "depth": 0.33},
    "efficientnet_b0": {},
}


def test_list_models():
    assert list_models() == ["cellyolo", "efficientnet_b0", "resnet", "shufflenet_v2"]


@pytest.mark.parametrize("arch", ["resnet", "shufflenet_v2", "cellyolo", "efficientnet_b0"])
@pytest.mark.parametrize("channels", [1, 5])
def test_forward_backward_any_channels(arch, channels):
    net = get_model(arch, in_channels=channels, num_classes=3, **SMALL[arch])
    x = torch.rand(2, channels, 32, 32, requires_grad=True)
    logits = net(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet", "shufflenet_v2", "cellyolo", "efficientnet_b0"])
def test_target_layer_is_last_feature_map(arch):
    net = get_model(arch, in_channels=3, num_classes=2, **SMALL[arch]).eval()
    name = target_layer(net)
    assert name == target_layer(arch)
    seen = []
    layer = dict(net.named_modules())[name]
    layer.register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.rand(1, 3, 64, 64)
    seen.clear()
    logits = net(x)
    out = seen[0]
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[-1] >= 2  # a spatial map
    # gradients of a logit reach the hooked map (Grad-CAM needs them)
    (grad,) = torch.autograd.grad(logits[0, 1], out)
    assert grad.shape == out.shape and grad.abs().sum() > 0


def test_resnet_depth_width_and_stem():
    layers = {
        d: len(get_model("resnet", in_channels=1, num_classes=2, depth=d, width=0.125).layer3) for d in (10, 18, 34)
    }
    assert layers == {10: 1, 18: 2, 34: 6}
    wide = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.5)
    thin = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.25)
    assert isinstance(wide, ResNet)
    assert wide.fc.in_features == 256 and thin.fc.in_features == 128
    assert count_parameters(wide) > 3 * count_parameters(thin)

    def layer4_size(small_stem):
        net = get_model("resnet", in_channels=1, num_classes=2, depth=10, width=0.125, small_stem=small_stem)
        feats = {}
        net.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("o", o))
        net(torch.rand(1, 1, 64, 64))
        return feats["o"].shape[-1]

    assert layer4_size(True) == 8  # stride 1 stem, no max-pool: 64 / 8
    assert layer4_size(False) == 2  # 7x7 stride-2 stem + max-pool: 64 / 32


def test_shufflenet_first_conv_adapted():
    net = get_model("shufflenet_v2", in_channels=4, num_classes=5, width=0.5)
    assert isinstance(net, ShuffleNetV2)
    assert net.conv1[0].in_channels == 4 and net.fc.out_features == 5


def test_cellyolo_multiples():
    n = get_model("cellyolo", in_channels=3, num_classes=2, width=0.25, depth=0.33)
    m = get_model("cellyolo", in_channels=3, num_classes=2, width=0.75, depth=0.67)
    assert isinstance(n, CellYolo)
    assert n.stem[0].out_channels == 16 and m.stem[0].out_channels == 48
    reps = lambda net: [len(s[1].blocks) for s in net.stages]  # noqa: E731
    assert reps(n) == [1, 2, 2, 1] and reps(m) == [2, 4, 4, 2]
    assert all(isinstance(s[1], C2f) for s in n.stages)
    assert count_parameters(m) > 5 * count_parameters(n)


def test_protocol_specs_build():
    specs = [
        ResNetSpec(arch="resnet", depth=10, width=0.125),
        ShuffleNetSpec(arch="shufflenet_v2", width=0.5),
        CellYoloSpec(arch="cellyolo", width=0.125),
    ]
    for spec in specs + list(Protocol.model_validate({"name": "x"}).models):
        net = get_model(spec.arch, in_channels=3, num_classes=2, **spec.kwargs())
        assert net(torch.rand(2, 3, 32, 32)).shape == (2, 2)


def test_bad_input_messages():
    with pytest.raises(CellbgError, match="did you mean 'resnet'"):
        get_model("resnt", in_channels=3, num_classes=2)
    with pytest.raises(CellbgError, match="unknown option 'widht'.*did you mean 'width'"):
        get_model("resnet", in_channels=3, num_classes=2, widht=0.5)
    with pytest.raises(CellbgError, match="depth must be one of 10, 18, 34; got 50"):
        get_model("resnet", in_channels=3, num_classes=2, depth=50)
    with pytest.raises(CellbgError, match="width must be one of 0.5, 1.0"):
        get_model("shufflenet_v2", in_channels=3, num_classes=2, width=0.3)
    with pytest.raises(CellbgError, match="width must be a number > 0"):
        get_model("cellyolo", in_channels=3, num_classes=2, width=0)
    with pytest.raises(CellbgError, match="in_channels must be a positive integer"):
        get_model("resnet", in_channels=0, num_classes=2)
    with pytest.raises(CellbgError, match="num_classes must be an integer >= 2"):
        get_model("resnet", in_channels=1, num_classes=1)
    with pytest.raises(CellbgError, match="not a cellbg model"):
        target_layer(torch.nn.Linear(2, 2))


def test_efficientnet_b0_trains_a_cpu_step_and_grad_cam_hooks_it(tmp_path):
    from torchvision.models import EfficientNet

    from cellbg.protocol import EfficientNetSpec
    from cellbg.saliency import gradcam

    torch.manual_seed(0)
    net = get_model("efficientnet_b0", in_channels=3, num_classes=2)
    assert isinstance(net, EfficientNet) and target_layer(net) == "features.8" == target_layer("efficientnet_b0")
    assert net.classifier[1].out_features == 2
    x, y = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    changed = [k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "features.0.0.weight" in changed and "classifier.1.weight" in changed
    maps = gradcam(net, x, y.numpy())
    assert maps.shape == (4, 64, 64) and np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0

    # a local weights file: saved from an ImageNet-shaped model (3 channels, 1000 classes)
    src = get_model("efficientnet_b0", in_channels=3, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "b0.pth")
    gray = get_model("efficientnet_b0", in_channels=1, num_classes=2, weights=str(tmp_path / "b0.pth"))
    torch.testing.assert_close(gray.features[0][0].weight, src.features[0][0].weight.mean(1, keepdim=True))
    torch.testing.assert_close(gray.features[4][0].block[0][0].weight, src.features[4][0].block[0][0].weight)
    spec = EfficientNetSpec(arch="efficientnet_b0", weights=tmp_path / "b0.pth")
    assert get_model(spec.arch, in_channels=3, num_classes=2, **spec.kwargs()).classifier[1].out_features == 2
    with pytest.raises(CellbgError, match="weights file .* not found"):
        get_model("efficientnet_b0", in_channels=3, num_classes=2, weights=str(tmp_path / "none.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CellbgError, match="cannot read weights"):
        get_model("efficientnet_b0", in_channels=3, num_classes=2, weights=str(tmp_path / "bad.pth"))
