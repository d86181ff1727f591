"""SmoothTaylor: first-order Taylor terms of the target score around noisy roots of the image, averaged."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.explainer import finite_number, non_negative_number, optional_generator, positive_int
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .smoothgrad import range_sigma


@register("smooth_taylor")
class SmoothTaylor(GradientExplainer):
    """SmoothTaylor: the first-order Taylor term of the target score at the image, expanded around noisy copies of
    the image (the roots), averaged over the roots.

    Goh, Lapuschkin, Weber, Samek & Binder, "Understanding Integrated Gradients with SmoothTaylor for Deep Neural
    Network Attribution", ICPR 2020 (proceedings 2021), arXiv:2004.10484 (code: github.com/garygsw/smooth-taylor,
    ``attribution/analyzer.py``).

    ``A = (1/N) sum_j (x - z_j) * grad f_t(z_j)`` with ``N`` roots ``z_j = x + sigma * n_j``, ``n_j ~ N(0, I)``:
    SmoothGrad's noisy copies weighted by their distance to the image, as Integrated Gradients' sum over a path
    with the path replaced by noisy roots.  ``sigma`` is ``noise_scale`` in the input's units (the authors'
    default), or with ``relative=True`` that fraction of each image's value range ``max x - min x`` (their
    ``percent`` flag, SmoothGrad's rule).  Defaults ``samples=150`` roots and ``noise_scale=0.5`` as the authors'
    experiment scripts (``--num_roots``, ``--noise_scale``, absolute noise on ImageNet-normalised images), the
    logit of the target as their gradients.  On a linear model ``A = -sigma W * mean_j n_j`` (zero in
    expectation); on a quadratic one ``E[A] = -sigma^2 diag(Hessian)``; ``noise_scale=0`` gives zeros.

    The standard-normal noise, ``(samples, C, H, W)`` in float32 (whatever the input's dtype), is drawn once per
    call from ``generator`` if given (on its device, else on the input's) and shared by the images of the batch,
    as Expected Gradients' noise: an image's map does not depend on the other images, and it is the authors'
    one-image computation with these draws as its roots (their per-root ``randn_like`` gives the same numbers only
    for float32 CPU images whose C x H x W is a multiple of 16, e.g. 3 x 224 x 224).  The noise is held
    whole, ``samples * C * H * W`` numbers.  Cost: ``samples`` forwards and input-gradient backwards per image,
    ``batch_size`` rows per pass (plus one forward per image for ``target=None``).

    Deliberate differences from the authors' code: the map keeps its channels (signed, (B, C, H, W), as this
    library's other gradient methods; their experiment scripts sum it over the channels afterwards); the noise is
    shared by the images of a batch (theirs draws per image, one image per call).  Their adaptive noising (a
    per-image search of the noise scale that minimises a perturbation or total-variation score of the map) is a
    hyperparameter search around the method and is not part of it.
    """

    defaults = {"samples": 150, "noise_scale": 0.5, "relative": False, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, samples: int, noise_scale: float, relative: bool,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        samples = positive_int(samples, "samples")
        sigma = root_sigma(x, noise_scale, relative)
        noise = standard_noise(x, samples, optional_generator(generator))
        images = x.to(sigma.dtype)

        def points(owners: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
            image = images[owners]
            roots = image + sigma[owners] * noise[step]
            return roots, (image - roots) / samples

        return self._integrate(x, target, samples, points, batch_size, create_graph)


def root_sigma(x: Tensor, noise_scale: float, relative: bool) -> Tensor:
    """The noise's standard deviation per image, (B, 1, 1, 1) in the accumulation dtype: ``noise_scale`` itself,
    or with ``relative`` that fraction of each image's value range (:func:`~.smoothgrad.range_sigma`)."""
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be a bool, got {relative!r}")
    scale = non_negative_number(finite_number(noise_scale, "noise_scale"), "noise_scale")
    if relative:
        return range_sigma(x, scale)
    return torch.full((x.shape[0], 1, 1, 1), scale, dtype=accumulation_dtype(x), device=x.device)


def standard_noise(x: Tensor, samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """``samples`` standard-normal draws shaped like one image of ``x``, (samples, C, H, W): drawn in float32 (so
    float32 and float64 inputs see the same draws, as SmoothGrad's) on the generator's device (the input's without
    one), returned in the accumulation dtype on ``x``'s device."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn((samples,) + tuple(x.shape[1:]), generator=generator, device=device)
    return noise.to(device=x.device, dtype=accumulation_dtype(x))
