"""Opti-CAM against its optimisation written out (with Adam's update by hand), and what the optimisation achieves."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attribution as A
from conftest import cam_cnn, central_difference


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(3, 3, 32, 32)


def masked_logit(model, image, features, u, cls):
    """f_cls(x * S(u)) for one image, S = min-max(up(sum_k softmax(u)_k A_k))."""
    combined = (u.softmax(0)[:, None, None] * features).sum(0)[None, None]
    up = F.interpolate(combined, size=image.shape[-2:], mode="bilinear", align_corners=False)
    saliency = (up - up.min()) / (up.max() - up.min())
    return model(image[None] * saliency)[0, cls], saliency[0]


def opti_cam_written_out(model, x, classes, iterations, lr, betas=(0.9, 0.999), eps=1e-8):
    """One image at a time: Adam (Kingma & Ba's update with bias correction) on -logit, from uniform weights."""
    maps = []
    for image, cls in zip(x, classes):
        features = model[:3](image[None])[0].detach().relu()
        u = torch.zeros(features.shape[0])
        m, v = torch.zeros_like(u), torch.zeros_like(u)
        for t in range(1, iterations + 1):
            u.requires_grad_(True)
            score, _ = masked_logit(model, image, features, u, cls)
            (g,) = torch.autograd.grad(-score, u)
            u = u.detach()
            m = betas[0] * m + (1 - betas[0]) * g
            v = betas[1] * v + (1 - betas[1]) * g * g
            step = lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            u = u - step
        maps.append(masked_logit(model, image, features, u, cls)[1])
    return torch.stack(maps)


def test_opti_cam_is_adam_on_the_masked_logit(x):
    model = cam_cnn()
    ours = A.OptiCAM(model, "2", iterations=12, lr=0.1)(x, [0, 4, 7], batch_size=2)
    expected = opti_cam_written_out(model, x, [0, 4, 7], 12, 0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["0.0", "3.0"])  # below the optimised layer, above it
def test_create_graph_differentiates_through_the_optimisation(x, layer):
    """The map's derivative in a weight (float64) equals the finite difference of the whole optimisation: the
    weights' Adam steps are part of it (as constants, the weight's effect on them would be missing)."""
    model = cam_cnn().double()
    images = x[:2].double()
    explainer = A.OptiCAM(model, "2", iterations=4, lr=0.1)
    weight = dict(model.named_parameters())[f"{layer}.weight"]
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = (torch.arange(32 * 32, dtype=torch.float64) / 1024).view(1, 1, 32, 32)  # any smooth functional
    (grad,) = torch.autograd.grad((explainer(images, [1, 4], create_graph=True) * target).sum(), weight)
    # a step of 1e-8: at 1e-6 the difference crosses a kink of the optimisation for the first layer
    difference = central_difference(lambda: (explainer(images, [1, 4]) * target).sum(), weight, direction, step=1e-8)
    torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-4, atol=1e-8)


def test_without_iterations_the_map_is_the_scaled_mean_of_the_rectified_channels(x):
    model = cam_cnn()
    features = model[:3](x).detach().relu()
    up = F.interpolate(features.mean(1, keepdim=True), size=(32, 32), mode="bilinear", align_corners=False)
    low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    torch.testing.assert_close(A.OptiCAM(model, "2", iterations=0)(x, 1), (up - low) / (high - low))


def test_the_optimised_map_keeps_more_of_the_target_score_than_uniform_weights(x):
    model = cam_cnn()
    classes = model(x).argmax(1)
    uniform = A.OptiCAM(model, "2", iterations=0)(x, classes)
    optimised = A.OptiCAM(model, "2", iterations=30)(x, classes)
    assert 0 <= optimised.min() and optimised.amax((1, 2, 3)).eq(1).all()
    with torch.no_grad():
        kept = model(x * optimised).gather(1, classes[:, None])
        before = model(x * uniform).gather(1, classes[:, None])
    assert (kept > before).all(), (kept.squeeze(1), before.squeeze(1))


@pytest.mark.parametrize("bad, message", [({"iterations": -1}, "iterations must be a non-negative int"),
                                          ({"iterations": 2.0}, "iterations must be a non-negative int"),
                                          ({"lr": 0}, "lr must be a positive number"),
                                          ({"lr": math.nan}, "lr must be a positive number")])
def test_bad_options_are_named(x, bad, message):
    with pytest.raises(ValueError, match=message):
        A.OptiCAM(cam_cnn(), "2")(x, 0, **bad)
