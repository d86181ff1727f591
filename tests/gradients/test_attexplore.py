"""AttEXplore: equal to the authors' algorithm written out one image at a time with the same random draws, the closed
form on a two-class linear model (with and without clipping), the transforms checked on their own (DCT against
SciPy, the smoothing kernel against the authors' construction, the resize-and-pad against F.interpolate and F.pad),
the draws independent of the rows per pass, the cost, the defaults and the option errors."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch
import torch.nn.functional as F

from attribution import create
from attribution.gradients.attexplore import AttEXplore, dct_matrix, diversity_matrices, smoothed, spectrum_filter
from conftest import LinearModel, RowCounter, central_difference, tiny_cnn


# ----------------------------------------------------------------------------------- the authors' pieces, plainly
def authors_gkern(kernlen=7, nsig=3):
    """The code's gkern in float64: the standard normal pdf at linspace(-nsig, nsig, kernlen), outer product,
    normalised to sum 1."""
    x = np.linspace(-nsig, nsig, kernlen)
    k1 = scipy.stats.norm.pdf(x)
    raw = np.outer(k1, k1)
    return torch.from_numpy(raw / raw.sum())


def authors_di_resize(x, grow, top, left, resized, rate):
    """The code's DIResize on a square image with the size and offsets given instead of drawn: resize to
    W + grow, pad to int(W * rate) (top/left as given, the rest bottom/right), resize back to W (bilinear)."""
    size = x.shape[-1]
    canvas = int(size * rate)
    if not resized:
        return F.interpolate(x, size=[size, size], mode="bilinear", align_corners=False)
    rnd = size + grow
    rescaled = F.interpolate(x, size=[rnd, rnd], mode="bilinear", align_corners=False)
    rem = canvas - rnd
    padded = F.pad(rescaled, [left, rem - left, top, rem - top], value=0)
    return F.interpolate(padded, size=[size, size], mode="bilinear", align_corners=False)


def draw_like_the_method(generator, steps, samples, shape, room, diversity_prob, sigma, rho):
    """The draws in the documented order: per step, rand(samples, 4) (coin, grow, top, left), then per copy
    randn(B, C, H, W) and rand(B, C, H, W); float32."""
    plan = []
    for _ in range(steps):
        resizes = [(False, 0, 0, 0)] * samples
        if diversity_prob > 0 and room > 0:
            u = torch.rand(samples, 4, generator=generator).double()
            resizes = []
            for c in range(samples):
                grow = int(np.floor(u[c, 1].item() * room))
                resizes.append((u[c, 0].item() < diversity_prob, grow, int(np.floor(u[c, 2].item() * (room - grow))),
                                int(np.floor(u[c, 3].item() * (room - grow)))))
        copies = []
        for c in range(samples):
            noise = torch.randn(shape, generator=generator) if sigma > 0 else torch.zeros(shape)
            mask = torch.rand(shape, generator=generator) if rho > 0 else None
            copies.append((noise, mask, resizes[c]))
        plan.append(copies)
    return plan


def attexplore_written_out(model, image, label, index, plan, epsilon, steps, samples, sigma, rho, rate,
                           kernel_size=7, bounds=None, use_softmax=True):
    """The authors' FGSMGradSSA (signed steps, no early stop) and ATTEXPLORE sum for one image (1, C, H, W), the
    draws of image ``index`` taken from ``plan``: per step, per copy, the unnormalised DCT (SciPy's, the code's
    convention) of the noisy point, times the mask in [1 - rho, 1 + rho), inverse DCT; the cross-entropy of the
    softmax of the outputs for the resized copy, its gradient w.r.t. the inverse DCT; the mean over copies, the
    authors' Gaussian kernel (zero padding), divided by its mean |.|, momentum 1; the step; finally
    -sum (hat_{k+1} - hat_k) * grad_k."""
    alpha = epsilon / steps
    kernel = authors_gkern(kernel_size).to(image.dtype).expand(image.shape[1], 1, -1, -1)
    point, grad, hats, grads = image.clone(), 0, [image.clone()], []
    for k in range(steps):
        total = 0
        for c in range(samples):
            noise, mask, (resized, grow, top, left) = plan[k][c]
            noisy = (point + noise[index:index + 1].to(image.dtype) * sigma).detach().numpy()
            if mask is not None:
                spectrum = scipy.fft.dctn(noisy, axes=(-2, -1))
                m = mask[index:index + 1].to(image.dtype).numpy() * 2 * rho + 1 - rho
                noisy = scipy.fft.idctn(spectrum * m, axes=(-2, -1))
            v = torch.from_numpy(np.ascontiguousarray(noisy)).requires_grad_(True)
            out = model(authors_di_resize(v, grow, top, left, resized, rate))
            if use_softmax:
                out = F.softmax(out, dim=-1)
            loss = F.cross_entropy(out, torch.tensor([label]))
            total = total + torch.autograd.grad(loss, v)[0]
        total = total / samples
        total = F.conv2d(total, kernel, padding=kernel_size // 2, groups=image.shape[1])
        total = total / total.abs().mean([1, 2, 3], keepdim=True)
        grad = grad + total
        grads.append(grad)
        moved = point - alpha * grad.sign()
        point = image + (moved - image).clamp(-epsilon, epsilon)
        if bounds is not None:
            point = point.clamp(*bounds)
        hats.append(point.clone())
    hats, grads = torch.cat(hats), torch.cat(grads)
    return -((hats[1:] - hats[:-1]) * grads).sum(0, keepdim=True)


# ------------------------------------------------------------------------------------------ the algorithm itself
@pytest.mark.parametrize("rate, bounded", [(1.15, True), (1.5, False)])
def test_equals_the_authors_algorithm_with_the_same_draws(rate, bounded):
    """tiny_cnn in float64, three 16 x 16 images, 3 steps of 4 copies, 5 rows per pass (chunks cut across copies):
    with the draws made in the documented order from the same seed, every image's map equals the authors' loop run
    on it alone.  rate 1.15 leaves 2 pixels of room (the default), 1.5 leaves 8."""
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) if bounded else torch.randn(3, 3, 16, 16, dtype=torch.float64)
    bounds = (0.0, 1.0) if bounded else None
    labels = [0, 3, 4]
    options = dict(epsilon=0.2, steps=3, samples=4, sigma=16 / 255, rho=0.5, resize_rate=rate, diversity_prob=0.5)
    ours = AttEXplore(model, bounds=bounds, **options)(x, labels, batch_size=5,
                                                      generator=torch.Generator().manual_seed(11))
    room = int(16 * rate) - 16
    plan = draw_like_the_method(torch.Generator().manual_seed(11), 3, 4, x.shape, room, 0.5, 16 / 255, 0.5)
    assert {copy[2][0] for step in plan for copy in step} == {True, False}  # both kinds of copies occur
    if rate > 1.2:
        assert len({copy[2][1:] for step in plan for copy in step if copy[2][0]}) > 3  # several sizes and offsets
    for i, label in enumerate(labels):
        expected = attexplore_written_out(model, x[i:i + 1], label, i, plan, 0.2, 3, 4, 16 / 255, 0.5, rate,
                                          bounds=bounds)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0


def test_logit_score_is_the_authors_use_softmax_false():
    model = tiny_cnn().double()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    options = dict(epsilon=0.1, steps=2, samples=3, resize_rate=1.5)
    ours = AttEXplore(model, score="logit", **options)(x, [1, 2], generator=torch.Generator().manual_seed(5))
    plan = draw_like_the_method(torch.Generator().manual_seed(5), 2, 3, x.shape, 8, 0.5, 16 / 255, 0.5)
    for i, label in enumerate([1, 2]):
        expected = attexplore_written_out(model, x[i:i + 1], label, i, plan, 0.1, 2, 3, 16 / 255, 0.5, 1.5,
                                          use_softmax=False)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)


def smoothed_unit(direction: torch.Tensor, kernel_size: int) -> torch.Tensor:
    kernel = authors_gkern(kernel_size).expand(3, 1, -1, -1)
    smooth = F.conv2d(direction[None], kernel, padding=kernel_size // 2, groups=3)[0]
    return smooth / smooth.abs().mean()


@pytest.mark.parametrize("score", ["softmax", "logit"])
def test_closed_form_on_a_two_class_linear_model(score):
    """f = W x + c with two classes: the cross-entropy's gradient is a positive multiple of w_o - w_t at every
    point (for the logits and for the softmax scores alike), so without noise, mask or resize every smoothed,
    normalised gradient is the same n = K * (w_o - w_t) / mean|K * (w_o - w_t)|, G_k = (k + 1) n, every step is
    -alpha sign(n) and A = alpha |n| (1 + 2 + ... + steps) = alpha |n| steps (steps + 1) / 2."""
    model = LinearModel(classes=2).double()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    labels = [0, 1, 1]
    steps, epsilon = 5, 0.1
    ours = AttEXplore(model, score=score, epsilon=epsilon, steps=steps, samples=3, sigma=0.0, rho=0.0,
                      diversity_prob=0.0)(x, labels)
    weight = model.linear.weight.detach().view(2, 3, 8, 8)
    for i, t in enumerate(labels):
        n = smoothed_unit(weight[1 - t] - weight[t], 7)
        torch.testing.assert_close(ours[i], epsilon / steps * n.abs() * steps * (steps + 1) / 2, rtol=1e-9, atol=1e-12)


def test_closed_form_with_clipping_shows_the_direction():
    """The same model with bounds that the steps run into: p_k = clip(x - k alpha sign(n)) for k >= 1 (p_0 = x), so
    A = -sum_k (p_{k+1} - p_k) (k + 1) n; moving the other way would clip other features.  No smoothing
    (kernel_size 1)."""
    model = LinearModel(classes=2).double()
    torch.manual_seed(6)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 0.2 - 0.1
    steps, epsilon, bounds = 4, 0.1, (-0.15, 0.15)
    ours = AttEXplore(model, epsilon=epsilon, steps=steps, samples=1, sigma=0.0, rho=0.0, diversity_prob=0.0,
                      kernel_size=1, bounds=bounds)(x, [0, 1])
    weight = model.linear.weight.detach().view(2, 3, 8, 8)
    alpha = epsilon / steps
    for i, t in enumerate([0, 1]):
        n = smoothed_unit(weight[1 - t] - weight[t], 1)
        points = [x[i]] + [(x[i] - k * alpha * n.sign()).clamp(*bounds) for k in range(1, steps + 1)]
        expected = -sum((points[k + 1] - points[k]) * (k + 1) * n for k in range(steps))
        torch.testing.assert_close(ours[i], expected, rtol=1e-9, atol=1e-12)
        clipped = (x[i] - steps * alpha * n.sign()).abs() > 0.15
        assert clipped.any() and (~clipped).any()
        torch.testing.assert_close(ours[i][~clipped], (alpha * n.abs() * steps * (steps + 1) / 2)[~clipped])
        assert (ours[i][clipped] < (alpha * n.abs() * steps * (steps + 1) / 2)[clipped]).all()


# ------------------------------------------------------------------------------------------------ the transforms
def test_dct_is_scipys_orthonormal_dct_and_the_filter_the_codes():
    """The matrix is scipy.fft.dct(norm='ortho') along an axis; IDCT(m * DCT(x)) over H and W equals the code's
    unnormalised transform pair (SciPy's norm=None DCT-II and its inverse), the scale cancelling."""
    rng = np.random.default_rng(0)
    for n in (1, 5, 16):
        v = rng.standard_normal((4, n))
        torch.testing.assert_close((torch.from_numpy(v) @ dct_matrix(n).T).numpy(), scipy.fft.dct(v, norm="ortho"),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dct_matrix(n) @ dct_matrix(n).T, torch.eye(n, dtype=torch.float64))
    images = rng.standard_normal((2, 3, 6, 9))
    mask = rng.uniform(0.5, 1.5, images.shape)
    expected = scipy.fft.idctn(mask * scipy.fft.dctn(images, axes=(-2, -1)), axes=(-2, -1))
    ours = spectrum_filter(torch.from_numpy(images), torch.from_numpy(mask), dct_matrix(6), dct_matrix(9))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, 3, 7, 15])
