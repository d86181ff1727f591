"""Local Attribution (LA): equal to the authors' algorithm written out one image at a time (the same class draws),
a closed form on a linear model, the class draws, the authors' defaults, option errors and differentiability
w.r.t. the parameters against finite differences."""
from __future__ import annotations

import pytest
import torch

from attribution import LocalAttribution
from attribution.gradients.local_attribution import local_classes
from conftest import LinearModel, RowCounter, cam_cnn, central_difference, tiny_cnn


def drawn(num_classes, select_num, seed):
    """The draw the method makes with ``torch.Generator().manual_seed(seed)``: select_num distinct classes."""
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:select_num].tolist()


def la_written_out(model, image, label, selected, epsilon=10, max_iter=20, bounds=None, reference=0.0):
    """The authors' la() for one image (1, C, H, W), with the label in place of the prediction: for each drawn
    class but the last (a class equal to the label replaced by the next, the previous for the last class),
    max_iter steps x + (|x - reference| / epsilon) sign(grad p_class) from the image, each adding
    -grad p_label * (step); then max_iter steps x - (...) sign(grad p_label) likewise."""
    num_classes = model(image).shape[1]
    step = (image - reference).abs() / epsilon
    walks = []
    for c in selected[:-1]:
        if c == label:
            c = c + 1 if c < num_classes - 1 else c - 1
        walks.append((c, 1.0))
    walks.append((label, -1.0))
    total = torch.zeros_like(image)
    for guide, sign in walks:
        point = image.clone()
        for _ in range(max_iter):
            point = point.detach().requires_grad_(True)
            probs = model(point).softmax(-1)
            g_guide = torch.autograd.grad(probs[0, guide], point, retain_graph=True)[0]
            g_label = torch.autograd.grad(probs[0, label], point)[0]
            new = image + sign * step * g_guide.sign()
            if bounds is not None:
                new = new.clamp(*bounds)
            total = total - g_label * (new - image)
            point = new
    return total


def seed_drawing(num_classes, select_num, wanted):
    """The first seed whose used classes (all but the last drawn) include ``wanted``."""
    return next(s for s in range(1000) if wanted in drawn(num_classes, select_num, s)[:-1])


@pytest.mark.parametrize("bounded", [False, True])
def test_equals_the_authors_algorithm(bounded):
    """cam_cnn (10 classes), select_num=5: 4 drawn classes and the untargeted walk per image; one image's target
    is a drawn class (replaced by the next), one's is the last class 9, drawn (replaced by 8); every walk takes
    every step (the rows evaluated: 1 + images x 5 walks x max_iter).  Bounded: [0, 1] images, bounds (0, 1) and
    the default reference, the code's exact setting; unbounded: a per-channel reference tensor."""
    model = cam_cnn().double()
    select_num, max_iter, seed = 5, 3, seed_drawing(10, 5, 9)
    selected = drawn(10, select_num, seed)
    torch.manual_seed(1)
    if bounded:
        x, bounds, reference = torch.rand(3, 3, 16, 16, dtype=torch.float64), (0.0, 1.0), None
    else:
        x, bounds = torch.randn(3, 3, 16, 16, dtype=torch.float64), None
        reference = torch.tensor([-2.0, -1.5, -1.8], dtype=torch.float64).view(3, 1, 1)
    labels = model(x).argmax(1).tolist()
    labels[1] = next(c for c in selected[:-1] if c != 9)
    labels[2] = 9
    counter = RowCounter(model)
    ours = LocalAttribution(model, epsilon=4, max_iter=max_iter, select_num=select_num, bounds=bounds,
                            reference=reference)(x, labels, batch_size=4,
                                                 generator=torch.Generator().manual_seed(seed))
    counter.close()
    assert sum(counter.rows) == 1 + 3 * select_num * max_iter and max(counter.rows) <= 4
    for i, label in enumerate(labels):
        expected = la_written_out(model, x[i:i + 1], label, selected, epsilon=4, max_iter=max_iter, bounds=bounds,
                                  reference=0.0 if reference is None else reference)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)
    assert ours.abs().sum() > 0


