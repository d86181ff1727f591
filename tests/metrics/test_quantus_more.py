"""Efficient MPRT, Smooth MPRT, sufficiency and input invariance against Quantus 0.6.0, plus closed forms, behaviour,
Quantus' defects shown, and bad input.

Same draws on both sides.  Randomisation: Quantus reseeds torch with ``seed + 1`` before re-initialising each
module; the parity runs patch :func:`attribution.metrics.sanity.layer_seed` to the same ``seed + 1``, so both
libraries' randomised tiny CNNs hold the same weights (on it the cascade's layers are the same four modules).
SmoothMPRT's noise: Quantus draws ``np.random.randn(B, C, H, W)``, which is patched to hand out this library's
draws (one per sample, shared by the images) in turn; Quantus' ``quantus.explain`` (which it calls instead of the
``explain_func`` it is given) is patched to the same explainer.  Quantus' ``explain_func`` wraps the same explainer
and returns float64, so both sides see the same maps.

Tolerances: eMPRT's histogram counts are NumPy's exactly (float64 maps; see
:func:`attribution.metrics.complexity.histogram`), so the entropies agree to rounding (``rtol=1e-12``).  Spearman
correlations of the same float64 maps: ``rtol=1e-9`` (SciPy's ``corrcoef`` and this library's Pearson of average
ranks sum in different orders).  Sufficiency and input invariance are counts and booleans: exact.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn

import attribution
from attribution.metrics import sanity
from attribution.metrics.complexity import discrete_entropy, histogram
from attribution.metrics.infidelity_sensitivity import _draw, _sample_seeds
from attribution.metrics.invariance import absorb_shift, input_invariance
from attribution.metrics.local_sufficiency import map_distances, sufficiency
from attribution.metrics.sanity_revisited import efficient_mprt, smooth_mprt
from attribution.metrics.similarity import spearman
from conftest import LinearModel, tiny_cnn
from quantus_reference import B, QUIET, load_quantus, small_case

quantus = load_quantus()


@pytest.fixture(scope="module")
def case():
    return small_case()


@pytest.fixture
def quantus_seeds(monkeypatch):
    """This library's layer seeds set to Quantus' (``seed + 1`` for every layer); Quantus' global reseeding is undone
    after the test."""
    monkeypatch.setattr(sanity, "layer_seed", lambda seed, name: seed + 1)
    with torch.random.fork_rng():
        yield


def explain_with(cls):
    """Quantus' ``explain_func(model, inputs, targets) -> ndarray`` around one of our explainer classes."""
    def explain(model, inputs, targets, **_):
        maps = cls(model)(torch.as_tensor(inputs), torch.as_tensor(np.asarray(targets)).long())
        return maps.detach().to(torch.float64).numpy()
    return explain


def scores(values) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def quantus_model(model):
    from quantus.helpers.model.pytorch_model import PyTorchModel
    return PyTorchModel(model, channel_first=True, softmax=False, device="cpu")


# ---------------------------------------------------------------------------------------------- discrete entropy
def test_histogram_and_discrete_entropy_equal_numpy_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    x[1] = (x[1] * 5).round() / 5  # many entries on bin edges
    x[2] = 0.25  # constant: NumPy's [v - 0.5, v + 0.5], middle bin
    for bins in (1, 10, 100):
        expected = torch.stack([torch.from_numpy(np.histogram(row.numpy(), bins=bins)[0]) for row in x])
        assert torch.equal(histogram(x, bins), expected.to(torch.float64))
    two = torch.tensor([0.0, 1.0]).repeat(128).view(1, 1, 16, 16)   # two values, equally often
    four = torch.arange(4.0).repeat(64).view(1, 1, 16, 16)
    torch.testing.assert_close(discrete_entropy(torch.cat([two, four, x[2:3, :1]]), 100),
                               torch.tensor([math.log(2), math.log(4), 0.0], dtype=torch.float64))
    assert torch.equal(discrete_entropy(x, 100), discrete_entropy(x * 1e3, 100))  # does not see the scale


# ------------------------------------------------------------------------------------------------------ eMPRT
@pytest.mark.parametrize("absolute", [False, True])
def test_efficient_mprt_equals_quantus(case, quantus_seeds, absolute):
    model, x, y = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = efficient_mprt(attribution.VanillaGradient(model), x, y, absolute=absolute)
    theirs = quantus.EfficientMPRT(abs=absolute, **QUIET)(model=model, x_batch=x.numpy(), y_batch=y.numpy(),
                                                          explain_func=explain_with(attribution.VanillaGradient),
                                                          device="cpu")
    torch.testing.assert_close(ours, scores(theirs), rtol=1e-12, atol=1e-14)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model is untouched
    ratio = efficient_mprt(attribution.VanillaGradient(model), x, y, absolute=absolute, ratio=True)
    torch.testing.assert_close(ratio, ours + 1)


