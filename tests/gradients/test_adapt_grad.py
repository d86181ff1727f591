"""AdaptGrad: the authors' procedure (saliency.py: AdaptedBound, AdaptedGaussianSigma, GaussianMask, SmoothGradient)
written out image by image with the same draws, the per-entry sigma in closed form, the share of noisy entries
outside the domain against the confidence level, defaults, batch independence, bad options, create_graph."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

import attribution
from attribution.gradients.adapt_grad import AdaptGrad, adaptive_sigma
from attribution.gradients.vanilla import VanillaGradient
from conftest import LinearModel, check_parameter_derivative, tiny_cnn

#: sqrt(2) erfinv(0.95) and sqrt(2) erfinv(0.99): the two-sided 95 % and 99 % points of the standard normal
Z95, Z99 = 1.959963984540054, 2.5758293035489004


def authors_adapt_grad(model, image, label, noise, low, high, confidence):
    """One image (1, C, H, W), written out as the authors' code runs it: the distance to the nearer bound, sigma =
    t / (sqrt(2) erfinv(alpha)), the gradient of the logit at the image and at each noisy copy, averaged over
    all ``len(noise) + 1`` of them.  Returns (their average, the gradient at the image)."""
    t = torch.minimum((image - low).abs(), (image - high).abs())
    sigma = t / (math.sqrt(2) * torch.erfinv(torch.tensor(confidence, dtype=torch.float64)))
    grads = []
    for mask in [torch.zeros_like(image)] + [n.unsqueeze(0).to(image.dtype) * sigma for n in noise]:
        point = (image + mask).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point)[:, label].sum(), point)
        grads.append(grad)
    return torch.stack(grads).mean(0), grads[0]


@pytest.mark.parametrize("bounds", ["numbers", "per_channel", "per_image"])
def test_equals_the_authors_procedure_written_out(bounds):
    """Same draws: ours averages the noisy gradients only, theirs the clean one too, so theirs * (n + 1) - clean
    equals ours * n."""
    model = tiny_cnn().double()
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) - torch.tensor([0.485, 0.456, 0.406],
         dtype=torch.float64).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    labels, n, confidence = [3, 1], 6, 0.99
    if bounds == "numbers":  # the authors' ImageNet bounds
        options, low, high = {"low": -2.117904, "high": 2.64}, [-2.117904] * 2, [2.64] * 2
    elif bounds == "per_channel":
        lo = (0 - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)) / torch.tensor([0.229, 0.224, 0.225])
        hi = (1 - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)) / torch.tensor([0.229, 0.224, 0.225])
        options = {"low": lo.view(3, 1, 1), "high": hi.view(3, 1, 1)}
        low, high = [lo.view(1, 3, 1, 1)] * 2, [hi.view(1, 3, 1, 1)] * 2
    else:  # the default: each image's own minimum and maximum
        options, low, high = {}, [x[b].min() for b in range(2)], [x[b].max() for b in range(2)]
    noise = torch.randn(2, n, 3, 16, 16, generator=torch.Generator().manual_seed(7))  # (B, samples, C, H, W)
    ours = AdaptGrad(model)(x, labels, samples=n, confidence=confidence,
                            generator=torch.Generator().manual_seed(7), **options)
    for b in range(2):
        theirs, clean = authors_adapt_grad(model, x[b:b + 1], labels[b], noise[b], low[b], high[b], confidence)
        torch.testing.assert_close(ours[b:b + 1], (theirs * (n + 1) - clean) / n, rtol=1e-9, atol=1e-12)
        assert (ours[b:b + 1] - clean).abs().max() > 0.05 * clean.abs().max()  # the noise does change the map


def test_sigma_is_the_distance_to_the_nearer_bound_over_the_normal_quantile():
    x = torch.tensor([[0.1, 0.5], [0.97, -0.2]], dtype=torch.float64).view(1, 1, 2, 2)
    # by hand: distances 0.1, 0.5, 0.03 and (outside the domain, by absolute values as the authors) 0.2
    expected = torch.tensor([0.1, 0.5, 0.03, 0.2], dtype=torch.float64).view(1, 1, 2, 2)
    torch.testing.assert_close(adaptive_sigma(x, 0.0, 1.0, 0.95), expected / Z95, rtol=1e-12, atol=0)
    torch.testing.assert_close(adaptive_sigma(x, 0, 1, 0.99), expected / Z99, rtol=1e-12, atol=0)
    # per image (the default): the domain is [-0.2, 0.97], so distances 0.3, 0.47, 0 and 0
    torch.testing.assert_close(adaptive_sigma(x), torch.tensor([0.3, 0.47, 0, 0], dtype=torch.float64).view(
        1, 1, 2, 2) / Z95, rtol=1e-12, atol=1e-15)
    # per channel: channel 0 in [0, 1], channel 1 in [-1, 3]
    two = torch.tensor([0.2, 0.7, 0.5, 2.0], dtype=torch.float64).view(1, 2, 2, 1)
    sigma = adaptive_sigma(two, torch.tensor([0.0, -1.0]).view(2, 1, 1), torch.tensor([1.0, 3.0]).view(2, 1, 1))
    torch.testing.assert_close(sigma.flatten(), torch.tensor([0.2, 0.3, 1.5, 1.0], dtype=torch.float64) / Z95)
    assert sigma.dtype == torch.float64 and adaptive_sigma(x.float()).dtype == torch.float32
    assert (adaptive_sigma(x, 0, 1, 1.0) == 0).all() and (adaptive_sigma(x, 0, 1, 1 - 1e-17) == 0).all()


def test_full_confidence_is_the_wrapped_method_without_noise():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    for method, options in (("vanilla_gradient", {}), ("integrated_gradients", {"steps": 3})):
        plain = attribution.create(method, model)(x, [0, 3], **options)
        torch.testing.assert_close(AdaptGrad(model, method=method)(x, [0, 3], samples=2, confidence=1, **options),
                                   plain)


def test_the_noise_leaves_the_domain_as_often_as_the_confidence_level_allows():
    """20,000 noisy copies of a 2 x 2 image in [0, 1]: midway between the bounds 1 - c of the draws leave the
    domain, near one bound (1 - c) / 2 plus the far tail, on a bound none; everywhere 1 - c of them leave
    [x - d, x + d], and the draws' standard deviation is sigma."""
    model, samples, c = LinearModel(shape=(1, 2, 2), classes=2), 20000, 0.95
    rows = []
    handle = model.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].detach()))
    x = torch.tensor([0.5, 0.2, 0.9, 1.0], dtype=torch.float64).view(1, 1, 2, 2)
    try:
        AdaptGrad(model.double())(x, 0, samples=samples, low=0, high=1, generator=torch.Generator().manual_seed(3))
    finally:
        handle.remove()
    noisy = torch.cat(rows).flatten(1)
    assert noisy.shape == (samples, 4)
    values = x.flatten()
    d = torch.minimum(values, 1 - values)
    outside = ((noisy < 0) | (noisy > 1)).double().mean(0)
    normal = NormalDist()
    expected = torch.tensor([normal.cdf(-v / s) + normal.cdf(-(1 - v) / s) if s > 0 else 0.0
                             for v, s in zip(values.tolist(), (d / Z95).tolist())], dtype=torch.float64)
    torch.testing.assert_close(expected[:3], torch.tensor([0.05, 0.025, 0.025], dtype=torch.float64), atol=1e-9,
                               rtol=0)
    tolerance = 4.5 * (expected * (1 - expected) / samples).sqrt()  # 4.5 binomial standard deviations
    assert ((outside - expected).abs() <= tolerance).all(), (outside, expected)
    assert outside[3] == 0 and (noisy[:, 3] == 1).all()  # on a bound: no noise
    beyond = ((noisy - values).abs() > d).double().mean(0)[:3]
    assert ((beyond - (1 - c)).abs() <= 4.5 * math.sqrt(c * (1 - c) / samples)).all(), beyond
    torch.testing.assert_close(noisy.std(0)[:3], d[:3] / Z95, rtol=0.02, atol=0)


