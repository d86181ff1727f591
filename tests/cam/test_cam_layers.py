"""Layer choice and capture: target_layer forms, the default-layer rule, reshape_transform, what is (not) run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.capture import LayerCapture
from attribution.core.layers import default_layer
from conftest import cam_cnn, tiny_cnn


@pytest.fixture
def x():
    torch.manual_seed(4)
    return torch.randn(2, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ target_layer
def test_layer_by_name_module_position_and_per_call(x):
    model = cam_cnn()
    by_name = A.GradCAM(model, "2")(x, [1, 2])
    torch.testing.assert_close(A.GradCAM(model, model[2])(x, [1, 2]), by_name)
    torch.testing.assert_close(A.GradCAM(model, target_layer="2")(x, [1, 2]), by_name)
    torch.testing.assert_close(A.GradCAM(model)(x, [1, 2], target_layer="2"), by_name)  # the seed's call form
    torch.testing.assert_close(A.GradCAM(model, "1")(x, [1, 2], target_layer="2"), by_name)  # per call wins
    assert not torch.allclose(A.GradCAM(model, "1")(x, [1, 2]), by_name)


def test_several_layers_are_fused_after_upsampling(x):
    model = cam_cnn()
    maps = [A.LayerCAM(model, layer)(x, [1, 2]) for layer in ("1", "2", "3")]
    torch.testing.assert_close(A.LayerCAM(model, ["1", model[2], "3"])(x, [1, 2]), torch.stack(maps).mean(0))
    torch.testing.assert_close(A.LayerCAM(model, ["1", "2", "3"], layer_fusion="max")(x, [1, 2]),
                               torch.stack(maps).amax(0))
    with pytest.raises(ValueError, match="layer_fusion must be one of"):
        A.LayerCAM(model, ["1", "2"], layer_fusion="sum")(x, [1, 2])


def test_unknown_layer_names_the_closest(x):
    model = cam_cnn()
    for method in (A.GradCAM, A.ScoreCAM, A.AblationCAM, A.FullGrad, A.GuidedGradCAM):
        with pytest.raises(ValueError, match=r"no layer named '2\.00'; closest names: 2\.0"):
            method(model, "2.00")(x, 0)
    with pytest.raises(ValueError, match="an empty list of layers"):
        A.GradCAM(model, [])(x, 0)
    with pytest.raises(ValueError, match="not part of the model"):
        A.GradCAM(model, nn.Conv2d(3, 3, 1))(x, 0)


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean()


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.unused = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y, _ = self.block(x)
        return self.fc(y.mean(dim=(2, 3)))


def test_layers_that_do_not_give_one_map(x):
    model = TupleNet()
    with pytest.raises(TypeError, match="'block' returns tuple, not a tensor"):
        A.GradCAM(model, "block")(x, 0)
    with pytest.raises(RuntimeError, match="'unused' did not run"):
        A.GradCAM(model, "unused")(x, 0)
    with pytest.raises(ValueError, match=r"has shape \(2, 3\); CAMs need \(B, C, h, w\)"):
        A.GradCAM(model, "fc")(x, 0)


class TokenNet(nn.Module):
    """A conv net that passes its feature map through a token stage (B, h*w, C), as a vision transformer would."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.tokens = nn.Identity()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        f = self.act(self.conv(x))
        t = self.tokens(f.flatten(2).transpose(1, 2))
        return self.head(F.relu(self.mix(t)).mean(1))


def tokens_to_map(t: torch.Tensor) -> torch.Tensor:
    side = int(t.shape[1] ** 0.5)
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def test_reshape_transform_for_token_outputs(x):
    torch.manual_seed(0)
    model = TokenNet().eval()
    # the token stage holds the ReLU's feature map: through the transform, every CAM sees the same activations and
    # (for the gradient CAMs) the same gradients as at the ReLU
    for method in (A.GradCAM, A.GradCAMPlusPlus, A.HiResCAM, A.EigenCAM, A.EigenGradCAM, A.ScoreCAM):
        via_tokens = method(model, "tokens", reshape_transform=tokens_to_map)(x, [0, 3])
        torch.testing.assert_close(via_tokens, method(model, "act")(x, [0, 3]))
    # and the token-space GradCAM equals one computed by hand on the feature map
    acts = F.relu(model.conv(x)).detach().requires_grad_(True)
    scores = model.head(F.relu(model.mix(acts.flatten(2).transpose(1, 2))).mean(1))[torch.arange(2), [0, 3]]
    (grads,) = torch.autograd.grad(scores.sum(), acts)
    expected = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)).detach()
    expected = F.interpolate(expected, x.shape[-2:], mode="bilinear", align_corners=False)
    mine = A.GradCAM(model, "tokens", reshape_transform=tokens_to_map)(x, [0, 3])
    torch.testing.assert_close(mine, expected)
    with pytest.raises(ValueError, match="name the layer"):
        A.GradCAM(model, reshape_transform=tokens_to_map)(x, 0)
    # ablating channel k of the tokens is ablating channel k of the feature map, in the fx tail and with full forwards
    for use_tail in (True, False):
        ablation = A.AblationCAM(model, "tokens", reshape_transform=tokens_to_map, use_tail=use_tail)
        torch.testing.assert_close(ablation(x, [0, 3]), A.AblationCAM(model, "act")(x, [0, 3]))
    with pytest.raises(ValueError, match="does not just select and rearrange"):
        A.AblationCAM(model, "tokens", reshape_transform=lambda t: 2 * tokens_to_map(t))(x, 0)


