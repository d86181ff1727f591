"""ALTI: the attention sublayer of every block decomposed into one vector per source token, each token's share
measured by how close its vector lies to the sublayer's output (Manhattan distance), rolled out over the blocks.
The decomposition (:class:`BlockTerms`, :class:`BlockDecompositionExplainer`) is shared with the norm-based
methods of :mod:`.norm_based`."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, ContextManager, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .attention import AttentionCapture, multi_head_attention
from .base import AttentionExplainer
from .token_tm import BlockRecorder
from .tokens import token_layout
from .rollout import rollout_product, row_normalised

#: the transformed vectors of this many (query, source, channel) entries at most are held at once (64 MiB in
#: float32); the query tokens are taken in slices that fit
CHUNK_ELEMENTS = 2 ** 24
#: largest difference allowed between the decomposition's sum and the model's residual stream after the attention
#: sublayer, relative to the larger of the two streams' largest entries: in float32/float64, and where any of the
#: pieces was computed in a 16-bit precision (a bfloat16 model, ``amp``), whose rounding the float32 sum does not share
DECOMPOSITION_TOLERANCE = {"full": 1e-4, "half": 5e-2}

_MATMUL = (torch.matmul, Tensor.matmul, Tensor.__matmul__)
_NORMALISATIONS = tuple(f for f in (F.layer_norm, F.group_norm, getattr(F, "rms_norm", None)) if f is not None)
_MULTI_HEAD = inspect.signature(multi_head_attention)


class ValueCapture(AttentionCapture):
    """An :class:`AttentionCapture` that also records, for every attention call, the value vectors the probabilities
    weigh (B, heads, N, head_dim), and the output projection ``(weight, bias)`` that maps the concatenated heads
    back to the token width: ``nn.MultiheadAttention``'s ``out_proj``, or for ``F.scaled_dot_product_attention``
    and timm's unfused ``attn @ v`` the first ``F.linear`` that runs after the call (timm's ``proj``).  A
    normalisation that runs between the call and that linear (timm's ``scale_norm``) records ``None``: the heads
    then do not reach the projection linearly.  ``value_maps`` holds, per call, the ``(weight, bias)`` rows of the
    linear that made the value vectors from the attention's input tokens (row ``h * head_dim + c``: head ``h``'s
    channel ``c``; ``nn.MultiheadAttention``'s value slice of its input projection, else the ``F.linear`` whose
    output the values are a view of, timm's ``qkv``), ``None`` where the values are no such view."""

    def __enter__(self) -> "ValueCapture":
        self.values: List[Tensor] = []
        self.projections: List[Optional[Tuple[Tensor, Optional[Tensor]]]] = []
        self.value_maps: List[Optional[Tuple[Tensor, Optional[Tensor]]]] = []
        self._linears: List[Tuple[Tensor, Tensor, Optional[Tensor]]] = []  # (output, weight, bias) since the last call
        self._awaiting = False
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc: Any) -> None:
        self._linears = []
        return super().__exit__(*exc)

    def _expect_projection(self, values: Tensor) -> None:
        if self._awaiting:  # the previous call's output never reached a linear
            self.projections.append(None)
        self.values.append(values)
        self.value_maps.append(self._value_map(values))
        self._awaiting = True

    def _value_map(self, values: Tensor) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """The rows of the linear (recorded since the previous attention call) whose output ``values`` is a view of."""
        base = _root(values)  # a linear's output may itself be a view (of its flattened rows)
        found = next(((w, b, out) for out, w, b in reversed(self._linears) if _root(out) is base), None)
        self._linears = []
        return None if found is None else value_rows(values, found[2], found[0], found[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _MATMUL and len(args) == 2 and self.maps and args[0] is self.maps[-1] \
                and len(self.values) < len(self.maps):  # timm's unfused path: ``attn @ v`` after attn_drop
            self._expect_projection(args[1])
        elif self._awaiting and func is F.linear:
            self._awaiting = False
            self.projections.append(_linear_parameters(args, kwargs))
        elif self._awaiting and func in _NORMALISATIONS:
            self._awaiting = False
            self.projections.append(None)
        out = super().__torch_function__(func, types, args, kwargs)
        if func is F.linear and isinstance(out, Tensor):
            self._linears.append((out,) + _linear_parameters(args, kwargs))  # type: ignore[arg-type]
        return out

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
        out = super()._sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if enable_gqa and v.shape[-3] != q.shape[-3]:  # as explicit_attention: key/value heads repeated
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        self._expect_projection(v)
        return out

    def _multi_head(self, *args: Any, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
        bound = _MULTI_HEAD.bind(self._attend, *args, **kwargs).arguments
        self._linears = []
        weight = bound.get("v_proj_weight") if bound.get("use_separate_proj_weight") else \
            bound["in_proj_weight"].chunk(3)[2]
        bias = bound.get("in_proj_bias")
        self.value_maps.append((weight, None if bias is None else bias.chunk(3)[2]))
        out = super()._multi_head(*args, **kwargs)
        self.projections.append((bound["out_proj_weight"], bound.get("out_proj_bias")))
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                is_causal: bool) -> Tuple[Tensor, Tensor]:
        self.values.append(v)  # (N, heads, S, head_dim): batch first, as multi_head_attention hands them
        return super()._attend(q, k, v, attn_mask, is_causal)


def _linear_parameters(args: tuple, kwargs: dict) -> Tuple[Tensor, Optional[Tensor]]:
    """The ``(weight, bias)`` of an ``F.linear`` call."""
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return weight, bias


def _root(tensor: Tensor) -> Tensor:
    """The tensor whose storage a view shares (itself when it is no view)."""
    return tensor if tensor._base is None else tensor._base


def value_rows(values: Tensor, output: Tensor, weight: Tensor,
               bias: Optional[Tensor]) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
    """The rows of a linear's ``weight`` (and ``bias``) that give the (B, H, N, head_dim) ``values``, a view of its
    contiguous (B, N, C) ``output``: row ``h * head_dim + c`` the one of head ``h``'s channel ``c``, read from the
    view's offset and strides; None when the view does not take whole tokens of one image in that way."""
    if values.dim() != 4 or output.dim() != 3 or weight.dim() != 2 or not output.is_contiguous():
        return None
    batch, heads, tokens, width = values.shape
    if tuple(output.shape[:2]) != (batch, tokens) or (batch > 1 and values.stride(0) != output.stride(0)) \
            or (tokens > 1 and values.stride(2) != output.stride(1)):
        return None
    offset = values.storage_offset() - output.storage_offset()
    rows = (offset + torch.arange(heads)[:, None] * values.stride(1)
            + torch.arange(width)[None] * values.stride(3)).flatten()
    if int(rows.min()) < 0 or int(rows.max()) >= output.shape[2] or weight.shape[0] != output.shape[2]:
        return None
    rows = rows.to(weight.device)
    return weight[rows], None if bias is None else bias[rows]


class BlockTerms(NamedTuple):
    """One block's attention sublayer in ALTI's terms (B images, N tokens, H heads, width D), in at least float32:
    ``y_i = x_i + sum_h sum_j A_h[i, j] f_h(x_j) + b``."""

    tokens: Tensor  # x: the tokens entering the block (B, N, D)
    attention: Tensor  # A: the attention probabilities (B, H, N, N)
    heads: Tensor  # f_h(x_j) = s * W_O^h (W_V^h LN(x_j) + b_V^h) (B, H, N, D), s the layer scale (or 1)
    bias: Tensor  # b = s * b_O (D,), zeros without an output bias


class BlockPieces(NamedTuple):
    """One block's attention sublayer as recorded, in the working precision, before its (B, H, N, D) head vectors
    are formed: :meth:`terms` forms them (one block's at a time, so that a method holds one block's at most);
    :meth:`output` rebuilds the sublayer's output without them."""

    tokens: Tensor  # x: the tokens entering the block (B, N, D)
    attention: Tensor  # A: the attention probabilities (B, H, N, N)
    values: Tensor  # the value vectors v_j^h (B, H, N, head_dim)
    weight: Tensor  # the output projection W_O (D, H * head_dim)
    scale: Optional[Tensor]  # the layer scale s (D,), None without one
    bias: Tensor  # s * b_O (D,), zeros without an output bias

    def terms(self) -> BlockTerms:
        """The block's :class:`BlockTerms` (its head vectors formed now)."""
        return BlockTerms(self.tokens, self.attention, head_vectors(self.values, self.weight, self.scale), self.bias)

    def output(self) -> Tensor:
        """(B, N, D) ``y_i = x_i + s * W_O concat_h(sum_j A_h[i, j] v_j^h) + s b_O``: the sum of the decomposition
        (:func:`sublayer_output` of :meth:`terms`) computed as the model does, with no (B, H, N, D) tensor."""
        mixed = (self.attention @ self.values).transpose(1, 2).flatten(2) @ self.weight.T  # (B, N, D)
        return self.tokens + (mixed if self.scale is None else mixed * self.scale) + self.bias


class BlockForward(NamedTuple):
    """One forward of a chunk of images through a model whose blocks' attention sublayers are decomposed."""

    outputs: Tensor  # the model's outputs (B, K)
    pieces: List[BlockPieces]  # every block's, checked to rebuild the stream after its attention sublayer
    states: List[Tuple[Tensor, Tensor, Tensor]]  # every block's tokens: entering, after attention, leaving (B, N, D)
    projections: List[Tuple[Tensor, Optional[Tensor]]]  # every block's output projection (weight, bias)
    value_maps: List[Optional[Tuple[Tensor, Optional[Tensor]]]]  # every block's value projection rows, if found


def head_vectors(values: Tensor, weight: Tensor, scale: Optional[Tensor]) -> Tensor:
    """(B, H, N, D) ``s * W_O^h v_j^h``: each head's value vectors (B, H, N, head_dim) through its slice of the
    output projection's (D, H * head_dim) weight (columns ``h * head_dim`` to ``(h + 1) * head_dim``, the order in
    which the heads are concatenated), times the layer scale ``s`` (D,) where there is one."""
    heads, width = values.shape[1], values.shape[3]
    vectors = torch.einsum("bhjc,dhc->bhjd", values, weight.reshape(weight.shape[0], heads, width))
    return vectors if scale is None else vectors * scale


def without_autocast(device: torch.device) -> ContextManager[Any]:
    """``torch.autocast`` turned off on ``device`` (where the device has one): a method's own arithmetic stays in
    its working precision under a caller's autocast; only the model's forward runs in the caller's (or ``amp``'s)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def sublayer_output(terms: BlockTerms) -> Tensor:
    """(B, N, D) ``y_i = x_i + sum_h sum_j A_h[i, j] f_h(x_j) + b = sum_j T_i(x_j) + b``: the residual stream after
    the attention sublayer, rebuilt from the decomposition (the authors' ``resultant``)."""
    return terms.tokens + torch.einsum("bhij,bhjd->bid", terms.attention, terms.heads) + terms.bias


def transformed_vectors(terms: BlockTerms, start: int = 0, stop: Optional[int] = None,
                        residual: bool = True) -> Tensor:
    """(B, stop - start, N, D) ``T_i(x_j) = sum_h A_h[i, j] f_h(x_j) + [i == j] x_i`` for the query tokens
    ``i`` from ``start`` to ``stop`` and every source token ``j`` (``residual=False``: without the ``x_i``)."""
    stop = terms.tokens.shape[1] if stop is None else stop
    return _sources_first(terms, terms.heads.transpose(1, 2), start, stop, residual).transpose(1, 2)


def _sources_first(terms: BlockTerms, heads: Tensor, start: int, stop: int, residual: bool = True) -> Tensor:
    """(B, N, stop - start, D) ``T_i(x_j)`` at ``[b, j, i - start]``: one (queries x heads) @ (heads x width)
    product per image and source token, ``heads`` the (B, N, H, D) head vectors by source token; ``residual=False``
    leaves out the ``x_i`` of the entries ``j == i``."""
    vectors = terms.attention[:, :, start:stop].permute(0, 3, 2, 1) @ heads
    if residual:  # the entries j == i, (B, D, stop - start): the residual added in place (a fresh product)
        vectors.diagonal(offset=start, dim1=2, dim2=1).add_(terms.tokens[:, start:stop].transpose(1, 2))
    return vectors


def pair_measures(terms: BlockTerms, measure: Callable[[Tensor, int, int], Tensor], residual: bool = True,
                  chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """(B, N, N) ``measure`` of the transformed vectors, rows the outputs ``i`` and columns the source tokens ``j``:
    the query tokens are taken in slices of at most ``chunk_elements`` vector entries, and ``measure(vectors, start,
    stop)`` maps each slice's (B, N, stop - start, D) ``T_i(x_j)`` at ``[b, j, i - start]`` (a fresh tensor it may
    change in place; without the residual for ``residual=False``) to its (B, stop - start, N) rows."""
    batch, tokens, width = terms.tokens.shape
    heads = terms.heads.transpose(1, 2).contiguous()  # (B, N, H, D), once for every slice
    step = max(1, chunk_elements // max(1, batch * tokens * width))
    rows = []
    for start in range(0, tokens, step):
        stop = min(tokens, start + step)
        rows.append(measure(_sources_first(terms, heads, start, stop, residual), start, stop))
    return torch.cat(rows, dim=1)


def alti_contributions(terms: BlockTerms, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """(B, N, N) ``c_ij = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1)`` (rows: the outputs ``i``, columns: the source
    tokens ``j``), before the row normalisation; the query tokens are taken in slices of at most
    ``chunk_elements`` transformed-vector entries."""
    output = sublayer_output(terms)
    length = torch.linalg.vector_norm(output, ord=1, dim=-1)  # ||y_i||_1 (B, N)

    def closeness(vectors: Tensor, start: int, stop: int) -> Tensor:
        apart = vectors.sub_(output[:, None, start:stop])  # T_i(x_j) - y_i
        distance = torch.linalg.vector_norm(apart, ord=1, dim=-1).transpose(1, 2)  # (B, stop - start, N)
        return (length[:, start:stop, None] - distance).clamp(min=0)

    return pair_measures(terms, closeness, chunk_elements=chunk_elements)


def vector_norms(terms: BlockTerms, residual: bool, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """(B, N, N) Euclidean norms ``||T_i(x_j)||_2`` (``residual=True``) or ``||sum_h A_h[i, j] f_h(x_j)||_2``
    (``residual=False``), rows the outputs ``i``, columns the source tokens ``j``, in query slices as
    :func:`pair_measures`."""
    return pair_measures(terms, lambda vectors, start, stop: torch.linalg.vector_norm(vectors, dim=-1).transpose(1, 2),
                         residual, chunk_elements)


def layer_scale(block: nn.Module) -> Optional[Tensor]:
    """The per-channel scale a pre-norm block applies to its attention sublayer's output before the residual sum:
    timm's ``ls1`` (a ``LayerScale``; ``nn.Identity`` without one) or BEiT's and EVA's ``gamma_1`` (None without
    one); None for blocks that have neither (torchvision's ``EncoderBlock``, ``nn.TransformerEncoderLayer``)."""
    scale = getattr(getattr(block, "ls1", None), "gamma", None)
    if isinstance(scale, Tensor):
        return scale
    scale = getattr(block, "gamma_1", None)
    return scale if isinstance(scale, Tensor) else None


class BlockDecompositionExplainer(AttentionExplainer):
    """Base of the methods that decompose each pre-norm block's attention sublayer into one vector per source token
    (:class:`BlockTerms`, from one forward, checked to rebuild the model's residual stream) and measure each token's
    share in each output: ALTI, the attention norm, GlobEnc.  A subclass gives :meth:`_contributions` (one block's
    (B, N, N) shares, rows the outputs, columns the source tokens) and, where it aggregates the blocks otherwise
    than ALTI, :meth:`_aggregate`; with ``rollout=False`` only the last block's shares are computed.  The blocks'
    head vectors are formed one block at a time and dropped once its shares are computed (each block's
    decomposition is checked without them), so one block's (B, H, N, D) vectors are held at most (every block's
    graph with ``create_graph=True``).  The method's own arithmetic runs with autocast off (in float32, or float64
    for float64 models) also under a caller's ``torch.autocast``: only the model's forward runs in 16 bits."""

    defaults = {"rollout": True}
    argmax_on_rows = True
    #: names the method in its errors
    label = "ALTI"

    def _explain(self, x: Tensor, target: Target, *, rollout: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if not isinstance(rollout, bool):
            raise TypeError(f"rollout must be a bool, got {rollout!r}")
        names, blocks = self._blocks(x)
        owners = torch.arange(x.shape[0], device=x.device)
        size = tuple(x.shape[-2:])
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            pieces = self._block_forward(x[start:stop], target, owners[start:stop], blocks, names,
                                         create_graph).pieces
            with torch.set_grad_enabled(create_graph), without_autocast(x.device):
                # one block's head vectors at a time: each block's terms are dropped once its shares are computed
                shares = [self._contributions(p.terms()) for p in (pieces if rollout else pieces[-1:])]
                relevance = self._aggregate(shares, rollout)
            layout = token_layout(self.model, size, relevance.shape[-1], "the attention maps")
            maps.append(self._to_image(relevance, layout, size))
        return torch.cat(maps)

    def _contributions(self, terms: BlockTerms) -> Tensor:
        """(B, N, N) one block's shares: rows the outputs ``i``, columns the source tokens ``j``."""
        raise NotImplementedError

    def _aggregate(self, shares: List[Tensor], rollout: bool) -> Tensor:
        """(B, N, N) token relevance from the blocks' shares (every block's, first first, for ``rollout=True``; the
        last block's alone otherwise): ALTI's, each block's rows divided by their sums, rolled out without an added
        identity (or the last block's alone)."""
        mixing = [row_normalised(block) for block in shares]
        return rollout_product(mixing) if rollout else mixing[-1]

    def _block_terms(self, rows: Tensor, target: Target, owners: Tensor, blocks: Sequence[nn.Module],
                     names: Sequence[str], create_graph: bool) -> List[BlockTerms]:
        """Every block's :class:`BlockTerms` for ``rows`` images, from one forward (the target is evaluated on it:
        validated, and ``None`` resolved, though the map ignores it), each checked to rebuild the block's
        residual stream after its attention sublayer (every block's head vectors held at once)."""
        pieces = self._block_forward(rows, target, owners, blocks, names, create_graph).pieces
        with torch.set_grad_enabled(create_graph), without_autocast(rows.device):
            return [p.terms() for p in pieces]

    def _block_forward(self, rows: Tensor, target: Target, owners: Tensor, blocks: Sequence[nn.Module],
                       names: Sequence[str], create_graph: bool, handles: Sequence[Any] = ()) -> "BlockForward":
        """Every block's :class:`BlockPieces` for ``rows`` images, from one forward, each checked to rebuild the
        block's residual stream after its attention sublayer, with what else the forward gave
        (:class:`BlockForward`); the hook ``handles`` the
        caller registered for this forward (to record more of it) are removed afterwards, whatever happens."""
        recorder = BlockRecorder(blocks, names)
        try:
            with torch.set_grad_enabled(create_graph), ValueCapture(self.model) as capture:
                outputs = self._forward(rows)
        finally:
            for handle in list(recorder.handles) + list(handles):
                handle.remove()
        target(outputs, owners)
        count = rows.shape[0]
        attention = self._checked(capture.maps, count)
        states = recorder.tokens(self.model, count, self.label)
        if len(states) != len(attention) or len(capture.values) < len(attention):
            raise ValueError(f"{self.label} found {len(attention)} attention maps, {len(capture.values)} sets of value "
                             f"vectors and {len(states)} blocks in {type(self.model).__name__}'s forward")
        projections = capture.projections + [None] * (len(attention) - len(capture.projections))
        pieces = []
        for name, block, probs, values, projection, (entering, middle, _) in zip(
                names, blocks, attention, capture.values, projections, states):
            with torch.set_grad_enabled(create_graph), without_autocast(rows.device):
                found = self._pieces(name, block, probs, values, projection, entering)
                self._check_decomposition(name, found, middle, (probs, values, middle))
            pieces.append(found)
        value_maps = capture.value_maps[:len(attention)]
        return BlockForward(outputs, pieces, states, projections[:len(attention)], value_maps)  # type: ignore[arg-type]

    def _pieces(self, name: str, block: nn.Module, probs: Tensor, values: Tensor,
                projection: Optional[Tuple[Tensor, Optional[Tensor]]], entering: Tensor) -> BlockPieces:
        """One block's pieces in the working precision (float64 for float64 tokens, else float32)."""
        dtype = torch.float64 if entering.dtype == torch.float64 else torch.float32
        heads_dim = values.shape[1] * values.shape[3]
        if projection is None or projection[0].dim() != 2 or tuple(projection[0].shape) != (entering.shape[-1],
                                                                                             heads_dim):
            shape = None if projection is None else tuple(projection[0].shape)
            raise ValueError(
                f"{self.label} needs each attention call's concatenated heads ({heads_dim} channels) to reach a linear "
                f"output projection to the token width ({entering.shape[-1]}) unchanged; in block {name!r} of "
                f"{type(self.model).__name__} the heads "
                + ("are normalised (or never projected) first" if shape is None else f"meet a linear of weight {shape}")
            )
        weight, bias = (t.to(dtype) if t is not None else None for t in projection)
        scale = layer_scale(block)
        scale = None if scale is None else scale.to(dtype)
        bias = torch.zeros_like(weight[:, 0]) if bias is None else bias
        return BlockPieces(entering.to(dtype), probs.to(dtype), values.to(dtype), weight, scale,
                           bias if scale is None else bias * scale)

    def _check_decomposition(self, name: str, block: BlockPieces, middle: Tensor,
                             recorded: Sequence[Tensor]) -> None:
        """A ValueError unless ``x + sum_j T_i(x_j) + s b_O`` equals the model's own stream after the attention
        sublayer (up to :data:`DECOMPOSITION_TOLERANCE`; ``recorded``: the pieces as the forward gave them, whose
        16-bit precision, if any, sets the tolerance)."""
        with torch.no_grad():
            rebuilt = block.output()
            actual = middle.to(rebuilt.dtype)
            error = float((rebuilt - actual).abs().amax())
            scale = max(float(actual.abs().amax()), float(block.tokens.abs().amax()), 1e-30)
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in recorded)
        if not error <= DECOMPOSITION_TOLERANCE["half" if half else "full"] * scale:
            raise ValueError(
                f"{self.label}'s decomposition of block {name!r} of {type(self.model).__name__} does not rebuild the "
                f"residual stream after its attention sublayer (largest difference {error:.3g}, entries up to "
                f"{scale:.3g}): it "
                "needs pre-norm blocks x + s * proj(attention(norm(x))), s a layer scale (timm's ls1, BEiT/EVA's "
                "gamma_1) or 1, with no normalisation or gate between the heads and the projection"
            )


@register("alti")
class ALTI(BlockDecompositionExplainer):
    """ALTI (Aggregation of Layer-wise Token-to-token Interactions): each block's attention sublayer, residual
    included, written as one vector per source token; token ``j``'s share in output ``i`` is how close its vector
    lies to the output in Manhattan distance; the blocks' shares rolled out.

    Ferrando, Gállego & Costa-jussà, "Measuring the Mixing of Contextual Information in the Transformer", EMNLP
    2022, arXiv:2203.04212 (code: mt-upc/transformer-contributions).

    Pre-norm blocks (timm's ``Block``, torchvision's ``EncoderBlock``, ``nn.TransformerEncoderLayer`` with
    ``norm_first=True``) compute ``y_i = x_i + s * (sum_h sum_j A_h[i, j] W_O^h v_j^h + b_O)`` with ``v_j^h = W_V^h
    LN_1(x_j) + b_V^h`` and ``s`` the layer scale (1 without one).  The layer norm acts on each source token alone
    before the values, so it stays inside that token's vector:
    ``y_i = sum_j T_i(x_j) + s b_O``, ``T_i(x_j) = s sum_h A_h[i, j] W_O^h v_j^h + [i == j] x_i``; ALTI's
    ``c_ij = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1)``, ``C_l = c`` with rows divided by their sums,
    ``R = C_L ... C_1``.  The map is the class token's row of ``R`` over the patch tokens (a distilled DeiT's class
    and distillation rows averaged, the mean over the patch rows for models without a class token), on the patch
    grid, upsampled bilinearly; ``rollout=False`` reads the last block's ``C_L`` instead.  Class-agnostic: the
    target is accepted (and validated) and ignored.  The MLP sublayers are left out, as in the paper (the next
    block reads the stream after them as its ``x``).

    As the authors' ``src/contributions.py`` (its ``pre_layer_norm`` branch): the value bias ``b_V`` inside each
    token's vector (their values are the value projection's outputs), the output bias ``b_O`` in ``y_i`` and in no
    ``T_i(x_j)`` (their ``resultant = attn_output + dense_bias``), the residual ``x_i`` in ``T_i(x_i)`` alone, the
    layer norm before the values not linearised (it is no part of the sum); from their ``normalize_contributions
    (scaling='min_sum', resultant_norm=||y||_1)``: ``||y_i||_1`` added, clipped at 0, rows divided by their sums;
    from ``compute_joint_attention``: the rollout without an added identity (the residual is in the ``T_i(x_i)``).
    The layer scale (timm's ``LayerScale``, BEiT's and EVA's ``gamma_1``; ViTs newer than the paper) multiplies
    every head's vector and ``b_O``, as it multiplies the sublayer's output.  Prefix (class, register) tokens are
    sources and outputs like patch tokens.

    Each block's pieces come from one forward of the images: the attention probabilities and value vectors of
    every attention call (:class:`ValueCapture`), the output projection's weight, the tokens entering each block
    and the residual stream after its attention sublayer (the input of its second norm).  The decomposition's sum
    is checked against that stream: a block it does not reproduce (post-norm blocks, a normalisation or gate
    between the heads and the projection) raises a ValueError rather than giving a wrong map.  Cost: one forward
    per image, then per block ``N^2 D H`` multiply-adds and ``N^2 D`` entries written and read for the transformed
    vectors and their distances (held for at most ``CHUNK_ELEMENTS`` entries at a time; with ``create_graph=True``
    every slice's graph is kept; the last block's alone with ``rollout=False``): for ViT-B/16 at 224 a quarter of a
    forward's multiply-adds, but memory-bound: 7.4 forwards' time on a 2-core CPU (benchmarks/RESULTS.md; the
    norm-based methods 2.3 and 3.0).  ``create_graph=True``
    keeps the map differentiable in the model's parameters (the absolute values and the clip have kinks at 0).

    Deliberate differences: a row of ``c`` that is all zero (every transformed vector at least as far from ``y_i``
    as ``y_i`` is long, e.g. ``y_i = 0``) becomes the identity's row instead of the authors' 0/0; the map reads the
    class token's row of the last rollout, as the library's other attention methods (the authors plot every
    layer's rows).
    """

    def _contributions(self, terms: BlockTerms) -> Tensor:
        return alti_contributions(terms)
