"""Integrated Decision Gradients."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline


def decision_samples(scores: Tensor, steps: int) -> Tuple[Tensor, Tensor]:
    """Where to sample each image's path: (alphas, widths), each (B, steps), from its scores (B, steps) at
    ``linspace(0, 1, steps)``.

    Each of the ``steps - 1`` intervals gets samples in proportion to the rise of the score across it, as the
    authors' code counts them: slopes min-max scaled together with a leading 0, shares of ``steps`` rounded down,
    the samples left over going first to intervals that got none (largest share first), then by largest remainder.
    An interval's ``n`` samples split it evenly (its left end first), each standing for a width ``dx / n``.
    """
    batch = scores.shape[0]
    intervals = steps - 1
    dx = 1.0 / intervals
    slopes = torch.cat([torch.zeros_like(scores[:, :1]), (scores[:, 1:] - scores[:, :-1]) / dx], dim=1)
    low, high = slopes.amin(1, keepdim=True), slopes.amax(1, keepdim=True)
    scaled = ((slopes - low) / (high - low).clamp(min=torch.finfo(slopes.dtype).tiny))[:, 1:]
    total = scaled.sum(1, keepdim=True)
    share = torch.where(total > 0, scaled / total.clamp(min=torch.finfo(slopes.dtype).tiny),
                        torch.full_like(scaled, 1.0 / intervals)) * steps
    counts = share.floor().long()
    left = steps - counts.sum(1, keepdim=True)
    priority = torch.where(counts == 0, 2.0 + share, share - share.floor())
    rank = priority.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    counts = counts + (rank < left).long()
    ends = counts.cumsum(1)  # (B, intervals)
    sample = torch.arange(steps, device=scores.device).expand(batch, steps).contiguous()
    interval = torch.searchsorted(ends, sample, right=True)
    n = counts.gather(1, interval)
    within = sample - (ends.gather(1, interval) - n)
    alphas = (interval + within / n) * dx
    return alphas.to(scores.dtype), (dx / n).to(scores.dtype)


@register("idg")
class IntegratedDecisionGradients(GradientExplainer):
    """Integrated Decision Gradients: Integrated Gradients weighted by how fast the score rises along the path, with
    the samples placed where it rises.

    Walker, Jha, Chen & Ewetz, "Integrated Decision Gradients: Compute Your Attributions Where the Model Makes Its
    Decision", AAAI 2024, arXiv:2305.20052.

    ``A = (x - b) * integral_0^1 (d f_t / d a) grad f_t(b + a (x - b)) da`` with ``d f_t / d a = grad f_t . (x - b)``,
    approximated by ``sum_j w_j s_j g_j`` over ``steps`` points placed by :func:`decision_samples` from a first pass
    of ``steps`` forwards at evenly spaced points.  Defaults: ``steps=50`` (our choice), zero baseline and logits
    as the authors' code.  Deliberate differences from that code: each interval's samples lie in that interval
    (the code starts every interval that gets samples where the previous one that got samples ended, so the points
    crowd towards the baseline and stop short of the image when some interval gets none), and the sum is not
    divided by ``steps`` (the paper's integral).  Cost: ``steps`` forwards, then ``steps`` forwards and
    input-gradient backwards per image.
    """

    defaults = {"baseline": "zero", "steps": 50}

    def _explain(self, x: Tensor, target: Target, *, baseline: BaselineSpec, steps: int,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        dtype = accumulation_dtype(x)
        start = make_baseline(x, baseline).to(dtype)
        delta = x.to(dtype) - start
        batch = x.shape[0]
        grid = torch.linspace(0, 1, steps, dtype=dtype, device=x.device)
        first = torch.empty(batch * steps, dtype=dtype, device=x.device)
        with torch.no_grad():
            for a, b in RowPlanner(batch * steps, batch_size, x.device):
                index = torch.arange(a, b, device=x.device)
                owners, step = index // steps, index % steps
                rows = start[owners] + grid[step].view(-1, 1, 1, 1) * delta[owners]
                first[a:b] = target(self._forward(rows.to(x.dtype)), owners).to(dtype)
        alphas, widths = decision_samples(first.view(batch, steps), steps)
        total = torch.zeros_like(delta)
        planner = RowPlanner(batch * steps, batch_size, x.device)
        for a, b in planner:
            index = torch.arange(a, b, device=x.device)
            owners, step = index // steps, index % steps
            rows = start[owners] + alphas[owners, step].view(-1, 1, 1, 1) * delta[owners]
            _, grads = self._scores_and_input_gradients(rows.to(x.dtype), owners, target, create_graph, planner)
            grads = grads.to(dtype)
            rise = (grads * delta[owners]).flatten(1).sum(1)
            contribution = (widths[owners, step] * rise).view(-1, 1, 1, 1) * grads
            total = total.index_add(0, owners, contribution) if create_graph else total.index_add_(0, owners,
                                                                                                  contribution)
        return delta * total