# ------------------------------------------------------------------------------------------- default layer
TORCHVISION = {"resnet18": "layer4", "vgg11": "features", "densenet121": "features", "convnext_tiny": "features",
               "efficientnet_b0": "features", "mobilenet_v3_small": "features", "regnet_x_400mf": "trunk_output"}
TIMM = {"resnet18": "layer4", "efficientnet_b0": "bn2", "convnext_atto": "stages", "regnetx_002": "s4",
        "mobilenetv3_small_050": "blocks", "densenet121": "features"}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_default_layer_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=6).eval()
    x = torch.randn(2, 3, 64, 64)
    assert default_layer(model, x) == TORCHVISION[name]
    out = A.GradCAM(model)(x, [1, 2])
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(TIMM))
def test_default_layer_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=6).eval()
    x = torch.randn(2, 3, 64, 64)
    assert default_layer(model, x) == TIMM[name]
    out = A.GradCAM(model)(x, [1, 2])
    assert out.shape == (2, 1, 64, 64) and torch.isfinite(out).all()


def test_default_layer_skips_stages_without_spatial_extent():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3).eval()
    assert default_layer(model, torch.randn(1, 3, 32, 32)) == "layer3"  # layer4 is 1x1 at 32x32
    assert default_layer(tiny_cnn(), torch.randn(1, 3, 16, 16)) == "5"
    with pytest.raises(ValueError, match="no module whose output is a spatial feature map"):
        default_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


# -------------------------------------------------------------------------------------------------- capture
def test_capture_survives_in_place_ops_after_the_layer_and_removes_its_hooks():
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(inplace=True))
    x = torch.randn(1, 3, 8, 8)
    with LayerCapture([conv]) as capture:
        model(x)
    assert (capture.activations()[0] < 0).any()  # the ReLU after it changed a copy, not what was captured
    assert not conv._forward_hooks
    with pytest.raises(ZeroDivisionError):
        with LayerCapture([conv]):
            1 / 0
    assert not conv._forward_hooks


def test_gradient_only_capture_takes_the_gradient_before_an_in_place_op_without_copying():
    """keep_values=False: d score / d conv output, not d score / d (ReLU'd output), though the ReLU is in place and
    the output is handed on uncopied; asking it for activations is an error."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    handed_on = []
    spy = model[1].register_forward_pre_hook(lambda m, args: handed_on.append(args[0]))
    with LayerCapture([conv], keep_values=False) as capture:
        out = model(x)
    spy.remove()
    assert handed_on[0] is capture.outputs[0]  # no copy
    (grad, grad_x) = capture.gradients(out.sum(), extra=[x])
    pre = conv(x)
    expected, expected_x = torch.autograd.grad(model[2](torch.relu(pre)).sum(), [pre, x])
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(grad_x, expected_x)
    assert (grad[pre < 0] == 0).all() and (grad[pre > 0] != 0).any()
    with pytest.raises(RuntimeError, match="keep_values=False"):
        capture.activations()


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("a backward ran below the CAM layer")


class Guarded(nn.Module):
    def forward(self, x):
        return NoBackward.apply(x)


@pytest.mark.parametrize("method", [A.GradCAM, A.GradCAMPlusPlus, A.HiResCAM, A.LayerCAM, A.EigenGradCAM,
                                    A.ShapleyCAM, A.FinerCAM, A.RefineCAM])
def test_gradient_cams_do_not_backpropagate_below_the_layer(method, x):
    model = cam_cnn()
    model.insert(1, Guarded())
    recorded = []
    model[0].register_forward_hook(lambda m, i, o: recorded.append(o.requires_grad))
    out = method(model, "3")(x, [0, 1])
    assert torch.isfinite(out).all() and recorded == [False]  # nothing below the layer was even recorded
    assert all(p.grad is None for p in model.parameters())
    # create_graph needs the whole graph (parameters below the layer), and a backward through it works
    model[1] = nn.Identity()
    recorded.clear()
    out = method(model, "3")(x, [0, 1], create_graph=True)
    assert recorded == [True] and out.requires_grad
