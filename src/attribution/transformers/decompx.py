"""DecompX: every token's representation carried through the whole model as one vector per input token, and read
out at the classifier as each input token's share of the target's logit."""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .alti import (DECOMPOSITION_TOLERANCE, BlockDecompositionExplainer, BlockForward, BlockTerms, transformed_vectors,
                   without_autocast)
from .base import batch_first_tokens, scores_to_image
from .token_tm import _is_norm
from .tokens import TokenLayout, token_layout

#: the ``biases`` options: how each bias is shared among the input tokens' vectors (the authors' ``bias_decomp_type``
#: 'absdot', 'norm' and 'equal'), or kept apart in one extra vector ('token': their ``include_bias_token`` with no
#: further decomposition)
BIASES = ("absdot", "norm", "equal", "token")
#: the decomposed stream of at most this many entries (query token x input token x channel) is held at once (128
#: MiB in float32): the images of a pass are taken in groups that fit (one at a time for ViT-B/16 at 224)
STREAM_ELEMENTS = 2 ** 25
#: the MLP's hidden vectors of at most this many entries are held at once (64 MiB in float32): its query tokens
#: are taken in slices that fit
CHUNK_ELEMENTS = 2 ** 24
#: elementwise activations with f(0) = 0, linearised as f(h) / h per neuron (the authors' zero-origin slope)
ACTIVATIONS = {"GELU", "GELUTanh", "QuickGELU", "ReLU", "ReLU6", "LeakyReLU", "SiLU", "Swish", "Mish", "Tanh",
               "Hardswish", "HardSwish"}
#: modules that hand their input on unchanged in eval mode
PASSTHROUGH = {"Identity", "Dropout", "DropPath"}


class _Event(NamedTuple):
    """One module call recorded in the forward: its first input and output (None where not kept)."""

    module: nn.Module
    inputs: Optional[Tensor]
    output: Optional[Tensor]
    kind: str  # 'norm' (a direct child of a block), 'linear', or 'other'


class _Recorder:
    """Forward hooks that record, per block, its direct-child normalisations, the linears inside it and (by type
    only) its other leaf modules, in call order; and every leaf module called after the last block (the head)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module]) -> None:
        self.blocks: List[List[_Event]] = [[] for _ in blocks]
        self.tail: List[_Event] = []
        self.handles: list = []
        self._after_blocks = False
        inside = set()
        for index, block in enumerate(blocks):
            if index == len(blocks) - 1:
                self.handles.append(block.register_forward_hook(self._last_block_done))
            norms = {id(child) for child in block.children() if _is_norm(child)}
            for module in block.modules():
                inside.add(id(module))
                if module is block or (id(module) not in norms and any(module.children())):
                    continue
                kind = "norm" if id(module) in norms else "linear" if isinstance(module, nn.Linear) else "other"
                self.handles.append(module.register_forward_hook(partial(self._in_block, self.blocks[index], kind)))
        for module in model.modules():
            if id(module) not in inside and not any(module.children()):
                self.handles.append(module.register_forward_hook(self._after))

    def _last_block_done(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._after_blocks = True

    @staticmethod
    def _in_block(store: List[_Event], kind: str, module: nn.Module, args: tuple, output: Any) -> None:
        keep = kind != "other" and args and isinstance(args[0], Tensor) and isinstance(output, Tensor)
        store.append(_Event(module, args[0] if keep else None, output if keep else None, kind))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._after_blocks:
            first = args[0] if args and isinstance(args[0], Tensor) else None
            self.tail.append(_Event(module, first, output if isinstance(output, Tensor) else None, "other"))


class _Norm(NamedTuple):
    """A layer norm applied to a decomposed vector: ``gamma * (v - mean(v)) / std + beta`` per part, ``std`` that of
    the actual input ((B, n, 1) for tokens, (B, 1) for pooled vectors), ``beta`` shared among the parts."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    std: Tensor

    def images(self, start: int, stop: int) -> "_Norm":
        return _Norm(self.weight, self.bias, self.std[start:stop])


