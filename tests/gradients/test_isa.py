"""ISA: equal to the authors' algorithm written out one image at a time with the same noise (their code's one
deliberate fix aside: the last, smaller group), a closed form on a two-class linear model, batch independence, the
draws, the cost, the defaults, the option errors and create_graph against finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution import create
from attribution.gradients.isa import ISA
from conftest import LinearModel, Planted, RowCounter, central_difference, tiny_cnn


# ------------------------------------------------------------------------------ the authors' code, one image, plainly
def draw_like_the_method(generator, groups, shape, ascent_steps, descent_steps):
    """The draws in the documented order: per group, per step, randn(B, C, H, W) for the ascent (while it runs),
    then one for the descent; float32."""
    plan = []
    for _ in range(groups):
        ascent, descent = [], []
        for k in range(max(ascent_steps, descent_steps)):
            if k < ascent_steps:
                ascent.append(torch.randn(shape, generator=generator))
            if k < descent_steps:
                descent.append(torch.randn(shape, generator=generator))
        plan.append({"add": ascent, "minus": descent})
    return plan


def search_written_out(model, x, label, mask, steps, alpha, lambda_r, op, noises, sigma, use_softmax):
    """The code's caculate_total (add_mask=False) for one image: steps of +-alpha sign(grad) on the cross-entropy
    (summed) of the model's softmax outputs at the noisy point, minus (ascent) or plus (descent) lambda |x|, the
    descent's gradient masked; total += alpha sign(grad) grad; the weight is the loss's rise (ascent) or fall
    (descent) from the first step to the last."""
    total, start_loss, end_loss = None, None, None
    point = (x * mask).detach().requires_grad_(True)
    for k in range(steps):
        outputs = model(point + sigma * noises[k].to(x.dtype))
        if use_softmax:
            outputs = outputs.softmax(-1)
        loss = F.cross_entropy(outputs, label, reduction="sum")
        if op == "minus":
            loss = loss + lambda_r * torch.norm(point)
            grad = torch.autograd.grad(loss, point)[0] * mask
            point = point - alpha * torch.sign(grad)
        else:
            loss = loss - lambda_r * torch.norm(point)
            grad = torch.autograd.grad(loss, point)[0]
            point = point + alpha * torch.sign(grad)
        point = point.detach().requires_grad_(True)
        step = (alpha * torch.sign(grad)) * grad
        total = step if total is None else total + step
        if start_loss is None:
            start_loss = loss.item()
        end_loss = loss.item()
    return total, (start_loss - end_loss) if op == "minus" else (end_loss - start_loss)


def isa_written_out(model, x, label, index, plan, step_size, add_steps, minus_steps, alpha, factor, lambda_r=0.01,
                    sigma=0.05, use_softmax=True):
    """The code's ISA (saliency_zoo.ISA with core/isa.exp) for image ``index`` of the plan, x (1, C, H, W), in
    NumPy as the code: n_steps = N // step_size + 1 rounds; each round the searches from x * mask, total =
    add / w_add + minus / w_minus (or the one search's total), combine = |(total + total.min()) * x|, removed
    features at -inf, the next step_size of the ascending sort get i + factor * (a - min) / (max + 1e-6); the
    round that would be short takes step_size = len(combine_flatten) - removed_count (the number of images) and
    breaks on an empty selection, as the code.  Returns the map and the mask of features never ranked."""
    label = torch.tensor([label])
    mask = torch.ones_like(x, dtype=torch.long)
    importance = np.zeros(x.shape)
    n_steps = int(np.array(x.size()[1:]).prod()) // step_size + 1
    removed_count = 0
    for i in range(n_steps):
        totals = {}
        for op, steps in (("add", add_steps), ("minus", minus_steps)):
            if steps:
                noises = [n[index:index + 1] for n in plan[i][op]]
                totals[op] = search_written_out(model, x, label, mask, steps, alpha, lambda_r, op, noises, sigma,
                                                use_softmax)
        if len(totals) == 2:
            total = totals["add"][0] / totals["add"][1] + totals["minus"][0] / totals["minus"][1]
        else:
            total = next(iter(totals.values()))[0]
        combine = torch.abs((total + total.min()) * x).detach().numpy()
        combine[mask.numpy() == 0] = -np.inf
        combine_flatten = np.concatenate([c.flatten()[np.newaxis, :] for c in combine])
        if removed_count + step_size > combine_flatten.shape[-1]:
            step_size = len(combine_flatten) - removed_count
        m = np.zeros_like(combine_flatten)
        temp = np.argsort(combine_flatten, kind="stable")[:, removed_count:removed_count + step_size]
        for t in range(len(temp)):
            m[t, temp[t]] = 1
        m = m.reshape(combine.shape).astype(bool)
        a = combine[m]
        if len(a) == 0:
            break
        a = a - a.min(axis=0)
        a = a / (a.max(axis=0) + 1e-6) * factor
        importance[m] = i + a
        mask = mask * torch.from_numpy((~m).astype(int)).long()
        removed_count += step_size
    return torch.from_numpy(importance), mask.bool()


# ------------------------------------------------------------------------------------------ the algorithm itself
@pytest.mark.parametrize("steps", [(3, 2), (0, 3), (2, 0)])
def test_equals_the_authors_algorithm_with_the_same_noise(steps):
    """tiny_cnn in float64, three 3 x 8 x 8 images (192 features) in 4 groups of 48, the searches of different
    lengths or one of them off, noise on, 5 rows per pass (chunks cut across the two searches): every image's map
    equals the authors' loop run on it alone with its noise."""
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    labels = [0, 3, 4]
    add_steps, minus_steps = steps
    options = dict(group_size=48, ascent_steps=add_steps, descent_steps=minus_steps, step_size=0.02)
    ours = ISA(model, **options)(x, labels, batch_size=5, generator=torch.Generator().manual_seed(11))
    plan = draw_like_the_method(torch.Generator().manual_seed(11), 5, x.shape, add_steps, minus_steps)
    for i, label in enumerate(labels):
        expected, left = isa_written_out(model, x[i:i + 1], label, i, plan, 48, add_steps, minus_steps, 0.02, 1.3)
        assert not left.any()
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-9, atol=1e-9)
    assert ours.min() == 0 and ours.max() > 3  # four groups: ranks 0 .. 3 + 1.3


