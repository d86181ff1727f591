"""Complexity of a map: the Gini index of its magnitudes (sparseness) and their entropy (complexity)."""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12


def gini(maps: Tensor) -> Tensor:
    """Gini index of ``|maps|`` per image, (B,): 0 for a uniform map, ``(n - 1) / n`` for a single non-zero entry.

    Hurley & Rickard, "Comparing Measures of Sparsity", IEEE Trans. Inf. Theory 2009, as used for attributions by
    Chalasani, Chen, Chowdhury, Wu & Jha, "Concise Explanations of Neural Networks using Adversarial Training",
    ICML 2020, arXiv:1810.06583: with the n magnitudes sorted ascending, ``G = sum_k (2k - n - 1) a_k / (n sum_k a_k)``.
    Computed over every entry of each map (all channels).  An all-zero map scores 0.
    """
    a = maps.flatten(1).abs().to(torch.float64).sort(dim=1).values
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
    a = maps.flatten(1).abs().to(torch.float64)
    total = a.sum(dim=1, keepdim=True)
    p = a / total.clamp(min=EPS)
    value = -(p * torch.log(p.clamp(min=EPS))).sum(dim=1)
    return torch.where(total[:, 0] > EPS, value, torch.zeros_like(value))
