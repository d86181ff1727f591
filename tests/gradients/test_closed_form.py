"""Closed forms and exact identities of the gradient family on toy models whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attribution
from attribution.gradients.blur_ig import gaussian_blur
from attribution.gradients.paths import RULES
from conftest import CountingModel, LinearModel, tiny_cnn


@pytest.fixture
def linear():
    return LinearModel().double()


@pytest.fixture
def x8():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8, dtype=torch.float64)


def weights_of(model: LinearModel, classes) -> torch.Tensor:
    return model.linear.weight[classes].detach().view(len(classes), 3, 8, 8)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("baseline", ["black", "white", "zero", 0.7, "tensor"])
def test_ig_on_a_linear_model_is_delta_times_weight(linear, x8, rule, baseline):
    if baseline == "tensor":
        baseline = torch.linspace(-1, 1, 8, dtype=torch.float64).view(1, 1, 8)
    ig = attribution.IntegratedGradients(linear)(x8, [1, 3], steps=7, method=rule, baseline=baseline)
    start = attribution.gradients.paths.make_baseline(x8, baseline)
    torch.testing.assert_close(ig, (x8 - start) * weights_of(linear, [1, 3]), rtol=1e-10, atol=1e-12)


def test_black_and_white_baselines_are_per_image(x8):
    x = x8.clone()
    x[1] += 10
    black = attribution.gradients.paths.make_baseline(x, "black")
    assert torch.equal(black[0], torch.full_like(black[0], float(x[0].min())))
    assert torch.equal(black[1], torch.full_like(black[1], float(x[1].min())))
    assert torch.equal(attribution.gradients.paths.make_baseline(x, "white")[1, 0, 0], torch.full((8,), float(x[1].max()), dtype=x.dtype))


@pytest.mark.parametrize("rule", RULES)
def test_ig_completeness_on_a_cnn(rule):
    model = tiny_cnn().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 4
    targets = [1, 4]
    ig = attribution.IntegratedGradients(model)(x, targets, steps=256, method=rule, baseline="zero")
    with torch.no_grad():
        gap = model(x)[[0, 1], targets] - model(torch.zeros_like(x))[[0, 1], targets]
    assert gap.abs().min() > 0.03
    torch.testing.assert_close(ig.flatten(1).sum(1), gap, rtol=0.01, atol=0)


def test_vanilla_and_input_x_gradient_on_a_linear_model(linear, x8):
    w = weights_of(linear, [0, 2])
    torch.testing.assert_close(attribution.VanillaGradient(linear)(x8, [0, 2]), w)
    torch.testing.assert_close(attribution.InputXGradient(linear)(x8, [0, 2]), x8 * w)


@pytest.mark.parametrize("score", ["softmax", "log_softmax"])
def test_score_option_explains_the_transformed_output(cnn, images, score):
    x = images.clone().requires_grad_(True)
    transformed = getattr(torch, score)(cnn(x), dim=1)
    (expected,) = torch.autograd.grad(transformed[[0, 1, 2], [4, 0, 2]].sum(), x)
    torch.testing.assert_close(attribution.VanillaGradient(cnn)(images, [4, 0, 2], score=score), expected)


def test_smoothgrad_on_a_linear_model(linear, x8):
    """The gradient of a linear model is constant, so noise changes nothing: mean w, mean w^2, variance 0."""
    w = weights_of(linear, [1, 2])
    sg = attribution.SmoothGrad(linear, samples=4)
    torch.testing.assert_close(sg(x8, [1, 2]), w)
    torch.testing.assert_close(sg(x8, [1, 2], variant="smoothgrad_sq"), w.square())
    torch.testing.assert_close(sg(x8, [1, 2], variant="vargrad"), torch.zeros_like(w), atol=1e-12, rtol=0)
    torch.testing.assert_close(attribution.VanillaGradient(linear).get_smoothed_mask(x8, [1, 2], samples=3),
                               w.square())


def test_smoothgrad_noise_scales_with_each_images_range(linear):
    """InputXGradient on a linear model: E[(x + e) w] = x w and Var[(x + e) w] = (std * range)^2 w^2 per image."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    x[1] *= 5  # five times the range
    sg = attribution.SmoothGrad(linear, method="input_x_gradient", samples=4000, std=0.2, variant="vargrad")
    var = sg(x, [0, 0]) / weights_of(linear, [0, 0]).square()
    span = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    torch.testing.assert_close(var.flatten(1).mean(1), (0.2 * span) ** 2, rtol=0.05, atol=0)


