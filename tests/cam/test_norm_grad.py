"""NormGrad: TorchRay's formulas written out on captured activations and gradients, and the virtual identity layer
made real."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from conftest import tiny_cnn


def captured(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes):
    """The layer's output and the gradient of the targets' logits w.r.t. it (TorchRay's Probe, by hand)."""
    kept = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: kept.update(a=output))
    out = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(out[torch.arange(len(classes)), classes].sum(), kept["a"])
    return kept["a"].detach(), grad


@pytest.mark.parametrize("variant", ["identity", "selective"])
def test_equals_torchrays_formulas(variant):
    model, classes = tiny_cnn().double(), [1, 3]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, g = captured(model, model[3], x, classes)
    if variant == "identity":  # gradient_to_norm_grad_saliency: torch.norm(x.grad, 2, 1) * torch.norm(x, 2, 1)
        expected = torch.norm(g, 2, 1, keepdim=True) * torch.norm(a, 2, 1, keepdim=True)
    else:  # gradient_to_norm_grad_selective_saliency: torch.norm(clamp(x * x.grad, min=0), 2, 1)
        expected = torch.norm(torch.clamp(a * g, min=0), 2, 1, keepdim=True)
    expected = F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    ours = attribution.NormGrad(model, target_layer="3")(x, classes, variant=variant)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected)


def test_is_the_weight_gradient_norm_of_a_real_identity_layer():
    """With the layer at 1x1 resolution, a real 1x1 identity convolution inserted after it receives the weight
    gradient g a^T, whose Frobenius norm is the map's value."""
    torch.manual_seed(0)
    identity = nn.Conv2d(6, 6, 1, bias=False).double()
    with torch.no_grad():
        identity.weight.copy_(torch.eye(6, dtype=torch.float64)[:, :, None, None])
    features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).double()
    head = nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    head(identity(features(x)))[0, 2].backward()
    ours = attribution.NormGrad(nn.Sequential(features, head), target_layer="0.2")(x, 2)
    torch.testing.assert_close(ours, torch.full_like(ours, float(identity.weight.grad.norm())))


def test_before_a_pooled_linear_head_the_identity_map_ignores_the_class():
    """Global average pooling then a linear layer: dy/dA is the class's weight row / hw at every location, so the
    map is ||a|| times a constant that depends on the class: two classes' maps are proportional."""
    model = tiny_cnn().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first, second = (attribution.NormGrad(model, target_layer="5")(x, c) for c in (0, 4))
    ratio = first / second
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0])))


def test_bad_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        attribution.NormGrad(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, variant="proper")
