"""Kernel SHAP over image segments."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.explainer import optional_generator
from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec, make_baseline
from .segments import SegmentExplainer, coalition_scores

#: with at most this many proper coalitions (2^M - 2) the design enumerates them all instead of sampling
MAX_ENUMERATED = 1 << 14


def shapley_design(features: int, samples: int, generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """Coalitions (S, M) bool and their regression weights (S,).

    With at most ``samples`` (and :data:`MAX_ENUMERATED`) proper non-empty coalitions, all of them, weighted by the
    Shapley kernel ``(M - 1) / (C(M, k) k (M - k))`` (the regression then returns the exact Shapley values);
    otherwise ``samples`` draws from that kernel (the size ``k`` with probability proportional to
    ``(M - 1) / (k (M - k))``, then a uniform subset of that size), each weighted 1, drawn on ``generator``'s device
    (the CPU without one).
    """
    proper = (1 << features) - 2 if features < 63 else None
    if proper is not None and proper <= min(samples, MAX_ENUMERATED):
        codes = torch.arange(1, proper + 1)
        coalitions = (codes[:, None] >> torch.arange(features)) & 1 == 1
        sizes = coalitions.sum(1).double()
        binomial = torch.tensor([math.comb(features, int(k)) for k in sizes.tolist()], dtype=torch.float64)
        return coalitions, (features - 1) / (binomial * sizes * (features - sizes))
    device = generator.device if generator is not None else torch.device("cpu")
    sizes = torch.arange(1, features, dtype=torch.float64, device=device)
    size_probability = (features - 1) / (sizes * (features - sizes))
    drawn = torch.multinomial(size_probability, samples, replacement=True, generator=generator) + 1
    order = torch.rand((samples, features), generator=generator, device=device).argsort(dim=1)
    coalitions = torch.zeros((samples, features), dtype=torch.bool, device=device)
    coalitions.scatter_(1, order, torch.arange(features, device=device)[None, :] < drawn[:, None])
    return coalitions, torch.ones(samples, dtype=torch.float64, device=device)


def constrained_fit(coalitions: Tensor, weights: Tensor, values: Tensor, full: Tensor) -> Tensor:
    """Weighted least squares ``values ~ coalitions @ phi`` with ``sum phi = full``, for every image at once.

    ``coalitions`` (S, M), ``weights`` (S,), ``values`` (B, S) and ``full`` (B,) score changes relative to the
    baseline; returns phi (B, M).  The constraint is kept exactly by eliminating the last feature; the others are
    the minimum-norm least-squares solution, by the pseudo-inverse, so that designs of deficient rank (fewer
    independent coalitions than features) are solved alike on every device (``torch.linalg.lstsq`` has only the
    full-rank 'gels' driver on CUDA; on the CPU its 'gelsy' gives the same solution).
    """
    features = coalitions.shape[1]
    if features == 1:
        return full[:, None]
    z = coalitions.to(values.dtype)
    design = (z[:, :-1] - z[:, -1:]) * weights.to(values.dtype).sqrt()[:, None]  # (S, M-1)
    rhs = (values - z[:, -1] * full[:, None]) * weights.to(values.dtype).sqrt()  # (B, S)
    head = rhs @ torch.linalg.pinv(design).T  # (B, M-1)
    return torch.cat([head, full[:, None] - head.sum(1, keepdim=True)], dim=1)


@register("kernel_shap")
class KernelSHAP(SegmentExplainer):
    """Kernel SHAP: Shapley values of image segments, as the weighted linear regression that recovers them.

    Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017, arXiv:1705.07874.

    A segment present in coalition ``z`` keeps the image's pixels, an absent one takes the ``baseline``'s;
    ``phi = argmin sum_z pi(z) (f_t(z) - f_t(b) - z . phi)^2`` subject to ``sum phi = f_t(x) - f_t(b)`` (SHAP's
    exact efficiency constraint; Captum approximates it with a large weight on the empty and full coalitions).
    With few segments every coalition is evaluated under the Shapley kernel ``pi`` and the result is the exact
    Shapley values; otherwise ``samples`` coalitions drawn from the kernel (default SHAP's ``2 M + 2048``), shared
    by the images of a call (``generator`` makes them reproducible).  Segments: a ``grid`` x ``grid`` partition
    (default 8: 64 segments) or ``segments``: an (H, W) integer label map for every image, a (B, H, W) stack, one
    per image, or ``'quickshift'``/``'slic'`` superpixels (see :mod:`attribution.perturbation.segments`).
    ``baseline`` as Integrated Gradients' (default ``'zero'``, Captum's).  Every pixel of a segment gets the
    segment's value (as Captum's feature masks): (B, 1, H, W).  Cost: ``samples + 2`` forwards per image.
    """

    defaults = {"grid": 8, "segments": None, "samples": None, "baseline": "zero", "generator": None}

    def _explain_segments(self, x: Tensor, target: Target, labels: Tensor, *, samples: Optional[int],
                          baseline: BaselineSpec, generator: Optional[torch.Generator], batch_size: Optional[int],
                          create_graph: bool) -> Tensor:
        generator = optional_generator(generator)
        features = int(labels.max()) + 1
        if samples is None:
            samples = 2 * features + 2048
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int or None, got {samples!r}")
        coalitions, weights = shapley_design(features, samples, generator)
        coalitions, weights = coalitions.to(x.device), weights.to(x.device)
        # the image, the baseline, then every coalition
        plan = torch.cat([torch.ones(1, features, dtype=torch.bool, device=x.device),
                          torch.zeros(1, features, dtype=torch.bool, device=x.device), coalitions])
        with torch.set_grad_enabled(create_graph):
            values = coalition_scores(self, x, target, labels, plan, make_baseline(x, baseline), batch_size)
            origin = values[:, 1:2]
            phi = constrained_fit(coalitions, weights.to(values.dtype), values[:, 2:] - origin,
                                  values[:, 0] - origin[:, 0])
        return phi[:, labels].unsqueeze(1)
