"""AtMan: attention manipulation, one patch token's attention suppressed in every block per forward."""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.batching import RowPlanner
from ..core.explainer import Explainer
from ..core.registry import register
from ..core.targets import Target
from .attcat import attention_blocks
from .attention import _SOFTMAX, explicit_attention, multi_head_attention, unfused_attention_modules
from .base import batch_first_tokens, scores_to_image
from .tokens import token_layout

#: the floor of the norms in the cosine similarity (the authors' ``get_similarity_matrix``)
COSINE_EPS = 1e-8


def suppress_keys(scores: Tensor, factors: Tensor, masked: bool = True) -> Tensor:
    """AtMan's manipulation of pre-softmax attention scores (R, heads, L, S) by per-row key factors (R, S): each
    query's scores shifted by their minimum (so all are >= 0 and the softmax is unchanged), then the scores of key
    ``j`` multiplied by ``factors[r, j]``.  Masked (-inf) scores stay masked and are left out of the minimum
    (``masked=False``: the caller knows there are none, and the check is skipped)."""
    if not masked:
        return (scores - scores.amin(dim=-1, keepdim=True)) * factors[:, None, None, :].to(scores.dtype)
    finite = torch.isfinite(scores)
    low = torch.where(finite, scores, torch.full_like(scores, float("inf"))).amin(dim=-1, keepdim=True)
    shifted = (scores - low) * factors[:, None, None, :].to(scores.dtype)
    return torch.where(finite, shifted, scores)


def cosine_similarity(tokens: Tensor) -> Tensor:
    """(B, N, N) cosine similarity of each image's tokens (B, N, D), in float32 (float64 for float64 tokens), norms
    floored at 1e-8 and the result clipped to [-1, 1] (the authors' ``ConceptualSuppression``)."""
    tokens = tokens.to(torch.float64 if tokens.dtype == torch.float64 else torch.float32)
    unit = tokens / tokens.norm(dim=2, keepdim=True).clamp(min=COSINE_EPS)
    return (unit @ unit.transpose(1, 2)).clamp(-1.0, 1.0)


def key_factors(similarity: Optional[Tensor], owners: Tensor, token: Tensor, factor: float,
                threshold: Optional[float], tokens: int) -> Tensor:
    """(R, N) key factors of rows that suppress token ``token[r]`` of image ``owners[r]`` (``token < 0``: a clean
    row, all ones): ``factor`` at the token; with conceptual suppression, ``factor + (1 - factor) (1 - cos)`` at
    every other token whose cosine similarity ``cos`` to it is at least ``threshold``; 1 elsewhere."""
    rows = torch.arange(owners.shape[0], device=owners.device)
    index = token.clamp(min=0)
    if similarity is None or threshold is None:
        factors = torch.ones(owners.shape[0], tokens, device=owners.device)
    else:
        cos = similarity[owners, index]  # (R, N)
        factors = torch.where(cos >= threshold, factor + (1.0 - factor) * (1.0 - cos), torch.ones_like(cos))
    factors[rows, index] = factor
    return torch.where((token < 0)[:, None], torch.ones_like(factors), factors)


class KeySuppression(TorchFunctionMode):
    """While active, every attention call of ``model`` computes ``softmax(suppress_keys(scores, factors)) @ v``,
    row ``r`` of the pass with its own key factors ``factors[r]`` (R, N).  ``F.scaled_dot_product_attention`` and
    ``nn.MultiheadAttention`` are rerouted through the explicit computation of :mod:`.attention`; timm attention
    modules running unfused get their softmax's input manipulated (a pre-hook and a hook on the module mark where
    its forward runs).  ``scores`` are what the softmax receives: ``q k^T * scale`` plus the model's mask or bias.
    Nothing outlives the ``with`` block; ``calls`` counts the manipulated attention calls."""

    def __init__(self, model: nn.Module, factors: Tensor) -> None:
        super().__init__()
        self.model = model
        self.factors = factors
        self.calls = 0
        self._inside = 0
        self._handles: List[Any] = []

    def __enter__(self) -> "KeySuppression":
        self.calls = 0
        self._inside = 0
        for module in unfused_attention_modules(self.model):
            self._handles.append(module.register_forward_pre_hook(self._enter_attention))
            self._handles.append(module.register_forward_hook(self._leave_attention))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    def _enter_attention(self, module: nn.Module, args: Any) -> None:
        self._inside += 1

    def _leave_attention(self, module: nn.Module, args: Any, output: Any) -> None:
        self._inside -= 1

    def _softmax(self, scores: Tensor, masked: bool = True) -> Tensor:
        return self._suppressed(scores, masked).softmax(dim=-1)

    def _suppressed(self, scores: Tensor, masked: bool = True) -> Tensor:
        rows, tokens = self.factors.shape
        if scores.dim() != 4 or scores.shape[0] != rows or scores.shape[-1] != tokens:
            raise ValueError(
                f"AtMan needs global self-attention over the model's one token sequence in every block: an "
                f"attention call of {type(self.model).__name__} has scores of shape {tuple(scores.shape)} for "
                f"{rows} rows of {tokens} tokens (windowed attention such as Swin's is not supported)")
        self.calls += 1
        return suppress_keys(scores, self.factors, masked)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return multi_head_attention(self._attend, *args, **kwargs)
        if self._inside and func in _SOFTMAX and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if dim in (-1, 3):
                return func(self._suppressed(args[0]), *args[1:], **kwargs)
        return func(*args, **kwargs)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        masked = attn_mask is not None or is_causal
        return explicit_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                  softmax=lambda scores: self._softmax(scores, masked))[0]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                is_causal: bool) -> Tuple[Tensor, Tensor]:
        masked = attn_mask is not None or is_causal
        out, probs, _ = explicit_attention(q, k, v, attn_mask, is_causal,
                                           softmax=lambda scores: self._softmax(scores, masked))
        return out, probs


