"""LayerCapture: gradients of outputs that nothing recorded leads to (frozen models, branches beside the first
layer), leaves followed by in-place ops, and one gradient per call of a module that runs more than once."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution as A
from attribution.core.capture import LayerCapture


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def freeze(model: nn.Module, frozen: bool = True) -> nn.Module:
    for parameter in model.parameters():
        parameter.requires_grad_(not frozen)
    return model


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("method", [A.GradCAM, A.LayerCAM, A.ShapleyCAM])
def test_several_layers_of_a_frozen_model_equal_the_unfrozen_maps(method, x):
    """``layer3.0.downsample`` runs after ``layer3.0.bn2`` on the block's input, computed before recording started:
    with every parameter frozen its output needs no gradient, yet its gradient is asked for."""
    model = resnet18()
    layers = ["layer3.0.bn2", "layer3.0.downsample"]
    expected = method(model, layers)(x, [1, 3])
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(method(freeze(model), layers)(x, [1, 3]), expected)


@pytest.mark.parametrize("method", [A.GradCAM, A.ShapleyCAM])
def test_create_graph_on_a_frozen_model_equals_the_unfrozen_maps(method, x):
    model = resnet18()
    expected = method(model, "layer3")(x, [1, 3])
    frozen = method(freeze(model), "layer3")(x, [1, 3], create_graph=True)
    torch.testing.assert_close(frozen.detach(), expected, rtol=1e-5, atol=1e-7)
    freeze(model, False)
    both = method(model, ["layer3.0.bn2", "layer3.0.downsample"])(x, [1, 3])
    torch.testing.assert_close(method(freeze(model), ["layer3.0.bn2", "layer3.0.downsample"])(
        x, [1, 3], create_graph=True).detach(), both, rtol=1e-5, atol=1e-7)


class TwoBranches(nn.Module):
    """A stem, then a convolution branch and a parameter-free branch side by side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.free = nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        s = self.stem(x)
        return self.fc(torch.cat([self.conv(s), self.free(s)], 1).mean((2, 3)))


@pytest.mark.parametrize("frozen", [False, True])
def test_a_parameter_free_layer_beside_the_first_one(frozen):
    """``free`` runs after ``conv`` turned recording on, on the stem's unrecorded output: its Grad-CAM is the
    gradient written out, and the two layers together are the mean of each alone."""
    model = freeze(TwoBranches().eval(), frozen)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    classes = torch.tensor([0, 4])
    with torch.no_grad():
        s = model.stem(x)
        branch = model.conv(s)
    free = torch.relu(s).requires_grad_(True)
    scores = model.fc(torch.cat([branch, free], 1).mean((2, 3)))[torch.arange(2), classes]
    (grad,) = torch.autograd.grad(scores.sum(), free)
    expected = torch.relu((grad.mean((2, 3), keepdim=True) * free.detach()).sum(1, keepdim=True))
    alone = A.GradCAM(model, "free")(x, classes)
    torch.testing.assert_close(alone, expected)
    assert float(alone.abs().max()) > 0
    both = A.GradCAM(model, ["conv", "free"])(x, classes)
    torch.testing.assert_close(both, (A.GradCAM(model, "conv")(x, classes) + alone) / 2)


def test_a_gradient_only_leaf_can_be_followed_by_an_in_place_op():
    """keep_values=False with record_from_layer: the layer's output becomes a leaf, and a leaf that requires grad
    cannot take an in-place op; the network gets a copy of it and the gradient is the plain one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), LayerCapture([model[1]], keep_values=False, record_from_layer=True) as capture:
        out = model(x)
    (grad,) = capture.gradients(out.sum())
    pre = model[:2](x).detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(model[3](torch.relu(pre)).sum(), pre)
    torch.testing.assert_close(grad, expected)
    assert (grad[pre < 0] == 0).all() and (grad[pre > 0] != 0).any()


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x))))).mean((2, 3))


def test_call_gradients_give_one_gradient_per_call():
    """A module called twice: one gradient per call (in call order), each equal to the gradient at that call's
    output found by adding a zero tensor there; gradients() keeps the last call's."""
    model = Twice()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with LayerCapture([model.conv], keep_values=False) as capture:
        out = model(x)
    (per_call,), (grad_x,) = capture.call_gradients(out[:, 1].sum(), extra=[x])
    deltas = []

    def add_zero(module, inputs, output):
        deltas.append(torch.zeros_like(output, requires_grad=True))
        return output + deltas[-1]

    handle = model.conv.register_forward_hook(add_zero)
    expected = torch.autograd.grad(model(x)[:, 1].sum(), deltas + [x])
    handle.remove()
    assert len(per_call) == 2
    for mine, theirs in zip(per_call + [grad_x], expected):
        torch.testing.assert_close(mine, theirs)
    assert not torch.allclose(per_call[0], per_call[1])
    with LayerCapture([model.conv], keep_values=False) as capture:
        out = model(x)
    torch.testing.assert_close(capture.gradients(out[:, 1].sum())[0], expected[1])
    with LayerCapture([model.conv]) as capture:
        out = model(x)
    with pytest.raises(RuntimeError, match="keep_values=False"):
        capture.call_gradients(out.sum())
