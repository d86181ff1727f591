"""MFABA and AGI: equal to the authors' algorithms written out one image at a time, closed forms on a linear model,
batch independence, class sampling, option errors and differentiability w.r.t. the parameters."""
from __future__ import annotations

import pytest
import torch

from attribution.gradients.agi import AGI, false_classes
from attribution.gradients.mfaba import MFABA
from conftest import LinearModel, RowCounter, cam_cnn, tiny_cnn


def clipped(t: torch.Tensor, bounds) -> torch.Tensor:
    return t if bounds is None else t.clamp(*bounds)


# ----------------------------------------------------------------------------------------- the algorithms, plainly
def mfaba_written_out(model, image, label, steps=50, alpha=0.001, use_sign=False, epsilon=0.3, bounds=None):
    """The authors' FGSMGrad (softmax score, early stop) and MFABA sum for one image (1, C, H, W): the points and
    gradients are listed, the step after a point whose arg-max left the label is the last, and the sum pairs each
    step with the gradient at its start (the gradient at the last point is computed and dropped, as there)."""
    def gradient(point):
        point = point.detach().requires_grad_(True)
        return torch.autograd.grad(model(point).softmax(-1)[0, label], point)[0]

    point, points, grads = image.clone(), [image.clone()], []
    for _ in range(steps):
        g = gradient(point)
        grads.append(g)
        if use_sign:
            moved = point - alpha * g.sign()
            point = clipped(image + (moved - image).clamp(-epsilon, epsilon), bounds)
        else:
            point = clipped(point - alpha * 100 * g / g.norm(), bounds)
        points.append(point.clone())
        with torch.no_grad():
            if model(point).argmax(-1).item() != label:
                break
    grads.append(gradient(point))
    points, grads = torch.cat(points), torch.cat(grads)
    return -((points[1:] - points[:-1]) * grads[:-1]).sum(0, keepdim=True)


def agi_written_out(model, image, label, epsilon=0.05, max_iter=20, topk=20, walk=False, bounds=None):
    """The authors' AGI for one image: false classes range(0, K - 1, K // topk) without the label, for each a
    loop that breaks once the class is predicted, else steps by epsilon * sign(grad p_l) from the image (or, with
    walk, from the current point) and adds -grad p_label * (new point - origin)."""
    num_classes = model(image).shape[1]
    total = torch.zeros_like(image)
    for false in range(0, num_classes - 1, num_classes // topk):
        if false == label:
            continue
        point = image.clone()
        for _ in range(max_iter):
            point = point.detach().requires_grad_(True)
            out = model(point)
            if out.argmax(1).item() == false:
                break
            probs = out.softmax(1)
            g_false = torch.autograd.grad(probs[0, false], point, retain_graph=True)[0]
            g_label = torch.autograd.grad(probs[0, label], point)[0]
            origin = point.detach() if walk else image
            new = clipped(origin + epsilon * g_false.sign(), bounds)
            total = total - g_label * (new - origin)
            point = new
    return total


# ------------------------------------------------------------------------------------------------------- MFABA
@pytest.mark.parametrize("variant", ["sharp", "smooth"])
@pytest.mark.parametrize("bounded", [False, True])
def test_mfaba_equals_the_authors_algorithm(variant, bounded):
    """tiny_cnn, four images, float64, 3 rows per pass: the paths stop at the boundary after different numbers of
    steps (the rows evaluated show it), the one whose target is not the predicted class after its first step."""
    model = tiny_cnn(classes=10).double()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64) if bounded else torch.randn(4, 3, 16, 16, dtype=torch.float64)
    bounds = (0.0, 1.0) if bounded else None
    labels = model(x).argmax(1).tolist()
    labels[3] = (labels[3] + 1) % 10  # a target the image is not predicted as: one step, then the stop
    alpha = 0.001 if variant == "sharp" else 0.01
    counter = RowCounter(model)
    ours = MFABA(model, variant=variant, step_size=alpha * 100 if variant == "sharp" else alpha,
                 epsilon=0.05, bounds=bounds)(x, labels, batch_size=3)
    counter.handle.remove()
    for i, label in enumerate(labels):
        expected = mfaba_written_out(model, x[i:i + 1], label, alpha=alpha, use_sign=variant == "smooth",
                                     epsilon=0.05, bounds=bounds)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0
    assert sum(counter.rows) < 4 * 50  # the rows per pass shrink as the paths stop