class _Block(NamedTuple):
    """One pre-norm block's pieces, in the working precision (the layer scales folded into the linears before them).
    ``terms`` for the first block (where the decomposition starts from the tokens themselves), else None."""

    terms: Optional[BlockTerms]
    attention: Tensor  # (B, H, N, N)
    norm1: _Norm
    values: Tensor  # W_V (H * head_dim, D)
    projection: Tensor  # s1 * W_O (D, H * head_dim)
    bias: Tensor  # the attention sublayer's bias, s1 * (W_O b_V + b_O) (s1 * b_O for the first block) (D,)
    middle: Tensor  # the model's stream after attention (B, N, D), for the check
    norm2: _Norm
    fc1: Tuple[Tensor, Optional[Tensor]]
    ratio: Tensor  # act(h) / h per hidden neuron (B, N, F)
    fc2: Tuple[Tensor, Optional[Tensor]]  # s2 * W_2, s2 * b_2
    leaving: Tensor  # the model's block output (B, N, D), for the check

    def images(self, start: int, stop: int) -> "_Block":
        terms = None if self.terms is None else BlockTerms(*(t[start:stop] for t in self.terms[:3]), self.terms.bias)
        return self._replace(terms=terms, attention=self.attention[start:stop], norm1=self.norm1.images(start, stop),
                             middle=self.middle[start:stop], norm2=self.norm2.images(start, stop),
                             ratio=self.ratio[start:stop], leaving=self.leaving[start:stop])


class _Step(NamedTuple):
    """One step of the head: ``kind`` 'norm' (a :class:`_Norm`), 'pool' (``('token', t)``: token t's vector;
    ``('mean', s)``: the mean of the tokens from s on), 'linear' (``(weight, bias)``) or 'ratio' (an elementwise
    activation's f(h) / h, (B, F))."""

    kind: str
    value: Any

    def images(self, start: int, stop: int) -> "_Step":
        if self.kind == "norm":
            return _Step("norm", self.value.images(start, stop))
        return _Step("ratio", self.value[start:stop]) if self.kind == "ratio" else self


