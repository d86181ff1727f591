"""IROF, monotonicity, monotonicity correlation, faithfulness estimate, region perturbation and selectivity: parity
with Quantus 0.6.0 on a small CNN, closed forms on a pixel-linear model, Quantus' defects shown, bad input.

Parity tolerance: both sides evaluate the same float32 rows with the same model; only how the rows are batched into
forwards differs, which can move a score by a few float32 ulps (about 1e-7 on softmax probabilities of about 0.3).
Scores are compared at ``rtol=1e-5, atol=1e-6``; correlations, computed from drops of order 1e-2, at ``atol=1e-5``;
IROF's area, a sum of about 80 such ratios, at ``atol=2e-5``.  (On this machine all but IROF agree exactly; IROF,
its rows batched 32 at a time here, by 4e-6.)

Quantus counts features as elements of the (C, H, W) input with a one-channel map broadcast over channels, so its
``features_in_step = 3 k`` moves ``k`` whole pixels, our ``features_in_step=k``; its ``features_in_step`` must
divide ``H W``, hence 12 x 12 images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.metrics import deletion
from attribution.metrics.perturbation_faithfulness import (faithfulness_estimate, irof, monotonicity,
                                                           monotonicity_correlation, region_perturbation,
                                                           selectivity)
from conftest import tiny_cnn
from toy_models import PixelLinear

quantus = pytest.importorskip("quantus")
QUIET = {"disable_warnings": True, "display_progressbar": False}
SCORES = {"rtol": 1e-5, "atol": 1e-6}
CORRELATIONS = {"rtol": 1e-4, "atol": 1e-5}
AREAS = {"rtol": 1e-5, "atol": 2e-5}
pytestmark = pytest.mark.filterwarnings("ignore:The settings for perturbing input:UserWarning")


@pytest.fixture(autouse=True)
def quantus_on_numpy_2(monkeypatch):
    """Quantus 0.6.0 integrates with ``np.trapz``, which NumPy 2.4 removed; ``np.trapezoid`` is the same rule."""
    if not hasattr(np, "trapz"):
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


@pytest.fixture(scope="module")
def model():
    """The tiny CNN with its last layer scaled up, so that the softmax responds to perturbations (random weights
    alone leave it near uniform)."""
    net = tiny_cnn()
    with torch.no_grad():
        net[-1].weight.mul_(40)
        net[-1].bias.zero_()
    return net


@pytest.fixture(scope="module")
def data(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 12, 12, generator=generator)
    maps = torch.randn(3, 1, 12, 12, generator=generator)  # continuous: no ties, so both sides rank alike
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return x, y, maps


def run_quantus(metric, model, x, y, maps, **call):
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=maps.numpy(), device="cpu", **call)
    return torch.as_tensor(np.asarray(scores, dtype=np.float64))


class Recorder(torch.nn.Module):
    """The model, keeping every output (to read the curve Quantus computes but does not return)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.outputs = net, []

    def forward(self, x):
        out = self.net(x)
        self.outputs.append(out.detach().clone())
        return out


@pytest.fixture
def linear():
    model = PixelLinear().double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    return model, x


# ------------------------------------------------------------------------------------------ faithfulness estimate
def test_faithfulness_estimate_equals_quantus(model, data):
    x, y, maps = data
    for k, baseline in ((4, "black"), (2, 0.3)):
        ours = faithfulness_estimate(model, x, maps, y, features_in_step=k, substrate=baseline, batch_size=16)
        theirs = run_quantus(quantus.FaithfulnessEstimate(features_in_step=3 * k, perturb_baseline=baseline,
                                                          **QUIET), model, x, y, maps)
        torch.testing.assert_close(ours.double(), theirs, **CORRELATIONS)


def test_faithfulness_estimate_is_one_for_exact_contributions(linear):
    """f = sum(w x), substrate 0, raw score: removing a group drops f by exactly the map's sum over it."""
    model, x = linear
    exact = model.contributions(x)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(faithfulness_estimate(model, x, exact, 0, features_in_step=4, substrate=0.0), ones)
    torch.testing.assert_close(faithfulness_estimate(model, x, -exact, 0, features_in_step=4, substrate=0.0), -ones)


