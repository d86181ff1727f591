"""TokenTM: gradient-weighted attention and the token transformation effects of every block, aggregated from the
input tokens' lengths."""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .base import AttentionExplainer, _at_least_float32, batch_first_tokens
from .tokens import token_layout

#: one block's tokens: entering it, after its attention sublayer's residual sum, leaving it (each (B, N, D))
BlockTokens = Tuple[Tensor, Tensor, Tensor]


#: added to the length before a transformation in the length ratio (LibraGrad's value)
LENGTH_EPS = 1e-8

def transformation_weights(before: Tensor, after: Tensor) -> Tensor:
    """(..., N) token transformation effects of (..., N, D) tokens turned into ``after``: the length ratio
    ``|after_i| / |before_i|`` times the normalized exponential cosine correlation ``NECC_i = exp(cos_i) /
    sum_j exp(cos_j)`` (a softmax over the tokens of ``cos_i = cos(before_i, after_i)``).  Lengths are L2 norms;
    the ratio's denominator gets LibraGrad's 1e-8, so a zero length stays finite."""
    tiny = torch.finfo(before.dtype).tiny
    before_length, after_length = before.norm(dim=-1), after.norm(dim=-1)
    cosine = (before * after).sum(dim=-1) / (before_length * after_length).clamp(min=tiny)
    return after_length / (before_length + LENGTH_EPS) * cosine.softmax(dim=-1)


def token_transformation_rollout(attention: Sequence[Tensor], gradients: Sequence[Tensor],
                                 tokens: Sequence[BlockTokens]) -> Tensor:
    """(B, N, N) contribution map ``C_L`` from per-block (B, heads, N, N) attention, its gradients and the blocks'
    tokens: ``C_0 = diag |E_0|``, then per block ``C <- (I + diag w_mlp) (I + (mean_h A diag w_attn) *
    mean_h ReLU(dA)) C``."""
    contribution = torch.diag_embed(tokens[0][0].norm(dim=-1))
    for a, grad, (entering, middle, leaving) in zip(attention, gradients, tokens):
        mixing = a.mean(dim=1) * transformation_weights(entering, middle).unsqueeze(-2) * grad.clamp(min=0).mean(dim=1)
        mlp = transformation_weights(middle, leaving)
        contribution = (1 + mlp).unsqueeze(-1) * (contribution + mixing @ contribution)
    return contribution


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


class BlockRecorder:
    """Hooks that record, per block, the tokens entering it, entering each normalisation layer among its direct
    children (for a pre-norm block the second is the residual stream after the attention sublayer) and leaving it."""

    def __init__(self, blocks: Sequence[nn.Module], names: Sequence[str]) -> None:
        self.blocks = list(blocks)
        self.names = list(names)
        self.entering: List[List[Optional[Tensor]]] = [[] for _ in blocks]
        self.norms: List[List[Optional[Tensor]]] = [[] for _ in blocks]
        self.leaving: List[List[Tensor]] = [[] for _ in blocks]
        self.handles: list = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._first_input, self.entering[index])))
            self.handles.append(block.register_forward_hook(partial(self._output, self.leaving[index])))
            for child in block.children():
                if _is_norm(child):
                    self.handles.append(child.register_forward_pre_hook(partial(self._first_input, self.norms[index])))

    @staticmethod
    def _first_input(store: list, module: nn.Module, args: tuple) -> None:
        store.append(args[0] if args and isinstance(args[0], Tensor) else None)

    @staticmethod
    def _output(store: list, module: nn.Module, args: tuple, output) -> None:
        store.append(output[0] if isinstance(output, (tuple, list)) else output)

    def tokens(self, model: nn.Module, rows: int, method: str = "TokenTM") -> List[BlockTokens]:
        """Each block's (entering, after attention, leaving) tokens, checked to come from pre-norm blocks (``method``
        names the caller in the errors)."""
        found = []
        for block, name, entering, norms, leaving in zip(self.blocks, self.names, self.entering, self.norms,
                                                         self.leaving):
            if len(entering) != 1 or len(leaving) != 1 or entering[0] is None:
                raise ValueError(f"{method} needs each block to run once on a token tensor; block {name!r} of "
                                 f"{type(model).__name__} ran {len(entering)} times")
            if len(norms) != 2 or norms[0] is not entering[0] or norms[1] is None:
                where = "" if not norms or norms[0] is entering[0] else ", the first not on the block input"
                raise ValueError(
                    f"{method} needs pre-norm blocks (x + attention(norm(x)), then + mlp(norm(...))) whose two "
                    f"normalisation layers are direct children; block {name!r} of {type(model).__name__} ran "
                    f"{len(norms)} such layers{where}"
                )
            states = (entering[0], norms[1], leaving[0])
            if all(isinstance(s, Tensor) and s.dim() == 3 for s in states):  # sequence-first blocks' (N, B, D)
                states = tuple(batch_first_tokens(s, rows, block) for s in states)
            if any(s.dim() != 3 or s.shape != states[0].shape or s.shape[0] != rows for s in states):
                raise ValueError(f"{method} needs (B, N, D) tokens of one shape in block {name!r} of "
                                 f"{type(model).__name__}, got {[tuple(s.shape) for s in states]} for {rows} images")
            found.append(states)
        return found


