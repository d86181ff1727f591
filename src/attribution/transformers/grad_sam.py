"""Grad-SAM: gradient-weighted self-attention maps."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer


@register("grad_sam")
class GradSAM(AttentionExplainer):
    """Grad-SAM: every block's attention times the positive part of its gradient, averaged over blocks and heads.

    Barkan, Hauon, Caciularu, Katz, Malkiel, Armstrong & Koenigstein, "Grad-SAM: Explaining Transformers via
    Gradient Self-Attention Maps", CIKM 2021, arXiv:2204.11073.

    ``R = mean_{blocks, heads} (A * ReLU(d f_t / d A))`` for the (N, N) attention probabilities ``A`` of each head of
    each block; the map is the class token's row of ``R`` over the patches (the mean over all rows for models
    without prefix tokens), as for the other attention methods here.  The paper scores text tokens for a BERT
    classifier by averaging the same product over blocks, heads and one of the two token axes (public
    re-implementations differ on which); for a ViT's patch map the class token's row is what reads out the
    prediction.  Unlike :class:`attribution.transformers.generic_attention.GenericAttention` the blocks are
    averaged, not chained, and the gradient is rectified before the product.  Class-discriminative.
    Cost: one forward and one backward (to the attention maps) per image.
    """

    needs_gradients = True

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]]) -> Tensor:
        total = torch.zeros_like(attention[0][:, 0])
        for block, grad in zip(attention, gradients):
            total = total + (block * grad.clamp(min=0)).mean(dim=1)
        return total / len(attention)
