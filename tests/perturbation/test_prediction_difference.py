"""Prediction Difference Analysis: the authors' procedure written out per image, the weight of evidence with its
Laplace correction, closed forms on models that read one pixel or none, the authors' defaults, bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import attribution
from attribution.perturbation.prediction_difference import (FIT_PATCHES, TRAIN_SIZE, PredictionDifference,
                                                             conditional_gaussian, patch_gaussian, weight_of_evidence)
from attribution.perturbation.occlusion import window_bands
from conftest import RowCounter, tiny_cnn


def authors_map(model: nn.Module, image: np.ndarray, samples, label: int, window, stride,
                train_size: int = TRAIN_SIZE) -> np.ndarray:
    """PredDiffAnalyser.get_rel_vect, one image: every window position (top-left corners every ``stride`` pixels,
    the last window cut at the edge; at stride 1 the authors' H - k + 1 positions), its pixels in all channels
    replaced by each sample's, the softmax probabilities averaged over the samples, the Laplace-corrected log2 odds
    of the image's probability minus the average's, averaged per pixel (pixels no window covers stay 0).
    ``samples``: the references (S, C, H, W) (marg_sampler_imagenet), or a function (top, left, h, w) -> the
    window's (S, C, h, w) values (the conditional sampler)."""
    (kh, kw), (sh, sw) = window, stride
    _, height, width = image.shape

    def probs(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()

    true = probs(image[None])[0]
    classes = true.shape[0]

    def log_odds(p):
        q = (p * train_size + 1) / (train_size + classes)
        return np.log2(q / (1 - q))

    rel = np.zeros((height, width))
    counts = np.zeros((height, width))
    top = 0
    while True:
        left = 0
        while True:
            h, w = min(kh, height - top), min(kw, width - left)
            drawn = samples(top, left, h, w) if callable(samples) else samples[:, :, top:top + h, left:left + w]
            x_new = np.repeat(image[None], drawn.shape[0], axis=0)
            x_new[:, :, top:top + h, left:left + w] = drawn
            avg = probs(x_new).mean(axis=0)
            rel[top:top + kh, left:left + kw] += (log_odds(true) - log_odds(avg))[label]
            counts[top:top + kh, left:left + kw] += 1
            if left + kw >= width:
                break
            left += sw
        if top + kh >= height:
            break
        top += sh
    return np.where(counts > 0, rel / np.maximum(counts, 1), 0.0)


def authors_gaussian(refs: np.ndarray, patch: int, corners: np.ndarray):
    """cond_sampler_imagenet._get_gauss_params, one channel at a time: the patches at each drawn top-left corner
    (row-major over the (H - P + 1) x (W - P + 1) corners) of every reference stacked, their mean and np.cov."""
    n, channels, height, width = refs.shape
    (ph, pw), across = patch, width - patch[1] + 1
    means, covs = [], []
    for c in range(channels):
        mat = np.concatenate([refs[:, c, i // across:i // across + ph, i % across:i % across + pw].reshape(n, -1)
                              for i in corners[c]])
        means.append(mat.mean(axis=0))
        covs.append(np.cov(mat.T))
    return means, covs


def authors_conditional(image, refs, means, covs, noise, window, padding):
    """cond_sampler_imagenet.get_samples for one image: the surrounding patch chosen by _get_surr_patch's nine
    cases (at a border the patch stops at the image's edge and the window moves off its centre), per channel the
    Gaussian conditioned on the patch's other pixels (_get_cond_params: mu1 + cov12 inv(cov22) (x2 - mu2),
    cov11 - cov12 inv(cov22) cov21), samples mean + cholesky(cov) z, clipped to the references' min and max at each
    pixel.  z: ``noise`` (S, C, D) at the window's places in the patch (the authors draw a fresh z per window).  A
    window cut at the image's edge (stride > 1) is placed by the same cases with its own size."""
    _, height, width = image.shape
    ph, pw = window[0] + 2 * padding, window[1] + 2 * padding
    low, high = refs.min(axis=0), refs.max(axis=0)

    def draw(top, left, h, w):
        bottom, right = top + h - 1, left + w - 1
        if top < padding:
            r0 = 0
        elif bottom > height - 1 - padding:
            r0 = height - ph
        else:
            r0 = top - padding
        if left < padding:
            c0 = 0
        elif right > width - 1 - padding:
            c0 = width - pw
        else:
            c0 = left - padding
        inside = np.zeros((ph, pw), dtype=bool)
        inside[top - r0:top - r0 + h, left - c0:left - c0 + w] = True
        inside = inside.ravel()
        out = np.zeros((noise.shape[0], image.shape[0], h, w))
        for c in range(image.shape[0]):
            f = image[c, r0:r0 + ph, c0:c0 + pw].ravel()
            mu, cov = means[c], covs[c]
            inv22 = np.linalg.inv(cov[~inside][:, ~inside])
            cov12 = cov[inside][:, ~inside]
            mean = mu[inside] + cov12 @ inv22 @ (f[~inside] - mu[~inside])
            cond = cov[inside][:, inside] - cov12 @ inv22 @ cov12.T
            a = np.linalg.cholesky(cond)
            s = mean[None] + (a @ noise[:, c, inside].T).T
            out[:, c] = s.reshape(-1, h, w)
        return np.clip(out, low[:, top:top + h, left:left + w], high[:, top:top + h, left:left + w])

    return draw


@pytest.mark.parametrize("window, stride", [((3, 3), (1, 1)), ((2, 3), (2, 2)), ((4, 2), (3, 1))])
def test_matches_the_authors_procedure_per_image(window, stride):
    """Same draws: the references the method picks are randperm(N)[:num_samples] of a generator seeded alike."""
    model = tiny_cnn().double()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    refs = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    out = attribution.create("prediction_difference", model, window=window, stride=stride, num_samples=3,
                             sampler="marginal", references=refs, generator=torch.Generator().manual_seed(7))(x, [1, 3])
    chosen = torch.randperm(5, generator=torch.Generator().manual_seed(7))[:3]
    samples = refs[chosen].numpy()
    assert out.shape == (2, 1, 9, 8)
    for i, label in enumerate([1, 3]):
        expected = authors_map(model, x[i].numpy(), samples, label, window, stride)
        np.testing.assert_allclose(out[i, 0].numpy(), expected, rtol=1e-9, atol=1e-12)


def test_default_references_are_the_explained_images():
    """references=None samples from the batch itself (the authors' X_test holds the explained image too): with
    fewer images than num_samples every one of them is a sample, so no draw is involved."""
    model = tiny_cnn().double()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    explainer = attribution.create("prediction_difference", model, window=3, stride=2, sampler="marginal")
    out = explainer(x, [0, 2, 4])
    torch.testing.assert_close(out, explainer(x, [0, 2, 4], references=x.clone()))
    for i, label in enumerate([0, 2, 4]):
        np.testing.assert_allclose(out[i, 0].numpy(), authors_map(model, x[i].numpy(), x.numpy(), label, (3, 3),
                                                                  (2, 2)), rtol=1e-9, atol=1e-12)


def test_weight_of_evidence_and_laplace_correction():
    """WE = log2 odds(q) - log2 odds(q'), q = (p N + 1) / (N + K), as the authors' _evaluate_prediction_difference;
    the rewritten form keeps float32 as close as float64 allows even when p and p' nearly agree."""
    p = torch.tensor([0.0, 1e-7, 0.25, 0.5, 0.9, 1.0, 0.3, 0.3], dtype=torch.float64)
    p_without = torch.tensor([0.5, 1.0, 0.25, 0.1, 0.0, 0.95, 0.3 + 1e-6, 0.3001], dtype=torch.float64)
    for n, k in ((TRAIN_SIZE, 1000), (10, 4), (1, 2)):
        got = weight_of_evidence(p, p_without, n, k)
        for a, b, g in zip(p.tolist(), p_without.tolist(), got.tolist()):
            qa, qb = (a * n + 1) / (n + k), (b * n + 1) / (n + k)
            assert g == pytest.approx(math.log2(qa / (1 - qa)) - math.log2(qb / (1 - qb)), rel=1e-9, abs=1e-15)
        assert torch.isfinite(got).all()  # the correction keeps p = 0 and p = 1 finite
        single = weight_of_evidence(p.float(), p_without.float(), n, k).double()
        torch.testing.assert_close(single, weight_of_evidence(p.float().double(), p_without.float().double(), n, k),
                                   rtol=1e-5, atol=1e-12)
    assert weight_of_evidence(torch.tensor(0.5), torch.tensor(0.5), 7, 2).item() == 0.0


class OnePixel(nn.Module):
    """Two logits, [a * x[0, r, c], 0]: p_0 = sigmoid(a * x[0, r, c]), whatever the other pixels."""

    def __init__(self, r: int, c: int, a: float = 2.0) -> None:
        super().__init__()
        self.r, self.c, self.a = r, c, a

    def forward(self, x):
        z = self.a * x[:, 0, self.r, self.c]
        return torch.stack([z, torch.zeros_like(z)], dim=1)


def test_closed_form_when_the_probability_depends_on_one_pixel():
    """Windows missing pixel (r, c) give WE = 0; those covering it all give WE* = lo(p(x)) - lo(mean_s p(ref_s)),
    so pixel q's map is WE* times the share of q's windows that also cover (r, c)."""
    r, c, k, n = 3, 5, 3, 50
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 9, dtype=torch.float64)
    refs = torch.randn(4, 3, 8, 9, dtype=torch.float64)
    out = attribution.create("prediction_difference", OnePixel(r, c), window=k, num_samples=4, references=refs,
                             train_size=n, sampler="marginal")(x, 0)[0, 0]
    p_x = torch.sigmoid(2 * x[0, 0, r, c]).item()
    p_refs = torch.sigmoid(2 * refs[:, 0, r, c]).mean().item()
    q_x, q_refs = (p_x * n + 1) / (n + 2), (p_refs * n + 1) / (n + 2)
    we = math.log2(q_x / (1 - q_x)) - math.log2(q_refs / (1 - q_refs))
    assert abs(we) > 0.1
    expected = torch.zeros(8, 9, dtype=torch.float64)
    for i in range(8):
        for j in range(9):
            tops = [t for t in range(8 - k + 1) if t <= i < t + k]
            lefts = [s for s in range(9 - k + 1) if s <= j < s + k]
            both = sum(1 for t in tops for s in lefts if t <= r < t + k and s <= c < s + k)
            expected[i, j] = we * both / (len(tops) * len(lefts))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert out[r, c] == pytest.approx(we, rel=1e-10)  # every window covering (r, c) covers (r, c)
    assert (out[:, :c - k + 1] == 0).all() and (out[r + k:] == 0).all()  # never in a window with (r, c)
    # conditional: windows missing (r, c) keep it, so the same pixels are exactly 0; those with it are not
    cond = attribution.create("prediction_difference", OnePixel(r, c), window=k, padding=1, references=refs,
                              train_size=n)(x, 0)[0, 0]
    assert cond[expected == 0].abs().max() < 1e-14 and cond[expected != 0].abs().min() > 1e-3


def test_a_model_that_ignores_the_image_gives_zero():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    nn.init.zeros_(model[1].weight)
    torch.manual_seed(1)
    x, refs = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)
    for sampler in ("marginal", "conditional"):  # zero up to the rounding of the average of equal probabilities
        out = attribution.create("prediction_difference", model, window=2, padding=1, references=refs,
                                 sampler=sampler)(x, [0, 1])
        assert out.abs().max() < 1e-6


def test_forwards_one_per_image_and_one_per_window_sample():
    model = tiny_cnn()
    counter = RowCounter(model)
    torch.manual_seed(0)
    x, refs = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 8, 8)
    attribution.create("prediction_difference", model, window=4, stride=2, num_samples=4, references=refs,
                       batch_size=5, sampler="marginal")(x, [0, 1])
    counter.close()
    assert sum(counter.rows) == 2 + 2 * 9 * 4 and max(counter.rows) <= 5
    counter = RowCounter(model)  # fewer references than num_samples: each of them once
    attribution.create("prediction_difference", model, window=4, stride=2, references=refs,
                       sampler="marginal")(x, [0, 1])
    counter.close()
    assert sum(counter.rows) == 2 + 2 * 9 * 6
    counter = RowCounter(model)  # conditional: num_samples draws per window, however few the references
    attribution.create("prediction_difference", model, window=2, stride=3, padding=1, references=refs,
                       batch_size=7)(x, [0, 1])
    counter.close()
    assert sum(counter.rows) == 2 + 2 * 9 * 10 and max(counter.rows) <= 7


