"""Relevance propagation without hooks: a forward whose linear operations carry their own backward rules.

While a :class:`RuleMode` (a :class:`torch.overrides.TorchFunctionMode`) is active around a model's forward, the
operations that relevance-propagation methods treat specially are computed by autograd functions whose backward
applies a rule instead of the chain rule; everything else keeps its plain gradient.  The model is not touched: no
module is replaced, no hook is registered, and nothing outlives the forward's graph.

* convolutions (``F.conv1d/2d/3d``) and ``F.linear``: :class:`LinearCall` records the call, its backward maps the
  relevance ``R`` at the output to relevance at the input with the call's :data:`LinearRule`;
* average pooling (plain and adaptive): :class:`Norm`, ``x * pool*(R / d(pool(x)))``;
* the sum of two same-shaped tensors (residual connections, also ``a += b``): ``a * R / d(a + b)`` and
  ``b * R / d(a + b)``;
* ``F.batch_norm``: the relevance passes unchanged; with ``fold_batch_norm``, a batch norm in eval mode whose input
  is the output of the forward's previous convolution or linear call is folded into that call's rule (the pair is
  one affine layer, as zennit's ``SequentialMergeBatchNorm`` canonizer makes it);
* with ``pass_activations``, elementwise activations (ReLU, ReLU6 / Hardtanh, LeakyReLU, ELU, GELU, SiLU, sigmoid,
  tanh, ...): the relevance passes unchanged (zennit's ``Pass`` rule).

``d`` is a denominator guarding the division (:func:`stabilize` for LRP).  Used by LRP
(:mod:`attribution.gradients.lrp`) and excitation backprop (:mod:`attribution.cam.excitation_backprop`, LRP's
``z+`` rule with unit start relevance and TorchRay's guards).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

#: a linear call's backward rule: ``rule(call, x, weight, bias, relevance, create_graph)`` -> relevance at ``x``;
#: ``weight`` and ``bias`` are the call's own, with a folded batch norm already merged into them
LinearRule = Callable[["LinearCall", Tensor, Tensor, Optional[Tensor], Tensor, bool], Tensor]
Denominator = Callable[[Tensor], Tensor]

LINEAR_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.linear)
POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                  F.adaptive_avg_pool3d)
#: means over feature dimensions written as tensor methods (``x.mean((2, 3))`` in torchvision's ShuffleNetV2 and
#: MNASNet, ``x.mean((1, 2))`` in timm's NHWC heads, ``x[:, 1:].mean(1)`` in BEiT's token pooling): average pooling
MEAN_FUNCTIONS = (torch.mean, Tensor.mean)
SUM_FUNCTIONS = (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
IN_PLACE_SUM_FUNCTIONS = (Tensor.add_, Tensor.__iadd__)  # ``out += identity`` in torchvision's residual blocks
#: the elementwise activations given the pass rule: the functional forms of zennit's ``Activation`` modules
ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.relu6, F.hardtanh, F.hardtanh_,
    F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.gelu, F.silu, F.softplus, F.hardswish,
    F.hardsigmoid, F.sigmoid, torch.sigmoid, Tensor.sigmoid, F.tanh, torch.tanh, Tensor.tanh, F.logsigmoid,
    F.hardshrink, F.softshrink, F.softsign, F.tanhshrink, F.threshold, F.threshold_, F.rrelu, F.rrelu_, F.prelu,
)
BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def inplace_position(func: Callable[..., Any]) -> Optional[int]:
    """The position of ``func``'s ``inplace`` parameter, if it has one."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