def test_without_a_target_explains_the_prediction_as_the_code():
    """target=None: the prediction is explained, walked away from and replaced in the draws (the code's
    init_pred); with the defaults (epsilon 10, 20 classes: 10 here, 9 used) and bounds (0, 1)."""
    model = cam_cnn().double()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    ours = LocalAttribution(model, max_iter=2, bounds=(0, 1))(x, generator=torch.Generator().manual_seed(3))
    selected = drawn(10, 20, 3)
    assert len(selected) == 10
    for i, label in enumerate(model(x).argmax(1).tolist()):
        expected = la_written_out(model, x[i:i + 1], label, selected, max_iter=2, bounds=(0, 1))
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-12)


def test_closed_form_on_a_linear_model():
    """f = W x + c, logits: every gradient is constant, so every step of a walk is the same point
    clip(x + s delta sign(w_g)) (s = +1 towards a drawn class g, -1 away from the target), and
    A = -max_iter w_t sum_walks (clip(x + s delta sign(w_g)) - x), delta = x / epsilon; epsilon 1.5 makes the
    clip bind."""
    model = LinearModel().double()
    torch.manual_seed(5)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    labels, max_iter, epsilon = [0, 2, 3], 4, 1.5
    ours = LocalAttribution(model, score="logit", epsilon=epsilon, max_iter=max_iter, select_num=4, bounds=(0, 1))(
        x, labels, generator=torch.Generator().manual_seed(0))
    selected = drawn(4, 4, 0)
    weight = model.linear.weight.detach().view(4, 3, 8, 8)
    clipped = 0
    for i, t in enumerate(labels):
        guides = [(c if c != t else (c + 1 if c < 3 else c - 1), 1.0) for c in selected[:-1]] + [(t, -1.0)]
        expected = torch.zeros_like(x[i])
        for g, s in guides:
            moved = x[i] + s * (x[i] / epsilon) * weight[g].sign()
            clipped += int((moved > 1).sum())
            expected -= max_iter * weight[t] * (moved.clamp(0, 1) - x[i])
        torch.testing.assert_close(ours[i], expected, rtol=1e-9, atol=1e-12)
    assert clipped > 0


def test_class_draws_are_the_codes_rule():
    """1000 classes, select_num 20: 19 classes, distinct, shared by the images; a target among them replaced by
    the next class (999 by 998); fewer classes than select_num: all of them drawn, the last dropped."""
    seed = seed_drawing(1000, 20, 999)
    first = drawn(1000, 20, seed)
    used = first[:-1]
    hit = next(c for c in used if c != 999)
    outside = next(c for c in range(1000) if c not in used)
    classes = torch.tensor([hit, 999, first[-1], outside])
    draws = local_classes(classes, 1000, 20, torch.Generator().manual_seed(seed))
    assert draws.shape == (4, 19) and len(set(used)) == 19
    assert draws[0].tolist() == [c + 1 if c == hit else c for c in used]
    assert draws[1].tolist() == [998 if c == 999 else c for c in used]
    assert draws[2].tolist() == used and draws[3].tolist() == used  # the dropped class is not used
    small = local_classes(torch.tensor([4]), 5, 20, torch.Generator().manual_seed(0))
    assert small.shape == (1, 4) and small[0].tolist() == [3 if c == 4 else c for c in drawn(5, 5, 0)[:-1]]
    assert local_classes(torch.tensor([0]), 5, 1, None).shape == (1, 0)  # only the untargeted walk


