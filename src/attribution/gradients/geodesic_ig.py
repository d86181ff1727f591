"""Geodesic Integrated Gradients (the SVI variant): the target's gradients integrated along a path pulled off the
straight line by stochastic variational inference on the authors' path energy."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import non_negative_number, optional_generator, positive_int, positive_number
from ..core.optim import Adam
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline, quadrature

#: the authors' constants (``GeodesicIGSVI``): the guide's initial scale, the endpoint penalty's weight, and the
#: share of the path's nodes at each end that the penalty holds (at least one node)
INIT_SCALE, ENDPOINT_WEIGHT, EDGE_FRACTION = 0.1, 100.0, 0.1
#: their learning-rate schedule and early stop (``_optimise_paths``): the rate halves (down to ``MIN_LR``, the
#: optimiser restarted) after ``LR_PATIENCE`` iterations without a new best loss; the optimisation stops after
#: ``PATIENCE`` such iterations when the last one improved the loss by less than ``REL_IMPROVEMENT`` (relative)
LR_PATIENCE, LR_DECAY, MIN_LR, PATIENCE, REL_IMPROVEMENT = 25, 0.5, 1e-5, 100, 1e-4
METRICS = ("outputs", "target")


@register("geodesic_ig")
class GeodesicIG(GradientExplainer):
    """Geodesic Integrated Gradients, energy-based (SVI) variant: Integrated Gradients along a path that bends away
    from the straight line where the energy below says so.

    Salek & Enguehard, "Using the Path of Least Resistance to Explain Deep Networks", arXiv:2502.12108, 2025 (code:
    github.com/sina-salek/geodesic-ig, ``geodesic/attr/geodesic_svi_ig.py``, class ``GeodesicIGSVI``).

    The path's nodes start on the straight line, ``g0_k = b + alpha_k (x - b)`` at the quadrature rule's nodes
    ``alpha_k`` (``method``, ``steps``), and move by deviations ``d_k``.  SVI fits a factorised normal guide
    ``q = N(mu, sigma)`` over the deviations to the posterior ``p(d) ~ N(d; 0, 1) exp(-E(g0 + d))`` with the energy
    ``E = sum_k e_k |d_k| - beta |grad F(g0_k + d_k)|`` (``e_k = 1 + ENDPOINT_WEIGHT`` on the first and last 10 % of
    the nodes with ``endpoint_matching``, else 1): each iteration draws ``eps ~ N(0, 1)``, sets ``d = mu + sigma
    eps`` and takes one Adam step on ``(mu, log sigma)`` down the one-sample ELBO loss ``log q(d) - log N(d; 0, 1) +
    E(g0 + d)`` (differentiated through ``grad F``: a second backward).  The path is then ``g0 + mu``, its nodes
    respaced along its length with ``linear_interp``, and ``A = sum_k grad f_t(g_k) * (gamma(c_{k+1}) -
    gamma(c_k))``, a Riemann-Stieltjes sum along the polyline ``gamma`` from ``b`` through the nodes (at
    ``alpha_k``) to ``x``, cut at the rule's cumulative weights ``c_k = w_0 + ... + w_{k-1}``.  On the straight
    line the cuts are ``w_k (x - b)`` and ``A`` is Integrated Gradients with the same rule; on any path ``sum A =
    f_t(x) - f_t(b)`` up to the quadrature error.  That error is larger than IG's on the line: every node moves on
    its own (the energy ties no node to its neighbours), so the optimised path is jagged (about 1 % of ``f_t(x) -
    f_t(b)`` on a toy CNN whose map moved 7 % away from IG's).

    ``metric``: whose gradient the energy's ``|grad F|`` measures: ``'outputs'`` (default, the authors' code: the
    sum of all the model's raw outputs) or ``'target'`` (the explained score, the paper's ``f``).  ``generator``
    draws the noise, float32 standard normals of one path's shape per iteration, shared by the images of the call
    (so that an image's map does not depend on the others).

    Defaults are ``GeodesicIGSVI.attribute``'s: ``steps=50``, ``method='gausslegendre'``, ``beta=0.3``,
    ``iterations=1000``, ``learning_rate=1e-3``, ``linear_interp=True`` (``do_linear_interp``),
    ``endpoint_matching=True`` (``use_endpoints_matching``), a zero baseline (their ``baselines=None``; the paper's
    VOC experiment reports a black image), the guide's scales starting at 0.1, Adam's moments 0.9 and 0.999, the
    learning-rate schedule and early stop of the module's constants.  Their VOC script runs 10000 iterations at a
    learning rate of 1e-4.

    Cost per image: ``iterations x steps`` forwards, input-gradient backwards kept for a second backward, and those
    second backwards (to the guide's parameters), fewer when the early stop ends the optimisation; then ``steps``
    forwards and input-gradient backwards for the integral.  All images' paths are optimised together,
    ``batch_size`` nodes per pass; the state (means, scales and Adam's moments) holds six copies of the paths.
    ``create_graph=True`` differentiates through the whole optimisation (third derivatives of the model; memory
    grows with ``iterations``).

    Deliberate differences from the authors' code: the integral is the Riemann-Stieltjes sum above, complete and
    equal to IG on a straight path (the code sums ``(x - b) * |g_{k+1} - g_k| * grad f_t(g_k)``, which is neither);
    nodes at ``alpha = 0`` or ``1`` (rules ``'linspace'``, ``'left'``, ``'right'``, ``'trapezoid'``) are the
    baseline or the image and do not move (the code moves them, held by the endpoint penalty); each image has its own
    loss, learning-rate schedule and early stop, and the respacing's point counts are scaled by each path's longest
    step (the code shares them over the batch, so its maps depend on the other images); the noise is shared by the
    images; the respacing picks its points with exact integer arithmetic and fractions in the paths' dtype (the code
    truncates float32 ``linspace`` values); the ELBO's log-densities are written out (their constants cancel).  As in
    the code, the energy's norms are taken over the last axis (rows of ``W`` pixels) and summed, not over whole
    images as the paper writes, and the energy rewards large gradients (``- beta |grad F|``), as both the code and
    the paper's energy formula have it (its text calls the term a penalty).  The paper's kNN variant
    (``GeodesicIGKNN``) is left out: it needs a set of points besides the image and its baseline (a data set, or
    points the caller samples); the image and its baseline alone make one straight edge, i.e. IG.
    """

    needs_second_derivative = True  # the energy differentiates the gradient's norm
    per_image_options = ("baseline",)
    defaults = {"baseline": "zero", "steps": 50, "method": "gausslegendre", "beta": 0.3, "iterations": 1000,
                "learning_rate": 1e-3, "linear_interp": True, "endpoint_matching": True, "metric": "outputs",
                "generator": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        baseline: BaselineSpec,
        steps: int,
        method: str,
        beta: float,
        iterations: int,
        learning_rate: float,
        linear_interp: bool,
        endpoint_matching: bool,
        metric: str,
        generator: Optional[torch.Generator],
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        steps = positive_int(steps, "steps")
        beta = non_negative_number(beta, "beta")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        learning_rate = positive_number(learning_rate, "learning_rate")
        for name, flag in (("linear_interp", linear_interp), ("endpoint_matching", endpoint_matching)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        generator = optional_generator(generator)
        alphas, weights = quadrature(method, steps)  # float64 on the CPU
        dtype = accumulation_dtype(x)
        start, end = make_baseline(x, baseline).to(dtype), x.to(dtype)
        free = ((alphas > 0) & (alphas < 1)).nonzero().squeeze(1)  # the nodes that move
        path = Path(start, end, alphas.to(device=x.device, dtype=dtype), free.to(x.device))
        node_weights = energy_weights(steps, endpoint_matching).to(device=x.device, dtype=dtype)
        means = self._optimise(path, node_weights, beta, iterations, learning_rate, metric, target, generator,
                               batch_size, create_graph)
        nodes = path.nodes(means)
        if linear_interp:
            nodes = path.pin(uniform_spacing(nodes))
        return self._line_integral(nodes, path.increments(nodes, alphas, weights), target, batch_size, create_graph)

    # ------------------------------------------------------------------------------------------ optimisation
    def _optimise(self, path: "Path", node_weights: Tensor, beta: float, iterations: int, learning_rate: float,
                  metric: str, target: Target, generator: Optional[torch.Generator], batch_size: Optional[int],
                  create_graph: bool) -> Tensor:
        """The guide's means (B * F, C, H, W) of the F moving nodes of each image (image-major) after
        ``iterations`` SVI steps, each image stopping on its own early stop."""
        batch, count, shape = path.start.shape[0], path.free.numel(), path.start.shape[1:]
        device, dtype = path.start.device, path.start.dtype
        rows = torch.arange(batch * count, device=device)
        owners, slots = rows // count, rows % count
        means = torch.zeros((batch * count,) + shape, dtype=dtype, device=device)
        log_scales = torch.full_like(means, math.log(INIT_SCALE))
        if iterations == 0 or count == 0:
            return means
        optimisers = (RowAdam(learning_rate, means), RowAdam(learning_rate, means))
        schedule = Schedule(batch, learning_rate, device)
        planner = RowPlanner(batch * count, batch_size, device)
        draw_device = generator.device if generator is not None else device
        for _ in range(iterations):
            if not bool(schedule.active.any()):
                break
            noise = torch.randn((count,) + shape, generator=generator, device=draw_device).to(device=device,
                                                                                              dtype=dtype)
            on = schedule.active[owners]
            live = on.nonzero().squeeze(1)
            losses = torch.zeros(batch, dtype=torch.float64, device=device)
            grads: Tuple[list, list] = ([], [])
            planner.total = live.numel()
            for a, b in planner:
                chosen = live[a:b]
                mean, log_scale = (trainable(t[chosen], create_graph) for t in (means, log_scales))
                row_loss = self._row_losses(path, mean, log_scale, noise[slots[chosen]], owners[chosen],
                                            path.free[slots[chosen]], node_weights, beta, metric, target, planner)
                for kept, grad in zip(grads, torch.autograd.grad(row_loss.sum(), (mean, log_scale),
                                                                 create_graph=create_graph)):
                    kept.append(grad)
                losses.index_add_(0, owners[chosen], row_loss.detach().to(torch.float64))
            grad_means, grad_scales = (spread(torch.cat(kept), live, means) for kept in grads)
            keep = on.view((-1,) + (1,) * len(shape))
            means = torch.where(keep, optimisers[0].step(means, grad_means), means)
            log_scales = torch.where(keep, optimisers[1].step(log_scales, grad_scales), log_scales)
            restart = schedule.update(losses)[owners]
            for optimiser in optimisers:
                optimiser.restart(restart, schedule.lr[owners])
        return means

    def _row_losses(self, path: "Path", mean: Tensor, log_scale: Tensor, noise: Tensor, owners: Tensor,
                    nodes: Tensor, node_weights: Tensor, beta: float, metric: str, target: Target,
                    planner: RowPlanner) -> Tensor:
        """Each row's share of the one-sample ELBO loss ``log q(d) - log N(d; 0, 1) + E``, with ``d = mean +
        exp(log_scale) noise``, at the nodes ``nodes`` (indices into the rule's nodes) of images ``owners``."""
        deviation = mean + log_scale.exp() * noise
        point = path.straight(owners, nodes) + deviation
        with planner.recording(point), self._backward_rules():
            outputs = self._forward(point)
        score = outputs.sum() if metric == "outputs" else target(outputs, owners).sum()
        (grad,) = torch.autograd.grad(score, point, create_graph=True, allow_unused=True)
        curvature = row_norms(grad.to(point.dtype)) if grad is not None else torch.zeros_like(point[:, 0, 0, 0])
        energy = node_weights[nodes] * row_norms(deviation) - beta * curvature
        divergence = (0.5 * deviation.square() - log_scale - 0.5 * noise.square()).flatten(1).sum(1)
        return divergence + energy

    # ------------------------------------------------------------------------------------------- integration
    def _line_integral(self, nodes: Tensor, increments: Tensor, target: Target, batch_size: Optional[int],
                       create_graph: bool) -> Tensor:
        """``sum_k grad f_t(nodes_k) * increments_k`` per image, ``batch_size`` nodes per pass; with
        ``create_graph`` the gradients are differentiated through the nodes too."""
        batch, count, shape = nodes.shape[0], nodes.shape[1], nodes.shape[2:]
        flat_nodes, flat_increments = nodes.reshape((-1,) + shape), increments.reshape((-1,) + shape)
        total = torch.zeros((batch,) + shape, dtype=nodes.dtype, device=nodes.device)
        planner = RowPlanner(batch * count, batch_size, nodes.device)
        for a, b in planner:
            owners = torch.arange(a, b, device=nodes.device) // count
            rows = self._model_input(trainable(flat_nodes[a:b], create_graph))
            with planner.recording(rows), self._backward_rules():
                outputs = self._forward(rows)
            (grad,) = torch.autograd.grad(target(outputs, owners).sum(), rows, create_graph=create_graph,
                                          allow_unused=True)
            if grad is None:
                continue
            contribution = flat_increments[a:b] * grad.to(total.dtype)
            # out of place only when the sum must stay differentiable
            total = total.index_add(0, owners, contribution) if create_graph else total.index_add_(0, owners,
                                                                                                   contribution)
        return total


class Path:
    """Each image's straight line from its baseline ``start`` to ``end`` (B, C, H, W) at the rule's nodes
    ``alphas`` (S,), of which ``free`` (F,) move."""

    def __init__(self, start: Tensor, end: Tensor, alphas: Tensor, free: Tensor) -> None:
        self.start, self.end, self.alphas, self.free = start, end, alphas, free
        self.delta = end - start

    def straight(self, owners: Tensor, nodes: Tensor) -> Tensor:
        """The straight line's points at nodes ``nodes`` of images ``owners`` (n, C, H, W)."""
        return self.start[owners] + self.alphas[nodes].view(-1, 1, 1, 1) * self.delta[owners]

    def nodes(self, means: Tensor) -> Tensor:
        """All the path's nodes (B, S, C, H, W): the straight line, the moving nodes shifted by ``means``."""
        batch, count = self.start.shape[0], self.free.numel()
        line = self.start[:, None] + self.alphas.view(1, -1, 1, 1, 1) * self.delta[:, None]
        return line.index_add(1, self.free, means.view((batch, count) + tuple(self.start.shape[1:])))

    def pin(self, nodes: Tensor) -> Tensor:
        """``nodes`` with those at alpha = 0 set to the baseline and those at alpha = 1 to the image."""
        at_start = (self.alphas == 0).view(1, -1, 1, 1, 1)
        at_end = (self.alphas == 1).view(1, -1, 1, 1, 1)
        return torch.where(at_start, self.start[:, None], torch.where(at_end, self.end[:, None], nodes))

    def increments(self, nodes: Tensor, alphas: Tensor, weights: Tensor) -> Tensor:
        """``gamma(c_{k+1}) - gamma(c_k)`` (B, S, C, H, W): ``gamma`` the polyline through ``(0, start)``, the moving
        nodes at their ``alphas`` and ``(1, end)`` (float64 CPU ``alphas`` and ``weights``), ``c`` the cumulative
        weights (0 first, 1 last)."""
        moving = self.free.cpu()
        knot_alphas = torch.cat([alphas.new_zeros(1), alphas[moving], alphas.new_ones(1)])
        knots = torch.cat([self.start[:, None], nodes[:, self.free], self.end[:, None]], dim=1)
        cuts = torch.cat([weights.new_zeros(1), torch.cumsum(weights, 0)])
        cuts[-1] = 1.0
        segment = (torch.searchsorted(knot_alphas, cuts, right=True) - 1).clamp(0, knot_alphas.numel() - 2)
        fraction = (cuts - knot_alphas[segment]) / (knot_alphas[segment + 1] - knot_alphas[segment])
        segment = segment.to(nodes.device)
        fraction = fraction.to(device=nodes.device, dtype=nodes.dtype).view(1, -1, 1, 1, 1)
        points = knots[:, segment] + fraction * (knots[:, segment + 1] - knots[:, segment])
        return points[:, 1:] - points[:, :-1]


class RowAdam(Adam):
    """:class:`~attribution.core.optim.Adam` with a learning rate and a step count per row of the parameters
    (``like``'s shape), so that each image's optimiser can be restarted at a new rate on its own."""

    def __init__(self, lr: float, like: Tensor) -> None:
        super().__init__(lr)
        view = (-1,) + (1,) * (like.dim() - 1)
        self.lr = torch.full(like.shape[:1], lr, dtype=like.dtype, device=like.device).view(view)
        self.steps = torch.zeros_like(self.lr)

    def restart(self, rows: Tensor, lr: Tensor) -> None:
        """Zero the moments and the step count of ``rows`` (a (n,) mask) and set every row's rate to ``lr``, as
        a new ``torch.optim.Adam`` would start."""
        mask = rows.view_as(self.lr)
        self.lr = lr.to(self.lr.dtype).view_as(self.lr)
        self.steps = torch.where(mask, torch.zeros_like(self.steps), self.steps)
        if self.first is not None:
            self.first = torch.where(mask, torch.zeros_like(self.first), self.first)
            self.second = torch.where(mask, torch.zeros_like(self.second), self.second)


class Schedule:
    """The authors' learning-rate decay and early stop, per image: the loss of the first iteration only starts the
    record; after it, an iteration without a new best loss counts towards both patiences."""

    def __init__(self, batch: int, lr: float, device: torch.device) -> None:
        self.lr = torch.full((batch,), lr, dtype=torch.float64, device=device)
        self.best = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
        self.stale = torch.zeros(batch, dtype=torch.long, device=device)
        self.stale_lr = torch.zeros_like(self.stale)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.previous: Optional[Tensor] = None

    def update(self, loss: Tensor) -> Tensor:
        """Record the active images' losses (B,); the images whose rate dropped (their optimiser restarts)."""
        active = self.active
        if self.previous is None:
            self.previous = loss
            return torch.zeros_like(active)
        relative = (self.previous - loss) / self.previous
        better = loss < self.best
        self.best = torch.where(active & better, loss, self.best)
        self.stale = torch.where(better, 0, self.stale + 1)
        self.stale_lr = torch.where(better, 0, self.stale_lr + 1)
        drop = active & ~better & (self.stale_lr >= LR_PATIENCE) & (self.lr > MIN_LR)
        self.lr = torch.where(drop, (self.lr * LR_DECAY).clamp(min=MIN_LR), self.lr)
        self.stale_lr = torch.where(drop, 0, self.stale_lr)
        self.active = active & ~((relative < REL_IMPROVEMENT) & (self.stale >= PATIENCE))
        self.previous = torch.where(active, loss, self.previous)
        return drop


def energy_weights(steps: int, endpoint_matching: bool) -> Tensor:
    """The weight of each node's distance term (S,): 1, plus ``ENDPOINT_WEIGHT`` for each of the first and the
    last ``max(1, int(EDGE_FRACTION * steps))`` nodes it belongs to (both, when a path has a single node)."""
    weights = torch.ones(steps, dtype=torch.float64)
    if endpoint_matching:
        edge = max(1, int(EDGE_FRACTION * steps))
        weights[:edge] += ENDPOINT_WEIGHT
        weights[steps - edge:] += ENDPOINT_WEIGHT
    return weights


def row_norms(values: Tensor) -> Tensor:
    """The Euclidean norms of ``values`` (n, ...) along the last axis, summed per row (n,)."""
    return torch.linalg.vector_norm(values, dim=-1).flatten(1).sum(1)


def spread(values: Tensor, rows: Tensor, like: Tensor) -> Tensor:
    """``values`` (n, ...) placed at the sorted ``rows`` (n,) of a tensor shaped as ``like``, zeros elsewhere."""
    if rows.numel() == like.shape[0]:
        return values
    return torch.zeros_like(like).index_copy(0, rows, values)


def trainable(values: Tensor, keep_graph: bool) -> Tensor:
    """``values`` as a tensor to differentiate with respect to: itself when its graph is kept and it has one,
    else a detached copy that requires grad."""
    if keep_graph and values.requires_grad:
        return values
    return values.detach().requires_grad_(True)


def uniform_spacing(nodes: Tensor) -> Tensor:
    """The authors' ``make_uniform_spacing`` per image: each step ``k`` of the path ``nodes`` (B, S, C, H, W) is
    cut into ``n_k = floor(S |step_k| / max_j |step_j|)`` equal parts, the path's first node then every step's
    ``n_k + 1`` points (both its ends) listed in order, and ``S`` of the ``L`` listed points picked at the indices
    ``floor(i (L - 1) / (S - 1))``."""
    batch, count = nodes.shape[:2]
    if count < 2:
        return nodes
    with torch.no_grad():
        lengths = (nodes[:, 1:] - nodes[:, :-1]).flatten(2).norm(dim=2)
        longest = lengths.amax(1, keepdim=True)
        parts = torch.where(longest > 0, torch.floor(count * lengths / torch.where(longest > 0, longest, 1.0)),
                            torch.zeros_like(lengths)).long()
        sizes = parts + 1
        offsets = 1 + torch.cumsum(sizes, 1) - sizes  # where each step's points start in the list
        picks = torch.arange(count, device=nodes.device)[None] * sizes.sum(1, keepdim=True) // (count - 1)
        step = (torch.searchsorted(offsets, picks, right=True) - 1).clamp(min=0)
        within, of = (picks - offsets.gather(1, step)).clamp(min=0), parts.gather(1, step)
        fraction = within.to(torch.float64) / of.clamp(min=1).to(torch.float64)  # 0 where the step has no parts
    images = torch.arange(batch, device=nodes.device)[:, None]
    first, second = nodes[images, step], nodes[images, step + 1]
    return first + fraction.to(nodes.dtype).view(batch, count, 1, 1, 1) * (second - first)
