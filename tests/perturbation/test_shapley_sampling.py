"""Shapley value sampling: exact Shapley values with every ordering, efficiency in every ordering, Captum's
ShapleyValueSampling with the same permutations."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.perturbation.segments import grid_segments
from conftest import LinearModel, tiny_cnn
from perturbation.test_kernel_shap import shapley_by_enumeration


@pytest.fixture
def setup():
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x


def test_every_ordering_gives_the_exact_shapley_values(setup):
    """Four segments, 24 orderings: all of them are used, and the values are the enumerated Shapley values."""
    model, x = setup
    labels = grid_segments(16, 16, 2, x.device)
    ours = attribution.ShapleyValueSampling(model, grid=2, samples=24)(x, [1, 3])
    for image, cls, values in zip(x, [1, 3], ours):
        exact = shapley_by_enumeration(model, image, cls, labels, torch.zeros_like(image))
        torch.testing.assert_close(values[0], exact[labels])


def test_sampled_values_are_efficient_and_linear_models_exact(setup):
    """Every ordering's contributions add up to f(x) - f(b), so their mean does; on a linear model every ordering
    gives each segment its own contribution, so even one ordering is exact."""
    model, x = setup
    phi = attribution.ShapleyValueSampling(model, grid=4, samples=3,
                                           generator=torch.Generator().manual_seed(1))(x, [0, 2])
    labels = grid_segments(16, 16, 4, x.device)
    first_pixel = torch.stack([(labels.flatten() == segment).nonzero()[0, 0] for segment in range(16)])
    per_segment = phi.flatten(1)[:, first_pixel]  # every pixel of a segment holds the segment's value
    with torch.no_grad():
        change = model(x)[[0, 1], [0, 2]] - model(torch.zeros_like(x))[[0, 1], [0, 2]]
    torch.testing.assert_close(per_segment.sum(1), change)
    linear = LinearModel(shape=(3, 16, 16)).double()
    one = attribution.ShapleyValueSampling(linear, grid=4, samples=1)(x, 1)
    exact = (linear.linear.weight[1].view(3, 16, 16) * x).sum(1).detach()  # each pixel's contribution, zero baseline
    sums = torch.zeros(2, 16, dtype=torch.float64).index_add_(1, labels.flatten(), exact.flatten(1))
    torch.testing.assert_close(one[:, 0], sums[:, labels])


def test_equals_captum_with_the_same_permutations(setup):
    captum = pytest.importorskip("captum.attr")
    model, x = setup
    labels = grid_segments(16, 16, 3, x.device)
    torch.manual_seed(7)
    theirs = captum.ShapleyValueSampling(model).attribute(x, target=torch.tensor([4, 0]), n_samples=6,
                                                          feature_mask=labels[None, None])
    ours = attribution.ShapleyValueSampling(model, grid=3, samples=6, generator=torch.Generator().manual_seed(7))
    # Captum accumulates in float32 whatever the input's dtype
    torch.testing.assert_close(ours(x, [4, 0]).expand_as(theirs), theirs.double(), rtol=1e-5, atol=1e-6)


def test_bad_samples(setup):
    model, x = setup
    with pytest.raises(ValueError, match="samples must be a positive int"):
        attribution.ShapleyValueSampling(model)(x, 0, samples=0)
