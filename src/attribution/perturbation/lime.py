"""LIME over image segments."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..core.explainer import finite_number, optional_generator, positive_number
from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec, make_baseline
from .segments import SegmentExplainer, coalition_scores, segment_means


def lime_coalitions(samples: int, features: int, generator: Optional[torch.Generator]) -> Tensor:
    """(S, M) bool coalitions as ``lime_image`` samples them: the first all ones (the image itself), every other
    segment kept with probability 1/2, drawn on ``generator``'s device (the CPU without one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    coalitions = torch.rand((samples, features), generator=generator, device=device) < 0.5
    coalitions[0] = True
    return coalitions


def lime_weights(coalitions: Tensor, kernel_width: float) -> Tensor:
    """``sqrt(exp(-d^2 / width^2))`` with ``d`` the cosine distance of each coalition (S, M) to the full one, as
    ``lime_image``: ``d = 1 - sqrt(k / M)`` for ``k`` kept segments (1 for the empty coalition)."""
    kept = coalitions.to(torch.float64).sum(1)
    distance = 1 - (kept / coalitions.shape[1]).sqrt()
    return torch.exp(-distance.square() / kernel_width ** 2).sqrt()


def weighted_ridge(design: Tensor, weights: Tensor, values: Tensor, alpha: float) -> Tensor:
    """Coefficients (B, M) of ``min sum_s w_s (y_s - b - x_s . phi)^2 + alpha |phi|^2`` (intercept ``b`` not
    penalised: scikit-learn's ``Ridge(alpha, fit_intercept=True)`` with ``sample_weight``), for ``design`` (S, M)
    shared by every image's ``values`` (B, S)."""
    w = weights / weights.sum()
    centred = design - w @ design  # (S, M)
    targets = values - values @ w[:, None]  # (B, S)
    gram = centred.T @ (w[:, None] * centred) * weights.sum() + alpha * torch.eye(design.shape[1], dtype=design.dtype,
                                                                                   device=design.device)
    rhs = (targets * weights) @ centred  # (B, M)
    return torch.linalg.solve(gram, rhs.T).T


@register("lime")
class LIME(SegmentExplainer):
    """LIME: the coefficients of a weighted linear model of the target's score on which image segments are kept.

    Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any Classifier", KDD 2016,
    arXiv:1602.04938.

    ``samples`` coalitions ``z`` (the first all ones, the others uniform: each segment kept with probability 1/2,
    shared by the images of a call, ``generator`` to fix them); absent segments take ``hide``: ``'mean'`` (each
    segment's mean colour in its image, ``lime_image``'s default) or a baseline as Integrated Gradients';
    ``phi = argmin sum_z pi(z) (f_t(z) - b - z . phi)^2 + alpha |phi|^2`` with ``pi(z) = sqrt(exp(-d(z)^2 /
    width^2))``, ``d`` the cosine distance to the full coalition.  Defaults from the ``lime`` package's image
    explainer: 1000 samples, kernel width 0.25, ``Ridge(alpha=1)``, every segment, softmax probabilities.
    Segments: a ``grid`` x ``grid`` partition (default 8) or ``segments``: an (H, W) label map, a (B, H, W) stack
    (one per image), or ``'quickshift'`` (``lime_image``'s own segmentation and parameters, by scikit-image on the
    CPU) or ``'slic'`` (see :mod:`attribution.perturbation.segments`).  Every pixel of a segment gets its coefficient:
    (B, 1, H, W).  Cost: ``samples`` forwards per image.
    """

    defaults = {"score": "softmax", "grid": 8, "segments": None, "samples": 1000, "hide": "mean",
                "kernel_width": 0.25, "alpha": 1.0, "generator": None}

    def _explain_segments(self, x: Tensor, target: Target, labels: Tensor, *, samples: int,
                          hide: Union[str, BaselineSpec], kernel_width: float, alpha: float,
                          generator: Optional[torch.Generator], batch_size: Optional[int],
                          create_graph: bool) -> Tensor:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise ValueError(f"samples must be an int >= 2, got {samples!r}")
        kernel_width = positive_number(kernel_width, "kernel_width")
        alpha = positive_number(finite_number(alpha, "alpha"), "alpha")
        features = int(labels.max()) + 1
        coalitions = lime_coalitions(samples, features, optional_generator(generator)).to(x.device)
        fill = segment_means(x, labels) if isinstance(hide, str) and hide == "mean" else make_baseline(x, hide)
        with torch.set_grad_enabled(create_graph):
            values = coalition_scores(self, x, target, labels, coalitions, fill, batch_size)
            design = coalitions.to(values.dtype)
            phi = weighted_ridge(design, lime_weights(coalitions, kernel_width).to(values.dtype), values, alpha)
        return phi[:, labels].unsqueeze(1)
