"""Shared fixtures: toy models with known answers, random images, the pretrained EfficientNet-Lite0."""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make torch ~100x slower when other processes share the cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
from torch import nn

# one intra-op thread per pytest-xdist worker (two workers share the two cores), two otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def tiny_cnn(activation: type = nn.ReLU, classes: int = 5, seed: int = 0, inplace: bool = False) -> nn.Module:
    """A small conv net ending in global average pooling and a linear layer (random, seeded, eval mode)."""
    torch.manual_seed(seed)
    act = (lambda: activation(inplace=True)) if inplace else activation
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        act(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        act(),
        nn.Conv2d(16, 16, 3, padding=1),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )
    return model.eval()


class LinearModel(nn.Module):
    """f(x) = W vec(x) + c: every path method has a closed form on it."""

    def __init__(self, shape=(3, 8, 8), classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(int(torch.tensor(shape).prod()), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class Planted(nn.Module):
    """Two classes: class 0's logit is ``gain`` times the correlation of the image with a noise ``pattern`` inside
    a square (``- bias``), class 1's is 0.  Blurring the square destroys the correlation, so deleting the square (and
    nothing else) drops class 0's probability."""

    def __init__(self, pattern: torch.Tensor, box, gain: float = 8.0, bias: float = 4.0) -> None:
        super().__init__()
        weight = torch.zeros_like(pattern)
        top, left, size = box
        weight[..., top:top + size, left:left + size] = pattern[..., top:top + size, left:left + size]
        self.register_buffer("weight", weight / weight.pow(2).sum())
        self.gain, self.bias = gain, bias

    def forward(self, x):
        logit = self.gain * (x * self.weight).flatten(1).sum(1) - self.bias
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


class CountingModel(nn.Module):
    """Two scores from the image mean; ``calls`` records the rows of every forward (to count a method's passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.mean((1, 2, 3))[:, None].repeat(1, 2)


class RowCounter:
    """The rows of every forward of a model, in order (``rows``), through a forward hook that ``close`` removes."""

    def __init__(self, model: nn.Module) -> None:
        self.rows: list = []
        self.handle = model.register_forward_hook(lambda module, inputs, output: self.rows.append(inputs[0].shape[0]))

    def close(self) -> None:
        self.handle.remove()


def central_difference(value, weight: torch.Tensor, direction: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """``(value() at weight + step direction - value() at weight - step direction) / (2 step)``, the weight restored:
    the directional derivative a map's create_graph gradient is checked against."""
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            weight.add_(sign * step * direction)
            values.append(value())
            weight.sub_(sign * step * direction)
    return (values[0] - values[1]) / (2 * step)


def check_parameter_derivative(value, model: nn.Module, names, rtol: float = 1e-5, atol: float = 1e-12) -> None:
    """``value(create_graph)`` gives a map: its create_graph derivative (of the sum) along a random direction of each
    named parameter of ``model`` is not zero and equals the central difference."""
    for name in names:
        weight = dict(model.named_parameters())[name]
        direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(value(True).sum(), weight)
        assert float(grad.abs().max()) > 0, name
        numeric = central_difference(lambda: value(False).sum(), weight, direction)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=rtol, atol=atol)


def lrp_resnet18(classes: int) -> nn.Module:
    """torchvision's ResNet-18 in float64, random weights and batch-norm statistics, ``eps = 0`` (zennit's merged
    batch norms then compute the identity, so that the LRP reference comparisons are exact)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=classes).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps = 0.0
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model


def tiny_vit(seed: int = 0, classes: int = 5, fused: bool = True, **options) -> nn.Module:
    """A small timm ViT (class token, 4x4 patches on 16x16 inputs, 2 blocks of 2 heads, width 24), random, seeded,
    eval mode; ``options`` replace or add timm ``VisionTransformer`` arguments (``depth``, ``reg_tokens``,
    ``class_token=False`` with ``global_pool='avg'``, ...)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    arguments = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
                 "num_classes": classes, **options}
    model = VisionTransformer(**arguments)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model.eval()


@pytest.fixture
def cnn() -> nn.Module:
    return tiny_cnn()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16)


# ------------------------------------------------------------------------------------- the real, pretrained model
@pytest.fixture(scope="session")
def efficientnet() -> nn.Module:
    from attribution.data import load_efficientnet_lite0

    return load_efficientnet_lite0()


@pytest.fixture(scope="session")
def composite() -> torch.Tensor:
    """Cat on the left, coffee on the right (each a 160x160 square), ImageNet-normalised, (1, 3, 160, 320)."""
    from attribution.data import cat_coffee_composite

    return cat_coffee_composite(side=160)


def cam_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU blocks with non-trivial batch-norm statistics, then global pooling and a linear layer.

    Its block "2" (32 channels at 16x16 for 32x32 inputs) is followed by more convolutions, so gradients there vary
    over positions (unlike at the last block of a GAP+linear net, where every gradient-weighted CAM coincides).
    The classifier is scaled up so that gradients are O(1) rather than O(1e-3) (reference implementations add
    epsilons of 1e-7..1e-6 that would otherwise dominate).
    """
    torch.manual_seed(seed)

    def block(i: int, o: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    model = nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 48, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, classes))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
        model[-1].weight.mul_(100)
    return model.eval()
