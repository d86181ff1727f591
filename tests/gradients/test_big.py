"""BIG (boundary-based Integrated Gradients): equal to its algorithm written out one image at a time, the closed form
on a linear model, the boundary point chosen (closest successful attack), attacks that cannot reach their radius run
once, defaults, batch independence, differentiability and option errors."""
from __future__ import annotations

import pytest
import torch

from attribution import create
from attribution.gradients.big import EPSILONS, BoundaryIG
from conftest import LinearModel, RowCounter, cam_cnn, central_difference, tiny_cnn


def big_written_out(model, image, label, epsilons, attack_steps, alpha, steps, bounds=None, score="softmax"):
    """One image (1, C, H, W): per radius, attack_steps signed steps down the gradient of the label's score kept in
    the radius' box around the image (and in bounds); the end points no longer predicted as the label are the
    candidates, the nearest (L2; the first on ties) is the baseline, the first radius' end point when there is none;
    then IG from the baseline with Captum's riemann_trapezoid points and weights (1/steps, the two ends halved),
    rescaled by steps / (steps - 1) to the composite trapezoid rule.  Returns the map and the radius index chosen."""
    def score_of(point):
        out = model(point)
        return (out.softmax(-1) if score == "softmax" else out)[0, label]

    ends, succeeded = [], []
    for eps in epsilons:
        point = image.clone()
        for _ in range(attack_steps):
            point = point.detach().requires_grad_(True)
            grad = torch.autograd.grad(score_of(point), point)[0]
            moved = point.detach() - alpha * grad.sign()
            point = image + (moved - image).clamp(-eps, eps)
            if bounds is not None:
                point = point.clamp(*bounds)
        ends.append(point.detach())
        with torch.no_grad():
            succeeded.append(model(point).argmax(-1).item() != label)
    chosen, best = 0, None
    for i, (end, ok) in enumerate(zip(ends, succeeded)):
        distance = (end - image).norm().item()
        if ok and (best is None or distance < best):
            chosen, best = i, distance
    baseline = ends[chosen]
    total = torch.zeros_like(image)
    for k in range(steps):
        a = k / (steps - 1)
        w = (0.5 if k in (0, steps - 1) else 1.0) / steps
        point = (baseline + a * (image - baseline)).requires_grad_(True)
        total += w * torch.autograd.grad(score_of(point), point)[0]
    return (image - baseline) * total * steps / (steps - 1), chosen


@pytest.mark.parametrize("bounded", [False, True])
def test_big_equals_its_algorithm_written_out(bounded):
    """cam_cnn, 6 images, float64, 5 rows per pass: radii given out of order, two of them past the attack's
    reach (one attack); the images choose different radii, the closest successful rather than the first (the
    original code's choice)."""
    model = cam_cnn().double()
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64) if bounded else torch.randn(6, 3, 16, 16, dtype=torch.float64)
    bounds = (0.0, 1.0) if bounded else None
    labels = model(x).argmax(1).tolist()
    epsilons, attack_steps, alpha, steps = (0.3, 0.04, 2.0, 0.02, 0.1), 6, 0.02, 5  # reach 0.12
    counter = RowCounter(model)
    ours = BoundaryIG(model, epsilons=epsilons, attack_steps=attack_steps, step_size=alpha, steps=steps,
                      bounds=bounds)(x, labels, batch_size=5)
    counter.handle.remove()
    chosen = []
    for i, label in enumerate(labels):
        expected, radius = big_written_out(model, x[i:i + 1], label, epsilons, attack_steps, alpha, steps, bounds)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)
        chosen.append(radius)
    assert len(set(chosen)) >= (2 if bounded else 3) and any(c > 0 for c in chosen), chosen
    assert sum(counter.rows) == 6 * 4 * (attack_steps + 1) + 6 * steps  # 0.02, 0.04, 0.1 and one for 0.3 and 2.0


def test_images_outside_the_bounds_run_every_radius():
    """Normalised images (outside [0, 1]) with bounds=(0, 1): clipping moves a point further than the attack's
    steps, so radii past the attack's reach are no longer one attack; each image equals its algorithm written out
    (the merged attacks differed by ~9 % of the map)."""
    model = cam_cnn().double()
    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    labels = model(x).argmax(1).tolist()
    epsilons, attack_steps, alpha, steps = (2.0, 0.3), 6, 0.02, 4  # reach 0.12: both past it
    counter = RowCounter(model)
    ours = BoundaryIG(model, epsilons=epsilons, attack_steps=attack_steps, step_size=alpha, steps=steps,
                      bounds=(0.0, 1.0))(x, labels)
    counter.handle.remove()
    assert sum(counter.rows) == 4 * 2 * (attack_steps + 1) + 4 * steps  # two attacks per image
    for i, label in enumerate(labels):
        expected, _ = big_written_out(model, x[i:i + 1], label, epsilons, attack_steps, alpha, steps, (0.0, 1.0))
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)


