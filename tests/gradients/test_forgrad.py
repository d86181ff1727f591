"""FORGrad: the low-pass filter against Xplique's procedure written out, pure cosines, wrapped methods, options."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attribution import create
from attribution.core.filters import ideal_low_pass
from attribution.gradients.forgrad import FORGrad
from attribution.gradients.integrated import IntegratedGradients
from attribution.gradients.vanilla import VanillaGradient
from conftest import LinearModel, central_difference, tiny_cnn


def xplique_forgrad(explanations: torch.Tensor, sigma: int) -> torch.Tensor:
    """Xplique's ``forgrad`` written out for square, even-sized (B, H, W, C) or (B, H, W) explanations: channel mean
    (4-D only), |.|, the rfft2 spectrum times the centred disk of radius sigma moved to the corner by fftshift (half
    its columns), back, |.|."""
    size = explanations.shape[1]
    maps = (explanations.mean(dim=-1) if explanations.dim() == 4 else explanations).abs()
    centre = size // 2
    rows = torch.arange(size, dtype=torch.float64)[:, None]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    disk = ((cols - centre) ** 2 + (rows - centre) ** 2).sqrt() <= sigma
    disk = torch.fft.fftshift(disk.to(maps.dtype))[:, :size // 2 + 1]
    return torch.fft.irfft2(torch.fft.rfft2(maps) * disk).abs()


def cosine(height: int, width: int, ky: int, kx: int) -> torch.Tensor:
    rows = torch.arange(height, dtype=torch.float64)[:, None] / height
    cols = torch.arange(width, dtype=torch.float64)[None, :] / width
    return torch.cos(2 * math.pi * (ky * rows + kx * cols))


def test_defaults_are_xpliques():
    assert FORGrad.defaults == {"method": VanillaGradient, "sigma": 15, "reduce": None}
    assert FORGrad(tiny_cnn()).inner_class is VanillaGradient


@pytest.mark.parametrize("sigma", [1, 3, 5, 15])
def test_equals_xpliques_saliency_then_forgrad(sigma):
    """The paper's "FORGrad on Saliency": Xplique's Saliency (max over channels of |gradient|) filtered."""
    model = tiny_cnn()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    saliency = VanillaGradient(model)(x, [0, 2, 4]).abs().amax(dim=1)
    expected = xplique_forgrad(saliency, sigma)[:, None]
    out = FORGrad(model, sigma=sigma)(x, [0, 2, 4])
    assert out.shape == (3, 1, 16, 16) and (out >= 0).all()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(FORGrad(model, sigma=sigma, reduce="max_abs")(x, [0, 2, 4]), expected)


@pytest.mark.parametrize("sigma", [3, 15])
def test_equals_xpliques_forgrad_of_a_channel_mean_map(sigma):
    """Xplique's other methods reduce channels by their mean before ``forgrad``: ``reduce='mean'``, the default
    for every method but the vanilla gradient."""
    model = tiny_cnn()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    gradients = VanillaGradient(model)(x, [0, 2, 4])
    expected = xplique_forgrad(gradients.permute(0, 2, 3, 1), sigma)[:, None]
    torch.testing.assert_close(FORGrad(model, sigma=sigma, reduce="mean")(x, [0, 2, 4]), expected,
                               rtol=1e-5, atol=1e-7)
    products = (x * gradients).permute(0, 2, 3, 1)
    torch.testing.assert_close(FORGrad(model, method="input_x_gradient", sigma=sigma)(x, [0, 2, 4]),
                               xplique_forgrad(products, sigma)[:, None], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("height, width", [(32, 32), (31, 20), (9, 27)])
def test_a_cosine_inside_the_disk_stays_and_one_outside_goes(height, width):
    """A pure cosine of frequency (ky, kx) is kept when ky^2 + kx^2 <= cutoff^2 and removed otherwise, on any size
    (odd ones included: the transform comes back at the maps' own size)."""
    low, high = cosine(height, width, 2, 3), cosine(height, width, 4, 6)
    maps = (low + high).expand(2, 1, height, width)
    torch.testing.assert_close(ideal_low_pass(maps, 4), low.expand(2, 1, height, width))
    torch.testing.assert_close(ideal_low_pass(maps, 8), maps)
    torch.testing.assert_close(ideal_low_pass(maps, 3.5), torch.zeros_like(maps) + (low + high).mean())
    edge = cosine(height, width, 3, 4).expand(1, 1, height, width)  # radius exactly 5: on the disk, kept
    torch.testing.assert_close(ideal_low_pass(edge, 5), edge)
    torch.testing.assert_close(ideal_low_pass(edge, 4.99), torch.zeros_like(edge) + edge.mean())


def test_a_cutoff_beyond_every_frequency_keeps_the_reduced_map():
    model = LinearModel()
    x = torch.randn(2, 3, 8, 8)
    weights = model.linear.weight.view(4, 3, 8, 8)
    torch.testing.assert_close(FORGrad(model, sigma=100)(x, [1, 3]), weights[[1, 3]].abs().amax(dim=1, keepdim=True))
    torch.testing.assert_close(FORGrad(model, sigma=100, reduce="mean")(x, [1, 3]),
                               weights[[1, 3]].mean(dim=1, keepdim=True).abs())


def test_wraps_any_gradient_method_and_passes_its_options():
    model = tiny_cnn()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    inner = IntegratedGradients(model)(x, [1, 2], steps=6)
    expected = ideal_low_pass(inner.mean(dim=1, keepdim=True).abs(), 4).abs()
    torch.testing.assert_close(FORGrad(model, method="integrated_gradients", sigma=4)(x, [1, 2], steps=6), expected)
    torch.testing.assert_close(create("forgrad", model, method=IntegratedGradients, steps=6, sigma=4)(x, [1, 2]),
                               expected)


def test_create_graph_gives_the_maps_parameter_derivative():
    model = tiny_cnn(activation=nn.Tanh).double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = FORGrad(model, sigma=3)
    out = explainer(x, [0, 1], create_graph=True)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), explainer(x, [0, 1]))
    weight = model[0].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(explainer(x, [0, 1], create_graph=True).sum(), weight)
    numeric = central_difference(lambda: explainer(x, [0, 1]).sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("sigma", [0, -2, True, "15", None])
def test_a_bad_sigma_is_named(sigma):
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        FORGrad(tiny_cnn(), sigma=sigma)(torch.randn(1, 3, 16, 16), 0)


def test_a_bad_reduce_is_named():
    with pytest.raises(ValueError, match=r"reduce must be None or one of \('max_abs', 'mean'\), got 'max'"):
        FORGrad(tiny_cnn(), reduce="max")(torch.randn(1, 3, 16, 16), 0)


def test_refuses_a_method_that_is_not_a_gradient_method():
    with pytest.raises((TypeError, ValueError), match="method"):
        FORGrad(tiny_cnn(), method="grad_cam")
