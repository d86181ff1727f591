"""Guided AbsoluteGrad: the authors' algorithm written out one image and one noisy copy at a time, closed forms on
models with known gradients (a linear model's variance is zero, so its guided map is), SmoothGrad's noise, options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import SmoothGrad
from attribution.gradients import smoothgrad
from attribution.gradients.guided_absolute_grad import GuidedAbsoluteGrad, linear_quantile
from attribution.gradients.vanilla import VanillaGradient
from conftest import LinearModel, central_difference, tiny_cnn


def gradient_of_row(model, row, target):
    """The vanilla gradient of one (C, H, W) row."""
    row = row.unsqueeze(0).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(row)[0, target], row)
    return grad[0]


def authors_algorithm(model, x, targets, noise, std, percentile, map_of=gradient_of_row):
    """Guided AbsoluteGrad as the authors' code computes it, one image and one noisy copy at a time (noise relative
    to each image's own range here): gradients of the noisy copies, their unbiased variance over the copies, the
    guide (1 above the channel's th-quantile of the variances, the variance below; all ones without a guide), the sum
    of |gradient| x guide over the copies, |.| summed over channels, min-max scaled.  ``noise`` is (B, S, C, H, W)."""
    maps = []
    for i in range(x.shape[0]):
        image = x[i]
        sigma = std * (image.max() - image.min())
        grads = [map_of(model, image + sigma * noise[i, s], targets[i]) for s in range(noise.shape[1])]
        channels, height, width = image.shape
        if percentile is None:
            guide = torch.ones_like(image)
        else:
            variance = torch.stack(grads, dim=3).var(dim=3)
            threshold = torch.quantile(variance.reshape(channels, height * width), percentile / 100, dim=1)
            guide = torch.where(variance > threshold.view(channels, 1, 1), torch.ones_like(variance), variance)
        total = torch.zeros_like(image)
        for grad in grads:
            total = total + grad.abs() * guide
        summed = total.abs().sum(0)
        summed = summed - summed.min()
        maps.append(summed / summed.max())
    return torch.stack(maps).unsqueeze(1)


def drawn_noise(seed, batch, samples, shape):
    """The standard-normal draws of ``samples`` copies of ``batch`` images as SmoothGrad draws them (one draw,
    image-major, also when the copies come in groups): (batch, samples, *shape)."""
    return torch.randn((batch, samples) + shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("percentile", [85.0, 40.0, None])
def test_equals_the_authors_algorithm_written_out(percentile):
    model = tiny_cnn().double()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = [0, 3, 1]
    expected = authors_algorithm(model, x, targets, drawn_noise(4, 3, 5, (3, 16, 16)).double(), 0.2, percentile)
    ours = GuidedAbsoluteGrad(model)(x, targets, samples=5, std=0.2, percentile=percentile,
                                     generator=torch.Generator().manual_seed(4))
    assert ours.shape == (3, 1, 16, 16) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    if percentile is not None:  # the guide does change the map
        unguided = GuidedAbsoluteGrad(model)(x, targets, samples=5, std=0.2, percentile=None,
                                             generator=torch.Generator().manual_seed(4))
        assert (ours - unguided).abs().max() > 0.1


def test_wrapped_method_inside_the_noise():
    """``method`` replaces the vanilla gradient of each noisy copy (here input x gradient)."""
    model, x = tiny_cnn().double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def input_x_gradient(model, row, target):
        return row * gradient_of_row(model, row, target)

    expected = authors_algorithm(model, x, [2, 4], drawn_noise(0, 2, 4, (3, 16, 16)).double(), 0.15, 85.0,
                                 map_of=input_x_gradient)
    ours = GuidedAbsoluteGrad(model, method="input_x_gradient")(x, [2, 4], samples=4,
                                                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_noise_groups_are_smoothgrads(monkeypatch):
    """Under a small byte budget the copies come in groups (two copies of each image per group here), with the
    noise SmoothGrad draws (one draw for all groups): without the guide the map is SmoothGrad(process=abs) summed
    over channels, min-max."""
    model = tiny_cnn()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(smoothgrad, "NOISY_COPY_BYTES", 2 * 3 * x[0].numel() * x.element_size())
    expected = authors_algorithm(model, x, [1, 0, 2], drawn_noise(6, 3, 5, (3, 16, 16)), 0.15, 85.0)
    ours = GuidedAbsoluteGrad(model)(x, [1, 0, 2], samples=5, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)

    smooth = SmoothGrad(model)(x, [1, 0, 2], samples=5, process=torch.abs, generator=torch.Generator().manual_seed(6))
    summed = smooth.sum(dim=1, keepdim=True).flatten(1)
    summed = (summed - summed.amin(1, keepdim=True)) / (summed.amax(1, keepdim=True) - summed.amin(1, keepdim=True))
    unguided = GuidedAbsoluteGrad(model)(x, [1, 0, 2], samples=5, percentile=None,
                                         generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(unguided, summed.view_as(unguided), rtol=1e-5, atol=1e-6)


class Quadratic(nn.Module):
    """f_k(x) = <w_k, x> + <a, x^2> / 2: the input gradient of class t is w_t + a * x."""

    def __init__(self, a: torch.Tensor, classes: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn((classes,) + tuple(a.shape), generator=torch.Generator().manual_seed(8)))
        self.a = nn.Parameter(a)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.w) + 0.5 * (self.a * x.square()).sum((1, 2, 3))[:, None]


def test_guide_keeps_the_pixels_that_vary_and_zeroes_the_constant_ones():
    """a = 0 outside a 4x4 patch: there the gradient w_t is the same for every copy (variance 0, the 85th percentile
    of each channel's variances is 0, guide = variance = 0), inside it varies (guide 1): the map is the plain sum
    of |w_t + a (x + sigma e_s)| inside the patch, min-max scaled, and exactly 0 outside."""
    a = torch.zeros(3, 16, 16, dtype=torch.float64)
    a[:, 4:8, 9:13] = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
    model = Quadratic(a).double()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noise = drawn_noise(5, 2, 6, (3, 16, 16)).double()
    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(2, 1, 1, 1, 1)
    grads = model.w.detach()[[2, 0]].unsqueeze(1) + a * (x.unsqueeze(1) + sigma * noise)  # (2, 6, 3, 16, 16)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:8, 9:13] = True
    expected = grads.abs().sum((1, 2)) * inside
    expected = expected / expected.flatten(1).amax(1).view(2, 1, 1)

    ours = GuidedAbsoluteGrad(model)(x, [2, 0], samples=6, generator=torch.Generator().manual_seed(5))[:, 0]
    assert (ours[:, ~inside] == 0).all()
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


def test_closed_form_on_a_quadratic_model():
    """a everywhere: variance a^2 sigma^2 var_s(e_s) per pixel, guide 1 above each channel's percentile."""
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = Quadratic(a).double()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    noise = drawn_noise(1, 2, 4, (3, 16, 16)).double()
    sigma = 0.3 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(2, 1, 1, 1)
    grads = model.w.detach()[[1, 1]].unsqueeze(1) + a * (x.unsqueeze(1) + sigma.unsqueeze(1) * noise)
    variance = (a * sigma).square() * noise.var(dim=1)
    threshold = torch.quantile(variance.flatten(2), 0.6, dim=2)[..., None, None]
    guide = torch.where(variance > threshold, torch.ones_like(variance), variance)
    expected = (guide * grads.abs().sum(1)).sum(1)
    low = expected.flatten(1).amin(1).view(2, 1, 1)
    expected = (expected - low) / (expected.flatten(1).amax(1).view(2, 1, 1) - low)

    ours = GuidedAbsoluteGrad(model)(x, [1, 1], samples=4, std=0.3, percentile=60,
                                     generator=torch.Generator().manual_seed(1))[:, 0]
    assert ((guide == 1).flatten(2).double().mean(2) - 0.4).abs().max() < 0.01  # 40% of each channel above
    torch.testing.assert_close(ours, expected, rtol=1e-8, atol=1e-10)


def test_linear_model_has_no_variance_so_the_guided_map_is_zero():
    """f(x) = W x + c: the gradient W_t is the same at every noisy copy, exactly; variance 0 everywhere, guide 0,
    map 0.  Without the guide (AbsoluteGrad) the map is sum_c |W_t|, min-max scaled, whatever the noise."""
    model = LinearModel(shape=(3, 8, 8), classes=4)
    x = torch.randn(2, 3, 8, 8)
    guided = GuidedAbsoluteGrad(model)(x, [3, 1], samples=5, std=0.5)
    assert torch.equal(guided, torch.zeros(2, 1, 8, 8))
    weights = model.linear.weight.detach()[[3, 1]].view(2, 3, 8, 8).abs().sum(1).flatten(1)
    low = weights.amin(1, keepdim=True)
    expected = ((weights - low) / (weights.amax(1, keepdim=True) - low)).view(2, 1, 8, 8)
    torch.testing.assert_close(GuidedAbsoluteGrad(model)(x, [3, 1], samples=5, std=0.5, percentile=None), expected)
    # no noise at all: the same zero variance
    assert torch.equal(GuidedAbsoluteGrad(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, std=0.0),
                       torch.zeros(1, 1, 16, 16))


def test_defaults_are_the_authors():
    """samples 10 and std 0.15 (their function's defaults), the 85th percentile (th=0.85: their reported runs)."""
    assert GuidedAbsoluteGrad.defaults == {"method": VanillaGradient, "samples": 10, "std": 0.15, "percentile": 85.0,
                                           "generator": None}
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    explicit = GuidedAbsoluteGrad(model)(x, 2, samples=10, std=0.15, percentile=85.0,
                                         generator=torch.Generator().manual_seed(0))
    default = GuidedAbsoluteGrad(model)(x, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default, explicit)
    assert GuidedAbsoluteGrad.name == "guided_absolute_grad"


def test_batch_independence_with_the_same_draws():
    """Image-major draws: image 0 of a batch gets the draws of image 0 alone, image 1 the draws after them; each
    image's noise scale is its own range (the authors' batch-wide range would couple them)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x[1] *= 5.0
    batch = GuidedAbsoluteGrad(model)(x, [1, 4], samples=3, generator=torch.Generator().manual_seed(9))
    first = GuidedAbsoluteGrad(model)(x[:1], 1, samples=3, generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(9)
    torch.randn((1, 3, 3, 16, 16), generator=generator)  # image 0's draws
    second = GuidedAbsoluteGrad(model)(x[1:], 4, samples=3, generator=generator)
    torch.testing.assert_close(batch, torch.cat([first, second]), rtol=1e-5, atol=1e-6)


def test_batch_size_changes_nothing():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    maps = [GuidedAbsoluteGrad(model)(x, [0, 1], samples=4, batch_size=size, generator=torch.Generator().manual_seed(2))
            for size in (1, 3, None)]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], rtol=1e-5, atol=1e-6)


def test_create_graph_matches_finite_differences():
    """The map is differentiable w.r.t. the parameters (through |g_s| and the variances below the threshold)."""
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    weight = model[2].weight
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def value(create_graph=False):
        out = GuidedAbsoluteGrad(model)(x, [0, 3], samples=4, percentile=50, create_graph=create_graph,
                                        generator=torch.Generator().manual_seed(8))
        return (out * weights).sum()

    (grad,) = torch.autograd.grad(value(create_graph=True), weight)
    numeric = central_difference(value, weight, direction)
    assert numeric.abs() > 1e-3
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-8)


def test_linear_quantile_is_torch_quantile():
    values = torch.randn(6, 37, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for fraction in (0.0, 0.1, 0.5, 0.85, 35 / 36, 1.0):
        torch.testing.assert_close(linear_quantile(values, fraction),
                                   torch.quantile(values, fraction, dim=1, keepdim=True), rtol=1e-12, atol=1e-14)


def test_bad_options():
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    explainer = GuidedAbsoluteGrad(model)
    with pytest.raises(ValueError, match="samples must be a positive int, got 0"):
        explainer(x, 0, samples=0)
    with pytest.raises(ValueError, match="samples must be a positive int, got True"):
        explainer(x, 0, samples=True)
    with pytest.raises(ValueError, match="samples must be at least 2 for the variance guide, got 1"):
        explainer(x, 0, samples=1)
    assert explainer(x, 0, samples=1, percentile=None).shape == (1, 1, 16, 16)
    for std in (-0.1, True, "0.1"):
        with pytest.raises(ValueError, match="std must be a non-negative number"):
            explainer(x, 0, std=std)
    for percentile in (101, -1, True, "85", 0.85j):
        with pytest.raises(ValueError, match=r"percentile must lie in \[0, 100\] or be None"):
            explainer(x, 0, percentile=percentile)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        explainer(x, 0, generator=5)
    with pytest.raises(TypeError, match="GuidedAbsoluteGrad's method must be a GradientExplainer"):
        GuidedAbsoluteGrad(model, method="grad_cam")
    with pytest.raises(TypeError, match="unknown option 'percentil'.*'percentile'"):
        explainer(x, 0, percentil=80)
