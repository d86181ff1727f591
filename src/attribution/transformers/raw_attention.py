"""Raw attention: one block's attention probabilities."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer, check_head_fusion, fuse_heads


@register("raw_attention")
class RawAttention(AttentionExplainer):
    """Raw attention: the class token's attention to the patches in one block, heads fused.

    The baseline that transformer explanations are compared with (e.g. Abnar & Zuidema, ACL 2020,
    arXiv:2005.00928; Chefer, Gur & Wolf, CVPR 2021, arXiv:2012.09838, which uses the last block).

    ``R = fuse_heads(A_block)`` (``head_fusion``: mean, max or min over heads) for the block ``block`` (an index
    into the blocks in forward order, ``-1``, the last, by default); the map is the class token's row of ``R`` over
    the patches (the mean over all rows for models without prefix tokens).  Class-agnostic: the target is accepted
    and ignored.  Cost: one forward per image.
    """

    defaults = {"block": -1, "head_fusion": "mean"}

    def _check_options(self, *, block: int, head_fusion: str) -> None:
        check_head_fusion(head_fusion)
        if isinstance(block, bool) or not isinstance(block, int):
            raise ValueError(f"block must be an int index into the model's attention blocks, got {block!r}")

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, block: int,
                   head_fusion: str) -> Tensor:
        if isinstance(block, bool) or not isinstance(block, int) or not -len(attention) <= block < len(attention):
            raise ValueError(f"block must be an int index into the model's {len(attention)} attention blocks, "
                             f"got {block!r}")
        return fuse_heads(attention[block], head_fusion)