def linear_logits_along(model: LinearModel, points: torch.Tensor) -> torch.Tensor:
    return points.reshape(-1, model.linear.in_features) @ model.linear.weight.detach().T + model.linear.bias.detach()


def test_mfaba_sharp_closed_form_on_a_linear_model():
    """f = W x + c, logits: the path is the straight line p_k = x - k s u, u = w_t / |w_t|, so A = n s w_t^2 / |w_t|
    and sum A = f_t(x) - f_t(p_n) = n s |w_t|, n the first k >= 1 with arg max f(p_k) != t (at most steps)."""
    model = LinearModel().double()
    torch.manual_seed(3)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    labels = linear_logits_along(model, x).argmax(1).tolist()
    labels[0] = (labels[0] + 1) % 4
    size, steps = 0.05, 30
    ours = MFABA(model, score="logit", step_size=size, steps=steps)(x, labels)
    counts = []
    for i, t in enumerate(labels):
        w = model.linear.weight.detach()[t].view(3, 8, 8)
        u = w / w.norm()
        n = next((k for k in range(1, steps) if linear_logits_along(model, x[i] - k * size * u).argmax().item() != t),
                 steps)
        counts.append(n)
        torch.testing.assert_close(ours[i], n * size * w * u, rtol=1e-9, atol=1e-12)
        change = (linear_logits_along(model, x[i:i + 1]) - linear_logits_along(model, x[i] - n * size * u))[0, t]
        torch.testing.assert_close(ours[i].sum(), change, rtol=1e-9, atol=1e-12)
    assert counts[0] == 1 and len(set(counts)) >= 3 and steps in counts, counts


def test_mfaba_smooth_closed_form_on_a_linear_model():
    """Signed steps of alpha inside the epsilon box: feature i moves by min(k alpha, epsilon) sign(w_ti), so
    A = |w_t| * min(n alpha, epsilon) with n the steps taken."""
    model = LinearModel().double()
    torch.manual_seed(4)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    labels = linear_logits_along(model, x).argmax(1).tolist()
    alpha, epsilon, steps = 0.02, 0.07, 12
    ours = MFABA(model, score="logit", variant="smooth", step_size=alpha, epsilon=epsilon, steps=steps)(x, labels)
    counts = []
    for i, t in enumerate(labels):
        w = model.linear.weight.detach()[t].view(3, 8, 8)
        n = next((k for k in range(1, steps) if linear_logits_along(
            model, x[i] - min(k * alpha, epsilon) * w.sign()).argmax().item() != t), steps)
        counts.append(n)
        torch.testing.assert_close(ours[i], w.abs() * min(n * alpha, epsilon), rtol=1e-9, atol=1e-12)
    assert steps in counts and min(counts) * alpha < epsilon, counts  # some paths capped, some inside the box


def test_mfaba_without_early_stop_takes_every_step_and_accepts_a_callable():
    model = tiny_cnn()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 16, 16)
    counter = RowCounter(model)
    by_class = MFABA(model, steps=7, early_stop=False)(x, [0, 1, 2])
    counter.handle.remove()
    assert counter.rows == [3] * 7
    classes = torch.tensor([0, 1, 2])
    by_callable = MFABA(model, steps=7, early_stop=False)(x, lambda s, owner: s.gather(1, classes[owner, None])[:, 0])
    torch.testing.assert_close(by_callable, by_class)
    with pytest.raises(ValueError, match="needs class indices.*early_stop=False"):
        MFABA(model, steps=7)(x, lambda s: s[:, 0])


# --------------------------------------------------------------------------------------------------------- AGI
@pytest.mark.parametrize("walk", [False, True])
@pytest.mark.parametrize("bounded", [False, True])
def test_agi_equals_the_authors_algorithm(walk, bounded):
    """cam_cnn (10 classes), topk=5: false classes 0, 2, 4, 6, 8 as the code's range(0, 9, 2); some paths reach
    their class before max_iter (checked by the rows evaluated)."""
    model = cam_cnn().double()
    torch.manual_seed(1)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64) if bounded else torch.randn(3, 3, 16, 16, dtype=torch.float64)
    bounds = (0.0, 1.0) if bounded else None
    labels = model(x).argmax(1).tolist()
    labels[2] = 4 if labels[2] != 4 else 6  # a false class that is the predicted one: its path stops at once
    options = dict(epsilon=0.2, max_iter=6, topk=5)
    counter = RowCounter(model)
    ours = AGI(model, walk=walk, bounds=bounds, **options)(x, labels, batch_size=4)
    counter.handle.remove()
    for i, label in enumerate(labels):
        expected = agi_written_out(model, x[i:i + 1], label, walk=walk, bounds=bounds, **options)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0
    walkers = sum(len([c for c in range(0, 10, 2) if c != label]) for label in labels)
    assert sum(counter.rows) < 1 + walkers * 6  # one forward of one image, then fewer rows than every path's 6


