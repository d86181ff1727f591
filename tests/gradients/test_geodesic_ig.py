"""Geodesic Integrated Gradients (SVI variant): equal to the authors' ``GeodesicIGSVI`` procedure written out one
image at a time (its learning-rate decay and early stop included), Integrated Gradients without iterations, the
closed form on a linear model, completeness, the authors' defaults, batch independence, the pass count, the
parameter derivative against central differences, and option errors."""
from __future__ import annotations

import math

import pytest
import torch
from captum.attr._utils.approximation_methods import approximation_parameters
from torch import nn
from torch.distributions import Normal

from attribution import IntegratedGradients
from attribution.gradients import geodesic_ig
from attribution.gradients.geodesic_ig import (EDGE_FRACTION, ENDPOINT_WEIGHT, INIT_SCALE, LR_DECAY, LR_PATIENCE,
                                               MIN_LR, PATIENCE, REL_IMPROVEMENT, GeodesicIG, Path)
from attribution.gradients.paths import quadrature
from conftest import LinearModel, RowCounter, central_difference, tiny_cnn


def respaced(path):
    """The authors' ``make_uniform_spacing`` for one path (a list of nodes): each step cut into
    ``int(n |step| / longest step)`` equal parts, the first node then each step's points (both ends) listed, ``n``
    of the ``L`` listed points taken at ``i (L - 1) // (n - 1)``."""
    n = len(path)
    sizes = [float((path[i + 1] - path[i]).norm()) for i in range(n - 1)]
    longest = max(sizes)
    dense = [path[0]]
    for i in range(n - 1):
        parts = int(n * sizes[i] / longest) if longest > 0 else 0
        for r in range(parts + 1):
            dense.append(path[i] + (r / parts if parts else 0.0) * (path[i + 1] - path[i]))
    return [dense[i * (len(dense) - 1) // (n - 1)] for i in range(n)]


def geodesic_ig_written_out(model, image, label, baseline, *, steps, method, beta, iterations, learning_rate,
                            linear_interp, endpoint_matching, metric, generator, lr_patience=25, patience=100):
    """One image (C, H, W), as ``GeodesicIGSVI`` runs it with Pyro's SVI: nodes on the straight line at the rule's
    points, a normal guide over each moving node's deviation (means 0, scales 0.1 through their log), each iteration
    one draw ``d = mean + scale * eps``, the one-sample ELBO loss ``log q(d) - log N(d; 0, 1) + E`` with ``E`` the
    row norms of ``d`` (weighted 101 at the first and last 10 % of the nodes) minus ``beta`` times the row norms of
    the gradient of the model's summed outputs (or the target's), one ``torch.optim.Adam`` step on all means and log
    scales; the authors' schedule: a new optimiser at half the rate after ``lr_patience`` (25) iterations without a
    new best loss (not below 1e-5), a stop after ``patience`` (100) such iterations when the last relative
    improvement is below 1e-4.  Then the
    means as the path, respaced; nodes at alpha 0 / 1 are the baseline / image; the integral is the
    Riemann-Stieltjes sum of the target's gradients at the nodes against the steps of the polyline ``b -> moving
    nodes -> x`` between the rule's cumulative weights, each found by walking the polyline.  float64 throughout.
    Returns the map and a record of the learning-rate drops and the stop."""
    alphas, weights = (v.tolist() for v in quadrature(method, steps))
    x, b = image[None], baseline[None]
    initial = [b + a * (x - b) for a in alphas]
    moving = [k for k, a in enumerate(alphas) if 0 < a < 1]
    means = {k: torch.zeros_like(x, requires_grad=True) for k in moving}
    log_scales = {k: torch.full_like(x, math.log(0.1), requires_grad=True) for k in moving}
    params = [means[k] for k in moving] + [log_scales[k] for k in moving]
    edge, lr = max(1, int(0.1 * steps)), learning_rate
    optimiser = torch.optim.Adam(params, lr=lr)
    history, best, patience_counter, lr_patience_counter = [], math.inf, 0, 0
    record = {"drops": 0, "stopped": None}
    for iteration in range(iterations):
        noise = torch.randn((len(moving),) + tuple(image.shape), generator=generator).double()
        loss = 0.0
        for j, k in enumerate(moving):
            scale = log_scales[k].exp()
            delta = means[k] + scale * noise[j:j + 1]
            prior = Normal(torch.zeros_like(delta), torch.ones_like(delta))
            loss = loss + Normal(means[k], scale).log_prob(delta).sum() - prior.log_prob(delta).sum()
            point = initial[k] + delta
            out = model(point)
            (grad,) = torch.autograd.grad(out.sum() if metric == "outputs" else out[0, label], point,
                                          create_graph=True)
            distance = delta.norm(dim=-1).sum()
            energy = distance - beta * grad.norm(dim=-1).sum()
            if endpoint_matching and k < edge:
                energy = energy + 100 * distance
            if endpoint_matching and k >= steps - edge:
                energy = energy + 100 * distance
            loss = loss + energy
        for param, grad in zip(params, torch.autograd.grad(loss, params)):
            param.grad = grad
        optimiser.step()
        history.append(float(loss.detach()))
        if len(history) > 1:
            relative = (history[-2] - history[-1]) / history[-2]
            if history[-1] < best:
                best, patience_counter, lr_patience_counter = history[-1], 0, 0
            else:
                patience_counter += 1
                lr_patience_counter += 1
                if lr_patience_counter >= lr_patience and lr > 1e-5:
                    lr = max(lr * 0.5, 1e-5)
                    optimiser = torch.optim.Adam(params, lr=lr)
                    lr_patience_counter = 0
                    record["drops"] += 1
            if relative < 1e-4 and patience_counter >= patience:
                record["stopped"] = iteration
                break
    path = [(initial[k] + means[k]).detach() if k in means else initial[k] for k in range(steps)]
    if linear_interp:
        path = respaced(path)
    path = [b if a == 0 else x if a == 1 else node for a, node in zip(alphas, path)]

    knot_alphas = [0.0] + [alphas[k] for k in moving] + [1.0]
    knots = [b] + [path[k] for k in moving] + [x]

    def polyline(c):
        for j in range(len(knots) - 1):
            if c <= knot_alphas[j + 1] or j == len(knots) - 2:
                t = (c - knot_alphas[j]) / (knot_alphas[j + 1] - knot_alphas[j])
                return knots[j] + t * (knots[j + 1] - knots[j])

    cuts = [0.0]
    for w in weights:
        cuts.append(cuts[-1] + w)
    cuts[-1] = 1.0
    attribution = torch.zeros_like(x)
    for k in range(steps):
        point = path[k].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point)[0, label], point)
        attribution = attribution + grad * (polyline(cuts[k + 1]) - polyline(cuts[k]))
    return attribution[0], record


