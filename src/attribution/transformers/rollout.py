"""Attention rollout."""
from __future__ import annotations

from typing import List, Optional, Tuple

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
        if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) \
                or not 0.0 <= discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio!r}")

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, head_fusion: str,
                   discard_ratio: float) -> Tensor:
        tokens = attention[0].shape[-1]
        eye = torch.eye(tokens, dtype=attention[0].dtype, device=attention[0].device)
        rollout = eye.expand(attention[0].shape[0], tokens, tokens)
        for block in attention:
            fused = fuse_heads(block, head_fusion)
            if discard_ratio > 0:
                fused = discard_lowest(fused, discard_ratio)
            rollout = with_residual(fused) @ rollout
        return rollout


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
