"""MDA (Walker, Jha & Ewetz, ICLR 2025): the authors' procedure written out one image at a time, closed forms on a
patch-additive model, the order kept by the magnitudes, the metrics it optimises, batching, create_graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from scipy.optimize import minimize
from torch import nn
from torchvision import transforms

from attribution import create
from attribution.core.filters import gaussian_blur
from attribution.core.targets import resolve_target
from attribution.metrics.insertion_deletion import deletion, insertion
from attribution.transformers.beyond_intuition import BeyondIntuition
from attribution.transformers.mda import (MDA, Rows, convex_fit, deletion_search, grid_labels, insertion_search,
                                          magnitudes, patch_order)
from conftest import RowCounter, check_parameter_derivative, tiny_cnn, tiny_vit

SIDE, PATCH, GRID = 16, 4, 4
N = GRID * GRID
TARGETS = [1, 1, 2, 1]


@pytest.fixture(scope="module")
def setup():
    """The tiny ViT with four blocks (Bi-Attn's default starts at the fourth) and a head scaled up so that the
    predictions are peaked, as a trained model's (class 1 at 0.96-0.98 on these images), in float64."""
    model = tiny_vit(depth=4).double()
    with torch.no_grad():
        model.head.weight.mul_(40)
    x = torch.randn(4, 3, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x


# ------------------------------------------------------------------ the authors' procedure, one image at a time
def gkern(klen, nsig):
    """MASTestFunctions.gkern: a centred delta smoothed by scipy's gaussian_filter, on the diagonal of (3, 3)."""
    delta = np.zeros((klen, klen))
    delta[klen // 2, klen // 2] = 1
    kern = np.zeros((3, 3, klen, klen))
    for c in range(3):
        kern[c, c] = gaussian_filter(delta, nsig)
    return torch.from_numpy(kern)


def make_blur(klen):
    kern = gkern(klen, klen)
    return lambda image: F.conv2d(image, kern, padding=klen // 2)


def probability(model, image, label):
    """model_utils.getPrediction: the softmax probability of the class."""
    with torch.no_grad():
        return float(model(image).softmax(dim=1)[0, label])


def authors_blur(model, image, label, threshold):
    """The callers' kernel: 31 first, 4 larger while the blurred image keeps more than ``threshold`` (1 %)."""
    klen = 31
    blur = make_blur(klen)
    while probability(model, blur(image), label) > threshold:
        klen += 4
        blur = make_blur(klen)
        if klen > 101:
            break
    return blur, klen


def segments():
    """The exact 4 x 4 patches (the code's SLIC at compactness 10000 draws the ViT's patch grid)."""
    rows = torch.arange(SIDE)[:, None] // PATCH
    cols = torch.arange(SIDE)[None, :] // PATCH
    return (rows * GRID + cols).flatten()


def authors_saliency(base_map):
    """MDA(): the base map (3 equal channels) resized to the grid and back (nearest), then each segment's mean of
    the absolute channel sum."""
    saliency_map = base_map.reshape(1, SIDE, SIDE) * torch.ones(3, 1, 1)
    upsize = transforms.Resize((SIDE, SIDE), transforms.InterpolationMode.NEAREST_EXACT)
    downsize = transforms.Resize(int(N ** 0.5))
    segmented = upsize(downsize(saliency_map)).permute(1, 2, 0)
    test = torch.abs(torch.sum(segmented, dim=2)).flatten()
    labels = segments()
    return torch.stack([test[labels == i].mean() for i in range(N)])


def insert(start, finish, segment):
    mask = (segments() == segment).view(SIDE, SIDE)
    start[..., mask] = finish[..., mask]


def candidates_of(order, taken, count):
    selected = []
    for s in order.tolist():
        if s not in taken and len(selected) < count:
            selected.append(s)
    return selected


def authors_insertion(model, image, label, saliency, blur, cutoff=0.9):
    """find_insertion_patches(type=1): greedy insertion onto the blurred image among the first subsearch_len
    unused segments of decreasing saliency, stopping when the normalised probability reaches the cutoff (ties in
    the saliency: a stable sort, the code's torch.argsort leaves them to the sort)."""
    original = probability(model, image, label)
    start, finish = blur(image), image.clone()
    blur_pred = probability(model, start, label)
    order = torch.flip(torch.argsort(saliency, stable=True), dims=(0,))
    chosen = []
    subsearch_len = min(int(N ** 0.5) * 2, 28)

    def one_step(count):
        selected = candidates_of(order, chosen, count)
        responses = []
        for segment in selected:
            trial = start.clone()
            insert(trial, finish, segment)
            responses.append(probability(model, trial, label))
        best = int(np.argmax(responses))  # torch.argmax: the first maximum
        chosen.append(selected[best])
        insert(start, finish, selected[best])
        return (responses[best] - blur_pred) / abs(original - blur_pred) >= cutoff

    for _ in range(N - subsearch_len):
        if one_step(subsearch_len):
            return chosen
    for step in range(subsearch_len):
        if one_step(subsearch_len - step):
            return chosen
    return chosen  # never reached: all patches (the code fails here)


def authors_qp(curve):
    """normalize_curve(type=0): min ||y - curve||^2 with non-negative second differences, the endpoints fixed and
    0 <= y <= 1 (cvxopt's QP in the code; SciPy's SLSQP here, which solves this QP in a step or two without the
    bounds: they are asserted instead, inactive for a falling curve in [0, 1])."""
    n = len(curve)
    second = np.zeros((n - 2, n))
    r = np.arange(n - 2)
    second[r, r], second[r, r + 1], second[r, r + 2] = 1, -2, 1
    ends = np.zeros((2, n))
    ends[0, 0] = ends[1, -1] = 1
    constraints = [{"type": "ineq", "fun": lambda y: second @ y, "jac": lambda y: second},
                   {"type": "eq", "fun": lambda y: ends @ y - curve[[0, -1]], "jac": lambda y: ends}]
    result = minimize(lambda y: np.sum((y - curve) ** 2), np.linspace(curve[0], curve[-1], n),
                      jac=lambda y: 2 * (y - curve), constraints=constraints, method="SLSQP",
                      options={"ftol": 1e-14, "maxiter": 500})
    assert result.success and (result.x >= -1e-12).all() and (result.x <= 1 + 1e-12).all()
    return result.x


def authors_mas(model, image, label, key, mode, substrate_fn, step):
    """MASMetric.single_run's normalized_model_response: pixels in decreasing ``key`` (np.flip of a stable
    argsort: ties to the higher pixel index), ``step`` at a time; clipped, then running max (ins) or min (del)."""
    hw = SIDE * SIDE
    n_steps = (hw + step - 1) // step
    original = probability(model, image, label)
    if mode == "del":
        start, finish = image.clone(), substrate_fn(image)
        reference = probability(model, finish, label)
        response = [original]
    else:
        start, finish = substrate_fn(image), image.clone()
        reference = probability(model, start, label)
        response = [reference]
    salient_order = np.flip(np.argsort(key.reshape(-1, hw), axis=1, kind="stable"), axis=-1)
    for t in range(1, n_steps + 1):
        coords = torch.from_numpy(salient_order[0, step * (t - 1): step * t].copy())
        start.view(3, hw)[:, coords] = finish.view(3, hw)[:, coords]
        response.append(probability(model, start, label))
    normalized, extreme = [], 1.0 if mode == "del" else 0.0
    for value in response:
        value = np.clip((value - reference) / abs(original - reference), 0.0, 1.0)
        extreme = min(extreme, value) if mode == "del" else max(extreme, value)
        normalized.append(extreme)
    return np.array(normalized)


def authors_deletion(model, image, label, saliency, beginning, blur, step, kappa=0.005):
    """find_deletion_patches: the worst insertion order onto black of the segments outside ``beginning`` (which
    go last, reversed), the first map from that curve, the MAS curves of that map's order, and the magnitudes from
    their convex fit.  Returns the order and the three maps (sparse, half, dense), each raw and resized."""
    original = probability(model, image, label)
    start, finish = torch.zeros_like(image), image.clone()
    black_pred = probability(model, start, label)
    order = torch.argsort(saliency, stable=True)
    worst, worst_mr = [-1] * N, [0.0] * N
    length = len(beginning)
    worst[N - length:] = beginning[::-1]
    subsearch_len = min(int(N ** 0.5) * 2, 28)

    def one_step(count, place):
        selected = candidates_of(order, worst, count)
        responses = []
        for segment in selected:
            trial = start.clone()
            insert(trial, finish, segment)
            responses.append(probability(model, trial, label))
        best = int(np.argmin(responses))
        worst[place], worst_mr[place] = selected[best], responses[best]
        insert(start, finish, selected[best])

    for step_ in range(N - subsearch_len - length):
        one_step(subsearch_len, step_)
    subsearch_len_orig = N - length if length > N - subsearch_len else subsearch_len
    for step_ in range(subsearch_len_orig):
        one_step(subsearch_len_orig - step_, step_ + N - subsearch_len_orig - length)
    for place in range(N - length, N):
        insert(start, finish, worst[place])
        worst_mr[place] = probability(model, start, label)

    curve = np.array(worst_mr + [original])[::-1]
    running = 1.0
    for i in range(N + 1):
        running = min(running, np.clip((curve[i] - black_pred) / abs(original - black_pred), 0.0, 1.0))
        curve[i] = running
    fitted = authors_qp(curve)
    best_segment_list = worst[::-1]
    size = PATCH * PATCH
    first_map = [(fitted[i - 1] - fitted[i]) / size + (fitted[i - 1] - fitted[i]) * (N - i) / N
                 for i in range(1, N + 1)]
    # the first map's only use is the order of the MAS curves' pixels: it falls along the searched order
    assert all(a >= b - 1e-12 for a, b in zip(first_map, first_map[1:]))
    place = {segment: i for i, segment in enumerate(best_segment_list)}
    key = np.array([N - place[int(s)] for s in segments()], dtype=np.float64)  # that order, exact ties per patch

    ins = authors_mas(model, image, label, key, "ins", blur, step)
    dele = authors_mas(model, image, label, key, "del", torch.zeros_like, step)
    x_old, x_new = np.linspace(0, 100, len(ins)), np.linspace(0, 100, N + 1)
    ins, dele = np.interp(x_new, x_old, ins), np.interp(x_new, x_old, dele)
    fitted = authors_qp(1 - np.mean([ins, 1 - dele], axis=0))

    sparse, dense = torch.zeros(SIDE * SIDE, dtype=torch.float64), torch.zeros(SIDE * SIDE, dtype=torch.float64)
    for i in range(1, N + 1):
        coords = segments() == best_segment_list[i - 1]
        target_mr = fitted[i - 1] - fitted[i]
        attr_value = 1 / int(coords.sum()) * target_mr + target_mr * (N - i) / N
        sparse[coords] = attr_value
        dense[coords] = (N - i) / N if attr_value >= kappa else attr_value
    dense = dense / dense.max() * sparse.max()
    upsize, downsize = transforms.Resize(SIDE), transforms.Resize(int(np.ceil(np.sqrt(N))))
    maps = {}
    for weight in (0.0, 0.5, 1.0):
        raw = ((1 - weight) * sparse + weight * dense).view(1, SIDE, SIDE) * torch.ones(3, 1, 1)
        maps[weight] = raw[0], upsize(downsize(raw))[0]
    return best_segment_list, maps


def authors_mda(model, image, label, base_map, threshold, step, cutoff):
    """The callers' MDA branch and MDA(): adaptive blur, insertion prefix, deletion order and maps; with the blur's
    kernel size and the prefix's length."""
    blur, klen = authors_blur(model, image, label, threshold)
    saliency = authors_saliency(base_map)
    beginning = authors_insertion(model, image, label, saliency, blur, cutoff)
    order, maps = authors_deletion(model, image, label, saliency, beginning, blur, step)
    return order, maps, klen, len(beginning)


def test_equals_the_authors_procedure(setup):
    """A blur threshold of 0.2235 makes the images stop at different kernels (31, 103); a cutoff of 0.85 puts the
    insertion prefixes at 7, 8, 9 and 16 patches, through every branch of the code's two-loop searches (class 2 of
    image 2 is not the prediction: its prefix takes every patch)."""
    model, x = setup
    options = {"blur_threshold": 0.2235, "cutoff": 0.85}
    base = BeyondIntuition(model)(x, TARGETS)
    method = MDA(model, **options)
    maps = {(weight, upsample): method(x, TARGETS, density=weight, upsample=upsample)
            for weight in (0.0, 0.5, 1.0) for upsample in ("nearest", "antialias")}
    kernels, lengths = set(), set()
    for i, label in enumerate(TARGETS):
        order, theirs, klen, length = authors_mda(model, x[i:i + 1], label, base[i, 0], 0.2235, SIDE, 0.85)
        kernels.add(klen)
        lengths.add(length)
        for weight in (0.0, 0.5, 1.0):
            raw, resized = theirs[weight]
            torch.testing.assert_close(maps[weight, "nearest"][i, 0], raw, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(maps[weight, "antialias"][i, 0], resized, rtol=1e-9, atol=1e-12)
        values = maps[0.0, "nearest"][i, 0, ::PATCH, ::PATCH].flatten()[order]
        assert (values[:-1] >= values[1:] - 1e-12).all()  # the magnitudes keep the searched order
    assert kernels == {31, 103} and lengths == {7, 8, 9, 16}, (kernels, lengths)


def tiny_rows(model, x, targets, subsearch=None):
    """The searched order (B, n) of the implementation's pieces, with the blur kernel of 31."""
    method = MDA(model)
    target = resolve_target(targets, x.shape[0], x.device, "softmax")
    labels = grid_labels(SIDE, SIDE, (GRID, GRID), x.device)
    rows = Rows(method, x, labels, N, target, None)
    base = BeyondIntuition(model)(x, targets)
    saliency = F.interpolate(base, size=(GRID, GRID), mode="bilinear", antialias=True).abs().flatten(1)
    blurred = gaussian_blur(x, 31, 31.0, padding="zeros", reflect_kernel=True)
    with torch.no_grad():
        own, blur_score = rows.images(x), rows.images(blurred)
        sub = min(2 * int(N ** 0.5), 28) if subsearch is None else subsearch
        prefix, length = insertion_search(rows, saliency, blurred, own, blur_score, sub, 0.9)
        worst = deletion_search(rows, saliency, torch.zeros_like(x), prefix, length, sub)
    return patch_order(prefix, length, worst)


def test_magnitudes_keep_the_searched_order(setup):
    """Sparse, half and dense maps fall (weakly) along the searched order; the drops of the convex fit shrink."""
    model, x = setup
    order = tiny_rows(model, x, TARGETS)
    assert all(sorted(row.tolist()) == list(range(N)) for row in order)
    for density in (0.0, 0.5, 1.0):
        maps = MDA(model, blur=31, density=density, upsample="nearest")(x, TARGETS)
        values = maps[:, 0, ::PATCH, ::PATCH].flatten(1).gather(1, order)
        assert (values[:, :-1] >= values[:, 1:] - 1e-12).all()
        assert (values >= 0).all() and (values.amax(dim=1) > 0).all()
    # on falling curves of any shape (flat stretches included), the fitted magnitudes never rise
    generator = torch.Generator().manual_seed(3)
    steps = torch.rand(8, 40, dtype=torch.float64, generator=generator) ** 3
    steps[torch.rand(8, 40, generator=generator) < 0.3] = 0
    curves = 1 - torch.cat([steps.new_zeros(8, 1), steps.cumsum(1)], dim=1) / steps.sum(1, keepdim=True)
    curves = (curves.clamp(min=0.3) - 0.3) / 0.7
    for density in (0.0, 1.0):
        values = magnitudes(convex_fit(curves), torch.full((40,), 16.0, dtype=torch.float64), 0.005, density)
        assert (values[:, :-1] >= values[:, 1:] - 1e-12).all()


def test_convex_fit_is_the_authors_quadratic_program():
    generator = torch.Generator().manual_seed(0)
    steps = torch.rand(5, 30, dtype=torch.float64, generator=generator) ** 3
    steps[torch.rand(5, 30, generator=generator) < 0.3] = 0
    curves = 1 - torch.cat([steps.new_zeros(5, 1), steps.cumsum(1)], dim=1) / steps.sum(1, keepdim=True)
    curves = (curves.clamp(min=0.2) - 0.2) / 0.8 * torch.rand(5, 1, dtype=torch.float64, generator=generator)
    curves[:, 0] = 1.0
    ours = convex_fit(curves)
    for curve, fit in zip(curves, ours):
        torch.testing.assert_close(fit, torch.from_numpy(authors_qp(curve.numpy())), rtol=0, atol=1e-12)
        assert (fit[:-2] - 2 * fit[1:-1] + fit[2:] >= -1e-12).all()
    already = torch.linspace(1, 0, 12, dtype=torch.float64)[None] ** 2  # convex already: unchanged
    torch.testing.assert_close(convex_fit(already), already)


# ------------------------------------------------------------------------- closed form: a patch-additive model
class PatchLinear(nn.Module):
    """Two classes, class 0's logit ``<W, x>`` (a noise pattern ``W``), class 1's 0: inserting patches adds their
    contributions ``<W_p, x_p - s_p>`` to the logit, so every greedy step is a sort.  No patch size: a CNN-like model
    for MDA, which needs ``grid``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, SIDE, SIDE, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(4)) * 0.02)

    def forward(self, x):
        logit = (x * self.weight).flatten(1).sum(1)
        return torch.stack([logit, torch.zeros_like(logit)], dim=1)


def test_additive_model_orders_are_sorts():
    """With every patch a candidate (``subsearch=N``): the insertion prefix is the patches by decreasing
    contribution over the blurred image until the cutoff, then the rest by decreasing contribution over black."""
    model = PatchLinear()
    x = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = x + 0.3 * model.weight.detach().sign()  # class 0 at about 0.97
    labels = segments()
    blurred = gaussian_blur(x, 31, 31.0, padding="zeros", reflect_kernel=True)
    order = tiny_rows_additive(model, x, blurred)
    for i in range(2):
        per_patch = lambda image: torch.stack([(image * model.weight).detach().flatten(1)[:, labels == p].sum()
                                               for p in range(N)])
        over_blur, over_black = per_patch(x[i] - blurred[i]), per_patch(x[i])
        prefix = over_blur.argsort(descending=True)
        start = float((blurred[i] * model.weight.detach()).sum())
        top, blur_prob = float((x[i] * model.weight.detach()).sum()), torch.sigmoid(torch.tensor(start))
        spread = abs(float(torch.sigmoid(torch.tensor(top))) - float(blur_prob))
        reached = (torch.sigmoid(start + over_blur[prefix].cumsum(0)) - blur_prob) / spread >= 0.9
        length = int(reached.nonzero()[0, 0]) + 1
        rest = [p for p in over_black.argsort(descending=True).tolist() if p not in prefix[:length].tolist()]
        assert order[i].tolist() == prefix[:length].tolist() + rest
        assert 1 < length < N
    maps = MDA(model, "vanilla_gradient", grid=GRID, subsearch=N, blur=31, upsample="nearest")(x, 0)
    values = maps[:, 0, ::PATCH, ::PATCH].flatten(1).gather(1, order)
    assert (values[:, :-1] >= values[:, 1:] - 1e-12).all() and (values[:, 0] > 0).all()


def tiny_rows_additive(model, x, blurred):
    method = MDA(model, "vanilla_gradient")
    target = resolve_target(0, x.shape[0], x.device, "softmax")
    rows = Rows(method, x, grid_labels(SIDE, SIDE, (GRID, GRID), x.device), N, target, None)
    saliency = torch.rand(x.shape[0], N, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        own, blur_score = rows.images(x), rows.images(blurred)
        prefix, length = insertion_search(rows, saliency, blurred, own, blur_score, N, 0.9)
        worst = deletion_search(rows, saliency, torch.zeros_like(x), prefix, length, N)
    return patch_order(prefix, length, worst)


# ------------------------------------------------------------------------------- the metrics MDA optimises
def test_metrics_no_worse_than_the_base_attribution(setup):
    """Insertion onto the blurred image (higher is better) and deletion onto black (lower is better) of MDA's map
    against the Bi-Attn map it starts from, for the predicted class: per patch, MDA's patch map against the base's
    patch saliency (the order the searches start from); per pixel, the default (resized) maps."""
    model, x = setup
    blurred = gaussian_blur(x, 31, 31.0, padding="zeros", reflect_kernel=True)
    base = BeyondIntuition(model)(x)
    patches = F.interpolate(base, size=(GRID, GRID), mode="bilinear", antialias=True).abs()
    pairs = {"patch": (MDA(model, blur=31, upsample="nearest")(x), F.interpolate(patches, size=(SIDE, SIDE))),
             "pixel": (MDA(model, blur=31)(x), base)}
    for level, maps in pairs.items():
        step = PATCH * PATCH if level == "patch" else 1
        ins = [insertion(model, x, m, None, step=step, substrate=blurred).auc for m in maps]
        dele = [deletion(model, x, m, None, step=step).auc for m in maps]
        assert (dele[0] < dele[1]).all(), level
        if level == "patch":
            assert (ins[0] > ins[1]).all()
        else:
            assert (ins[0] - dele[0] > ins[1] - dele[1]).all() and ins[0].mean() > ins[1].mean()


# -------------------------------------------------------------------------------------- defaults and cost
def test_defaults_are_the_authors():
    """MDAFunctions.MDA and its callers: Bi-Attn (20 steps, from the fourth block) as the base, cutoff 0.9, the
    adaptive gkern(31..103) blur at 1 %, black for deletion, 224-pixel steps at 224 x 224, kappa 0.005, the sparse
    map ("MDA"), torchvision's antialiased Resize round trip, the softmax probability."""
    assert MDA.defaults == {"grid": None, "subsearch": None, "cutoff": 0.9, "blur": "adaptive",
                            "blur_threshold": 0.01, "baseline": "zero", "step": None, "kappa": 0.005, "density": 0.0,
                            "upsample": "antialias", "base_options": None, "score": "softmax"}
    method = MDA(tiny_vit())
    assert type(method.base) is BeyondIntuition
    assert {key: method.base.defaults[key] for key in ("steps", "start_block", "baseline")} == \
        {"steps": 20, "start_block": 3, "baseline": "zero"}


def test_forward_count_with_one_candidate(setup):
    """``subsearch=1``: the two searches together insert every patch once (n forwards), plus Bi-Attn's steps, the
    image, black, the blur, and two curves of ``H W / step`` forwards."""
    model, x = setup
    counter = RowCounter(model)
    try:
        MDA(model, subsearch=1, blur=31, step=64, base_options={"steps": 2})(x[:2], [1, 2])
    finally:
        counter.close()
    assert sum(counter.rows) == 2 * (2 + 2 + 1 + N + 2 * (SIDE * SIDE // 64))


# --------------------------------------------------------------------------------------- batching and graph
def test_batch_independence(setup):
    model, x = setup
    method = MDA(model, blur_threshold=0.2235, subsearch=3, base_options={"steps": 4})
    together = method(x, TARGETS, batch_size=5)
    for i, label in enumerate(TARGETS):
        torch.testing.assert_close(method(x[i:i + 1], label, batch_size=2), together[i:i + 1])
    torch.testing.assert_close(method(x, TARGETS), together)


def test_create_graph_matches_finite_differences(setup):
    model, x = setup
    method = MDA(model, blur=31, subsearch=2, step=64, base_options={"steps": 2}, density=0.5)
    value = lambda create_graph: method(x[:2], [1, 1], create_graph=create_graph)
    check_parameter_derivative(value, model, ["head.weight", "blocks.3.mlp.fc2.weight"], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(value(True).detach(), value(False))


def test_float32_and_a_cnn_with_a_base_of_its_own():
    model = tiny_vit(depth=4)
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    out = MDA(model, subsearch=2, base_options={"steps": 2})(x)
    assert out.dtype == torch.float32 and out.shape == (2, 1, SIDE, SIDE) and (out >= 0).all()
    cnn = tiny_cnn()
    out = create("mda", cnn, base_method="grad_cam", grid=4, subsearch=2)(x, [0, 3])
    assert out.shape == (2, 1, SIDE, SIDE) and (out.flatten(1).amax(1) > 0).all()


def test_bad_options_are_named(setup):
    model, x = setup
    method = MDA(model)
    cases = [({"grid": 0}, ValueError, "grid must be None, a positive int or a pair of them, got 0"),
             ({"grid": 17}, ValueError, "grid \\(17, 17\\) must fit"),
             ({"grid": (4, 0)}, ValueError, "grid must be a positive int, got 0"),
             ({"subsearch": 0}, ValueError, "subsearch must be a positive int, got 0"),
             ({"cutoff": 0}, ValueError, "cutoff must be a number in \\(0, 1\\], got 0"),
             ({"cutoff": 1.5}, ValueError, "cutoff must be a number in \\(0, 1\\], got 1.5"),
             ({"density": -0.1}, ValueError, "density must be a number in \\[0, 1\\], got -0.1"),
             ({"kappa": float("nan")}, ValueError, "kappa must be a finite number"),
             ({"blur": 30}, ValueError, "blur must be 'adaptive' or an odd positive kernel size, got 30"),
             ({"blur": "gauss"}, ValueError, "blur must be 'adaptive' .*'gauss'"),
             ({"blur_threshold": "1%"}, ValueError, "blur_threshold must be a finite number"),
             ({"step": 0}, ValueError, "step must be a positive int, got 0"),
             ({"upsample": "bicubic"}, ValueError, "upsample must be one of .*'bicubic'"),
             ({"baseline": "grey"}, ValueError, "baseline must be"),
             ({"base_options": {"steps": 1}}, ValueError, "steps must be an int >= 2 .*got 1"),
             ({"base_options": {"batch_size": 2}}, ValueError, "base_options may not set \\['batch_size'\\]"),
             ({"base_options": {"stepz": 3}}, TypeError, "base_options: .*unknown option 'stepz'"),
             ({"base_options": [1]}, TypeError, "base_options must be a dict")]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            method(x[:1], 1, **options)
    with pytest.raises(TypeError, match="base_method must be a Explainer class or registry name"):
        MDA(model, base_method=3)
    with pytest.raises(KeyError, match="no attribution method named 'bi_attn'"):
        MDA(model, base_method="bi_attn")
