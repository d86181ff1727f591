"""Value Zeroing: how much each token's output changes when another token's value vectors are zeroed, rolled out."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .atman import COSINE_EPS, KeySuppression
from .attention import _SOFTMAX, explicit_attention
from .base import AttentionExplainer, _at_least_float32, batch_dim
from .rollout import rollout_product, row_normalised
from .tokens import token_layout


class ZeroValues(KeySuppression):
    """While active, every attention call of ``model`` runs with the value vectors of the tokens where
    ``keep[r] == 0`` set to zero in every head, row ``r`` of the pass with its own ``keep[r]`` (R, N).
    ``F.scaled_dot_product_attention`` keeps its kernel (its values are zeroed before the call);
    ``nn.MultiheadAttention`` runs as the explicit computation of :mod:`.attention` with zeroed values; timm
    attention modules running unfused get the columns of their softmax's output zeroed, which is the same product
    ``softmax(q k^T) (keep * v)``.  AtMan's :class:`KeySuppression` marks where those modules run and reroutes
    the calls; ``calls`` counts the manipulated attention calls."""

    def _zeroed(self, tensor: Tensor, dim: int) -> Tensor:
        """``tensor`` (R, heads, ..., N, ...) times ``keep`` along its token dimension ``dim``."""
        rows, tokens = self.factors.shape
        if tensor.dim() != 4 or tensor.shape[0] != rows or tensor.shape[dim] != tokens:
            raise ValueError(
                f"Value Zeroing needs global self-attention over the block's one token sequence: an attention call "
                f"of {type(self.model).__name__} has a tensor of shape {tuple(tensor.shape)} for {rows} rows of "
                f"{tokens} tokens (windowed attention such as Swin's is not supported)")
        self.calls += 1
        shape = [rows, 1, 1, 1]
        shape[dim] = tokens
        return tensor * self.factors.to(tensor.dtype).view(shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self._inside and func in _SOFTMAX and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            if kwargs.get("dim", args[1] if len(args) > 1 else None) in (-1, 3):
                return self._zeroed(func(*args, **kwargs), 3)  # timm's unfused path: the probabilities' columns
        return super().__torch_function__(func, types, args, kwargs)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        return F.scaled_dot_product_attention(q, k, self._zeroed(v, 2), attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                is_causal: bool) -> Tuple[Tensor, Tensor]:
        out, probs, _ = explicit_attention(q, k, self._zeroed(v, 2), attn_mask, is_causal)
        return out, probs


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """``1 - cos(a, b)`` over the last dimension, in at least float32, as sklearn's ``cosine_distances`` (a zero
    vector has cosine 0 to anything), computed as ``|a/|a| - b/|b||^2 / 2 + 1 - (s_a^2 + s_b^2) / 2`` with
    ``s = |a| / max(|a|, 1e-8)`` (1 for norms of at least 1e-8, 0 for a zero vector): the same number without the
    cancellation of ``1 - cos`` when the vectors barely differ."""
    a, b = _at_least_float32(a), _at_least_float32(b)
    a_norm, b_norm = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    a_floor, b_floor = a_norm.clamp(min=COSINE_EPS), b_norm.clamp(min=COSINE_EPS)
    apart = (a / a_floor - b / b_floor).pow(2).sum(dim=-1)
    lone = 1 - ((a_norm / a_floor).pow(2) + (b_norm / b_floor).pow(2)).squeeze(-1) / 2
    return apart / 2 + lone


@register("value_zeroing")
class ValueZeroing(AttentionExplainer):
    """Value Zeroing: the rolled-out context mixing of a ViT's blocks, each block's mixing measured by how far
    every token's output moves when one token's value vectors are zeroed.

    Mohebbi, Zuidema, Chrupala & Alishahi, "Quantifying Context Mixing in Transformers", EACL 2023,
    arXiv:2301.12971 (code: hmohebbi/ValueZeroing).

    For block ``l`` with clean input ``h_l`` and output ``y_l = block(h_l)``, and each token ``j``: ``y_l^{-j}`` is
    the block's output on the same input with the value vectors of token ``j`` zeroed in every head, and
    ``C_l[i, j] = 1 - cos(y_l^{-j}_i, y_l_i)``; ``M_l = C_l`` with rows divided by their sums (the diagonal kept);
    ``R = M_L ... M_1`` ("Value Zeroing rollout", Abnar & Zuidema's product without an added identity).  The map
    is the class token's row of ``R`` over the patch tokens (the mean over all rows for models without prefix
    tokens), on the patch grid, upsampled bilinearly; ``rollout=False`` reads the last block's ``M_L`` instead.
    Class-agnostic: the target is accepted (and validated) and ignored.  Prefix (class, register) tokens are
    zeroed and normalised over like patch tokens, as the authors treat [CLS] and [SEP].

    As the authors' ``scoring/value_zeroing.py`` and ``demo.py``: the cosine distance (their only ``METRIC``,
    sklearn's ``cosine_distances``), every block fed the clean output of the block before (no change propagates
    from block to block), values zeroed after the softmax (no renormalisation of the attention), the row
    normalisation over all tokens with the diagonal kept, the rollout without the residual identity
    (``compute_joint_attention(res=False)``); ``rollout=True`` (the paper's figures and their demo show the
    rollout).  Each image's ``N`` zeroed copies of a block's clean input run as rows of chunked passes of that one
    block (``batch_size`` rows each), each row with its own zeroed token; the model is not edited.  Cost: one
    forward per image (recording every block's input and output; it also gives ``target=None``'s class), then
    ``L x N`` forwards of ONE block per image, ``L`` blocks and ``N`` tokens (prefix tokens included): about ``N``
    forwards' worth of the blocks (197 for ViT-B/16 at 224).  ``create_graph=True`` keeps every pass's graph (the
    clean forward's and each block pass's), so the map is differentiable in the model's parameters; the cosine
    distance has no kink at zero distance.

    The clean output ``y_l`` is read from the clean forward, as the authors' ``org_hidden_states[l+1]``.

    Deliberate differences: the cosine distance computed without the cancellation of ``1 - cos`` (the same number
    up to rounding; in float32 it keeps the distances of outputs that barely move, which ``1 - cos`` rounds to
    noise); a row whose distances are
    all zero (no zeroing moves that token, e.g. a block whose attention output is zero) is the identity's row
    instead of the authors' 0/0 (exact zeros only: a block rerun in other batch shapes can differ from the clean
    forward by rounding, about 1e-32 in float64, and such a row is then normalised like any other); the map reads the class token's row of the last rollout, as the library's
    other attention methods (the authors plot the whole matrix of every layer).
    """

    defaults = {"rollout": True}
    argmax_on_rows = True

    def _explain(self, x: Tensor, target: Target, *, rollout: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if not isinstance(rollout, bool):
            raise TypeError(f"rollout must be a bool, got {rollout!r}")
        mixing = self._mixing(x, target, batch_size, create_graph)
        with torch.set_grad_enabled(create_graph):
            relevance = rollout_product(mixing) if rollout else mixing[-1]
        layout = token_layout(self.model, tuple(x.shape[-2:]), relevance.shape[-1], "the block inputs")
        return self._to_image(relevance, layout, tuple(x.shape[-2:]))

    def _mixing(self, x: Tensor, target: Target, batch_size: Optional[int], create_graph: bool) -> List[Tensor]:
        """Every block's (B, N, N) row-normalised Value Zeroing matrix ``M_l`` (rows: the outputs ``i``, columns:
        the zeroed tokens ``j``)."""
        modules = dict(self.model.named_modules())
        blocks = [modules[name] for name in self._block_names(x)]
        inputs, outputs, sequence_first = self._clean_blocks(x, target, blocks, batch_size, create_graph)
        batch, tokens = inputs[0].shape[:2]
        planner = RowPlanner(batch * tokens, batch_size, x.device)
        mixing = []
        for block, clean_in, clean_out, seq_first in zip(blocks, inputs, outputs, sequence_first):
            distances = []
            for start, stop in planner:
                rows = torch.arange(start, stop, device=x.device)
                owners, zeroed = rows // tokens, rows % tokens
                keep = torch.ones(stop - start, tokens, dtype=clean_in.dtype, device=x.device)
                keep[torch.arange(stop - start, device=x.device), zeroed] = 0
                given = clean_in[owners]
                with torch.set_grad_enabled(create_graph), self._autocast(), ZeroValues(block, keep) as mode:
                    changed = block(given.transpose(0, 1) if seq_first else given)
                changed = changed.transpose(0, 1) if seq_first else changed
                if mode.calls == 0:
                    raise ValueError(f"Value Zeroing found no attention to manipulate in block {type(block).__name__}"
                                     f" of {type(self.model).__name__}")
                with torch.set_grad_enabled(create_graph):
                    distances.append(cosine_distance(changed, clean_out[owners]))
            with torch.set_grad_enabled(create_graph):  # rows (image, zeroed j) x outputs i -> (B, i, j)
                table = torch.cat(distances).view(batch, tokens, tokens).transpose(1, 2)
                mixing.append(row_normalised(table))
        return mixing

    def _clean_blocks(self, x: Tensor, target: Target, blocks: List[nn.Module], batch_size: Optional[int],
                      create_graph: bool) -> Tuple[List[Tensor], List[Tensor], List[bool]]:
        """Each block's clean input and output (B, N, D), from forwards of the images in chunks (the target is
        evaluated on them: validated, and ``None`` resolved, though the map ignores it), and whether the block is
        sequence-first (its tokens (N, B, D), read as (B, N, D) here)."""
        inputs: List[List[Tensor]] = [[] for _ in blocks]
        outputs: List[List[Tensor]] = [[] for _ in blocks]
        owners = torch.arange(x.shape[0], device=x.device)
        seq_first = [False] * len(blocks)
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            seen: List[List[Tuple[tuple, object]]] = [[] for _ in blocks]
            handles = [block.register_forward_hook(lambda m, args, out, calls=calls: calls.append((args, out)))
                       for block, calls in zip(blocks, seen)]
            try:
                with torch.set_grad_enabled(create_graph):
                    target(self._forward(x[start:stop]), owners[start:stop])
            finally:
                for handle in handles:
                    handle.remove()
            for index, (block, calls) in enumerate(zip(blocks, seen)):
                given, out, seq_first[index] = _one_call(block, calls, stop - start)
                inputs[index].append(given)
                outputs[index].append(out)
        return [torch.cat(chunks) for chunks in inputs], [torch.cat(chunks) for chunks in outputs], seq_first


def _one_call(block: nn.Module, calls: List[Tuple[tuple, object]], rows: int) -> Tuple[Tensor, Tensor, bool]:
    """The one call of a block in a forward: it must map one (B, N, D) token tensor, or a sequence-first block's
    (N, B, D) one, to one of the same shape (the block is rerun on its input alone).  Returns its input and output
    as (B, N, D) and whether the block is sequence-first."""
    if len(calls) != 1:
        raise ValueError(f"Value Zeroing needs each block ({type(block).__name__}) to run once per forward; it ran "
                         f"{len(calls)} times")
    args, out = calls[0]
    given = args[0] if len(args) == 1 else None
    seq_first = isinstance(given, Tensor) and given.dim() == 3 and batch_dim(given, rows, block) == 1
    if not isinstance(given, Tensor) or given.dim() != 3 or given.shape[1 if seq_first else 0] != rows \
            or not isinstance(out, Tensor) or out.shape != given.shape:
        shapes = [tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__ for a in args]
        result = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"Value Zeroing needs each block ({type(block).__name__}) to map one (B, N, D) token tensor "
                         f"(or a sequence-first block's (N, B, D)) to one of the same shape; it got inputs {shapes} "
                         f"and returned {result}")
    if seq_first:
        return given.transpose(0, 1), out.transpose(0, 1), True
    return given, out, False
