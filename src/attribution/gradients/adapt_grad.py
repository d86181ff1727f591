"""AdaptGrad: SmoothGrad whose noise is scaled pixel by pixel to stay inside the data domain."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from ..core.explainer import bound_option
from ..core.registry import register
from ..core.targets import Target
from .base import WrappingExplainer, accumulation_dtype
from .smoothgrad import noise_statistic
from .vanilla import VanillaGradient

Bound = Union[None, float, Tensor]


@register("adapt_grad")
class AdaptGrad(WrappingExplainer):
    """AdaptGrad: average a gradient method's maps over noisy copies of the image whose noise, pixel by pixel, leaves
    the data domain with probability at most ``1 - confidence``.

    Zhou, Ma, Wang, Wu & Shi, "AdaptGrad: Adaptive Sampling to Reduce Noise" (first version: "Rethinking the
    Principle of Gradient Smooth Methods in Model Explanation"), NeurIPS 2025, arXiv:2410.07711 (code:
    github.com/AiShare-WHU/AdaptGrad, ``saliency.py``).

    ``A = mean_s M(x + sigma * n_s)``, ``n_s ~ N(0, I)``, with a standard deviation per entry
    ``sigma_i = min(|x_i - low_i|, |high_i - x_i|) / (sqrt(2) erfinv(c))``: the noise stays within the distance
    ``d_i`` from ``x_i`` to the nearer bound of the domain ``[low, high]`` with probability ``c`` (``confidence``),
    so each noisy entry leaves the domain with probability at most ``1 - c`` (exactly ``1 - c`` midway between the
    bounds, ``(1 - c) / 2`` plus the far tail elsewhere; an entry on a bound gets no noise; ``c = 1``: no noise at all,
    the wrapped method's map, as in the authors' code where ``erfinv(1)`` is infinite).  ``M`` is the wrapped
    method (``method``, a gradient explainer class or registry name, default vanilla gradient: AdaptGrad proper;
    its options pass through); ``variant`` (``'smoothgrad'``, ``'smoothgrad_sq'``, ``'vargrad'``) and ``process``
    are SmoothGrad's statistics of the maps, and the noise is drawn as SmoothGrad draws it (standard-normal
    float32, image-major ``(B, samples, C, H, W)``, from ``generator`` if given, copies made in groups under a byte
    budget), so ``AdaptGrad`` is :class:`~attribution.gradients.smoothgrad.SmoothGrad` with another ``sigma``.

    ``low`` and ``high`` bound the data domain: a number, or a tensor that broadcasts to ``x`` ((C, 1, 1) per
    channel, (B, C, H, W) per entry); ``None`` (the default) takes each image's minimum and maximum over all its
    entries.  The authors pass the dataset's bounds as two numbers: ``(0, 1)`` for MNIST, ``(-2.117904, 2.64)``
    for ImageNet-normalised images (the extremes of ``(v - mean_c) / std_c`` over the channels, ``v`` in [0, 1]);
    a photo mostly spans that range (four of scikit-image's six colour photos exactly), so the per-image default
    is close to it without knowing the normalisation.  An entry outside ``[low, high]`` takes its distance to the
    nearer bound by absolute differences, as the authors' code does.

    Defaults samples=50, confidence=0.95 as the authors' experiment scripts (``n_samples``, ``adapt_alpha``;
    their comment suggests 0.95, 0.99, 0.995, 0.999), the logit of the target as their gradients.
    Cost: ``samples`` times the wrapped method's, plus a minimum and a maximum per image.

    Deliberate differences from the authors' code: their ``SmoothGradient`` averages the gradient at ``x`` itself
    with the ``samples`` noisy ones (``samples + 1`` maps, theirs ``= (samples * A + grad f(x)) / (samples +
    1)``); here only the noisy maps are averaged, as in SmoothGrad's Monte Carlo estimate that the paper builds
    on and in this library's SmoothGrad.  They drop the noisy gradients that hold a NaN; here a NaN propagates.
    They compose other methods around AdaptGrad (Integrated Gradients of AdaptGrad gradients, ``sigma``
    recomputed at every path point; Gradient x Input as ``x * AdaptGrad(x)``); here, as in SmoothGrad, the
    wrapped method runs at the noisy copies (``method='input_x_gradient'`` gives ``mean_s (x + e_s) * grad f(x +
    e_s)``; multiply the plain AdaptGrad map by ``x`` for theirs).
    """

    defaults = {"method": VanillaGradient, "samples": 50, "confidence": 0.95, "low": None, "high": None,
                "variant": "smoothgrad", "process": None, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, samples: int, confidence: float, low: Bound, high: Bound,
                 variant: str, process: Optional[Callable[[Tensor], Tensor]], generator: Optional[torch.Generator],
                 method: Any = None, **inner: Any) -> Tensor:
        sigma = adaptive_sigma(x, low, high, confidence)
        return noise_statistic(self.inner, x, target, sigma, samples=samples, variant=variant, process=process,
                               generator=generator, options=self._inner_options(inner, generator))


def adaptive_sigma(x: Tensor, low: Bound = None, high: Bound = None, confidence: float = 0.95) -> Tensor:
    """AdaptGrad's standard deviation of the noise for every entry of ``x`` (B, C, H, W), in float32 (float64 for
    float64 ``x``): the distance to the nearer bound over ``sqrt(2) erfinv(confidence)`` (see :class:`AdaptGrad`)."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence <= 1:
        raise ValueError(f"confidence must be a number in (0, 1], got {confidence!r}")
    low, high = bound_option(low, "low"), bound_option(high, "high")
    if isinstance(low, float) and isinstance(high, float) and not low < high:
        raise ValueError(f"low must be below high, got low={low}, high={high}")
    values = x.detach().to(accumulation_dtype(x))
    lower, upper = _limit(values, low, "low", torch.amin), _limit(values, high, "high", torch.amax)
    distance = torch.minimum((values - lower).abs(), (upper - values).abs())
    level = (1 + confidence) / 2
    quantile = NormalDist().inv_cdf(level) if level < 1 else math.inf  # sqrt(2) erfinv(c) = Phi^-1((1 + c) / 2)
    return distance / quantile


def _limit(values: Tensor, bound: Bound, name: str, reduce: Callable[..., Tensor]) -> Union[float, Tensor]:
    """A bound of the domain for ``values`` (B, C, H, W): each image's extreme for None, else as given."""
    if bound is None:
        return reduce(values, dim=tuple(range(1, values.dim())), keepdim=True)
    if isinstance(bound, float):
        return bound
    try:
        shape = torch.broadcast_shapes(bound.shape, values.shape)
    except RuntimeError:
        shape = None
    if shape != values.shape:
        raise ValueError(f"{name} of shape {tuple(bound.shape)} does not broadcast to the input's shape "
                         f"{tuple(values.shape)}")
    return bound.to(device=values.device, dtype=values.dtype)