_INPLACE_POSITION: Dict[Any, Optional[int]] = {func: inplace_position(func) for func in ACTIVATION_FUNCTIONS}


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (zennit's stabiliser: never zero, same sign as ``z``)."""
    return z + eps * ((z == 0).to(z) + z.sign())


def widened(t: Tensor) -> Tensor:
    """``t`` in float32 when it is half precision (a rule's divisions overflow there), else itself; in the graph."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def differentiable(t: Tensor, create_graph: bool) -> Tensor:
    """An alias of ``t`` in the graph when the rule's result must stay differentiable (``create_graph``) and ``t``
    is in the graph, otherwise a detached copy that autograd can differentiate against.  The alias is a new node,
    so that a gradient w.r.t. it counts only the paths through the rule's own computation (not, at ``a + b`` where
    ``b`` was computed from ``a``, the path through ``b``)."""
    return t.view_as(t) if create_graph and t.requires_grad else t.detach().requires_grad_(True)


class RuleState:
    """Shared by one forward's rerouted operations: while ``plain`` is False their backward applies the rules; once
    the relevance pass is done, setting it makes them differentiate plainly, so that a map computed with
    ``create_graph`` has the true derivative w.r.t. the parameters (zennit's ``Composite.inactive``)."""

    __slots__ = ("plain", "parameters")

    def __init__(self) -> None:
        self.plain = False
        #: False while a plain pass asks only for activations' gradients (a method's own second pass): the
        #: parameters' gradients are then skipped (one product per linear layer)
        self.parameters = True


class Operation:
    """One rerouted call: ``compute(*tensors)`` is the forward, ``relevance(tensors, grad, create_graph)`` the
    rule's backward (one entry per tensor).  An operation whose rule reads its forward's output sets
    ``keeps_output``: :class:`_Routed` then keeps a detached alias of it (:meth:`kept_output`)."""

    keeps_output = False
    _output: Optional[Tensor] = None
    _output_version = -1

    def keep_output(self, out: Tensor) -> None:
        """Keep a detached alias of the forward's output (it shares the output's storage and version counter, and
        holds no graph: no reference cycle through the autograd node)."""
        self._output, self._output_version = out.detach(), out._version

    def kept_output(self) -> Optional[Tensor]:
        """The forward's output as it was computed, or None when none was kept or it has since been changed in
        place (its version moved): the caller recomputes it then."""
        out = self._output
        return out if out is not None and out._version == self._output_version else None

    state: RuleState

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        raise NotImplementedError

    def vector_jacobian(self, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                        grad: Tensor) -> Optional[Tuple[Optional[Tensor], ...]]:
        """The plain vector-Jacobian product written out (one entry per tensor, None where not ``needs``), or None
        when the operation has no closed form here and :func:`_plain` recomputes its forward to differentiate it."""
        return None


class LinearCall(Operation):
    """One convolution or ``F.linear`` call of the forward: the function and its other arguments, the rule its
    backward applies (read at backward time, so it may be swapped after the forward), and the eval-mode batch
    norm folded into it, if any (``running_mean, running_var, weight, bias, eps``)."""

    def __init__(self, fn: Callable[..., Tensor], rest: Tuple[Any, ...], kwargs: Dict[str, Any],
                 rule: LinearRule) -> None:
        self.fn, self.rest, self.kwargs, self.rule = fn, rest, kwargs, rule
        self.norm: Optional[Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], float]] = None

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return self(*tensors)

    def __call__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The call's function on ``x`` with other parameters (its stride, padding, groups as recorded), computed
        in ``x``'s dtype (autocast's choice in the forward)."""
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        return self.fn(x, weight, bias, *self.rest, **self.kwargs)

    def parameters(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """The weight and bias with the folded batch norm merged in: ``W * s`` and ``(b - mean) * s + beta`` with
        ``s = gamma / sqrt(var + eps)``, per output channel (zennit's ``MergeBatchNorm``)."""
        if self.norm is None:
            return weight, bias
        mean, var, gamma, beta, eps = self.norm
        scale = (var + eps) ** -0.5 if gamma is None else gamma / (var + eps) ** 0.5
        merged = weight * scale.view((-1,) + (1,) * (weight.dim() - 1))
        shift = (torch.zeros_like(mean) if bias is None else bias) - mean
        shift = shift * scale + (0 if beta is None else beta)
        return merged, shift

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        x, weight, bias = tensors
        return self.rule(self, x, *self.parameters(weight, bias), grad, create_graph), None, None

    def vector_jacobian(self, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                        grad: Tensor) -> Optional[Tuple[Optional[Tensor], ...]]:
        """``F.linear``'s: ``g W``, ``g^T x`` and the sum of ``g`` over the leading dimensions (one product each,
        where recomputing the forward to differentiate it costs one more); convolutions return None."""
        if self.fn is not F.linear or self.rest or self.kwargs:
            return None
        x, weight, bias = tensors
        grad = grad.to(x.dtype)
        rows = grad.reshape(-1, grad.shape[-1])
        return (grad @ weight.to(x.dtype) if needs[0] else None,
                (rows.T @ x.reshape(-1, x.shape[-1])).to(weight.dtype) if needs[1] else None,
                rows.sum(dim=0).to(bias.dtype) if bias is not None and needs[2] else None)


class Norm:
    """The rule of a sum-like operation ``f`` (pooling, a sum): ``x * f*(R / d(f(x)))``, the relevance shared in
    proportion to the inputs' contributions, differentiable w.r.t. ``x`` under ``create_graph``; computed in
    float32 for half-precision inputs."""

    def __init__(self, denominator: Denominator) -> None:
        self.denominator = denominator

    def __call__(self, fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, create_graph: bool) -> Tensor:
        local = widened(differentiable(x, create_graph))
        out = fn(local)
        (spread,) = torch.autograd.grad(out, local, grad.to(out.dtype) / self.denominator(out),
                                        create_graph=create_graph)
        return (local * spread).to(x.dtype)


class _Pool(Operation):
    """Average pooling with the :class:`Norm` rule."""

    def __init__(self, fn: Callable[..., Tensor], rest: Tuple[Any, ...], kwargs: Dict[str, Any], rule: Norm) -> None:
        self.fn, self.rest, self.kwargs, self.rule = fn, rest, kwargs, rule

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return self.fn(*tensors, *self.rest, **self.kwargs)

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        return (self.rule(self.compute, tensors[0], grad, create_graph),)


class PassThrough(Operation):
    """A call (batch norm, an activation) whose relevance passes unchanged to its first argument; its tensor
    arguments, positional or keyword, are the routed function's inputs (so that its plain derivative reaches a
    batch norm's parameters), the others are kept as they are.  ``copy``: the call would work in place, it runs on
    a copy of its input."""

    def __init__(self, fn: Callable[..., Tensor], args: Sequence[Any], kwargs: Dict[str, Any], copy: bool) -> None:
        self.fn, self.args, self.kwargs, self.copy = fn, list(args), dict(kwargs), copy
        self.slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        self.keys = [k for k, v in kwargs.items() if isinstance(v, Tensor)]

    def tensors(self) -> List[Tensor]:
        return [self.args[i] for i in self.slots] + [self.kwargs[k] for k in self.keys]

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        args, kwargs = list(self.args), dict(self.kwargs)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        for k, t in zip(self.keys, tensors[len(self.slots):]):
            kwargs[k] = t
        if self.copy:
            args[0] = args[0].clone()
        return self.fn(*args, **kwargs)

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        return (grad,) + (None,) * (len(tensors) - 1)


class _Sum(Operation):
    """``a + b`` whose relevance is shared in proportion: ``a * R / d(a + b)``, ``b * R / d(a + b)``."""

    def __init__(self, denominator: Denominator) -> None:
        self.denominator = denominator

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return tensors[0] + tensors[1]

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        a, b = tensors
        share = grad / self.denominator(a + b)
        return a * share, b * share


def _plain(operation: Operation, tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
           grad: Tensor) -> Tuple[Optional[Tensor], ...]:
    """The operation's true vector-Jacobian product (differentiable in turn under ``create_graph``); parameters get
    none while the state says the pass does not need them (``state.parameters``)."""
    create_graph = torch.is_grad_enabled()
    if not operation.state.parameters:
        needs = [need and not is_parameter(t) for t, need in zip(tensors, needs)]
    direct = operation.vector_jacobian(tensors, needs, grad)
    if direct is not None:
        return direct
    with torch.enable_grad():
        inputs = [differentiable(t, create_graph) if t is not None and need else t for t, need in zip(tensors, needs)]
        out = operation.compute(*inputs)
        wanted = [t for t, need in zip(inputs, needs) if t is not None and need]
        found = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=create_graph,
                                         allow_unused=True))
    return tuple(next(found) if t is not None and need else None for t, need in zip(inputs, needs))


