"""Complexity of a map: the Gini index of its magnitudes (sparseness), their entropy (complexity), the entropy of
its histogram (discrete entropy) and the count of non-negligible entries (effective complexity)."""
from __future__ import annotations

import torch
from torch import Tensor

from .common import check_finite

EPS = 1e-12


def _check(maps: Tensor) -> None:
    """Raise a clear error unless ``maps`` is a finite tensor of one map per image, (B, ...)."""
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor of shape (B, ...) (e.g. (B, C, H, W)), one map per image, got {shape}")
    check_finite(maps)


def gini(maps: Tensor) -> Tensor:
    """Gini index of ``|maps|`` per image, (B,): 0 for a uniform map, ``(n - 1) / n`` for a single non-zero entry.

    Hurley & Rickard, "Comparing Measures of Sparsity", IEEE Trans. Inf. Theory 2009, as used for attributions by
    Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural Networks using Adversarial Training",
    ICML 2020, arXiv:1810.06583: with the n magnitudes sorted ascending, ``G = sum_k (2k - n - 1) a_k / (n sum_k a_k)``.
    Computed over every entry of each map (all channels).  An all-zero map scores 0.
    """
    _check(maps)
    a = maps.detach().flatten(1).abs().to(torch.float64).sort(dim=1).values
    n = a.shape[1]
    k = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    total = a.sum(dim=1)
    value = ((2 * k - n - 1) * a).sum(dim=1) / (n * total.clamp(min=EPS))
    return torch.where(total > EPS, value, torch.zeros_like(total))


def entropy(maps: Tensor) -> Tensor:
    """Entropy of each map's fractional contributions ``p_i = |A_i| / sum_j |A_j|``, (B,), in nats: 0 for a single
    non-zero entry, ``log n`` for a uniform map (lower is simpler).

    Bhatt, Weller & Moura, "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020,
    arXiv:2005.00631 (their "complexity"; Quantus' ``Complexity``), over every entry of each map (all channels).
    An all-zero map scores 0.
    """
    _check(maps)
    a = maps.detach().flatten(1).abs().to(torch.float64)
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp(min=EPS)
    value = -(p * torch.log(p.clamp(min=EPS))).sum(dim=1)
    return torch.where(total[:, 0] > EPS, value, torch.zeros_like(value))


def effective_complexity(maps: Tensor, eps: float = 1e-5, normalise: bool = True) -> Tensor:
    """Effective complexity, (B,) int64: the number of entries of each map whose magnitude exceeds ``eps`` (lower is
    simpler).

    Nguyen & Rodríguez Martínez, "On Quantitative Aspects of Model Interpretability", arXiv:2007.07584, 2020
    (Quantus ``EffectiveComplexity``): ``EC = #{i : |A_i| / max_j |A_j| > eps}``, over every entry of each map (all
    channels).  Defaults as Quantus: ``eps = 1e-5``, magnitudes divided by the maximum first (``normalise=False``
    thresholds the raw magnitudes).  One deliberate difference: each map is divided by its own maximum, where
    Quantus' ``normalise_by_max`` divides the whole batch by the batch's largest magnitude, so that an image's count
    there depends on the other images in the call; the two agree for a batch of one or maps of equal maxima.
    An all-zero map scores 0.
    """
    _check(maps)
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    a = maps.detach().flatten(1).abs().to(dtype)
    if normalise:
        top = a.amax(dim=1, keepdim=True)
        a = torch.where(top > 0, a / torch.where(top > 0, top, torch.ones_like(top)), a)
    return (a > eps).sum(dim=1)


def histogram(maps: Tensor, bins: int = 100) -> Tensor:
    """Counts (B, bins) of each map's entries (all channels) in ``bins`` equal bins from its minimum to its maximum,
    the last bin closed, as NumPy's ``histogram(a, bins)`` (its bin edges and its correction of indices within an ulp
    of an edge, so the counts are NumPy's for float64 maps); a constant map counts in the middle bin of
    ``[v - 0.5, v + 0.5]``.  Computed in float64 (NumPy bins a float32 map in float32: an entry within a float32 ulp
    of an edge may land in the neighbouring bin).  Batched: no loop over images.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    a = maps.detach().flatten(1).to(torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("maps must be finite to be binned")
    first, last = a.amin(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)
    flat = first == last
    first, last = torch.where(flat, first - 0.5, first), torch.where(flat, last + 0.5, last)
    k = torch.arange(bins + 1, dtype=torch.float64, device=a.device)
    edges = k * ((last - first) / bins) + first  # NumPy's linspace: k * step + start, the last edge set to stop
    edges[:, -1:] = last
    index = (((a - first) / (last - first)) * bins).long()
    index = index - (index == bins).long()
    index = index - (a < edges.gather(1, index)).long()
    index = index + ((a >= edges.gather(1, index + 1)) & (index != bins - 1)).long()
    counts = torch.zeros(a.shape[0], bins, dtype=torch.float64, device=a.device)
    return counts.scatter_add_(1, index, torch.ones_like(a))


def discrete_entropy(maps: Tensor, bins: int = 100) -> Tensor:
    """Entropy (nats) of each map's histogram of values, (B,): :func:`entropy` of the :func:`histogram` counts, 0
    when every entry falls in one bin, ``log bins`` at most (lower is simpler).

    The complexity measure of Hedstroem, Weber, Lapuschkin & Hoehne, "Sanity Checks Revisited: An Exploration to
    Repair the Model Parameter Randomisation Test", arXiv:2401.06465, 2024 (Quantus' ``discrete_entropy``, SciPy's
    ``entropy`` of NumPy's ``histogram``), over every entry of each map (signed: pass ``maps.abs()`` for
    magnitudes).  Default as Quantus: 100 bins.  Unlike :func:`entropy`, it does not change when a map is scaled.
    """
    return entropy(histogram(maps, bins))
