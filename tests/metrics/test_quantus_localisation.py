"""Localisation, complexity and axiomatic metrics against Quantus 0.6.0, plus closed forms and bad input.

Tolerances: the map-only metrics are fed float64 maps and computed in float64 on both sides, so they agree to
rounding (``atol=1e-12``; the ratio metrics 1e-9 as Quantus adds ``1e-9`` to a normalised denominator, the
Sparseness check 1e-6 without replicating Quantus' ``+1e-7``).  Rank and count metrics are compared exactly.  The
model-querying metrics score float32 forwards of ``tiny_cnn``; their counts are compared exactly and the output
difference of completeness to ``1e-6`` (float32 logits of order 0.1-1, computed with other batch compositions).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from attribution.metrics.axioms import completeness, non_sensitivity
from attribution.metrics.common import make_substrate
from attribution.metrics.complexity import effective_complexity, entropy, gini
from attribution.metrics.ground_truth import focus, localisation_auc, relevance_rank_accuracy, top_k_intersection
from attribution.metrics.localisation import attribution_localisation, pointing_game
from conftest import LinearModel, tiny_cnn

B, H, W = 5, 12, 12


@pytest.fixture(scope="module")
def quantus():
    q = pytest.importorskip("quantus")
    warnings.filterwarnings("ignore", module="quantus")
    return q


def run(metric, model=None, x=None, y=None, a=None, s=None, **call) -> torch.Tensor:
    """Quantus' scores as a float64 tensor (NaN kept); ``a``/``s`` as (B, 1, H, W)."""
    a = a.unsqueeze(1) if a is not None and a.dim() == 3 else a
    s = s.unsqueeze(1) if s is not None and s.dim() == 3 else s
    x = torch.zeros(a.shape[0], 1, *a.shape[-2:]) if x is None else x
    y = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None if a is None else a.numpy(),
                    s_batch=None if s is None else s.float().numpy(), device="cpu", **call)
    return torch.tensor([float(v) for v in scores], dtype=torch.float64)


def Q(quantus, name, **options):
    return getattr(quantus, name)(disable_warnings=True, display_progressbar=False, **options)


