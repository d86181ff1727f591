"""Average drop and increase in confidence: the target's score on the image multiplied by its map.

Chattopadhyay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++: Generalized Gradient-based Visual Explanations for
Deep Convolutional Networks", WACV 2018, arXiv:1710.11063 (Section 5.1).

The explanation image is ``E = x * N(L)``: the image times its map scaled to [0, 1] per image (the paper's
upsampled, normalised CAM).  With ``Y`` the target's score on ``x`` and ``O`` on ``E``: the drop is
``max(0, Y - O) / Y`` (the paper averages it over a dataset and prints a percentage; lower is better) and the
increase ``[O > Y]`` (averaged: the fraction of images whose score the map raises; higher is better).  Scores are
softmax probabilities by default, as in the Score-CAM and Ablation-CAM evaluations.  pytorch-grad-cam's
``DropInConfidence`` returns ``max(0, Y - O)`` without dividing by ``Y`` (``ConfidenceChange.absolute_drop``).
Cost: two forwards per image, ``batch_size`` rows per pass.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import check_maps, resolve_scorer, score_rows


class ConfidenceChange(NamedTuple):
    """Per image (B,): the target's score on the image and on the explanation image, and what follows."""

    original: Tensor
    explained: Tensor

    @property
    def absolute_drop(self) -> Tensor:
        """``max(0, Y - O)``: pytorch-grad-cam's ``DropInConfidence``."""
        return (self.original - self.explained).clamp(min=0)

    @property
    def drop(self) -> Tensor:
        """``max(0, Y - O) / Y``: the paper's per-image drop (its "Average Drop %" is 100 times the mean)."""
        return self.absolute_drop / self.original

    @property
    def increase(self) -> Tensor:
        """``1.0`` where the map raises the score (``O > Y``), else ``0.0``."""
        return (self.explained > self.original).to(self.original.dtype)


def confidence_change(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                      score: str = "softmax", normalize: bool = True,
                      batch_size: Optional[int] = None) -> ConfidenceChange:
    """Score each image and its explanation image ``images * N(maps)``; see the module docstring.

    ``maps`` (B, C or 1, H, W) at the images' size (channel sum per pixel); ``normalize=False`` multiplies by the
    maps as given (they should then already lie in [0, 1]).
    """
    values = check_maps(images, maps)
    if normalize:
        low, high = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)
        span = high - low
        values = torch.where(span > 0, (values - low) / torch.where(span > 0, span, torch.ones_like(span)),
                             torch.zeros_like(values))
    weights = values.view(images.shape[0], 1, *images.shape[-2:]).to(images.dtype)
    scorer = resolve_scorer(model, images, target, score, batch_size)

    def rows(owners: Tensor, step: Tensor) -> Tensor:
        keep = torch.where(step.view(-1, 1, 1, 1) == 0, torch.ones_like(weights[owners]), weights[owners])
        return images[owners] * keep

    measured = score_rows(model, rows, images.shape[0], 2, scorer, batch_size, images.device, images.dtype)
    return ConfidenceChange(measured[:, 0], measured[:, 1])


def average_drop(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, **options) -> Tensor:
    """Per-image drop ``max(0, Y - O) / Y`` (B,); its mean is the paper's Average Drop (lower is better)."""
    return confidence_change(model, images, maps, target, **options).drop


def increase_in_confidence(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None,
                           **options) -> Tensor:
    """Per-image ``[O > Y]`` (B,); its mean is the paper's Increase in Confidence (higher is better)."""
    return confidence_change(model, images, maps, target, **options).increase
