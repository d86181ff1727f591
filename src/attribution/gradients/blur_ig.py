"""Blur Integrated Gradients."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.explainer import finite_number, positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype

TRUNCATE = 4.0


def gaussian_matrices(size: int, sigmas: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, size, size) matrices ``G`` with ``G @ v`` = 1-D Gaussian blur of ``v`` for each sigma of ``sigmas`` (n,).

    Equal to ``scipy.ndimage.gaussian_filter1d(v, sigma, mode='constant', cval=0, truncate=4.0)``: the kernel is
    ``exp(-k^2 / (2 sigma^2))`` for ``|k| <= int(4 sigma + 0.5)``, normalised to sum 1 over that whole window,
    and pixels outside the image count as zero.  Sigma 0 is the identity.  Built in float64, returned in ``dtype``.
    """
    s = sigmas.to(torch.float64).view(-1, 1, 1)
    radius = torch.floor(TRUNCATE * s + 0.5)
    safe = torch.where(s > 1e-15, s, torch.ones_like(s))
    widest = int(radius.max().item()) if s.numel() else 0
    taps = torch.arange(-widest, widest + 1, device=s.device, dtype=torch.float64).view(1, 1, -1)
    norm = (torch.exp(-0.5 * taps**2 / safe**2) * (taps.abs() <= radius)).sum(-1, keepdim=True)
    index = torch.arange(size, device=s.device, dtype=torch.float64)
    offset = (index.view(1, -1, 1) - index.view(1, 1, -1)).abs()
    matrix = torch.exp(-0.5 * offset**2 / safe**2) * (offset <= radius) / norm
    identity = torch.eye(size, dtype=torch.float64, device=s.device).expand_as(matrix)
    return torch.where(s > 1e-15, matrix, identity).to(dtype)


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """Blur each image (n, C, H, W) with its own sigma (n,), as ``scipy.ndimage.gaussian_filter(mode='constant')``
    with sigma 0 on the channel axis.  Separable: ``G_H @ X @ G_W^T`` with batched matrix products."""
    gh = gaussian_matrices(images.shape[-2], sigmas, images.dtype).unsqueeze(1)
    gw = gaussian_matrices(images.shape[-1], sigmas, images.dtype).unsqueeze(1)
    return gh @ images @ gw.transpose(-1, -2)


@register("blur_ig")
class BlurIG(GradientExplainer):
    """Blur Integrated Gradients: integrate gradients along a path of ever stronger Gaussian blur.

    Xu, Venugopalan & Sundararajan, "Attribution in Scale and Space", CVPR 2020, arXiv:2004.03383.

    ``A = -sum_{i<steps} (s_{i+1} - s_i) * dblur(x, s_i)/ds * grad f_t(blur(x, s_i))`` with ``s_i = i * max_sigma /
    steps`` (or ``sqrt(i * max_sigma / steps)`` with ``sqrt=True``) and ``dblur/ds`` the forward difference with
    step ``grad_step``, exactly as PAIR ``saliency``'s BlurIG (defaults too: steps=100, max_sigma=50,
    grad_step=0.01, sqrt=False).  The blur equals ``scipy.ndimage.gaussian_filter(mode='constant')`` and runs
    batched on the device as matrix products; the blur difference is formed from differences of blur matrices
    built in float64, so it does not suffer the cancellation of subtracting two blurred images.
    Cost: ``steps`` forwards and input-gradient backwards per image.
    """

    defaults = {"steps": 100, "max_sigma": 50.0, "grad_step": 0.01, "sqrt": False}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        steps: int,
        max_sigma: float,
        grad_step: float,
        sqrt: bool,
        batch_size: Optional[int],
        create_graph: bool,
        idgi: bool = False,
    ) -> Tensor:
        """With ``idgi`` (set by :class:`~attribution.gradients.idgi.IDGI`): IDGI on the ``steps + 1`` blurred images
        from ``max_sigma`` down to the image itself (sigma 0)."""
        steps = positive_int(steps, "steps")
        max_sigma, grad_step = (positive_number(finite_number(value, name), name)
                                for name, value in (("max_sigma", max_sigma), ("grad_step", grad_step)))
        if not isinstance(sqrt, bool):
            raise TypeError(f"sqrt must be a bool, got {sqrt!r}")
        fractions = [i * float(max_sigma) / steps for i in range(steps + 1)]
        sigmas = torch.tensor([math.sqrt(f) for f in fractions] if sqrt else fractions, dtype=torch.float64)
        sigmas = sigmas.to(x.device)
        dsigma = sigmas[1:] - sigmas[:-1]
        dtype = accumulation_dtype(x)
        images = x.to(dtype)
        height, width = x.shape[-2:]
        if idgi:
            return self._integrate(x, target, steps + 1, lambda owners, step: (
                gaussian_blur(images[owners], sigmas[steps - step]), None), batch_size, create_graph, idgi=True)

        def points(owners: Tensor, step: Tensor):
            # the matrices depend on the step only: built once per step in the pass, then picked for each row
            distinct, which = step.unique(return_inverse=True)
            s, s2 = sigmas[distinct], sigmas[distinct] + grad_step
            gh, gh2, gw, gw2 = (gaussian_matrices(n, v, torch.float64) for n, v in
                                ((height, s), (height, s2), (width, s), (width, s2)))
            dh, dw = (gh2 - gh) / grad_step, (gw2 - gw) / grad_step
            gh, gh2, dh, gw, dw = (m.to(dtype)[which].unsqueeze(1) for m in (gh, gh2, dh, gw, dw))
            rows = images[owners]
            along_w, diff_w = rows @ gw.transpose(-1, -2), rows @ dw.transpose(-1, -2)
            blurred = gh @ along_w
            # (blur(s + g) - blur(s)) / g = Dh X Gw^T + Gh' X Dw^T, with D = (G(s + g) - G(s)) / g formed in float64
            derivative = dh @ along_w + gh2 @ diff_w
            return blurred, -dsigma[step].view(-1, 1, 1, 1).to(dtype) * derivative

        return self._integrate(x, target, steps, points, batch_size, create_graph)