@pytest.mark.parametrize("walk", [False, True])
def test_agi_closed_form_on_a_linear_model(walk):
    """f = W x + c, logits: every gradient is constant, so every step is epsilon sign(w_j) (from the image: the
    same point each time; chained: p_k = x + k epsilon sign(w_j)) and adds -epsilon w_t sign(w_j):
    A = sum_j n_j (-epsilon w_t sign(w_j)), n_j the first k with arg max f(p_k) = j (at most max_iter)."""
    model = LinearModel().double()
    torch.manual_seed(5)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    labels = linear_logits_along(model, x).argmax(1).tolist()
    labels[3] = (labels[3] + 1) % 4  # the predicted class is then a false class: its path stops at p_0 (n = 0)
    epsilon, max_iter = 0.05, 8
    ours = AGI(model, score="logit", epsilon=epsilon, max_iter=max_iter, topk=4, walk=walk)(x, labels)
    weight = model.linear.weight.detach().view(4, 3, 8, 8)
    counts = []
    for i, t in enumerate(labels):
        expected = torch.zeros_like(x[i])
        for j in (c for c in range(4) if c != t):
            direction = weight[j].sign()
            n = next((k for k in range(max_iter) if linear_logits_along(
                model, x[i] + (k if walk else min(k, 1)) * epsilon * direction).argmax().item() == j), max_iter)
            counts.append(n)
            expected -= n * epsilon * weight[t] * direction
        torch.testing.assert_close(ours[i], expected, rtol=1e-9, atol=1e-12)
    assert 0 in counts and len(set(counts)) >= 3, counts


def test_agi_spaced_classes_are_the_codes_for_imagenet():
    """1000 classes, topk 20: 0, 50, ..., 950, the code's range(0, 999, 50); exactly topk classes otherwise."""
    classes = torch.tensor([50, 3])
    spaced = false_classes(classes, 1000, 20, "spaced", None)
    assert spaced.tolist() == [list(range(0, 999, 50))] * 2
    assert false_classes(classes, 1000, 30, "spaced", None).shape == (2, 30)


