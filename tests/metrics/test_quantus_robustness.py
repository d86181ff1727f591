"""Robustness and randomisation metrics against Quantus 0.6.0, plus closed forms, behaviour and bad input.

Both libraries are fed the same perturbations: a list of noise tensors (one per sample, different for every image)
that our ``perturbation`` callable and a Quantus ``perturb_func`` hand out in turn, so the perturbed images are the
same float64 numbers on both sides.  Quantus' ``explain_func`` wraps the same explainer, so the maps are the same
numbers too.  Tolerances: the explainer-only metrics (sensitivity, Lipschitz, relative input stability,
continuity, random logit, consistency) are computed in float64 on both sides from identical maps and agree to
rounding (``rtol=1e-9``).  The metrics that read the model's outputs or layers (relative output and
representation stability) divide by differences of float32 logits/activations that Quantus subtracts in float32
and this library in float64: ``rtol=1e-5`` (a few float32 ulps of a difference of O(0.1) values).
Quantus normalises maps by one maximum over the whole batch; the parity runs pass
``normalise_axes=(1, 2, 3)`` (per image, this library's choice) and one test shows the two agree for one image.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn

import attribution
from attribution.metrics.infidelity_sensitivity import avg_sensitivity, max_sensitivity
from attribution.metrics.randomisation import pair_ssim, random_logit
from attribution.metrics.robustness import (consistency, continuity, local_lipschitz_estimate,
                                            relative_input_stability, relative_output_stability,
                                            relative_representation_stability, translate, translations)
from conftest import LinearModel, tiny_cnn
from quantus_reference import B, QUIET, load_quantus, small_case

S = 4
PER_IMAGE = {"normalise_axes": (1, 2, 3)}


@pytest.fixture(scope="module")
def quantus():
    return load_quantus()


def Q(quantus, name, **options):
    return getattr(quantus, name)(**QUIET, **options)


@pytest.fixture(scope="module")
def case():
    return small_case()


def noises(kind: str, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return [0.1 * scale * torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(S)]
    return [scale * (0.02 + 0.18 * torch.rand(B, 3, 16, 16, generator=g, dtype=torch.float64)) for _ in range(S)]


class Shared:
    """Hands out the same perturbations, in order, to this library (``ours``) and to Quantus (``theirs``)."""

    def __init__(self, draws):
        self.draws, self.mine, self.their = draws, 0, 0

    def ours(self, images):
        self.mine += 1
        return images + self.draws[self.mine - 1].to(images)

    def theirs(self, arr, **_):
        self.their += 1
        return arr + self.draws[self.their - 1].reshape(arr.shape[0], -1).numpy()


def wrap(explainer):
    """Quantus' ``explain_func(model, inputs, targets) -> ndarray`` around one of our explainers."""
    def explain(model, inputs, targets, **_):
        return explainer(torch.as_tensor(inputs), torch.as_tensor(targets).long()).detach().to(torch.float64).numpy()
    return explain


def run(metric, model, x, y, explainer, **call) -> torch.Tensor:
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=wrap(explainer),
                    device="cpu", **call)
    return torch.tensor([float(v) for v in scores], dtype=torch.float64)