def test_vargrad_of_input_x_gradient_on_a_linear_model_is_sigma_squared_w_squared():
    """E[(x + e) w] = x w and Var[(x + e) w] = sigma^2 w^2 entry by entry, sigma from each image's own range."""
    model = LinearModel().double()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    x[1] = x[1] * 5 - 1
    w = model.linear.weight.detach()[[0, 2]].view(2, 3, 8, 8)
    explainer = AdaptGrad(model, method="input_x_gradient", samples=4000, generator=torch.Generator().manual_seed(1))
    var = explainer(x, [0, 2], variant="vargrad")
    sigma = adaptive_sigma(x)
    torch.testing.assert_close(var, sigma.square() * w.square(), rtol=0.12, atol=1e-12)
    assert (var.flatten(1).abs().min(1).values < 1e-15).all()  # each image's extremes get no noise
    torch.testing.assert_close(explainer(x, [0, 2]), x * w, rtol=0, atol=0.02 * (x * w).abs().max().item())


def test_the_gradient_of_a_linear_model_ignores_the_noise():
    model, x = LinearModel().double(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = model.linear.weight.detach()[[1, 3]].view(2, 3, 8, 8)
    explainer = AdaptGrad(model, samples=3)
    torch.testing.assert_close(explainer(x, [1, 3]), w)
    torch.testing.assert_close(explainer(x, [1, 3], variant="smoothgrad_sq"), w.square())
    torch.testing.assert_close(explainer(x, [1, 3], process=torch.abs), w.abs())
    torch.testing.assert_close(explainer(x, [1, 3], variant="vargrad"), torch.zeros_like(w), atol=1e-15, rtol=0)


def test_defaults_are_the_authors():
    """samples=50 (n_samples) and confidence=0.95 (adapt_alpha) of experiments/get_salience_*.py, the vanilla
    gradient inside, the data domain per image unless given."""
    assert AdaptGrad.defaults == {"method": VanillaGradient, "samples": 50, "confidence": 0.95, "low": None,
                                  "high": None, "variant": "smoothgrad", "process": None, "generator": None}
    assert attribution.get_method("adapt_grad") is AdaptGrad
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    rows = []
    handle = model.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[0]))
    try:
        AdaptGrad(model)(x, 2)
    finally:
        handle.remove()
    assert sum(rows) == 50


