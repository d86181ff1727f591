"""Expected Gradients: the estimator against its draws written out, closed forms, and Captum's GradientShap."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution
from conftest import LinearModel, tiny_cnn


class Quadratic(nn.Module):
    """f_k(x) = sum (w_k * x)^2: gradient 2 w_k^2 x, linear in x, so every path point matters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.w = nn.Parameter(torch.randn(3, 3, 6, 6, dtype=torch.float64))

    def forward(self, x):
        return (self.w[None] * x[:, None]).square().flatten(2).sum(2)


def draws(samples, count, seed):
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randint(0, count, (samples,), generator=generator)
    return chosen, torch.rand(samples, generator=generator, dtype=torch.float64)


def test_the_estimator_is_the_mean_over_its_draws():
    model = Quadratic()
    torch.manual_seed(0)
    x, refs = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    ours = attribution.ExpectedGradients(model, samples=7)(x, [0, 2], references=refs,
                                                           generator=torch.Generator().manual_seed(3), batch_size=4)
    chosen, alphas = draws(7, 5, 3)
    w2 = model.w.detach()[[0, 2]].square()
    expected = sum((x - refs[c]) * 2 * w2 * (refs[c] + a * (x - refs[c])) for c, a in zip(chosen, alphas)) / 7
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_on_a_linear_model_it_is_the_weight_times_the_mean_distance_to_the_drawn_references():
    model = LinearModel().double()
    torch.manual_seed(1)
    x, refs = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(6, 3, 8, 8, dtype=torch.float64)
    ours = attribution.ExpectedGradients(model, samples=9, references=refs)(x, [1, 3],
                                                                           generator=torch.Generator().manual_seed(2))
    chosen, _ = draws(9, 6, 2)
    w = model.linear.weight.detach()[[1, 3]].view(2, 3, 8, 8)
    torch.testing.assert_close(ours, w * (x - refs[chosen].mean(0)), rtol=1e-10, atol=1e-12)


def test_with_one_reference_it_converges_to_integrated_gradients():
    """E over a ~ U(0, 1) of the path gradient is IG's integral: many samples approach IG with many steps."""
    model = tiny_cnn().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ig = attribution.IntegratedGradients(model, steps=256, method="middle", baseline="zero")(x, [0, 1])
    eg = attribution.ExpectedGradients(model, samples=4000, references="zero")(
        x, [0, 1], generator=torch.Generator().manual_seed(0), batch_size=500)
    assert torch.corrcoef(torch.stack([eg.flatten(), ig.flatten()]))[0, 1] > 0.99
    torch.testing.assert_close(eg.sum((1, 2, 3)), ig.sum((1, 2, 3)), rtol=0.05, atol=1e-3)


def test_matches_captums_gradient_shap_in_expectation():
    """Captum's GradientShap (stdevs=0) draws its own references and points: both estimate the same expectation."""
    captum = pytest.importorskip("captum.attr")
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x, refs = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    ours = attribution.ExpectedGradients(model, samples=3000, references=refs)(
        x, 2, generator=torch.Generator().manual_seed(0), batch_size=500)
    torch.manual_seed(0)
    theirs = captum.GradientShap(model).attribute(x, refs, n_samples=3000, stdevs=0.0, target=2)
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.97
    torch.testing.assert_close(ours.sum(), theirs.sum(), rtol=0.05, atol=1e-3)


def test_gradient_shap_noise_is_added_to_the_image_in_every_sample():
    """stdevs > 0: the estimator over its draws written out, the noise drawn after the references and points."""
    model = Quadratic()
    torch.manual_seed(0)
    x, refs = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    ours = attribution.ExpectedGradients(model, samples=7, stdevs=0.3)(
        x, [0, 2], references=refs, generator=torch.Generator().manual_seed(3), batch_size=4)
    generator = torch.Generator().manual_seed(3)
    chosen = torch.randint(0, 5, (7,), generator=generator)
    alphas = torch.rand(7, generator=generator, dtype=torch.float64)
    noise = torch.randn(7, 3, 6, 6, generator=generator, dtype=torch.float64) * 0.3
    w2 = model.w.detach()[[0, 2]].square()
    expected = sum((x + e - refs[c]) * 2 * w2 * (refs[c] + a * (x + e - refs[c]))
                   for c, a, e in zip(chosen, alphas, noise)) / 7
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="stdevs must be a non-negative number"):
        attribution.ExpectedGradients(model)(x, 0, stdevs=-1.0)


def test_with_noise_it_matches_captums_gradient_shap_in_expectation():
    captum = pytest.importorskip("captum.attr")
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x, refs = torch.randn(1, 3, 16, 16, dtype=torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    ours = attribution.ExpectedGradients(model, samples=3000, references=refs, stdevs=0.2)(
        x, 2, generator=torch.Generator().manual_seed(0), batch_size=500)
    torch.manual_seed(0)
    theirs = captum.GradientShap(model).attribute(x, refs, n_samples=3000, stdevs=0.2, target=2)
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.95
    torch.testing.assert_close(ours.sum(), theirs.sum(), rtol=0.05, atol=1e-3)


def test_draws_are_shared_by_the_batch_so_maps_do_not_depend_on_it(cnn, images):
    refs = torch.randn(5, 3, 16, 16)
    explain = attribution.ExpectedGradients(cnn, samples=5, references=refs)
    batch = explain(images, [0, 1, 2], generator=torch.Generator().manual_seed(7), batch_size=4)
    for i, cls in enumerate([0, 1, 2]):
        alone = explain(images[i:i + 1], cls, generator=torch.Generator().manual_seed(7), batch_size=3)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("references, message", [(torch.zeros(2, 3, 8, 8), "references must be a"),
                                                 (torch.zeros(0, 3, 16, 16), "references must be a"),
                                                 ("grey", "references must be 'black'")])
def test_bad_references_are_named(cnn, images, references, message):
    with pytest.raises(ValueError, match=message):
        attribution.ExpectedGradients(cnn, samples=2)(images, 0, references=references)
