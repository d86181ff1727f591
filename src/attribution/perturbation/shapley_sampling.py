"""Shapley value sampling over image segments: marginal contributions along random orderings."""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch import Tensor

from ..core.explainer import optional_generator
from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec, make_baseline
from .segments import SegmentExplainer, coalition_scores


def orderings(features: int, samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """(P, M) orderings of the features: all ``M!`` of them when there are at most ``samples``, else ``samples``
    draws of ``torch.randperm`` (one after another, from ``generator``, on its device: the CPU without one)."""
    if math.factorial(min(features, 20)) <= samples:
        return torch.tensor(list(itertools.permutations(range(features))), dtype=torch.long)
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.stack([torch.randperm(features, generator=generator, device=device) for _ in range(samples)])


def shapley_from_prefixes(values: Tensor, full: Tensor, order: Tensor) -> Tensor:
    """(B, C) mean marginal contributions along the orderings ``order`` (P, C).

    ``values`` (B, 1 + P (C - 1)) holds the scores of the empty coalition (column 0), then, ordering by ordering,
    those of its first 1, ..., C - 1 players (segments, channels); ``full`` (B,) is the score with every player.
    Adding player ``order[p, j]`` moves ordering ``p`` from its prefix ``j`` to its prefix ``j + 1``.  Shared by
    Shapley value sampling and Shap-CAM."""
    batch = values.shape[0]
    count, channels = order.shape
    chain = torch.cat([values[:, :1].expand(batch, count)[..., None],
                       values[:, 1:].reshape(batch, count, channels - 1),
                       full[:, None, None].expand(batch, count, 1)], dim=2)  # (B, P, C + 1)
    gains = chain.diff(dim=2)  # (B, P, C)
    phi = values.new_zeros(batch, channels).index_add(1, order.flatten(), gains.reshape(batch, -1))
    return phi / count


@register("shapley_sampling")
class ShapleyValueSampling(SegmentExplainer):
    """Shapley value sampling: each segment's mean marginal contribution over random orderings of the segments.

    Castro, Gomez & Tejada, "Polynomial calculation of the Shapley value based on sampling", Computers & Operations
    Research 36(5), 2009; Strumbelj & Kononenko, "An Efficient Explanation of Individual Classifications using Game
    Theory", JMLR 11, 2010.

    For each ordering ``pi`` of the ``M`` segments, the segments are added one at a time to the ``baseline``
    (absent segments take its pixels); the change of the target's score when segment ``i`` is added is its marginal
    contribution, and ``phi_i`` is the mean over orderings: an unbiased estimate of the Shapley value, exact when
    all ``M!`` orderings are used (they are, when ``samples >= M!``), and efficient in every ordering: ``sum phi =
    f_t(x) - f_t(b)``.  ``samples=25`` orderings (Captum's ``ShapleyValueSampling`` default), drawn with
    ``torch.randperm`` from ``generator`` and shared by the images of a call; with the same draws it equals Captum's.
    Segments and baseline as :class:`~attribution.perturbation.kernel_shap.KernelSHAP` (a ``grid`` x ``grid``
    partition, default 8, or ``segments``: a label map, one per image or superpixels; ``'zero'`` baseline); every pixel of a segment gets the
    segment's value: (B, 1, H, W).  Cost: ``samples x (M - 1) + 2`` forwards per image (the empty and the full
    coalition are shared by the orderings).
    """

    defaults = {"grid": 8, "segments": None, "samples": 25, "baseline": "zero", "generator": None}

    def _explain_segments(self, x: Tensor, target: Target, labels: Tensor, *, samples: int,
                          baseline: BaselineSpec, generator: Optional[torch.Generator], batch_size: Optional[int],
                          create_graph: bool) -> Tensor:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        generator = optional_generator(generator)
        features = int(labels.max()) + 1
        order = orderings(features, samples, generator).to(x.device)  # (P, M)
        position = torch.empty_like(order).scatter_(1, order, torch.arange(features, device=x.device).expand_as(order))
        steps = torch.arange(1, features, device=x.device)
        prefixes = position[:, None, :] < steps[None, :, None]  # (P, M - 1, M): the first k segments of each ordering
        plan = torch.cat([torch.zeros(1, features, dtype=torch.bool, device=x.device), prefixes.reshape(-1, features),
                          torch.ones(1, features, dtype=torch.bool, device=x.device)])
        with torch.set_grad_enabled(create_graph):
            values = coalition_scores(self, x, target, labels, plan, make_baseline(x, baseline), batch_size)
            phi = shapley_from_prefixes(values[:, :-1], values[:, -1], order)
        return phi[:, labels].unsqueeze(1)