def test_two_images_together_equal_each_alone():
    """The draws are image-major, so image 1 alone sees image 0's draws unless the generator has moved past them
    (C * H * W = 768 is a multiple of 16, where CPU draws of consecutive blocks equal one draw of the whole)."""
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    explainer = AdaptGrad(model, samples=4)
    both = explainer(x, [0, 4], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(both[:1], explainer(x[:1], [0], generator=torch.Generator().manual_seed(5)))
    moved = torch.Generator().manual_seed(5)
    torch.randn(4, 3, 16, 16, generator=moved)
    torch.testing.assert_close(both[1:], explainer(x[1:], [4], generator=moved))
    torch.testing.assert_close(explainer(x, [0, 4], batch_size=3, generator=torch.Generator().manual_seed(5)), both)


def test_create_graph_matches_finite_differences():
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    explainer = AdaptGrad(model, samples=3)

    def value(create_graph=False):
        return explainer(x, [1, 3], create_graph=create_graph, generator=torch.Generator().manual_seed(4)).square()

    check_parameter_derivative(value, model, ("8.weight", "0.weight"))  # the classifier, the first convolution


@pytest.mark.parametrize("options, error, match", [
    ({"confidence": 0}, ValueError, r"confidence must be a number in \(0, 1\], got 0"),
    ({"confidence": 1.01}, ValueError, r"confidence .* got 1\.01"),
    ({"confidence": 95}, ValueError, r"confidence .* got 95"),
    ({"confidence": True}, ValueError, r"confidence .* got True"),
    ({"confidence": "0.95"}, ValueError, r"confidence .* got '0\.95'"),
    ({"samples": 0}, ValueError, r"samples must be a positive int, got 0"),
    ({"samples": 2.0}, ValueError, r"samples must be a positive int, got 2\.0"),
    ({"low": 1.0, "high": 0.0}, ValueError, r"low must be below high, got low=1\.0, high=0\.0"),
    ({"low": 0.5, "high": 0.5}, ValueError, r"low must be below high"),
    ({"low": "zero"}, ValueError, r"low must be None, a finite number or a tensor, got 'zero'"),
    ({"high": float("inf")}, ValueError, r"high must be None, a finite number or a tensor, got inf"),
    ({"low": torch.zeros(3, dtype=torch.long)}, ValueError, r"low must be a floating-point tensor"),
    ({"low": torch.zeros(4, 1, 1)}, ValueError, r"low of shape \(4, 1, 1\) does not broadcast .* \(2, 3, 16, 16\)"),
    ({"high": torch.ones(3, 3, 16, 16)}, ValueError, r"high of shape \(3, 3, 16, 16\) does not broadcast"),
    ({"variant": "adaptgrad"}, ValueError, r"variant must be one of .*'adaptgrad'"),
    ({"variant": "vargrad", "process": torch.abs}, ValueError, r"process applies to the 'smoothgrad' variant"),
    ({"confidnce": 0.9}, TypeError, r"unknown option 'confidnce'; did you mean 'confidence'"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        AdaptGrad(tiny_cnn(), samples=2)(torch.randn(2, 3, 16, 16), [0, 1], **options)


def test_the_wrapped_method_must_be_a_gradient_method():
    with pytest.raises(TypeError, match="AdaptGrad's method must be a GradientExplainer"):
        AdaptGrad(tiny_cnn(), method="grad_cam")
    # a wrapped method's own options pass through
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    out = AdaptGrad(model, method="integrated_gradients", samples=2)(x, 1, steps=3, baseline="zero")
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