def test_the_smoothing_is_the_authors_kernel(size):
    """``smoothed`` equals the depthwise convolution with the code's ``gkern(size, 3)``, zero padding."""
    grads = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(size))
    kernel = authors_gkern(size, 3).expand(3, 1, size, size)
    expected = F.conv2d(grads, kernel, padding=size // 2, groups=3)
    torch.testing.assert_close(smoothed(grads, size), expected, rtol=1e-12, atol=1e-14)


def test_resize_and_pad_matrices_equal_interpolate_and_pad():
    """Square images: each (grow, top, left) equals the code's DIResize; a non-square image grows by the same
    number of pixels along both sides, padded and resized back per axis the same way; not resized: the identity."""
    torch.manual_seed(7)
    square = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    room = int(16 * 1.5) - 16
    cases = [(0, 0, 0), (room - 1, 0, 0), (3, 4, 1), (5, 0, 2), (2, 5, 5)]
    grow, top, left = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(3))
    on = torch.ones(len(cases), dtype=torch.bool)
    rows, cols = diversity_matrices(16, room, grow, top, on), diversity_matrices(16, room, grow, left, on)
    for c, (g, t, l) in enumerate(cases):
        expected = authors_di_resize(square, g, t, l, True, 1.5)
        torch.testing.assert_close(rows[c] @ square @ cols[c].T, expected, rtol=1e-12, atol=1e-12)
    off = diversity_matrices(16, room, grow, top, torch.zeros(len(cases), dtype=torch.bool))
    assert torch.equal(off, torch.eye(16, dtype=torch.float64).expand(len(cases), 16, 16))
    wide = torch.randn(1, 2, 10, 20, dtype=torch.float64)
    room = int(20 * 1.3) - 20  # 6 pixels along both axes
    g, t, l = 2, 3, 1
    rows = diversity_matrices(10, room, torch.tensor([float(g)]), torch.tensor([float(t)]), on[:1])[0]
    cols = diversity_matrices(20, room, torch.tensor([float(g)]), torch.tensor([float(l)]), on[:1])[0]
    resized = F.interpolate(wide, size=[10 + g, 20 + g], mode="bilinear", align_corners=False)
    padded = F.pad(resized, [l, room - g - l, t, room - g - t])
    expected = F.interpolate(padded, size=[10, 20], mode="bilinear", align_corners=False)
    torch.testing.assert_close(rows @ wide @ cols.T, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------- draws, cost and options
def test_draws_do_not_depend_on_the_rows_per_pass_and_follow_the_generator():
    model = tiny_cnn()
    torch.manual_seed(8)
    x = torch.randn(3, 3, 16, 16)
    explainer = AttEXplore(model, steps=2, samples=3, resize_rate=1.5)
    maps = [explainer(x, [0, 1, 2], batch_size=b, generator=torch.Generator().manual_seed(1)) for b in (1, 4, None)]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0], rtol=1e-5, atol=1e-7)
    other_seed = explainer(x, [0, 1, 2], generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(other_seed, maps[0])
    torch.manual_seed(0)  # without a generator: the global one
    first = explainer(x, [0, 1, 2])
    torch.manual_seed(0)
    torch.testing.assert_close(explainer(x, [0, 1, 2]), first)


def test_cost_is_steps_times_samples_rows_per_image():
    model = tiny_cnn()
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 16)
    counter = RowCounter(model)
    AttEXplore(model, steps=3, samples=5)(x, [0, 1], batch_size=4, generator=torch.Generator().manual_seed(0))
    counter.handle.remove()
    assert sum(counter.rows) == 3 * 5 * 2 and max(counter.rows) <= 4


