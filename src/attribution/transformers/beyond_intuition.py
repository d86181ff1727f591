"""Beyond Intuition: token attributions from attention perception and integrated reasoning feedback."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec
from .base import AttentionExplainer
from .tokens import token_layout


def attention_perception(attention: Sequence[Tensor], gradients: Sequence[Tensor]) -> Tensor:
    """(n, N, N) token interactions from (n, heads, N, N) attention maps and their gradients, block by block:
    ``R <- R + (sum_h I_h A_h) R`` from ``R = I``, with head importances ``I_h = mean |A_h^T dA_h|`` normalised to
    sum to 1 over the heads of each image (the head-wise approximation)."""
    tokens = attention[0].shape[-1]
    eye = torch.eye(tokens, dtype=attention[0].dtype, device=attention[0].device)
    relevance = eye.expand(attention[0].shape[0], tokens, tokens)
    for block, grad in zip(attention, gradients):
        importance = (block.transpose(-1, -2) @ grad).abs().mean(dim=(-1, -2))  # (n, heads)
        total = importance.sum(dim=1, keepdim=True)
        importance = importance / torch.where(total > 0, total, torch.ones_like(total))
        relevance = relevance + (importance[:, :, None, None] * block).sum(dim=1) @ relevance
    return relevance


@register("beyond_intuition")
class BeyondIntuition(AttentionExplainer):
    """Beyond Intuition (head-wise): attention perception times the integrated gradient of the last attention map.

    Chen, Li, Yu, Dou & Xiong, "Beyond Intuition: Rethinking Token Attributions inside Transformers", TMLR 2023
    (OpenReview rm0zIzlhcX).

    Attention perception, from the blocks ``start_block`` on: ``R = I``, then per block ``R <- R + Abar R`` with
    ``Abar = sum_h I_h A_h`` and ``I_h = mean_ij |A_h^T dA_h|`` normalised over the heads (``A_h`` a head's
    attention probabilities, ``dA_h`` the target score's gradient w.r.t. them, both at the image).  Reasoning
    feedback: ``W = mean_heads ReLU(1/steps sum_k dA_last(x' + a_k (x - x')))`` over ``steps`` points
    ``a_k = linspace(0, 1, steps)`` of the straight path from the baseline (both ends included, as the authors'
    code).  The map is the class token's row of ``W * R`` over the patches.  Defaults as the authors' ViT code:
    ``steps=20``, the zero baseline, and its ``start_layer=4`` (blocks from the fourth on), here ``start_block=3``
    counted from 0.  The token-wise variant (value-norm ratios instead of head importances) needs each block's value
    projections and is not included.  Class-discriminative.
    Cost: ``steps`` forwards and backwards per image: the last path point is the image itself, whose backward
    reaches every block's attention (it also gives the perception's maps); the ``steps - 1`` other points' backwards
    stop at the last block's attention.
    """

    needs_gradients = True
    argmax_on_rows = False  # the path points are not the image: None is resolved to the image's arg-max first
    defaults = {"steps": 20, "start_block": 3, "baseline": "zero"}

    def _explain(self, x: Tensor, target: Target, *, steps: int, start_block: int, baseline: BaselineSpec,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2 (the path's two ends are both points), got {steps!r}")
        if isinstance(start_block, bool) or not isinstance(start_block, int) or start_block < 0:
            raise ValueError(f"start_block must be a non-negative int, got {start_block!r}")

        def check_blocks(blocks: int) -> None:
            if start_block >= blocks:
                raise ValueError(f"start_block={start_block} but the model has {blocks} attention blocks")

        def perception(attention: List[Tensor], gradients: List[Tensor]) -> Tensor:
            return attention_perception(attention[start_block:], gradients[start_block:])

        weights, kept = self._integrated_last_attention(x, target, steps, baseline, batch_size, create_graph,
                                                        True, perception, check_blocks)
        relevance = weights * kept
        layout = token_layout(self.model, tuple(x.shape[-2:]), relevance.shape[-1], "the attention maps")
        return self._to_image(relevance, layout, tuple(x.shape[-2:]))