def close(ours, theirs, rtol=1e-9):
    torch.testing.assert_close(ours.to(torch.float64), theirs, rtol=rtol, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name, ours_fn", [("MaxSensitivity", max_sensitivity), ("AvgSensitivity", avg_sensitivity)])
def test_max_and_avg_sensitivity_equal_quantus(quantus, case, name, ours_fn):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    shared = Shared(noises("uniform"))
    ours = ours_fn(explainer, x, y, samples=S, perturbation=shared.ours)
    theirs = run(Q(quantus, name, nr_samples=S, perturb_func=shared.theirs), model, x, y, explainer)
    close(ours, theirs)


def test_avg_and_max_sensitivity_share_their_draws(case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    mean = avg_sensitivity(explainer, x, y, samples=5, generator=torch.Generator().manual_seed(3))
    worst = max_sensitivity(explainer, x, y, samples=5, generator=torch.Generator().manual_seed(3))
    assert (mean > 0).all() and (mean < worst).all()
    first = max_sensitivity(explainer, x, y, samples=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, avg_sensitivity(explainer, x, y, samples=1, generator=torch.Generator().manual_seed(3)))


def test_local_lipschitz_estimate_equals_quantus(quantus, case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    shared = Shared(noises("normal"))
    ours = local_lipschitz_estimate(explainer, x, y, samples=S, perturbation=shared.ours)
    theirs = run(Q(quantus, "LocalLipschitzEstimate", nr_samples=S, perturb_func=shared.theirs,
                   normalise_func_kwargs=PER_IMAGE), model, x, y, explainer)
    close(ours, theirs)
    assert (ours > 0).all()


def test_per_image_normalisation_is_quantus_for_one_image_and_batch_independent(quantus, case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    draws = noises("normal")
    shared = Shared([d[:1] for d in draws])
    alone = local_lipschitz_estimate(explainer, x[:1], y[:1], samples=S, perturbation=shared.ours)
    theirs = run(Q(quantus, "LocalLipschitzEstimate", nr_samples=S, perturb_func=shared.theirs),  # Quantus' default
                 model, x[:1], y[:1], explainer)
    close(alone, theirs)
    batch = local_lipschitz_estimate(explainer, x, y, samples=S, perturbation=Shared(draws).ours)
    torch.testing.assert_close(batch[:1], alone)  # this library: an image's value does not depend on its batch
    shared = Shared(draws)
    whole = run(Q(quantus, "LocalLipschitzEstimate", nr_samples=S, perturb_func=shared.theirs), model, x, y,
                explainer)
    assert not torch.allclose(whole[:1], alone)  # Quantus' batch-wide maximum makes it depend on the other images


@pytest.mark.parametrize("name", ["RelativeInputStability", "RelativeOutputStability",
                                  "RelativeRepresentationStability"])
def test_relative_stability_equals_quantus(quantus, case, name):
    model, x, y = case
    explainer = attribution.InputXGradient(model)
    ours_fn = {"RelativeInputStability": relative_input_stability, "RelativeOutputStability": relative_output_stability,
               "RelativeRepresentationStability": relative_representation_stability}[name]
    shared = Shared(noises("uniform"))
    ours = ours_fn(explainer, x, y, samples=S, perturbation=shared.ours, same_prediction=False)
    theirs = run(Q(quantus, name, nr_samples=S, perturb_func=shared.theirs, return_nan_when_prediction_changes=False),
                 model, x, y, explainer)
    close(ours, theirs, rtol=1e-9 if name == "RelativeInputStability" else 1e-5)
    assert torch.isfinite(ours).all() and (ours > 0).all()


def test_relative_representation_stability_of_named_layers_equals_quantus(quantus, case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    shared = Shared(noises("uniform"))
    ours = relative_representation_stability(explainer, x, y, layers=["1", "3"], samples=S,
                                             perturbation=shared.ours, same_prediction=False)
    theirs = run(Q(quantus, "RelativeRepresentationStability", nr_samples=S, perturb_func=shared.theirs,
                   layer_names=["1", "3"], return_nan_when_prediction_changes=False), model, x, y, explainer)
    close(ours, theirs, rtol=1e-5)


def test_same_prediction_takes_the_maximum_over_the_kept_copies(quantus, case):
    """Quantus makes an image NaN once one copy changes its prediction; the paper (and this library) maximise over
    the copies that keep it.  (The tiny CNN's arg-max hardly moves: a tanh MLP whose last draw flips image 0.)"""
    _, x, _ = case
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    explainer = attribution.VanillaGradient(model)
    draws = noises("uniform") + [0.2 * torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(28),
                                                   dtype=torch.float64)]
    with torch.no_grad():
        clean = model(x.float()).argmax(1)
        flips = torch.stack([model((x + d).float()).argmax(1) != clean for d in draws], 1)  # (B, S + 1)
    assert flips.tolist() == [[False] * S + [True]] + [[False] * (S + 1)] * 2
    kept = relative_input_stability(explainer, x, samples=S + 1, perturbation=Shared(draws).ours)
    singles = torch.stack([relative_input_stability(explainer, x, samples=1, perturbation=Shared([d]).ours,
                                                    same_prediction=False) for d in draws], 1)
    assert singles[0, -1] > singles[0, :-1].max()  # the dropped copy would have been the maximum
    expected = torch.where(flips, torch.full_like(singles, float("-inf")), singles).amax(1)
    torch.testing.assert_close(kept, expected)
    shared = Shared(draws)
    theirs = run(Q(quantus, "RelativeInputStability", nr_samples=S + 1, perturb_func=shared.theirs), model, x,
                 clean, explainer)
    assert torch.isnan(theirs).tolist() == [True, False, False]
    close(kept[1:], theirs[1:])


def test_continuity_equals_quantus(quantus, case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    ours = continuity(explainer, x, y)
    theirs = run(Q(quantus, "Continuity", normalise_func_kwargs=PER_IMAGE), model, x, y, explainer)
    close(ours, theirs)
    assert (ours > 0).all()


def test_translations_follow_quantus(quantus, case):
    from quantus.functions.perturb_func import batched_translation

    _, x, _ = case
    assert translations(224, 28).tolist() == list(range(-208, 225, 16))
    fill = x.flatten(1).amin(1).view(-1, 1, 1, 1)
    for shift in (-16, -5, 0, 3, 15, 16):  # Quantus fails past W (when steps divides 2 W + 1); this library fills
        expected = torch.from_numpy(batched_translation(x.numpy(), "black", shift, direction="x"))
        assert torch.equal(translate(x, shift, fill), expected)
    assert torch.equal(translate(x, 17, fill), fill.expand_as(x))


def test_random_logit_equals_quantus(quantus, case):
    import numpy as np

    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    np.random.seed(42)  # what RandomLogit draws (it reseeds NumPy's generator with its seed, 42)
    index = torch.from_numpy(np.random.randint(0, 4, B))
    other = index + (index >= y).long()
    ours = random_logit(explainer, x, y, other=other, flatten=True)
    theirs = run(Q(quantus, "RandomLogit", num_classes=5, normalise_func_kwargs=PER_IMAGE), model, x, y, explainer)
    close(ours, theirs)
    assert ((ours > 0) & (ours < 1)).all()


def test_image_ssim_is_scikit_images_with_channels():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 3, 12, 10, generator=g, dtype=torch.float64), torch.rand(2, 3, 12, 10, generator=g,
                                                                                   dtype=torch.float64)
    b[1] = 0.5 * a[1] + 0.2 * b[1]
    for flatten in (False, True):
        expected = []
        for i in range(2):
            span = float(torch.cat([a[i].flatten(), b[i].flatten()]).aminmax()[1]
                         - torch.cat([a[i].flatten(), b[i].flatten()]).aminmax()[0])
            if flatten:
                expected.append(structural_similarity(a[i].flatten().numpy(), b[i].flatten().numpy(), data_range=span))
            else:
                expected.append(structural_similarity(a[i].numpy(), b[i].numpy(), data_range=span, channel_axis=0))
        torch.testing.assert_close(pair_ssim(a, b, flatten=flatten), torch.tensor(expected, dtype=torch.float64))


def test_random_logit_draws_another_class_and_scores_a_class_blind_map_one(case):
    model, x, _ = case
    ours = random_logit(attribution.VanillaGradient(model), x, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (B,) and (ours < 1).all()
    seen = []
    blind = random_logit(lambda images, target: seen.append(torch.as_tensor(target)) or images.abs(), x, model=model,
                         generator=torch.Generator().manual_seed(0))
    # the same map for every class: as similar as can be
    torch.testing.assert_close(blind, torch.ones(B, dtype=torch.float64))
    assert (seen[0] != seen[1]).all() and int(seen[1].max()) < 5
    # an image's other class, and so its value, does not depend on the rest of the batch
    explainer = attribution.VanillaGradient(model)
    batch = random_logit(explainer, x, torch.tensor([0, 3, 1]), generator=torch.Generator().manual_seed(2))
    for i, t in enumerate([0, 3, 1]):
        one = random_logit(explainer, x[i:i + 1], torch.tensor([t]), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(one, batch[i:i + 1])


@pytest.mark.parametrize("discretise", ["top_n_sign", "sign"])
def test_consistency_equals_quantus_where_defined(quantus, case, discretise):
    from quantus.functions.discretise_func import sign, top_n_sign

    model, _, _ = case
    torch.manual_seed(6)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    base = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    base[2, 0, 0, :2] = -base[2, 0, 0, :2].abs()
    maps = base[[0, 0, 1, 1, 1, 2]] * torch.tensor([1.0, 2.0, 1.0, 0.5, 3.0, 1.0]).view(-1, 1, 1, 1)
    absolute = discretise == "top_n_sign"
    ours = consistency(model, x, maps, discretise=discretise, absolute=absolute)
    metric = Q(quantus, "Consistency", discretise_func=top_n_sign if absolute else sign, abs=absolute)
    theirs = torch.tensor(metric(model=model, x_batch=x.numpy(), y_batch=torch.zeros(6).long().numpy(),
                                 a_batch=maps.numpy(), device="cpu"), dtype=torch.float64)
    if absolute:  # the default key: the signs of the first 5 entries, all +1 after |.|: every image shares it
        close(ours, theirs)
    else:  # keys {0, 1}, {2, 3, 4}, {5}: the lone image is undefined here and 0 in Quantus
        assert torch.isnan(ours[5]) and theirs[5] == 0
        close(ours[:5], theirs[:5])
    with torch.no_grad():
        predicted = model(x.float()).argmax(1)
    same = (predicted[:, None] == predicted[None]).double() - torch.eye(6, dtype=torch.float64)
    if absolute:
        torch.testing.assert_close(ours, same.sum(1) / 5)


# --------------------------------------------------------------------------------- closed forms and behaviour
def test_a_linear_models_gradient_is_perfectly_stable():
    model = LinearModel().double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    saliency = attribution.VanillaGradient(model)
    g = torch.Generator
    assert local_lipschitz_estimate(saliency, x, [0, 1], samples=3, generator=g().manual_seed(0)).abs().max() == 0
    assert avg_sensitivity(saliency, x, [0, 1], samples=3, generator=g().manual_seed(0)).abs().max() == 0
    assert continuity(saliency, x, [0, 1], steps=8).abs().max() == 0
    for metric in (relative_input_stability, relative_output_stability, relative_representation_stability):
        value = metric(saliency, x, [0, 1], samples=3, generator=g().manual_seed(0))
        assert value.abs().max() == 0, metric.__name__


def test_identity_map_has_lipschitz_constant_and_relative_input_stability_one(case):
    model, x, _ = case
    identity = lambda images, target: images  # noqa: E731
    lle = local_lipschitz_estimate(identity, x, 0, samples=3, normalise=False, generator=torch.Generator())
    torch.testing.assert_close(lle, torch.ones(B, dtype=torch.float64))
    ris = relative_input_stability(identity, x, 0, samples=3, same_prediction=False, generator=torch.Generator())
    torch.testing.assert_close(ris, torch.ones(B, dtype=torch.float64))
    # continuity of the identity map: |x - x_t|_1 / |x - x_t|_2 over the shifts, the largest ratio
    shifts = translations(16, 28).tolist()
    ratios = torch.stack([(x - translate(x, t, x.flatten(1).amin(1).view(-1, 1, 1, 1))).flatten(1).norm(p=1, dim=1)
                          / ((x - translate(x, t, x.flatten(1).amin(1).view(-1, 1, 1, 1))).flatten(1).norm(dim=1) + 1e-9)
                          for t in shifts], 1)
    value = continuity(identity, x, 0, normalise=False, absolute=False)
    torch.testing.assert_close(value, ratios.amax(1))


def test_smoothing_the_map_makes_it_more_stable(case):
    model, x, y = case
    plain = attribution.VanillaGradient(model)
    def smooth(images, target):  # the same noise at every call: a smooth function of the image
        return attribution.SmoothGrad(model, samples=32, std=0.5, generator=torch.Generator().manual_seed(0))(
            images, target)

    kwargs = dict(samples=3, std=0.2)
    noisy = local_lipschitz_estimate(plain, x, y, generator=torch.Generator().manual_seed(1), **kwargs)
    calm = local_lipschitz_estimate(smooth, x, y, generator=torch.Generator().manual_seed(1), model=model, **kwargs)
    assert (calm < noisy).all(), (calm, noisy)


def test_model_is_left_as_it_was(case):
    model, x, y = case
    model.train()
    try:
        before = [p.clone() for p in model.parameters()]
        relative_representation_stability(attribution.VanillaGradient(model), x, y, samples=2,
                                          generator=torch.Generator().manual_seed(0))
        assert model.training
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert not any(m._forward_hooks for m in model.modules())
    finally:
        model.eval()


def test_bad_arguments_are_named(case):
    model, x, y = case
    saliency = attribution.VanillaGradient(model)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        local_lipschitz_estimate(saliency, x, y, samples=0)
    with pytest.raises(ValueError, match="std must be a positive number"):
        local_lipschitz_estimate(saliency, x, y, std=-1.0)
    with pytest.raises(ValueError, match="upper_bound must exceed lower_bound"):
        relative_input_stability(saliency, x, y, lower_bound=0.2, upper_bound=0.1)
    with pytest.raises(ValueError, match="eps must be a positive number"):
        relative_output_stability(saliency, x, y, eps=0)
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        relative_representation_stability(saliency, x, y, layers="nope")
    with pytest.raises(ValueError, match="steps must be at most 2 W"):
        continuity(saliency, x, y, steps=40)
    with pytest.raises(ValueError, match="substrate must be"):
        continuity(saliency, x, y, baseline="grey")
    with pytest.raises(ValueError, match="images must be a floating"):
        continuity(saliency, x[0], y)
    with pytest.raises(TypeError, match="give model="):
        local_lipschitz_estimate(lambda images, target: images, x, None)
    with pytest.raises(ValueError, match="class indices as the target"):
        random_logit(saliency, x, lambda scores: scores[:, 0])
    with pytest.raises(ValueError, match="other must hold one class index per image"):
        random_logit(saliency, x, y, other=y)
    with pytest.raises(ValueError, match="maps must be a"):
        consistency(model, x, x[:2])
    with pytest.raises(ValueError, match="discretise must be"):
        consistency(model, x, x, discretise="top")
    with pytest.raises(ValueError, match="n must be a positive int"):
        consistency(model, x, x, n=0)


def test_constant_explainer_scores_zero_everywhere():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).double().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fixed = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    constant = lambda images, target: fixed.expand(images.shape[0], -1, -1, -1)  # noqa: E731
    g = torch.Generator
    assert local_lipschitz_estimate(constant, x, 0, samples=2, generator=g().manual_seed(0)).abs().max() == 0
    assert relative_output_stability(constant, x, samples=2, model=model, generator=g().manual_seed(0),
                                     same_prediction=False).abs().max() == 0
    assert continuity(constant, x, 0, steps=4).abs().max() == 0


def test_forwards_in_small_batches_change_nothing(case):
    _, x, y = case
    explainer = attribution.VanillaGradient(tiny_cnn().double())  # float64: other batch shapes round alike
    draws = noises("uniform")
    whole = relative_output_stability(explainer, x, y, samples=S, perturbation=Shared(draws).ours)
    rows = relative_output_stability(explainer, x, y, samples=S, perturbation=Shared(draws).ours, batch_size=1)
    torch.testing.assert_close(rows, whole, rtol=1e-9, atol=0)
    assert whole.dtype == torch.float64 and local_lipschitz_estimate(
        explainer, x.float(), y, samples=1, generator=torch.Generator()).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_as_on_cpu(case):
    model, x, y = case
    gpu = tiny_cnn().cuda()
    results = []
    for net, images in ((model, x.float()), (gpu, x.float().cuda())):
        explainer = attribution.VanillaGradient(net)
        g = torch.Generator
        results.append(torch.stack([
            local_lipschitz_estimate(explainer, images, y, samples=2, generator=g().manual_seed(0)).cpu(),
            avg_sensitivity(explainer, images, y, samples=2, generator=g().manual_seed(0)).cpu(),
            relative_input_stability(explainer, images, y, samples=2, generator=g().manual_seed(0)).cpu(),
            relative_output_stability(explainer, images, y, samples=2, generator=g().manual_seed(0)).cpu(),
            relative_representation_stability(explainer, images, y, samples=2, generator=g().manual_seed(0)).cpu(),
            continuity(explainer, images, y, steps=4).cpu(),
            random_logit(explainer, images, y, generator=g().manual_seed(0)).cpu(),
            consistency(net, images, explainer(images, y)).cpu(),
        ]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-5, equal_nan=True)


class SequenceFirst(torch.nn.Module):
    """Patches -> tokens (T, B, D) through a sequence-first ``nn.TransformerEncoderLayer`` (16 tokens of 16 x 16
    images), mean over tokens -> 4 logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 16, 4, stride=4)
        self.encoder = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).permute(2, 0, 1)  # (T, B, D)
        return self.head(self.encoder(tokens).mean(0))


@pytest.mark.parametrize("batch_size", [None, 16, 6, 2])
def test_representation_change_of_a_sequence_first_layer(batch_size):
    """A layer whose output holds the batch in dim 1 (T, B, D): each image's change is its own tokens' change, the
    same in any chunking.  (The split at dim 0 mixed tokens of clean and perturbed rows when T = 2 n, 16 rows of 8
    images here, and failed with a raw size error otherwise.)"""
    from attribution.metrics.robustness import _layer_change

    model = SequenceFirst().double().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=generator, dtype=torch.float64)
    shifted = x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    store = []
    handle = model.encoder.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        model(x), model(shifted)
    handle.remove()
    before, after = (t.permute(1, 0, 2).reshape(8, -1) for t in store)
    expected = ((before - after) / before).norm(dim=1)
    outputs, change = _layer_change(model, x, shifted, [model.encoder], batch_size, 1e-6, True)
    torch.testing.assert_close(change, expected, rtol=1e-10, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(outputs, model(shifted), rtol=1e-10, atol=1e-12)
