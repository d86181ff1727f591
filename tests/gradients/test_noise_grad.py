"""NoiseGrad (and FusionGrad, NoiseGrad over SmoothGrad): the algorithm written out with deep copies of the model
whose weights carry the same draws, the noise-free limit, and its options."""
from __future__ import annotations

import copy

import pytest
import torch

import attribution
from conftest import tiny_cnn


def noisy_copy(model, generator, std, multiplicative=True):
    """A deep copy of ``model`` with every parameter perturbed (draws in ``named_parameters()`` order)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in twin.named_parameters():
            draw = torch.randn(p.shape, generator=generator)
            p.copy_(p * (1 + std * draw) if multiplicative else p + std * draw)
    return twin


@pytest.mark.parametrize("noise", ["multiplicative", "additive"])
def test_equals_the_average_over_noisy_copies(noise):
    model, x = tiny_cnn(), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(7)
    expected = sum(attribution.InputXGradient(noisy_copy(model, generator, 0.3, noise == "multiplicative"))(x, [0, 2, 1])
                   for _ in range(4)) / 4
    ours = attribution.NoiseGrad(model, method="input_x_gradient")(
        x, [0, 2, 1], noisy_models=4, weight_std=0.3, noise=noise, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, expected)
    clean = attribution.InputXGradient(model)(x, [0, 2, 1])
    assert (ours - clean).abs().max() > 0.05 * clean.abs().max()  # the noise does change the map


def test_fusion_grad_is_noise_grad_over_smoothgrad():
    """One generator serves both: the weights of noisy model s, then SmoothGrad's input noise on it."""
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    expected = 0
    for _ in range(3):
        twin = noisy_copy(model, generator, 0.2)
        expected = expected + attribution.SmoothGrad(twin)(x, [1, 0], samples=4, std=0.1, generator=generator)
    ours = attribution.NoiseGrad(model, method="smoothgrad")(x, [1, 0], noisy_models=3, samples=4, std=0.1,
                                                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, expected / 3)


def test_without_noise_it_is_the_wrapped_method():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    for method, options in (("vanilla_gradient", {}), ("integrated_gradients", {"steps": 5})):
        plain = attribution.create(method, model)(x, [0, 1], **options)
        torch.testing.assert_close(attribution.NoiseGrad(model, method=method)(x, [0, 1], weight_std=0.0,
                                                                                 noisy_models=2, **options), plain)


def test_the_model_is_never_changed():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attribution.NoiseGrad(model)(x, [0, 1], noisy_models=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())


def test_bad_options():
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    explainer = attribution.NoiseGrad(model)
    with pytest.raises(ValueError, match="noisy_models must be a positive int"):
        explainer(x, 0, noisy_models=0)
    with pytest.raises(ValueError, match="weight_std must be a non-negative number"):
        explainer(x, 0, weight_std=-0.1)
    with pytest.raises(ValueError, match="noise must be one of"):
        explainer(x, 0, noise="gaussian")
    with pytest.raises(TypeError, match="NoiseGrad's method must be a GradientExplainer"):
        attribution.NoiseGrad(model, method="grad_cam")


@pytest.mark.parametrize("method", ["lrp", "attn_lrp"])
def test_rule_based_methods_see_the_noisy_weights_as_parameters(method):
    """The noisy weights reach the model as plain tensors: the relevance rules must still treat them as parameters
    (``x + pos_embed`` is no residual sum, even for one image), as on a noisy deep copy."""
    from conftest import tiny_vit

    model = tiny_vit()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(9)
    expected = sum(attribution.create(method, noisy_copy(model, generator, 0.05))(x, 2) for _ in range(2)) / 2
    ours = attribution.NoiseGrad(model, method=method)(x, 2, noisy_models=2, weight_std=0.05,
                                                       generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