def test_the_last_smaller_group_is_ranked_where_the_code_leaves_it_at_zero():
    """192 features in groups of 50: three full groups agree with the code; the 42 features left, the most
    important, get 3 + 1.3 (c - min) / (max - min + 1e-6) here, while the code's short round selects nothing and
    leaves them at 0.  Logit score (the code's model without the softmax layer)."""
    model = tiny_cnn().double()
    torch.manual_seed(4)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    options = dict(group_size=50, ascent_steps=2, descent_steps=2, step_size=0.02, score="logit")
    ours = ISA(model, **options)(x, [1, 2], generator=torch.Generator().manual_seed(5))
    plan = draw_like_the_method(torch.Generator().manual_seed(5), 4, x.shape, 2, 2)
    for i, label in enumerate([1, 2]):
        code, last = isa_written_out(model, x[i:i + 1], label, i, plan, 50, 2, 2, 0.02, 1.3, use_softmax=False)
        assert (code[last] == 0).all() and int(last.sum()) == 42
        torch.testing.assert_close(ours[i:i + 1][~last], code[~last], rtol=1e-9, atol=1e-9)
        tail = ours[i:i + 1][last]
        assert tail.min() == 3 and 4.29 < tail.max() <= 4.3


def softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_closed_form_on_a_two_class_linear_model():
    """f = W x + c, two classes, logit score, no noise, lambda = 0: the cross-entropy is softplus(z), z = d . p + b
    (d = w_o - w_t), its gradient sigmoid(z) d, so every ascent step moves z by +alpha |d|_1 and every descent step
    by -alpha |m d|_1 (m: the kept features), and with z_0 = d . (m x) + b:
    U = alpha |d| sum_k sigmoid(z_0 + k alpha |d|_1), w_U = softplus(z_last) - softplus(z_0),
    D = alpha m |d| sum_k sigmoid(z_0 - k alpha |m d|_1), w_D = softplus(z_0) - softplus(z'_last); the ranking
    then follows from T = U / w_U + D / w_D alone, with no autograd."""
    model = LinearModel(shape=(3, 4, 4), classes=2).double()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    labels = [0, 1, 1]
    alpha, t_up, t_down, size, scale = 0.05, 3, 4, 16, 1.3
    ours = ISA(model, score="logit", group_size=size, ascent_steps=t_up, descent_steps=t_down, step_size=alpha,
               norm_coeff=0.0, sigma=0.0)(x, labels)
    weight, bias = model.linear.weight.detach(), model.linear.bias.detach()
    for i, t in enumerate(labels):
        d, b, image = weight[1 - t] - weight[t], float(bias[1 - t] - bias[t]), x[i].flatten()
        keep = torch.ones(48, dtype=torch.bool)
        expected = torch.zeros(48, dtype=torch.float64)
        for group in range(3):
            z0 = float(d @ (image * keep)) + b
            up = [z0 + k * alpha * float(d.abs().sum()) for k in range(t_up)]
            down = [z0 - k * alpha * float((d * keep).abs().sum()) for k in range(t_down)]
            total = (alpha * d.abs() * sum(map(sigmoid, up)) / (softplus(up[-1]) - softplus(up[0]))
                     + alpha * (d * keep).abs() * sum(map(sigmoid, down)) / (softplus(down[0]) - softplus(down[-1])))
            combine = ((total + total.min()) * image).abs()
            chosen = combine.masked_fill(~keep, float("inf")).argsort(stable=True)[:size]
            values = combine[chosen] - combine[chosen].min()
            expected[chosen] = group + scale * values / (values.max() + 1e-6)
            keep[chosen] = False
        torch.testing.assert_close(ours[i].flatten(), expected, rtol=1e-9, atol=1e-9)


