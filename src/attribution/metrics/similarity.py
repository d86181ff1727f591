"""Similarity of maps, batched: Spearman rank correlation, SSIM, and the seed's class-specific rank correlation."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: a row whose centred norm is at most this share of its scale counts as constant (see :func:`pearson`)
RELATIVE = 1e-12


def rank_data(values: Tensor) -> Tensor:
    """Ranks (0-based, float64) of each row of ``values`` (B, N), ties sharing their average rank (as SciPy's
    ``rankdata(method='average')`` minus one and torchmetrics' Spearman)."""
    batch, n = values.shape
    ordered, order = values.sort(dim=1, stable=True)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1  # group id of each sorted position
    position = torch.arange(n, dtype=torch.float64, device=values.device).expand(batch, n)
    first = torch.full((batch, n), float(n), dtype=torch.float64, device=values.device).scatter_reduce(
        1, group, position, "amin")
    last = torch.full((batch, n), -1.0, dtype=torch.float64, device=values.device).scatter_reduce(
        1, group, position, "amax")
    average = ((first + last) / 2).gather(1, group)
    ranks = torch.empty_like(average)
    return ranks.scatter_(1, order, average)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` (B, N), in float64; 0 where a row is constant.

    A row counts as constant when its centred norm is at most ``RELATIVE`` (1e-12) times its own scale
    (``sqrt(N) max |row|``): the rounding left by centring a constant row, whatever its magnitude, so that rows of
    tiny or huge values still correlate as SciPy's ``pearsonr`` says."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    ca, cb = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    na, nb = ca.norm(dim=1), cb.norm(dim=1)
    root = math.sqrt(a.shape[1])
    varies = (na > RELATIVE * root * a.abs().amax(dim=1)) & (nb > RELATIVE * root * b.abs().amax(dim=1))
    tiny = torch.finfo(torch.float64).tiny
    value = ((ca / na.clamp(min=tiny)[:, None]) * (cb / nb.clamp(min=tiny)[:, None])).sum(dim=1)
    return torch.where(varies, value, torch.zeros_like(value))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between each pair of maps ``a[i]``, ``b[i]`` (any shape with the batch first), (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"maps to compare must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return pearson(rank_data(a.flatten(1)), rank_data(b.flatten(1)))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03
         ) -> Tensor:
    """Mean structural similarity of (B, H, W) (or (B, 1, H, W)) maps, (B,).

    Wang, Bovik, Sheikh & Simoncelli, "Image quality assessment: from error visibility to structural similarity",
    IEEE TIP 2004.  As scikit-image's ``structural_similarity`` with its defaults: a uniform ``win_size`` window,
    sample (N - 1) covariances, ``K1 = 0.01``, ``K2 = 0.03``, averaged over the windows that lie inside the image.
    """
    x = a.reshape(a.shape[0], 1, *a.shape[-2:]).to(torch.float64)
    y = b.reshape(b.shape[0], 1, *b.shape[-2:]).to(torch.float64)
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"maps of size {tuple(x.shape[-2:])} are smaller than the SSIM window {win_size}")

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    correction = win_size ** 2 / (win_size ** 2 - 1)
    mx, my = mean(x), mean(y)
    vx = correction * (mean(x * x) - mx * mx)
    vy = correction * (mean(y * y) - my * my)
    cxy = correction * (mean(x * y) - mx * my)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def spearman_rank_correlation_value(att1: Tensor, att2: Tensor) -> Tensor:
    """The seed's per-image Spearman rank correlation of two batches of maps, (B,), on their device."""
    return spearman(att1, att2)


def class_specific_spearman_rank_corr(att_target: Tensor, att_other_class_list: Sequence[Tensor]) -> Tensor:
    """The seed's class sensitivity: the mean Spearman correlation of each image's map for its target class with its
    maps for other classes, (B,).  Lower means the method tells classes apart."""
    if len(att_other_class_list) == 0:
        raise ValueError("att_other_class_list holds no maps to compare with")
    return torch.stack([spearman(att_target, other) for other in att_other_class_list]).mean(dim=0)
