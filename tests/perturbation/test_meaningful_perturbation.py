"""Meaningful perturbations: equal to the authors' procedure written out one image at a time (their total variation
and its derivative, their circle start, Adam as they write it), the blurs equal to SciPy's, a closed form on a
constant model, a planted region found, defaults and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attribution import MeaningfulPerturbation
from attribution.perturbation.meaningful_perturbation import blur, total_variation
from conftest import Planted

scipy_ndimage = pytest.importorskip("scipy.ndimage")


def authors_tv(mask: np.ndarray, beta: float, floor: float = 1e-5):
    """The authors' ``tv`` (optimize_mask.py): its value and its hand-written derivative, for one 2-D mask.  Their
    derivative clamps ``|grad m|^beta`` to ``floor`` = 1e-5, which changes it where the norm is below ~0.02; with
    ``floor=0`` it is the exact derivative (what the library takes)."""
    d1, d2 = np.zeros(mask.shape), np.zeros(mask.shape)
    d1[:-1, :] = np.diff(mask, axis=0)
    d2[:, :-1] = np.diff(mask, axis=1)
    v = np.sqrt(d1 * d1 + d2 * d2) ** beta
    scale = np.maximum(v, floor) ** (2 * (beta / 2 - 1) / beta)
    d1_, d2_ = scale * d1, scale * d2
    d11, d22 = -d1_, -d2_
    d11[1:, :] = -np.diff(d1_, axis=0)
    d22[:, 1:] = -np.diff(d2_, axis=1)
    return v.sum(), beta * (d11 + d22)


@pytest.mark.parametrize("beta", [3.0, 2.0])
def test_total_variation_and_its_gradient_equal_the_authors(beta):
    rng = np.random.default_rng(0)
    mask = rng.random((7, 9))
    value, derivative = authors_tv(mask, beta, floor=0.0)
    masks = torch.tensor(mask)[None, None].requires_grad_(True)
    ours = total_variation(masks, beta)
    (grad,) = torch.autograd.grad(ours.sum(), masks)
    assert ours.item() == pytest.approx(value, rel=1e-12)
    np.testing.assert_allclose(grad[0, 0].numpy(), derivative, rtol=1e-9, atol=1e-12)
    # the authors' clamp moves only the cells whose norm^beta is below 1e-5 (two of them here for beta = 3)
    small = np.sqrt(np.diff(mask, axis=0, append=mask[-1:]) ** 2 + np.diff(mask, axis=1, append=mask[:, -1:]) ** 2)
    differs = ~np.isclose(authors_tv(mask, beta)[1], derivative, rtol=1e-9, atol=1e-12)
    assert differs.sum() == (2 if beta == 3 else 0) and (small ** beta < 1e-5).sum() > 0


def test_total_variation_of_a_constant_mask_is_zero_with_a_zero_gradient():
    masks = torch.ones(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    value = total_variation(masks, 1.0)  # beta < 2: the norm's derivative is unbounded at 0
    (grad,) = torch.autograd.grad(value.sum(), masks)
    assert value.abs().max() == 0 and grad.abs().max() == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("sigma", [10.0, 5.0, 2.5])
def test_the_blur_is_scipys_gaussian_filter_with_mirrored_borders(sigma):
    image = torch.rand(1, 2, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = np.stack([scipy_ndimage.gaussian_filter(c, sigma, mode="mirror", truncate=4.0)
                         for c in image[0].numpy()])
    np.testing.assert_allclose(blur(image, sigma)[0].numpy(), expected, atol=1e-12)


def planted(size=32, box=(8, 16, 12)):
    pattern = torch.randn(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return Planted(pattern, box).double().eval(), pattern, box


OPTIONS = {"mask_scale": 4, "mask_blur": 1.0, "blur_sigma": 2.0, "jitter": 2}


def written_out(model, image, label, iterations, offsets, learning_rate=0.1, l1=1e-4, tv=1e-2, beta=3.0, scale=4,
                mask_blur=1.0, blur_sigma=2.0, jitter=2):
    """The authors' generate_learned_mask + optimize_mask for one image (1, C, H, W), float64: the circle start
    from their test_circular_masks (disks by np.ogrid, blurred with scipy), then each iteration's masked image, the
    probability's gradient to the mask, their L1 and TV derivatives and their Adam, the mask clamped to [0, 1]."""
    height, width = image.shape[-2:]
    null = blur(image, blur_sigma)
    softmax = lambda z: torch.softmax(z, dim=1)[0, label]  # noqa: E731
    # --- the circle start, scaled from 224 pixels
    factor = min(height, width) / 224
    radii = np.arange(0, 175, 5) * factor
    y, x = np.ogrid[-(height // 2):height - height // 2, -(width // 2):width - width // 2]
    masks = [1 - scipy_ndimage.gaussian_filter((x * x + y * y <= r * r).astype(float), 10 * factor, mode="mirror",
                                               truncate=4.0) for r in radii]
    with torch.no_grad():
        scores = np.array([softmax(model(image * torch.tensor(m) + null * (1 - torch.tensor(m)))).item()
                           for m in masks])
        original = softmax(model(image)).item()
    percs = (scores - scores[-1]) / (original - scores[-1])
    first = np.where(percs < 1e-2)[0][0] if (percs < 1e-2).any() else -1
    centres_r = np.minimum(np.arange(-(-height // scale)) * scale + scale // 2, height - 1)
    centres_c = np.minimum(np.arange(-(-width // scale)) * scale + scale // 2, width - 1)
    start = masks[first]  # scipy.misc.imresize(start, (h, w), 'nearest') / 255: bytescale, then nearest pixels
    spread = start.max() - start.min()
    start = np.floor((start - start.min()) * 255 / (spread if spread > 0 else 1) + 0.5) / 255
    mask = start[np.ix_(centres_r, centres_c)].copy()
    # --- the optimisation
    padded = torch.nn.functional.pad(image, (0, jitter, 0, jitter), mode="replicate")
    padded_null = torch.nn.functional.pad(null, (0, jitter, 0, jitter), mode="replicate")
    m_t, v_t = np.zeros(mask.shape), np.zeros(mask.shape)
    for t in range(iterations):
        j1, j2 = offsets[t]
        small = torch.tensor(mask, requires_grad=True)
        up = small.repeat_interleave(scale, 0).repeat_interleave(scale, 1)[:height, :width]
        keep = blur(up[None, None], mask_blur)
        img_ = padded[..., j1:j1 + height, j2:j2 + width]
        null_ = padded_null[..., j1:j1 + height, j2:j2 + width]
        (dm,) = torch.autograd.grad(softmax(model(img_ * keep + null_ * (1 - keep))), small)
        update = dm.numpy() + l1 * np.sign(mask - 1) + tv * authors_tv(mask, beta, floor=0.0)[1]
        m_t = 0.9 * m_t + 0.1 * update
        v_t = 0.999 * v_t + 0.001 * update ** 2
        m_hat, v_hat = m_t / (1 - 0.9 ** (t + 1)), v_t / (1 - 0.999 ** (t + 1))
        mask = np.clip(mask - 0.1 / (np.sqrt(v_hat) + 1e-8) * m_hat * (learning_rate / 0.1), 0, 1)
    up = torch.tensor(mask).repeat_interleave(scale, 0).repeat_interleave(scale, 1)[:height, :width]
    return 1 - blur(up[None, None], mask_blur)[0]


def test_equals_the_authors_procedure_written_out_one_image_at_a_time():
    model, pattern, _ = planted()
    noise = torch.randn(pattern.shape, dtype=pattern.dtype, generator=torch.Generator().manual_seed(4))
    # images whose explained probability the disks move (where it does not, the start is a tie that rounding breaks)
    x = torch.cat([pattern, pattern, 0.7 * pattern + 0.5 * noise])
    labels = [0, 1, 0]
    iterations = 12
    ours = MeaningfulPerturbation(model, **OPTIONS)(x, labels, iterations=iterations,
                                                     generator=torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 2, (iterations, 2), generator=torch.Generator().manual_seed(3)).tolist()
    for i, label in enumerate(labels):
        expected = written_out(model, x[i:i + 1], label, iterations, offsets)
        torch.testing.assert_close(ours[i], expected, atol=1e-9, rtol=1e-9)


def test_the_deleted_region_is_the_planted_square():
    """Only the square carries class 0's evidence: the optimised deletion covers it and little else (0.89 inside,
    0.06 outside when written).  An 8 x 8 grid has 64 cells, not the authors' 784: the L1 weight that makes keeping
    pay is larger (3e-3), and TV's smaller (1e-3) so that smoothness does not spread the deletion."""
    model, pattern, (top, left, size) = planted()
    saliency = MeaningfulPerturbation(model, **OPTIONS)(pattern, 0, iterations=150, l1_coeff=3e-3, tv_coeff=1e-3,
                                                        generator=torch.Generator().manual_seed(0))
    inside = torch.zeros_like(saliency, dtype=torch.bool)
    inside[..., top:top + size, left:left + size] = True
    assert saliency[inside].mean() > 0.8 and saliency[~inside].mean() < 0.1, \
        (saliency[inside].mean().item(), saliency[~inside].mean().item())
    with torch.no_grad():  # and the deletion does delete the class
        keep = 1 - saliency
        perturbed = pattern * keep + blur(pattern, 2.0) * (1 - keep)
        assert torch.softmax(model(perturbed), 1)[0, 0] < 0.1 < 0.9 < torch.softmax(model(pattern), 1)[0, 0]


def test_a_constant_model_keeps_everything_from_the_whole_image():
    """No score gradient and nothing to pay at m = 1 (the L1 term's derivative there is 0, the TV term's on a
    constant mask too): started from the whole image, the mask never moves and the map is exactly 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)).double()
    nn.init.zeros_(model[1].weight)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    saliency = MeaningfulPerturbation(model, init="ones", **OPTIONS)(x, 1, iterations=5)
    assert saliency.shape == (2, 1, 16, 16) and saliency.abs().max() < 1e-12  # 1 - (blur of ones): rounding


def test_defaults_are_the_authors():
    assert MeaningfulPerturbation.defaults == {
        "score": "softmax", "iterations": 300, "learning_rate": 0.1, "l1_coeff": 1e-4, "tv_coeff": 1e-2,
        "tv_beta": 3.0, "mask_scale": 8, "mask_blur": 5.0, "blur_sigma": 10.0, "jitter": 4, "init": "circle",
        "generator": None}


@pytest.mark.parametrize("options, message", [
    ({"iterations": 0}, "iterations must be an int of at least 1"),
    ({"mask_scale": 2.0}, "mask_scale must be an int"),
    ({"jitter": -1}, "jitter must be an int of at least 0"),
    ({"learning_rate": 0}, "learning_rate must be a positive number"),
    ({"tv_beta": -1.0}, "tv_beta must be a positive number"),
    ({"l1_coeff": -1e-4}, "l1_coeff must be a non-negative number"),
    ({"mask_blur": float("nan")}, "mask_blur must be a non-negative number"),
    ({"init": "random"}, "init must be one of"),
])
def test_bad_options_are_named(options, message):
    model, pattern, _ = planted()
    with pytest.raises(ValueError, match=message):
        MeaningfulPerturbation(model, **OPTIONS)(pattern, 0, **options)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        MeaningfulPerturbation(model, **OPTIONS)(pattern, 0, generator=0)
