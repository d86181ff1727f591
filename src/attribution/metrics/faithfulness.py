"""Faithfulness correlation and sensitivity-n: does the map's mass on a random pixel subset predict the score lost by
removing it?

Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020,
arXiv:2005.00631 (the metric as Quantus' ``FaithfulnessCorrelation`` computes it); Ancona, Ceolini, Oztireli &
Gross, "Towards better understanding of gradient-based attribution methods for Deep Neural Networks", ICLR 2018,
arXiv:1711.06104 (sensitivity-n: the same correlation as a curve over the subset size ``n``).

For ``runs`` random subsets ``S`` of ``subset_size`` pixels (every channel of a chosen pixel): the score drop
``f(x) - f(x with S set to baseline)`` and the map's sum over ``S``; the metric is their Pearson correlation over
the subsets, per image (higher is better; 0 where either side does not vary).  Defaults as Quantus 0.6.0's
``FaithfulnessCorrelation``: 100 runs of 224 features, its ``perturb_baseline='black'`` (each image's smallest entry
over all channels), the raw score (``score='logit'``).  Remaining differences from Quantus: a feature is a whole
pixel here (the library's convention: per-channel maps are summed), where Quantus draws entries of the (C, H, W)
input (a pixel's channels separately, a one-channel map broadcast over them), so 224 features remove about three
times as many values of an RGB image here (``features='entries'`` draws entries as Quantus does; the two coincide
on one-channel images); and the subsets are drawn once per call and shared by the images (``generator`` fixes
them; Quantus draws them image by image from NumPy's global state), so an image's value does not depend on the
others.  Cost: ``runs + 1`` forwards per image, ``batch_size`` rows per pass.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import (Curve, SubstrateSpec, as_fractions, check_finite, check_maps, counts_for, make_substrate,
                     resolve_scorer, score_rows, trapezoid)
from .similarity import pearson

#: what a subset of faithfulness correlation is drawn from
FEATURES = ("pixels", "entries")


def faithfulness_correlation(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                             subset_size: int = 224, runs: int = 100, baseline: SubstrateSpec = "black",
                             score: str = "logit", features: str = "pixels",
                             generator: Optional[torch.Generator] = None,
                             batch_size: Optional[int] = None) -> Tensor:
    """Per-image Pearson correlation (B,) between the score drops and the map sums of random feature subsets; see
    the module docstring.  ``maps`` (B, C or 1, H, W) at the images' size.  ``baseline``: what replaces a removed
    feature, any substrate of :func:`attribution.metrics.common.make_substrate` (default ``'black'``, as Quantus;
    ``0.0`` for a constant).  ``features``: ``'pixels'`` (whole pixels, the map summed over channels) or
    ``'entries'`` (entries of the (C, H, W) input, a one-channel map broadcast over the channels, as Quantus)."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    values = _feature_values(images, maps, features)
    count = values.shape[1]
    for name, value in (("subset_size", subset_size), ("runs", runs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if subset_size > count:
        raise ValueError(f"subset_size={subset_size} is more than the {count} {features} of an image")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    order = torch.rand(runs, count, generator=generator, device=gen_device).argsort(dim=1)[:, :subset_size]
    subsets = torch.zeros(runs, count, dtype=torch.bool, device=gen_device).scatter_(1, order, True)
    subsets = subsets.to(images.device)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    fill = make_substrate(images, baseline)
    shape = (-1, 1 if features == "pixels" else images.shape[1], *images.shape[-2:])

    def rows(owners: Tensor, step: Tensor) -> Tensor:  # step 0: the image; step j: subset j - 1 removed
        removed = subsets[(step - 1).clamp(min=0)] & (step > 0)[:, None]
        return torch.where(removed.view(shape), fill[owners], images[owners])

    measured = score_rows(model, rows, images.shape[0], runs + 1, scorer, batch_size, images.device, images.dtype)
    drops = measured[:, :1] - measured[:, 1:]  # (B, runs)
    sums = values.to(drops.dtype) @ subsets.to(drops.dtype).T  # (B, runs)
    return pearson(drops, sums).to(drops.dtype)


def _feature_values(images: Tensor, maps: Tensor, features: str) -> Tensor:
    """The map's value of each feature, (B, F): per pixel (channel sum) or per entry of the (C, H, W) input."""
    values = check_maps(images, maps)
    if features == "pixels":
        return values
    m = maps.detach().to(device=images.device, dtype=values.dtype)
    m = m.unsqueeze(1) if m.dim() == 3 else m
    if m.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"with features='entries' maps must have 1 or {images.shape[1]} channels (the images'), "
                         f"got {m.shape[1]}")
    check_finite(m)
    return m.expand(-1, images.shape[1], -1, -1).flatten(1)


def sensitivity_n(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                  fractions=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8), runs: int = 100, baseline: SubstrateSpec = 0.0,
                  score: str = "logit", generator: Optional[torch.Generator] = None,
                  batch_size: Optional[int] = None) -> Curve:
    """Sensitivity-n (Ancona et al., ICLR 2018): for each subset size ``n`` (a fraction of the pixels, at least one
    pixel), the Pearson correlation over ``runs`` random subsets of ``n`` pixels between the map's sum over the
    subset and the score lost when the subset is set to ``baseline`` (default 0, the paper's zero baseline; any
    substrate) (:func:`faithfulness_correlation` at that size, the subsets drawn from ``generator`` one size after
    another).  A map satisfies sensitivity-n when the correlation is 1: gradient x input and Integrated Gradients
    do on linear models at every ``n``.  Returns a :class:`Curve` over the fractions (``auc``: the trapezoid area,
    higher is better).  Cost: ``len(fractions) x (runs + 1)`` forwards per image."""
    values = check_maps(images, maps)
    xs = as_fractions(fractions, images.device)
    sizes = counts_for(xs, values.shape[1]).clamp(min=1).tolist()
    resolved = resolve_scorer(model, images, target, score, batch_size).target  # the arg-max found once
    fixed = resolved.classes if resolved.classes is not None else target
    curve = torch.stack([faithfulness_correlation(model, images, maps, fixed, subset_size=int(n), runs=runs,
                                                  baseline=baseline, score=score, generator=generator,
                                                  batch_size=batch_size) for n in sizes], dim=1)
    return Curve(trapezoid(curve, xs), xs.to(curve.dtype), curve)