# -------------------------------------------------------------------------------------------------- monotonicity
def test_monotonicity_equals_quantus_once_its_insertion_is_repaired(model, data):
    """Quantus' loop, given a perturbation function that really inserts the image's pixels: the same forwards,
    the same curve, the same verdict."""
    x, y, maps = data
    flat = x.numpy().reshape(3, -1)

    def insert(arr, indices, **_):
        out = arr.copy()
        rows = np.arange(len(arr))[:, None]
        out[rows, indices] = flat[rows, indices]
        return out

    recorder = Recorder(model).eval()
    verdict = run_quantus(quantus.Monotonicity(features_in_step=3 * 8, perturb_func=insert, **QUIET),
                          recorder, x, y, maps)
    curve = torch.stack([out.softmax(dim=1)[torch.arange(3), y] for out in recorder.outputs[-18:]], dim=1)
    ours = monotonicity(model, x, maps, y, features_in_step=8)
    torch.testing.assert_close(ours.y, curve, **SCORES)
    assert torch.equal(ours.monotonic, verdict.bool())
    torch.testing.assert_close(ours.x, torch.arange(1, 19, dtype=torch.float32) / 18)


def test_quantus_monotonicity_never_inserts_the_image(model, data):
    """Quantus 0.6.0 as shipped: every forward sees the bare baseline, so every map is 'monotonic' (here a map and
    its signed reverse, ranked by their magnitude).  The metric here inserts the pixels: on this random CNN the
    score wanders, and the verdict is False."""
    x, y, maps = data
    recorder = Recorder(model).eval()
    for a in (maps, -maps):
        verdict = run_quantus(quantus.Monotonicity(features_in_step=3 * 8, **QUIET), recorder, x, y, a)
        assert verdict.bool().all()
    black = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    seen = torch.stack(recorder.outputs)  # (2 maps x 18 steps, B, classes)
    torch.testing.assert_close(seen, model(black).detach().expand_as(seen))
    ours = monotonicity(model, x, maps, y, features_in_step=8)
    assert not ours.monotonic.any() and (ours.y.diff(dim=1) < 0).any(dim=1).all()


def test_monotonicity_curve_closed_form(linear):
    """f = sum(w x) from the zero substrate: after step k the raw score is the sum of the contributions of the
    pixels inserted so far (ascending |map|); monotonic exactly when no step adds a negative amount."""
    model, x = linear
    exact = model.contributions(x)
    pixel = exact.sum(dim=1).flatten(1)  # (B, 64)
    result = monotonicity(model, x, exact, 0, features_in_step=4, substrate=0.0, score="logit")
    ordered = pixel.gather(1, pixel.abs().argsort(dim=1))
    expected = ordered.cumsum(dim=1)[:, 3::4]
    torch.testing.assert_close(result.y, expected)
    steps = ordered.view(3, 16, 4).sum(dim=2)
    assert torch.equal(result.monotonic, (steps[:, 1:] >= 0).all(dim=1))
    assert not result.monotonic.any()  # mixed-sign weights
    positive = PixelLinear().double()
    with torch.no_grad():
        positive.weight.abs_()
    assert monotonicity(positive, x, exact, 0, substrate=0.0, score="logit").monotonic.all()


