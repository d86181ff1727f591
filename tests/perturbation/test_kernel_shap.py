"""Kernel SHAP: exact Shapley values when every coalition is enumerated, closed forms, and Captum's KernelShap."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import attribution
from attribution.perturbation.kernel_shap import shapley_design
from attribution.perturbation.segments import grid_segments
from conftest import CountingModel, LinearModel, tiny_cnn


def shapley_by_enumeration(model, image, cls, labels, baseline):
    """phi_j = sum over coalitions S without j of |S|! (M - |S| - 1)! / M! (f(S + j) - f(S))."""
    features = int(labels.max()) + 1

    def value(coalition):
        keep = torch.tensor(coalition, dtype=torch.bool)[labels]
        with torch.no_grad():
            return model(torch.where(keep, image, baseline)[None])[0, cls].item()

    phi = []
    for j in range(features):
        total = 0.0
        for coalition in itertools.product([0, 1], repeat=features):
            if coalition[j]:
                continue
            k = sum(coalition)
            weight = math.factorial(k) * math.factorial(features - k - 1) / math.factorial(features)
            total += weight * (value(coalition[:j] + (1,) + coalition[j + 1:]) - value(coalition))
        phi.append(total)
    return torch.tensor(phi, dtype=torch.float64)


@pytest.fixture
def model_and_images():
    torch.manual_seed(0)
    return tiny_cnn().double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)


def test_with_every_coalition_it_returns_the_exact_shapley_values(model_and_images):
    model, x = model_and_images
    maps = attribution.KernelSHAP(model, grid=2)(x, [0, 3], batch_size=5)
    labels = grid_segments(16, 16, 2, torch.device("cpu"))
    for i, cls in enumerate([0, 3]):
        exact = shapley_by_enumeration(model, x[i], cls, labels, torch.zeros_like(x[i]))
        torch.testing.assert_close(maps[i, 0], exact[labels], rtol=1e-8, atol=1e-12)


def test_user_segments_are_relabelled_and_every_pixel_gets_its_segments_value(model_and_images):
    model, x = model_and_images
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:, 5:] = 7
    labels[9:, :] = -3
    labels[12:, 12:] = 40  # 4 segments with arbitrary labels
    maps = attribution.KernelSHAP(model, segments=labels, baseline="black")(x, [1, 2])
    relabelled = torch.unique(labels, return_inverse=True)[1]
    for i, cls in enumerate([1, 2]):
        black = torch.full_like(x[i], float(x[i].min()))
        exact = shapley_by_enumeration(model, x[i], cls, relabelled, black)
        torch.testing.assert_close(maps[i, 0], exact[relabelled], rtol=1e-8, atol=1e-12)


def test_efficiency_holds_exactly_with_sampled_coalitions(model_and_images):
    model, x = model_and_images
    maps = attribution.KernelSHAP(model, grid=4, samples=40)(x, [0, 1], generator=torch.Generator().manual_seed(0))
    labels = grid_segments(16, 16, 4, torch.device("cpu"))
    phi = torch.stack([maps[:, 0][:, labels == j][:, 0] for j in range(16)], dim=1)
    with torch.no_grad():
        change = model(x)[[0, 1], [0, 1]] - model(torch.zeros_like(x))[[0, 1], [0, 1]]
    torch.testing.assert_close(phi.sum(1), change, rtol=1e-10, atol=1e-12)


def test_on_a_linear_model_sampled_coalitions_recover_each_segments_contribution():
    """f = <w, x> + c is additive over segments: phi_j = sum over segment j of w (x - b), from any coalitions that
    span the segments."""
    model = LinearModel().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    maps = attribution.KernelSHAP(model, grid=4, samples=60)(x, [1, 3], generator=torch.Generator().manual_seed(1))
    labels = grid_segments(8, 8, 4, torch.device("cpu"))
    contribution = (model.linear.weight.detach()[[1, 3]].view(2, 3, 8, 8) * x).sum(1)
    per_segment = torch.zeros(2, 16, dtype=torch.float64).index_add_(1, labels.flatten(), contribution.flatten(1))
    torch.testing.assert_close(maps[:, 0], per_segment[:, labels], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_fewer_coalitions_than_segments_give_the_minimum_norm_fit(model_and_images, device):
    """6 sampled coalitions of 16 segments: the efficiency constraint eliminates the last segment, and the other 15
    are numpy's minimum-norm least-squares solution of the 6 equations, on every device."""
    model, x = model_and_images
    model, x = model.to(device), x[:1].to(device)
    ours = attribution.KernelSHAP(model, grid=4, samples=6)(x, 2, generator=torch.Generator().manual_seed(0)).cpu()
    coalitions, _ = shapley_design(16, 6, torch.Generator().manual_seed(0))
    labels = grid_segments(16, 16, 4, torch.device("cpu"))
    model, image = model.cpu(), x[0].cpu()

    def score(keep):
        with torch.no_grad():
            return model(torch.where(keep[labels], image, 0.0)[None])[0, 2].item()

    empty, full = score(torch.zeros(16, dtype=torch.bool)), score(torch.ones(16, dtype=torch.bool))
    values = np.array([score(c) - empty for c in coalitions])
    z = coalitions.double().numpy()
    head = np.linalg.lstsq(z[:, :-1] - z[:, -1:], values - z[:, -1] * (full - empty), rcond=None)[0]
    expected = torch.from_numpy(np.append(head, full - empty - head.sum()))
    assert ours.isfinite().all()
    torch.testing.assert_close(ours[0, 0], expected[labels], rtol=1e-9, atol=1e-12)


