"""Axiomatic checks that query the model: completeness and non-sensitivity, in the protocols of Quantus 0.6.0.

Both replace input entries by a baseline and score the perturbed copies with the library's batched scorer
(:func:`attribution.metrics.common.resolve_scorer`, :func:`attribution.metrics.common.score_rows`): ``target`` as an
explainer takes it (``None``: the model's arg-max on each image), rows evaluated ``batch_size`` at a time without
autograd, the model held in eval mode.  The baseline is any substrate of
:func:`attribution.metrics.common.make_substrate`: ``'black'`` (default, Quantus' ``perturb_baseline``: each image's
smallest entry over all channels), ``'white'`` (its largest), ``'mean'`` (each image's per-channel mean; Quantus'
``'mean'``, the mean over all entries, is ``lambda x: x.mean(dim=(1, 2, 3), keepdim=True)``), ``'zeros'``,
``'blur'``, a number, a tensor, a callable.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import SubstrateSpec, check_finite, check_images, make_substrate, resolve_scorer, score_rows

#: Quantus' default threshold of ``NonSensitivity`` (attributions after max-normalisation, and score changes)
EPS = 1e-5


class CompletenessResult(NamedTuple):
    """``holds`` (B,) bool: ``|gap| <= atol + rtol * |delta|``; ``gap`` (B,): ``sum(maps) - delta``; ``delta`` (B,):
    ``f(x) - f(baseline)``, the target's score on the image minus on the baseline."""

    holds: Tensor
    gap: Tensor
    delta: Tensor


def _check(images: Tensor, maps: Tensor) -> Tensor:
    """Validate and return ``maps`` broadcast to the images' shape (detached, on the images' device)."""
    check_images(images)
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise ValueError("maps must be a tensor of shape (B, C, H, W), (B, 1, H, W) or (B, H, W)")
    check_finite(maps)
    m = maps.detach().to(images.device)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.shape[0] != images.shape[0] or m.shape[-2:] != images.shape[-2:] or m.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not match images of shape {tuple(images.shape)} "
                         "(same batch and height/width, one channel or the images' channels)")
    return m.expand_as(images)


def completeness(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                 baseline: SubstrateSpec = "black", score: str = "logit", rtol: float = 0.05, atol: float = 0.0,
                 batch_size: Optional[int] = None) -> CompletenessResult:
    """Completeness: do the attributions add up to the change of the output between the baseline and the image?

    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017, arXiv:1703.01365 (also
    Shrikumar et al.'s summation-to-delta and Montavon et al.'s conservation; Quantus ``Completeness``):
    ``sum_i A_i = f(x) - f(x')``, checked as ``|sum_i A_i - (f(x) - f(x'))| <= atol + rtol |f(x) - f(x')|``.
    ``maps`` (B, C or 1, H, W) are summed over all their entries (a one-channel map as it is, not once per
    channel).  Two forwards per image.  Defaults as Quantus: the ``'black'`` baseline, the target's logit (Quantus'
    ``softmax=False``, identity ``output_func``).  Deliberate differences, following the paper: the raw maps are
    summed (Quantus divides them by the batch's largest magnitude first, by default, which breaks the axiom for any
    map), and ``rtol = 0.05`` (the paper checks IG "within 5%") where Quantus tests exact float equality
    (``rtol = atol = 0`` reproduces it).  ``gap`` is the continuous answer (lower ``|gap|`` is better).
    """
    _check(images, maps)
    if not rtol >= 0 or not atol >= 0:
        raise ValueError(f"rtol and atol must be non-negative, got rtol={rtol!r}, atol={atol!r}")
    base = make_substrate(images, baseline)
    scorer = resolve_scorer(model, images, target, score, batch_size)

    def rows(owners: Tensor, step: Tensor) -> Tensor:  # step 0: the image, step 1: the baseline
        return torch.where((step == 0).view(-1, 1, 1, 1), images[owners], base[owners])

    scores = score_rows(model, rows, images.shape[0], 2, scorer, batch_size, images.device, images.dtype)
    delta = scores[:, 0] - scores[:, 1]
    total = maps.detach().to(device=images.device, dtype=delta.dtype).flatten(1).sum(dim=1)  # not broadcast
    gap = total - delta
    return CompletenessResult(gap.abs() <= atol + rtol * delta.abs(), gap, delta)


def non_sensitivity(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                    eps: float = EPS, features_in_step: int = 1, baseline: SubstrateSpec = "black",
                    score: str = "softmax", normalise: bool = True, batch_size: Optional[int] = None) -> Tensor:
    """Non-sensitivity, (B,) int64: the number of input entries on which "the map says zero" and "the model does
    not react" disagree (lower is better; 0 when exactly the entries the model ignores get zero attribution).

    Nguyen & Rodríguez Martínez, "On Quantitative Aspects of Model Interpretability", arXiv:2007.07584, 2020
    (Quantus ``NonSensitivity``): ``NS = |{i : |A_i| < eps} xor {i : |f(x) - f(x with x_i := b_i)| < eps}|``.  Every
    entry of the image (each channel of each pixel, in (C, H, W) order) is one feature; ``features_in_step``
    consecutive entries are replaced at once and share the model's answer, so ``ceil(C H W / features_in_step)``
    forwards per image.  A one-channel map is broadcast over the channels.  Defaults as Quantus: ``eps = 1e-5``
    for both tests, one entry per step, the ``'black'`` baseline, softmax scores (its ``softmax=True``), magnitudes
    divided by the maximum (``normalise``).  Deliberate differences: each map is divided by its own maximum magnitude
    (Quantus divides the batch by the batch's maximum, so a count depends on the other images), and
    ``features_in_step > 1`` works (Quantus 0.6.0 fails with a shape error there).
    """
    m = _check(images, maps)
    if isinstance(features_in_step, bool) or not isinstance(features_in_step, int) or features_in_step < 1:
        raise ValueError(f"features_in_step must be a positive int, got {features_in_step!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    batch = images.shape[0]
    n = images[0].numel()
    if features_in_step > n:
        raise ValueError(f"features_in_step={features_in_step} is more than the {n} entries of an image")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    a = m.reshape(batch, n).abs().to(dtype)
    if normalise:
        top = a.amax(dim=1, keepdim=True)
        a = torch.where(top > 0, a / torch.where(top > 0, top, torch.ones_like(top)), a)
    unattributed = a < eps
    steps = math.ceil(n / features_in_step)
    flat, base = images.reshape(batch, n), make_substrate(images, baseline).reshape(batch, n)
    offsets = torch.arange(features_in_step, device=images.device)
    scorer = resolve_scorer(model, images, target, score, batch_size)

    def rows(owners: Tensor, step: Tensor) -> Tensor:  # step 0: the image; step s: entries of group s - 1 replaced
        index = ((step - 1).clamp(min=0).unsqueeze(1) * features_in_step + offsets).clamp(max=n - 1)
        x = flat[owners].clone()
        replaced = base[owners].gather(1, index)
        x.scatter_(1, index, torch.where((step > 0).unsqueeze(1), replaced, x.gather(1, index)))
        return x.view(-1, *images.shape[1:])

    scores = score_rows(model, rows, batch, steps + 1, scorer, batch_size, images.device, images.dtype)
    insensitive = (scores[:, 1:] - scores[:, :1]).abs() < eps  # (B, steps)
    insensitive = insensitive.repeat_interleave(features_in_step, dim=1)[:, :n]
    return (insensitive ^ unattributed).sum(dim=1)
