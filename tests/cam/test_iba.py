"""IBA (per-sample information bottleneck) against the authors' procedure written out one image at a time, its
capacity against a written-out Gaussian KL, a closed form at the initial alpha, defaults and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.iba import bottleneck_capacity, smoothing_size
from conftest import central_difference, tiny_cnn

LAYER = "3"  # tiny_cnn's ReLU after the stride-2 conv: 16 channels at 8x8 for 16x16 images


@pytest.fixture
def data():
    torch.manual_seed(4)
    return torch.randn(2, 3, 16, 16), torch.randn(7, 3, 16, 16)


def layer_output(model, layer, images):
    out = {}
    handle = layer.register_forward_hook(lambda m, i, o: out.__setitem__("r", o.detach()))
    with torch.no_grad():
        model(images)
    handle.remove()
    return out["r"]


def welford(features, min_std, threshold):
    """Mean, unbiased std (floored at min_std) and active units, one sample at a time as the authors' estimator."""
    m = np.zeros(features.shape[1:])
    s = np.zeros(features.shape[1:])
    nonzero = np.zeros(features.shape[1:])
    for n, xi in enumerate(features.double().numpy()):
        nonzero += xi != 0
        old = m.copy()
        m = m + (xi - m) / (n + 1)
        s = s + (xi - m) * (xi - old)
    std = np.sqrt(s / (len(features) - 1))
    return (torch.tensor(m, dtype=torch.float32), torch.tensor(np.maximum(std, min_std), dtype=torch.float32),
            torch.tensor(nonzero / len(features) > threshold, dtype=torch.float32))