def test_one_class_is_the_untargeted_walk_alone():
    """select_num=1: no drawn class, the walk away from the target: A = max_iter delta |w_t| on a linear model
    without clipping (reference 0: delta = |x| / epsilon)."""
    model = LinearModel().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = LocalAttribution(model, score="logit", select_num=1, max_iter=3, epsilon=5)(x, [1, 2])
    weight = model.linear.weight.detach().view(4, 3, 8, 8)
    for i, t in enumerate([1, 2]):
        torch.testing.assert_close(ours[i], 3 * x[i].abs() / 5 * weight[t].abs(), rtol=1e-9, atol=1e-12)


def test_batch_and_batch_size_independence():
    model = tiny_cnn()
    torch.manual_seed(8)
    x = torch.rand(3, 3, 16, 16)
    options = dict(select_num=3, max_iter=2, bounds=(0, 1))
    reference = LocalAttribution(model, **options)(x, [3, 1, 4], batch_size=1,
                                                   generator=torch.Generator().manual_seed(7))
    for batch_size in (2, None):
        again = LocalAttribution(model, **options)(x, [3, 1, 4], batch_size=batch_size,
                                                   generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(again, reference, rtol=1e-4, atol=1e-7)
    for i, t in enumerate([3, 1, 4]):
        alone = LocalAttribution(model, **options)(x[i:i + 1], t, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(alone, reference[i:i + 1], rtol=1e-4, atol=1e-7)
    other = LocalAttribution(model, **options)(x, [3, 1, 4], generator=torch.Generator().manual_seed(8))
    assert not torch.allclose(other, reference)


def test_create_graph_equals_finite_differences():
    """float64: the points are sign steps (constant almost everywhere in the weights), the summed gradients carry
    the graph; the map without create_graph is the same and carries none."""
    model = tiny_cnn().double()
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = model[4].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def explain(create_graph=False):
        return LocalAttribution(model, select_num=3, max_iter=2, bounds=(0, 1))(
            x, [0, 3], create_graph=create_graph, generator=torch.Generator().manual_seed(2))

    out = explain(True)
    assert out.requires_grad and not explain().requires_grad
    torch.testing.assert_close(out.detach(), explain())
    (grad,) = torch.autograd.grad(out.sum(), weight)
    numeric = central_difference(lambda: explain().sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-10)


BAD_OPTIONS = [
    ({"epsilon": 0}, "epsilon must be a positive number"),
    ({"epsilon": True}, "epsilon must be a positive number"),
    ({"max_iter": 0}, "max_iter must be a positive int"),
    ({"select_num": 2.5}, "select_num must be a positive int"),
    ({"select_num": 0}, "select_num must be a positive int"),
    ({"bounds": (1, 0)}, r"bounds must be None or a pair \(low, high\)"),
    ({"reference": "black"}, "reference must be None, a number or a floating tensor"),
    ({"reference": True}, "reference must be None, a number or a floating tensor"),
    ({"reference": torch.zeros(4, 1, 1)},
     r"broadcastable to the input \(2, 3, 16, 16\), got a tensor of shape \(4, 1, 1\)"),
    ({"reference": torch.zeros(3, 1, 1, dtype=torch.long)}, r"got a tensor of shape \(3, 1, 1\) and dtype torch.int64"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        LocalAttribution(tiny_cnn(), **{"select_num": 2, "max_iter": 1, **options})(torch.rand(2, 3, 16, 16), [0, 1])


def test_refuses_a_callable_target():
    with pytest.raises(ValueError, match="LocalAttribution .* needs class indices as the target, not a callable"):
        LocalAttribution(tiny_cnn(), select_num=2)(torch.rand(2, 3, 16, 16), lambda s: s[:, 0])


def test_defaults_are_the_authors():
    """saliency/la.py: epsilon=10, select_num=20 (19 used); generate_attributions.py passes max_iter=20
    (--samples_number) and epsilon=10 (--spatial_range); softmax probabilities."""
    assert LocalAttribution.defaults == {"score": "softmax", "epsilon": 10, "max_iter": 20, "select_num": 20,
                                         "bounds": None, "reference": None, "generator": None}