class Scaled(nn.Module):
    """A convolution followed by a learned scale: a parameter of a module without ``reset_parameters``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.full((1, 8, 1, 1), 3.0))

    def forward(self, x):
        return self.conv(x) * self.gain


def test_quantus_full_randomisation_repeats_draws_and_keeps_bare_parameters():
    """Quantus reseeds with ``seed + 1`` before every module: two layers of one shape get the same weights; and a
    parameter of a module without ``reset_parameters`` stays trained.  Here each layer has its own draw and every
    parameter is redrawn."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Scaled(), Scaled(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    with torch.random.fork_rng():
        *_, (_, theirs) = quantus_model(model).get_random_layer_generator(order="bottom_up", seed=42)
    assert torch.equal(theirs[1].conv.weight, theirs[2].conv.weight)
    assert torch.equal(theirs[1].gain, model[1].gain)
    *_, (_, ours) = sanity.randomised_copies(model, ["0", "1", "2", "5"], True, 42)
    assert not torch.equal(ours[1].conv.weight, ours[2].conv.weight)
    assert not torch.equal(ours[1].gain, model[1].gain)
    assert torch.equal(model[1].gain, torch.full((1, 8, 1, 1), 3.0))  # the user's model is untouched


def test_efficient_mprt_closed_form_and_a_map_that_ignores_the_model(case):
    """Two equally frequent values on the original model (entropy log 2), four on any other (log 4): a rise of 1."""
    model, x, y = case

    def designed(images, target, model=None):
        values = 2.0 if model is case[0] else 4.0
        return (torch.arange(16 * 16) % int(values)).to(images.dtype).view(1, 1, 16, 16).expand(len(images), -1, -1,
                                                                                                 -1)

    torch.testing.assert_close(efficient_mprt(designed, x, y, model=model), torch.ones(B, dtype=torch.float64))
    edges = lambda images, target: images.diff(dim=-1, prepend=images[..., :1]).abs()  # noqa: E731
    assert torch.equal(efficient_mprt(edges, x, y, model=model), torch.zeros(B, dtype=torch.float64))


