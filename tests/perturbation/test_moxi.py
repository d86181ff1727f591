"""MoXI: the authors' greedy search and heatmap written out one image at a time, closed forms on an additive patch
model (with a planted interaction), the authors' defaults, batch independence, cost, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.perturbation.moxi import MoXI
from conftest import RowCounter, check_parameter_derivative, tiny_cnn

GRID = 3
N = GRID * GRID


@pytest.fixture(scope="module")
def setup():
    """A random net and images on which the prediction changes as patches come and go (so 'group' cuts inside)."""
    model = tiny_cnn(seed=3).double()
    x = 3 * torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x


# ---------------------------------------------------------------- the authors' procedure, one image at a time
def authors_reward(logits, label, softmax_type):
    """calc_reward.get_reward."""
    if softmax_type == "normal":
        return F.log_softmax(logits, dim=1)[:, label]
    if softmax_type == "modified":
        others = torch.arange(logits.shape[1]) != label
        return logits[:, label] - torch.logsumexp(logits[:, others], dim=1)
    return logits[:, label]


def authors_forward(model, image, present):
    """model_wrapper_replace_baselinevalue: a grid mask per list of present patches, nearest-upsampled, times the
    image (absent pixels become 0)."""
    masks = torch.zeros(len(present), image.shape[0], N, dtype=image.dtype)
    for row, patches in enumerate(present):
        masks[row, :, patches] = 1
    masks = F.interpolate(masks.view(len(present), -1, GRID, GRID), size=image.shape[1:], mode="nearest")
    with torch.no_grad():
        return model(image[None] * masks)


def choose_patch(curve, reward, identified):
    reward = reward.clone()
    if curve == "insertion":
        reward[identified] = -float("inf")
        return int(torch.argmax(reward))
    reward[identified] = float("inf")
    return int(torch.argmin(reward))


def authors_order(model, image, label, curve, method, softmax_type="modified"):
    """calc_contribution.online_identifying for 'MoXI' and 'self-shapley' (pixel_zero_values)."""
    everything = list(range(N))
    if curve == "insertion":  # get_reward_shapley
        present = [[k] for k in everything]
    else:
        present = [[p for p in everything if p != i] for i in everything]
    reward = authors_reward(authors_forward(model, image, present), label, softmax_type)
    if method == "self-shapley":  # get_identified_patch
        return [i for i, _ in sorted(enumerate(reward.tolist()), key=lambda pair: pair[1],
                                     reverse=curve == "insertion")]
    identified = [choose_patch(curve, reward, [])]
    for _ in range(N - 1):  # get_reward_interaction
        if curve == "insertion":
            present = [[k] + identified for k in everything]
        else:
            present = [[p for p in everything if p not in [i] + identified] for i in everything]
            for index in identified:
                present[index].pop(0)
        reward = authors_reward(authors_forward(model, image, present), label, softmax_type)
        identified.append(choose_patch(curve, reward, identified))
    return identified


def authors_heatmap(model, image, label, identified, curve):
    """util_visualize.make_heatmap: count the patches inserted until the image is classified as the label (deleted
    until it no longer is), then give them count, count - 1, ..., 1."""
    if curve == "insertion":
        prefixes = [identified[:j] for j in range(1, N + 1)]
    else:
        prefixes = [[p for p in range(N) if p not in identified[:j]] for j in range(1, N + 1)]
    count = 0
    while True:
        correct = int(authors_forward(model, image, [prefixes[count]]).argmax(1)) == label
        count += 1
        if (correct if curve == "insertion" else not correct) or count == N:
            break
    heatmap, value = [0] * N, count
    for index in identified:
        if value == 0:
            break
        heatmap[index] += value
        value -= 1
    return torch.tensor(heatmap, dtype=torch.float64)


def patch_values(saliency):
    """(B, N) the value of each patch of a nearest-upsampled map (12x12 images, 4x4 patches)."""
    return saliency[:, 0, ::4, ::4].flatten(1)


def order_of(rank_map):
    return patch_values(rank_map).argsort(dim=1, descending=True)


@pytest.mark.parametrize("curve", ["insertion", "deletion"])
@pytest.mark.parametrize("method", ["MoXI", "self-shapley"])
def test_equals_the_authors_search_and_heatmap(setup, curve, method):
    model, x = setup
    targets = [None, [2, 0, 4]]
    for target in targets:
        explainer = MoXI(model, grid=GRID, curve=curve, interactions=method == "MoXI", upsample="nearest")
        ranks = explainer(x, target, heatmap="rank")
        groups = explainer(x, target)
        labels = model(x).argmax(1).tolist() if target is None else target
        for i, label in enumerate(labels):
            theirs = authors_order(model, x[i], label, curve, method)
            assert order_of(ranks)[i].tolist() == theirs
            torch.testing.assert_close(patch_values(groups)[i], authors_heatmap(model, x[i], label, theirs, curve),
                                       rtol=0, atol=0)
    # the cut falls inside the order for some image (the test would not see a wrong cut otherwise)
    assert any(1 < v < N for v in patch_values(MoXI(model, grid=GRID, curve=curve)(x, upsample="nearest")).amax(1))


@pytest.mark.parametrize("softmax_type, options", [("normal", {"log_odds": False, "score": "log_softmax"}),
                                                   ("yi", {"log_odds": False})])
def test_the_authors_other_rewards(setup, softmax_type, options):
    model, x = setup
    ranks = MoXI(model, grid=GRID, heatmap="rank", upsample="nearest", **options)(x, [1, 3, 0])
    for i, label in enumerate([1, 3, 0]):
        assert order_of(ranks)[i].tolist() == authors_order(model, x[i], label, "insertion", "MoXI", softmax_type)


def test_bilinear_map_is_the_authors_cv2_resize(setup):
    cv2 = pytest.importorskip("cv2")
    model, x = setup
    ours = MoXI(model, grid=GRID)(x, [2, 0, 4])
    nearest = MoXI(model, grid=GRID, upsample="nearest")(x, [2, 0, 4])
    for i in range(3):
        grid_map = patch_values(nearest)[i].view(GRID, GRID).numpy()
        theirs = cv2.resize(grid_map / grid_map.max(), (12, 12), interpolation=cv2.INTER_LINEAR)  # display scale
        torch.testing.assert_close(ours[i, 0] / grid_map.max(), torch.from_numpy(theirs))


# ------------------------------------------------------------------------------ closed forms on a toy model
class PatchAdditive(nn.Module):
    """Two classes: class 0's logit is ``sum_p w_p m_p + c m_a m_b`` (``m_p`` the mean of patch ``p`` of a 4x4 grid
    on 8x8 images), class 1's is 0, so the log-odds of class 0 is that logit."""

    def __init__(self, weight, pair=(0, 1), c=0.0):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.pair, self.c = pair, c

    def forward(self, x):
        m = F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
        logit = m @ self.weight + self.c * m[:, self.pair[0]] * m[:, self.pair[1]]
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def toy_images(batch=2):
    return 0.5 + torch.rand(batch, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def toy_values(model, x):
    """(B, 16) each patch's own contribution ``w_p m_p``."""
    return F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1) * model.weight.detach()