def test_the_planted_square_ranks_above_the_rest():
    """Planted: class 0 reads the image only inside a 6 x 6 square; with the defaults (groups of 96 here) the
    square's features rank well above the rest on average."""
    pattern = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = ISA(Planted(pattern, (4, 4, 6)), group_size=96)(pattern, 0, generator=torch.Generator().manual_seed(1))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:10, 4:10] = True
    assert ours[0][:, inside].mean() > ours[0][:, ~inside].mean() + 1


def test_batch_independence_without_noise():
    """sigma = 0: three images together, in any rows per pass, give each image's map alone."""
    model = tiny_cnn().double()
    torch.manual_seed(6)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    explainer = ISA(model, group_size=64, ascent_steps=2, descent_steps=3, step_size=0.02, sigma=0.0)
    together = explainer(x, [0, 1, 2], batch_size=4)
    for i in range(3):
        torch.testing.assert_close(explainer(x[i:i + 1], [i])[0], together[i], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explainer(x, [0, 1, 2], batch_size=1), together, rtol=1e-10, atol=1e-10)
    # target=None explains the arg-max class
    torch.testing.assert_close(explainer(x), explainer(x, model(x).argmax(1)))


def test_draws_follow_the_generator_and_not_the_rows_per_pass():
    model = tiny_cnn()
    torch.manual_seed(7)
    x = torch.rand(2, 3, 8, 8)
    explainer = ISA(model, group_size=96, ascent_steps=2, descent_steps=2)
    maps = [explainer(x, [0, 1], batch_size=b, generator=torch.Generator().manual_seed(1)) for b in (1, 3, None)]
    for other in maps[1:]:
        torch.testing.assert_close(other, maps[0])
    assert not torch.equal(explainer(x, [0, 1], generator=torch.Generator().manual_seed(2)), maps[0])
    torch.manual_seed(0)  # without a generator: the global one
    first = explainer(x, [0, 1])
    torch.manual_seed(0)
    torch.testing.assert_close(explainer(x, [0, 1]), first)


