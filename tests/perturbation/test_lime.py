"""LIME: its regression against the lime package's, its hiding against lime_image's, and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attribution
from attribution.perturbation import lime as lime_module
from attribution.perturbation.lime import lime_weights
from attribution.perturbation.segments import grid_segments, segment_means
from conftest import LinearModel, tiny_cnn

lime_base = pytest.importorskip("lime.lime_base")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def coalitions_of(samples, features, seed):
    drawn = torch.rand((samples, features), generator=torch.Generator().manual_seed(seed)) < 0.5
    drawn[0] = True
    return drawn


def test_equals_lime_image_end_to_end_on_its_own_draws(monkeypatch):
    """lime_image's explain_instance (its defaults: segment-mean hiding, kernel width 0.25, Ridge(alpha=1), every
    feature) on the same segments and model, its coalitions replayed from its RandomState (one randint(0, 1000)
    for its random_seed, then the 0/1 draws) and fed to ours."""
    lime_image = pytest.importorskip("lime.lime_image")
    model = tiny_cnn().double()
    x = torch.randn(1, 3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = (torch.arange(12)[:, None] // 4) * 4 + torch.arange(16)[None, :] // 4  # 12 squares of 4 x 4
    samples = 200

    def classifier(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch).permute(0, 3, 1, 2)).softmax(1).numpy()

    explanation = lime_image.LimeImageExplainer(random_state=3).explain_instance(
        x[0].permute(1, 2, 0).numpy(), classifier, labels=(2,), top_labels=None, num_samples=samples,
        segmentation_fn=lambda image: labels.numpy(), batch_size=50)
    expected = torch.zeros(12, dtype=torch.float64)
    for feature, value in explanation.local_exp[2]:
        expected[feature] = value
    state = np.random.RandomState(3)
    state.randint(0, high=1000)
    draws = torch.from_numpy(state.randint(0, 2, samples * 12).reshape(samples, 12) == 1)
    draws[0] = True
    monkeypatch.setattr(lime_module, "lime_coalitions", lambda s, m, generator: draws[:s, :m].clone())
    ours = attribution.LIME(model, segments=labels, samples=samples)(x, 2)
    assert expected.abs().max() > 1e-5
    torch.testing.assert_close(ours[0, 0], expected[labels], rtol=1e-9, atol=1e-15)


def test_segment_means_are_lime_images_fudged_image():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    labels = grid_segments(12, 12, 3, torch.device("cpu"))
    ours = segment_means(x, labels)
    for image, mine in zip(x, ours):
        picture = image.permute(1, 2, 0).numpy()
        fudged = picture.copy()
        for s in np.unique(labels.numpy()):
            fudged[labels.numpy() == s] = picture[labels.numpy() == s].mean(0)
        np.testing.assert_allclose(mine.permute(1, 2, 0).numpy(), fudged, rtol=1e-12)


def test_kernel_weights_are_lime_images_cosine_kernel():
    coalitions = coalitions_of(50, 7, 1)
    coalitions[5] = False  # the empty coalition too
    distances = sklearn_metrics.pairwise_distances(coalitions.numpy().astype(int), np.ones((1, 7)), metric="cosine")
    np.testing.assert_allclose(lime_weights(coalitions, 0.25).numpy(),
                               np.sqrt(np.exp(-(distances.ravel() ** 2) / 0.25 ** 2)), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("hide", ["mean", "zero"])
def test_lime_equals_the_lime_packages_regression_on_the_same_samples(hide):
    model = tiny_cnn().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ours = attribution.LIME(model, grid=3, samples=60, hide=hide)(x, [0, 3], generator=torch.Generator().manual_seed(2))
    labels = grid_segments(16, 16, 3, torch.device("cpu"))
    coalitions = coalitions_of(60, 9, 2)
    fill = segment_means(x, labels) if hide == "mean" else torch.zeros_like(x)
    base = lime_base.LimeBase(lambda d: np.sqrt(np.exp(-(d ** 2) / 0.25 ** 2)), random_state=0)
    for i, cls in enumerate([0, 3]):
        keep = coalitions[:, labels].unsqueeze(1)
        with torch.no_grad():
            probabilities = model(torch.where(keep, x[i], fill[i])).softmax(1).numpy()
        distances = sklearn_metrics.pairwise_distances(coalitions.numpy().astype(int), np.ones((1, 9)),
                                                       metric="cosine").ravel()
        _, coefficients, _, _ = base.explain_instance_with_data(coalitions.numpy().astype(float), probabilities,
                                                                distances, cls, 9, feature_selection="none")
        expected = torch.zeros(9, dtype=torch.float64)
        for feature, value in coefficients:
            expected[feature] = value
        torch.testing.assert_close(ours[i, 0], expected[labels], rtol=1e-7, atol=1e-12)


def test_on_a_linear_model_with_little_ridge_the_coefficients_are_the_segments_contributions():
    """f = <w, x> + c with hidden segments at 0 is exactly linear in the coalition: coefficient_j = sum over
    segment j of w x (up to the ridge penalty's shrinkage)."""
    model = LinearModel().double()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    maps = attribution.LIME(model, grid=2, samples=200, hide="zero", alpha=1e-9, score="logit")(
        x, [1, 2], generator=torch.Generator().manual_seed(0))
    labels = grid_segments(8, 8, 2, torch.device("cpu"))
    contribution = (model.linear.weight.detach()[[1, 2]].view(2, 3, 8, 8) * x).sum(1)
    per_segment = torch.zeros(2, 4, dtype=torch.float64).index_add_(1, labels.flatten(), contribution.flatten(1))
    torch.testing.assert_close(maps[:, 0], per_segment[:, labels], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad, message", [({"samples": 1}, "samples must be an int >= 2"),
                                          ({"kernel_width": 0}, "kernel_width must be a positive number"),
                                          ({"alpha": -1.0}, "alpha must be a positive number"),
                                          ({"alpha": float("inf")}, "alpha must be a finite number, got inf"),
                                          ({"alpha": float("nan")}, "alpha must be a finite number, got nan"),
                                          ({"hide": "grey"}, "baseline must be")])
def test_bad_options_are_named(cnn, images, bad, message):
    with pytest.raises(ValueError, match=message):
        attribution.LIME(cnn, samples=4)(images, 0, **bad)
