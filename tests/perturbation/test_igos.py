"""I-GOS and iGOS++: equal to the authors' procedure written out one image at a time (their interval scores,
integrated gradients, regularisers and line search, with and without their path noise), the blurred baseline equal
to OpenCV's, batch independence, a constant model, a planted region found, defaults and bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution import create
from attribution.perturbation.igos import IGOS, IGOSPlusPlus, authors_blur_size
from conftest import Planted

cv2 = pytest.importorskip("cv2")

OPTIONS = {"mask_size": 5, "blur_size": 5, "blur_sigma": 2.0, "noise": 0.0}
#: regulariser weights for the 5 x 5 masks of the comparisons: the authors' (1, 20), made for 28 x 28 masks and
#: confident ImageNet models, keep every mask at 1 on this small net; these let the masks move, with steps that
#: differ between images and iterations (from 40 down to the give-up step 4.1e-6)
WEIGHTS = {"l1_coeff": 0.05, "tv_coeff": 0.5}


def small_net() -> nn.Module:
    """A float64 conv net on 12 x 12 images, its classifier scaled so that the softmax moves with the mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                          nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).double().eval()
    with torch.no_grad():
        model[-1].weight.mul_(6)
    return model


def opencv_blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The authors' baseline: ``cv2.GaussianBlur(image, (size, size), sigmaX=sigma)`` of a (1, C, H, W) image
    (channels last for OpenCV; its default border, reflected without repeating the edge)."""
    pixels = image[0].permute(1, 2, 0).numpy()
    return torch.from_numpy(cv2.GaussianBlur(pixels, (size, size), sigmaX=sigma)).permute(2, 0, 1)[None]


def authors(model, image, label, *, plusplus, iterations, ig_iter, size=5, L1=1.0, L2=20.0, alpha=1000.0,
            blur=(5, 2.0), noise=None):
    """``methods.IGOS`` / ``methods.iGOS_pp`` with ``opt='LS'`` and the helpers of ``methods_helper.py``, for one
    image (1, C, H, W), float64, written as the authors' code runs.  ``noise()`` gives each evaluation's noise
    (the library's draw order: one draw per pass, its rows in the library's term order: deletion of the product,
    insertion of the product, deletion mask alone, insertion mask alone); None: no noise.  Returns the map and the
    step each iteration's line search took."""
    baseline = opencv_blur(image, *blur)
    upscale = nn.UpsamplingBilinear2d(size=tuple(image.shape[-2:]))
    terms = 4 if plusplus else 1

    def draws():
        if noise is None:
            return [0.0] * terms
        return list(noise().split(ig_iter))

    def interval_score(img, base, up_mask, eps):
        intervals = torch.linspace(1 / ig_iter, 1, ig_iter, dtype=torch.float64).view(-1, 1, 1, 1)
        interval_masks = up_mask.unsqueeze(1) * intervals
        local = img.unsqueeze(1) * interval_masks + base.unsqueeze(1) * (1 - interval_masks)  # phi
        local = local.view(-1, *img.shape[1:]) + eps * 0.2 if noise is not None else local.view(-1, *img.shape[1:])
        return torch.softmax(model(local), dim=1)[:, label] / ig_iter

    def tv_norm(m):
        m = m[:, 0]
        a = torch.mean(torch.abs((m[:, :-1, :] - m[:, 1:, :]).reshape(1, -1)).pow(2), dim=1)
        b = torch.mean(torch.abs((m[:, :, :-1] - m[:, :, 1:]).reshape(1, -1)).pow(2), dim=1)
        return a + b

    def bilateral_tv_norm(m, sigma=0.01):
        up = upscale(m)
        bil_a = torch.mean(torch.exp(-(image[:, :, :-1, :] - image[:, :, 1:, :]).mean(dim=1) ** 2 / sigma).reshape(
            1, -1) * torch.abs((up[:, :, :-1, :] - up[:, :, 1:, :]).reshape(1, -1)).pow(2), dim=1)
        bil_b = torch.mean(torch.exp(-(image[:, :, :, :-1] - image[:, :, :, 1:]) ** 2 / sigma).mean(dim=1).reshape(
            1, -1) * torch.abs((up[:, :, :, :-1] - up[:, :, :, 1:]).reshape(1, -1)).pow(2), dim=1)
        return 0.5 * (tv_norm(m) + bil_a + bil_b)

    def regularization(m):
        variation = bilateral_tv_norm(m) if plusplus else tv_norm(m)
        return L1 * torch.mean(torch.abs(1 - m).reshape(1, -1), dim=1) + L2 * variation

    def deletion(up_mask, eps):
        return interval_score(image, baseline, up_mask, eps).sum()

    def insertion(up_mask, eps):
        return interval_score(baseline, image, up_mask, eps).sum()

    def loss(masks):  # the line search's loss_function
        eps = draws()
        if not plusplus:
            return deletion(upscale(masks[0]), eps[0]) + regularization(masks[0])
        up_d, up_i = upscale(masks[0]), upscale(masks[1])
        value = deletion(up_d, eps[2]) - insertion(up_i, eps[3])
        value = value + deletion(up_d * up_i, eps[0]) - insertion(up_d * up_i, eps[1])
        return value + regularization(masks[0] * masks[1])

    def line_search(masks, grads):
        with torch.no_grad():
            step = alpha
            base = loss(masks)
            t = -1e-4 * sum((g ** 2).sum() for g in grads)
            while True:
                value = loss([torch.clamp(m - step * g, 0, 1) for m, g in zip(masks, grads)])
                if not (value > base + step * t and step >= 1e-5):
                    return step
                step *= 0.2

    masks = [torch.ones(1, 1, size, size, dtype=torch.float64) for _ in range(2 if plusplus else 1)]
    taken = []
    for _ in range(iterations):
        masks = [m.detach().requires_grad_(True) for m in masks]
        eps = draws()
        if not plusplus:
            (total,) = torch.autograd.grad(regularization(masks[0]).sum(), masks)
            total = total + torch.autograd.grad(deletion(upscale(masks[0]), eps[0]), masks)[0]
            grads = [total]
        else:
            md, mi = masks
            g1, g2 = torch.autograd.grad(deletion(upscale(md) * upscale(mi), eps[0]), [md, mi])
            h1, h2 = torch.autograd.grad(insertion(upscale(md) * upscale(mi), eps[1]), [md, mi])
            g1, g2 = g1 - h1, g2 - h2  # minus: insertion's loss is minus its score
            g1 = g1 + torch.autograd.grad(deletion(upscale(md), eps[2]), md)[0]
            g2 = g2 - torch.autograd.grad(insertion(upscale(mi), eps[3]), mi)[0]
            g1, g2 = g1 / 2, g2 / 2
            r1, r2 = torch.autograd.grad(regularization(md * mi).sum(), [md, mi])
            grads = [g1 + r1, g2 + r2]
        step = line_search([m.detach() for m in masks], grads)
        taken.append(step)
        masks = [torch.clamp(m.detach() - g * step, 0, 1) for m, g in zip(masks, grads)]
    product = masks[0] * masks[1] if plusplus else masks[0]
    return 1 - upscale(product)[0], taken


