"""Chefer et al.'s transformer attribution: LRP relevance of the attention maps, weighted by their gradients and
rolled out over the blocks."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Tuple

import torch
from torch import Tensor

from ..core.registry import register
from ..core.rules import SequenceFirstScope, stabilize
from .attention import AttentionCapture
from .generic_attention import GenericAttention


@register("transformer_attribution")
class TransformerAttribution(GenericAttention):
    """Transformer attribution: the attention maps' LRP relevance times their gradient, rolled out over the blocks.

    Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021, arXiv:2012.09838.

    Per block: ``Abar = mean_heads (grad_A f_t * R_A)^+``, where ``grad_A f_t`` is the plain gradient of the
    target's logit w.r.t. the attention probabilities and ``R_A`` their LRP relevance, propagated from relevance 1
    at the target's logit with the authors' rules (their ViT's ``relprop``): linear layers and convolutions
    LRP-alpha1-beta0 with the bias left out; residual sums shared between the branches in proportion to the
    absolute totals of their LRP-0 relevance (per image), the output's total conserved; layer norms, softmaxes and
    GELUs passing the relevance unchanged; each product of two computed tensors (``q k^T``, ``A v``) sharing it
    equally between its factors (LRP-0, halved).  The map is the class token's row of ``(Abar_L + I) ... (Abar_1 +
    I)`` over the patches (the authors' ``start_layer=0``; the rollout of :class:`GenericAttention`, whose formula
    this is with ``R_A`` in place of the attention).  Equal to the authors' relevance propagation written out for
    timm's and torchvision's ViTs; works on fused and unfused attention alike.  Deliberate difference: the sums'
    totals are per image (the authors' code explains one image at a time and sums over the batch),
    along the batch's dimension (the second in sequence-first blocks such as ``nn.TransformerEncoder``'s default:
    the dimension whose size is the pass's row count, or, when the token count is that too, the second inside the
    blocks that hold a sequence-first ``nn.MultiheadAttention``).
    Exactly zero activations pass no relevance (the authors' guarded division), which also keeps float16 models'
    maps finite; but the rules divide relevance by activations, so half-precision models' rounding of
    near-cancelling residual sums shows in their maps (correlation with the float32 map 0.85 on a toy ViT, lower on
    others), where a float32 model under ``amp`` keeps its sums in float32 (above 0.93 on the same models).
    Cost: one forward and two backwards (the relevance pass runs each linear layer's rule, about three times a
    plain backward through it).
    """

    @contextmanager
    def _capturing(self, rows: int) -> Iterator[AttentionCapture]:
        """The forward under Chefer et al.'s rules, its attention recorded inside them (so that the recorded
        probabilities are the factors the attention product's rule applies to)."""
        from ..gradients.attn_lrp import TransformerLRPRules  # the rules build on the attention capture

        scope = SequenceFirstScope(self.model)
        self._rules = TransformerLRPRules("chefer", eps=1e-10, rows=rows, scope=scope)
        try:
            with self._rules, scope, AttentionCapture(self.model) as capture:
                yield capture
        except BaseException:
            self.__dict__.pop("_rules", None)
            raise

    def _attention_gradients(self, scores: Tensor, attention: List[Tensor],
                             create_graph: bool) -> Tuple[Tensor, ...]:
        """``grad_A f_t * R_A / A``: the relevance pass (gradient 1 / f_t at the logit, so that the relevance there
        is 1), then, with the rules turned plain, the plain gradient."""
        rules = self.__dict__.pop("_rules")
        # the seed 1 / f_t (relevance 1 at the logit, a constant as the authors' one-hot: not differentiated)
        relevance = torch.autograd.grad(scores, attention, 1 / stabilize(scores, 1e-9), retain_graph=True,
                                        create_graph=create_graph)
        rules.state.plain, rules.state.parameters = True, False  # this pass asks for the maps' gradients only
        plain = torch.autograd.grad(scores.sum(), attention, create_graph=create_graph)
        rules.state.parameters = True
        return tuple(g * r for g, r in zip(plain, relevance))
