"""AG-CAM: attention-guided CAM for vision transformers."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer

#: how heads and blocks are combined (the authors' code: einops' Reduce with these reductions)
FUSIONS = ("sum", "mean", "max")


@register("ag_cam")
class AGCAM(AttentionExplainer):
    """AG-CAM: every head's attention scores, squashed by a sigmoid, weighted by the positive part of the target's
    gradient w.r.t. its attention probabilities, summed over heads and blocks.

    Leem & Seo, "Attention Guided CAM: Visual Explanations of Vision Transformer Guided by Self-Attention", AAAI
    2024, arXiv:2402.04563.

    ``R = sum_{blocks, heads} sigmoid(S) * ReLU(d f_t / d A)`` with ``S = q k^T * scale`` the scores before the
    softmax and ``A = softmax(S)``; the map is the class token's row of ``R`` over the patches (the authors keep only
    that row: the only one the classifier reads in a class-token ViT; the mean over all rows for models without
    prefix tokens).  ``head_fusion`` and ``layer_fusion``: ``'sum'`` (the authors' default), ``'mean'`` or ``'max'``.
    Raw map (the authors' demo min-max scales it).  Class-discriminative.  Cost: one forward and one backward (to
    the attention maps) per image.
    """

    needs_gradients = True
    needs_scores = True
    defaults = {"head_fusion": "sum", "layer_fusion": "sum"}

    def _check_options(self, *, head_fusion: str, layer_fusion: str) -> None:
        for name, value in (("head_fusion", head_fusion), ("layer_fusion", layer_fusion)):
            if not isinstance(value, str) or value not in FUSIONS:
                raise ValueError(f"{name} must be one of {FUSIONS}, got {value!r}")

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, head_fusion: str,
                   layer_fusion: str, scores: List[Tensor]) -> Tensor:
        blocks = [_reduce(torch.sigmoid(score) * grad.clamp(min=0), 1, head_fusion)
                  for score, grad in zip(scores, gradients)]
        return _reduce(torch.stack(blocks), 0, layer_fusion)


def _reduce(t: Tensor, dim: int, how: str) -> Tensor:
    return t.sum(dim=dim) if how == "sum" else t.mean(dim=dim) if how == "mean" else t.amax(dim=dim)
