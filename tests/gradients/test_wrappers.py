"""Every wrapper of a gradient method (SmoothGrad, AdaptGrad, Guided AbsoluteGrad, NoiseGrad, FORGrad) around
methods with their own score, with (B, 1, H, W) maps, and with option names both own."""
from __future__ import annotations

import pytest
import torch

from attribution import create
from attribution.gradients import smoothgrad
from attribution.gradients.attexplore import AttEXplore
from attribution.gradients.base import WrappingExplainer
from attribution.core.registry import get_method, list_methods
from conftest import RowCounter, tiny_cnn

WRAPPERS = {"smoothgrad": {"samples": 2, "std": 0.1}, "adapt_grad": {"samples": 2},
            "guided_absolute_grad": {"samples": 2}, "noise_grad": {"noisy_models": 2, "weight_std": 0.05},
            "forgrad": {"sigma": 4}, "libragrad": {}}


def test_every_wrapper_is_listed():
    assert set(WRAPPERS) == {name for name in list_methods() if issubclass(get_method(name), WrappingExplainer)}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_a_wrapped_method_keeps_its_own_score(name):
    """AttEXplore scores the softmax probability by default: wrapped, it still does (a call's score still wins)."""
    assert AttEXplore.defaults["score"] == "softmax"
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cheap = {"steps": 2, "samples": 2}
    options = {**WRAPPERS[name], "method": "attexplore", "generator": torch.Generator().manual_seed(1)}
    default = create(name, model, **options)(x, [0, 1], inner_options=cheap)
    options["generator"] = torch.Generator().manual_seed(1)
    softmax = create(name, model, **options)(x, [0, 1], score="softmax", inner_options=cheap)
    options["generator"] = torch.Generator().manual_seed(1)
    logit = create(name, model, **options)(x, [0, 1], score="logit", inner_options=cheap)
    torch.testing.assert_close(default, softmax)
    assert not torch.allclose(default, logit)


@pytest.mark.parametrize("outer", ["smoothgrad", "adapt_grad", "noise_grad"])
@pytest.mark.parametrize("inner", ["forgrad", "guided_absolute_grad"])
def test_a_wrapped_magnitude_method_keeps_its_one_channel(outer, inner):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = create(outer, model, method=inner, **WRAPPERS[outer])(x, [0, 1], inner_options={"samples": 2}
                                                                   if inner == "guided_absolute_grad" else None)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_an_option_both_own_goes_to_the_wrapper_and_inner_options_to_the_wrapped_method():
    """Guided AbsoluteGrad's ``samples`` (noisy copies) against Expected Gradients' (references per copy)."""
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    explainer = create("guided_absolute_grad", model, method="expected_gradients", samples=2)
    counter = RowCounter(model)
    try:
        explainer(x, 0, inner_options={"samples": 3})
    finally:
        counter.close()
    assert sum(counter.rows) == 2 * 3  # 2 noisy copies x 3 references each (a class target: no arg-max pass)


def test_bad_inner_options_are_named():
    explainer = create("smoothgrad", tiny_cnn(), samples=2)
    with pytest.raises(TypeError, match=r"inner_options: VanillaGradient has no option\(s\) \['steps'\]"):
        explainer(torch.randn(1, 3, 16, 16), 0, inner_options={"steps": 3})
    with pytest.raises(TypeError, match="inner_options must be a dict of the wrapped method's options, got list"):
        explainer(torch.randn(1, 3, 16, 16), 0, inner_options=[("samples", 3)])


def test_common_options_and_unknown_names_in_inner_options_are_named():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match=r"inner_options: \['score'\] are common options, shared by SmoothGrad"):
        create("smoothgrad", tiny_cnn(), method="agi", samples=1)(x, 0, inner_options={"score": "logit"})
    # a wrapped wrapper's own method is fixed when it is built: not an option to change per run
    with pytest.raises(TypeError, match=r"inner_options: IDGI has no option\(s\) \['method'\]"):
        create("smoothgrad", tiny_cnn(), method="idgi", samples=1)(x, 0, inner_options={"method": "blur_ig"})


def test_a_calls_inner_options_add_to_the_constructions():
    model = tiny_cnn()
    x = torch.randn(1, 3, 16, 16)
    explainer = create("smoothgrad", model, method="integrated_gradients", samples=1, std=0.0,
                       inner_options={"steps": 3})
    counter = RowCounter(model)
    try:
        explainer(x, 0, inner_options={"baseline": "white"})
    finally:
        counter.close()
    assert sum(counter.rows) == 3