@register("token_tm")
class TokenTM(AttentionExplainer):
    """TokenTM: attention weighted by its gradient and by how each block transforms the tokens (their lengths and
    directions), aggregated over the blocks from the input tokens' lengths.

    Wu, Duan, Kang, Tang & Yan, "Token Transformation Matters: Towards Faithful Post-hoc Explanation for Vision
    Transformer", CVPR 2024, arXiv:2403.14552.

    With ``E`` the tokens entering a block (B, N, D), ``E'`` the residual stream after its attention sublayer and
    ``E''`` the tokens leaving it, the transformation effect of ``X -> Y`` on token ``i`` is ``w_i = |Y_i| / |X_i| *
    NECC_i``, ``NECC_i = exp(cos(X_i, Y_i)) / sum_j exp(cos(X_j, Y_j))`` (:func:`transformation_weights`).  Per
    block ``U = (I + diag w(E' -> E'')) (I + (mean_h A diag w(E -> E')) * mean_h ReLU(d f_t / d A))`` (``*``
    elementwise, ``A`` the attention probabilities, ``f_t`` the target's score); ``C_0 = diag |E_0|`` (the lengths
    of the tokens entering the first block), ``C_l = U_l C_{l-1}``; the map is the class token's row of ``C_L``
    over the patches (the mean over rows for models without prefix tokens), upsampled bilinearly.  Non-negative;
    class-discriminative through the gradients.  No options of its own (the paper names no hyperparameters).

    Reading: the copy of the paper available while writing this held its abstract and introduction only, and no
    code by the authors was found.  The formula above is the one of the TokenTM re-implementation in the
    LibraGrad code (Mehri et al., CVPR 2025; NightMachinery/decompv-libragrad-v1, ``decompv/x/ds/utils.py``,
    ``transform_TokenTM``), whose notation (``C_0``, ``L``,
    ``NECC``, ``W``, ``U_attn``, ``U_MLP``) follows the paper, and it agrees with what the paper's abstract and its
    Fig. 3 caption state: a contribution map initialised by the input token lengths, updated by ``U_l`` block by
    block, the [CLS] row of the last one reshaped into the map.  As that code: the "before" and "after" tokens of
    each transformation are residual-stream states (block input, after the attention's residual sum, block output),
    the heads are averaged separately in ``A`` and in ``ReLU(dA)``, and the softmax of NECC runs over an image's
    tokens.  ``E'`` is read as the input of the block's second normalisation layer (its pre-norm MLP sublayer's
    input), so the blocks must be pre-norm with both norms as direct children (timm's ``Block``, torchvision's
    ``EncoderBlock``); other blocks raise a ValueError.  As LibraGrad, the length ratio's denominator gets 1e-8.
    Cost: one forward and one backward (to the attention maps) per image, then one N x N matrix product per block.
    """

    needs_gradients = True

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool) -> Tensor:
        names, blocks = self._blocks(x)
        owners = torch.arange(x.shape[0], device=x.device)
        size = tuple(x.shape[-2:])
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            recorder = BlockRecorder(blocks, names)
            outputs, capture = self._forward_capturing(x[start:stop], recorder.handles)
            attention = self._checked(capture.maps, stop - start)
            tokens = recorder.tokens(self.model, stop - start)
            if len(tokens) != len(attention):
                raise ValueError(f"TokenTM found {len(attention)} attention maps but {len(tokens)} blocks")
            scores = target(outputs, owners[start:stop])
            gradients = torch.autograd.grad(scores.sum(), attention, create_graph=create_graph)
            with torch.set_grad_enabled(create_graph):
                relevance = token_transformation_rollout(
                    [_at_least_float32(a) for a in attention], [_at_least_float32(g) for g in gradients],
                    [tuple(_at_least_float32(t) for t in states) for states in tokens])
            layout = token_layout(self.model, size, relevance.shape[-1], "the block inputs")
            maps.append(self._to_image(relevance, layout, size))
        return torch.cat(maps)