def test_guided_ig_without_deviation_is_left_riemann_ig():
    """With max_dist=0 Guided IG must follow the straight line: each step moves every feature by delta/steps,
    weighted by the gradient at the previous point, i.e. IG with the left Riemann rule."""
    model = tiny_cnn().double()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    guided = attribution.GuidedIG(model)(x, [1, 2], steps=20, max_dist=0.0)
    ig = attribution.IntegratedGradients(model)(x, [1, 2], steps=20, method="left", baseline="zero")
    torch.testing.assert_close(guided, ig, rtol=1e-8, atol=1e-12)


def test_guided_ig_completeness():
    """A path method: the sum approaches f(x) - f(b).  Its jumps (features moved all at once where the gradient
    was small) converge slowly when the path may stray far (large max_dist), but they do converge."""
    model = tiny_cnn().double()
    torch.manual_seed(6)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 4
    with torch.no_grad():
        gap = model(x)[[0, 1], [1, 4]] - model(torch.zeros_like(x))[[0, 1], [1, 4]]
    assert gap.abs().min() > 0.03
    near = attribution.GuidedIG(model)(x, [1, 4], steps=400)
    torch.testing.assert_close(near.flatten(1).sum(1), gap, rtol=0.05, atol=0)
    error = [(attribution.GuidedIG(model)(x, [1, 4], steps=n, max_dist=0.1).flatten(1).sum(1) - gap).abs()
             for n in (100, 800)]
    assert (error[1] < 0.8 * error[0]).all()


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.3, 1.0, 2.7, 6.0, 50.0])
def test_blur_equals_scipy_gaussian_filter_constant_mode(sigma):
    ndimage = pytest.importorskip("scipy.ndimage")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 13, 17, dtype=torch.float64)
    ours = gaussian_blur(images, torch.full((2,), sigma, dtype=torch.float64))
    theirs = np.stack([ndimage.gaussian_filter(images[i].numpy(), sigma=[0, sigma, sigma], mode="constant")
                       for i in range(2)])
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10, atol=1e-12)


def test_blur_ig_completeness_along_the_blur_path():
    """Blur IG integrates along the blur path, so it sums to f(x) - f(blur(x, max_sigma))."""
    model = tiny_cnn().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 2
    attr = attribution.BlurIG(model)(x, [2, 3], steps=400, max_sigma=8.0, grad_step=0.001)
    with torch.no_grad():
        blurred = gaussian_blur(x, torch.full((2,), 8.0, dtype=torch.float64))
        gap = model(x)[[0, 1], [2, 3]] - model(blurred)[[0, 1], [2, 3]]
    torch.testing.assert_close(attr.flatten(1).sum(1), gap, rtol=0.02, atol=0)


