"""SmoothTaylor: the authors' procedure (attribution/analyzer.py: smooth_taylor, get_gradients) written out image by
image with the same draws, closed forms on linear and quadratic models, zero noise, defaults, batch independence,
bad options, create_graph against finite differences."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution
from attribution.gradients.smooth_taylor import SmoothTaylor, root_sigma
from conftest import LinearModel, RowCounter, check_parameter_derivative, tiny_cnn


def authors_smooth_taylor(model, image, label, noise, noise_scale, percent, batch_size):
    """One image (C, H, W), written out as the authors' code runs it: roots ``image + noise_scale * n_j`` (the
    scale times the image's max - min with ``percent``), the gradients of the logit ``out[:, label]`` at the roots
    ``batch_size`` roots at a time, then the mean over the roots of ``(image - root) * gradient``."""
    if percent:
        noise_scale = noise_scale * (image.max() - image.min())
    roots = torch.stack([image + noise_scale * n for n in noise])
    gradients = []
    for start in range(0, len(roots), batch_size):
        inputs = roots[start:start + batch_size].clone().requires_grad_(True)
        model(inputs)[:, label].sum().backward()
        gradients.append(inputs.grad.detach())
    model.zero_grad()
    gradients = torch.cat(gradients)
    return torch.stack([(image - roots[j]) * gradients[j] for j in range(len(roots))]).mean(0)


def same_noise(samples, shape, seed, dtype=torch.float64):
    """The draws SmoothTaylor makes with ``torch.Generator().manual_seed(seed)``: (samples, C, H, W) in float32,
    whatever the input's dtype, returned in ``dtype``."""
    return torch.randn((samples,) + tuple(shape), generator=torch.Generator().manual_seed(seed)).to(dtype)