def inputs():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=generator), [0, 2, 3]


@pytest.mark.parametrize("cls", [IGOS, IGOSPlusPlus])
def test_equals_the_authors_procedure_written_out_one_image_at_a_time(cls):
    model, (x, labels) = small_net(), inputs()
    ours = cls(model, **OPTIONS, **WEIGHTS)(x, labels, iterations=4, steps=3, batch_size=5)
    steps_taken = []
    for i, label in enumerate(labels):
        expected, taken = authors(model, x[i:i + 1], label, plusplus=cls is IGOSPlusPlus, iterations=4, ig_iter=3,
                                  L1=0.05, L2=0.5)
        torch.testing.assert_close(ours[i], expected, rtol=1e-9, atol=1e-10)
        steps_taken.append(taken)
    # each image searched its own step: the line search is per image, not shared by the batch
    assert len({tuple(t) for t in steps_taken}) > 1, steps_taken
    assert any(len(set(column)) > 1 for column in zip(*steps_taken)), steps_taken
    assert ours.amax() > 0.05  # the masks moved


@pytest.mark.parametrize("cls", [IGOS, IGOSPlusPlus])
def test_the_path_noise_is_the_authors(cls):
    """With noise, one image whose rows fit one pass: each pass (the direction, the line search's current loss,
    each trial) draws one (terms x steps, C, H, W) tensor from the generator; 0.2 of it is added to the points.
    The image is not square (the authors' are): the square grid is upsampled to H x W."""
    model = small_net()
    x = torch.randn(1, 3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = cls(model, **{**OPTIONS, **WEIGHTS, "noise": 0.2})(x, 1, iterations=3, steps=3, batch_size=64,
                                                              generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    terms = 4 if cls is IGOSPlusPlus else 1
    draw = lambda: torch.randn(terms * 3, 3, 12, 16, dtype=torch.float64, generator=generator)  # noqa: E731
    expected, _ = authors(model, x, 1, plusplus=cls is IGOSPlusPlus, iterations=3, ig_iter=3, L1=0.05, L2=0.5,
                          noise=draw)
    assert ours.shape == (1, 1, 12, 16)
    torch.testing.assert_close(ours[0], expected, rtol=1e-9, atol=1e-10)
    noiseless = cls(model, **OPTIONS, **WEIGHTS)(x, 1, iterations=3, steps=3)
    assert (ours - noiseless).abs().max() > 1e-3


def test_the_blurred_baseline_is_opencvs_and_the_kernel_follows_the_image_size():
    image = torch.rand(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    from attribution.core.filters import gaussian_blur
    ours = gaussian_blur(image, 51, 50.0, padding="reflect")  # the call the method makes with its defaults
    torch.testing.assert_close(ours, opencv_blur(image, 51, 50.0), rtol=0, atol=1e-12)
    assert [authors_blur_size(s, s) for s in (224, 499, 500, 799, 800)] == [51, 51, 151, 151, 201]
    assert authors_blur_size(300, 600) == 151


@pytest.mark.parametrize("cls", [IGOS, IGOSPlusPlus])
def test_batch_and_batch_size_independence(cls):
    model, (x, labels) = small_net(), inputs()
    explainer = cls(model, **OPTIONS, **WEIGHTS, iterations=3, steps=3)
    batch = explainer(x, labels)
    for i, label in enumerate(labels):
        torch.testing.assert_close(batch[i:i + 1], explainer(x[i:i + 1], label), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(explainer(x, labels, batch_size=1), batch, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["igos", "igos_pp"])
def test_a_constant_model_leaves_the_whole_image_kept(name):
    """No score gradient and nothing to pay at m = 1 (L1's derivative there is 0, TV's on a constant mask too): the
    direction is 0, the first step is accepted, the masks never move and the map is 0 (up to the upsampling's
    rounding of 1), noise or not."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 3)).double()
    nn.init.zeros_(model[1].weight)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    saliency = create(name, model, **{**OPTIONS, "noise": 0.2})(x, 1, iterations=3, steps=2)
    assert saliency.shape == (2, 1, 12, 12) and saliency.abs().max() < 1e-12


@pytest.mark.parametrize("cls", [IGOS, IGOSPlusPlus])
def test_the_map_is_the_planted_square(cls):
    """Only the square carries class 0's evidence: with the authors' weights, the map's top pixels (as many as the
    square has) lie in it (0.92 and 0.91 of them when written) and its mean there is many times its mean outside
    (0.065 against 0.008 for I-GOS, whose TV weight of 20 on an 8 x 8 mask keeps the deletion faint; 0.95 against
    0.29 for iGOS++, whose map is a smooth bump on the square)."""
    pattern = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    top, left, size = 8, 16, 12
    model = Planted(pattern, (top, left, size)).double().eval()
    saliency = cls(model, mask_size=8, blur_size=9, blur_sigma=4.0, noise=0.0)(pattern, 0, iterations=5, steps=5)
    inside = torch.zeros_like(saliency, dtype=torch.bool)
    inside[..., top:top + size, left:left + size] = True
    top_pixels = saliency.flatten().topk(size * size).indices
    assert inside.flatten()[top_pixels].double().mean() > 0.85
    assert saliency[inside].mean() > 3 * saliency[~inside].mean(), \
        (saliency[inside].mean().item(), saliency[~inside].mean().item())


def test_defaults_are_the_authors():
    """``main.py`` with ``args.py``'s defaults: 20 iterations, 15 steps (the swapped --ig_iter/--iterations), a
    28 x 28 mask, L1 = 1, L2 = 20, alpha = 1000, noise 0.2, the softmax, the 51/50 blur rule."""
    expected = {"score": "softmax", "iterations": 20, "steps": 15, "mask_size": 28, "l1_coeff": 1.0,
                "tv_coeff": 20.0, "alpha": 1000.0, "noise": 0.2, "blur_size": None, "blur_sigma": None,
                "generator": None}
    assert IGOS.defaults == expected and IGOSPlusPlus.defaults == expected
    assert IGOS.name == "igos" and IGOSPlusPlus.name == "igos_pp" and IGOS.kind == "perturbation"
    from attribution.perturbation import igos
    assert (igos.LS_BETA, igos.LS_DECAY, igos.LS_MIN_STEP, igos.BILATERAL_SIGMA) == (1e-4, 0.2, 1e-5, 0.01)
    assert IGOSPlusPlus.gradient_scale == 0.5 and len(IGOSPlusPlus.terms) == 4 and len(IGOS.terms) == 1


@pytest.mark.parametrize("options, error, message", [
    ({"iterations": 0}, ValueError, "iterations must be a positive int"),
    ({"steps": 2.5}, ValueError, "steps must be a positive int"),
    ({"mask_size": 1}, ValueError, "mask_size must be an int of at least 2"),
    ({"alpha": 0}, ValueError, "alpha must be a positive finite number"),
    ({"alpha": float("inf")}, ValueError, "alpha must be a positive finite number"),
    ({"l1_coeff": -1.0}, ValueError, "l1_coeff must be a non-negative finite number"),
    ({"tv_coeff": float("nan")}, ValueError, "tv_coeff must be a non-negative finite number"),
    ({"noise": True}, ValueError, "noise must be a non-negative finite number"),
    ({"blur_size": 4}, ValueError, "blur_size must be None or a positive odd int, got 4"),
    ({"blur_sigma": -1.0}, ValueError, "blur_sigma must be None or a positive finite number"),
    ({"generator": 0}, TypeError, "generator must be a torch.Generator or None, got int"),
    ({"ig_iter": 3}, TypeError, "unknown option 'ig_iter'"),
])
def test_bad_options_are_named(options, error, message):
    model, (x, _) = small_net(), inputs()
    with pytest.raises(error, match=message):
        IGOSPlusPlus(model, **OPTIONS)(x[:1], 0, **{"iterations": 1, "steps": 1, **options})


def test_create_graph_matches_finite_differences():
    """The map is differentiable through every step (the line search's steps held fixed): the gradient of a
    weighted sum of the map w.r.t. the classifier's weights equals a central difference."""
    model, (x, labels) = small_net(), inputs()
    explainer = IGOS(model, **OPTIONS, **WEIGHTS, iterations=2, steps=2)
    weight = torch.randn(12 * 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).view(1, 1, 12, 12)
    out = explainer(x[:2], labels[:2], create_graph=True)
    (grad,) = torch.autograd.grad((out * weight).sum(), model[-1].weight)
    direction = torch.randn(model[-1].weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            model[-1].weight.add_(sign * 1e-6 * direction)
            values.append((explainer(x[:2], labels[:2]) * weight).sum())
            model[-1].weight.sub_(sign * 1e-6 * direction)
    numeric = (values[0] - values[1]) / 2e-6
    assert grad.abs().sum() > 0
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-5, atol=1e-9)
