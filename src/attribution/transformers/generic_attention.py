"""Gradient-weighted attention rollout (Chefer et al.'s generic attention explainability)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer


@register("generic_attention")
class GenericAttention(AttentionExplainer):
    """Generic attention-model explainability: attention weighted by its gradient, accumulated over blocks.

    Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
    Transformers", ICCV 2021, arXiv:2103.15679.

    Per block: ``Abar = mean_heads (grad_A f_t * A)^+``; relevance ``R = I``, then ``R <- R + Abar R`` block by
    block.  The map is the class token's row of ``R - I`` over the patches.  Class-discriminative.
    Cost: one forward and one backward (to the attention maps) per image.
    """

    needs_gradients = True

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]]) -> Tensor:
        tokens = attention[0].shape[-1]
        eye = torch.eye(tokens, dtype=attention[0].dtype, device=attention[0].device)
        relevance = eye.expand(attention[0].shape[0], tokens, tokens)
        for block, grad in zip(attention, gradients):
            weighted = (grad * block).clamp(min=0).mean(dim=1)
            relevance = relevance + weighted @ relevance
        return relevance - eye
