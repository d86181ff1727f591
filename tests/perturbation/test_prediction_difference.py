"""Prediction Difference Analysis: the authors' procedure written out per image, the weight of evidence with its
Laplace correction, closed forms on models that read one pixel or none, the authors' defaults, bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import attribution
from attribution.perturbation.prediction_difference import TRAIN_SIZE, PredictionDifference, weight_of_evidence
from conftest import RowCounter, tiny_cnn


def authors_map(model: nn.Module, image: np.ndarray, samples: np.ndarray, label: int, window, stride,
                train_size: int = TRAIN_SIZE) -> np.ndarray:
    """PredDiffAnalyser.get_rel_vect with marg_sampler_imagenet, one image: every window position (top-left corners
    every ``stride`` pixels, the last window cut at the edge; at stride 1 the authors' H - k + 1 positions), its
    pixels in all channels replaced by each sample's, the softmax probabilities averaged over the samples, the
    Laplace-corrected log2 odds of the image's probability minus the average's, averaged per pixel."""
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
            x_new = np.repeat(image[None], samples.shape[0], axis=0)
            x_new[:, :, top:top + kh, left:left + kw] = samples[:, :, top:top + kh, left:left + kw]
            avg = probs(x_new).mean(axis=0)
            rel[top:top + kh, left:left + kw] += (log_odds(true) - log_odds(avg))[label]
            counts[top:top + kh, left:left + kw] += 1
            if left + kw >= width:
                break
            left += sw
        if top + kh >= height:
            break
        top += sh
    return rel / counts


@pytest.mark.parametrize("window, stride", [((3, 3), (1, 1)), ((2, 3), (2, 2)), ((4, 2), (3, 1))])
def test_matches_the_authors_procedure_per_image(window, stride):
    """Same draws: the references the method picks are randperm(N)[:num_samples] of a generator seeded alike."""
    model = tiny_cnn().double()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    refs = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    out = attribution.create("prediction_difference", model, window=window, stride=stride, num_samples=3,
                             references=refs, generator=torch.Generator().manual_seed(7))(x, [1, 3])
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
    explainer = attribution.create("prediction_difference", model, window=3, stride=2)
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
                             train_size=n)(x, 0)[0, 0]
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


def test_a_model_that_ignores_the_image_gives_zero():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    nn.init.zeros_(model[1].weight)
    torch.manual_seed(1)
    x, refs = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)
    out = attribution.create("prediction_difference", model, window=2, references=refs)(x, [0, 1])
    assert (out == 0).all()


def test_forwards_one_per_image_and_one_per_window_sample():
    model = tiny_cnn()
    counter = RowCounter(model)
    torch.manual_seed(0)
    x, refs = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 8, 8)
    attribution.create("prediction_difference", model, window=4, stride=2, num_samples=4, references=refs,
                       batch_size=5)(x, [0, 1])
    counter.close()
    assert sum(counter.rows) == 2 + 2 * 9 * 4 and max(counter.rows) <= 5
    counter = RowCounter(model)  # fewer references than num_samples: each of them once
    attribution.create("prediction_difference", model, window=4, stride=2, references=refs)(x, [0, 1])
    counter.close()
    assert sum(counter.rows) == 2 + 2 * 9 * 6


def test_generator_picks_the_references():
    model = tiny_cnn()
    torch.manual_seed(0)
    x, refs = torch.randn(1, 3, 8, 8), torch.randn(8, 3, 8, 8)
    maps = [attribution.create("prediction_difference", model, window=3, stride=2, num_samples=2, references=refs,
                               generator=torch.Generator().manual_seed(s))(x, 1) for s in (0, 0, 1)]
    torch.testing.assert_close(maps[0], maps[1])
    assert not torch.allclose(maps[0], maps[2])


def test_defaults_are_the_authors():
    """experiments_imagenet.py: win_size 10, overlapping (stride 1), num_samples 10; prediction_difference_analysis.py:
    imagenet_trainsize = 100000 in the Laplace correction, on the softmax output ('prob')."""
    assert PredictionDifference.defaults == {"score": "softmax", "window": 10, "stride": 1, "num_samples": 10,
                                             "train_size": 100000, "references": None, "generator": None}
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
    for name, value in (("num_samples", 0), ("train_size", True), ("train_size", 1.5)):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            explainer(x, 0, **{name: value})
    for name, value in (("window", 0), ("window", None), ("stride", (1, 2, 3)), ("stride", None)):
        with pytest.raises(ValueError, match=name):
            explainer(x, 0, **{name: value})
    with pytest.raises(ValueError, match="larger than the image"):
        explainer(x, 0, window=9)
    with pytest.raises(TypeError, match="unknown option 'padding'"):
        attribution.create("prediction_difference", model, padding=2)
