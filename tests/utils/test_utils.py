"""Seed-compatible utilities: normalisation and visualisation."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from attribution.utils import (  # noqa: E402
    colorize,
    magnitude,
    normalize_saliency,
    overlay,
    plot_grid,
    visualize_single_saliency,
)


def test_normalize_saliency_channel_max_relu_minmax():
    maps = torch.tensor([[[[-1.0, 2.0], [0.5, 4.0]], [[3.0, -2.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    # channel max: [[3, 2], [0.5, 4]]; ReLU keeps it; min-max: (v - 0.5) / 3.5
    expected = (torch.tensor([[3.0, 2.0], [0.5, 4.0]]) - 0.5) / 3.5
    torch.testing.assert_close(normalize_saliency(maps), expected.view(1, 1, 2, 2))


def test_normalize_saliency_is_per_image_and_handles_constant_maps():
    maps = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 7.0), -torch.ones(1, 2, 2)])
    out = normalize_saliency(maps)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2], torch.zeros_like(out[2]))


def test_normalize_saliency_stays_on_device_and_is_differentiable():
    maps = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = normalize_saliency(maps)
    assert out.device == maps.device and out.shape == (2, 1, 4, 4)
    out.sum().backward()
    assert maps.grad is not None
    assert normalize_saliency(maps.detach(), return_device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        normalize_saliency(torch.randn(3, 4, 4))


def test_magnitude_clips_at_the_percentile():
    maps = torch.zeros(1, 3, 10, 10)
    maps[0, 0].view(-1)[:] = torch.arange(100.0)
    out = magnitude(maps, percentile=50)
    assert out.max() == 1 and out.min() == 0
    assert torch.isclose(out.view(-1)[25], torch.tensor(25 / 49))


def test_visualisation_helpers_draw_what_they_are_given():
    import matplotlib.pyplot as plt

    saliency = torch.zeros(1, 1, 8, 8)
    saliency[..., :4] = 1.0  # left half hot
    heat = colorize(saliency, size=(16, 16), cmap="gray")
    assert heat.shape == (16, 16, 3)
    assert heat[:, :6].mean() > 0.9 and heat[:, 10:].mean() < 0.1
    image = torch.zeros(3, 16, 16)
    blended = overlay(image, saliency, alpha=0.5, cmap="gray")
    np.testing.assert_allclose(blended, 0.5 * heat, atol=1e-6)
    plt.figure()
    ax = visualize_single_saliency(torch.rand(1, 3, 8, 8), img_size=(32, 32))
    assert ax.images[0].get_array().shape[:2] == (32, 32)
    fig = plot_grid(torch.rand(2, 3, 8, 8), {"gradient": torch.randn(2, 3, 8, 8), "cam": torch.rand(2, 1, 8, 8)})
    assert len(fig.axes) == 6
    plt.close("all")
    with pytest.raises(ValueError, match="single map"):
        colorize(torch.rand(2, 1, 8, 8))
