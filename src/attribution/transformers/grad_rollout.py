"""Gradient attention rollout (vit-explain's ``grad_rollout``): attention times its gradient, rolled out."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer, check_head_fusion, fuse_heads
from .rollout import check_discard_ratio, residual_rollout


@register("grad_rollout")
class GradientRollout(AttentionExplainer):
    """Gradient attention rollout: each block's attention times the target's gradient w.r.t. it, fused over heads,
    negatives clamped, the lowest entries discarded, then rolled out with the residual identity.

    Jacob Gildenblat, vit-explain (github.com/jacobgil/vit-explain, ``vit_grad_rollout.py``; no paper); the rollout
    of Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020, arXiv:2005.00928.

    Per block: ``F = max(0, fuse_heads(A * dA))`` (``A`` the (heads, N, N) attention probabilities, ``dA`` the
    gradient of the target's score w.r.t. them; ``head_fusion`` mean, max or min, clamped after the fusion as
    vit-explain clamps after its mean); the lowest ``discard_ratio`` of ``F``'s N*N entries are set to 0, never
    the class token's own entry (0, 0); ``A' = (F + I) / 2`` renormalised to rows summing to 1;
    ``R = A'_L ... A'_1``.  The map is the class token's row of ``R`` over the patches (the mean of the patch rows
    for models without a class token), on the patch grid, upsampled bilinearly; raw (vit-explain divides it by its
    maximum: :func:`attribution.utils.normalize_saliency` does that).  Class-discriminative.
    Defaults as vit-explain's ``VITAttentionGradRollout``: ``discard_ratio=0.9``, the mean over heads (its only
    fusion), the target's logit.  Cost: one forward and one backward (to the attention maps) per image.

    Deliberate differences from vit-explain (the first two are bugs reported in its issues): its gradients are collected by backward
    hooks, so they arrive last block first and ``zip`` pairs block ``l``'s attention with block ``L + 1 - l``'s
    gradient (issue #6); here each block's attention meets its own gradient.  It divides by ``a.sum(dim=-1)``
    without ``keepdim``, which broadcasts entry (i, j) over row j's sum (issue #16); here rows are renormalised, as
    in the rollout it follows.  Its line keeping the class token's entry out of the discarded ones is commented out
    (its comment says the entry is kept, as its plain rollout does); here it is kept.  ``head_fusion`` max and min
    are the fusions of its plain rollout, which its issue #3 asks for here too.
    """

    needs_gradients = True
    defaults = {"head_fusion": "mean", "discard_ratio": 0.9}

    def _check_options(self, *, head_fusion: str, discard_ratio: float) -> None:
        check_head_fusion(head_fusion)
        check_discard_ratio(discard_ratio)

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, head_fusion: str,
                   discard_ratio: float) -> Tensor:
        fused = [fuse_heads(block * grad, head_fusion).clamp(min=0) for block, grad in zip(attention, gradients)]
        return residual_rollout(fused, discard_ratio)