def test_efficient_and_smooth_mprt_are_batch_independent(case):
    _, x, y = case
    model = tiny_cnn().double()
    explainer = attribution.VanillaGradient(model)
    full = efficient_mprt(explainer, x, y)
    torch.testing.assert_close(efficient_mprt(explainer, x[1:], y[1:]), full[1:], rtol=1e-12, atol=0)
    smooth = smooth_mprt(explainer, x, y, samples=3, generator=torch.Generator().manual_seed(1)).spearman
    part = smooth_mprt(explainer, x[1:], y[1:], samples=3, generator=torch.Generator().manual_seed(1)).spearman
    torch.testing.assert_close(part, smooth[:, 1:], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------------------ sMPRT
def test_smooth_mprt_equals_quantus_which_ignores_its_explain_func(case, quantus_seeds, monkeypatch):
    model, x, y = case
    samples = 4
    seeds = _sample_seeds(samples - 1, torch.Generator().manual_seed(7))
    draws = [_draw(s, x.shape[1:], x, False) for s in seeds]
    handed = []

    def randn(*shape):
        handed.append(shape)
        return draws[(len(handed) - 1) % len(draws)].expand(shape).numpy().copy()

    def never(**_):
        raise AssertionError("Quantus' SmoothMPRT never calls its explain_func")

    monkeypatch.setattr(np.random, "randn", randn)
    monkeypatch.setattr(quantus, "explain", explain_with(attribution.VanillaGradient))
    ours = smooth_mprt(attribution.VanillaGradient(model), x, y, samples=samples,
                       generator=torch.Generator().manual_seed(7))
    run = lambda **o: quantus.SmoothMPRT(nr_samples=samples, **o, **QUIET)(  # noqa: E731
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), explain_func=never, device="cpu")
    theirs = run()
    assert list(theirs) == ["original"] + ours.layers == ["original", "0", "2", "4", "8"]
    assert len(handed) == (len(ours.layers) + 2) * (samples - 1)  # the reference is denoised twice there
    torch.testing.assert_close(scores(theirs["original"]), torch.ones(B, dtype=torch.float64))  # same draws
    for row, name in zip(ours.spearman, ours.layers):
        torch.testing.assert_close(row, scores(theirs[name]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.last, scores(run(return_last_correlation=True)), rtol=1e-9, atol=1e-12)
    # Quantus' average also counts the original's self-similarity (it skips a key "orig" it never writes)
    average = scores(run(return_average_correlation=True))
    torch.testing.assert_close(average, (1 + ours.spearman.sum(0)) / (len(ours.layers) + 1), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(average, ours.average)


def test_smooth_mprt_closed_forms(case):
    """One sample is the plain test on the clean image; a model-blind map keeps correlation 1; a linear model's
    gradient does not see the noise; top-down and independent orders step as documented."""
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    plain = smooth_mprt(explainer, x, y, samples=1)
    reference = explainer(x, y).abs()
    expected = [spearman(reference, attribution.VanillaGradient(copy)(x, y).abs())
                for _, copy in sanity.randomised_copies(model, ["0", "2", "4", "8"], True, 42)]
    torch.testing.assert_close(plain.spearman, torch.stack(expected), rtol=1e-6, atol=1e-7)
    blind = smooth_mprt(lambda images, target: images.abs(), x, y, model=model, samples=3)
    torch.testing.assert_close(blind.spearman, torch.ones(4, B, dtype=torch.float64))
    linear = LinearModel(shape=(3, 16, 16), classes=5)
    lx = attribution.VanillaGradient(linear)
    torch.testing.assert_close(smooth_mprt(lx, x, y, samples=5).spearman, smooth_mprt(lx, x, y, samples=1).spearman)
    top = smooth_mprt(explainer, x, y, samples=1, order="top_down")
    assert top.layers == ["8", "4", "2", "0"]
    torch.testing.assert_close(top.last, plain.last)  # every layer random either way: the same endpoint
    alone = smooth_mprt(explainer, x, y, samples=1, order="independent")
    torch.testing.assert_close(alone.spearman[0], plain.spearman[0])  # the first step is one layer either way


# ------------------------------------------------------------------------------------------------ sufficiency
class PixelVote(nn.Module):
    """Predicts class 0 or 1 from the first two pixels of channel 0: known predictions for the closed form."""

    def forward(self, x):
        return x[:, 0, 0, :2]


@pytest.fixture(scope="module")
def clustered():
    """8 images with mixed predictions and maps in two loose clusters of different maxima, so images have
    neighbours of both classes."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 16, 16, generator=g, dtype=torch.float64)
    centres = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float64)
    maps = centres[torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])] + 0.2 * torch.randn(8, 1, 16, 16, generator=g,
                                                                                 dtype=torch.float64)
    maps = maps * torch.linspace(0.5, 3, 8, dtype=torch.float64).view(8, 1, 1, 1)
    return PixelVote().eval(), x, maps


def test_sufficiency_equals_quantus(clustered):
    model, x, maps = clustered
    y = np.zeros(8, dtype=np.int64)
    assert 2 < model(x).argmax(1).sum() < 6
    per_image = (maps / maps.abs().amax(dim=(1, 2, 3), keepdim=True)).numpy()
    isolated = 0
    for threshold in (0.5, 0.6, 0.7, 0.8):
        ours = sufficiency(model, x, maps, threshold=threshold)
        theirs = quantus.Sufficiency(threshold=threshold, normalise=False, **QUIET)(
            model=model, x_batch=x.numpy(), y_batch=y, a_batch=per_image, device="cpu")
        theirs = scores(theirs)
        if threshold >= 0.6:  # not a trivial case
            assert torch.isfinite(ours).any() and (ours[torch.isfinite(ours)] < 1).any()
        torch.testing.assert_close(ours, torch.where(ours.isnan(), ours, theirs), rtol=0, atol=1e-12,
                                   equal_nan=True)
        assert (theirs[ours.isnan()] == 0).all()  # no neighbour: NaN here, 0 in Quantus
        isolated += int(ours.isnan().sum())
    assert isolated > 0  # the tight threshold (0.5) leaves six maps without a neighbour
    with pytest.raises(TypeError):  # Quantus hands SciPy V=None whatever the metric: only seuclidean runs
        quantus.Sufficiency(distance_func="euclidean", **QUIET)(model=model, x_batch=x.numpy(), y_batch=y,
                                                                 a_batch=per_image, device="cpu")
    flat = torch.from_numpy(per_image).abs().flatten(1)
    for name in ("seuclidean", "euclidean", "cityblock"):  # (SciPy's own V would pool both copies of the rows)
        extra = {"V": flat.var(dim=0).numpy()} if name == "seuclidean" else {}
        expected = torch.from_numpy(cdist(flat.numpy(), flat.numpy(), name, **extra))
        torch.testing.assert_close(map_distances(flat, name), expected, rtol=1e-12, atol=1e-12)
    equal = torch.from_numpy(per_image)  # equal maxima: Quantus' batch-wide normalisation is the per-image one
    theirs = scores(quantus.Sufficiency(**QUIET)(model=model, x_batch=x.numpy(), y_batch=y, a_batch=equal.numpy(),
                                                 device="cpu"))
    ours = sufficiency(model, x, equal)
    torch.testing.assert_close(ours, torch.where(ours.isnan(), ours, theirs), rtol=0, atol=1e-12)


def test_sufficiency_closed_form_and_a_feature_constant_over_the_maps(clustered):
    x = torch.zeros(4, 3, 4, 4)
    x[:, 0, 0, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0])  # predictions 0, 0, 1, 1
    shared, other = torch.rand(1, 1, 4, 4) + 0.5, torch.rand(1, 1, 4, 4) + 0.5
    maps = torch.cat([shared, shared, shared * 1.1, other * 50])
    values = sufficiency(PixelVote().eval(), x, maps, distance="euclidean", normalise=False)
    torch.testing.assert_close(values[:3], torch.tensor([0.5, 0.5, 0.0]))  # neighbours {1, 2}, {0, 2}, {0, 1}
    assert values[3].isnan()  # no neighbour
    # a pixel that is zero in every map: SciPy's standardised distances turn NaN and Quantus scores every image 0
    model, images, clustered_maps = clustered
    zeroed = clustered_maps.clone()
    zeroed[:, :, 0, 0] = 0
    theirs = scores(quantus.Sufficiency(normalise=False, **QUIET)(model=model, x_batch=images.numpy(),
                                                                  y_batch=np.zeros(8, dtype=np.int64),
                                                                  a_batch=zeroed.numpy(), device="cpu"))
    assert (theirs == 0).all()
    ours = sufficiency(model, images, zeroed, normalise=False)
    assert (ours[ours.isfinite()] > 0).any()
    flat = zeroed.abs().flatten(1)
    torch.testing.assert_close(map_distances(flat), map_distances(flat[:, 1:]))  # the constant pixel adds nothing


# -------------------------------------------------------------------------------------------- input invariance
def unpadded_cnn():
    """A CNN whose first convolution has no padding: Quantus' bias update is right on it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def shift_all(arr, input_shift, **_):
    """Quantus' shift without its defect: every entry moves (its ``perturb_batch`` drops index 0 of each image)."""
    return arr + input_shift


@pytest.mark.parametrize("method, invariant", [(attribution.VanillaGradient, True),
                                               (attribution.InputXGradient, False)])
def test_input_invariance_equals_quantus(case, method, invariant):
    _, x, y = case
    model = unpadded_cnn()
    ours = input_invariance(method(model), x, y)
    theirs = quantus.InputInvariance(perturb_func=shift_all, **QUIET)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None, explain_func=explain_with(method),
        device="cpu")
    assert ours.invariant.tolist() == [bool(v) for v in theirs] == [invariant] * B


def test_quantus_input_invariance_leaves_the_first_entry_unshifted(case):
    """Quantus' ``perturb_batch`` hands ``indices[i][1:]`` to the shift: entry 0 of every image keeps its value, so
    the shifted copy is not ``x + m`` and its verdict on the gradient depends on that pixel."""
    from functools import partial

    from quantus.functions.perturb_func import baseline_replacement_by_shift, perturb_batch

    _, x, y = case
    arr = x.numpy()
    shifted = perturb_batch(perturb_func=partial(baseline_replacement_by_shift, input_shift=-1),
                            indices=np.tile(np.arange(arr[0].size), (B, 1)), indexed_axes=np.arange(arr[0].ndim),
                            arr=arr)
    assert np.array_equal(shifted[:, 0, 0, 0], arr[:, 0, 0, 0])
    np.testing.assert_allclose(shifted.reshape(B, -1)[:, 1:], arr.reshape(B, -1)[:, 1:] - 1, rtol=0, atol=1e-15)
    model = unpadded_cnn()
    theirs = quantus.InputInvariance(**QUIET)(model=model, x_batch=arr, y_batch=y.numpy(), a_batch=None,
                                              explain_func=explain_with(attribution.VanillaGradient), device="cpu")
    assert not all(theirs)
    assert input_invariance(attribution.VanillaGradient(model), x, y).invariant.all()


def test_input_invariance_closed_forms_and_quantus_padding_defect(case):
    """Input x gradient moves by exactly |m| |gradient|; on a padded first convolution Quantus' compensated model
    computes another function (so it calls the gradient variant), this library's the same one."""
    model, x, y = case
    gradient = attribution.VanillaGradient(model)(x, y)
    result = input_invariance(attribution.InputXGradient(model), x, y, shift=-2.0)
    torch.testing.assert_close(result.deviation, 2 * gradient.abs().flatten(1).amax(1).double(), rtol=1e-5, atol=0)
    assert input_invariance(attribution.VanillaGradient(model), x, y).invariant.all()
    with torch.no_grad():
        exact = absorb_shift(model, -1.0, x)(x.float() - 1)
        theirs = quantus_model(model).add_mean_shift_to_first_layer(-1, (1, 3, 16, 16))(x.float() - 1)
        torch.testing.assert_close(exact, model(x.float()), rtol=1e-5, atol=1e-5)
        assert (theirs - model(x.float())).abs().max() > 1e-3
    quantus_says = quantus.InputInvariance(perturb_func=shift_all, **QUIET)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
        explain_func=explain_with(attribution.VanillaGradient), device="cpu")
    assert not any(quantus_says)
    linear = LinearModel(shape=(3, 16, 16), classes=5)  # a linear first layer: Quantus needs out_channels
    assert input_invariance(attribution.VanillaGradient(linear), x, y).invariant.all()
    with pytest.raises((AttributeError, RuntimeError)):  # it runs the layer on the unflattened image
        quantus_model(linear).add_mean_shift_to_first_layer(-1, (1, 3, 16, 16))
    no_bias = unpadded_cnn()
    no_bias[0] = nn.Conv2d(3, 8, 3, bias=False)
    assert input_invariance(attribution.VanillaGradient(no_bias), x, y).invariant.all()
    assert no_bias[0].bias is None  # the user's model is untouched