def gaussian_2d(sigma, channels):
    """The authors' smoothing kernel: a normalised 2-D Gaussian of 2 round(2 sigma) + 1 taps, one per channel."""
    size = int(round(2 * sigma)) * 2 + 1
    grid = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    kernel = torch.exp(-((xx - (size - 1) / 2) ** 2 + (yy - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    return (kernel / kernel.sum()).expand(channels, 1, size, size), size


def iba_written_out(model, layer, image, cls, references, seed, *, beta=10.0, steps=10, lr=1.0, samples=10,
                    initial_alpha=5.0, sigma=1.0, min_std=0.01, threshold=0.01):
    """One image: the authors' loop (IBA/pytorch.py ``analyze``) with torch.optim.Adam on alpha (C, h, w), the
    bottleneck as a forward hook on a full model, the noise drawn per step from a generator seeded with ``seed``."""
    from skimage.transform import resize
    mean, std, active = welford(layer_output(model, layer, references), min_std, threshold)
    channels = mean.shape[0]
    kernel, size = gaussian_2d(sigma, channels)
    alpha = nn.Parameter(torch.full(mean.shape, initial_alpha))
    optimizer = torch.optim.Adam([alpha], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    buffer = {}

    def bottleneck(module, inputs, r):
        lamb = torch.sigmoid(alpha).expand(r.shape[0], -1, -1, -1)
        lamb = F.conv2d(F.pad(lamb, [size // 2] * 4, mode="reflect"), kernel, groups=channels)
        r_norm = (r - mean) / std
        var = (1 - lamb) ** 2
        buffer["capacity"] = -0.5 * (1 + torch.log(var) - (r_norm * lamb) ** 2 - var) * active
        eps = std * buffer["noise"] + mean
        return (lamb * r + (1 - lamb) * eps) * active

    handle = layer.register_forward_hook(bottleneck)
    try:
        batch = image[None].expand(samples, -1, -1, -1)
        for _ in range(steps):
            buffer["noise"] = torch.randn((samples,) + tuple(mean.shape), generator=generator)
            optimizer.zero_grad()
            model_loss = -torch.log_softmax(model(batch), 1)[:, cls].mean()
            loss = model_loss + beta * buffer["capacity"].mean(dim=0).mean()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
    capacity = buffer["capacity"].mean(dim=0).detach().numpy()
    saliency = np.nansum(capacity, 0) / np.log(2)
    saliency *= saliency.size / (image.shape[-2] * image.shape[-1])
    return resize(saliency, image.shape[-2:], order=1, preserve_range=True)


def test_equals_the_authors_procedure_one_image_at_a_time(data):
    pytest.importorskip("skimage")
    x, refs = data
    model = tiny_cnn()
    options = dict(steps=4, samples=3, beta=0.01)
    out = A.IBA(model, LAYER, iterations=4, samples=3, beta=0.01, references=refs,
                generator=torch.Generator().manual_seed(11))(x, [1, 3])
    assert out.shape == (2, 1, 16, 16)
    for i, cls in enumerate([1, 3]):
        expected = iba_written_out(model, model[3], x[i], cls, refs, 11, **options)
        np.testing.assert_allclose(out[i, 0].numpy(), expected, rtol=2e-4, atol=1e-7)
    # the optimisation moved the map away from the one at the initial alpha
    start = A.IBA(model, LAYER, iterations=0, references=refs)(x, [1, 3])
    assert (out - start).abs().max() > 1e-3 * start.abs().max()


def test_default_layer_and_defaults_match_the_authors(data):
    x, refs = data
    model = tiny_cnn()
    defaults = A.IBA.defaults
    assert {k: defaults[k] for k in ("beta", "iterations", "lr", "samples", "initial_alpha", "sigma", "min_std",
                                     "active_threshold", "relu")} == dict(
        beta=10.0, iterations=10, lr=1.0, samples=10, initial_alpha=5.0, sigma=1.0, min_std=0.01,
        active_threshold=0.01, relu=False)
    assert defaults["score"] == "log_softmax" and defaults["references"] is None
    assert smoothing_size(1.0) == 5 and smoothing_size(0.5) == 3
    out = A.IBA(model, references=refs, generator=torch.Generator().manual_seed(2))(x[:1], 2)
    expected = iba_written_out(model, model[5], x[0], 2, refs, 2)
    np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=2e-4, atol=1e-7)


def test_capacity_is_the_gaussian_kl_of_the_bottleneck():
    torch.manual_seed(0)
    r, mu = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    sd = torch.rand(50, dtype=torch.float64) + 0.1
    lamb = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
    # P(Z|R) = N(lamb r + (1 - lamb) mu, ((1 - lamb) sd)^2) against Q(Z) = N(mu, sd^2)
    m1, s1 = lamb * r + (1 - lamb) * mu, (1 - lamb) * sd
    written = torch.log(sd / s1) + (s1 ** 2 + (m1 - mu) ** 2) / (2 * sd ** 2) - 0.5
    torch.testing.assert_close(bottleneck_capacity((r - mu) / sd, lamb), written)
    library = torch.distributions.kl_divergence(torch.distributions.Normal(m1, s1), torch.distributions.Normal(mu, sd))
    torch.testing.assert_close(bottleneck_capacity((r - mu) / sd, lamb), library)
    assert (bottleneck_capacity((r - mu) / sd, lamb) >= 0).all()


@pytest.mark.parametrize("iterations", [0, 1])
def test_map_at_the_initial_alpha_is_a_closed_form(data, iterations):
    """No update: lambda = sigmoid(alpha_0) everywhere (smoothing a constant), so the map is
    sum_c KL(lambda_0, r') / ln 2 * hw / HW, upsampled; beta and the noise play no part."""
    x, refs = data
    model = tiny_cnn()
    out = A.IBA(model, LAYER, iterations=iterations, beta=123.0, initial_alpha=1.5, references=refs)(x, [0, 4])
    acts, ref_acts = layer_output(model, model[3], x), layer_output(model, model[3], refs)
    mean, std = ref_acts.mean(0), ref_acts.std(0).clamp(min=0.01)
    active = ((ref_acts != 0).float().mean(0) > 0.01).float()
    lam = 1 / (1 + math.exp(-1.5))
    r = (acts - mean) / std
    kl = 0.5 * ((r * lam) ** 2 + (1 - lam) ** 2 - 1 - 2 * math.log(1 - lam)) * active
    expected = kl.sum(1, keepdim=True) / math.log(2) * 64 / 256
    from skimage.transform import resize  # the authors' resize (reflected at the border)
    expected = torch.tensor(np.stack([resize(e[0].numpy(), (16, 16), order=1, preserve_range=True)
                                      for e in expected]), dtype=torch.float32)[:, None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


def test_default_references_are_the_images_themselves(data):
    x, _ = data
    model = tiny_cnn()
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    explainer = A.IBA(model, LAYER, iterations=3, samples=2)
    torch.testing.assert_close(explainer(x, [0, 1], generator=gen()),
                               explainer(x, [0, 1], references=x, generator=gen()))
    # one image alone would be its own mean (a map of the active units only): refused, naming references
    with pytest.raises(ValueError, match="one image alone is its own mean; pass references="):
        explainer(x[:1], 0)
    assert torch.isfinite(explainer(x[:1], 0, references=x)).all()


def test_statistics_merged_chunk_by_chunk_equal_the_whole_set(data):
    """7 references, 2 per pass: the pairwise merge of chunk means and squared deviations equals the statistics
    of all the maps at once (unbiased std floored at min_std, the active units)."""
    x, refs = data
    model = tiny_cnn()
    explainer = A.IBA(model, LAYER, iterations=3, samples=2, references=refs)
    chunked = explainer(x, [0, 1], batch_size=2, generator=torch.Generator().manual_seed(0))
    whole = explainer(x, [0, 1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    maps = model[:4](refs).detach()
    mean, std, active = explainer._statistics(model[3], x, model[:4](x), refs, None, 2, 0.01, 0.01, False)
    torch.testing.assert_close(mean, maps.mean(0))
    torch.testing.assert_close(std, maps.std(0, unbiased=True).clamp(min=0.01))
    torch.testing.assert_close(active, ((maps != 0).float().mean(0) > 0.01).float())


@pytest.mark.parametrize("references", ["given", "images"])
def test_create_graph_equals_finite_differences(data, references):
    """float64: the statistics depend on the weights below the layer too (references' maps or the images'), so
    they carry the graph; a weight below the layer and one above it."""
    x, refs = (t.double() for t in data)
    model = tiny_cnn().double()
    options = dict(iterations=3, samples=2, references=refs if references == "given" else None)
    explainer = A.IBA(model, LAYER, **options)

    def explain(create_graph=False):
        return explainer(x, [0, 1], generator=torch.Generator().manual_seed(0), create_graph=create_graph).sum()

    for name in ("0.weight", "8.weight"):
        weight = dict(model.named_parameters())[name]
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(explain(True), weight)
        # a step of 1e-5: the weight above the layer moves the map's sum (~1e3) by ~1e-4 only, below float64's
        # rounding of differences at smaller steps
        numeric = central_difference(explain, weight, direction, step=1e-5)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-3, atol=1e-9)


def test_a_saturated_initial_alpha_stays_finite(data):
    """sigmoid(18) rounds to 1 in float32: the bottleneck's variance would be 0 and its log -inf."""
    x, refs = data
    saliency = A.IBA(tiny_cnn(), LAYER, iterations=2, samples=2, references=refs, initial_alpha=18.0)(x, [0, 1])
    assert torch.isfinite(saliency).all()


def test_full_forwards_equal_tail_passes(data):
    x, refs = data
    model = tiny_cnn()
    explainer = A.IBA(model, LAYER, iterations=3, samples=2, references=refs)
    tail = explainer(x, [0, 1], generator=torch.Generator().manual_seed(0))
    assert explainer.last_mode == "tail"
    full = explainer(x, [0, 1], use_tail=False, generator=torch.Generator().manual_seed(0))
    assert explainer.last_mode == "full"
    torch.testing.assert_close(tail, full)


@pytest.mark.parametrize("option, value, error", [
    ("beta", -1.0, ValueError), ("beta", "10", ValueError), ("iterations", -1, ValueError),
    ("iterations", 2.0, ValueError), ("samples", 0, ValueError), ("lr", 0.0, ValueError),
    ("min_std", 0.0, ValueError), ("sigma", -1.0, ValueError), ("initial_alpha", float("nan"), ValueError),
    ("active_threshold", -0.1, ValueError), ("relu", 1, TypeError), ("references", [1.0], TypeError),
    ("references", torch.zeros(2, 3, 8, 8), ValueError), ("references", torch.zeros(3, 16, 16), ValueError),
    ("generator", 0, TypeError), ("layer_fusion", "sum", ValueError),
])
def test_bad_options(data, option, value, error):
    x, _ = data
    with pytest.raises(error, match=option if option != "layer_fusion" else "layer_fusion"):
        A.IBA(tiny_cnn(), LAYER, iterations=1)(x, 0, **{option: value})


def test_token_outputs_get_the_bottleneck_on_patch_tokens_only():
    """A ViT-like (B, 1 + h w, C) output: the bottleneck's (n, C, h, w) rows are written back onto the patch tokens
    where the CAM layout reads them; the class token passes unchanged."""
    from types import SimpleNamespace

    from attribution.core.capture import channel_positions

    torch.manual_seed(0)
    acts = torch.randn(2, 1 + 6, 4)

    def layout(t):
        return t[:, 1:].transpose(1, 2).reshape(t.shape[0], 4, 2, 3)

    positions = channel_positions(layout, acts.shape, "tokens")
    image = torch.tensor([1, 0, 1])
    z = torch.randn(3, 4, 2, 3)
    rows = A.IBA._place(SimpleNamespace(activations=acts), z, image, positions)
    assert rows.shape == (3, 7, 4)
    torch.testing.assert_close(rows[:, 0], acts[image, 0])
    torch.testing.assert_close(layout(rows), z)