# -------------------------------------------------------------------------------------- monotonicity correlation
def test_monotonicity_correlation_equals_quantus_with_the_same_draws(model, data, monkeypatch):
    """Quantus' 'uniform' baseline draws one value per image from np.random.uniform for each (group, sample),
    group-major; ours come from the generator in (group, sample) order, shared by the images: the same numbers fed
    to both."""
    x, y, maps = data
    groups, samples = 144 // 4, 4
    draws = torch.rand(groups, samples, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = []

    def uniform(low=0.0, high=1.0, size=None):
        group, sample = divmod(len(calls), samples)
        calls.append(size)
        return low + (high - low) * draws[group, sample].expand(size).numpy()

    monkeypatch.setattr(np.random, "uniform", uniform)
    theirs = run_quantus(quantus.MonotonicityCorrelation(features_in_step=3 * 4, nr_samples=samples, **QUIET),
                         model, x, y, maps)
    monkeypatch.undo()
    assert len(calls) == groups * samples and calls[0] == 3
    ours = monotonicity_correlation(model, x, maps, y, features_in_step=4, samples=samples,
                                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.double(), theirs, **CORRELATIONS)


def test_monotonicity_correlation_deterministic_substrate_equals_quantus(model, data):
    """With 'black' every sample is the same: Quantus makes nr_samples equal forwards, ours one."""
    x, y, maps = data
    theirs = run_quantus(quantus.MonotonicityCorrelation(features_in_step=3 * 4, nr_samples=3,
                                                         perturb_baseline="black", **QUIET), model, x, y, maps)
    ours = monotonicity_correlation(model, x, maps, y, features_in_step=4, samples=3, substrate="black")
    torch.testing.assert_close(ours.double(), theirs, **CORRELATIONS)


def test_monotonicity_correlation_closed_form_and_draws(linear, model, data):
    """Positive weights and inputs, substrate 0, raw score: a group's squared change is the square of its summed
    contributions, ranked as the map's sum over it (1); the reciprocal map ranks the pixels in reverse (-1)."""
    _, x = linear
    positive = PixelLinear().double()
    with torch.no_grad():
        positive.weight.abs_()
    exact = positive.contributions(x)
    ones = torch.ones(3, dtype=torch.float64)
    options = {"substrate": 0.0, "score": "logit", "samples": 5}
    torch.testing.assert_close(monotonicity_correlation(positive, x, exact, 0, **options), ones)
    torch.testing.assert_close(monotonicity_correlation(positive, x, 1 / exact.sum(1, keepdim=True), 0, **options),
                               -ones)
    # reproducible draws, and an image's value does not depend on the rest of the batch (nor on its place in it)
    xs, ys, maps = data
    first = monotonicity_correlation(model, xs, maps, ys, features_in_step=8, samples=2,
                                     generator=torch.Generator().manual_seed(3))
    for i in range(3):
        alone = monotonicity_correlation(model, xs[i:i + 1], maps[i:i + 1], ys[i:i + 1], features_in_step=8,
                                         samples=2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(alone, first[i:i + 1])


# ------------------------------------------------------------------------------ region perturbation, selectivity
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_equals_quantus(model, data, order):
    x, y, maps = data
    theirs = run_quantus(quantus.RegionPerturbation(patch_size=5, regions_evaluation=6, order=order, **QUIET),
                         model, x, y, maps)  # 5 does not divide 12: Quantus pads the patch grid
    ours = region_perturbation(model, x, maps, y, patch_size=5, regions=6, order=order, batch_size=5)
    torch.testing.assert_close(ours.y.double(), theirs, **SCORES)
    torch.testing.assert_close(ours.auc.double(), torch.as_tensor(np.trapezoid(theirs.numpy(), axis=1)), **SCORES)
    torch.testing.assert_close(ours.aopc, ours.y.sum(dim=1) / 7)


def test_selectivity_equals_quantus(model, data):
    x, y, maps = data
    theirs = run_quantus(quantus.Selectivity(patch_size=5, **QUIET), model, x, y, maps)
    ours = selectivity(model, x, maps, y, patch_size=5)
    assert theirs.shape == (3, 9)
    torch.testing.assert_close(ours.y.double(), theirs, **SCORES)
    torch.testing.assert_close(ours.auc.double(), torch.as_tensor(np.trapezoid(theirs.numpy(), axis=1)), **SCORES)


def test_patch_metrics_closed_form(linear):
    """Positive weights, substrate 0, raw score: removing patches drops f by their summed contributions, so the
    exact map's MoRF order gives the largest drop at every step (best AOPC, least selectivity area) and its
    reverse the smallest."""
    _, x = linear
    model = PixelLinear().double()
    with torch.no_grad():
        model.weight.abs_()
    exact = model.contributions(x)
    patch = exact.sum(dim=1).unfold(1, 4, 4).unfold(2, 4, 4).sum(dim=(-1, -2)).flatten(1)  # (B, 4) 4x4 patches
    options = {"patch_size": 4, "substrate": 0.0, "score": "logit"}
    morf = region_perturbation(model, x, exact, 0, **options)
    expected = patch.sort(dim=1, descending=True).values.cumsum(dim=1)
    torch.testing.assert_close(morf.y, expected)
    torch.testing.assert_close(morf.aopc, expected.sum(dim=1) / 5)
    lerf = region_perturbation(model, x, exact, 0, order="lerf", **options)
    torch.testing.assert_close(lerf.y, patch.sort(dim=1).values.cumsum(dim=1))
    reverse = region_perturbation(model, x, -exact, 0, **options)
    assert (morf.aopc > reverse.aopc).all() and (morf.aopc > lerf.aopc).all()
    f = model(x)[:, 0]
    best, worst = selectivity(model, x, exact, 0, **options), selectivity(model, x, -exact, 0, **options)
    torch.testing.assert_close(best.y, f[:, None] - expected)
    assert (best.auc < worst.auc).all()
    first = region_perturbation(model, x, exact, 0, order="random", generator=torch.Generator().manual_seed(2),
                                **options)
    again = region_perturbation(model, x, exact, 0, order="random", generator=torch.Generator().manual_seed(2),
                                **options)
    torch.testing.assert_close(first.y, again.y)


def test_pixel_flipping_is_the_deletion_curve(model, data):
    """Quantus' PixelFlipping is RISE deletion with the image's minimum as the substrate and ``step`` pixels per
    step, without the unperturbed first point; its area is the unit-spacing trapezoid over the rest, i.e.
    ``(deletion.auc - (y_0 + y_1) / 2 * step / n) * n / step``.  So no separate function."""
    x, y, maps = data
    curve = deletion(model, x, maps, y, step=8, substrate=lambda z: z.amin(dim=(1, 2, 3), keepdim=True))
    theirs = run_quantus(quantus.PixelFlipping(features_in_step=3 * 8, **QUIET), model, x, y, maps)
    torch.testing.assert_close(curve.y[:, 1:].double(), theirs, **SCORES)
    area = run_quantus(quantus.PixelFlipping(features_in_step=3 * 8, return_auc_per_sample=True, **QUIET),
                       model, x, y, maps)
    steps = curve.y.shape[1] - 1
    from_deletion = (curve.auc - (curve.y[:, 0] + curve.y[:, 1]) / 2 / steps) * steps
    torch.testing.assert_close(from_deletion.double(), area, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------- IROF
def broadcast_mask(arr, mask, **kwargs):
    """Quantus 0.6.0's IROF hands a (B, 1, H, W) mask to a function that asserts the (B, C, H, W) shape; broadcast
    it over the channels (what the metric means), then call Quantus' own replacement."""
    from quantus.functions.perturb_func import baseline_replacement_by_mask

    return baseline_replacement_by_mask(arr, np.broadcast_to(mask, arr.shape), **kwargs)


@pytest.fixture(scope="module")
def irof_data(model):
    """Images spanning exactly [0, 1]: the library's SLIC (on the image min-max scaled) and Quantus' (on the raw
    image) then see the same numbers."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 24, 24, generator=generator)
    low, high = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - low) / (high - low)
    maps = torch.randn(3, 1, 24, 24, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return x, y, maps


def quantus_irof(model, x, y, maps, baseline, batch_size):
    metric = quantus.IROF(perturb_func=broadcast_mask, perturb_baseline=baseline, return_aggregate=False, **QUIET)
    return run_quantus(metric, model, x, y, maps, batch_size=batch_size)


def test_irof_equals_quantus_image_by_image(model, irof_data):
    x, y, maps = irof_data
    theirs = torch.cat([quantus_irof(model, x[i:i + 1], y[i:i + 1], maps[i:i + 1], 0.25, 1) for i in range(3)])
    ours = irof(model, x, maps, y, substrate=0.25, batch_size=32)
    torch.testing.assert_close(ours.aoc.double(), theirs, **AREAS)
    assert len(set(ours.segments.tolist())) > 1  # the images have different segment counts
    # Quantus with the whole batch pads every curve to the largest count and adds y_n / 2 to the shorter ones
    batched = quantus_irof(model, x, y, maps, 0.25, 64)
    last = ours.y.gather(1, ours.segments[:, None])[:, 0]
    shorter = (ours.segments < ours.segments.max()).double()
    torch.testing.assert_close(batched, (ours.aoc - shorter * last / 2).double(), **AREAS)
    # the curve, its start and the unit-interval area written out for image 0
    n = int(ours.segments[0])
    curve = ours.y[0, :n + 1].double()
    assert curve[0] == 1 and torch.isnan(ours.y[0, n + 1:]).all()
    torch.testing.assert_close(ours.aoc_unit[0].double(),
                               1 - torch.trapezoid(curve, dx=1 / n), rtol=1e-5, atol=1e-6)


def test_irof_with_quantus_segments_on_any_input(model):
    """On inputs outside [0, 1] the library's SLIC (scaled image) differs from Quantus' (raw image); passing
    Quantus' labels as ``segments`` gives Quantus' number."""
    from quantus.helpers.utils import get_superpixel_segments

    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    maps = torch.randn(2, 1, 16, 16, generator=generator)
    y = torch.tensor([0, 3])
    labels = np.stack([get_superpixel_segments(np.moveaxis(image, 0, -1).astype("double"), "slic")
                       for image in x.numpy()])
    theirs = torch.cat([quantus_irof(model, x[i:i + 1], y[i:i + 1], maps[i:i + 1], -0.5, 1) for i in range(2)])
    ours = irof(model, x, maps, y, segments=torch.from_numpy(labels), substrate=-0.5)
    torch.testing.assert_close(ours.aoc.double(), theirs, **AREAS)


def test_quantus_irof_mean_baseline_depends_on_the_other_images(model, irof_data):
    """Quantus fills with the mean of the whole batch as perturbed so far: reversing image 1's map changes image
    0's value.  Here 'mean' is each image's own per-channel mean, and image 0 does not move."""
    x, y, maps = irof_data
    other = maps.clone()
    other[1] = -other[1]
    before = quantus_irof(model, x[:2], y[:2], maps[:2], "mean", 64)
    after = quantus_irof(model, x[:2], y[:2], other[:2], "mean", 64)
    assert (before[0] - after[0]).abs() > 1e-4
    ours_before = irof(model, x[:2], maps[:2], y[:2])
    ours_after = irof(model, x[:2], other[:2], y[:2])
    torch.testing.assert_close(ours_before.aoc[0], ours_after.aoc[0])


def test_irof_closed_form(linear):
    """Positive weights, substrate 0, raw score, four equal 4x4 segments: y_l = 1 - (sum of the l segments of
    highest mean contribution) / f; the exact map maximises the area, its reverse minimises it."""
    _, x = linear
    model = PixelLinear().double()
    with torch.no_grad():
        model.weight.abs_()
    exact = model.contributions(x)
    labels = (torch.arange(8)[:, None] // 4) * 2 + torch.arange(8)[None, :] // 4
    best = irof(model, x, exact, 0, segments=labels * 10 + 7, substrate=0.0, score="logit")  # any label values
    segment = exact.sum(dim=1).unfold(1, 4, 4).unfold(2, 4, 4).sum(dim=(-1, -2)).flatten(1)
    f = model(x)[:, 0].detach()
    expected = torch.cat([torch.ones(3, 1, dtype=x.dtype),
                          1 - segment.sort(dim=1, descending=True).values.cumsum(dim=1) / f[:, None]], dim=1)
    torch.testing.assert_close(best.y, expected)
    torch.testing.assert_close(best.aoc, 4 - torch.trapezoid(expected[:, 1:], dim=1))
    worst = irof(model, x, -exact, 0, segments=labels, substrate=0.0, score="logit")
    assert (best.aoc > worst.aoc).all() and (best.aoc_unit > worst.aoc_unit).all()
    torch.testing.assert_close(best.y[:, -1], torch.zeros(3, dtype=x.dtype), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_arguments_name_what_is_wrong(linear):
    model, x = linear
    cases = [
        (faithfulness_estimate, {"features_in_step": 0}, "features_in_step"),
        (faithfulness_estimate, {"features_in_step": 65}, "features_in_step"),
        (faithfulness_estimate, {"substrate": "grey"}, "substrate"),
        (monotonicity, {"features_in_step": True}, "features_in_step"),
        (monotonicity, {"score": "probability"}, "score"),
        (monotonicity_correlation, {"samples": 0}, "samples"),
        (monotonicity_correlation, {"uniform_range": (1.0, 0.0)}, "uniform_range"),
        (monotonicity_correlation, {"uniform_range": "wide"}, "uniform_range"),
        (region_perturbation, {"patch_size": 0}, "patch_size"),
        (region_perturbation, {"regions": 0}, "regions"),
        (region_perturbation, {"order": "best"}, "order"),
        (selectivity, {"patch_size": 2.5}, "patch_size"),
        (irof, {"segments": "felzenszwalb"}, "segments"),
        (irof, {"segments": torch.zeros(7, 7, dtype=torch.long)}, "segments"),
        (irof, {"segments": torch.zeros(8, 8)}, "segments"),
    ]
    for metric, options, match in cases:
        with pytest.raises(ValueError, match=match):
            metric(model, x, x, 0, **options)
    with pytest.raises(ValueError, match="maps"):
        selectivity(model, x, x[:, :, :4], 0)


def test_an_images_value_does_not_depend_on_the_batch(model, data):
    """IROF's ties (a flat map on 4 segments next to an image with 16) are broken in an order of each image's own
    segments; region perturbation's random order is shared by the images."""
    x, y, maps = data
    coarse = (torch.arange(12)[:, None] // 6) * 2 + torch.arange(12)[None, :] // 6  # 4 segments
    fine = (torch.arange(12)[:, None] // 3) * 4 + torch.arange(12)[None, :] // 3  # 16 segments
    flat = torch.ones_like(maps[:2])
    together = irof(model, x[:2], flat, y[:2], segments=torch.stack([coarse, fine]))
    alone = irof(model, x[:1], flat[:1], y[:1], segments=coarse[None])
    torch.testing.assert_close(together.aoc[:1], alone.aoc)
    options = {"patch_size": 4, "order": "random"}
    batch = region_perturbation(model, x, maps, y, generator=torch.Generator().manual_seed(4), **options)
    for i in range(3):
        one = region_perturbation(model, x[i:i + 1], maps[i:i + 1], y[i:i + 1],
                                  generator=torch.Generator().manual_seed(4), **options)
        torch.testing.assert_close(one.y, batch.y[i:i + 1])


# -------------------------------------------------------------------------------------- faithfulness correlation
def test_faithfulness_correlation_defaults_are_quantus():
    """Quantus 0.6.0 FaithfulnessCorrelation: nr_runs=100, subset_size=224, perturb_baseline='black' (each image's
    minimum), raw scores."""
    import inspect

    from attribution.metrics import faithfulness_correlation

    defaults = {k: p.default for k, p in inspect.signature(faithfulness_correlation).parameters.items()}
    assert (defaults["runs"], defaults["subset_size"], defaults["baseline"], defaults["score"]) == \
        (100, 224, "black", "logit")
    theirs = inspect.signature(quantus.FaithfulnessCorrelation.__init__).parameters
    assert (theirs["nr_runs"].default, theirs["subset_size"].default, theirs["perturb_baseline"].default) == \
        (100, 224, "black")


@pytest.mark.parametrize("channels", [1, 3])
def test_faithfulness_correlation_equals_quantus_with_the_same_subsets(model, data, channels, monkeypatch):
    """Quantus' defaults (black baseline, entries of the (C, H, W) input, a one-channel map broadcast over the
    channels) with the subsets our generator draws fed to Quantus' np.random.choice (one call per image and run);
    on one-channel images the default whole-pixel subsets are the same thing."""
    from attribution.metrics import faithfulness_correlation

    x, y, maps = data
    if channels == 1:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 1), model).eval()
        x = x[:, :1]
    else:
        net = model
    runs, size, features = 12, 40, channels * 144
    order = torch.rand(runs, features, generator=torch.Generator().manual_seed(7)).argsort(dim=1)[:, :size]
    calls = iter([order[i].numpy() for i in range(runs) for _ in range(3)])
    monkeypatch.setattr(np.random, "choice", lambda n, k, replace=False: next(calls))
    theirs = run_quantus(quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size, return_aggregate=False,
                                                         **QUIET), net, x, y, maps)
    monkeypatch.undo()
    ours = faithfulness_correlation(net, x, maps, y, subset_size=size, runs=runs, features="entries",
                                    generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours.double(), theirs, **CORRELATIONS)
    if channels == 1:
        pixels = faithfulness_correlation(net, x, maps, y, subset_size=size, runs=runs,
                                          generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(pixels, ours)