class _Stop(Exception):
    """Ends a forward once the first block's input is read."""


@register("atman")
class AtMan(Explainer):
    """AtMan (attention manipulation): the rise of the target's cross-entropy when the attention every block pays
    to one patch token (and, with conceptual suppression, to the tokens whose embeddings resemble it) is
    suppressed.

    Deiseroth, Deb, Weinbach, Brack, Schramowski & Kersting, "ATMAN: Understanding Transformer Predictions Through
    Memory Efficient Attention Manipulation", NeurIPS 2023, arXiv:2301.08110 (code: Aleph-Alpha/AtMan).

    In every attention call of a forward, the scores before the softmax are shifted per query by their minimum
    and the column of key ``j`` multiplied by a factor ``m_j``: ``softmax((s - min_k s_k) * m)``.  Suppressing patch
    token ``i`` sets ``m_i = suppression_factor`` and, for every other token ``j`` whose cosine similarity ``c_ij``
    to it, between the tokens entering the first block, is at least ``conceptual_threshold``,
    ``m_j = f + (1 - f)(1 - c_ij)`` (``f`` the suppression factor); ``m = 1`` elsewhere.  The relevance of token
    ``i`` is ``R_i = s_t(x) - s_t(x | i suppressed)`` for the target's score ``s_t`` (``score='log_softmax'``: the
    rise of the cross-entropy); the map is ``R`` on the patch grid, upsampled bilinearly.  Prefix (class,
    distillation, register) tokens are not explained, though conceptual suppression may also dampen them as it
    does any similar token.  Each row of a pass suppresses its own token (per-row factors), so the forwards of
    many tokens and images share a pass; fused attention (``F.scaled_dot_product_attention``,
    ``nn.MultiheadAttention``) runs as the explicit ``softmax(q k^T) v`` computation meanwhile; the model is not
    edited.

    Defaults as the authors' code (atman-magma): ``suppression_factor=0.1`` (``explainer.py``'s ``Explainer`` and
    ``config.yml``: 90 % suppression; above 1 amplifies), ``conceptual_threshold=0.6`` (their
    ``conceptual_suppression_threshold``, same sources; their panda example passes 0.75; ``None`` turns conceptual
    suppression off; cosines as ``conceptual_suppression.py``: norms floored at 1e-8, clipped to [-1, 1]), the similarity-scaled factors of similar
    tokens (``modify_suppression_factor_based_on_cossim=True``), manipulation in every layer, the cross-entropy
    of the target (``score='log_softmax'``; ``'logit'`` gives the logit differences of their ``get_delta_logits``).
    Cost: a forward up to the first block per image (the embeddings), then ``P + 1`` forwards per image for ``P``
    patch tokens (the unsuppressed one through the same computation with all factors 1); one more forward per image
    when ``target=None`` (the suppressed rows are not the image).  Each relevance is a difference of two forwards'
    scores, often far below a half-precision model's (or ``amp``'s) resolution for one patch: there the maps are
    mostly rounding noise (correlation 0.2 to 0.6 with the float32 map on a toy ViT), so run AtMan in float32.

    Deliberate differences: the sign, positive where the token supports the target (the authors' code stores
    ``clean - suppressed`` cross-entropies and squares them for its figures and evaluation);
    the shift and factors apply to the scores the softmax receives, after the scale and any additive bias or mask
    of the model (the authors manipulate ``q k^T`` before scaling and masking: identical up to rounding for
    positive scales and masks of -inf, which stay -inf here), so fused and unfused attention give one map; the
    embeddings compared by conceptual suppression are the tokens entering the first block (position embeddings
    included), the analogue of the embeddings entering the authors' language model.
    """

    kind = "attention"
    defaults = {"suppression_factor": 0.1, "conceptual_threshold": 0.6, "score": "log_softmax"}

    def __init__(self, model: nn.Module, **options) -> None:
        super().__init__(model, **options)
        self._blocks: Dict[Tuple[int, ...], List[str]] = {}

    def _explain(self, x: Tensor, target: Target, *, suppression_factor: float,
                 conceptual_threshold: Optional[float], batch_size: Optional[int], create_graph: bool) -> Tensor:
        if isinstance(suppression_factor, bool) or not isinstance(suppression_factor, numbers.Real) \
                or not 0 <= float(suppression_factor) < float("inf"):
            raise ValueError(f"suppression_factor must be a finite number >= 0, got {suppression_factor!r}")
        if conceptual_threshold is not None and (
                isinstance(conceptual_threshold, bool) or not isinstance(conceptual_threshold, numbers.Real)
                or not 0 <= float(conceptual_threshold) <= 1):
            raise ValueError(f"conceptual_threshold must be None or a number in [0, 1], got {conceptual_threshold!r}")
        factor = float(suppression_factor)
        embeddings = self._embeddings(x, batch_size, create_graph)  # (B, N, D)
        batch, tokens = embeddings.shape[:2]
        size = tuple(x.shape[-2:])
        layout = token_layout(self.model, size, tokens, "the tokens entering the first block")
        similarity = cosine_similarity(embeddings) if conceptual_threshold is not None else None
        per_image = tokens - layout.prefix + 1  # the clean row, then one row per patch token
        device = x.device
        scores = []
        for start, stop in RowPlanner(batch * per_image, batch_size, device):
            rows = torch.arange(start, stop, device=device)
            owners = rows // per_image
            token = rows % per_image - 1
            token = torch.where(token < 0, token, token + layout.prefix)
            factors = key_factors(similarity, owners, token, factor, conceptual_threshold, tokens)
            with torch.set_grad_enabled(create_graph), KeySuppression(self.model, factors) as mode:
                outputs = self._forward(x[owners])
            if mode.calls == 0:
                raise ValueError(f"AtMan found no attention to manipulate in {type(self.model).__name__}'s forward "
                                 "pass; it needs a transformer whose attention runs through "
                                 "F.scaled_dot_product_attention, nn.MultiheadAttention or timm's Attention")
            scores.append(target(outputs, owners))
        table = torch.cat(scores).view(batch, per_image)
        relevance = table[:, :1] - table[:, 1:]
        padded = torch.cat([relevance.new_zeros(batch, layout.prefix), relevance], dim=1)
        return scores_to_image(padded, layout, size)

    def _embeddings(self, x: Tensor, batch_size: Optional[int], create_graph: bool) -> Tensor:
        """The tokens entering the model's first block (B, N, D), without running the blocks (with their graph when
        ``create_graph``: conceptual suppression's factors depend on them)."""
        key = tuple(x.shape[1:])
        if key not in self._blocks:
            self._blocks[key] = attention_blocks(self.model, x[:1], self._forward, type(self).__name__)
        first = dict(self.model.named_modules())[self._blocks[key][0]]
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            captured: List[Any] = []

            def grab(module: nn.Module, args: tuple) -> None:
                captured.append(args[0] if args else None)
                raise _Stop

            handle = first.register_forward_pre_hook(grab)
            try:
                with torch.set_grad_enabled(create_graph):
                    self._forward(x[start:stop])
            except _Stop:
                pass
            finally:
                handle.remove()
            tokens = captured[0] if captured else None
            if isinstance(tokens, Tensor) and tokens.dim() == 3:
                tokens = batch_first_tokens(tokens, stop - start, first)  # a sequence-first block's (N, B, D)
            if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.shape[0] != stop - start:
                shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
                raise ValueError(f"AtMan needs the first block of {type(self.model).__name__} to take one (B, N, D) "
                                 f"or sequence-first (N, B, D) token tensor; it got {shape}")
            chunks.append(tokens)
        return torch.cat(chunks)
