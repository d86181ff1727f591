"""Guided Integrated Gradients."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import positive_int
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, important_direction
from .paths import BaselineSpec, make_baseline

EPSILON = 1e-9
#: bound on the inner iterations of one step (each moves at least ``fraction`` of the features that can move)
MAX_INNER_ITERATIONS = 10_000


@register("guided_ig")
class GuidedIG(GradientExplainer):
    """Guided Integrated Gradients: an adaptive path that first moves the features with the smallest gradient.

    Kapishnikov, Venugopalan, Avci, Wedin, Terry & Birdal, "Guided Integrated Gradients: an Adaptive Path Method
    for Removing Noise", CVPR 2021, arXiv:2106.09788.

    At step ``k`` of ``steps`` the path point ``p`` must close the L1 distance to ``x`` down to
    ``(1 - k/steps) * |x - b|_1``; it does so by repeatedly moving the ``fraction`` of features with the smallest
    ``|grad f_t(p)|`` towards ``x``, never letting a feature's relative position leave
    ``[k/steps - max_dist, k/steps + max_dist]``.  ``A = sum over moves of (p_new - p_old) * grad f_t(p)``.
    PAIR ``saliency``'s algorithm and defaults (steps=200, fraction=0.25, max_dist=0.02, zero baseline), run in
    float64 as PAIR does, batched over images: each step is one forward and input-gradient backward of all images,
    and the per-image inner loops run together on the device.  Cost: ``steps`` forwards and backwards per image.
    """

    defaults = {"baseline": "zero", "steps": 200, "fraction": 0.25, "max_dist": 0.02}
    per_image_options = ("baseline",)

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        baseline: BaselineSpec,
        steps: int,
        fraction: float,
        max_dist: float,
        batch_size: Optional[int],
        create_graph: bool,
        idgi: bool = False,
    ) -> Tensor:
        """With ``idgi`` (set by :class:`~attribution.gradients.idgi.IDGI`): IDGI on the points where each step
        takes its gradient, then the image."""
        steps = positive_int(steps, "steps")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
        if isinstance(max_dist, bool) or not isinstance(max_dist, (int, float)) or not 0 <= max_dist <= 1:
            raise ValueError(f"max_dist must be a number in [0, 1], got {max_dist!r}")
        batch = x.shape[0]
        shape = (batch,) + (1,) * (x.dim() - 1)
        x_in = x.to(torch.float64)
        start = make_baseline(x, baseline).to(torch.float64)
        delta = x_in - start
        moving = delta != 0
        l1_total = delta.abs().flatten(1).sum(1)
        point = start.clone()
        attribution = torch.zeros_like(x_in)
        owners = torch.arange(batch, device=x.device)
        n_features = x[0].numel()
        kth = int(math.floor(fraction * (n_features - 1))) + 1  # numpy's quantile(..., method='lower')
        planner = RowPlanner(batch, batch_size, x.device)

        before: Optional[Tuple[Tensor, Tensor]] = None  # IDGI: the last point's (direction, score)

        for step in range(steps):
            scores, grad = (torch.cat(parts).to(torch.float64) for parts in zip(*(
                self._scores_and_input_gradients(point[a:b], owners[a:b], target, create_graph, planner)
                for a, b in planner)))
            if idgi:
                if before is not None:
                    attribution = attribution + before[0] * (scores - before[1]).view(shape)
                before = important_direction(grad), scores
            alpha = (step + 1.0) / steps
            alpha_min, alpha_max = max(alpha - max_dist, 0.0), min(alpha + max_dist, 1.0)
            x_min, x_max = start + alpha_min * delta, start + alpha_max * delta
            l1_target = l1_total * (1 - (step + 1) / steps)
            ranked = grad.detach().clone()
            active = l1_total > 0
            for _ in range(MAX_INNER_ITERATIONS):
                if not bool(active.any()):
                    break
                old = point
                rel = torch.where(moving, (point - start) / torch.where(moving, delta, 1.0), alpha_max)
                point = torch.where((rel < alpha_min) & active.view(shape), x_min, point)
                l1_current = (point - x_in).abs().flatten(1).sum(1)
                close = (l1_target - l1_current).abs() <= torch.maximum(
                    EPSILON * torch.maximum(l1_target.abs(), l1_current.abs()), torch.full_like(l1_target, EPSILON)
                )
                moving_now = active & ~close
                ranked = torch.where(point == x_max, math.inf, ranked)
                magnitude = ranked.abs().flatten(1)
                threshold = magnitude.kthvalue(kth, dim=1).values
                chosen = (magnitude <= threshold[:, None]) & (magnitude != math.inf)
                chosen = chosen.view_as(point) & moving_now.view(shape)
                l1_chosen = ((point - x_max).abs() * chosen).flatten(1).sum(1)
                gamma = torch.where(l1_chosen > 0, (l1_current - l1_target) / l1_chosen, math.inf)
                full = (gamma > 1).view(shape)
                partial_step = point + (x_max - point) * gamma.clamp(max=1).view(shape)
                point = torch.where(chosen, torch.where(full, x_max, partial_step), point)
                if not idgi:
                    attribution = attribution + (point - old) * grad
                # l1_chosen == 0: every feature already sits at x_max, nothing is left to move this step
                active = moving_now & (gamma > 1) & (l1_chosen > 0)
        if idgi and before is not None:  # the path ends at the image
            with torch.set_grad_enabled(create_graph):
                end = torch.cat([target(self._forward(x[a:b]), owners[a:b]) for a, b in planner]).to(torch.float64)
            attribution = attribution + before[0] * (end - before[1]).view(shape)
        return attribution
