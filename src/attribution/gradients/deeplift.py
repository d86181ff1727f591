"""DeepLIFT with the Rescale rule: gradients whose nonlinearities pass on difference quotients.

As for guided backprop, a :class:`torch.overrides.TorchFunctionMode` that lives only during the model's forward
reroutes the model's elementwise nonlinearities and 2-D max pooling through autograd functions with DeepLIFT's
backward.  The images and their baselines run in one batch (images first), so each function sees both halves: its
backward replaces the local derivative by ``(f(x) - f(x')) / (x - x')`` (the plain derivative where
``|x - x'| < eps``).  The halves are split along the tensor's batch dimension: the first, or the second in
sequence-first layers (:func:`~attribution.core.rules.batch_dimension`).  In-place calls (``h.relu_()``,
``nn.ReLU(inplace=True)``) are computed out of place and written back into their argument, so the model sees its
own values.  No module is replaced and no hook is registered.

With ``create_graph`` the map must be differentiable with respect to the parameters, and the rules' own backward
must not stand in for the true derivative there.  So each pass runs the model twice: a plain forward that records,
call by call, the nonlinearities' true inputs and outputs (in their true graph), then the rule pass, in which the
k-th call returns the true output plus a zero-valued term whose backward is the rule, with its multipliers
computed from the recorded tensors: ``y = y_k + R(z - z_k)``.  The input gradient is DeepLIFT's, and the
derivative of every value and multiplier with respect to the parameters is the true one.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import non_negative_number
from ..core.registry import register
from ..core.rules import ScopedRules, SequenceFirstScope, batch_dimension, inplace_position, widened
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .expected import reference_set
from .paths import BaselineSpec, make_baseline

#: elementwise nonlinearities given the Rescale rule, each with the out-of-place function it computes
_ELEMENTWISE: Dict[Callable[..., Any], Callable[..., Any]] = {
    F.relu: F.relu, F.relu_: F.relu, torch.relu: F.relu, torch.relu_: F.relu, Tensor.relu: F.relu,
    Tensor.relu_: F.relu, F.relu6: F.relu6, F.hardtanh: F.hardtanh, F.hardtanh_: F.hardtanh,
    F.leaky_relu: F.leaky_relu, F.leaky_relu_: F.leaky_relu, F.elu: F.elu, F.elu_: F.elu, F.selu: F.selu,
    F.celu: F.celu, F.gelu: F.gelu, F.silu: F.silu, F.mish: F.mish, F.softplus: F.softplus,
    F.hardswish: F.hardswish, F.hardsigmoid: F.hardsigmoid, F.sigmoid: torch.sigmoid, torch.sigmoid: torch.sigmoid,
    Tensor.sigmoid: torch.sigmoid, F.tanh: torch.tanh, torch.tanh: torch.tanh, Tensor.tanh: torch.tanh,
}
#: the in-place forms (by name); the others work in place when their ``inplace`` argument says so
_IN_PLACE = {F.relu_, torch.relu_, Tensor.relu_, F.hardtanh_, F.leaky_relu_, F.elu_}
_INPLACE_POSITION = {func: inplace_position(func) for func in _ELEMENTWISE if func not in _IN_PLACE}
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def out_of_place(func: Callable[..., Any], args: tuple, kwargs: Dict[str, Any]) -> Tuple[bool, tuple, Dict[str, Any]]:
    """Whether an elementwise call works in place, and the arguments after its input for the out-of-place function
    (without the ``inplace`` flag, positional or named)."""
    kwargs = dict(kwargs)
    inplace = func in _IN_PLACE or bool(kwargs.pop("inplace", False))
    rest = args[1:]
    position = _INPLACE_POSITION.get(func)
    if position is not None and len(args) > position:
        inplace = inplace or bool(args[position])
        rest = args[1:position] + args[position + 1:]
    return inplace, rest, kwargs


def _both_halves(t: Tensor, dim: int = 0) -> Tensor:
    """``t``'s first half minus its second (images minus baselines) along ``dim``, repeated for both halves."""
    first, second = t.chunk(2, dim)
    difference = first - second
    return torch.cat([difference, difference], dim)


