"""SmoothGrad and its variants, around any gradient method."""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import Tensor

from ..core.explainer import non_negative_number, positive_int
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, WrappingExplainer, accumulation_dtype, per_image_rows
from .vanilla import VanillaGradient

VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")
#: at most this many bytes of noisy copies are held at once (copies are made in groups of samples)
NOISY_COPY_BYTES = 1 << 28
#: the noise of all samples of all images is drawn in one go when it takes at most this many bytes (float32)
NOISE_BYTES = 1 << 30


@register("smoothgrad")
class SmoothGrad(WrappingExplainer):
    """SmoothGrad: average a gradient method's maps over noisy copies of the image.

    Smilkov, Thorat, Kim, Viegas & Wattenberg, "SmoothGrad: removing noise by adding noise", arXiv:1706.03825,
    2017; VarGrad: Adebayo, Gilmer, Goodfellow & Kim, "Local Explanation Methods for Deep Neural Networks Lack
    Sensitivity to Parameter Values", ICLR workshop 2018, arXiv:1810.03307.

    With ``e_s ~ N(0, (std * (max x - min x))^2)`` per image (noise relative to each image's value range) and
    ``M`` the wrapped method (``method``, any gradient explainer class or registry name, default vanilla gradient):
    ``'smoothgrad'``: ``mean_s M(x + e_s)``; ``'smoothgrad_sq'``: ``mean_s M(x + e_s)^2``; ``'vargrad'``:
    ``var_s M(x + e_s)`` (population variance).  ``process`` (the seed's option), a callable applied to each map
    before averaging, generalises the first two.  Defaults samples=25, std=0.15 as PAIR and the seed.  Options of
    the wrapped method pass through; one that holds a tensor per image (a (B, C, H, W) ``baseline``) is repeated
    with the noisy copies.  The noise is drawn as :func:`noisy_map_groups` says: standard-normal float32 noise,
    image-major, ``(B, samples, C, H, W)`` in one draw from ``generator`` (or the default generator of ``x``'s
    device), as Captum's NoiseTunnel draws it (the same seed gives the same noise), then scaled per image; only
    when that draw would exceed ``NOISE_BYTES`` (1 GiB: up to 55 samples of 32 images of 3 x 224 x 224) and the
    noisy copies come in several groups is it drawn group by group, and then depends on the group size.
    Cost: ``samples`` times the wrapped method's.
    """

    defaults = {"method": VanillaGradient, "samples": 25, "std": 0.15, "variant": "smoothgrad", "process": None,
                "generator": None}

    def _explain(self, x: Tensor, target: Target, *, samples: int, std: float, variant: str,
                 process: Optional[Callable[[Tensor], Tensor]], generator: Optional[torch.Generator],
                 method: Any = None, **inner: Any) -> Tensor:
        return noise_statistic(self.inner, x, target, range_sigma(x, std), samples=samples, variant=variant,
                               process=process, generator=generator,
                               options=self._inner_options(inner, generator))


def range_sigma(x: Tensor, std: float) -> Tensor:
    """SmoothGrad's standard deviation of the noise, ``std * (max - min)`` of each image, (B, 1, 1, 1) in the
    accumulation dtype."""
    std = non_negative_number(std, "std")
    flat = x.reshape(x.shape[0], -1)
    return (std * (flat.amax(dim=1) - flat.amin(dim=1))).to(accumulation_dtype(x)).view(-1, 1, 1, 1)


def noisy_map_groups(inner: GradientExplainer, x: Tensor, target: Target, samples: int, sigma: Tensor,
                     generator: Optional[torch.Generator], options: Dict[str, Any]) -> Iterator[Tensor]:
    """The maps of ``inner`` (run with ``options``) at ``samples`` noisy copies ``x + sigma * n`` of each image, group
    by group.

    ``sigma`` (B, ...) broadcasts to ``x`` (B, C, H, W) image by image (SmoothGrad: (B, 1, 1, 1), AdaptGrad: (B, C,
    H, W)).  ``n`` is standard-normal float32 noise from ``generator`` if given (else the default generator of
    ``x``'s device): one draw of ``(B, samples, C, H, W)`` (image-major, as Captum's NoiseTunnel draws it), so that
    it does not depend on how the copies are grouped, when that takes at most ``NOISE_BYTES`` (it is then held until
    the last group is made); beyond, one draw of ``(B, k, C, H, W)`` per group (then the noise depends on the
    group size, and so on ``B``).  A group holds at most
    ``NOISY_COPY_BYTES`` of noisy copies: ``k = min(samples, NOISY_COPY_BYTES // (B * bytes of one image))``, at
    least 1.  ``inner``'s per-image options (:func:`~attribution.gradients.base.per_image_rows`) are repeated with
    the copies.  Yields (B, k, ...) maps in the accumulation dtype (float64 for float64 input, float32 otherwise),
    ``k`` summing to ``samples``.
    """
    batch, shape = x.shape[0], tuple(x.shape[1:])
    scale = sigma.to(accumulation_dtype(x)).unsqueeze(1)  # (B, 1, ...) against the noise's (B, k, C, H, W)
    per_image = x[0].numel() * x.element_size()
    group = max(1, min(samples, NOISY_COPY_BYTES // max(1, batch * per_image)))
    device = generator.device if generator is not None else x.device
    at_once = group == samples or batch * samples * x[0].numel() * 4 <= NOISE_BYTES
    drawn = torch.randn((batch, samples) + shape, generator=generator, device=device) if at_once else None
    done = 0
    while done < samples:
        k = min(group, samples - done)
        if drawn is not None:
            noise = drawn[:, done:done + k].to(x.device)
        else:
            noise = torch.randn((batch, k) + shape, generator=generator, device=device).to(x.device)
        noisy = (x.unsqueeze(1) + scale * noise).to(x.dtype).reshape((batch * k,) + shape)
        maps = inner._explain(noisy, target.repeat(k), **per_image_rows(inner, options, batch, k))
        maps = maps.to(accumulation_dtype(x))
        yield maps.view((batch, k) + tuple(maps.shape[1:]))
        done += k


def noise_statistic(inner: GradientExplainer, x: Tensor, target: Target, sigma: Tensor, *, samples: int,
                    variant: str, process: Optional[Callable[[Tensor], Tensor]],
                    generator: Optional[torch.Generator], options: Dict[str, Any]) -> Tensor:
    """SmoothGrad's statistic ``variant`` of the maps of :func:`noisy_map_groups`: ``'smoothgrad'``, the mean of
    ``process(map)`` (of the map when ``process`` is None); ``'smoothgrad_sq'``, the mean of ``map^2``;
    ``'vargrad'``, their population variance."""
    samples = positive_int(samples, "samples")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if process is not None and not callable(process):
        raise TypeError(f"process must be a callable or None, got {process!r}")
    if process is not None and variant != "smoothgrad":
        raise ValueError("process applies to the 'smoothgrad' variant only; leave it None for the others")
    first: Any = 0.0  # shaped by the maps: (B, C, H, W), or (B, 1, H, W) for a 'magnitude' method
    second: Any = 0.0 if variant == "vargrad" else None
    for maps in noisy_map_groups(inner, x, target, samples, sigma, generator, options):
        if variant == "smoothgrad_sq":
            first = first + maps.square().sum(1)
        else:
            first = first + (process(maps) if process is not None else maps).sum(1)
        if second is not None:
            second = second + maps.square().sum(1)
    mean = first / samples
    if second is None:
        return mean
    return second / samples - mean.square()
