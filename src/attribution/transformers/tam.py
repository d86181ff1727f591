"""Transition Attention Maps: the class token's attention walked back through the blocks as a Markov chain, weighted
by the integrated gradient of the last block's attention."""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec
from .base import AttentionExplainer
from .tokens import token_layout


def transition_states(attention: Sequence[Tensor]) -> Tensor:
    """(n, N, N) states of the chain from per-block (n, heads, N, N) attention maps, first to last block:
    ``T = Abar_last (Abar_{last-1} + I) ... (Abar_first + I)`` with ``Abar`` the mean over heads.  Row ``i`` starts
    as token ``i``'s attention in the last block and steps back through each earlier block by its attention plus
    the residual's identity (unnormalised, as the authors' code: each step doubles the row's total; ``(A + I) / 2``
    is the row-stochastic transition matrix up to that factor)."""
    states = attention[-1].mean(dim=1)
    for block in reversed(attention[:-1]):
        states = states @ block.mean(dim=1) + states
    return states


@register("tam")
class TAM(AttentionExplainer):
    """Transition Attention Maps: a Markov chain over the attention of the blocks, weighted by integrated gradients.

    Yuan, Li, Xiong, Cao & Dou, "Explaining Information Flow Inside Vision Transformers Using Markov Chain",
    NeurIPS 2021 Workshop on eXplainable AI approaches for debugging and diagnosis (XAI4Debugging, oral; OpenReview
    TT-cf6QSDaQ; no arXiv version).  Authors' code: github.com/XianrenYty/Transition_Attention_Maps, also
    PaddlePaddle/InterpretDL's ``TAMInterpreter``.

    State: ``s = e_cls Abar_{L-1} (Abar_{L-2} + I) ... (Abar_{start_block} + I)`` (``Abar`` the mean over heads of
    a block's attention at the image, blocks counted from 0; the class token's row of the last block's attention is
    the initial state).  Weights: ``W = mean_heads ReLU(1/steps sum_k dA_{L-1}(x' + a_k (x - x')))[cls]``, the
    target's gradient w.r.t. the last block's attention averaged over ``a_k = linspace(0, 1, steps)`` (both ends,
    as the authors' code).  The map is ``s * W`` over the patch tokens, upsampled bilinearly.  Models without prefix
    tokens: the mean over all initial tokens of the rows ``T_i * W_i`` (``T`` as :func:`transition_states`).
    Defaults as the authors' evaluation code and InterpretDL: ``steps=20``, ``start_block=4`` (their
    ``start_layer=4``, also counted from 0; an older copy in their repository defaults to 0), the zero baseline
    (their path scales the input by ``a_k``); a negative ``start_block`` counts from the last block.
    Class-discriminative; raw values, unnormalised as the authors' (the chain's total is ``2^(L-1-start_block)``;
    ``normalize_saliency`` for display).  The target's logit by default, as the authors' code (InterpretDL explains
    the softmax probability: ``score="softmax"``).
    Cost: ``steps`` forwards per image, each with a backward from the score to the last block's attention only
    (head, final norm and the last block's tail, not the whole model); the path's last point is the image itself
    and gives the chain's attention maps.
    Deliberate differences: the authors' ``with_integral=False`` and ``first_state=True`` switches are not offered
    (``start_block=-1`` is the chain of one block); ``baseline`` generalises their zero baseline.
    """

    argmax_on_rows = False  # the path points are not the image: None is resolved to the image's arg-max first
    defaults = {"steps": 20, "start_block": 4, "baseline": "zero"}

    def _explain(self, x: Tensor, target: Target, *, steps: int, start_block: int, baseline: BaselineSpec,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2 (the path's two ends are both points), got {steps!r}")
        if isinstance(start_block, bool) or not isinstance(start_block, int):
            raise ValueError(f"start_block must be an int, got {start_block!r}")

        def chain(attention: List[Tensor], gradients: List[Tensor]) -> Tensor:
            return transition_states(attention[_first_block(start_block, len(attention)):])

        def check_blocks(blocks: int) -> None:
            _first_block(start_block, blocks)

        weights, states = self._integrated_last_attention(x, target, steps, baseline, batch_size, create_graph,
                                                          False, chain, check_blocks)
        relevance = weights * states
        layout = token_layout(self.model, tuple(x.shape[-2:]), relevance.shape[-1], "the attention maps")
        return self._to_image(relevance, layout, tuple(x.shape[-2:]))


def _first_block(start_block: int, blocks: int) -> int:
    if not -blocks <= start_block < blocks:
        raise ValueError(f"start_block must be an int from {-blocks} to {blocks - 1} (the model has {blocks} "
                         f"attention blocks), got {start_block!r}")
    return start_block % blocks