@register("decompx")
class DecompX(BlockDecompositionExplainer):
    """DecompX: each token's representation split, through every block, into one vector per input token (its
    decomposition), propagated through attention, residuals, layer norms, the MLP's activation and the classifier
    head; a patch token's relevance is its vector's share of the target's logit.  Signed, class-discriminative, and
    complete: the shares of all tokens sum to the logit.

    Modarressi, Fayyaz, Aghazadeh, Yaghoobzadeh & Pilehvar, "DecompX: Explaining Transformers Decisions by
    Propagating Token Decomposition", ACL 2023, arXiv:2306.02873 (code: mohsenfayyaz/DecompX).

    Each token's vector is ``x_i = sum_k x_{i<-k}`` over the input tokens ``k`` (the tokens entering the first
    block: patches with their position embeddings, class and register tokens).  Every operation is linear in the
    parts once the attention probabilities, each token's layer-norm deviation and each activation's slope are read
    from the model's own forward, so the parts are carried through it and always sum to the model's vectors.  For
    pre-norm blocks ``y = x + s1 * proj(attn(LN1(x)))``, ``z = y + s2 * fc2(act(fc1(LN2(y))))`` (``s`` the layer
    scales, 1 without):

    * layer norm (``LN1``, ``LN2``, the final norm, ``fc_norm``): ``LN(v)_{<-k} = gamma * (v_{<-k} - mean_d
      v_{<-k}) / sigma + w_k beta``, ``sigma = sqrt(var(v) + eps)`` of the actual vector ``v = sum_k v_{<-k}``;
    * attention: ``y_{i<-k} = x_{i<-k} + s1 * sum_h W_O^h sum_j A_h[i, j] W_V^h LN1(x_j)_{<-k} + w_ik c``,
      ``c = s1 * (W_O b_V + b_O)`` (the value bias reaches every query whole: the attention rows sum to 1);
    * MLP: ``u = LN2(y)_{<-k}``, ``h_{<-k} = W_1 u + w_k b_1``, ``g_{<-k} = theta * h_{<-k}`` with ``theta =
      act(h) / h`` per neuron of the actual pre-activation ``h = sum_k h_{<-k}`` (0 where ``h = 0``), ``m_{<-k} =
      s2 * (W_2 g_{<-k} + w_k b_2)``, ``z_{i<-k} = y_{i<-k} + m_{i<-k}``;
    * head: the final norm on every token, the readout (the class token's vector ``p_{<-k} = z_{0<-k}``; the mean
      of the patch tokens' for average-pooled models), ``fc_norm``, any linears with elementwise activations between
      them (torchvision's ``pre_logits`` + tanh: tanh linearised as the GELU), the classifier:
      ``logit_{<-k} = W_c p_{<-k} + w_k b_c``;
    * the first block starts from the tokens themselves (``x_{i<-k} = [i == k] x_i``) and, as the authors' first
      layer, keeps each token's whole value vector ``W_V LN1(x_k) + b_V`` in its own part: ``y_{i<-k} = [i == k]
      x_i + s1 * sum_h A_h[i, k] W_O^h (W_V^h LN1(x_k) + b_V^h) + w_ik s1 b_O``.

    ``w_k`` shares each bias ``b`` among the parts ``v_{<-k}`` it is added to (``biases``): 'absdot' (the authors'
    default), ``w_k = |<v_{<-k}, b>| / sum_k' |<v_{<-k'}, b>|`` (for the classifier's bias the dot product runs
    over the classes); 'norm', ``||v_{<-k}||`` instead; 'equal', the same share for every non-zero part; 'token',
    no sharing: every bias goes into one extra part (the authors' bias token), carried through the model as the
    others and left out of the map.  The map is ``logit_{t<-k}`` (``t`` the target class) of the patch tokens on
    the patch grid, upsampled bilinearly (the authors' ``classifier[:, k, t]``); the class and register tokens'
    shares (and the bias token's) are in the sum but not in the map.

    Defaults and readings from the authors' code (``src/decompx_utils.py``, ``src/modeling_bert.py``, their demo's
    ``DecompXConfig``; the paper itself could not be read offline): ``include_biases=True``, ``bias_decomp_type=
    'absdot'``, ``include_LN1``, ``include_FFN`` with ``FFN_approx_type='GeLU_ZO'`` (``theta = act(h) / (h +
    1e-12)``, applied to every part with ``b_1``'s share already in it; no separate activation bias),
    ``include_LN2``, ``aggregation='vector'``, ``include_classifier_w_pooler=True`` with ``tanh_approx_type='ZO'``;
    their ``ln_decomposer`` (each part centred on its own mean, divided by the actual token's deviation, times
    gamma, ``beta`` shared by ``bias_decomposer``), ``bias_decomposer`` on the attention's residual-included parts
    with ``W_O b_V + b_O`` after the first layer (``b_O`` alone in the first, whose values come from the tokens
    themselves), ``ffn_decomposer`` (``b_1`` shared after ``W_1``, ``b_2`` after ``W_2``) and the classifier's
    ``ffn_decomposer`` (``b_c`` shared over the class dimension).  Their model is post-norm BERT (norms on the
    residual stream); here every layer norm is decomposed where the pre-norm model applies it (before the
    attention, before the MLP, at the end), the residual stream itself unnormalised.  The layer scale (timm's
    ``ls1``/``ls2``, BEiT's ``gamma_1``/``gamma_2``) is folded into the linear before it (``W_O``, ``W_2``) and its
    bias.

    One forward per image records everything (the attention probabilities and value vectors
    (:class:`~attribution.transformers.alti.ValueCapture`), the value and output projections, the norms' inputs, the
    MLP's pre-activations and activations, the head's modules: any head made of layer norms on the tokens, one
    readout (a token or the mean of tokens from some index on, recognised from the values), then layer norms,
    linears and elementwise activations; a distilled DeiT's two heads or an attention-pooling head raise a
    ValueError).  Each block's attention sublayer and output and the logits are checked against the model's own
    (a block or head the decomposition does not rebuild raises a ValueError).  Cost: the decomposed stream is ``N``
    (``N + 1`` with ``biases='token'``) copies of the residual stream, each through every linear of the model: about
    ``N`` forwards' multiply-adds per image (plus ``N^3 D`` per block for the attention), held as (images, N, N, D):
    the images of a pass in groups of at most ``STREAM_ELEMENTS`` stream entries, the MLP's hidden vectors in query
    slices of at most ``CHUNK_ELEMENTS`` entries.  Measured on a 2-core CPU at 224, per image: 160x (ViT-Ti/16),
    225x (ViT-S/16) and 220x (ViT-B/16: 53 s, 1 GB above the model's) a forward's time.  ``create_graph=True``
    keeps the map differentiable in the model's parameters (kinks where a share's dot product or a pre-activation
    is 0).  The target must be class indices (or None: each image's arg-max) and ``score='logit'``: the logit is
    what is decomposed.

    Deliberate differences: ``theta = act(h) / h`` with 0 where ``h = 0`` (the authors add 1e-12 to ``h``, which
    breaks the sum by a factor ``h / (h + 1e-12)`` and divides by zero at ``h = -1e-12``), and a share's weights
    divided by their sum with equal shares where every weight is 0 (the authors add 1e-12 to the sum and drop the
    bias there): the parts sum to the model's vectors exactly.  The class token's and register tokens' shares are
    left out of the map, as every attention method here maps patch tokens only.
    """

    defaults = {"biases": "absdot"}
    needs_class_indices = True
    label = "DecompX"

    def _explain(self, x: Tensor, target: Target, *, biases: str, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        check_biases(biases)
        if target.objective is not None:
            raise ValueError("DecompX decomposes one class's logit, so it needs class indices as the target, not a "
                             "callable")
        if target.score != "logit":
            raise ValueError(f"DecompX decomposes the logit into the tokens' shares: score must be 'logit', got "
                             f"{target.score!r}")
        names, blocks = self._blocks(x)
        owners = torch.arange(x.shape[0], device=x.device)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            scores, layout = self._shares(x[start:stop], target, owners[start:stop], blocks, names, biases,
                                          create_graph)
            maps.append(scores_to_image(scores[:, :layout.tokens], layout, size))
        return torch.cat(maps)

    def _shares(self, rows: Tensor, target: Target, owners: Tensor, blocks: Sequence[nn.Module],
                names: Sequence[str], biases: str, create_graph: bool) -> Tuple[Tensor, TokenLayout]:
        """(B, K) every input token's share of its image's target logit (the bias token's last for 'token'), from
        one forward of ``rows``, and the tokens' layout."""
        recorder = _Recorder(self.model, blocks)
        forward = self._block_forward(rows, target, owners, blocks, names, create_graph, recorder.handles)
        classes = target.classes[owners] if target.classes is not None else forward.outputs.argmax(dim=1)
        size = (int(rows.shape[-2]), int(rows.shape[-1]))
        layout = token_layout(self.model, size, forward.states[0][0].shape[1], "the tokens")
        with torch.set_grad_enabled(create_graph), without_autocast(rows.device):  # autocast: the forward's alone
            return self._token_scores(forward, recorder, blocks, names, layout, classes, biases), layout

    # ------------------------------------------------------------------------------------------------ plan
    def _token_scores(self, forward: BlockForward, recorder: _Recorder, blocks: Sequence[nn.Module],
                      names: Sequence[str], layout: TokenLayout, classes: Tensor, biases: str) -> Tensor:
        """(B, K) every input token's share of its image's target logit (the bias token's last for 'token')."""
        dtype = forward.pieces[0].tokens.dtype
        half = any(t.dtype in (torch.float16, torch.bfloat16) for t in (forward.outputs, forward.states[0][1]))
        plans = [self._block_plan(index, block, name, forward, recorder.blocks[index], dtype)
                 for index, (block, name) in enumerate(zip(blocks, names))]
        steps = self._head_plan(recorder.tail, forward, layout, dtype, half)
        tokens, width = forward.states[0][0].shape[1:]
        parts = tokens + (biases == "token")
        group = max(1, STREAM_ELEMENTS // (tokens * parts * width))
        scores = []
        for start in range(0, classes.shape[0], group):
            stop = min(classes.shape[0], start + group)
            stream: Optional[Tensor] = None
            for plan, name in zip(plans, names):
                plan = plan.images(start, stop)
                stream = attention_parts(stream, plan, biases)
                self._check(f"the attention sublayer of block {name!r}", stream.sum(dim=2), plan.middle, half)
                stream = mlp_parts(stream, plan, biases)
                self._check(f"block {name!r}", stream.sum(dim=2), plan.leaving, half)
            logits = propagate_head(stream, [s.images(start, stop) for s in steps], biases)  # type: ignore[arg-type]
            self._check("the head", logits.sum(dim=1), forward.outputs[start:stop], half)
            chosen = classes[start:stop].view(-1, 1, 1).expand(-1, logits.shape[1], 1)
            scores.append(logits.gather(2, chosen)[..., 0])
        return torch.cat(scores)

    def _block_plan(self, index: int, block: nn.Module, name: str, forward: BlockForward, events: List[_Event],
                    dtype: torch.dtype) -> _Block:
        """One block's :class:`_Block` from the forward's records (a ValueError for what DecompX cannot follow)."""
        pieces = forward.pieces[index]
        entering, middle, leaving = forward.states[index]
        norms = [e for e in events if e.kind == "norm"]
        if len(norms) != 2:
            raise ValueError(f"DecompX needs pre-norm blocks whose two layer norms are direct children; block "
                             f"{name!r} of {type(self.model).__name__} ran {len(norms)}")
        for event in norms:
            _layer_norm_module(event.module, f"block {name!r}", self.model)
        fc1, fc2, hidden, activated = self._mlp(events[events.index(norms[1]) + 1:], block, name, entering.shape[0])
        if forward.value_maps[index] is None:
            raise ValueError(f"DecompX needs the value vectors of every attention call to come from one linear of the "
                             f"block's tokens; in block {name!r} of {type(self.model).__name__} they do not")
        cast = partial(_cast, dtype=dtype)
        values, value_bias = (cast(t) for t in forward.value_maps[index])  # type: ignore[union-attr]
        out_weight, out_bias = (cast(t) for t in forward.projections[index])
        zeros = torch.zeros_like(out_weight[:, 0])
        scale = _layer_scale(block, 1)
        scale = torch.ones_like(zeros) if scale is None else cast(scale)
        out_bias = zeros if out_bias is None else out_bias
        if index > 0:  # the value bias reaches every query whole; in the first block it is inside the tokens' parts
            out_bias = out_bias + out_weight @ (torch.zeros_like(values[:, 0]) if value_bias is None else value_bias)
        fc2_weight, fc2_bias = (cast(t) for t in _parameters(fc2))
        mlp_scale = _layer_scale(block, 2)
        if mlp_scale is not None:
            fc2_weight = cast(mlp_scale)[:, None] * fc2_weight
            fc2_bias = None if fc2_bias is None else cast(mlp_scale) * fc2_bias
        return _Block(terms=pieces.terms() if index == 0 else None, attention=cast(pieces.attention),
                      norm1=self._norm(norms[0].module, entering, dtype), values=values,
                      projection=scale[:, None] * out_weight, bias=scale * out_bias, middle=cast(middle),
                      norm2=self._norm(norms[1].module, middle, dtype),
                      fc1=tuple(cast(t) for t in _parameters(fc1)),  # type: ignore[arg-type]
                      ratio=slope(cast(hidden), cast(activated)), fc2=(fc2_weight, fc2_bias), leaving=cast(leaving))

    def _mlp(self, events: List[_Event], block: nn.Module, name: str,
             rows: int) -> Tuple[nn.Linear, nn.Linear, Tensor, Tensor]:
        """From the calls after a block's second norm: its two linears, the first's output (the pre-activation) and
        the second's input (the activation), (B, N, F) each; a ValueError unless only elementwise activations (or
        dropout) run between the two."""
        linears = [e for e in events if e.kind == "linear"]
        message = f"DecompX needs each block's MLP to be two linears with an elementwise activation between them; " \
                  f"block {name!r} of {type(self.model).__name__} "
        if len(linears) != 2:
            raise ValueError(message + f"runs {len(linears)} linears after its second norm")
        between = events[events.index(linears[0]) + 1:events.index(linears[1])]
        unknown = sorted({type(e.module).__name__ for e in between} - ACTIVATIONS - PASSTHROUGH)
        if unknown:
            raise ValueError(message + f"runs {', '.join(unknown)} between them")
        hidden = batch_first_tokens(linears[0].output, rows, block)
        activated = batch_first_tokens(linears[1].inputs, rows, block)
        if hidden.shape != activated.shape:
            raise ValueError(message + f"maps {tuple(hidden.shape)} to {tuple(activated.shape)} between them")
        return linears[0].module, linears[1].module, hidden, activated  # type: ignore[return-value]

    def _head_plan(self, events: List[_Event], forward: BlockForward, layout: TokenLayout, dtype: torch.dtype,
                   half: bool) -> List[_Step]:
        """The head's steps from the modules called after the last block (a ValueError where it is not made of
        layer norms, one readout, linears and elementwise activations)."""
        current = forward.states[-1][2]
        steps: List[_Step] = []
        pooled = False
        model = type(self.model).__name__
        for event in events:
            kind = type(event.module).__name__
            if event.inputs is None or event.output is None:
                raise ValueError(f"DecompX could not follow the head of {model}: its {kind} does not map one tensor "
                                 "to one tensor")
            if not pooled and event.inputs.dim() == 3:
                if not _close(event.inputs, current, half):
                    raise ValueError(f"DecompX could not follow the head of {model}: its {kind} does not run on the "
                                     "last block's tokens (attention-pooling heads, e.g. timm's global_pool='map', "
                                     "are not supported)")
            elif not pooled:
                readout = _readout(event.inputs, current, layout, half)
                if readout is None:
                    raise ValueError(f"DecompX could not follow the head of {model}: the input of its {kind} is "
                                     "neither one token nor a mean of tokens")
                steps.append(_Step("pool", readout))
                pooled, current = True, event.inputs
            if pooled and not _close(event.inputs, current, half):
                raise ValueError(f"DecompX could not follow the head of {model}: its {kind} does not run on the "
                                 "output of the step before")
            if isinstance(event.module, nn.LayerNorm):
                _layer_norm_module(event.module, "the head", self.model)
                steps.append(_Step("norm", self._norm(event.module, event.inputs, dtype)))
            elif pooled and isinstance(event.module, nn.Linear):
                steps.append(_Step("linear", tuple(_cast(t, dtype) for t in _parameters(event.module))))
            elif pooled and kind in ACTIVATIONS:
                steps.append(_Step("ratio", slope(_cast(event.inputs, dtype), _cast(event.output, dtype))))
            elif kind not in PASSTHROUGH:
                where = "on the pooled vector" if pooled else "on the tokens"
                raise ValueError(f"DecompX could not follow the head of {model}: it runs {kind} {where}; it follows "
                                 "layer norms on the tokens, one readout (a token, or a mean of tokens), then layer "
                                 "norms, linears and elementwise activations")
            current = event.output
        if not pooled or not _close(current, forward.outputs, half):
            raise ValueError(f"DecompX could not follow the head of {model}: the last block's tokens do not reach its "
                             "output through layer norms, one readout, linears and elementwise activations")
        return steps

    @staticmethod
    def _norm(module: nn.LayerNorm, inputs: Tensor, dtype: torch.dtype) -> _Norm:
        """The decomposition of ``module`` applied to the actual ``inputs`` (its deviation per vector)."""
        actual = _cast(inputs, dtype)
        std = (actual.var(dim=-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        weight, bias = (_cast(t, dtype) for t in (module.weight, module.bias))
        return _Norm(weight, bias, std)

    def _check(self, where: str, rebuilt: Tensor, actual: Tensor, half: bool) -> None:
        """A ValueError unless the decomposition's sum equals the model's own tensor (up to the tolerance of
        :data:`~attribution.transformers.alti.DECOMPOSITION_TOLERANCE`)."""
        with torch.no_grad():
            actual = actual.to(rebuilt.dtype)
            error = float((rebuilt - actual).abs().amax())
            scale = max(float(actual.abs().amax()), 1e-30)
        if not error <= DECOMPOSITION_TOLERANCE["half" if half else "full"] * scale:
            raise ValueError(
                f"DecompX's decomposition does not rebuild the output of {where} of {type(self.model).__name__} "
                f"(largest difference {error:.3g}, entries up to {scale:.3g}): it needs pre-norm blocks x + s * "
                "proj(attention(norm(x))), then + s * fc2(act(fc1(norm(x)))), with nothing else on the residual stream"
            )


# ---------------------------------------------------------------------------------------------- propagation
def check_biases(value: Any) -> None:
    if not isinstance(value, str) or value not in BIASES:
        raise ValueError(f"biases must be one of {BIASES}, got {value!r}")


def shared(parts: Tensor, bias: Optional[Tensor], biases: str) -> Tensor:
    """``parts`` (..., K, D) with the (D,) ``bias`` added among them: to each part in proportion to its weight
    (``biases``: |<part, bias>| for 'absdot', ||part|| for 'norm', 1 for every non-zero part for 'equal'; equal
    shares where every weight is 0), or whole to the last part (the bias token) for 'token'."""
    if bias is None:
        return parts
    count = parts.shape[-2]
    if biases == "token":
        last = torch.zeros(count, 1, dtype=parts.dtype, device=parts.device)
        last[-1] = 1
        return parts + last * bias
    if biases == "absdot":
        weights = (parts @ bias).abs()
    elif biases == "norm":
        weights = torch.linalg.vector_norm(parts, dim=-1)
    else:
        weights = (parts != 0).any(dim=-1).to(parts.dtype)
    total = weights.sum(dim=-1, keepdim=True)
    share = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 1.0 / count)
    return torch.addcmul(parts, share.unsqueeze(-1), bias)


def normalised(parts: Tensor, norm: _Norm, biases: str) -> Tensor:
    """A layer norm on the (..., n, K, D) parts (``norm.std`` (..., n, 1)): each part centred on its own mean,
    divided by the actual vector's deviation, times gamma; beta shared."""
    scale = 1 / norm.std if norm.weight is None else norm.weight / norm.std  # (..., n, D)
    return shared((parts - parts.mean(dim=-1, keepdim=True)) * scale.unsqueeze(-2), norm.bias, biases)


def linear(parts: Tensor, weight: Tensor, bias: Optional[Tensor], biases: str) -> Tensor:
    return shared(parts @ weight.T, bias, biases)


def slope(inputs: Tensor, outputs: Tensor) -> Tensor:
    """``f(h) / h`` elementwise for an activation's actual input ``h`` and output ``f(h)`` (0 where ``h = 0``)."""
    nonzero = inputs != 0
    return torch.where(nonzero, outputs / torch.where(nonzero, inputs, torch.ones_like(inputs)),
                       torch.zeros_like(inputs))


def attention_parts(stream: Optional[Tensor], block: _Block, biases: str) -> Tensor:
    """The (B, N, K, D) decomposition of the stream after a block's attention sublayer from that of the block's
    input (None: the first block, whose input tokens are each their own part)."""
    if stream is None:
        assert block.terms is not None
        y = transformed_vectors(block.terms)  # (B, N, N, D): T_i(x_k), value bias and LN1 inside token k's part
        if biases == "token":
            y = torch.cat([y, torch.zeros_like(y[:, :, :1])], dim=2)
    else:
        batch, tokens, parts, _ = stream.shape
        heads = block.attention.shape[1]
        values = (normalised(stream, block.norm1, biases) @ block.values.T).view(batch, tokens, parts, heads, -1)
        mixed = torch.einsum("bhij,bjkhc->bikhc", block.attention, values).reshape(batch, tokens, parts, -1)
        y = stream + mixed @ block.projection.T
    return shared(y, block.bias, biases)


def mlp_parts(y: Tensor, block: _Block, biases: str) -> Tensor:
    """``y + s2 * fc2(theta * fc1(LN2(y)))`` on the parts, query tokens in slices of at most ``CHUNK_ELEMENTS``
    hidden entries."""
    batch, tokens, parts, width = y.shape
    rows = y.reshape(batch * tokens, parts, width)
    std = block.norm2.std.reshape(batch * tokens, 1)
    ratio = block.ratio.reshape(batch * tokens, 1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, parts * ratio.shape[-1]))
    out = []
    for start in range(0, rows.shape[0], step):
        stop = min(rows.shape[0], start + step)
        u = normalised(rows[start:stop], block.norm2._replace(std=std[start:stop]), biases)
        hidden = linear(u, *block.fc1, biases) * ratio[start:stop]
        out.append(rows[start:stop] + linear(hidden, *block.fc2, biases))
    return torch.cat(out).view(batch, tokens, parts, width)


def propagate_head(stream: Tensor, steps: Sequence[_Step], biases: str) -> Tensor:
    """(B, K, C) each part's logits from the last block's (B, N, K, D) decomposition."""
    parts = stream
    for step in steps:
        if step.kind == "norm":
            parts = normalised(parts, step.value, biases)
        elif step.kind == "pool":
            how, index = step.value
            parts = parts[:, index] if how == "token" else parts[:, index:].mean(dim=1)
        elif step.kind == "linear":
            parts = linear(parts, *step.value, biases)
        else:
            parts = parts * step.value.unsqueeze(-2)
    return parts


# --------------------------------------------------------------------------------------------------- helpers
def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _parameters(module: nn.Linear) -> Tuple[Tensor, Optional[Tensor]]:
    return module.weight, module.bias


def _layer_scale(block: nn.Module, sublayer: int) -> Optional[Tensor]:
    """The per-channel scale of a pre-norm block's attention (1) or MLP (2) output: timm's ``ls1``/``ls2``
    (``LayerScale``), BEiT's and EVA's ``gamma_1``/``gamma_2``; None without one."""
    scale = getattr(getattr(block, f"ls{sublayer}", None), "gamma", None)
    if isinstance(scale, Tensor):
        return scale
    scale = getattr(block, f"gamma_{sublayer}", None)
    return scale if isinstance(scale, Tensor) else None


def _layer_norm_module(module: nn.Module, where: str, model: nn.Module) -> None:
    if not isinstance(module, nn.LayerNorm) or len(module.normalized_shape) != 1:
        raise ValueError(f"DecompX decomposes layer norms over the channels (nn.LayerNorm) only; {where} of "
                         f"{type(model).__name__} runs {type(module).__name__}")


def _close(a: Tensor, b: Tensor, half: bool) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    with torch.no_grad():
        a, b = a.to(torch.float64), b.to(torch.float64)
        scale = max(float(b.abs().amax()), 1e-30)
        return float((a - b).abs().amax()) <= DECOMPOSITION_TOLERANCE["half" if half else "full"] * scale


def _readout(pooled: Tensor, tokens: Tensor, layout: TokenLayout, half: bool) -> Optional[Tuple[str, int]]:
    """How the head's first (B, D) input is read from the (B, N, D) tokens: ``('token', t)`` (a class token among
    the prefix tokens, or any token) or ``('mean', s)`` (the mean of the tokens from ``s`` on: the patch tokens,
    or all)."""
    if pooled.dim() != 2 or tokens.dim() != 3 or pooled.shape[0] != tokens.shape[0]:
        return None
    candidates: Dict[Tuple[str, int], Tensor] = {}
    for start in sorted({layout.prefix, 0}):
        candidates[("mean", start)] = tokens[:, start:].mean(dim=1)
    for index in range(tokens.shape[1]):
        candidates[("token", index)] = tokens[:, index]
    order = [key for key in candidates if key[0] == "token" and key[1] < layout.prefix]
    order += [key for key in candidates if key[0] == "mean"]
    order += [key for key in candidates if key not in order]
    return next((key for key in order if _close(pooled, candidates[key], half)), None)