def test_cost_is_groups_times_steps_rows_per_image():
    """192 features in groups of 80: 3 groups (80, 80, 32), each 3 ascent and 2 descent rows per image, at most
    batch_size rows per pass."""
    model = tiny_cnn()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    counter = RowCounter(model)
    result = ISA(model, group_size=80, ascent_steps=3, descent_steps=2, scale=0.5)(x, [0, 1], batch_size=3)
    counter.close()
    assert sum(counter.rows) == 3 * (3 + 2) * 2 and max(counter.rows) <= 3
    assert result.dtype == torch.float32 and result.shape == x.shape
    # with scale 0.5 < 1 group g's values lie in [g, g + 0.5], so the floor names the group
    assert torch.bincount(result.floor().long().flatten()).tolist() == [160, 160, 64]
    assert ((result - result.floor()) <= 0.5).all()


def test_defaults_are_the_authors():
    """saliency_zoo.ISA: step_size=5000, add_steps=8, minus_steps=8, alpha=0.004, factor=1.3; exp: lambda_r=0.01;
    caculate_total: noise N(0, 0.05^2); the scripts' model ends in a softmax."""
    assert ISA.defaults == {"score": "softmax", "group_size": 5000, "ascent_steps": 8, "descent_steps": 8,
                            "step_size": 0.004, "scale": 1.3, "norm_coeff": 0.01, "sigma": 0.05, "generator": None}
    assert create("isa", tiny_cnn()).__class__ is ISA


@pytest.mark.parametrize("option, value, message", [
    ("group_size", 0, "group_size must be a positive int"),
    ("ascent_steps", -1, "ascent_steps must be a non-negative int"),
    ("descent_steps", 2.0, "descent_steps must be a non-negative int"),
    ("descent_steps", 1, "descent_steps must be 0 or at least 2"),
    ("step_size", 0, "step_size must be a positive number"),
    ("scale", -1, "scale must be a non-negative number"),
    ("norm_coeff", -0.1, "norm_coeff must be a non-negative number"),
    ("sigma", float("nan"), "sigma must be a non-negative number"),
])
def test_bad_options_are_named(option, value, message, images):
    with pytest.raises(ValueError, match=message):
        ISA(tiny_cnn(), group_size=400, ascent_steps=2, descent_steps=2)(images, 0, **{option: value})


def test_other_errors(images):
    explainer = ISA(tiny_cnn(), group_size=400, ascent_steps=2, descent_steps=2)
    with pytest.raises(ValueError, match="ascent_steps and descent_steps are both 0"):
        explainer(images, 0, ascent_steps=0, descent_steps=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        explainer(images, 0, generator=3)
    with pytest.raises(ValueError, match="needs class indices"):
        explainer(images, lambda s: s[:, 0])


def test_create_graph_equals_finite_differences_with_noise():
    """float64, noise on (the same draws in every call): the ranking and the steps' signs are constant almost
    everywhere, the group values carry the graph through the gradients and the weights."""
    model = tiny_cnn().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight = model[4].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def explain(create_graph=False):
        return ISA(model, group_size=64, ascent_steps=2, descent_steps=3, step_size=0.02,
                   generator=torch.Generator().manual_seed(2))(x, [0, 3], create_graph=create_graph)

    (grad,) = torch.autograd.grad(explain(True).sum(), weight)
    assert grad.abs().max() > 0
    numeric = central_difference(lambda: explain().sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-10)