#: the attribute that marks a tensor standing in for a parameter (NoiseGrad's noisy weights, passed through
#: ``torch.func.functional_call``): the rules treat it as the parameter
PARAMETER_VALUE = "_attribution_parameter_value"


class SequenceFirstScope:
    """Context manager: :attr:`active` while the forward runs inside a *sequence-first block*, a module holding an
    ``nn.MultiheadAttention`` built with ``batch_first=False`` as a direct child (``nn.TransformerEncoderLayer``'s
    default), whose tensors are (tokens, batch, features).  Forward hooks on those blocks, removed on exit."""

    def __init__(self, model: Optional[torch.nn.Module]) -> None:
        self.blocks = [] if model is None else [
            m for m in model.modules()
            if any(isinstance(c, torch.nn.MultiheadAttention) and not c.batch_first for c in m.children())]
        self.depth = 0
        self._handles: List[Any] = []

    def __enter__(self) -> "SequenceFirstScope":
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter_block))
            self._handles.append(block.register_forward_hook(self._leave_block))
        return self

    def _enter_block(self, module: Any, args: Any) -> None:
        self.depth += 1

    def _leave_block(self, module: Any, args: Any, output: Any) -> None:
        self.depth -= 1

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.depth = 0

    @property
    def active(self) -> bool:
        return self.depth > 0


