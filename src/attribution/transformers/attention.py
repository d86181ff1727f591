"""Capturing attention probabilities, inside the autograd graph, without editing the model.

Fused attention kernels (timm's ``F.scaled_dot_product_attention`` path, ``nn.MultiheadAttention``) never
materialise the attention matrix.  While :class:`AttentionCapture` is active, a ``TorchFunctionMode`` reroutes
``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward`` through an explicit computation that
produces the same output from ``softmax(q k^T * scale + mask) @ v`` and records the probabilities: they are the
tensors the output is computed from, so ``torch.autograd.grad(score, captured)`` gives the gradient w.r.t. each
attention map.  timm attention modules already running without the fused kernel are captured by a forward hook on
their ``attn_drop`` module.  The scores before the softmax are recorded alongside (``scores``: the explicit
computation's, or on timm's unfused path the input of the softmax that ran just before ``attn_drop``).  Nothing
outlives the ``with`` block.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_SOFTMAX = (torch.softmax, Tensor.softmax, F.softmax)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False,
                       softmax: Optional[Callable[[Tensor], Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
    """``softmax(q k^T * scale + mask) @ v``, the probabilities and the scores before the softmax, for (..., L, d)
    queries and (..., S, d) keys (a boolean mask means "keep"; ``enable_gqa``: fewer key/value heads, repeated as
    ``F.scaled_dot_product_attention`` does; ``softmax``: the softmax over the last dimension, computed by a
    relevance rule's function in its place)."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    probs = logits.softmax(dim=-1) if softmax is None else softmax(logits)
    return probs @ v, probs, logits


def block_attention(maps: List[Tensor]) -> List[Tensor]:
    """The blocks' self-attention among captured ``maps`` (..., L, S) in forward order: without the trailing calls
    of an attention-pooling head (timm's ``AttentionPoolLatent``, ``global_pool='map'``: learned queries, fewer
    than the keys, which are the tokens of the blocks' square self-attention).  Other calls are kept, so that a
    model with cross-attention inside its blocks still gets the explainers' errors."""
    count = len(maps)
    square = [m.shape[-2] == m.shape[-1] for m in maps]
    while count > 1 and not square[count - 1] and any(square[:count - 1]) \
            and maps[count - 1].shape[-2] < maps[count - 1].shape[-1] == maps[count - 2].shape[-1]:
        count -= 1
    return maps[:count]


def unfused_attention_modules(model: nn.Module) -> List[nn.Module]:
    """The model's timm attention modules that compute ``softmax(q k^T)`` explicitly (``fused_attn`` False),
    their probabilities passing through their ``attn_drop`` module."""
    return [m for m in model.modules()
            if getattr(m, "fused_attn", True) is False and isinstance(getattr(m, "attn_drop", None), nn.Module)]


class AttentionCapture(TorchFunctionMode):
    """Records the attention probabilities (B, heads, L, S) of every attention call, in forward order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.maps: List[Tensor] = []
        #: the scores before the softmax of each map, ``q k^T * scale + mask`` (None where they could not be read)
        self.scores: List[Optional[Tensor]] = []
        self._softmax_inputs: List[Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "AttentionCapture":
        self.maps = []
        self.scores = []
        self._softmax_inputs = []
        for module in unfused_attention_modules(self.model):
            self._handles.append(module.attn_drop.register_forward_hook(self._record_output))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    def _used(self, probs: Tensor) -> Tensor:
        """The attention probabilities the model goes on with, given those it computed: themselves (a subclass may
        hand the model others, e.g. scaled ones; what it returns is what is recorded)."""
        return probs

    def _softmax(self, logits: Tensor) -> Tensor:
        return self._used(logits.softmax(dim=-1))

    def _record_output(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        output = self._used(output)  # timm's unfused path: the attn_drop module's output, handed on in its place
        self.maps.append(output)
        # timm's unfused path: the scores are the input of the softmax that ran just before
        self.scores.append(self._softmax_inputs[-1] if self._softmax_inputs else None)
        self._softmax_inputs = []
        return output

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _SOFTMAX and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            self._softmax_inputs.append(args[0])
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self._multi_head(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        out, probs, logits = explicit_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, self._softmax)
        self.maps.append(probs)
        self.scores.append(logits)
        return out

    def _multi_head(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Optional[Tensor]]:
        return multi_head_attention(self._attend, *args, **kwargs)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                is_causal: bool) -> tuple[Tensor, Tensor]:
        out, probs, logits = explicit_attention(q, k, v, attn_mask, is_causal, softmax=self._softmax)
        self.maps.append(probs)
        self.scores.append(logits)
        return out, probs


#: ``attend(q, k, v, attn_mask, is_causal) -> (output, probabilities)`` on (N, heads, S, head_dim) tensors, with a
#: boolean mask meaning "keep"
Attend = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], bool], "tuple[Tensor, Tensor]"]


def multi_head_attention(attend: Attend, query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int,
                         num_heads: int, in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor],
                         bias_k: Optional[Tensor], bias_v: Optional[Tensor], add_zero_attn: bool, dropout_p: float,
                         out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], training: bool = True,
                         key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                         attn_mask: Optional[Tensor] = None, use_separate_proj_weight: bool = False,
                         q_proj_weight: Optional[Tensor] = None, k_proj_weight: Optional[Tensor] = None,
                         v_proj_weight: Optional[Tensor] = None, static_k: Optional[Tensor] = None,
                         static_v: Optional[Tensor] = None, average_attn_weights: bool = True,
                         is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``'s computation) for (L, N, E) inputs without
    extra key/value biases, its attention computed by ``attend``: the projections and the heads as torch's, so that
    a mode around the call sees them."""
    if query.dim() != 3 or bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None \
            or static_v is not None or key_padding_mask is not None:
        raise NotImplementedError(
            "nn.MultiheadAttention is supported on batched inputs without bias_k/bias_v, add_zero_attn, static keys "
            "or key padding masks"
        )
    length, batch, embed = query.shape
    head_dim = embed // num_heads
    if use_separate_proj_weight:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    else:
        weights = in_proj_weight.chunk(3)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases))

    def heads(t: Tensor) -> Tensor:  # (S, N, E) -> (N, heads, S, head_dim)
        return t.reshape(t.shape[0], batch, num_heads, head_dim).permute(1, 2, 0, 3)

    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, num_heads, *attn_mask.shape[-2:])
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = ~attn_mask  # MultiheadAttention's True means "masked out"; attend's "keep"
    out, probs = attend(heads(q), heads(k), heads(v), attn_mask, is_causal)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, batch, embed), out_proj_weight, out_proj_bias)
    if not need_weights:
        return out, None
    return out, probs.mean(dim=1) if average_attn_weights else probs
