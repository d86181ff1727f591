"""Faithfulness correlation: does the map's mass on a random pixel subset predict the score lost by removing it?

Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020,
arXiv:2005.00631 (the metric as Quantus' ``FaithfulnessCorrelation`` computes it).

For ``runs`` random subsets ``S`` of ``subset_size`` pixels (every channel of a chosen pixel): the score drop
``f(x) - f(x with S set to baseline)`` and the map's sum over ``S``; the metric is their Pearson correlation over
the subsets, per image (higher is better; 0 where either side does not vary).  Defaults as Quantus': 100 runs
of 224 pixels, the value 0 as the baseline, the raw score (``score='logit'``).  Subsets are drawn once per call
and shared by the images (``generator`` fixes them), so an image's value does not depend on the others.  Cost:
``runs + 1`` forwards per image, ``batch_size`` rows per pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import check_maps, resolve_scorer, score_rows
from .similarity import pearson


def faithfulness_correlation(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                             subset_size: int = 224, runs: int = 100, baseline: float = 0.0, score: str = "logit",
                             generator: Optional[torch.Generator] = None,
                             batch_size: Optional[int] = None) -> Tensor:
    """Per-image Pearson correlation (B,) between the score drops and the map sums of random pixel subsets; see
    the module docstring.  ``maps`` (B, C or 1, H, W) at the images' size (channel sum per pixel)."""
    values = check_maps(images, maps)
    pixels = values.shape[1]
    for name, value in (("subset_size", subset_size), ("runs", runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if subset_size > pixels:
        raise ValueError(f"subset_size={subset_size} is more than the {pixels} pixels of an image")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(runs, pixels, generator=generator, device=gen_device).argsort(dim=1)[:, :subset_size]
    subsets = torch.zeros(runs, pixels, dtype=torch.bool, device=gen_device).scatter_(1, order, True)
    subsets = subsets.to(images.device)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    width = images.shape[-1]
    fill = torch.tensor(float(baseline), dtype=images.dtype, device=images.device)

    def rows(owners: Tensor, step: Tensor) -> Tensor:  # step 0: the image; step j: subset j - 1 removed
        removed = subsets[(step - 1).clamp(min=0)] & (step > 0)[:, None]
        removed = removed.view(-1, 1, images.shape[-2], width)
        return torch.where(removed, fill, images[owners])

    measured = score_rows(model, rows, images.shape[0], runs + 1, scorer, batch_size, images.device, images.dtype)
    drops = measured[:, :1] - measured[:, 1:]  # (B, runs)
    sums = values.to(drops.dtype) @ subsets.to(drops.dtype).T  # (B, runs)
    return pearson(drops, sums).to(drops.dtype)

