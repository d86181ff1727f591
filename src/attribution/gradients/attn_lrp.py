"""AttnLRP and CP-LRP: layer-wise relevance propagation through transformers, in the input x gradient form.

While :class:`TransformerLRPRules` (a :class:`torch.overrides.TorchFunctionMode`) is active around a forward, the
operations that are not linear get a backward that makes ``input x gradient`` a relevance propagation (Achtibat et
al.'s "efficient" formulation, as their LXT library implements it); the model is not touched:

* layer norm (``F.layer_norm``): the standard deviation is held constant (the identity rule on the normalisation);
* elementwise activations through the origin (GELU, SiLU, ReLU, tanh, ...): the identity rule, ``d out / d in :=
  f(x) / (x + eps)``, so the relevance ``x * g`` passes unchanged (sigmoid-like gates and softplus keep their
  gradient: ``f(0) != 0``);
* attention, ``'attnlrp'``: the uniform rule on both products ``q k^T`` and ``A v``, i.e. the gradients reaching
  ``q`` and ``k`` are divided by 4 and those reaching ``v`` by 2, in the fused kernel
  (``F.scaled_dot_product_attention``), in ``nn.MultiheadAttention`` and in explicit ``q @ k^T`` / ``A @ v``
  products of two computed tensors (the softmax keeps its gradient: in this form it is AttnLRP's softmax rule);
* attention, ``'cp'`` (CP-LRP): the attention probabilities are constants (no gradient through ``q`` and ``k``);
* gated products (``'attnlrp'``): an elementwise product of two computed tensors of the same shape computed apart
  (a gated MLP's ``act(x W_g) * (x W_u)``, SwiGLU) gets the uniform rule too, the gradient to both factors halved
  (LXT's ``mul2``); products of a tensor with a function of its own entries (``x * sigmoid(1.702 x)``, a GELU
  written out) and broadcast or expanded gates (squeeze-and-excitation, ``x * s.expand_as(x)``) keep their gradient.

Linear layers, convolutions, sums and the rest keep their plain gradient (LRP-0 in this form).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.overrides import TorchFunctionMode

from ..core.registry import register
from ..core.rules import (ACTIVATION_FUNCTIONS, IN_PLACE_SUM_FUNCTIONS, LINEAR_FUNCTIONS, SUM_FUNCTIONS, LinearCall,
                          Operation, RuleState, SequenceFirstScope, batch_dimension, inplace_position, is_parameter,
                          linear_arguments, route)
from ..core.targets import Target
from ..transformers.attention import explicit_attention, multi_head_attention
from .base import GradientExplainer
from .lrp import AlphaBeta

VARIANTS = ("attnlrp", "cp")
#: the rule sets of :class:`TransformerLRPRules`: AttnLRP's variants and Chefer et al.'s (used by
#: :class:`attribution.transformers.TransformerAttribution`)
RULE_SETS = VARIANTS + ("chefer",)
_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm)
_MULS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)
#: autograd nodes that mix entries (products with weights or along a dimension, and the routed linear rules): the
#: search for what a factor was computed from, entry by entry, stops there
_MIXING = ("Mm", "Addmm", "Bmm", "Baddbmm", "Convolution", "Embedding", "_Routed")
_SOFTMAX = (torch.softmax, Tensor.softmax, F.softmax)
#: the identity rule's f(x) / x assumes f(0) = 0: gates (sigmoid, as in squeeze-and-excitation blocks) and offsets
#: (softplus) keep their gradient
_NOT_THROUGH_ZERO = (F.sigmoid, torch.sigmoid, Tensor.sigmoid, F.hardsigmoid, F.logsigmoid, F.softplus)
_IDENTITY_RULE = tuple(f for f in ACTIVATION_FUNCTIONS if f not in _NOT_THROUGH_ZERO)


class _ScaleGradient(Function):
    """The identity, whose backward multiplies the gradient by ``factor`` (0: a constant, CP-LRP's attention).  The
    output is a copy, so that the model may change it in place."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: float, state: RuleState) -> Tensor:
        ctx.factor, ctx.state = factor, state
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:
        if ctx.state.plain or ctx.factor == 1:
            return grad, None, None
        return (grad * ctx.factor if ctx.factor else None), None, None


class _IdentityRule(Function):
    """``out = f(x)`` (computed outside, with its graph) with the backward ``grad * ratio`` to ``x``, ``ratio = out /
    (x + eps)`` (LXT's ``identity_rule_implicit``; computed outside too, in at least float32, so that the rule is
    differentiable again under create_graph); once plain, the gradient goes to ``out`` and through ``f``'s graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, ratio: Tensor, state: RuleState) -> Tensor:
        ctx.state = state
        ctx.save_for_backward(ratio)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        if ctx.state.plain:
            return None, grad, None, None
        (ratio,) = ctx.saved_tensors
        return (grad * ratio).to(grad.dtype), None, None, None


class _ConstantStdLayerNorm(Function):
    """``out = F.layer_norm(x, ...)`` (computed outside, with its graph) whose backward holds each row's standard
    deviation constant; once plain, the gradient goes to ``out`` and through the layer norm's own graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, dims: Tuple[int, ...], weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, state: RuleState) -> Tensor:
        ctx.dims, ctx.eps, ctx.state = dims, eps, state
        ctx.save_for_backward(x, weight)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        if ctx.state.plain:
            return None, grad, None, None, None, None, None
        x, weight = ctx.saved_tensors
        dims = ctx.dims
        mean = x.mean(dim=dims, keepdim=True)
        std = ((x - mean).square().mean(dim=dims, keepdim=True) + ctx.eps).sqrt()
        scaled = grad if weight is None else grad * weight
        grad_x = (scaled - scaled.mean(dim=dims, keepdim=True)) / std
        lead = tuple(range(x.dim() - len(dims)))
        grad_weight = (grad * (x - mean) / std).sum(dim=lead) if ctx.needs_input_grad[3] else None
        grad_bias = grad.sum(dim=lead) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_weight, grad_bias, None, None


class _LinearInGradientForm(Operation):
    """A convolution or linear call whose backward applies an LRP rule written for relevance (``call.rule``) in the
    input x gradient form: the relevance at the output is the gradient reaching it times the output, and the
    gradient passed on is the rule's relevance at the input divided by the input (0 where the input is 0, as
    Chefer et al.'s guarded division).  The forward's output is kept for the rule (one product less per layer in
    the relevance pass), recomputed under ``create_graph`` (where it must be in the graph) or when it was changed in
    place."""

    keeps_output = True

    def __init__(self, call: LinearCall) -> None:
        self.call = call

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return self.call.compute(*tensors)

    def vector_jacobian(self, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                        grad: Tensor) -> Optional[Tuple[Optional[Tensor], ...]]:
        return self.call.vector_jacobian(tensors, needs, grad)

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        x, weight, bias = tensors
        out = None if create_graph else self.kept_output()
        if out is None:
            with torch.set_grad_enabled(create_graph):
                out = self.call(x, weight, bias)
        relevance = self.call.rule(self.call, x, weight, bias, grad * out, create_graph)
        return _guarded(relevance, x), None, None


class _ConservingSum(Operation):
    """A residual sum ``a + b`` with Chefer et al.'s rule, in the input x gradient form: each summand's relevance
    ``a * g`` is rescaled so that the summands share the output's total relevance in proportion to the absolute
    totals of their own, ``|sum a g| / (|sum a g| + |sum b g|)`` (totals per image: over all dimensions but
    ``batch_dim``).  Where the sum is exactly 0 nothing passes (their ``safe_divide(R, a + b)``: the relevance
    there, ``(a + b) g``, is 0, whatever gradient its consumers sent)."""

    def __init__(self, batch_dim: int = 0) -> None:
        self.batch_dim = batch_dim

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return tensors[0] + tensors[1]

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        a, b = tensors
        grad = torch.where(a + b == 0, 0.0, grad)
        dims = tuple(d for d in range(grad.dim()) if d != self.batch_dim)
        totals = [(t * grad).sum(dim=dims, keepdim=True) for t in (a, b)]
        both = totals[0] + totals[1]
        magnitude = totals[0].abs() + totals[1].abs()
        return tuple(grad * _guarded(total.abs() * both, magnitude * total) for total in totals)


def _guarded(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, 0 where the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0)


#: autograd nodes whose outputs are distinct parts of one tensor (``chunk``, ``split``, ``unbind``)
_SPLITS = ("Split", "Unbind")


def _elementwise_sources(t: Tensor, limit: int = 32) -> set:
    """The ``(autograd node, output)`` pairs ``t`` was computed from through elementwise operations and views, at
    most ``limit`` of them: a path stops at its first node that mixes entries (see :data:`_MIXING`) and at the
    outputs of splits, each output a source of its own (a GLU's ``act(x1) * x2`` from ``fc1(x).chunk(2)``
    multiplies distinct parts of one tensor)."""
    seen: set = set()
    stack = [(t.grad_fn, t.output_nr)]
    while stack and len(seen) < limit:
        node, output = stack.pop()
        if node is None or (node, output) in seen:
            continue
        seen.add((node, output))
        if not any(name in type(node).__name__ for name in _MIXING + _SPLITS):
            stack.extend(node.next_functions)
    return seen


def _gated(a: Tensor, b: Tensor) -> bool:
    """Whether ``a * b`` is a gate on a value: equal shapes, neither factor expanded (a stride 0 along a dimension
    longer than 1: ``s.expand_as(x)``), and neither computed from the other's entries (``x * sigmoid(x)``): the
    elementwise sources of the two share no node."""
    expanded = any(stride == 0 and size > 1 for t in (a, b) for stride, size in zip(t.stride(), t.shape))
    if a.shape != b.shape or expanded:
        return False
    return not (_elementwise_sources(a) & _elementwise_sources(b))


def _computed(t: Any) -> bool:
    """A tensor the forward computed (recorded by autograd), not a parameter or a view of one (``W.T``)."""
    return isinstance(t, Tensor) and t.requires_grad and not is_parameter(t)


#: in-place activations and their out-of-place forms
_OUT_OF_PLACE = {F.relu_: F.relu, torch.relu_: torch.relu, Tensor.relu_: torch.relu, F.hardtanh_: F.hardtanh,
                 F.leaky_relu_: F.leaky_relu, F.elu_: F.elu, F.threshold_: F.threshold, F.rrelu_: F.rrelu}


def _out_of_place(func: Any, args: Tuple[Any, ...], kwargs: dict) -> Tuple[Any, Tuple[Any, ...], dict, bool]:
    """``(function, args, kwargs, was_in_place)``: the call made out of place (function None when it cannot be)."""
    if func in _OUT_OF_PLACE:
        return _OUT_OF_PLACE[func], args, kwargs, True
    if kwargs.get("inplace") is True:
        return func, args, {**kwargs, "inplace": False}, True
    position = inplace_position(func)
    if position is not None and len(args) > position and args[position] is True:
        return func, args[:position] + (False,) + args[position + 1:], kwargs, True
    if getattr(func, "__name__", "").endswith("_"):
        return None, args, kwargs, True
    return func, args, kwargs, False


class TransformerLRPRules(TorchFunctionMode):
    """While active, a forward records the rules of the module docstring (``variant``: ``'attnlrp'`` or ``'cp'``).

    ``variant='chefer'``: Chefer et al.'s rules (their ViT's ``relprop``, see
    :class:`attribution.transformers.TransformerAttribution`): convolutions and linear layers LRP-alpha1-beta0 with
    the bias left out, residual sums of token sequences (B, N, D) :class:`_ConservingSum` (not sums of attention
    scores and a computed bias, BEiT's ``attn + rel_pos_bias``, which for one image have equal shapes), layer
    norms, softmaxes and elementwise activations the identity rule, AttnLRP's uniform rule on the attention
    products and gated products; the rest its plain gradient (LRP-0).
    """

    def __init__(self, variant: str, eps: float, explicit: bool = False, rows: Optional[int] = None,
                 scope: Optional[SequenceFirstScope] = None) -> None:
        super().__init__()
        if variant not in RULE_SETS:
            raise ValueError(f"variant must be one of {RULE_SETS}, got {variant!r}")
        #: ``explicit``: fused attention computed as ``softmax(q k^T) v`` (twice differentiable, for create_graph)
        #: ``rows``: the images of the forward (the dimension of that size is the batch in the per-image totals of
        #: the Chefer rules: the first, or the second in sequence-first layers, ``scope`` settling a tie; the caller
        #: enters the scope around the forward)
        self.variant, self.eps, self.explicit, self.rows = variant, eps, explicit, rows
        self.scope = scope if scope is not None else SequenceFirstScope(None)
        self.state = RuleState()
        self._alpha_beta = AlphaBeta(1.0, 0.0, stabilizer=1e-9, bias=False)

    def _attention_inputs(self, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        factors = (0.0, 0.0, 1.0) if self.variant == "cp" else (0.25, 0.25, 0.5)
        return tuple(_ScaleGradient.apply(t, f, self.state) for t, f in zip((q, k, v), factors))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tuple[Tensor, Tensor]:
        """Attention computed explicitly from the rule-carrying queries, keys and values (``nn.MultiheadAttention``
        and, under create_graph, the fused kernel: twice differentiable)."""
        out, probs, _ = explicit_attention(*self._attention_inputs(q, k, v), attn_mask, is_causal,
                                           softmax=self._softmax)
        return out, probs

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if self.variant == "chefer":
            routed = self._chefer(func, args, kwargs)
            if routed is not None:
                return routed
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            if self.explicit or self.variant == "chefer":  # the fused kernel's softmax has its plain gradient
                return self._sdpa_explicit(*args, **kwargs)
            q, k, v = self._attention_inputs(*args[:3])
            return func(q, k, v, *args[3:], **kwargs)
        if func is F.multi_head_attention_forward:
            return multi_head_attention(self._attend, *args, **kwargs)
        if func in _MATMULS and self.variant != "cp" and len(args) == 2 \
                and all(_computed(t) and t.dim() >= 3 for t in args):  # batched products of two computed tensors
            return _ScaleGradient.apply(func(*args, **kwargs), 0.5, self.state)
        if func in _MULS and self.variant != "cp" and len(args) == 2 and all(_computed(t) for t in args) \
                and _gated(*args):
            return _ScaleGradient.apply(func(*args, **kwargs), 0.5, self.state)
        if func in _SOFTMAX and self.variant == "cp" and args and isinstance(args[0], Tensor) and args[0].dim() == 4:
            return _ScaleGradient.apply(func(*args, **kwargs), 0.0, self.state)  # attention probabilities
        if func in _IDENTITY_RULE and args and _computed(args[0]):
            return self._identity_rule(func, args, kwargs)
        return func(*args, **kwargs)

    def _chefer(self, func: Any, args: Tuple[Any, ...], kwargs: dict) -> Optional[Tensor]:
        """The call under Chefer et al.'s rules where they differ from AttnLRP's (None elsewhere)."""
        if func in LINEAR_FUNCTIONS:
            kwargs = dict(kwargs)
            x, weight, bias, rest = linear_arguments(args, kwargs)
            call = LinearCall(func, rest, kwargs, self._alpha_beta)
            return route(_LinearInGradientForm(call), self.state, x, weight, bias)
        if (func in SUM_FUNCTIONS or func in IN_PLACE_SUM_FUNCTIONS) and len(args) == 2 and not kwargs \
                and all(_computed(t) for t in args) and args[0].shape == args[1].shape and args[0].dim() == 3:
            a = args[0]
            rule = _ConservingSum(batch_dimension(a, self.rows, self.scope.active))
            if func in SUM_FUNCTIONS:
                return route(rule, self.state, a, args[1])
            return a.copy_(route(rule, self.state, a.clone(), args[1]))  # ``a += b``
        if (func is F.layer_norm or func in _SOFTMAX) and args and _computed(args[0]):
            return self._identity_rule(func, args, kwargs)
        return None

    def _identity_rule(self, func: Any, args: Tuple[Any, ...], kwargs: dict) -> Tensor:
        """``f(x)`` with the identity rule; an in-place call gets it on a copy, written back into its input."""
        plain, args_out, kwargs_out, in_place = _out_of_place(func, args, kwargs)
        if plain is None:  # an in-place form without an out-of-place twin: its plain gradient
            return func(*args, **kwargs)
        x = args[0].clone() if in_place else args[0]
        out = plain(x, *args_out[1:], **kwargs_out)
        wide = torch.promote_types(x.dtype, torch.float32)  # 1e-10 vanishes in float16
        # 0 where the input is exactly 0 (Chefer et al.'s safe_divide): its relevance ``x g`` is 0 whatever ``g``,
        # and ``f(0) / eps`` (f(0) != 0 for the layer norms and softmaxes of the Chefer rules) would only carry a
        # gradient of about 1e9 into the sums before it, beyond float16's range (inf, then NaN); unchanged
        # elsewhere (the activations of AttnLRP's rules go through the origin: their ratio at 0 was 0 already)
        ratio = torch.where(x == 0, 0.0, out.to(wide) / (x.to(wide) + self.eps))
        result = _IdentityRule.apply(x, out, ratio, self.state)
        return args[0].copy_(result) if in_place else result

    def _sdpa_explicit(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                       enable_gqa: bool = False) -> Tensor:
        return explicit_attention(*self._attention_inputs(q, k, v), attn_mask, is_causal, scale, enable_gqa,
                                  self._softmax)[0]

    def _softmax(self, logits: Tensor) -> Tensor:
        """The attention's softmax: the identity rule under Chefer et al.'s rules, else its plain gradient."""
        if self.variant == "chefer":
            return self._identity_rule(Tensor.softmax, (logits,), {"dim": -1})
        return logits.softmax(dim=-1)

    def _layer_norm(self, input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                    bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
        out = F.layer_norm(input, normalized_shape, weight, bias, eps)
        dims = tuple(range(input.dim() - len(tuple(normalized_shape)), input.dim()))
        return _ConstantStdLayerNorm.apply(input, out, dims, weight, bias, eps, self.state)


@register("attn_lrp")
class AttnLRP(GradientExplainer):
    """AttnLRP (and CP-LRP): LRP through attention, layer norms and nonlinear activations, as input x gradient.

    Achtibat, Hatefi, Dreyer, Jain, Wiegand, Lapuschkin & Samek, "AttnLRP: Attention-Aware Layer-Wise Relevance
    Propagation for Transformers", ICML 2024, arXiv:2402.05602; ``variant='cp'``: Ali, Schnake, Eberle, Montavon,
    Mueller & Wolf, "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022,
    arXiv:2202.07304.

    ``R = x * g``, where ``g`` is the gradient of the target's score computed with the rules of
    :class:`TransformerLRPRules`: the identity rule on layer norms (standard deviation constant) and elementwise
    activations (``f(x) / (x + eps)`` in place of ``f'(x)``, ``eps=1e-10`` as LXT), and in attention either the
    uniform rule on the products of two computed tensors (``'attnlrp'``, the default: the gradients reaching the
    queries and keys divided by 4, the values' by 2) or constant attention probabilities (``'cp'``); with
    ``'attnlrp'``, gated products (two computed tensors of the same shape computed apart: SwiGLU MLPs) share the
    relevance equally too.  Linear layers get LRP-0 (their plain gradient); the start relevance is the explained
    score itself, so ``sum R`` approximates it (exactly where no bias or constant absorbs relevance).  Equal to
    LXT's patches on torchvision's ViT (both variants); works on timm's fused and unfused attention alike and on
    any model (on a ReLU network without layer norms it is input x gradient).  Deliberate difference: LXT tunes
    ViTs with zennit's gamma rule on the linear layers; here they keep LRP-0.  Cost: one forward and one backward.
    """

    argmax_on_rows = True
    plain_after_rules = True
    defaults = {"variant": "attnlrp", "eps": 1e-10}

    def _explain(self, x: Tensor, target: Target, *, variant: str, eps: float, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self._rules = (variant, float(eps), create_graph)  # fused kernels have no second derivative
        try:
            return x * self._gradient_at_input(x, target, batch_size, create_graph)
        finally:
            for name in ("_rules", "_mode"):
                self.__dict__.pop(name, None)

    def _backward_rules(self) -> TransformerLRPRules:
        self._mode = TransformerLRPRules(*self._rules)
        return self._mode