def test_agi_random_classes_skip_the_target_and_are_shared_by_the_images():
    classes = torch.tensor([0, 5, 9, 5])
    draws = false_classes(classes, 10, 9, "random", torch.Generator().manual_seed(0))
    for row, t in zip(draws.tolist(), classes.tolist()):
        assert sorted(row) == [c for c in range(10) if c != t]  # all 9 others, once each
    some = false_classes(classes, 10, 3, "random", torch.Generator().manual_seed(0))
    assert (some != classes[:, None]).all() and some.unique(dim=1).shape[1] == 3
    torch.testing.assert_close(some[1], some[3])  # one draw shared by the images of the call
    model = cam_cnn()
    torch.manual_seed(6)
    x = torch.randn(3, 3, 16, 16)
    options = dict(sampling="random", topk=3, max_iter=2)
    batch = AGI(model, **options)(x, [1, 2, 3], generator=torch.Generator().manual_seed(7))
    for i, t in enumerate([1, 2, 3]):
        alone = AGI(model, **options)(x[i:i + 1], t, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-7)
    other = AGI(model, **options)(x, [1, 2, 3], generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(batch, other)


def test_agi_explicit_classes_and_the_cost():
    """A list of classes is used as given (the target skipped); with an epsilon too small to reach any class,
    every path runs max_iter steps: one forward of one image, then walkers * max_iter rows."""
    model = cam_cnn()
    torch.manual_seed(7)
    x = torch.randn(2, 3, 16, 16)
    counter = RowCounter(model)
    ours = AGI(model, sampling=[1, 3, 5], max_iter=4, epsilon=1e-6)(x, [3, 0], batch_size=100)
    counter.handle.remove()
    assert counter.rows == [1] + [5] * 4  # image 0: classes 1 and 5, image 1: 1, 3 and 5
    assert torch.isfinite(ours).all() and ours.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- both methods
METHODS = {
    "mfaba": (MFABA, {"steps": 6, "step_size": 0.5}),
    "agi": (AGI, {"topk": 3, "max_iter": 3, "epsilon": 0.2}),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_and_batch_size_independence(name):
    cls, options = METHODS[name]
    model = tiny_cnn()
    torch.manual_seed(8)
    x = torch.randn(3, 3, 16, 16)
    reference = cls(model, **options)(x, [3, 1, 4], batch_size=1)
    for batch_size in (2, None):
        torch.testing.assert_close(cls(model, **options)(x, [3, 1, 4], batch_size=batch_size), reference,
                                   rtol=1e-4, atol=1e-7)
    for i, t in enumerate([3, 1, 4]):
        torch.testing.assert_close(cls(model, **options)(x[i:i + 1], t), reference[i:i + 1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_create_graph_gives_a_map_differentiable_wrt_the_parameters(name):
    cls, options = METHODS[name]
    model = tiny_cnn()
    torch.manual_seed(9)
    x = torch.randn(2, 3, 16, 16)
    out = cls(model, **options)(x, [0, 1], create_graph=True)
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = cls(model, **options)(x, [0, 1])
    assert not plain.requires_grad
    torch.testing.assert_close(out.detach(), plain)


BAD_OPTIONS = [
    (MFABA, {"steps": 0}, "steps must be a positive int"),
    (MFABA, {"steps": 2.5}, "steps must be a positive int"),
    (MFABA, {"variant": "norm"}, "variant must be one of"),
    (MFABA, {"step_size": 0}, "step_size must be a positive number"),
    (MFABA, {"epsilon": -1}, "epsilon must be a positive number"),
    (MFABA, {"bounds": (1, 0)}, r"bounds must be None or a pair \(low, high\)"),
    (MFABA, {"bounds": 1.0}, "bounds must be None or a pair"),
    (AGI, {"epsilon": 0}, "epsilon must be a positive number"),
    (AGI, {"max_iter": 0}, "max_iter must be a positive int"),
    (AGI, {"topk": 0}, "topk must be a positive int"),
    (AGI, {"sampling": "evenly"}, "sampling must be one of"),
    (AGI, {"sampling": [1, 5]}, r"class indices in \[0, 5\)"),
    (AGI, {"sampling": []}, "non-empty sequence of class indices"),
    (AGI, {"sampling": torch.tensor([0.5])}, "sampling must be one of"),
    (AGI, {"bounds": (0, 0)}, "bounds must be None or a pair"),
]


@pytest.mark.parametrize("cls, options", [(MFABA, {"early_stop": 1}), (AGI, {"walk": "yes"})])
def test_flags_of_the_wrong_type_are_type_errors(cls, options):
    name = next(iter(options))
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        cls(tiny_cnn(), **options)(torch.randn(2, 3, 16, 16), [0, 1])


@pytest.mark.parametrize("cls, options, message", BAD_OPTIONS)
def test_bad_options_are_named(cls, options, message):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=message):
        cls(model, **{"topk": 2, **options} if cls is AGI else options)(x, [0, 1])


def test_agi_takes_every_class_when_topk_exceeds_them():
    """topk is capped at the classes there are: 20 spaced classes of a 5-class model are its 5 classes, 20 random
    ones its 4 other classes."""
    from attribution.gradients.agi import false_classes

    classes = torch.tensor([1, 3])
    assert false_classes(classes, 5, 20, "spaced", None).tolist() == [[0, 1, 2, 3, 4]] * 2
    drawn = false_classes(classes, 5, 20, "random", torch.Generator().manual_seed(0))
    assert [sorted(row) for row in drawn.tolist()] == [[0, 2, 3, 4], [0, 1, 2, 4]]
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(AGI(model, max_iter=2)(x, [1, 3]), AGI(model, max_iter=2, topk=5)(x, [1, 3]))


def test_agi_refuses_a_callable_target():
    with pytest.raises(ValueError, match="AGI .* needs class indices as the target, not a callable"):
        AGI(tiny_cnn(), topk=2)(torch.randn(2, 3, 16, 16), lambda s: s[:, 0])


def test_defaults_are_the_authors():
    assert MFABA.defaults == {"score": "softmax", "steps": 50, "variant": "sharp", "step_size": None,
                              "epsilon": 0.3, "early_stop": True, "bounds": None}
    assert AGI.defaults == {"score": "softmax", "epsilon": 0.05, "max_iter": 20, "topk": 20, "sampling": "spaced",
                            "walk": False, "bounds": None, "generator": None}