def test_defaults_are_the_authors():
    """saliency_zoo.attexplore (LA) / ampe (ATTEXPLORE): epsilon=16 (/255), N=20, num_steps=10, use_softmax=True;
    FGSMGradSSA: sigma 16/255, rho 0.5; DI: resize_rate 1.15, diversity_prob 0.5; gkern(7, 3)."""
    assert AttEXplore.defaults == {"score": "softmax", "epsilon": 16 / 255, "steps": 10, "samples": 20,
                                   "sigma": 16 / 255, "rho": 0.5, "resize_rate": 1.15, "diversity_prob": 0.5,
                                   "kernel_size": 7, "bounds": None, "generator": None}
    assert create("attexplore", tiny_cnn()).__class__ is AttEXplore


@pytest.mark.parametrize("option, value, message", [
    ("epsilon", 0, "epsilon must be a positive number"),
    ("steps", 0, "steps must be a positive int"),
    ("samples", 1.5, "samples must be a positive int"),
    ("sigma", -0.1, "sigma must be a non-negative number"),
    ("rho", 1.5, r"rho must be a number in \[0, 1\]"),
    ("resize_rate", 0.9, "resize_rate must be a number >= 1"),
    ("diversity_prob", True, "diversity_prob must be a probability"),
    ("kernel_size", 4, "kernel_size must be an odd positive int"),
    ("bounds", (1, 0), "bounds must be None or a pair"),
])
def test_bad_options_are_named(option, value, message, images):
    with pytest.raises(ValueError, match=message):
        AttEXplore(tiny_cnn(), steps=1, samples=1)(images, 0, **{option: value})


