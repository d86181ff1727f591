"""Insertion and deletion (the causal metrics of RISE).

Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018,
arXiv:1806.07421.

Deletion replaces the image's pixels by a substrate in decreasing order of attribution, ``step`` pixels at a time
(all channels of a pixel together), and records the target's score after each step; insertion starts from the
substrate and puts the image's pixels back in the same order.  A faithful map gives a deletion curve that falls
fast (low area) and an insertion curve that rises fast (high area).  The area is the trapezoid rule over the
fraction of pixels changed, which is RISE's ``auc`` (``(sum - first / 2 - last / 2) / (n - 1)``) whenever ``step``
divides the number of pixels (otherwise the last, partial step gets its true width).

Protocol as in RISE's evaluation code: deletion substrate zeros (of the normalised input), insertion substrate the
image blurred with ``gkern(11, 5)``, softmax probability of the class, ``step = 224`` pixels at 224 x 224, i.e.
``ceil(H * W / 224)`` pixels by default here (224 steps whatever the size).  Cost: ``steps + 1`` forwards per image,
``batch_size`` rows per pass.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import Curve, SubstrateSpec, check_maps, make_substrate, resolve_scorer, salience_ranks, score_rows, trapezoid

RISE_STEPS = 224


def _causal_curve(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec, *, insert: bool, step: Optional[int],
                  substrate: SubstrateSpec, score: str, batch_size: Optional[int], seed: int) -> Curve:
    values = check_maps(images, maps)
    batch, channels, height, width = images.shape
    n = height * width
    step = step if step is not None else max(1, math.ceil(n / RISE_STEPS))
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive number of pixels, got {step!r}")
    steps = math.ceil(n / step)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    ranks = salience_ranks(values, seed).view(batch, 1, height, width)
    other = make_substrate(images, substrate)
    start, finish = (other, images) if insert else (images, other)
    counts = (torch.arange(steps + 1, device=images.device) * step).clamp(max=n)

    def rows(owners: Tensor, k: Tensor) -> Tensor:
        changed = ranks[owners] < counts[k].view(-1, 1, 1, 1)
        return torch.where(changed, finish[owners], start[owners])

    y = score_rows(model, rows, batch, steps + 1, scorer, batch_size, images.device, images.dtype)
    x = counts.to(y.dtype) / n
    return Curve(trapezoid(y, x), x, y)


def deletion(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *, step: Optional[int] = None,
             substrate: SubstrateSpec = "zeros", score: str = "softmax", batch_size: Optional[int] = None,
             seed: int = 0) -> Curve:
    """RISE deletion: remove the most salient pixels first; lower area is better.

    ``images`` (B, C, H, W) as the model takes them; ``maps`` (B, C or 1, H, W); ``step`` pixels per step (default
    ``ceil(H * W / 224)``); ``substrate`` the removed pixels' value (default zeros, see
    :func:`attribution.metrics.common.make_substrate`).  Returns a :class:`Curve` ``(auc (B,), x (S,), y (B, S))``.
    """
    return _causal_curve(model, images, maps, target, insert=False, step=step, substrate=substrate, score=score,
                         batch_size=batch_size, seed=seed)


def insertion(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *, step: Optional[int] = None,
              substrate: SubstrateSpec = "blur", score: str = "softmax", batch_size: Optional[int] = None,
              seed: int = 0) -> Curve:
    """RISE insertion: put the most salient pixels back first onto the substrate; higher area is better.

    Same arguments as :func:`deletion`; the default substrate is RISE's blurred image.
    """
    return _causal_curve(model, images, maps, target, insert=True, step=step, substrate=substrate, score=score,
                         batch_size=batch_size, seed=seed)


def _seed_score(model: nn.Module, step: int, images: Tensor, explanations: Tensor, insert: bool):
    curve = _causal_curve(model, images, explanations, None, insert=insert, step=step, substrate="zeros",
                          score="softmax", batch_size=None, seed=0)
    return float(curve.auc.mean()), curve.y.sum(dim=0).cpu().numpy().astype(np.float64)


def insert_score(model: nn.Module, step: int, images: Tensor, explanations: Tensor):
    """The seed's insertion metric: ``(mean AUC over the batch, curve summed over the batch as a NumPy array)``.

    As in the seed: the model's arg-max class, softmax, a zero substrate, ``step`` pixels per step.  New code
    should call :func:`insertion`, which returns per-image curves.
    """
    return _seed_score(model, step, images, explanations, insert=True)


def delete_score(model: nn.Module, step: int, images: Tensor, explanations: Tensor):
    """The seed's deletion metric, ``(mean AUC, curve summed over the batch)``; see :func:`insert_score`."""
    return _seed_score(model, step, images, explanations, insert=False)
