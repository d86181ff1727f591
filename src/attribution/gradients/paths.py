"""Straight-line paths: baselines and quadrature rules shared by Integrated Gradients and Guided IG."""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..core.explainer import finite_number, positive_int

BaselineSpec = Union[str, float, int, Tensor]
RULES = ("linspace", "left", "right", "middle", "trapezoid", "gausslegendre")


def make_baseline(x: Tensor, baseline: BaselineSpec, name: str = "baseline") -> Tensor:
    """The baseline image for each image of ``x`` (B, C, H, W), in ``x``'s dtype.

    ``'black'``: each image's minimum value, ``'white'``: each image's maximum (so both are right whatever the
    input normalisation), ``'zero'``: zeros, a finite number: that constant, a tensor: broadcast to ``x``.  ``name``
    is the option that holds it, for the error messages.
    """
    if isinstance(baseline, str):
        flat = x.reshape(x.shape[0], -1)
        if baseline == "black":
            return flat.amin(dim=1).view(-1, 1, 1, 1).expand_as(x).clone()
        if baseline == "white":
            return flat.amax(dim=1).view(-1, 1, 1, 1).expand_as(x).clone()
        if baseline == "zero":
            return torch.zeros_like(x)
        raise ValueError(f"{name} must be 'black', 'white', 'zero', a number or a tensor, got {baseline!r}")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, finite_number(baseline, name))
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(device=x.device, dtype=x.dtype).expand_as(x).clone()
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(baseline.shape)} does not broadcast to x's shape {tuple(x.shape)}"
            ) from None
    raise TypeError(f"{name} must be 'black', 'white', 'zero', a number or a tensor, got {type(baseline).__name__}")


def quadrature(rule: str, steps: int) -> Tuple[Tensor, Tensor]:
    """Points ``alpha`` in [0, 1] and weights (float64, (steps,)) approximating ``integral_0^1 g(alpha) d alpha``.

    ``'linspace'`` is the rule of the seed and PAIR ``saliency``: ``linspace(0, 1, steps)``, each weighted
    ``1/steps``; ``'left'``, ``'right'``, ``'middle'`` and ``'trapezoid'`` are Riemann sums and
    ``'gausslegendre'`` Gauss-Legendre quadrature, with the same points and weights as Captum's rules, except
    that ``'trapezoid'`` is the composite trapezoid rule (weights ``1/(steps-1)``, ends halved, summing to 1);
    Captum's ``'riemann_trapezoid'`` uses ``1/steps`` and so returns ``(steps-1)/steps`` times this.
    """
    n = positive_int(steps, "steps")
    if rule == "linspace":
        alphas, weights = np.linspace(0.0, 1.0, n), np.full(n, 1.0 / n)
    elif rule == "left":
        alphas, weights = np.linspace(0.0, 1.0 - 1.0 / n, n), np.full(n, 1.0 / n)
    elif rule == "right":
        alphas, weights = np.linspace(1.0 / n, 1.0, n), np.full(n, 1.0 / n)
    elif rule == "middle":
        alphas, weights = np.linspace(0.5 / n, 1.0 - 0.5 / n, n), np.full(n, 1.0 / n)
    elif rule == "trapezoid":
        if n < 2:
            raise ValueError("the trapezoid rule needs steps >= 2")
        alphas = np.linspace(0.0, 1.0, n)
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] = 0.5 / (n - 1)
    elif rule == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(n)
        alphas, weights = 0.5 * (nodes + 1.0), 0.5 * w
    else:
        raise ValueError(f"method must be one of {RULES}, got {rule!r}")
    return torch.from_numpy(alphas), torch.from_numpy(weights)
