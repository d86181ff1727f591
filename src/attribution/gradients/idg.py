"""Integrated Decision Gradients."""
from __future__ import annotations

import numbers
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


SLOPES = ("difference", "derivative")


@register("idg")
class IntegratedDecisionGradients(GradientExplainer):
    """Integrated Decision Gradients: Integrated Gradients weighted by how fast the score rises along the path, with
    the samples placed where it rises.

    Walker, Jha, Chen & Ewetz, "Integrated Decision Gradients: Compute Your Attributions Where the Model Makes Its
    Decision", AAAI 2024, arXiv:2305.20052.

    ``A = (x - b) * integral_0^1 (d f_t / d a) grad f_t(b + a (x - b)) da``, approximated by ``sum_j w_j s_j g_j``
    over ``steps`` points ``a_j`` placed by :func:`decision_samples` from a first pass of ``steps`` forwards at evenly
    spaced points (``g_j`` the gradient there, ``w_j`` the width the point stands for).  The slope ``s_j`` estimates
    ``d f_t / d a`` at ``a_j``: with ``slope='difference'`` (the default, as the authors' code,
    chasewalker26/Integrated-Decision-Gradients ``saliencyMethods.IDG``) it is the backward difference of the
    score at consecutive points, ``(f_t(a_j) - f_t(a_{j-1})) / (a_j - a_{j-1})``, and 0 at the first point
    (``j = 0``); with ``slope='derivative'`` it is the exact derivative ``grad f_t(a_j) . (x - b)`` (the paper's
    ``d F / d a`` itself; it costs nothing more).  Defaults: ``steps=50`` (our choice), zero baseline, logits and
    the difference slope as the authors' code.  Deliberate differences from that code: each interval's samples lie
    in that interval (the code starts every interval that gets samples where the previous one that got samples
    ended, so the points crowd towards the baseline and stop short of the image when some interval gets none), and
    the sum is not divided by ``steps`` (the paper's integral).  The path points are formed in float32 (float64 for
    float64 input) and handed to the model in its own dtype, as in Integrated Gradients.  Cost: ``steps``
    forwards, then ``steps`` forwards and input-gradient backwards per image.
    """

    defaults = {"baseline": "zero", "steps": 50, "slope": "difference"}
    per_image_options = ("baseline",)

    def _explain(self, x: Tensor, target: Target, *, baseline: BaselineSpec, steps: int, slope: str,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        if slope not in SLOPES:
            raise ValueError(f"slope must be one of {SLOPES}, got {slope!r}")
        steps = int(steps)
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
                first[a:b] = target(self._forward(rows), owners).to(dtype)
        alphas, widths = decision_samples(first.view(batch, steps), steps)
        total = torch.zeros_like(delta)
        planner = RowPlanner(batch * steps, batch_size, x.device)
        before: Optional[Tuple[Tensor, Tensor]] = None  # the last row's (score, alpha), for the next pass
        for a, b in planner:
            index = torch.arange(a, b, device=x.device)
            owners, step = index // steps, index % steps
            alpha = alphas[owners, step]
            rows = start[owners] + alpha.view(-1, 1, 1, 1) * delta[owners]
            scores, grads = self._scores_and_input_gradients(rows, owners, target, create_graph, planner)
            grads = grads.to(dtype)
            if slope == "derivative":
                rise = (grads * delta[owners]).flatten(1).sum(1)
            else:  # rows are image-major: the previous sample of an image is the previous row
                scores = scores.to(dtype)
                if before is None:
                    before = torch.zeros_like(scores[:1]), torch.zeros_like(alpha[:1])
                previous = torch.cat([before[0], scores[:-1]]), torch.cat([before[1], alpha[:-1]])
                later = step > 0
                gap = torch.where(later, alpha - previous[1], torch.ones_like(alpha))
                rise = torch.where(later, (scores - previous[0]) / gap, torch.zeros_like(scores))
                before = scores[-1:], alpha[-1:]
            contribution = (widths[owners, step] * rise).view(-1, 1, 1, 1) * grads
            total = total.index_add(0, owners, contribution) if create_graph else total.index_add_(0, owners,
                                                                                                  contribution)
        return delta * total
