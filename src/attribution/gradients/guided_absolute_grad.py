"""Guided AbsoluteGrad: gradient magnitudes of noisy copies, weighted by a guide made from their variance."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..cam.base import min_max_scale
from ..core.explainer import non_negative_number, optional_generator, positive_int
from ..core.registry import register
from ..core.targets import Target
from . import smoothgrad
from .base import WrappingExplainer
from .vanilla import VanillaGradient


def linear_quantile(values: Tensor, fraction: float) -> Tensor:
    """The ``fraction`` quantile of each row of ``values`` (N, L), linearly interpolated between order statistics
    as ``torch.quantile`` (and NumPy's default) does, (N, 1); no size limit, differentiable w.r.t. the values."""
    position = fraction * (values.shape[1] - 1)
    low = int(position)
    high = min(low + 1, values.shape[1] - 1)
    below = values.kthvalue(low + 1, dim=1, keepdim=True).values
    if high == low or position == low:
        return below
    above = values.kthvalue(high + 1, dim=1, keepdim=True).values
    return below + (above - below) * (position - low)


def variance_guide(variance: Tensor, percentile: float) -> Tensor:
    """The guide of (B, C, H, W) gradient variances: 1 where a pixel's variance exceeds the ``percentile``-th
    percentile of its channel's variances in its image, the variance itself elsewhere."""
    flat = variance.flatten(2)
    threshold = linear_quantile(flat.flatten(0, 1), percentile / 100.0).view(flat.shape[:2] + (1,))
    return torch.where(flat > threshold, torch.ones_like(flat), flat).view_as(variance)


@register("guided_absolute_grad")
class GuidedAbsoluteGrad(WrappingExplainer):
    """Guided AbsoluteGrad: the gradients' magnitudes summed over noisy copies, kept where they vary the most.

    Huang & Liu, "Guided AbsoluteGrad: Magnitude of Gradients Matters to Explanation's Localization and Saliency",
    Canadian Conference on Artificial Intelligence (Canadian AI) 2024, arXiv:2404.15564.

    With ``g_s = M(x + e_s)``, ``s = 1 .. samples``, the wrapped method's maps (``method``, default the vanilla
    gradient, any gradient explainer class or registry name; its options pass through) at SmoothGrad's noisy copies
    (``e_s ~ N(0, (std * (max x - min x))^2)`` per image), ``V = var_s g_s`` (unbiased, per pixel and channel) and
    ``q_c`` the ``percentile``-th percentile of ``V`` over channel ``c``'s pixels of each image::

        guide = 1 where V > q_c, V elsewhere;   A = minmax( sum_c guide * sum_s |g_s| )

    (B, 1, H, W) in [0, 1] (per-image min-max; 0 for a constant map).  ``percentile=None`` leaves the guide out:
    AbsoluteGrad, ``minmax(sum_c sum_s |g_s|)``.  Where the variance is zero everywhere (a model linear in its
    input, or ``std=0``) the guide is zero and so is the map.

    Formula and defaults follow the authors' code (github.com/youyinnn/Guided-AbsoluteGrad,
    ``cv_exp/gradient/base.py::aggregate_saliency_maps``, whose comments point to the paper's Eq. 5-6 and line 16
    of its Algorithm 1): ``samples=10`` (their function's default, their ISIC and Places365 runs; ImageNet used 20),
    ``std=0.15`` (their ``std_spread``, every run), ``percentile=85`` (their ``th=0.85``: the run their evaluation
    notebook's ImageNet comparison with the other methods names Guided AbsoluteGrad, run in all three case studies;
    their function's default ``th=0`` turns the guide off, i.e. ``percentile=None`` here).  The noise is
    SmoothGrad's (same draws for the same ``generator``), so ``percentile=None`` equals the channel sum of
    ``SmoothGrad(process=abs)``, min-max scaled.  Cost: ``samples`` times the wrapped method's (vanilla:
    ``samples`` x (fwd + input-gradient bwd)); the variance is kept as running sums, so memory does not grow with
    ``samples``.

    Deliberate differences from the authors' code: the noise scale uses each image's own value range (theirs: the
    whole batch's, so an image's map depended on the other images); ``target=None`` explains each image's class on
    the clean image (theirs: the arg-max of each noisy copy); a constant map becomes 0 (theirs: NaN, then 1 when
    the whole batch is NaN, else 0).  Their code also applies the same guided sum to the steps of IG, Blur IG and
    Guided IG; ``method`` here wraps a method inside the noise instead (e.g. noisy copies through guided backprop).
    """

    kind = "magnitude"
    defaults = {"method": VanillaGradient, "samples": 10, "std": 0.15, "percentile": 85.0, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, samples: int, std: float, percentile: Optional[float],
                 generator: Optional[torch.Generator], method: Any = None, **inner: Any) -> Tensor:
        samples = positive_int(samples, "samples")
        check_options(samples, std, percentile, generator)
        options = self._inner_options(inner, generator)
        magnitude: Any = 0.0
        spread = Spread()
        sigma = smoothgrad.range_sigma(x, float(std))
        for maps in smoothgrad.noisy_map_groups(self.inner, x, target, samples, sigma, generator, options):
            magnitude = magnitude + maps.abs().sum(dim=1)
            if percentile is not None:
                spread.add(maps)
        if percentile is not None:
            magnitude = magnitude * variance_guide(spread.variance(), float(percentile))
        return min_max_scale(magnitude.sum(dim=1, keepdim=True))


class Spread:
    """Running per-pixel variance of maps added in groups (B, k, ...): sums of the deviations from the first map
    (held constant), so that equal maps give exactly zero and large means do not swamp small variances."""

    def __init__(self) -> None:
        self.shift: Optional[Tensor] = None
        self.count = 0
        self.first: Any = 0.0
        self.second: Any = 0.0

    def add(self, maps: Tensor) -> None:
        if self.shift is None:
            self.shift = maps[:, :1].detach()
        deviation = maps - self.shift
        self.first = self.first + deviation.sum(dim=1)
        self.second = self.second + deviation.square().sum(dim=1)
        self.count += maps.shape[1]

    def variance(self) -> Tensor:
        """The unbiased variance over the maps added (at least two)."""
        return ((self.second - self.first.square() / self.count) / (self.count - 1)).clamp(min=0)


def check_options(samples: int, std: Any, percentile: Any, generator: Any) -> None:
    """A ValueError/TypeError that names the offending option."""
    non_negative_number(std, "std")
    if percentile is not None and (isinstance(percentile, bool) or not isinstance(percentile, (int, float))
                                   or not 0 <= percentile <= 100):
        raise ValueError(f"percentile must lie in [0, 100] or be None (no guide), got {percentile!r}")
    if percentile is not None and samples < 2:
        raise ValueError(f"samples must be at least 2 for the variance guide, got {samples}; "
                         "percentile=None computes AbsoluteGrad without it")
    optional_generator(generator)