def test_sampled_sizes_follow_the_shapley_kernel():
    coalitions, weights = shapley_design(16, 20000, torch.Generator().manual_seed(0))  # 2^16 - 2: too many to list
    assert (weights == 1).all() and coalitions.shape == (20000, 16)
    sizes = coalitions.sum(1)
    kernel = torch.tensor([15 / (k * (16 - k)) for k in range(1, 16)], dtype=torch.float64)
    observed = torch.bincount(sizes, minlength=16)[1:].double() / 20000
    torch.testing.assert_close(observed, kernel / kernel.sum(), rtol=0.1, atol=0.005)
    assert (coalitions.double().mean(0) - 0.5).abs().max() < 0.02  # every feature equally often


def test_agrees_with_captums_kernel_shap(model_and_images):
    """Captum samples from the same kernel and soft-constrains the ends: with many samples both estimate the same
    Shapley values."""
    captum = pytest.importorskip("captum.attr")
    model, x = model_and_images
    labels = grid_segments(16, 16, 4, torch.device("cpu"))
    ours = attribution.KernelSHAP(model, grid=4, samples=3000)(x[:1], 2, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = captum.KernelShap(model).attribute(x[:1], baselines=0.0, target=2, n_samples=3000,
                                                feature_mask=labels[None, None].expand(1, 3, 16, 16),
                                                perturbations_per_eval=500)
    phi_ours = torch.stack([ours[0, 0][labels == j][0] for j in range(16)])
    phi_theirs = torch.stack([theirs[0, 0][labels == j][0] for j in range(16)]).double()
    assert torch.corrcoef(torch.stack([phi_ours, phi_theirs]))[0, 1] > 0.95


def test_default_samples_and_forward_count():
    model = CountingModel()
    attribution.KernelSHAP(model, grid=8)(torch.randn(1, 3, 16, 16), 0, batch_size=10_000)
    assert sum(model.calls) == 2 + 2 * 64 + 2048  # the image, the baseline, SHAP's 2M + 2048 coalitions


@pytest.mark.parametrize("bad, message", [({"grid": 0}, "grid must be a positive int"),
                                          ({"samples": 0}, "samples must be a positive int"),
                                          ({"segments": torch.zeros(8, 8, dtype=torch.long)}, "segments must be"),
                                          ({"segments": torch.zeros(16, 16)}, "segments must be")])
def test_bad_options_are_named(cnn, images, bad, message):
    with pytest.raises(ValueError, match=message):
        attribution.KernelSHAP(cnn)(images, 0, **bad)


def test_one_label_map_per_image_explains_each_image_with_its_own(model_and_images):
    """A (B, H, W) stack: each image gets its own segments (here 4 and 6 of them, enumerated exactly), as if
    explained alone."""
    model, images = model_and_images
    x = images[:2]
    first = grid_segments(x.shape[-2], x.shape[-1], 2, x.device)
    second = (torch.arange(x.shape[-1]) * 6 // x.shape[-1]).expand(x.shape[-2], -1)
    stacked = attribution.KernelSHAP(model, segments=torch.stack([first, second]))(x, [1, 2])
    alone = [attribution.KernelSHAP(model, segments=labels)(x[i:i + 1], [1, 2][i])
             for i, labels in enumerate((first, second))]
    torch.testing.assert_close(stacked, torch.cat(alone))
    assert len(torch.unique(stacked[1])) == 6


@pytest.mark.parametrize("name", ["quickshift", "slic"])
def test_superpixels_by_name(model_and_images, name):
    """scikit-image's superpixels on each image scaled to [0, 1]: the map is constant over each of them."""
    from attribution.perturbation.segments import superpixels

    model, _ = model_and_images
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    x[0, :, :16] += 0.9  # blocks of colour, so that the images have superpixels to find
    x[1, :, 16:] += 0.9
    labels = superpixels(x, name)
    assert labels.shape == (2, 32, 32) and all(len(torch.unique(m)) > 1 for m in labels)
    maps = attribution.ShapleyValueSampling(model, segments=name, samples=2,
                                            generator=torch.Generator().manual_seed(0))(x, 0)
    for m, segment in zip(maps[:, 0], labels):
        for value in torch.unique(segment):
            assert len(torch.unique(m[segment == value])) == 1


def test_quickshift_is_lime_images_segmentation():
    """lime_image's default segmenter (quickshift, kernel_size=4, max_dist=200, ratio=0.2) on an image in [0, 1]."""
    from skimage.segmentation import quickshift

    from attribution.perturbation.segments import superpixels

    image = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    image[:, :12] *= 0.2
    image[0, 0, 0], image[0, 1, 1] = 0.0, 1.0  # spans [0, 1]: the scaling is the identity
    theirs = quickshift(image.permute(1, 2, 0).double().numpy(), kernel_size=4, max_dist=200, ratio=0.2)
    ours = superpixels(image[None], "quickshift")[0]
    assert torch.equal(ours, torch.from_numpy(theirs.astype("int64")))


def test_one_label_map_per_image_with_a_baseline_per_image(model_and_images):
    model, images = model_and_images
    x = images[:2]
    first = grid_segments(x.shape[-2], x.shape[-1], 2, x.device)
    second = grid_segments(x.shape[-2], x.shape[-1], 3, x.device)
    baselines = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    stacked = attribution.KernelSHAP(model, segments=torch.stack([first, second]), baseline=baselines)(x, [1, 2])
    alone = [attribution.KernelSHAP(model, segments=labels, baseline=baselines[i:i + 1])(x[i:i + 1], [1, 2][i])
             for i, labels in enumerate((first, second))]
    torch.testing.assert_close(stacked, torch.cat(alone))


def test_bad_segments_name_every_accepted_form(model_and_images):
    model, images = model_and_images
    with pytest.raises(ValueError, match=r"a \(B, \d+, \d+\) stack of them .*'quickshift'"):
        attribution.KernelSHAP(model, segments=torch.zeros(5, *images.shape[-2:], dtype=torch.long))(images[:2], 0)
    with pytest.raises(ValueError, match="one of"):
        attribution.LIME(model, segments="watershed")(images[:2], 0)