def test_generator_and_callable_target_errors(images):
    explainer = AttEXplore(tiny_cnn(), steps=1, samples=1)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        explainer(images, 0, generator=3)
    with pytest.raises(ValueError, match="needs class indices"):
        explainer(images, lambda s: s[:, 0])


def test_no_room_to_grow_skips_the_resize():
    """6 pixels wide at rate 1.15: int(6.9) = 6 leaves no room, so no copy is resized (and nothing is drawn for it):
    the same map as diversity_prob=0 with the same generator."""
    model = LinearModel(shape=(3, 6, 6), classes=3)
    torch.manual_seed(10)
    x = torch.randn(2, 3, 6, 6)
    options = dict(steps=2, samples=2)
    default = AttEXplore(model, **options)(x, [0, 2], generator=torch.Generator().manual_seed(3))
    off = AttEXplore(model, diversity_prob=0.0, **options)(x, [0, 2], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(default, off)
    assert torch.isfinite(default).all() and default.abs().sum() > 0


def test_create_graph_equals_finite_differences_with_the_draws_on():
    """float64, noise, spectrum masks and resizes on (the same draws in every call): the steps' signs are
    constant almost everywhere, the summed gradients carry the graph."""
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = model[4].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def explain(create_graph=False):
        return AttEXplore(model, steps=3, samples=2, diversity_prob=1.0,
                          generator=torch.Generator().manual_seed(2))(x, [0, 3], create_graph=create_graph)

    (grad,) = torch.autograd.grad(explain(True).sum(), weight)
    numeric = central_difference(lambda: explain().sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-10)