def batch_dimension(values: Tensor, rows: Optional[int], seq_first: bool = False) -> int:
    """The dimension of ``values`` that holds the pass's ``rows`` images: the first, or the second when only the
    second has that size (a sequence-first block's tokens).  When both have it, the second for 3-D tensors inside a
    sequence-first block (``seq_first``: :attr:`SequenceFirstScope.active`), else the first."""
    if values.dim() < 2 or values.shape[1] != rows:
        return 0
    if values.shape[0] != rows:
        return 1
    return 1 if seq_first and values.dim() == 3 else 0


def is_parameter(t: Any) -> bool:
    """Whether ``t`` is a parameter, a tensor standing in for one (marked :data:`PARAMETER_VALUE`), or a view of
    either (``in_proj_weight.chunk(3)``, ``W.T``)."""
    while isinstance(t, Tensor):
        if isinstance(t, torch.nn.Parameter) or getattr(t, PARAMETER_VALUE, False):
            return True
        t = t._base
    return False


class ScopedRules(TorchFunctionMode):
    """A function mode whose rules need to know where the batch lies: ``scope`` (a :class:`SequenceFirstScope`,
    by default one that never activates) runs for as long as the mode does."""

    def __init__(self, scope: Optional[SequenceFirstScope] = None) -> None:
        super().__init__()
        self.scope = scope if scope is not None else SequenceFirstScope(None)

    def __enter__(self) -> "ScopedRules":
        self.scope.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self.scope.__exit__(*exc)