def close(ours, theirs, rtol=1e-7):
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * float(theirs.abs().max()))


@pytest.fixture
def smooth():
    return tiny_cnn(nn.Softplus).double()


@pytest.fixture
def short_patience(monkeypatch):
    """The schedule's patiences shortened (25 -> 3, 100 -> 8) so that a short run drops its rate and stops: with
    the authors' values the noisy loss keeps setting new bests for hundreds of iterations on toy images."""
    monkeypatch.setattr(geodesic_ig, "LR_PATIENCE", 3)
    monkeypatch.setattr(geodesic_ig, "PATIENCE", 8)
    return {"lr_patience": 3, "patience": 8}


def test_equals_the_written_out_procedure_with_its_schedule(short_patience):
    """The written-out run drops its learning rate and stops early (checked), and the batched run must do the
    same for each image; on a steep model (weights x4, beta 5) the energy is large enough next to the shared
    noise's share of the loss that the two images stop at different iterations."""
    model = tiny_cnn(nn.Softplus).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 4, 4, dtype=torch.float64), [1, 3]
    options = dict(steps=3, method="gausslegendre", beta=5.0, iterations=60, learning_rate=0.05,
                   linear_interp=True, endpoint_matching=True, metric="outputs")
    ours = GeodesicIG(model, baseline="zero", generator=torch.Generator().manual_seed(0), **options)(x, labels)
    records = []
    for i, label in enumerate(labels):
        theirs, record = geodesic_ig_written_out(model, x[i], label, torch.zeros_like(x[i]),
                                                 generator=torch.Generator().manual_seed(0), **options,
                                                 **short_patience)
        records.append(record)
        close(ours[i], theirs)
    assert all(r["drops"] >= 1 for r in records) and all(r["stopped"] is not None for r in records), records
    assert records[0]["stopped"] != records[1]["stopped"], records


