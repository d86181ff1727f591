"""SmoothGrad and its variants, around any gradient method."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from .base import WrappingExplainer, accumulation_dtype
from .vanilla import VanillaGradient

VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")
#: at most this many bytes of noisy copies are held at once (copies are made in groups of samples)
NOISY_COPY_BYTES = 1 << 28


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
    the wrapped method pass through.  Standard-normal float32 noise is drawn image-major, ``(B, samples, C, H, W)``, from ``generator`` if
    given (as Captum's NoiseTunnel draws it), then scaled per image.
    Cost: ``samples`` times the wrapped method's.
    """

    defaults = {"method": VanillaGradient, "samples": 25, "std": 0.15, "variant": "smoothgrad", "process": None,
                "generator": None}

    def _explain(self, x: Tensor, target: Target, *, samples: int, std: float, variant: str,
                 process: Optional[Callable[[Tensor], Tensor]], generator: Optional[torch.Generator],
                 method: Any = None, **inner: Any) -> Tensor:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if process is not None and variant != "smoothgrad":
            raise ValueError("process applies to the 'smoothgrad' variant only; leave it None for the others")
        inner_options = {**{k: v for k, v in self.inner.defaults.items()}, **inner}
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        sigma = (std * (flat.amax(dim=1) - flat.amin(dim=1))).to(accumulation_dtype(x)).view(batch, 1, 1, 1, 1)
        first = torch.zeros(x.shape, dtype=accumulation_dtype(x), device=x.device)
        second = torch.zeros_like(first) if variant == "vargrad" else None
        per_image = x[0].numel() * x.element_size()
        group = max(1, min(samples, NOISY_COPY_BYTES // max(1, batch * per_image)))
        done = 0
        while done < samples:
            k = min(group, samples - done)
            noise = torch.randn((batch, k) + tuple(x.shape[1:]), generator=generator, device=x.device)
            noisy = (x.unsqueeze(1) + sigma * noise).to(x.dtype).reshape((batch * k,) + tuple(x.shape[1:]))
            maps = self.inner._explain(noisy, target.repeat(k), **inner_options).to(first.dtype)
            maps = maps.view((batch, k) + tuple(maps.shape[1:]))
            if variant == "smoothgrad_sq":
                first = first + maps.square().sum(1)
            else:
                first = first + (process(maps) if process is not None else maps).sum(1)
            if second is not None:
                second = second + maps.square().sum(1)
            done += k
        mean = first / samples
        if second is None:
            return mean
        return second / samples - mean.square()