def test_closed_form_on_a_linear_model():
    """f = W x + c, logits: the gradient is w_t, so every attack ends at x - min(n alpha, e) sign(w_t) and IG from
    there is exact: A = min(n alpha, e*) |w_t|, e* the smallest radius whose end point leaves the label (the first
    radius when none does), and sum A = f_t(x) - f_t(b)."""
    model = LinearModel().double()
    torch.manual_seed(3)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    weight, bias = model.linear.weight.detach(), model.linear.bias.detach()
    labels = (x.flatten(1) @ weight.T + bias).argmax(1).tolist()
    x[5] += weight[labels[5]].view(3, 8, 8).sign()  # far from the boundary: no attack succeeds
    epsilons, attack_steps, alpha = (0.1, 0.4, 0.2, 0.05), 8, 0.04  # reach 0.32: 0.4 moves 0.32
    ours = BoundaryIG(model, score="logit", epsilons=epsilons, attack_steps=attack_steps, step_size=alpha,
                      steps=3)(x, labels)
    picked, failed = [], 0
    for i, t in enumerate(labels):
        w = weight[t].view(3, 8, 8)
        moves = [min(attack_steps * alpha, e) for e in epsilons]
        ok = [(((x[i] - m * w.sign()).flatten() @ weight.T + bias).argmax().item() != t) for m in moves]
        move = min((m for m, s in zip(moves, ok) if s), default=moves[0])
        picked.append(move)
        failed += not any(ok)
        torch.testing.assert_close(ours[i], move * w.abs(), rtol=1e-9, atol=1e-12)
        change = move * w.abs().sum()  # f_t(x) - f_t(x - move sign(w_t))
        torch.testing.assert_close(ours[i].sum(), change, rtol=1e-9, atol=1e-12)
    assert len(set(picked)) >= 3 and failed == 1, picked


def test_attacks_that_cannot_reach_their_radius_run_once():
    """The default radii are all at least 50 x 0.001: one attack (50 forwards and backwards), one forward to check
    it, then the IG points; the map is that of any single one of those radii."""
    model = tiny_cnn()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    counter = RowCounter(model)
    ours = BoundaryIG(model, steps=4)(x, [0, 1], batch_size=10)
    counter.handle.remove()
    assert counter.rows == [2] * 51 + [8]
    torch.testing.assert_close(ours, BoundaryIG(model, steps=4, epsilons=1.1)(x, [0, 1]))
    torch.testing.assert_close(ours, BoundaryIG(model, steps=4, epsilons=[36 / 255])(x, [0, 1]))


def test_defaults_are_the_authors():
    """saliency_zoo.big (github.com/LMBTough/LA): epsilons [36, 64, 0.3*255, ..., 1.1*255] / 255 in FGSM, 50 steps
    of alpha = 0.001, gradient_steps = 50 with riemann_trapezoid; a softmax on the model (generate_attributions)."""
    assert EPSILONS == tuple(e / 255 for e in [36, 64, 0.3 * 255, 0.5 * 255, 0.7 * 255, 0.9 * 255, 1.1 * 255])
    assert BoundaryIG.defaults == {"score": "softmax", "steps": 50, "method": "trapezoid", "epsilons": EPSILONS,
                                   "attack_steps": 50, "step_size": 0.001, "bounds": None}
    assert isinstance(create("big", tiny_cnn()), BoundaryIG)


def test_batch_and_batch_size_independence():
    model = tiny_cnn()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 16, 16)
    options = dict(epsilons=(0.05, 0.5), attack_steps=4, step_size=0.1, steps=4)
    reference = BoundaryIG(model, **options)(x, [3, 1, 4], batch_size=1)
    torch.testing.assert_close(BoundaryIG(model, **options)(x, [3, 1, 4], batch_size=4), reference,
                               rtol=1e-4, atol=1e-7)
    for i, t in enumerate([3, 1, 4]):
        torch.testing.assert_close(BoundaryIG(model, **options)(x[i:i + 1], t), reference[i:i + 1],
                                   rtol=1e-4, atol=1e-7)


def test_create_graph_gives_a_map_differentiable_wrt_the_parameters():
    model = tiny_cnn()
    torch.manual_seed(6)
    x = torch.randn(2, 3, 16, 16)
    options = dict(epsilons=0.3, attack_steps=3, step_size=0.1, steps=3)
    out = BoundaryIG(model, **options)(x, [0, 1], create_graph=True)
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(out.detach(), BoundaryIG(model, **options)(x, [0, 1]))
    # the derivative itself (float64): the attack's signed steps are constant almost everywhere, so the baseline
    # is; the IG points carry the graph
    model = model.double()
    x = x.double()
    weight = model[4].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    explainer = BoundaryIG(model, **options)
    (grad,) = torch.autograd.grad(explainer(x, [0, 1], create_graph=True).sum(), weight)
    numeric = central_difference(lambda: explainer(x, [0, 1]).sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"steps": 1}, "the trapezoid rule needs steps >= 2"),
    ({"method": "simpson"}, "method must be one of"),
    ({"epsilons": []}, "epsilons must be a positive number or a non-empty list or tuple"),
    ({"epsilons": torch.tensor([0.1, 0.2])}, "epsilons must be a positive number or a non-empty list or tuple"),
    ({"epsilons": [0.1, -0.2]}, "epsilons must be a positive number"),
    ({"epsilons": [0.1, True]}, "epsilons must be a positive number"),
    ({"epsilons": "0.1"}, "epsilons must be a positive number"),
    ({"attack_steps": 0}, "attack_steps must be a positive int"),
    ({"attack_steps": 2.0}, "attack_steps must be a positive int"),
    ({"step_size": 0}, "step_size must be a positive number"),
    ({"bounds": (1, 0)}, r"bounds must be None or a pair \(low, high\)"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        BoundaryIG(tiny_cnn(), **{"steps": 3, "attack_steps": 2, **options})(torch.randn(2, 3, 16, 16), [0, 1])


def test_refuses_a_callable_target():
    with pytest.raises(ValueError, match="BIG's attacks .* needs class indices as the target, not a callable"):
        BoundaryIG(tiny_cnn(), attack_steps=2, steps=3)(torch.randn(2, 3, 16, 16), lambda s: s[:, 0])