@pytest.mark.parametrize("curve", ["insertion", "deletion"])
@pytest.mark.parametrize("interactions", [True, False])
def test_additive_model_order_is_the_weight_order_and_gains_the_contributions(curve, interactions):
    weight = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model, x = PatchAdditive(weight), toy_images()
    contributions = toy_values(model, x)
    explainer = MoXI(model, grid=4, curve=curve, interactions=interactions, upsample="nearest")
    ranks = explainer(x, 0, heatmap="rank")[:, 0, ::2, ::2].flatten(1)
    assert torch.equal(ranks.argsort(dim=1, descending=True), contributions.argsort(dim=1, descending=True))
    gains = explainer(x, 0, heatmap="gain")[:, 0, ::2, ::2].flatten(1)
    torch.testing.assert_close(gains, contributions)


def test_planted_interaction_is_picked_together():
    """Patch 5 alone is worth the most, patch 9 the least, but together they earn ``c m_5 m_9`` more: inserting
    with interactions takes 9 right after 5; the Shapley values alone leave 9 for last.  Deleting (full context)
    removes the pair first without interactions, but with them only one of the two early: once one is gone the
    other is worth little."""
    weight = torch.linspace(0.1, 0.9, 16, dtype=torch.float64)
    weight[5], weight[9] = 2.0, 0.01
    model, x = PatchAdditive(weight, pair=(5, 9), c=10.0), toy_images(1)
    rank = {}
    for curve in ("insertion", "deletion"):
        for interactions in (True, False):
            ranks = MoXI(model, grid=4, curve=curve, interactions=interactions, heatmap="rank",
                         upsample="nearest")(x, 0)
            rank[curve, interactions] = ranks[0, 0, ::2, ::2].flatten().argsort(descending=True).tolist()
    assert rank["insertion", True][:2] == [5, 9] and rank["insertion", False][-1] == 9
    assert set(rank["deletion", False][:2]) == {5, 9}
    assert rank["deletion", True][0] == 5 and rank["deletion", True].index(9) > 8
    # the gain of 9 is its own contribution plus the interaction, and all gains add up to v(N) - v({})
    gains = MoXI(model, grid=4, heatmap="gain", upsample="nearest")(x, 0)[0, 0, ::2, ::2].flatten()
    m = F.avg_pool2d(x.mean(1, keepdim=True), 2).flatten()
    torch.testing.assert_close(gains[9], weight[9] * m[9] + 10.0 * m[5] * m[9])
    with torch.no_grad():
        torch.testing.assert_close(gains.sum(), model(x)[0, 0] - model(torch.zeros_like(x))[0, 0])