def test_equals_the_written_out_procedure_with_pinned_ends_and_the_target_metric(smooth):
    """The 'linspace' rule's first and last nodes are the baseline and the image and stay put; the energy measures
    the target's gradient; no respacing, no endpoint penalty; a black baseline."""
    torch.manual_seed(2)
    x, labels = torch.randn(2, 3, 6, 6, dtype=torch.float64), [0, 4]
    options = dict(steps=5, method="linspace", beta=2.0, iterations=30, learning_rate=0.05, linear_interp=False,
                   endpoint_matching=False, metric="target")
    ours = GeodesicIG(smooth, generator=torch.Generator().manual_seed(3), **options)(x, labels, baseline="black")
    for i, label in enumerate(labels):
        black = torch.full_like(x[i], float(x[i].min()))
        theirs, _ = geodesic_ig_written_out(smooth, x[i], label, black, generator=torch.Generator().manual_seed(3),
                                            **options)
        close(ours[i], theirs)


@pytest.mark.parametrize("method", ["gausslegendre", "linspace", "left", "right", "middle", "trapezoid"])
def test_without_iterations_it_is_integrated_gradients(smooth, method):
    torch.manual_seed(4)
    x, labels = torch.randn(2, 3, 8, 8, dtype=torch.float64), [2, 1]
    ours = GeodesicIG(smooth, iterations=0, linear_interp=False)(x, labels, steps=7, method=method, baseline="black")
    ig = IntegratedGradients(smooth)(x, labels, steps=7, method=method, baseline="black")
    close(ours, ig, rtol=1e-12)


def test_linear_model_gives_the_closed_form_on_any_path():
    """A constant gradient: whatever the path, the increments telescope to x - b, so A = W_t * (x - b)."""
    model = LinearModel().double()
    torch.manual_seed(5)
    x, b = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8, dtype=torch.float64)
    out = GeodesicIG(model, steps=6, iterations=15, learning_rate=0.1,
                     generator=torch.Generator().manual_seed(0))(x, [3, 0], baseline=b)
    for i, label in enumerate([3, 0]):
        close(out[i], model.linear.weight[label].detach().view(3, 8, 8) * (x[i] - b[0]), rtol=1e-10)


def test_increments_telescope_and_are_the_rule_on_the_straight_line():
    torch.manual_seed(6)
    start, end = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for method in ("gausslegendre", "linspace", "trapezoid"):
        alphas, weights = quadrature(method, 9)
        free = ((alphas > 0) & (alphas < 1)).nonzero().squeeze(1)
        path = Path(start, end, alphas.to(torch.float64), free)
        line = path.nodes(torch.zeros((2 * free.numel(), 3, 4, 4), dtype=torch.float64))
        close(path.increments(line, alphas, weights), weights.view(1, -1, 1, 1, 1) * (end - start)[:, None],
              rtol=1e-12)
        bent = path.pin(line + torch.randn_like(line))
        close(path.increments(bent, alphas, weights).sum(1), end - start, rtol=1e-12)


def test_completeness_on_a_bent_path():
    """A strongly curved model (tanh, weights x3): the optimised path moves the map well away from IG's (> 5 %),
    and the map still sums to f_t(x) - f_t(b) up to the quadrature error (here under 2 %: every node moves on its
    own, so the path is jagged and its Riemann-Stieltjes sum coarser than IG's on the line)."""
    model = tiny_cnn(nn.Tanh).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
    torch.manual_seed(0)
    x, labels = torch.randn(2, 3, 8, 8, dtype=torch.float64), [1, 2]
    out = GeodesicIG(model, steps=32, iterations=60, learning_rate=0.003,
                     generator=torch.Generator().manual_seed(0))(x, labels)
    ig = IntegratedGradients(model)(x, labels, steps=32, method="gausslegendre", baseline="zero")
    with torch.no_grad():
        gap = model(x)[[0, 1], labels] - model(torch.zeros_like(x))[[0, 1], labels]
    assert float((out - ig).abs().sum() / ig.abs().sum()) > 0.05
    torch.testing.assert_close(out.flatten(1).sum(1), gap, rtol=0.02, atol=0.0)


