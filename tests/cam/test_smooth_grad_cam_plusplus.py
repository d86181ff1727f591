"""Smooth Grad-CAM++ against its formula written out one noisy copy at a time, and Grad-CAM++ without noise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attribution as A
from conftest import cam_cnn


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 32, 32)


def smooth_grad_cam_plusplus_written_out(model, x, classes, samples, std, seed):
    """Noise drawn as the method draws it (one standard-normal tensor for all image-major rows), then per image:
    the three mean gradient powers at block "2", Grad-CAM++'s alpha with the clean activations, the map."""
    noise = torch.randn((x.shape[0] * samples,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    maps = []
    for i, (image, cls) in enumerate(zip(x, classes)):
        sigma = std * (image.max() - image.min())
        with torch.no_grad():
            acts = model[:3](image[None])
        moments = [torch.zeros_like(acts) for _ in range(3)]
        for s in range(samples):
            features = model[:3](image[None] + sigma * noise[i * samples + s]).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model[3:](features)[0, cls], features)
            for p in range(3):
                moments[p] += grad ** (p + 1) / samples
        first, second, third = moments
        denominator = 2 * second + acts.sum(dim=(2, 3), keepdim=True) * third
        alpha = torch.where(denominator != 0, second / denominator, torch.zeros_like(second))
        weights = (alpha * F.relu(first)).sum(dim=(2, 3), keepdim=True)
        maps.append(F.relu((weights * acts).sum(1)))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_smooth_grad_cam_plusplus_equals_its_formula_written_out(x):
    model = cam_cnn()
    expected = smooth_grad_cam_plusplus_written_out(model, x, [1, 4, 7], 5, 0.2, seed=3)
    ours = A.SmoothGradCAMPlusPlus(model, "2")(x, [1, 4, 7], samples=5, std=0.2, batch_size=64,
                                               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_without_noise_it_is_grad_cam_plusplus(x):
    model = cam_cnn()
    smooth = A.SmoothGradCAMPlusPlus(model, "2")(x, [1, 4, 7], samples=3, std=0.0)
    torch.testing.assert_close(smooth, A.GradCAMPlusPlus(model, "2")(x, [1, 4, 7]), rtol=1e-5, atol=1e-7)


def test_bad_options_name_what_is_wrong(x):
    explainer = A.SmoothGradCAMPlusPlus(cam_cnn(), "2")
    for options, match in (({"samples": 0}, "samples"), ({"std": -1.0}, "std")):
        with pytest.raises(ValueError, match=match):
            explainer(x, 1, **options)