def _halves_times(grad: Tensor, shared: Tensor, dim: int) -> Tensor:
    """``grad`` times ``shared`` (shaped like one half of ``grad`` along ``dim``) in both halves."""
    shape = grad.shape[:dim] + (2, grad.shape[dim] // 2) + grad.shape[dim + 1:]
    return (grad.reshape(shape) * shared.unsqueeze(dim)).reshape(grad.shape)


Autocast = Tuple[str, Optional[torch.dtype]]


def autocast_of(t: Tensor) -> Autocast:
    """The autocast state on ``t``'s device (its type, and its dtype when enabled), to compute again as before."""
    kind = t.device.type
    return kind, torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _again(fn: Callable[[Tensor], Tensor], x: Tensor, autocast: Autocast) -> Tensor:
    """``fn(x)`` under the autocast state ``autocast`` (a backward runs outside the forward's)."""
    kind, dtype = autocast
    if dtype is None:
        return fn(x)
    with torch.autocast(kind, dtype=dtype):
        return fn(x)


def _plain_derivative(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Tensor:
    """``grad`` times the derivative of ``fn`` at ``x``; differentiable (w.r.t. ``x`` and ``grad``) when grad mode
    is on, as in a backward with ``create_graph``."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        local = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
        (plain,) = torch.autograd.grad(fn(local), local, grad, create_graph=create_graph)
    return plain


def rescale_backward(grad: Tensor, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float, dim: int,
                     autocast: Autocast, y: Optional[Tensor] = None) -> Tensor:
    """The Rescale rule: ``grad`` times ``(f(x) - f(x')) / (x - x')`` in both halves (``x``: the function's input,
    images then baselines along ``dim``; ``y``: ``f(x)`` as the forward computed it, or None when the forward
    changed it in place since, and then ``f(x)`` is computed again under the forward's ``autocast``), the plain
    derivative where ``|x - x'| < eps`` (compared in float32 at least: 1e-10 is 0 in float16)."""
    y = _again(fn, x, autocast) if y is None else y
    (x_in, x_ref), (y_in, y_ref) = x.chunk(2, dim), y.chunk(2, dim)
    delta_in = x_in - x_ref
    small = widened(delta_in.abs()) < eps
    rescaled = _halves_times(grad, (y_in - y_ref) / delta_in.masked_fill(small, 1.0), dim)
    if not bool(small.any()):  # the usual case: no derivative needed
        return rescaled
    # the function is elementwise: its derivative is taken at the tied entries alone
    tied = torch.cat([small, small], dim)
    plain = _plain_derivative(lambda t: _again(fn, t, autocast), x[tied], grad[tied])
    return rescaled.masked_scatter(tied, plain.to(rescaled.dtype))


def _pooled(x: Tensor, indices: Tensor) -> Tensor:
    """The max-pooled values of ``x`` (N, C, H, W) at their arg-max ``indices`` (N, C, h, w)."""
    return x.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)


def max_pool_backward(grad: Tensor, x: Tensor, indices: Tensor, eps: float) -> Tensor:
    """Captum's rule for 2-D max pooling (see :class:`_MaxPoolRescale`), images then baselines along dim 0."""
    out, out_ref = _pooled(x, indices).chunk(2)
    cross = torch.maximum(out, out_ref)
    delta_out = torch.cat([cross - out_ref, out - cross])
    routed = _route(grad * delta_out, indices, x)
    first, second = routed.chunk(2)
    routed = torch.cat([first + second, first + second])
    delta_in = _both_halves(x)
    small = widened(delta_in.abs()) < eps  # divided by 1 there, so that a double backward meets no 0 / 0
    return torch.where(small, _route(grad, indices, x), routed / delta_in.masked_fill(small, 1.0))


class _Rescale(torch.autograd.Function):
    """Forward: ``fn(x)``.  Backward: :func:`rescale_backward`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float, dim: int) -> Tensor:
        ctx.fn, ctx.eps, ctx.dim, ctx.autocast = fn, eps, dim, autocast_of(x)
        ctx.save_for_backward(x)
        y = fn(x)
        # a detached alias (no reference cycle through the output's graph) whose version tells an in-place change
        ctx.kept, ctx.kept_version = y.detach(), y._version
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        kept = ctx.kept if ctx.kept._version == ctx.kept_version else None
        return rescale_backward(grad, x, ctx.fn, ctx.eps, ctx.dim, ctx.autocast, kept), None, None, None


class _RescaleTerm(torch.autograd.Function):
    """Forward: zeros shaped like ``offset``.  Backward (to ``offset`` only): :func:`rescale_backward` at the true
    pass's input ``x``, saved in its graph, so that a backward with ``create_graph`` records the multipliers as
    functions of the parameters through the true forward."""

    @staticmethod
    def forward(ctx: Any, offset: Tensor, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float, dim: int) -> Tensor:
        ctx.fn, ctx.eps, ctx.dim, ctx.autocast = fn, eps, dim, autocast_of(x)
        ctx.save_for_backward(x)
        return torch.zeros_like(offset)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        return (rescale_backward(grad, x, ctx.fn, ctx.eps, ctx.dim, ctx.autocast),) + (None,) * 4


class _MaxPoolRescale(torch.autograd.Function):
    """2-D max pooling with the rule Captum's DeepLift applies to it: the output differences, split at the
    elementwise maximum of the image's and the baseline's outputs, are routed back through both halves' arg-max
    positions and divided by the input difference (the plain gradient where it is below ``eps``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                eps: float) -> Tensor:
        y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.eps = eps
        ctx.save_for_backward(x, indices)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, indices = ctx.saved_tensors
        return (max_pool_backward(grad, x, indices, ctx.eps),) + (None,) * 6


class _MaxPoolTerm(torch.autograd.Function):
    """Forward: zeros shaped like the pooled output.  Backward (to ``offset`` only): :func:`max_pool_backward` at the true
    pass's input and arg-max positions (as :class:`_RescaleTerm`)."""

    @staticmethod
    def forward(ctx: Any, offset: Tensor, x: Tensor, indices: Tensor, eps: float) -> Tensor:
        ctx.eps = eps
        ctx.save_for_backward(x, indices)
        return offset.new_zeros(indices.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, indices = ctx.saved_tensors
        return (max_pool_backward(grad, x, indices, ctx.eps),) + (None,) * 3


def _route(values: Tensor, indices: Tensor, x: Tensor) -> Tensor:
    """``values`` of the pooled outputs added at their arg-max positions in a zero tensor shaped like ``x`` (an
    input that is the maximum of several overlapping windows receives all of theirs; ``max_unpool2d``, which
    Captum uses, keeps one of them)."""
    flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=values.dtype, device=values.device)
    return flat.scatter_add(2, indices.flatten(2), values.flatten(2)).view_as(x)


class RescaleRules(ScopedRules):
    """While active, elementwise nonlinearities and 2-D max pooling get DeepLIFT's backward (the batch must hold
    the images, then their baselines, along its batch dimension).

    :attr:`rows` is the pass's row count (given, or set by the explainer pass by pass): a call gets the rule when its input's batch
    dimension (:func:`~attribution.core.rules.batch_dimension`; ``scope`` settles a tie in sequence-first blocks)
    is a multiple of it (a batch folded image-major, e.g. windows, keeps the halves apart); other calls (on
    parameters alone, or with the batch elsewhere) keep their plain gradient and are counted in :attr:`skipped`.
    :meth:`record` and :meth:`replay` switch to the two passes of ``create_graph`` (see the module docstring).
    """

    def __init__(self, eps: float, scope: Optional[SequenceFirstScope] = None, rows: Optional[int] = None) -> None:
        super().__init__(scope)
        self.eps = eps
        self.rows = rows
        self.calls = 0
        self.skipped = 0
        self.state = "rule"  # 'rule': one pass; 'record' / 'replay': the true pass and the rule pass
        self.records: List[Tuple[Tensor, ...]] = []
        self.position = 0

    def record(self) -> None:
        self.state, self.records, self.position = "record", [], 0

    def replay(self) -> None:
        self.state, self.position = "replay", 0

    def single(self) -> None:
        self.state, self.records, self.position = "rule", [], 0

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if exc[0] is None and self.state == "replay" and self.position != len(self.records):
            raise RuntimeError(self._mismatch())

    def _mismatch(self) -> str:
        return (f"DeepLift with create_graph: the model's two forwards of one pass made different nonlinearity "
                f"calls ({len(self.records)} in the first); its forward must not depend on anything but its input")

    def _dimension(self, x: Any) -> Optional[int]:
        """The batch dimension of a nonlinearity's input when the rule applies to it, else None."""
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or not self.rows:
            return None
        dim = batch_dimension(x, self.rows, self.scope.active)
        if x.shape[dim] % self.rows:
            if self.state != "record":
                self.skipped += 1
            return None
        return dim

    def _next_record(self) -> Tuple[Tensor, ...]:
        """The next call's true input (and arg-max positions), which must not have changed since it was recorded."""
        if self.position >= len(self.records):
            raise RuntimeError(self._mismatch())
        self.position += 1
        *tensors, version = self.records[self.position - 1]
        if tensors[0]._version != version:
            raise RuntimeError("DeepLift with create_graph: the model changes the input of a nonlinearity in place "
                               "after the nonlinearity used it; its true value is lost")
        return tuple(tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _ELEMENTWISE and args:
            dim = self._dimension(args[0])
            if dim is None:
                return func(*args, **kwargs)
            inplace, rest, options = out_of_place(func, args, kwargs)
            plain = _ELEMENTWISE[func]
            x = args[0]
            source = x.clone() if inplace else x  # computed out of place, written back below

            def fn(t: Tensor) -> Tensor:
                return plain(t, *rest, **options)

            if self.state == "record":
                self.records.append((source, source._version))
                out = fn(source)
            elif self.state == "replay":
                (true_in,) = self._next_record()
                self.calls += 1
                out = fn(true_in) + _RescaleTerm.apply(source - true_in, true_in, fn, self.eps, dim)
            else:
                self.calls += 1
                out = _Rescale.apply(source, fn, self.eps, dim)
            return x.copy_(out) if inplace else out
        if func is F.max_pool2d and args:
            options = dict(zip(_MAX_POOL_ARGS, args[1:]), **kwargs)
            if options.get("return_indices", False) or self._dimension(args[0]) != 0 or args[0].dim() != 4:
                return func(*args, **kwargs)
            pool = (options["kernel_size"], options.get("stride"), options.get("padding", 0),
                    options.get("dilation", 1), options.get("ceil_mode", False))
            x = args[0]
            if self.state == "record":
                out, indices = F.max_pool2d(x, *pool, return_indices=True)
                self.records.append((x, indices, x._version))
                return out
            self.calls += 1
            if self.state == "replay":
                true_in, indices = self._next_record()
                return _pooled(true_in, indices) + _MaxPoolTerm.apply(x - true_in, true_in, indices, self.eps)
            return _MaxPoolRescale.apply(x, *pool, self.eps)
        return func(*args, **kwargs)


@register("deeplift")
class DeepLift(GradientExplainer):
    """DeepLIFT (Rescale rule): the input difference times the multipliers of difference quotients.

    Shrikumar, Greenside & Kundaje, "Learning Important Features Through Propagating Activation Differences",
    ICML 2017, arXiv:1704.02685.

    ``A = (x - x') * m`` with ``m`` the chain rule's product in which every elementwise nonlinearity contributes
    ``(f(z) - f(z')) / (z - z')`` for its input ``z`` on the image and ``z'`` on the baseline (its derivative where
    ``|z - z'| < eps``, compared in float32 at least, so that float16 models and ``amp=torch.float16`` keep exact
    ties finite), linear layers their weights and 2-D max pooling Captum's rule (output differences split at
    the maximum of the image's and the baseline's outputs, sent back to both arg-max positions).  Summation to
    delta: ``sum A = f_t(x) - f_t(x')`` exactly for networks of linear layers, elementwise nonlinearities and max
    pooling.  Defaults as
    Captum's ``DeepLift``: the zero baseline (``baseline``: 'zero', 'black', 'white', a number or a tensor, as
    Integrated Gradients) and ``eps=1e-10``.  Captum finds nonlinearities as modules (``nn.ReLU``, ``nn.Sigmoid``,
    ...; not ``nn.ReLU6`` or ``nn.GELU``, which it passes with their plain gradient); here every call of an
    elementwise nonlinearity counts, functional ones included; and where Captum's module hooks meet (a nonlinearity
    next to a max pool, whose zero-difference fallback takes the batch's first gradient, captum#1276) or pooling
    windows overlap (``max_unpool2d`` keeps one window's share), its attributions no longer add up to the score
    difference, these do.  Elsewhere the two are the same computation.  Other nonlinear operations (softmax, products of
    activations, normalisation statistics) pass their plain gradient, as in Captum.  The images and baselines are
    split along each tensor's batch dimension, so sequence-first layers (``nn.TransformerEncoderLayer``'s default
    ``batch_first=False``) keep them apart (when the token count equals the pass's row count, the second dimension
    is taken inside blocks holding a sequence-first ``nn.MultiheadAttention``, as for guided backprop); a
    nonlinearity whose input holds the batch along neither of its first two dimensions keeps its plain gradient,
    with a warning.  In-place nonlinearities (``h.relu_()`` as a statement included) change their argument as in
    the model.  ``create_graph=True``: the map's derivative w.r.t. the parameters is exact (the multipliers are
    differentiated through the model's true forward, see the module docstring), at the cost of one more forward per
    pass.  Cost: one forward and one backward of the image and its baseline together.
    """

    argmax_on_rows = False
    defaults = {"baseline": "zero", "eps": 1e-10}
    per_image_options = ("baseline",)

    def _explain(self, x: Tensor, target: Target, *, baseline: BaselineSpec, eps: float, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        eps = non_negative_number(eps, "eps")
        reference = make_baseline(x, baseline)
        return self._average(x, target, 1, lambda rows: reference[rows], eps, batch_size, create_graph)

    def _average(self, x: Tensor, target: Target, count: int, references: Callable[[Tensor], Tensor], eps: float,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        """The mean of DeepLIFT's maps of each image against ``count`` references: pair ``r`` (of ``B * count``,
        image-major) is image ``r // count`` against ``references(r)``; ``batch_size // 2`` pairs per pass (each pass
        holds the images, then their references), built pass by pass."""
        self._rules = RescaleRules(eps, SequenceFirstScope(self.model))
        total = torch.zeros(x.shape, dtype=accumulation_dtype(x), device=x.device)
        pairs_per_pass = None if batch_size is None else max(1, batch_size // 2)
        for start, stop in RowPlanner(x.shape[0] * count, pairs_per_pass, x.device):
            index = torch.arange(start, stop, device=x.device)
            owners = index // count
            images, baselines = x[owners], references(index).to(x.dtype)
            _, grads = self._scores_and_input_gradients(torch.cat([images, baselines]), torch.cat([owners, owners]),
                                                        target, create_graph)
            part = (images - baselines).to(total.dtype) * grads[:stop - start].to(total.dtype)
            total = total.index_add(0, owners, part) if create_graph else total.index_add_(0, owners, part)
        if self._rules.skipped:
            warnings.warn(
                f"{type(self).__name__} passed {self._rules.skipped} nonlinearity call(s) with their plain gradient: "
                "their input holds the images and baselines along neither its first nor its second dimension (or "
                "holds no image at all); the attributions may not add up to the score difference",
                stacklevel=4,
            )
        return total / count if count > 1 else total

    def _scores_and_input_gradients(self, rows: Tensor, owners: Tensor, target: Target, create_graph: bool = False,
                                    planner: Optional[RowPlanner] = None) -> Tuple[Tensor, Tensor]:
        self._rules.rows = rows.shape[0]
        if create_graph:  # the true forward first, recording the nonlinearities' inputs (see the module docstring)
            self._rules.record()
            with self._rules:
                self._forward(rows.detach())
            self._rules.replay()
        else:
            self._rules.single()
        try:
            return super()._scores_and_input_gradients(rows, owners, target, create_graph, planner)
        finally:
            self._rules.single()  # lets the recorded graph go

    def _backward_rules(self) -> RescaleRules:
        return self._rules


@register("deeplift_shap")
class DeepLiftShap(DeepLift):
    """DeepLIFT averaged over a set of references (DeepSHAP's estimate of SHAP values).

    Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017, arXiv:1705.07874 (the
    DeepLIFT rules of Shrikumar et al. 2017 against each reference of a background set).

    ``A = mean_j DeepLIFT(x; r_j)`` over every reference ``r_j`` of ``references`` (a (N, C, H, W) tensor, e.g. a
    batch of training images; a name or number gives each image its own single reference, as DeepLIFT's
    ``baseline``).  Summation to delta: ``sum A = f_t(x) - mean_j f_t(r_j)``.  As Captum's ``DeepLiftShap`` (every
    reference, no sampling).  The ``B * N`` (image, reference) pairs are built pass by pass, ``batch_size // 2`` at
    a time, so memory does not grow with ``B * N``.  Cost: one forward and one backward of ``N`` copies of each image
    with the ``N`` references.
    """

    defaults = {"references": "zero", "eps": 1e-10}
    per_image_options = ()

    def _explain(self, x: Tensor, target: Target, *, references: BaselineSpec, eps: float,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        eps = non_negative_number(eps, "eps")
        refs = reference_set(x, references)
        if refs is None:
            own = make_baseline(x, references, "references")
            return self._average(x, target, 1, lambda rows: own[rows], eps, batch_size, create_graph)
        count = refs.shape[0]
        return self._average(x, target, count, lambda rows: refs[rows % count], eps, batch_size, create_graph)