class Quadratic(nn.Module):
    """Class k's score ``0.5 x^T A_k x + b_k^T x`` on flattened (1, 2, 2) images: Hessian ``A_k``, symmetric."""

    def __init__(self, classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(classes, 4, 4, generator=gen, dtype=torch.float64)
        self.register_buffer("hessian", m + m.transpose(1, 2))
        self.register_buffer("linear", torch.randn(classes, 4, generator=gen, dtype=torch.float64))

    def forward(self, x):
        v = x.flatten(1)
        return 0.5 * torch.einsum("bi,kij,bj->bk", v, self.hessian, v) + v @ self.linear.T


@pytest.mark.parametrize("percent", [False, True])
def test_equals_the_authors_procedure_written_out(percent):
    model = tiny_cnn().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    x[1] = 3 * x[1] + 1
    labels, n, scale = [3, 1], 7, 0.15 if percent else 0.5
    ours = SmoothTaylor(model)(x, labels, samples=n, noise_scale=scale, relative=percent, batch_size=3,
                               generator=torch.Generator().manual_seed(7))
    noise = same_noise(n, x.shape[1:], 7)
    for b in range(2):
        theirs = authors_smooth_taylor(model, x[b], labels[b], noise, scale, percent, batch_size=4)
        torch.testing.assert_close(ours[b], theirs, rtol=1e-10, atol=1e-13)
    assert ours.abs().amax() > 0 and not torch.allclose(ours[0], ours[1])


def test_linear_model_is_minus_sigma_w_times_the_mean_noise():
    """grad f = W everywhere, so A = mean_j W * (x - z_j) = -sigma W * mean_j n_j with the same draws."""
    model = LinearModel().double()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[1] = 4 * x[1] - 2
    w = model.linear.weight.detach()[[0, 2]].view(2, 3, 8, 8)
    noise = same_noise(5, x.shape[1:], 3)
    for relative, sigma in ((False, torch.tensor([0.3, 0.3], dtype=torch.float64)),
                            (True, 0.3 * (x.flatten(1).amax(1) - x.flatten(1).amin(1)))):
        ours = SmoothTaylor(model, samples=5, noise_scale=0.3, relative=relative)(
            x, [0, 2], generator=torch.Generator().manual_seed(3))
        roots = x.unsqueeze(1) + sigma.view(2, 1, 1, 1, 1) * noise  # (B, samples, C, H, W)
        torch.testing.assert_close(ours, (w.unsqueeze(1) * (x.unsqueeze(1) - roots)).mean(1), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours, -sigma.view(2, 1, 1, 1) * w * noise.mean(0), rtol=1e-10, atol=1e-15)


def test_quadratic_model_with_the_same_draws_and_in_expectation():
    """grad f(z) = A z + b, z = x + sigma n: A_map = mean_j [-sigma n_j (A x + b) - sigma^2 n_j (A n_j)], whose
    expectation is -sigma^2 diag(A) whatever x (the second-order Taylor remainder)."""
    model, sigma = Quadratic(), 0.4
    x = torch.tensor([[0.5, -1.0, 2.0, 0.3], [1.5, 0.2, -0.7, -2.0]], dtype=torch.float64).view(2, 1, 2, 2)
    labels = [0, 1]
    hess, lin = model.hessian[labels], model.linear[labels]  # (B, 4, 4), (B, 4)
    n = 4
    ours = SmoothTaylor(model, samples=n, noise_scale=sigma)(x, labels, generator=torch.Generator().manual_seed(2))
    noise = same_noise(n, (1, 2, 2), 2).flatten(1)  # (samples, 4)
    grad_x = torch.einsum("bij,bj->bi", hess, x.flatten(1)) + lin  # (B, 4)
    exact = (-sigma * noise[None] * grad_x[:, None] - sigma ** 2 * noise[None] * torch.einsum(
        "bij,sj->bsi", hess, noise)).mean(1)
    torch.testing.assert_close(ours.flatten(1), exact, rtol=1e-12, atol=1e-14)
    # Monte Carlo: 40,000 roots of a 4-feature model, within 5 standard errors of -sigma^2 diag(A)
    many = 40000
    big = SmoothTaylor(model, samples=many, noise_scale=sigma, batch_size=many)(
        x, labels, generator=torch.Generator().manual_seed(5)).flatten(1)
    noise = same_noise(many, (1, 2, 2), 5).flatten(1)
    terms = -sigma * noise[None] * (grad_x[:, None] + sigma * torch.einsum("bij,sj->bsi", hess, noise))
    torch.testing.assert_close(big, terms.mean(1), rtol=1e-10, atol=1e-12)
    expected = -sigma ** 2 * torch.diagonal(hess, dim1=1, dim2=2)
    error = terms.std(1) / many ** 0.5
    assert ((big - expected).abs() <= 5 * error).all(), (big, expected, error)
    assert (expected.abs() > 10 * error).any()  # the expectation is resolved, not lost in the noise


def test_zero_noise_gives_zeros():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert (SmoothTaylor(model, samples=3, noise_scale=0)(x, [0, 1]) == 0).all()
    constant = torch.full((1, 3, 16, 16), 0.7)  # relative noise on an image with no range: no noise
    assert (SmoothTaylor(model, samples=3, relative=True)(constant, 2) == 0).all()


def test_defaults_are_the_authors():
    """num_roots=150 and noise_scale=5e-1 (absolute, ``--noise_percent`` off) of experiment_smooth_taylor.py; one
    forward and input-gradient backward per root, and one arg-max forward for target=None."""
    assert SmoothTaylor.defaults == {"samples": 150, "noise_scale": 0.5, "relative": False, "generator": None}
    assert attribution.get_method("smooth_taylor") is SmoothTaylor
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    counter = RowCounter(model)
    try:
        default = SmoothTaylor(model)(x, None, generator=torch.Generator().manual_seed(1), batch_size=50)
    finally:
        counter.close()
    assert counter.rows == [1, 50, 50, 50]
    label = int(model(x).argmax())
    explicit = SmoothTaylor(model, samples=150, noise_scale=0.5)(x, label, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(default, explicit, rtol=1e-5, atol=1e-7)
    sigma = root_sigma(x, 0.5, False)
    assert sigma.shape == (1, 1, 1, 1) and float(sigma) == 0.5


def test_batch_independence_and_batch_size_independence():
    model = tiny_cnn().double()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    explainer = SmoothTaylor(model, samples=5, relative=True, noise_scale=0.2)
    batch = explainer(x, [4, 0, 2], generator=torch.Generator().manual_seed(9), batch_size=4)
    for i, t in enumerate([4, 0, 2]):
        alone = explainer(x[i:i + 1], t, generator=torch.Generator().manual_seed(9), batch_size=1)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-12, atol=1e-15)
    seeded = explainer(x, [4, 0, 2], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(seeded, batch, rtol=1e-12, atol=1e-15)
    assert not torch.equal(explainer(x, [4, 0, 2], generator=torch.Generator().manual_seed(10)), batch)


def test_float32_input_sums_in_float32_and_agrees_with_float64():
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out = SmoothTaylor(model, samples=4)(x, [1, 2], generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32
    noise = same_noise(4, x.shape[1:], 3, torch.float32)
    for b, label in enumerate([1, 2]):
        theirs = authors_smooth_taylor(model, x[b], label, noise, 0.5, False, batch_size=4)
        torch.testing.assert_close(out[b], theirs, rtol=1e-5, atol=1e-6)
    double = SmoothTaylor(tiny_cnn().double(), samples=4)(x.double(), [1, 2], generator=torch.Generator().manual_seed(3))
    assert double.dtype == torch.float64  # the same float32 draws whatever the dtype
    torch.testing.assert_close(double.float(), out, rtol=1e-4, atol=1e-6)


def test_create_graph_matches_finite_differences():
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    explainer = SmoothTaylor(model, samples=3)

    def value(create_graph=False):
        return explainer(x, [1, 3], create_graph=create_graph, generator=torch.Generator().manual_seed(4)).square()

    check_parameter_derivative(value, model, ("8.weight", "0.weight"))  # the classifier, the first convolution


@pytest.mark.parametrize("options, error, match", [
    ({"samples": 0}, ValueError, r"samples must be a positive int, got 0"),
    ({"samples": 2.5}, ValueError, r"samples must be a positive int, got 2\.5"),
    ({"samples": True}, ValueError, r"samples must be a positive int, got True"),
    ({"noise_scale": -0.1}, ValueError, r"noise_scale must be a non-negative number, got -0\.1"),
    ({"noise_scale": float("nan")}, ValueError, r"noise_scale must be a finite number, got nan"),
    ({"noise_scale": float("inf")}, ValueError, r"noise_scale must be a finite number, got inf"),
    ({"noise_scale": "0.5"}, ValueError, r"noise_scale must be a finite number, got '0\.5'"),
    ({"noise_scale": True}, ValueError, r"noise_scale must be a finite number, got True"),
    ({"relative": "yes"}, TypeError, r"relative must be a bool, got 'yes'"),
    ({"generator": 3}, TypeError, r"generator must be a torch.Generator or None, got int"),
    ({"roots": 3}, TypeError, r"unknown option 'roots'"),
])
def test_bad_options_are_named(options, error, match):
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    with pytest.raises(error, match=match):
        SmoothTaylor(model, samples=2)(x, 0, **options)
