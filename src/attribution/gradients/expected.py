"""Expected Gradients and GradientSHAP (the same with noise on the image)."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..core.explainer import non_negative_number, positive_int
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline


def reference_set(x: Tensor, references: BaselineSpec) -> Optional[Tensor]:
    """The references drawn from, (N, C, H, W) in the accumulation dtype, or None when each image has its own one
    reference (``references`` a name or a number, see :func:`attribution.gradients.paths.make_baseline`)."""
    if not isinstance(references, Tensor):
        return None
    refs = references.unsqueeze(0) if references.dim() == 3 else references
    if refs.dim() != 4 or tuple(refs.shape[1:]) != tuple(x.shape[1:]) or refs.shape[0] == 0:
        raise ValueError(f"references must be a (N, C, H, W) tensor of images shaped like x's {tuple(x.shape[1:])} "
                         f"(or one (C, H, W) image), got shape {tuple(references.shape)}")
    return refs.to(device=x.device, dtype=accumulation_dtype(x))


def expected_paths(x: Tensor, references: BaselineSpec, samples: int, noise_scale: Optional[Tensor],
                   generator: Optional[torch.Generator]) -> Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``paths(owners, step)``: ``(r_s + a_s (x + e_s - r_s), x + e_s - r_s)`` for sample ``step`` of each owner's
    image, in the accumulation dtype: Expected Gradients' draws, made once per call in this order and shared by the
    images: ``samples`` reference indices (uniform over ``references``, see :func:`reference_set`; a name or number
    gives each image its one reference), ``samples`` points ``a_s ~ U(0, 1)`` (float64), then, when
    ``noise_scale`` (B,) is given, standard-normal noise (samples, C, H, W) in the accumulation dtype, ``e_s`` being
    it times the owner's scale."""
    dtype = accumulation_dtype(x)
    refs = reference_set(x, references)
    own = make_baseline(x, references, "references").to(dtype) if refs is None else None
    draw_device = generator.device if generator is not None else torch.device("cpu")
    count = 1 if refs is None else refs.shape[0]
    chosen = torch.randint(0, count, (samples,), generator=generator, device=draw_device).to(x.device)
    alphas = torch.rand(samples, generator=generator, device=draw_device, dtype=torch.float64)
    alphas = alphas.to(device=x.device, dtype=dtype)
    noise = None
    if noise_scale is not None:
        noise = torch.randn((samples,) + tuple(x.shape[1:]), generator=generator, device=draw_device,
                            dtype=dtype).to(x.device)
        noise_scale = noise_scale.to(device=x.device, dtype=dtype).view(-1, 1, 1, 1)
    images = x.to(dtype)

    def paths(owners: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
        start = own[owners] if refs is None else refs[chosen[step]]
        end = images[owners] if noise is None else images[owners] + noise_scale[owners] * noise[step]
        delta = end - start
        return start + alphas[step].view(-1, 1, 1, 1) * delta, delta

    return paths


@register("expected_gradients")
class ExpectedGradients(GradientExplainer):
    """Expected Gradients: Integrated Gradients averaged over references drawn from a data distribution, with the
    point on each path drawn at random too.

    Erion, Janizek, Sturmfels, Lundberg & Lee, "Improving performance of deep learning models with axiomatic
    attribution priors and expected gradients", Nature Machine Intelligence 2021, arXiv:1906.10670.

    ``A = E_{r ~ R, a ~ U(0, 1)} [(x - r) * grad f_t(r + a (x - r))]``, estimated with ``samples`` draws of a
    reference ``r`` (uniformly from ``references``, a (N, C, H, W) tensor such as a batch of training images) and
    of ``a``; ``E[sum A] = f_t(x) - E_r f_t(r)``.  The draws are made once per call and shared by the images of the
    batch (``generator`` makes them reproducible), so an image's map does not depend on the other images.
    ``references`` may also be a name or number as Integrated Gradients' ``baseline`` (then each image has its one
    reference and the method is Integrated Gradients with random points).  ``stdevs > 0`` adds Gaussian noise of
    that standard deviation to the image in every sample, ``A = E[(x + e - r) * grad f_t(r + a (x + e - r))]``:
    GradientSHAP, the same estimator as Captum's ``GradientShap`` (whose ``stdevs`` it is; 0 by default here) and
    SHAP's ``GradientExplainer`` with local smoothing; the noise is drawn once per call too, (samples, C, H, W),
    and shared by the images.  ``samples=200`` as SHAP's default.  Cost: ``samples`` forwards and input-gradient
    backwards per image.
    """

    defaults = {"references": "black", "samples": 200, "stdevs": 0.0, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, references: BaselineSpec, samples: int, stdevs: float,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        samples = positive_int(samples, "samples")
        non_negative_number(stdevs, "stdevs")
        scale = torch.full((x.shape[0],), float(stdevs), dtype=accumulation_dtype(x), device=x.device)
        paths = expected_paths(x, references, samples, scale if stdevs > 0 else None, generator)

        def points(owners: Tensor, step: Tensor):
            point, delta = paths(owners, step)
            return point, delta / samples

        return self._integrate(x, target, samples, points, batch_size, create_graph)