# ------------------------------------------------------------------------------------------ defaults and cost
def test_defaults_are_the_authors():
    """load_parser: grid_num=14, curve_method='insertion', softmax_type='modified' (log p / (1 - p)), identify_method
    'MoXI', pixel_zero_values masking; make_heatmap's cut and cv2.resize's bilinear display."""
    assert MoXI.defaults == {"grid": 14, "curve": "insertion", "interactions": True, "log_odds": True,
                             "baseline": "zero", "heatmap": "group", "upsample": "bilinear"}
    assert MoXI(tiny_cnn()).resolved_options()["score"] == "logit"
    assert MoXI.needs_class_indices


@pytest.mark.parametrize("options, per_image", [({}, N * (N + 1) // 2 - 1), ({"heatmap": "gain"}, N * (N + 1) // 2 + 1),
                                                ({"interactions": False}, 2 * N - 1),
                                                ({"interactions": False, "heatmap": "rank"}, N)])
def test_forward_count(setup, options, per_image):
    model, x = setup
    counter = RowCounter(model)
    try:
        MoXI(model, grid=GRID, **options)(x[:2], [0, 1])
    finally:
        counter.close()
    assert sum(counter.rows) == 2 * per_image


# ------------------------------------------------------------------------------- batching and differentiation
@pytest.mark.parametrize("heatmap", ["group", "gain"])
def test_batch_independence(setup, heatmap):
    model, x = setup
    explainer = MoXI(model, grid=GRID, heatmap=heatmap, curve="deletion")
    together = explainer(x, [2, 0, 4], batch_size=5)
    for i, target in enumerate([2, 0, 4]):
        torch.testing.assert_close(explainer(x[i:i + 1], target, batch_size=1), together[i:i + 1])
    torch.testing.assert_close(explainer(x, [2, 0, 4]), together)


def test_gain_map_create_graph_matches_finite_differences(setup):
    model, x = setup
    explainer = MoXI(model, grid=GRID, heatmap="gain", upsample="nearest")
    check_parameter_derivative(lambda create_graph: explainer(x[:2], [2, 0], create_graph=create_graph),
                               model, ["0.weight", "8.weight"], rtol=1e-5, atol=1e-9)
    plain = explainer(x[:2], [2, 0])
    torch.testing.assert_close(explainer(x[:2], [2, 0], create_graph=True).detach(), plain)
    with torch.no_grad():  # the gains add up to v(N) - v({}), the log-odds of the image less the blank's
        def log_odds(images, label):
            logits = model(images)
            return logits[:, label] - torch.logsumexp(logits[:, torch.arange(5) != label], dim=1)
        change = torch.stack([log_odds(x[i:i + 1], t)[0] - log_odds(torch.zeros_like(x[:1]), t)[0]
                              for i, t in enumerate([2, 0])])
    torch.testing.assert_close(patch_values(plain).sum(1), change)


def test_callable_target_without_class_readings(setup):
    model, x = setup
    explainer = MoXI(model, grid=GRID, log_odds=False, heatmap="rank")
    torch.testing.assert_close(explainer(x, lambda s: s[:, 3]), explainer(x, 3))
    with pytest.raises(ValueError, match="log_odds=True.*class indices"):
        MoXI(model, grid=GRID)(x, lambda s: s[:, 3], heatmap="rank")
    with pytest.raises(ValueError, match="heatmap='group'.*class indices"):
        MoXI(model, grid=GRID, log_odds=False)(x, lambda s: s[:, 3])


def test_bad_options_are_named(setup):
    model, x = setup
    explainer = MoXI(model, grid=GRID)
    cases = [({"grid": 0}, ValueError, "grid must be a positive int, got 0"),
             ({"grid": 13}, ValueError, "grid must be at most the image's shorter side \\(12\\), got 13"),
             ({"curve": "both"}, ValueError, "curve must be one of .*'both'"),
             ({"heatmap": "count"}, ValueError, "heatmap must be one of .*'count'"),
             ({"upsample": "bicubic"}, ValueError, "upsample must be one of .*'bicubic'"),
             ({"interactions": 1}, TypeError, "interactions must be a bool, got 1"),
             ({"log_odds": "yes"}, TypeError, "log_odds must be a bool"),
             ({"baseline": "grey"}, ValueError, "baseline must be"),
             ({"create_graph": True}, ValueError, "create_graph=True needs heatmap='gain'")]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            explainer(x, 0, **options)


@pytest.mark.parametrize("score", ["softmax", "rest"])
def test_log_odds_need_logits(setup, score):
    """log p / (1 - p) is computed from logits (or log-probabilities): other scores are refused, not misread."""
    model, x = setup
    with pytest.raises(ValueError, match="score"):
        MoXI(model, grid=GRID)(x, 0, score=score)
    MoXI(model, grid=GRID)(x, 0, score=score, log_odds=False)  # the score itself is v


def test_gain_map_keeps_the_log_odds_precision_on_a_float32_model():
    """The gains are differences of nearly equal log-odds (a flat prediction over many classes): the search's
    prefix values stay in float64, so the map equals create_graph's, which recomputes every prefix."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16, 1000)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(1e-3)
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    method = MoXI(model, grid=3, heatmap="gain")
    torch.testing.assert_close(method(x, [3, 7]), method(x, [3, 7], create_graph=True).detach(), rtol=1e-5,
                               atol=1e-9)