def random_masks(seed: int = 0) -> torch.Tensor:
    """(B, H, W) bool: a random box per image united with a few random pixels (sizes 10 to 60 of 144)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(B, H, W, generator=g) < 0.08
    for i in range(B):
        y0, x0 = torch.randint(0, H - 4, (2,), generator=g).tolist()
        h, w = torch.randint(2, 6, (2,), generator=g).tolist()
        masks[i, y0:y0 + h, x0:x0 + w] = True
    return masks


def random_maps(seed: int = 1, signed: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, 1, H, W, generator=g, dtype=torch.float64)
    return m if signed else m.abs()


# ------------------------------------------------------------------------------------- relevance rank accuracy
def test_relevance_rank_accuracy_matches_quantus(quantus):
    maps, masks = random_maps(), random_masks()
    ours = relevance_rank_accuracy(maps, masks)
    torch.testing.assert_close(ours, run(Q(quantus, "RelevanceRankAccuracy"), a=maps, s=masks), atol=1e-12, rtol=0)
    torch.testing.assert_close(relevance_rank_accuracy(maps.abs(), masks),
                               run(Q(quantus, "RelevanceRankAccuracy", abs=True), a=maps, s=masks),
                               atol=1e-12, rtol=0)
    assert ours.dtype == torch.float64 and ours.shape == (B,)


def test_relevance_rank_accuracy_closed_forms():
    masks = random_masks()
    on, off = masks.double().unsqueeze(1), (~masks).double().unsqueeze(1)
    assert torch.equal(relevance_rank_accuracy(on + 0.01 * random_maps(), masks), torch.ones(B, dtype=torch.float64))
    assert torch.equal(relevance_rank_accuracy(off, masks), torch.zeros(B, dtype=torch.float64))  # masks < half
    # a constant map: every order of the ties equally likely -> the expected share is |GT| / N
    flat = relevance_rank_accuracy(torch.ones(B, 1, H, W), masks)
    torch.testing.assert_close(flat, masks.flatten(1).float().mean(dim=1))
    # a tie straddling the cut: region {0, 1, 2} (K = 3), values 5 on pixel 0, 1 on pixels 1, 5, 6 (tied), 0 else
    m = torch.zeros(1, 1, 1, 8)
    m[0, 0, 0, 0], m[0, 0, 0, [1, 5, 6]] = 5.0, 1.0
    region = torch.zeros(1, 1, 8, dtype=torch.bool)
    region[0, 0, :3] = True
    assert relevance_rank_accuracy(m, region).item() == pytest.approx((1 + 2 * 1 / 3) / 3)
    # multi-channel maps are summed per pixel; boxes work like masks; an empty region gives NaN
    boxes = torch.tensor([[0, 0, 3, 3]] * B)
    box_masks = torch.zeros(B, H, W, dtype=torch.bool)
    box_masks[:, :4, :4] = True
    three = random_maps().expand(B, 3, H, W) / 3
    torch.testing.assert_close(relevance_rank_accuracy(three, boxes), relevance_rank_accuracy(random_maps(), box_masks))
    assert relevance_rank_accuracy(random_maps(), torch.zeros(B, H, W, dtype=torch.bool)).isnan().all()


# ------------------------------------------------------------------------------------------- top-k intersection
@pytest.mark.parametrize("concept_influence", [False, True])
def test_top_k_intersection_matches_quantus(quantus, concept_influence):
    maps, masks = random_maps(), random_masks()
    for k in (1, 7, 40):
        ours = top_k_intersection(maps, masks, k=k, concept_influence=concept_influence)
        theirs = run(Q(quantus, "TopKIntersection", k=k, concept_influence=concept_influence), a=maps, s=masks)
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_top_k_intersection_closed_forms_and_errors():
    masks = torch.zeros(B, H, W, dtype=torch.bool)
    masks[:, :6] = True  # 72 of 144 pixels
    on = masks.double().unsqueeze(1) + 0.01 * random_maps()
    assert torch.equal(top_k_intersection(on, masks, k=50), torch.ones(B, dtype=torch.float64))
    assert torch.equal(top_k_intersection(-on, masks, k=50), torch.zeros(B, dtype=torch.float64))
    # concept influence: a uniform map scores 1 (|GT| / N of its top k in the region, times N / |GT|)
    torch.testing.assert_close(top_k_intersection(torch.ones(B, 1, H, W), masks, k=10, concept_influence=True),
                               torch.ones(B))
    for k in (0, H * W + 1, 2.5, True):
        with pytest.raises(ValueError, match="k must be"):
            top_k_intersection(on, masks, k=k)
    with pytest.raises(ValueError, match="k must be"):
        top_k_intersection(on, masks)  # the default k = 1000 is more than the 144 pixels


# ------------------------------------------------------------------------------------------------------- AUC
@pytest.mark.filterwarnings("ignore:No negative samples")
def test_localisation_auc_matches_quantus_with_and_without_ties(quantus):
    masks = random_masks()
    full = masks.clone()
    full[-1] = True  # no negatives: NaN on both sides
    for maps in (random_maps(), torch.round(random_maps() * 1.5).clamp(-2, 2)):  # the second: 5 tied levels
        theirs = run(Q(quantus, "AUC"), a=maps, s=full)
        torch.testing.assert_close(localisation_auc(maps, full), theirs, atol=1e-12, rtol=0, equal_nan=True)
    assert localisation_auc(random_maps(), full)[-1].isnan()


def test_localisation_auc_closed_forms():
    masks = random_masks()
    on = masks.double().unsqueeze(1)
    assert torch.equal(localisation_auc(on, masks), torch.ones(B, dtype=torch.float64))
    assert torch.equal(localisation_auc(-on, masks), torch.zeros(B, dtype=torch.float64))
    assert torch.equal(localisation_auc(torch.zeros(B, 1, H, W), masks), torch.full((B,), 0.5))
    # 2 positives {3, 1}, 2 negatives {1, 0}: pairs 3>1, 3>0, 1=1 (half), 1>0 -> 3.5 / 4
    m = torch.tensor([3.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 4)
    region = torch.tensor([True, True, False, False]).view(1, 1, 4)
    assert localisation_auc(m, region).item() == 3.5 / 4
    assert localisation_auc(random_maps(), torch.zeros(B, H, W, dtype=torch.bool)).isnan().all()


# ----------------------------------------------------------------------------------------------------- Focus
def test_focus_matches_quantus(quantus):
    model = tiny_cnn()
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    for height, width in ((16, 16), (15, 13)):  # odd sizes: quadrants split at H // 2, W // 2 as in Quantus
        x = torch.randn(B, 3, height, width, generator=g)
        maps = torch.randn(B, 1, height, width, generator=g, dtype=torch.float64)
        theirs = run(Q(quantus, "Focus"), model=model, x=x, a=maps, custom_batch=positions.numpy())
        torch.testing.assert_close(focus(maps, positions), theirs, atol=1e-9, rtol=0)
        torch.testing.assert_close(focus(maps, positions.bool().tolist()), theirs, atol=1e-9, rtol=0)


def test_focus_closed_forms_and_errors():
    positions = torch.tensor([[1, 0, 0, 1]])
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, :4, :4], m[0, 0, 4:, 4:] = 1.0, 3.0  # all positive relevance on the two target quadrants
    m[0, 0, :4, 4:] = -5.0  # negative relevance elsewhere is left out
    assert focus(m, positions).item() == 1.0
    assert focus(m, [[0, 1, 1, 0]]).item() == 0.0
    assert focus(torch.ones(1, 1, 8, 8), positions).item() == 0.5
    assert focus(-torch.ones(1, 1, 8, 8), positions).item() == 0.0  # no positive relevance
    with pytest.raises(ValueError, match="positions must have shape"):
        focus(m, [[1, 0, 1]])
    with pytest.raises(ValueError, match="0/1"):
        focus(m, [[2, 0, 0, 1]])
    with pytest.raises(ValueError, match="maps must be"):
        focus(m[0, 0], positions)


# ------------------------------------------------------------------------- existing functions = Quantus metrics
def test_pointing_game_is_quantus_pointing_game_at_tolerance_one(quantus):
    maps, masks = random_maps(), random_masks()  # continuous maps: a unique maximum each
    masks[0] = False
    masks[0].view(-1)[maps[0].flatten().argmax()] = True  # make one a hit for sure
    ours = pointing_game(maps, masks, tolerance=1).hit  # distance < 1: the maximum itself lies in the region
    theirs = run(Q(quantus, "PointingGame"), a=maps, s=masks)
    assert ours.tolist() == theirs.bool().tolist() and ours[0]
    # Quantus marks an empty region NaN in a bool array, which reads back as a hit; ours is a miss
    empty = torch.zeros(B, H, W, dtype=torch.bool)
    assert run(Q(quantus, "PointingGame"), a=maps, s=empty).bool().all()
    assert not pointing_game(maps, empty, tolerance=1).hit.any()


def test_attribution_localisation_is_quantus_attribution_localisation_and_mass_accuracy(quantus):
    maps, masks = random_maps(), random_masks()
    x = torch.zeros(B, 1, H, W)
    # Quantus' AttributionLocalisation defaults to abs=True: our positive-part ratio of |maps|
    torch.testing.assert_close(attribution_localisation(maps.abs(), masks),
                               run(Q(quantus, "AttributionLocalisation"), x=x, a=maps, s=masks), atol=1e-9, rtol=0)
    # Kohlbrenner et al.'s positive relevance: Quantus with abs=False, positive_attributions=True
    torch.testing.assert_close(
        attribution_localisation(maps, masks),
        run(Q(quantus, "AttributionLocalisation", abs=False, positive_attributions=True), x=x, a=maps, s=masks),
        atol=1e-9, rtol=0)
    # Relevance mass accuracy (Arras et al.) on the paper's non-negative heatmaps, and on magnitudes (their code)
    torch.testing.assert_close(attribution_localisation(maps.abs(), masks),
                               run(Q(quantus, "RelevanceMassAccuracy"), a=maps.abs(), s=masks), atol=1e-12, rtol=0)
    torch.testing.assert_close(attribution_localisation(maps.abs(), masks),
                               run(Q(quantus, "RelevanceMassAccuracy", abs=True), a=maps, s=masks),
                               atol=1e-12, rtol=0)
    # on signed maps Quantus' RelevanceMassAccuracy is the signed ratio, not a share: it leaves [0, 1]
    signed = run(Q(quantus, "RelevanceMassAccuracy"), a=maps, s=masks)
    assert ((signed < 0) | (signed > 1)).any()
    assert ((attribution_localisation(maps, masks) >= 0) & (attribution_localisation(maps, masks) <= 1)).all()


def test_attribution_localisation_weighted_follows_the_paper_not_quantus(quantus):
    """Kohlbrenner et al.: mu_w = mu * S_tot / S_in.  Quantus multiplies by S_in / size(x_batch[2:]) instead (the
    size of the batch without its first two images), so only ours is 1 for a uniform map."""
    masks = random_masks()
    uniform = torch.ones(B, 1, H, W, dtype=torch.float64)
    torch.testing.assert_close(attribution_localisation(uniform, masks, weighted=True), torch.ones(B, dtype=torch.float64))
    maps = random_maps(signed=False)
    share = masks.flatten(1).double().mean(dim=1)
    ours = attribution_localisation(maps, masks, weighted=True)
    torch.testing.assert_close(ours, attribution_localisation(maps, masks) / share)
    theirs = run(Q(quantus, "AttributionLocalisation", weighted=True), x=torch.zeros(B, 1, H, W), a=maps, s=masks)
    torch.testing.assert_close(theirs, ours * share * share * H * W / ((B - 2) * H * W), atol=1e-9, rtol=0)


def test_gini_and_entropy_are_quantus_sparseness_and_complexity(quantus):
    maps = random_maps().expand(B, 3, H, W) * torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    maps = maps.contiguous()
    maps[0, :, :6] = 0  # a sparser map
    x = torch.zeros(B, 3, H, W)
    sparseness = run(Q(quantus, "Sparseness"), x=x, a=maps)
    # Quantus adds 1e-7 to the max-normalised magnitudes: replicated, equal to rounding; as is, within 1e-6
    shifted = maps.abs() / maps.abs().max() + 1e-7
    torch.testing.assert_close(gini(shifted), sparseness, atol=1e-12, rtol=0)
    torch.testing.assert_close(gini(maps), sparseness, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy(maps), run(Q(quantus, "Complexity"), x=x, a=maps), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------- effective complexity
def test_effective_complexity_matches_quantus_per_image(quantus):
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(B, 3, H, W, generator=g, dtype=torch.float64) * torch.logspace(-8, 0, H * W, dtype=torch.float64,
                                                                                      ).view(1, 1, H, W)
    maps[1] *= 1e-3  # a map with a smaller maximum
    x = torch.zeros(1, 3, H, W)
    for eps in (1e-5, 1e-3):
        ours = effective_complexity(maps, eps=eps)
        theirs = torch.cat([run(Q(quantus, "EffectiveComplexity", eps=eps), x=x, a=maps[i:i + 1]) for i in range(B)])
        assert ours.dtype == torch.int64 and ours.tolist() == theirs.long().tolist()
        raw = run(Q(quantus, "EffectiveComplexity", eps=eps, normalise=False), x=x.expand(B, -1, -1, -1), a=maps)
        assert effective_complexity(maps, eps=eps, normalise=False).tolist() == raw.long().tolist()
    # Quantus normalises by the batch's maximum: image 1's count changes with its neighbours; ours does not
    batched = run(Q(quantus, "EffectiveComplexity"), x=x.expand(B, -1, -1, -1), a=maps)
    assert batched[1] < effective_complexity(maps)[1] == effective_complexity(maps[1:2])[0]


def test_effective_complexity_closed_forms_and_errors():
    one_hot = torch.zeros(2, 3, 4, 4)
    one_hot[0, 1, 2, 3] = -7.0
    assert effective_complexity(one_hot).tolist() == [1, 0]
    ramp = torch.arange(1, 49, dtype=torch.float64).view(1, 3, 4, 4)  # |A| / max = i / 48
    assert effective_complexity(ramp, eps=10 / 48 + 1e-9).item() == 38
    assert effective_complexity(ramp, eps=10.5, normalise=False).item() == 38
    with pytest.raises(ValueError, match="eps"):
        effective_complexity(ramp, eps=-1.0)
    with pytest.raises(ValueError, match="maps"):
        effective_complexity(torch.ones(5))


# ------------------------------------------------------------------------------------------------- completeness
def test_completeness_matches_quantus(quantus):
    from quantus.helpers.model.pytorch_model import PyTorchModel

    model = tiny_cnn()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 8, 8, generator=g)
    y = torch.tensor([0, 2, 4])
    result = completeness(model, x, torch.zeros(3, 3, 8, 8), y)
    # delta: the target's logit on the image minus on Quantus' 'black' baseline (each image's minimum)
    wrapped = PyTorchModel(model, channel_first=True, softmax=False, device="cpu")
    base = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1).expand_as(x)
    expected = wrapped.predict(x.numpy())[range(3), y] - wrapped.predict(base.numpy())[range(3), y]
    torch.testing.assert_close(result.delta, torch.as_tensor(expected), atol=1e-6, rtol=0)
    # a map summing exactly to delta (one entry) satisfies both; Quantus compares raw maps only with normalise=False
    exact = torch.zeros(3, 3, 8, 8)
    exact[:, 0, 0, 0] = result.delta
    theirs = run(Q(quantus, "Completeness", normalise=False), model=model, x=x, y=y, a=exact)
    ours = completeness(model, x, exact, y, rtol=0.0)
    assert theirs.bool().all() and ours.holds.all() and torch.equal(ours.gap, torch.zeros(3))
    # 1 % off: not exact (both), but within the paper's 5 % (ours by default)
    off = exact * 1.01
    assert not run(Q(quantus, "Completeness", normalise=False), model=model, x=x, y=y, a=off).bool().any()
    assert not completeness(model, x, off, y, rtol=0.0).holds.any()
    assert completeness(model, x, off, y).holds.all()
    # Quantus' default max-normalises the maps first: even the exact map fails there
    assert not run(Q(quantus, "Completeness"), model=model, x=x, y=y, a=exact * 3).bool().any()


def test_completeness_closed_form_on_a_linear_model():
    """f(x) = W x + c: input x gradient from a zero baseline sums exactly to f(x) - f(0)."""
    model = LinearModel(shape=(3, 4, 4), classes=3).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    model = model.double()
    target = torch.tensor([2, 0])
    maps = model.linear.weight[target].detach().view(2, 3, 4, 4) * x
    result = completeness(model, x, maps, target, baseline=0.0, rtol=0.0, atol=1e-12)
    assert result.holds.all()
    torch.testing.assert_close(result.delta, (model(x) - model(torch.zeros_like(x)))[[0, 1], target])
    assert not completeness(model, x, 2 * maps, target, baseline=0.0).holds.any()
    # a one-channel map is a per-pixel map: summed as it is, not once per channel
    summed = maps.sum(dim=1, keepdim=True)
    torch.testing.assert_close(completeness(model, x, summed, target, baseline=0.0).gap, result.gap)


# --------------------------------------------------------------------------------------------- non-sensitivity
class LeftHalf(nn.Module):
    """``tiny_cnn`` that never sees the right half of the image (those entries cannot change the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.zeros_like(x)
        keep[..., : x.shape[-1] // 2] = 1
        return self.net(x * keep)


def test_non_sensitivity_matches_quantus():
    quantus = pytest.importorskip("quantus")
    model = LeftHalf().eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 6, 6, generator=g)
    y = torch.tensor([1, 3])
    maps = torch.randn(2, 3, 6, 6, generator=g)
    maps[maps.abs() < 0.5] = 0  # about 38 % exact zeros
    maps[1] *= 10  # another maximum: Quantus is called per image (it normalises by the batch's maximum)
    for one_channel in (False, True):
        a = maps[:, :1] if one_channel else maps
        ours = non_sensitivity(model, x, a, y)
        theirs = torch.cat([run(Q(quantus, "NonSensitivity"), model=model, x=x[i:i + 1], y=y[i:i + 1], a=a[i:i + 1])
                            for i in range(2)])
        assert ours.dtype == torch.int64 and ours.tolist() == theirs.long().tolist()
        assert (ours > 0).all()


def test_non_sensitivity_closed_forms_and_errors():
    model = LeftHalf().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(8))
    exact = torch.zeros(2, 3, 6, 6)
    exact[..., :3] = 1.0  # attribution exactly where the model looks
    options = dict(baseline=5.0, score="logit", eps=1e-6)
    assert non_sensitivity(model, x, exact, **options).tolist() == [0, 0]
    # grouped: half a row per step (3 entries), never mixing the halves -> still exact; 1 row per step mixes them
    assert non_sensitivity(model, x, exact, features_in_step=3, **options).tolist() == [0, 0]
    assert non_sensitivity(model, x, exact, features_in_step=6, **options).tolist() == [3 * 6 * 3] * 2
    # the reverse map is wrong everywhere: 108 entries
    assert non_sensitivity(model, x, 1 - exact, **options).tolist() == [108, 108]
    with pytest.raises(ValueError, match="features_in_step"):
        non_sensitivity(model, x, exact, features_in_step=0)
    with pytest.raises(ValueError, match="substrate must be"):
        non_sensitivity(model, x, exact, baseline="grey")
    with pytest.raises(ValueError, match="maps of shape"):
        non_sensitivity(model, x, exact[:, :2])
    with pytest.raises(ValueError, match="score"):
        completeness(model, x, exact, score="probability")


def test_baselines_follow_quantus():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    assert torch.equal(make_substrate(x, "black")[:, 0, 0, 0], x.flatten(1).amin(dim=1))
    assert torch.equal(make_substrate(x, "white")[:, 2, 3, 3], x.flatten(1).amax(dim=1))
    torch.testing.assert_close(make_substrate(x, "mean")[:, 1, 0, 2], x.mean(dim=(2, 3))[:, 1])
    assert torch.equal(make_substrate(x, 0.25), torch.full_like(x, 0.25))
    assert math.isclose(float(make_substrate(x, "zeros").abs().sum()), 0.0)