def test_get_smoothed_mask_keeps_the_explainer_as_built():
    """Without noise every copy is the image: the mean of the squared maps is the squared map, whatever the
    explainer wraps (FORGrad around 4-step IG) or owns under SmoothGrad's names (Expected Gradients' samples)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    forgrad = create("forgrad", model, method="integrated_gradients", steps=4, sigma=4)
    torch.testing.assert_close(forgrad.get_smoothed_mask(x, [0, 1], samples=2, std=0.0), forgrad(x, [0, 1]).square())
    expected = create("expected_gradients", model, samples=4)
    counter = RowCounter(model)
    try:
        smoothed = expected.get_smoothed_mask(x, [0, 1], samples=2, std=0.0)
    finally:
        counter.close()
    assert sum(counter.rows) == 2 * 2 * 4 and torch.isfinite(smoothed).all()


@pytest.mark.parametrize("options, error, message", [
    ({"std": "0.1"}, ValueError, "std must be a non-negative number, got '0.1'"),
    ({"std": float("nan")}, ValueError, "std must be a non-negative number, got nan"),
    ({"process": "abs"}, TypeError, "process must be a callable or None, got 'abs'"),
    ({"generator": 1}, TypeError, "generator must be a torch.Generator or None, got int"),
])
def test_bad_smoothgrad_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        create("smoothgrad", tiny_cnn(), samples=1, **options)(torch.randn(1, 3, 16, 16), 0)


@pytest.mark.parametrize("name", ["adapt_grad", "noise_grad"])
def test_a_bad_generator_is_named(name):
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        create(name, tiny_cnn(), generator=1, **WRAPPERS[name])(torch.randn(1, 3, 16, 16), 0)


@pytest.mark.parametrize("name, options", [("integrated_gradients", {"steps": 4}), ("idg", {"steps": 4}),
                                           ("guided_ig", {"steps": 4}), ("deeplift", {}),
                                           ("idgi", {"steps": 4})])
def test_smoothgrad_around_a_per_image_baseline_equals_each_image_alone(name, options):
    """A (B, C, H, W) baseline is repeated with the noisy copies (it was broadcast to B * samples rows and failed):
    with the noise each image gets in the batch, each image alone with its own baseline gives the same map."""
    model = tiny_cnn().double()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    baseline = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples, targets = 3, [0, 3]
    ours = create("smoothgrad", model, method=name, samples=samples, **options)(
        x, targets, baseline=baseline, generator=torch.Generator().manual_seed(2))
    noise = torch.randn((2, samples, 3, 16, 16), generator=torch.Generator().manual_seed(2)).double()
    sigma = 0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
    inner = create(name, model, **options)
    alone = torch.cat([sum(inner(x[i:i + 1] + sigma[i] * noise[i, s:s + 1], targets[i], baseline=baseline[i:i + 1])
                           for s in range(samples)) / samples for i in range(2)])
    torch.testing.assert_close(ours, alone)
    # get_smoothed_mask runs the same path (with its default squaring)
    smoothed = inner.get_smoothed_mask(x, targets, samples=1, std=0.0, baseline=baseline)
    torch.testing.assert_close(smoothed, torch.cat([inner(x[i:i + 1], targets[i], baseline=baseline[i:i + 1])
                                                    for i in range(2)]).square())


def test_smoothgrad_noise_does_not_depend_on_the_grouping_of_the_copies(monkeypatch):
    """The noise is one image-major (B, samples, C, H, W) draw however many groups the noisy copies are made in
    (it was drawn group by group, so an image's noise depended on the group size and so on the batch size)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    explain = create("smoothgrad", model, samples=5)
    whole = explain(x, [0, 1], generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(smoothgrad, "NOISY_COPY_BYTES", 2 * x[0].numel() * x.element_size() * 2)  # groups of 2
    counter = RowCounter(model)
    try:
        grouped = explain(x, [0, 1], generator=torch.Generator().manual_seed(3))
    finally:
        counter.close()
    assert counter.rows == [4, 4, 2]
    torch.testing.assert_close(grouped, whole)
    # beyond NOISE_BYTES the noise is drawn group by group, (B, k, C, H, W) per group, as documented
    monkeypatch.setattr(smoothgrad, "NOISE_BYTES", 0)
    generator = torch.Generator().manual_seed(3)
    noise = [torch.randn((2, k, 3, 16, 16), generator=generator) for k in (2, 2, 1)]
    sigma = (0.15 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))).view(2, 1, 1, 1)
    vanilla = create("vanilla_gradient", model)
    expected = sum(vanilla(x + sigma * n[:, j], [0, 1]) for n in noise for j in range(n.shape[1])) / 5
    torch.testing.assert_close(explain(x, [0, 1], generator=torch.Generator().manual_seed(3)), expected)
