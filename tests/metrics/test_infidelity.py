"""Infidelity and max-sensitivity: closed forms on linear models, Captum's metrics, and behaviour."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.metrics import evaluate, infidelity, max_sensitivity
from conftest import LinearModel, tiny_cnn


def wave(rows: torch.Tensor) -> torch.Tensor:
    """A deterministic perturbation, the same for both libraries."""
    return 0.1 * torch.sin(3.0 * rows) + 0.05


@pytest.fixture
def linear_case():
    model = LinearModel().double()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    w = model.linear.weight.detach()[[0, 1, 2]].view(3, 3, 8, 8)
    return model, x, w


def test_the_gradient_of_a_linear_model_has_zero_infidelity(linear_case):
    """f = <w, x> + c: f(x) - f(x - I) = <w, I> = I . Phi for Phi = w, whatever the perturbation."""
    model, x, w = linear_case
    value = infidelity(model, x, w, [0, 1, 2], samples=20, normalize=False, generator=torch.Generator().manual_seed(0))
    assert value.abs().max() < 1e-20
    doubled = infidelity(model, x, 2 * w, [0, 1, 2], samples=20, generator=torch.Generator().manual_seed(0))
    assert doubled.abs().max() < 1e-20  # the optimal scaling undoes the factor 2


def test_without_scaling_a_doubled_map_errs_by_the_effect_itself(linear_case):
    model, x, w = linear_case
    value = infidelity(model, x, 2 * w, [0, 1, 2], samples=5, normalize=False, perturbation=wave)
    expected = (wave(x) * w).sum((1, 2, 3)).square()  # (2 I.w - I.w)^2, every sample the same here
    torch.testing.assert_close(value, expected)


def test_default_perturbation_is_a_noisy_baseline(linear_case):
    """x - I = std * noise, the noise shared by the images of a sample: f(x) - f(x - I) = <w, x> - std <w, noise>."""
    model, x, w = linear_case
    ones = torch.ones_like(w)
    value = infidelity(model, x, ones, [0, 1, 2], samples=3, std=0.5, normalize=False,
                       generator=torch.Generator().manual_seed(4))
    seeds = torch.randint(0, 2 ** 62, (3,), generator=torch.Generator().manual_seed(4)).tolist()
    noise = torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds]).double()
    change = x[:, None] - 0.5 * noise[None]  # (B, S, C, H, W)
    expected = (change.sum((2, 3, 4)) - (w[:, None] * change).sum((2, 3, 4))).square().mean(1)
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captums(normalize):
    captum_metrics = pytest.importorskip("captum.metrics")
    model = tiny_cnn().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = attribution.IntegratedGradients(model, steps=8)(x, [1, 3])
    ours = infidelity(model, x, maps, [1, 3], samples=4, perturbation=wave, normalize=normalize)
    theirs = captum_metrics.infidelity(model, lambda inputs: (wave(inputs), inputs - wave(inputs)), x, maps,
                                       target=torch.tensor([1, 3]), n_perturb_samples=4, normalize=normalize)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-12)


def test_max_sensitivity_equals_captums():
    captum_metrics = pytest.importorskip("captum.metrics")
    model = tiny_cnn().double()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    saliency = attribution.VanillaGradient(model)
    ours = max_sensitivity(saliency, x, [0, 4], samples=3, perturbation=lambda i: i + wave(i))
    def single(inputs):  # Captum hands the explanation function a tuple of inputs and wants a tuple back
        return inputs[0] if isinstance(inputs, tuple) else inputs

    theirs = captum_metrics.sensitivity_max(lambda inputs, target: (saliency(single(inputs), target),), x,
                                            perturb_func=lambda inputs, perturb_radius: inputs + wave(inputs),
                                            n_perturb_samples=3, target=torch.tensor([0, 4]))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-12)


def test_a_constant_gradient_is_not_sensitive_and_a_relu_nets_is(linear_case):
    model, x, _ = linear_case
    assert max_sensitivity(attribution.VanillaGradient(model), x, [0, 1, 2], samples=5).abs().max() < 1e-12
    cnn = tiny_cnn()
    torch.manual_seed(3)
    images = torch.randn(2, 3, 16, 16)
    sensitivity = max_sensitivity(attribution.VanillaGradient(cnn), images, samples=5, radius=0.5,
                                  generator=torch.Generator().manual_seed(0))
    assert (sensitivity > 0.05).all()
    # SmoothGrad's averaging makes the same map less sensitive than the plain gradient (Yeh et al.'s point)
    smooth = max_sensitivity(attribution.SmoothGrad(cnn, samples=64, std=0.5, generator=None), images, samples=5,
                             radius=0.5, generator=torch.Generator().manual_seed(0), model=cnn)
    assert (smooth < sensitivity).all(), (smooth, sensitivity)


def test_evaluate_runs_both():
    model = tiny_cnn()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    explainer = attribution.VanillaGradient(model)

    def options():
        return {"infidelity": {"samples": 8, "generator": torch.Generator().manual_seed(1)},
                "max_sensitivity": {"samples": 2, "generator": torch.Generator().manual_seed(2)}}

    table = evaluate(explainer, model, x, [0, 1], ["infidelity", "max_sensitivity"], options=options())
    maps = explainer(x, [0, 1])
    torch.testing.assert_close(table["infidelity"], infidelity(model, x, maps, [0, 1], **options()["infidelity"]))
    torch.testing.assert_close(table["max_sensitivity"],
                               max_sensitivity(explainer, x, [0, 1], **options()["max_sensitivity"]))
    assert (table["infidelity"] > 0).all() and (table["max_sensitivity"] > 0).all()
    assert "(lower is better)" in table.summary()


def test_bad_arguments_are_named(linear_case):
    model, x, w = linear_case
    with pytest.raises(ValueError, match="samples must be a positive int"):
        infidelity(model, x, w, 0, samples=0)
    with pytest.raises(ValueError, match=r"maps must have shape \(B, C or 1, H, W\)"):
        infidelity(model, x, w[:2], 0)