# ------------------------------------------------------------------------------------------------- bad input
def test_bad_input(case):
    model, x, y = case
    explainer = attribution.VanillaGradient(model)
    with pytest.raises(ValueError, match="bins"):
        efficient_mprt(explainer, x, y, bins=0)
    with pytest.raises(ValueError, match="images"):
        efficient_mprt(explainer, x[0], y)
    with pytest.raises(TypeError, match="model="):
        efficient_mprt(lambda images, target: images, x, y)
    with pytest.raises(ValueError, match="no layer named"):
        efficient_mprt(explainer, x, y, layers=["nope"])
    with pytest.raises(ValueError, match="one map per image"):
        efficient_mprt(lambda images, target, model=None: images[:1], x, y, model=model)
    with pytest.raises(ValueError, match="order"):
        smooth_mprt(explainer, x, y, order="sideways")
    with pytest.raises(ValueError, match="samples"):
        smooth_mprt(explainer, x, y, samples=0)
    with pytest.raises(ValueError, match="noise"):
        smooth_mprt(explainer, x, y, noise=-0.1)
    with pytest.raises(ValueError, match="maps"):
        sufficiency(model, x, x[:2])
    with pytest.raises(ValueError, match="threshold"):
        sufficiency(model, x, x, threshold=-1)
    with pytest.raises(ValueError, match="distance"):
        sufficiency(model, x, x, distance="chebyshev")
    with pytest.raises(TypeError, match="follow"):
        input_invariance(lambda images, target: images, x, y, model=model)
    with pytest.raises(TypeError, match="bias of a convolution or linear"):
        input_invariance(attribution.VanillaGradient(nn.Sequential(nn.BatchNorm2d(3), tiny_cnn())), x, y)
    scaled = nn.Sequential(nn.Upsample(scale_factor=1.0), tiny_cnn())

    class Doubling(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, images):
            return self.net(2 * images)

    with pytest.raises(ValueError, match="does not move by the shift"):
        input_invariance(attribution.VanillaGradient(Doubling()), x, y)
    assert input_invariance(attribution.VanillaGradient(scaled), x, y).invariant.all()  # no parameters before
    with pytest.raises(ValueError, match="shift"):
        input_invariance(explainer, x, y, shift="up")


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_input_invariance_finds_a_vits_patch_embedding(library):
    """A ViT owns its class token and position embedding itself: the first layer is the patch embedding's
    convolution, and the plain gradient is invariant (float64)."""
    if library == "timm":
        from conftest import tiny_vit

        model = tiny_vit().double()
    else:
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2,
                                                     hidden_dim=16, mlp_dim=32, num_classes=5).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = input_invariance(attribution.VanillaGradient(model), x, [0, 3])
    assert result.invariant.all() and float(result.deviation.max()) < 1e-9