def test_generator_picks_the_references():
    model = tiny_cnn()
    torch.manual_seed(0)
    x, refs = torch.randn(1, 3, 8, 8), torch.randn(8, 3, 8, 8)
    for sampler in ("marginal", "conditional"):
        maps = [attribution.create("prediction_difference", model, window=3, stride=2, num_samples=2,
                                   padding=1, references=refs, sampler=sampler,
                                   generator=torch.Generator().manual_seed(s))(x, 1) for s in (0, 0, 1)]
        torch.testing.assert_close(maps[0], maps[1])
        assert not torch.allclose(maps[0], maps[2])


def test_defaults_are_the_authors():
    """experiments_imagenet.py: win_size 10, overlapping (stride 1), num_samples 10, sampl_style 'conditional',
    padding_size 2; prediction_difference_analysis.py: imagenet_trainsize = 100000 in the Laplace correction, on the
    softmax output ('prob'); utils_sampling.py: the Gaussian fitted on num_samples_fit=20000 patches."""
    assert PredictionDifference.defaults == {"score": "softmax", "window": 10, "stride": 1, "num_samples": 10,
                                             "train_size": 100000, "sampler": "conditional", "padding": 2,
                                             "references": None, "generator": None}
    assert FIT_PATCHES == 20000
    assert attribution.get_method("prediction_difference") is PredictionDifference
    assert "prediction_difference" in attribution.list_methods("perturbation")


