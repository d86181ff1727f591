"""Attention rollout."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer, check_head_fusion, fuse_heads


@register("attention_rollout")
class AttentionRollout(AttentionExplainer):
    """Attention rollout: attention flows through the blocks, with the residual connection as the identity.

    Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020, arXiv:2005.00928.

    Per block: ``A = fuse_heads(attn)`` (``head_fusion``: mean, max or min over heads); optionally the lowest
    ``discard_ratio`` of each fused matrix's entries are set to 0 (never the class token's own entry, as in the
    widely used vit-explain variant; 0 by default, as in the paper); ``A' = (A + I) / 2`` renormalised to rows
    summing to 1; ``R = A'_L ... A'_1``.  The map is the class token's row of ``R`` over the patches.
    Class-agnostic: the target is accepted and ignored.  Cost: one forward per image.
    """

    defaults = {"head_fusion": "mean", "discard_ratio": 0.0}

    def _check_options(self, *, head_fusion: str, discard_ratio: float) -> None:
        check_head_fusion(head_fusion)
        check_discard_ratio(discard_ratio)

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, head_fusion: str,
                   discard_ratio: float) -> Tensor:
        return residual_rollout([fuse_heads(block, head_fusion) for block in attention], discard_ratio)


def check_discard_ratio(value: object) -> float:
    """The ``discard_ratio`` option: a number in [0, 1) (not a bool), as a float; else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {value!r}")
    return float(value)


def residual_rollout(fused: Sequence[Tensor], discard_ratio: float = 0.0) -> Tensor:
    """``R = A'_L ... A'_1`` (B, N, N) from per-block fused (B, N, N) matrices ``A_l``, first block first:
    ``A'_l = with_residual(discard_lowest(A_l, discard_ratio))`` (the lowest ``discard_ratio`` of each matrix's
    entries zeroed, never entry (0, 0); nothing zeroed at 0), i.e. ``(A_l + I) / 2`` renormalised to rows summing
    to 1."""
    discard_ratio = check_discard_ratio(discard_ratio)
    return rollout_product([with_residual(discard_lowest(block, discard_ratio) if discard_ratio > 0 else block)
                            for block in fused])


def rollout_product(mixing: Sequence[Tensor]) -> Tensor:
    """``M_L ... M_2 M_1`` of the blocks' (B, N, N) mixing matrices, first block first, with no identity added (for
    mixing matrices that already hold the residual stream, e.g. Value Zeroing's and ALTI's; the authors'
    ``compute_joint_attention`` with ``res=False``)."""
    if not mixing:
        raise ValueError("a rollout needs at least one block")
    rollout = mixing[0]
    for matrix in mixing[1:]:
        rollout = matrix @ rollout
    return rollout


def row_normalised(contributions: Tensor) -> Tensor:
    """(B, N, N) non-negative contributions divided by their row sums; a row of zeros (nothing reaches that token)
    becomes the identity's row: the token mixes nothing."""
    total = contributions.sum(dim=-1, keepdim=True)
    eye = torch.eye(contributions.shape[-1], dtype=contributions.dtype, device=contributions.device)
    positive = total > 0
    return torch.where(positive, contributions / torch.where(positive, total, torch.ones_like(total)),
                       eye.expand_as(contributions))


def with_residual(fused: Tensor) -> Tensor:
    """``(A + I) / 2`` renormalised to rows summing to 1: a block's (..., N, N) fused attention with the residual
    connection's identity (Abnar & Zuidema's augmented attention)."""
    step = (fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)) / 2
    return step / step.sum(dim=-1, keepdim=True)


def discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` of each (N, N) matrix's entries, keeping entry (0, 0)."""
    flat = fused.flatten(1)
    count = int(flat.shape[1] * ratio)
    if count == 0:
        return fused
    lowest = flat.topk(count, dim=1, largest=False).indices
    keep = torch.ones_like(flat, dtype=torch.bool).scatter(1, lowest, False)
    keep[:, 0] = True
    return (flat * keep).view_as(fused)