def rectifier_net(activation: nn.Module) -> nn.Sequential:
    """x (3 features) -> 4 hidden units -> one of 2 outputs, with hidden pre-activations -2, 3, 8, 0.5 at x0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4, bias=False), activation, nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-2.0, 0, 0], [0, 3.0, 0], [0, 0, 8.0], [0.5, 0, 0]]))
        model[3].weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    return model.double().eval()


X0 = torch.ones(1, 3, 1, 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "activation,active",
    [(nn.ReLU(), [0, 1, 1, 1]), (nn.ReLU6(), [0, 1, 0, 1]), (nn.Hardtanh(0.0, 6.0), [0, 1, 0, 1])],
)
def test_guided_backprop_and_deconvnet_closed_forms(activation, active):
    model = rectifier_net(activation)
    w1, w2 = model[1].weight.detach(), model[3].weight.detach()[0]
    mask = torch.tensor(active, dtype=torch.float64)
    plain = w1.T @ (w2 * mask)
    guided = w1.T @ (w2.clamp(min=0) * mask)
    deconv = w1.T @ w2.clamp(min=0)
    torch.testing.assert_close(attribution.VanillaGradient(model)(X0, 0).flatten(), plain)
    torch.testing.assert_close(attribution.GuidedBackProp(model)(X0, 0).flatten(), guided)
    torch.testing.assert_close(attribution.Deconvnet(model)(X0, 0).flatten(), deconv)
    assert not torch.allclose(guided, plain)


def test_guided_backprop_leaky_relu_uses_the_slope():
    model = rectifier_net(nn.LeakyReLU(0.1))
    w1, w2 = model[1].weight.detach(), model[3].weight.detach()[0]
    slope = torch.tensor([0.1, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(attribution.GuidedBackProp(model)(X0, 0).flatten(), w1.T @ (w2.clamp(min=0) * slope))


def test_guided_backprop_covers_functional_and_tensor_relus():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = rectifier_net(nn.Identity())

        def forward(self, x):
            h = self.net[1](self.net[0](x))
            return self.net[3](torch.nn.functional.relu6(h).relu())

    module_version = attribution.GuidedBackProp(rectifier_net(nn.ReLU6()))(X0, 0)
    torch.testing.assert_close(attribution.GuidedBackProp(Functional().double())(X0, 0), module_version)


def test_guided_backprop_warns_without_rectifiers():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()
    with pytest.warns(UserWarning, match="no ReLU-family activation"):
        attribution.GuidedBackProp(model)(X0, 0)


def test_occlusion_on_a_linear_model(x8):
    """With 1x1 windows and fill 0 the drop at a pixel is sum_c w_c x_c; larger windows average window sums."""
    linear = LinearModel().double()
    w = weights_of(linear, [2, 2])
    single = attribution.Occlusion(linear)(x8, [2, 2], window=1, stride=1)
    torch.testing.assert_close(single, (w * x8).sum(1, keepdim=True))
    blocks = attribution.Occlusion(linear)(x8, [2, 2], window=4, stride=4)
    expected = nn.functional.avg_pool2d((w * x8).sum(1, keepdim=True), 4) * 16
    torch.testing.assert_close(blocks, nn.functional.interpolate(expected, scale_factor=4, mode="nearest"))


def test_occlusion_default_window_scales_with_the_image():
    model = CountingModel()
    attribution.Occlusion(model)(torch.randn(1, 3, 224, 224), 0, batch_size=1000)
    assert sum(model.calls) == 1 + 13 * 13  # window 32, stride 16: ceil((224 - 32) / 16) + 1 = 13 positions a side


def test_blur_ig_builds_the_blur_matrices_once_per_step_in_a_pass(monkeypatch):
    """A pass of 3 images x 4 steps builds each blur matrix for the 4 steps, not for each of the 12 rows (they
    depend on the step only), and gives the map of passes of one row."""
    from attribution.gradients import blur_ig

    built = []
    original = blur_ig.gaussian_matrices

    def counting(size, sigmas, dtype):
        built.append(sigmas.numel())
        return original(size, sigmas, dtype)

    model = tiny_cnn().double()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    explain = attribution.BlurIG(model, steps=4, max_sigma=3.0)
    monkeypatch.setattr(blur_ig, "gaussian_matrices", counting)
    together = explain(x, [0, 1, 2], batch_size=12)
    assert built == [4, 4, 4, 4]
    torch.testing.assert_close(together, explain(x, [0, 1, 2], batch_size=1))
