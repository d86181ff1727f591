"""IDGI: exact completeness, closed forms on a linear model, the formula written out, and the paths it rides on."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.gradients.blur_ig import gaussian_blur
from attribution.gradients.paths import make_baseline
from conftest import LinearModel, tiny_cnn

PATHS = {"integrated_gradients": {"steps": 9}, "blur_ig": {"steps": 9, "max_sigma": 3.0},
         "guided_ig": {"steps": 9}}


def path_start(name: str, x: torch.Tensor, options: dict) -> torch.Tensor:
    if name == "blur_ig":
        return gaussian_blur(x, torch.full((x.shape[0],), options["max_sigma"], dtype=torch.float64))
    return make_baseline(x, attribution.get_method(name).defaults["baseline"])


def scores(model, x, classes):
    with torch.no_grad():
        return model(x)[torch.arange(x.shape[0]), classes]


@pytest.mark.parametrize("name", sorted(PATHS))
def test_completeness_is_exact_whatever_the_steps(name):
    """sum A = f(x) - f(path start): each step's score change is shared out in full."""
    model = tiny_cnn().double()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    maps = attribution.IDGI(model, method=name, **PATHS[name])(x, [0, 2, 4])
    expected = scores(model, x, [0, 2, 4]) - scores(model, path_start(name, x, PATHS[name]), [0, 2, 4])
    torch.testing.assert_close(maps.sum((1, 2, 3)), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_on_a_linear_model_the_change_is_shared_by_squared_weight(name):
    """f = <w, x> + c has the gradient w everywhere: A = w^2 / |w|^2 * (f(x) - f(start))."""
    model = LinearModel().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    maps = attribution.IDGI(model, method=name, **PATHS[name])(x, [1, 3])
    w = model.linear.weight[[1, 3]].detach().view(2, 3, 8, 8)
    change = scores(model, x, [1, 3]) - scores(model, path_start(name, x, PATHS[name]), [1, 3])
    expected = w.square() / w.square().sum((1, 2, 3), keepdim=True) * change.view(2, 1, 1, 1)
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)


def idgi_written_out(model, points, cls):
    """The authors' formula on an explicit list of path points (start first, image last)."""
    total = torch.zeros_like(points[0])
    for here, there in zip(points[:-1], points[1:]):
        here = here.clone().requires_grad_(True)
        score = model(here[None])[0, cls]
        (grad,) = torch.autograd.grad(score, here)
        total += grad.square() / grad.square().sum() * (scores(model, there[None], [cls])[0] - score.detach())
    return total


@pytest.fixture
def model_and_image():
    model = tiny_cnn().double()
    torch.manual_seed(2)
    return model, torch.randn(1, 3, 16, 16, dtype=torch.float64)


def test_straight_line_equals_the_formula_on_evenly_spaced_points(model_and_image):
    model, x = model_and_image
    start = make_baseline(x, "black")[0]
    points = [start + a * (x[0] - start) for a in torch.linspace(0, 1, 7, dtype=torch.float64)]
    ours = attribution.IDGI(model, steps=7)(x, 3, batch_size=3)
    torch.testing.assert_close(ours[0], idgi_written_out(model, points, 3), rtol=1e-9, atol=1e-12)


def test_blur_path_runs_from_the_most_blurred_image_to_the_image(model_and_image):
    model, x = model_and_image
    sigmas = [3.0 * i / 5 for i in range(5, -1, -1)]
    points = [gaussian_blur(x, torch.tensor([s], dtype=torch.float64))[0] for s in sigmas]
    ours = attribution.IDGI(model, method="blur_ig", steps=5, max_sigma=3.0)(x, 1)
    torch.testing.assert_close(ours[0], idgi_written_out(model, points, 1), rtol=1e-9, atol=1e-12)


def test_guided_path_without_freedom_is_the_straight_line(model_and_image):
    """Guided IG with max_dist=0 walks the straight line through alpha = k/steps, k = 0..steps: IDGI on it equals
    IDGI on steps + 1 evenly spaced points of the same line."""
    model, x = model_and_image
    guided = attribution.IDGI(model, method=attribution.GuidedIG, steps=6, max_dist=0.0, baseline="zero")(x, 2)
    straight = attribution.IDGI(model, steps=7, baseline="zero")(x, 2)
    torch.testing.assert_close(guided, straight, rtol=1e-9, atol=1e-12)


def test_idgi_differs_from_the_path_method_it_rides_on(model_and_image):
    model, x = model_and_image
    ig = attribution.IntegratedGradients(model, steps=16)(x, 0)
    idgi = attribution.IDGI(model, steps=16)(x, 0)
    assert not torch.allclose(ig, idgi, rtol=1e-3)


def test_only_path_methods_and_their_options_are_taken(cnn, images):
    with pytest.raises(TypeError, match="IDGI integrates along a path method's path .*VanillaGradient"):
        attribution.IDGI(cnn, method="vanilla_gradient")
    with pytest.raises(TypeError, match="unknown option 'max_sigma'"):
        attribution.IDGI(cnn, method="integrated_gradients", max_sigma=2.0)
    with pytest.raises(ValueError, match="IDGI on the straight line needs steps >= 2"):
        attribution.IDGI(cnn, steps=1)(images, 0)


def test_a_step_that_starts_where_the_gradient_vanishes_contributes_nothing():
    """As the docstring states: f = relu(<w, x> - 2) is flat near the black baseline, so on the straight line only
    the steps from the points past the kink share out their change: sum A = f(x) - f(p_k), p_k the first point
    with a non-zero gradient (not f(x) - f(0))."""

    class Hinge(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.rand(48, generator=torch.Generator().manual_seed(0)).double())

        def forward(self, x):
            s = torch.relu(x.flatten(1) @ self.w - 2.0)
            return torch.stack([s, -s], 1)

    model = Hinge()
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    for steps in (2, 4, 16):
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        first_active = next(a for a in alphas if scores(model, a * x, [0])[0] > 0)
        maps = attribution.IDGI(model, steps=steps, baseline="zero")(x, 0)
        expected = scores(model, x, [0]) - scores(model, first_active * x, [0])
        torch.testing.assert_close(maps.sum().view(1), expected, rtol=1e-10, atol=1e-12)
    assert maps.sum() < scores(model, x, [0])[0]  # the change before the kink is missed