class _Routed(torch.autograd.Function):
    """``operation.compute(*tensors)`` whose backward is the operation's rule (its true derivative once its
    state is ``plain``)."""

    @staticmethod
    def forward(ctx: Any, operation: Operation, *tensors: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(*tensors)
        ctx.operation = operation
        out = operation.compute(*tensors)
        out = out.clone() if out._is_view() else out  # a view could not be changed in place (``h += x``)
        if operation.keeps_output:
            operation.keep_output(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        tensors, operation = ctx.saved_tensors, ctx.operation
        if operation.state.plain:
            return (None,) + _plain(operation, tensors, ctx.needs_input_grad[1:], grad)
        create_graph = torch.is_grad_enabled()  # True in a backward with create_graph=True
        with torch.enable_grad():
            relevance = operation.relevance(tensors, grad, create_graph)
        if not create_graph:  # the rules ran with gradients on (they differentiate modified forwards)
            relevance = tuple(None if r is None else r.detach() for r in relevance)
        return (None,) + tuple(relevance)


def route(operation: Operation, state: RuleState, *tensors: Optional[Tensor]) -> Tensor:
    """``operation.compute(*tensors)``, recorded with the operation's rule as its backward (plain once ``state``
    is)."""
    operation.state = state
    return _Routed.apply(operation, *tensors)


def linear_arguments(args: Sequence[Any], kwargs: Dict[str, Any]) -> Tuple[Tensor, Tensor, Optional[Tensor],
                                                                           Tuple[Any, ...]]:
    """``x, weight, bias, rest`` of a convolution or linear call (``weight`` and ``bias`` popped from ``kwargs``)."""
    padded = list(args[1:3]) + [None] * (3 - len(args))
    weight, bias = kwargs.pop("weight", padded[0]), kwargs.pop("bias", padded[1])
    return args[0], weight, bias, tuple(args[3:])


class RuleMode(TorchFunctionMode):
    """While active, the forward records relevance rules (see the module docstring).

    ``linear_rule(func)`` gives the rule of each convolution or linear call, in forward order; ``pool`` is the
    rule of average pooling; ``sum_denominator`` guards the division at sums; ``fold_batch_norm`` folds an eval-mode
    batch norm into the convolution or linear call whose output it normalises; ``pass_activations`` lets the
    relevance pass elementwise activations unchanged (otherwise they keep their plain gradient).  ``state.plain``
    turns every recorded operation's backward into its true derivative (see :class:`RuleState`).
    """

    def __init__(self, linear_rule: Callable[[Callable[..., Tensor]], LinearRule], pool: Norm,
                 sum_denominator: Denominator, fold_batch_norm: bool = False, pass_activations: bool = False,
                 pass_norms: bool = False) -> None:
        super().__init__()
        self.linear_rule, self.pool, self.sum_denominator = linear_rule, pool, sum_denominator
        self.fold_batch_norm, self.pass_activations, self.pass_norms = fold_batch_norm, pass_activations, pass_norms
        self.state = RuleState()
        self.calls: List[LinearCall] = []
        self.folded = 0
        self._last_output: Optional[Tensor] = None  # the previous linear call's output, for batch-norm folding

    def _route(self, operation: Operation, *tensors: Optional[Tensor]) -> Tensor:
        return route(operation, self.state, *tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func in LINEAR_FUNCTIONS:
            x, weight, bias, rest = linear_arguments(args, kwargs)
            call = LinearCall(func, rest, kwargs, self.linear_rule(func))
            self.calls.append(call)
            out = self._route(call, x, weight, bias)
            self._last_output = out
            return out
        if func in POOL_FUNCTIONS or (func in MEAN_FUNCTIONS and _pooling_mean(args, kwargs)):
            return self._route(_Pool(func, tuple(args[1:]), kwargs, self.pool), args[0])
        if self.pass_norms and func in (F.layer_norm, F.group_norm) and args and _activation(args[0]):
            operation = PassThrough(func, args, kwargs, copy=False)  # as a batch norm that is not folded
            return self._route(operation, *operation.tensors())
        if func is F.batch_norm:
            if self.fold_batch_norm:
                self._fold(args, kwargs)
            operation = PassThrough(func, args, kwargs, copy=False)
            return self._route(operation, *operation.tensors())
        if self.pass_activations and func in ACTIVATION_FUNCTIONS and args and isinstance(args[0], Tensor) \
                and args[0].is_floating_point():
            plain = OUT_OF_PLACE.get(func, func)
            operation = PassThrough(plain, args, kwargs, copy=in_place_call(func, args, kwargs))
            return self._route(operation, *operation.tensors())
        if (func in SUM_FUNCTIONS or func in IN_PLACE_SUM_FUNCTIONS) and len(args) == 2 and not kwargs \
                and all(_activation(a) for a in args) and args[0].shape == args[1].shape \
                and args[0].is_floating_point() and args[0].dim() > 0:
            operation = _Sum(self.sum_denominator)
            if func in SUM_FUNCTIONS:
                return self._route(operation, args[0], args[1])
            # in place: the sum of a copy (so that the rule sees the summand's value), written back
            return args[0].copy_(self._route(operation, args[0].clone(), args[1]))
        return func(*args, **kwargs)

    def _fold(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
        """Fold an eval-mode batch norm whose input is the previous linear call's output into that call."""
        bound = dict(zip(BATCH_NORM_ARGS, args), **kwargs)
        x, mean, var = bound["input"], bound.get("running_mean"), bound.get("running_var")
        if x is not self._last_output or not self.calls or self.calls[-1].norm is not None \
                or bound.get("training", False) or mean is None or var is None:
            return
        call = self.calls[-1]
        if call.fn is F.linear and x.dim() != 2:  # BatchNorm1d on (N, L, C) normalises L, not the features
            return
        if x.dim() < 2 or mean.numel() != x.shape[1]:
            return
        call.norm = (mean, var, bound.get("weight"), bound.get("bias"), float(bound.get("eps", 1e-5)))
        self.folded += 1


def _pooling_mean(args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether a ``mean`` call averages a computed floating-point tensor over some of its dimensions, never the
    batch's (the first): global average pooling, as ``adaptive_avg_pool`` computes it."""
    if not args or not _activation(args[0]) or not args[0].is_floating_point():
        return False
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dims is None:
        return False
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return len(dims) > 0 and all(d % args[0].dim() != 0 for d in dims)


def _activation(t: Any) -> bool:
    """Whether ``t`` is something the forward computed (or its input), not a parameter or a buffer: a sum of two
    such is a residual connection; ``x + pos_embed`` is not (it has ``x``'s shape only for one image)."""
    return isinstance(t, Tensor) and t.requires_grad and not is_parameter(t)


#: in-place activations and the out-of-place functions they are computed by
OUT_OF_PLACE = {F.relu_: F.relu, torch.relu_: torch.relu, Tensor.relu_: torch.relu, F.hardtanh_: F.hardtanh,
                 F.leaky_relu_: F.leaky_relu, F.elu_: F.elu, F.threshold_: F.threshold, F.rrelu_: F.rrelu}


def in_place_call(func: Callable[..., Tensor], args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """Whether a call of an out-of-place activation asks to work in place (its ``inplace`` argument)."""
    position = _INPLACE_POSITION.get(func)
    if bool(kwargs.get("inplace", False)):
        return True
    return position is not None and len(args) > position and bool(args[position])