def test_defaults_are_the_authors():
    """``GeodesicIGSVI.attribute``: n_steps=50, method='gausslegendre', beta=0.3, num_iterations=1000,
    learning_rate=0.001, do_linear_interp=True, use_endpoints_matching=True, baselines=None (zeros); the guide's
    scale 0.1; the endpoint weight 100 on 10 % of the nodes at each end; ``_optimise_paths``' schedule."""
    assert GeodesicIG.defaults == {"baseline": "zero", "steps": 50, "method": "gausslegendre", "beta": 0.3,
                                   "iterations": 1000, "learning_rate": 1e-3, "linear_interp": True,
                                   "endpoint_matching": True, "metric": "outputs", "generator": None}
    assert (INIT_SCALE, ENDPOINT_WEIGHT, EDGE_FRACTION) == (0.1, 100.0, 0.1)
    assert (LR_PATIENCE, LR_DECAY, MIN_LR, PATIENCE, REL_IMPROVEMENT) == (25, 0.5, 1e-5, 100, 1e-4)
    assert GeodesicIG(tiny_cnn()).resolved_options()["score"] == "logit"
    sizes, points = approximation_parameters("gausslegendre")  # Captum's rule, which the authors' code calls
    alphas, weights = quadrature("gausslegendre", 50)
    torch.testing.assert_close(alphas, torch.tensor(points(50), dtype=torch.float64))
    torch.testing.assert_close(weights, torch.tensor(sizes(50), dtype=torch.float64))


def test_batch_and_batch_size_independence(smooth, short_patience):
    """Each image keeps its own schedule (they stop at different times), the noise is shared."""
    torch.manual_seed(7)
    x, labels = torch.randn(3, 3, 6, 6, dtype=torch.float64), [0, 2, 4]
    explainer = GeodesicIG(smooth, steps=3, iterations=40, learning_rate=0.05)
    batch = explainer(x, labels, generator=torch.Generator().manual_seed(2))
    for i, label in enumerate(labels):
        alone = explainer(x[i:i + 1], label, generator=torch.Generator().manual_seed(2))
        close(batch[i:i + 1], alone, rtol=1e-10)
    for size in (1, 4):
        close(explainer(x, labels, batch_size=size, generator=torch.Generator().manual_seed(2)), batch, rtol=1e-10)


def test_passes_are_iterations_times_moving_nodes_then_the_integral():
    model = tiny_cnn()
    counter = RowCounter(model)
    try:
        GeodesicIG(model, steps=4, iterations=3)(torch.randn(2, 3, 8, 8), [0, 1], batch_size=5)
    finally:
        counter.close()
    assert counter.rows == [5, 3] * 3 + [5, 3]


def test_create_graph_matches_central_differences():
    """The map differentiated through the optimisation (third derivatives of the model) and the integral, on a
    steep model where the energy drives the path: there the path's dependence on the weights is about a quarter of
    the derivative (measured when this test was written, by freezing the path).  Adam's ratios make the map
    curved in the weights, so the central differences take a step of 1e-7."""
    model = tiny_cnn(nn.Softplus).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4)
    torch.manual_seed(8)
    x, weights = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(1, 3, 6, 6, dtype=torch.float64)

    def value(create_graph):
        explainer = GeodesicIG(model, steps=3, iterations=3, learning_rate=0.05, beta=5.0, metric="target",
                               generator=torch.Generator().manual_seed(4))
        return (explainer(x, 2, create_graph=create_graph) * weights).sum()

    for name in ("0.weight", "4.weight"):
        weight = dict(model.named_parameters())[name]
        direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad(value(True), weight)
        numeric = central_difference(lambda: value(False), weight, direction, step=1e-7)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("options, error, match", [
    ({"steps": 0}, ValueError, "steps"),
    ({"method": "simpson"}, ValueError, "method"),
    ({"beta": -0.1}, ValueError, "beta"),
    ({"iterations": -1}, ValueError, "iterations"),
    ({"iterations": 2.5}, ValueError, "iterations"),
    ({"learning_rate": 0}, ValueError, "learning_rate"),
    ({"linear_interp": 1}, TypeError, "linear_interp"),
    ({"endpoint_matching": "yes"}, TypeError, "endpoint_matching"),
    ({"metric": "logits"}, ValueError, "metric"),
    ({"generator": 3}, TypeError, "generator"),
    ({"baseline": "grey"}, ValueError, "baseline"),
    ({"n_steps": 3}, TypeError, "n_steps"),
])
def test_bad_options_name_themselves(options, error, match):
    with pytest.raises(error, match=match):
        GeodesicIG(tiny_cnn(), iterations=1, steps=2)(torch.randn(1, 3, 8, 8), 0, **options)
