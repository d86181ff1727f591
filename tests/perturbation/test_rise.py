"""RISE: its masks against scikit-image's resize, its estimator against a plain loop and a closed form."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attribution
from attribution.perturbation.rise import MaskDraws
from conftest import CountingModel, LinearModel, tiny_cnn

skimage_transform = pytest.importorskip("skimage.transform")


def test_masks_are_the_authors_upsampled_and_shifted_grids():
    """Each mask is the grid resized as the authors' ``generate_masks`` does (scikit-image, order 1,
    mode='reflect', no anti-aliasing) to (grid + 1) * cell pixels and cropped at the mask's shift."""
    draws = MaskDraws(40, 5, 0.4, (23, 31), torch.device("cpu"), torch.Generator().manual_seed(3))
    masks = draws.masks(0, 40, torch.float64).numpy()
    assert draws.cell == (5, 7)
    for i in range(40):
        up = skimage_transform.resize(draws.cells[i, 0].double().numpy(), (6 * 5, 6 * 7), order=1, mode="reflect",
                                      anti_aliasing=False)
        top, left = draws.shifts[i].tolist()
        assert 0 <= top < 5 and 0 <= left < 7
        np.testing.assert_allclose(masks[i], up[top:top + 23, left:left + 31], atol=1e-12)
    # any slice of the draws gives the same masks as the whole
    np.testing.assert_allclose(draws.masks(4, 9, torch.float64).numpy(), masks[4:9], atol=0)
    np.testing.assert_allclose(draws.masks(0, 40, torch.float32).numpy(), masks, atol=1e-6)


def test_masks_keep_a_fraction_p1_of_the_image_on_average():
    draws = MaskDraws(4000, 7, 0.3, (32, 32), torch.device("cpu"), torch.Generator().manual_seed(0))
    masks = draws.masks(0, 4000, torch.float32)
    assert masks.min() >= 0 and masks.max() <= 1
    assert abs(draws.cells.float().mean().item() - 0.3) < 0.01
    assert masks.mean().item() == pytest.approx(0.3, abs=0.01)


def authors_masks(draws):
    """The authors' ``generate_masks`` on the same cells and shifts: scikit-image resize, then the crop."""
    (height, width), (ch, cw), grid = draws.size, draws.cell, draws.grid
    masks = []
    for cells, (top, left) in zip(draws.cells[:, 0].double().numpy(), draws.shifts.tolist()):
        up = skimage_transform.resize(cells, ((grid + 1) * ch, (grid + 1) * cw), order=1, mode="reflect",
                                      anti_aliasing=False)
        masks.append(torch.from_numpy(up[top:top + height, left:left + width]))
    return torch.stack(masks)


def reference_rise(model, x, target, masks, p1, score):
    """The estimator written out: one masked forward per mask and image, weights = the target's score."""
    maps = []
    for image, cls in zip(x, target):
        total = torch.zeros(masks.shape[1:], dtype=torch.float64)
        for mask in masks:
            with torch.no_grad():
                out = model(image[None] * mask)
            value = out.softmax(1)[0, cls] if score == "softmax" else out[0, cls]
            total += value.double() * mask.double()
        maps.append(total / (len(masks) * p1))
    return torch.stack(maps)[:, None]


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_rise_equals_the_estimator_written_out(score):
    model = tiny_cnn()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    options = {"n_masks": 30, "grid": 4, "p1": 0.5}
    out = attribution.RISE(model, **options)(x, [0, 3, 1], score=score, generator=torch.Generator().manual_seed(5),
                                               batch_size=7)
    draws = MaskDraws(30, 4, 0.5, (16, 16), torch.device("cpu"), torch.Generator().manual_seed(5))
    expected = reference_rise(model, x, [0, 3, 1], authors_masks(draws).float(), 0.5, score)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_rise_on_a_linear_model_is_the_mask_gram_applied_to_w_times_x():
    """With f(x) = <w, x> + c: f(x * M_i) = sum_p (w x)_p M_i(p) + c, so A = M^T (M (w x) + c) / (N p1), w x summed
    over channels."""
    linear = LinearModel().double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = attribution.RISE(linear, score="logit", n_masks=40, grid=3, p1=0.25)(
        x, [1, 2], generator=torch.Generator().manual_seed(1))
    masks = MaskDraws(40, 3, 0.25, (8, 8), torch.device("cpu"), torch.Generator().manual_seed(1)).masks(
        0, 40, torch.float64).flatten(1)
    wx = (linear.linear.weight[[1, 2]].detach().view(2, 3, 8, 8) * x).sum(1).flatten(1)  # (B, HW)
    bias = linear.linear.bias[[1, 2]].detach()[:, None]
    expected = ((wx @ masks.T + bias) @ masks / (40 * 0.25)).view(2, 1, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_rise_finds_the_only_region_the_model_reads():
    """A model that scores the mean of a 6x6 corner: RISE's map is larger there than anywhere far from it."""

    class Corner(nn.Module):
        def forward(self, x):
            corner = x[:, :, :6, :6].mean((1, 2, 3))
            return torch.stack([corner, -corner], 1)

    x = torch.ones(1, 3, 24, 24)
    out = attribution.RISE(Corner(), score="logit", n_masks=500, grid=4)(
        x, 0, generator=torch.Generator().manual_seed(0))[0, 0]
    assert out[:6, :6].mean() > 2 * out[12:, 12:].mean()
    # far from the corner a mask's value is independent of the score: E[f M(p)] / p1 = E[f] = p1
    assert out[18:, 18:].mean().item() == pytest.approx(0.1, abs=0.03)


def test_same_generator_seed_same_map_and_masks_shared_by_the_batch(cnn, images):
    rise = attribution.RISE(cnn, n_masks=16, grid=4)
    first = rise(images, [0, 1, 2], generator=torch.Generator().manual_seed(4))
    again = rise(images, [0, 1, 2], generator=torch.Generator().manual_seed(4))
    other = rise(images, [0, 1, 2], generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)


def test_rise_counts_its_forwards():
    model = CountingModel()
    attribution.RISE(model, n_masks=10, grid=2)(torch.randn(3, 3, 8, 8), 0, batch_size=4)
    assert sum(model.calls) == 30 and max(model.calls) == 4


@pytest.mark.parametrize("bad, message", [({"n_masks": 0}, "n_masks must be a positive int"),
                                          ({"grid": 2.5}, "grid must be a positive int"),
                                          ({"p1": 0.0}, r"p1 must be a probability in \(0, 1\]"),
                                          ({"p1": 1.5}, r"p1 must be a probability in \(0, 1\]")])
def test_bad_options_are_named(cnn, images, bad, message):
    with pytest.raises(ValueError, match=message):
        attribution.RISE(cnn)(images, 0, **bad)