def test_bad_inputs():
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    explainer = attribution.create("prediction_difference", model, window=3)
    with pytest.raises(ValueError, match="references"):
        explainer(x[:1], 0)
    with pytest.raises(ValueError, match="score must be 'softmax'"):
        explainer(x, 0, score="logit")
    with pytest.raises(ValueError, match=r"references must be an \(N, C, H, W\) tensor.*\(4, 1, 8, 8\)"):
        explainer(x, 0, references=torch.randn(4, 1, 8, 8))
    with pytest.raises(TypeError, match="references must be None or"):
        explainer(x, 0, references=[x])
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        explainer(x, 0, generator=0)
    for name, value in (("num_samples", 0), ("train_size", True), ("train_size", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            explainer(x, 0, **{name: value})
    for name, value in (("window", 0), ("window", None), ("stride", (1, 2, 3)), ("stride", None)):
        with pytest.raises(ValueError, match=name):
            explainer(x, 0, **{name: value})
    with pytest.raises(ValueError, match="larger than the image"):
        explainer(x, 0, window=9)
    for value in ("gaussian", None, 1):
        with pytest.raises(ValueError, match=r"sampler must be one of \('marginal', 'conditional'\)"):
            explainer(x, 0, sampler=value)
    for value in (-1, True, 1.5, None):
        with pytest.raises(ValueError, match="padding must be a non-negative int"):
            explainer(x, 0, padding=value)
    with pytest.raises(ValueError, match=r"window \+ 2 \* padding = \(9, 9\).*padding"):
        explainer(x, 0, padding=3)
    explainer(x, 0, window=2, padding=3, sampler="marginal")  # padding only matters to the conditional sampler
    with pytest.raises(ValueError, match="singular.*references=.*sampler='marginal'"):
        explainer(x, 0, references=torch.ones(3, 3, 8, 8))
    with pytest.raises(ValueError, match="singular"):  # 3 x 3 corners of 2 images: 18 patches for 49 dimensions
        explainer(x, 0, window=3, padding=2)


@pytest.mark.parametrize("window, stride, padding", [((2, 2), (1, 1), 1), ((2, 3), (3, 2), 1), ((3, 2), (2, 2), 2)])
def test_conditional_sampler_matches_the_authors_per_image(window, stride, padding):
    """cond_sampler_imagenet written out (authors_conditional): the Gaussian fitted on the patches at the same
    drawn corners, conditioned on each window's frame in the explained image, the same z; windows at every border
    and, at stride > 1, cut at the edge.  Draws, in order: the corners (C, FIT_PATCHES // N + 1), then z (S, C, D)."""
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    refs = torch.randn(4, 3, 10, 9, dtype=torch.float64)
    out = attribution.create("prediction_difference", model, window=window, stride=stride, padding=padding,
                             num_samples=3, references=refs, generator=torch.Generator().manual_seed(5))(x, [1, 3])
    patch = (window[0] + 2 * padding, window[1] + 2 * padding)
    gen = torch.Generator().manual_seed(5)
    corners = torch.randint((10 - patch[0] + 1) * (9 - patch[1] + 1), (3, FIT_PATCHES // 4 + 1), generator=gen)
    noise = torch.randn(3, 3, patch[0] * patch[1], generator=gen, dtype=torch.float64).numpy()
    means, covs = authors_gaussian(refs.numpy(), patch, corners.numpy())
    for i, label in enumerate([1, 3]):
        draw = authors_conditional(x[i].numpy(), refs.numpy(), means, covs, noise, window, padding)
        expected = authors_map(model, x[i].numpy(), draw, label, window, stride)
        assert np.abs(expected).max() > 1e-3
        np.testing.assert_allclose(out[i, 0].numpy(), expected, rtol=1e-7, atol=1e-10)


def test_patch_gaussian_is_np_cov_of_the_patches():
    torch.manual_seed(0)
    refs = torch.randn(3, 2, 6, 7, dtype=torch.float64)
    corners = torch.tensor([[0, 5, 5, 11], [3, 2, 0, 7]])  # (H - 3 + 1) x (W - 4 + 1) = 4 x 4 corners
    mean, cov = patch_gaussian(refs, (3, 4), corners)
    means, covs = authors_gaussian(refs.numpy(), (3, 4), corners.numpy())
    for c in range(2):
        np.testing.assert_allclose(mean[c].numpy(), means[c], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(cov[c].numpy(), covs[c], rtol=1e-10, atol=1e-13)


def test_conditioning_formula_on_a_small_gaussian():
    """G and L against the Schur complement from numpy's inverse, and the conditional covariance also against the
    precision matrix's window block (inv(inv(S)_ww)); windows of any shape and place in one batch; no frame: the
    Gaussian itself."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + 0.5 * np.eye(6)
    mean = rng.normal(size=6)
    windows = np.array([[1, 0, 0, 1, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=bool)
    gain, chol = conditional_gaussian(torch.from_numpy(mean), torch.from_numpy(cov), torch.from_numpy(windows))
    assert gain.shape == chol.shape == (4, 6, 6)
    f = rng.normal(size=6)
    for k, w in enumerate(windows):
        g, l_ = gain[k].numpy(), chol[k].numpy()
        if (~w).any():
            reg = cov[w][:, ~w] @ np.linalg.inv(cov[~w][:, ~w])
            cond = cov[w][:, w] - reg @ cov[~w][:, w]
            np.testing.assert_allclose(cond, np.linalg.inv(np.linalg.inv(cov)[w][:, w]), rtol=1e-10)
        else:
            reg, cond = np.zeros((w.sum(), 0)), cov
        np.testing.assert_allclose(g[w][:, ~w], reg, rtol=1e-10, atol=1e-12)
        assert (g[~w] == 0).all() and (g[:, w] == 0).all()
        np.testing.assert_allclose((mean + g @ (f - mean))[w], mean[w] + reg @ (f - mean)[~w], rtol=1e-10)
        lw = l_[w][:, w]
        np.testing.assert_allclose(lw, np.linalg.cholesky(cond), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(l_[~w][:, ~w], np.eye((~w).sum()))
        assert (l_[w][:, ~w] == 0).all() and (l_[~w][:, w] == 0).all()  # (L z)[w] reads z[w] only


def test_references_stay_where_they_are_and_only_the_draws_move():
    """References given in float64 on the CPU to a float32 call: the map equals the one with float32 references
    (the samples and patches drawn from them are converted, not the whole set)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    refs = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for sampler in ("marginal", "conditional"):
        explain = attribution.PredictionDifference(model, window=3, stride=2, num_samples=3, sampler=sampler,
                                                   padding=1)
        wide = explain(x, [0, 1], references=refs.double(), generator=torch.Generator().manual_seed(2))
        narrow = explain(x, [0, 1], references=refs, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(wide, narrow, rtol=1e-4, atol=1e-6)


class LargestMatrixStack(TorchDispatchMode):
    """The most ``d`` x ``d`` matrices any op materialises (counted by the bytes of its output's storage, so
    views such as ``expand`` count only what they hold)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d, self.most = d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.d, self.d):
                self.most = max(self.most, t.untyped_storage().nbytes() // (t.element_size() * self.d ** 2))
        return out


def test_the_conditional_sampler_holds_no_d_by_d_matrix_per_row_or_per_sample():
    """The conditionals are K * C matrices of D x D (D values in a patch); neither the set-up (with S samples of
    noise) nor the copies (n rows) may expand them to K * S * C or n * C matrices."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    refs = torch.randn(30, 3, 12, 12, dtype=torch.float64)
    in_rows, in_cols = window_bands(12, 12, (2, 2), (1, 1))
    d = (2 + 2 * 1) ** 2
    with LargestMatrixStack(d) as setup:
        cond = PredictionDifference._conditional_setup(x, refs, in_rows, in_cols, (2, 2), 1, 10,
                                                       torch.Generator().manual_seed(0))
    k, channels = cond["gain"].shape[:2]
    assert k == 9 and setup.most <= k * channels
    n = 40
    rows = torch.arange(n) % in_rows.shape[0]
    with LargestMatrixStack(d) as copies:
        PredictionDifference._conditional_copies(x, torch.arange(n) % 2, rows, rows.flip(0), torch.arange(n) % 10,
                                                 **cond)
    assert copies.most <= k * channels
