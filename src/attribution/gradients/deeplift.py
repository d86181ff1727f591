"""DeepLIFT with the Rescale rule: gradients whose nonlinearities pass on difference quotients.

As for guided backprop, a :class:`torch.overrides.TorchFunctionMode` that lives only during the model's forward
reroutes the model's elementwise nonlinearities and 2-D max pooling through autograd functions with DeepLIFT's
backward.  The images and their baselines run in one batch (images first), so each function sees both halves: its
backward replaces the local derivative by ``(f(x) - f(x')) / (x - x')`` (the plain derivative where
``|x - x'| < eps``).  No module is replaced and no hook is registered.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..core.batching import RowPlanner
from ..core.explainer import non_negative_number
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer
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
_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _both_halves(t: Tensor) -> Tensor:
    """``t[:n] - t[n:]`` (images minus baselines) repeated for both halves."""
    first, second = t.chunk(2)
    difference = first - second
    return torch.cat([difference, difference])


class _Rescale(torch.autograd.Function):
    """Forward: ``fn(x)``.  Backward: ``grad * (f(x) - f(x')) / (x - x')``, the plain derivative where the
    difference is below ``eps``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float) -> Tensor:
        y = fn(x)
        ctx.fn, ctx.eps = fn, eps
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, y = ctx.saved_tensors
        (x_in, x_ref), (y_in, y_ref) = x.chunk(2), y.chunk(2)
        delta_in = x_in - x_ref
        small = delta_in.abs() < ctx.eps
        multiplier = (y_in - y_ref) / delta_in.masked_fill(small, 1.0)  # shared by both halves
        rescaled = (grad.view(2, *multiplier.shape) * multiplier).view_as(grad)
        if not bool(small.any()):  # the usual case: no derivative needed (it costs a forward and a backward)
            return rescaled, None, None
        with torch.enable_grad():
            local = x.detach().requires_grad_(True)
            (plain,) = torch.autograd.grad(ctx.fn(local), local, grad)
        return torch.where(torch.cat([small, small]), plain, rescaled), None, None


class _MaxPoolRescale(torch.autograd.Function):
    """2-D max pooling with the rule Captum's DeepLift applies to it: the output differences, split at the
    elementwise maximum of the image's and the baseline's outputs, are routed back through both halves' arg-max
    positions and divided by the input difference (the plain gradient where it is below ``eps``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool,
                eps: float) -> Tensor:
        y, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        ctx.pool, ctx.eps = (kernel, stride, padding), eps
        ctx.save_for_backward(x, y, indices)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, y, indices = ctx.saved_tensors
        kernel, stride, padding = ctx.pool
        out, out_ref = y.chunk(2)
        cross = torch.maximum(out, out_ref)
        delta_out = torch.cat([cross - out_ref, out - cross])
        routed = _route(grad * delta_out, indices, x)
        first, second = routed.chunk(2)
        routed = torch.cat([first + second, first + second])
        delta_in = _both_halves(x)
        small = delta_in.abs() < ctx.eps  # divided by 1 there, so that a double backward meets no 0 / 0
        return (torch.where(small, _route(grad, indices, x), routed / delta_in.masked_fill(small, 1.0)),) + (None,) * 6


def _route(values: Tensor, indices: Tensor, x: Tensor) -> Tensor:
    """``values`` of the pooled outputs added at their arg-max positions in a zero tensor shaped like ``x`` (an
    input that is the maximum of several overlapping windows receives all of theirs; ``max_unpool2d``, which
    Captum uses, keeps one of them)."""
    flat = torch.zeros(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], dtype=values.dtype, device=values.device)
    return flat.scatter_add(2, indices.flatten(2), values.flatten(2)).view_as(x)


class RescaleRules(TorchFunctionMode):
    """While active, elementwise nonlinearities and 2-D max pooling get DeepLIFT's backward (the batch must hold
    the images, then their baselines)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if (func not in _ELEMENTWISE and func is not F.max_pool2d) or not args or not isinstance(args[0], Tensor) \
                or args[0].dim() == 0 or args[0].shape[0] % 2:
            return func(*args, **kwargs)
        if func in _ELEMENTWISE:
            kwargs.pop("inplace", None)
            plain, rest = _ELEMENTWISE[func], args[1:]
            self.calls += 1
            return _Rescale.apply(args[0], lambda t: plain(t, *rest, **kwargs), self.eps)
        if func is F.max_pool2d:
            options = dict(zip(_MAX_POOL_ARGS, args[1:]), **kwargs)
            if options.get("return_indices", False):
                return func(*args, **kwargs)
            self.calls += 1
            return _MaxPoolRescale.apply(args[0], options["kernel_size"], options.get("stride"),
                                         options.get("padding", 0), options.get("dilation", 1),
                                         options.get("ceil_mode", False), self.eps)
        return func(*args, **kwargs)


@register("deeplift")
class DeepLift(GradientExplainer):
    """DeepLIFT (Rescale rule): the input difference times the multipliers of difference quotients.

    Shrikumar, Greenside & Kundaje, "Learning Important Features Through Propagating Activation Differences",
    ICML 2017, arXiv:1704.02685.

    ``A = (x - x') * m`` with ``m`` the chain rule's product in which every elementwise nonlinearity contributes
    ``(f(z) - f(z')) / (z - z')`` for its input ``z`` on the image and ``z'`` on the baseline (its derivative where
    ``|z - z'| < eps``), linear layers their weights and 2-D max pooling Captum's rule (output differences split at
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
    activations, normalisation statistics) pass their plain gradient, as in Captum.  Cost: one forward and one
    backward of the image and its baseline together.
    """

    argmax_on_rows = False
    defaults = {"baseline": "zero", "eps": 1e-10}

    def _explain(self, x: Tensor, target: Target, *, baseline: BaselineSpec, eps: float, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        non_negative_number(eps, "eps")
        reference = make_baseline(x, baseline)
        self._eps = float(eps)  # read by _backward_rules inside _scores_and_input_gradients
        rows_per_image = None if batch_size is None else max(1, batch_size // 2)
        parts = []
        for start, stop in RowPlanner(x.shape[0], rows_per_image, x.device):
            owners = torch.arange(start, stop, device=x.device)
            rows = torch.cat([x[start:stop], reference[start:stop]])
            _, grads = self._scores_and_input_gradients(rows, torch.cat([owners, owners]), target, create_graph)
            parts.append((x[start:stop] - reference[start:stop]) * grads[:stop - start])
        return torch.cat(parts)

    def _backward_rules(self) -> RescaleRules:
        return RescaleRules(self._eps)


@register("deeplift_shap")
class DeepLiftShap(DeepLift):
    """DeepLIFT averaged over a set of references (DeepSHAP's estimate of SHAP values).

    Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017, arXiv:1705.07874 (the
    DeepLIFT rules of Shrikumar et al. 2017 against each reference of a background set).

    ``A = mean_j DeepLIFT(x; r_j)`` over every reference ``r_j`` of ``references`` (a (N, C, H, W) tensor, e.g. a
    batch of training images; a name or number gives each image its own single reference, as DeepLIFT's
    ``baseline``).  Summation to delta: ``sum A = f_t(x) - mean_j f_t(r_j)``.  As Captum's ``DeepLiftShap`` (every
    reference, no sampling).  Cost: one forward and one backward of ``N`` copies of each image with the ``N``
    references.
    """

    defaults = {"references": "zero", "eps": 1e-10}

    def _explain(self, x: Tensor, target: Target, *, references: BaselineSpec, eps: float,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        refs = reference_set(x, references)
        if refs is None:
            return super()._explain(x, target, baseline=references, eps=eps, batch_size=batch_size,
                                    create_graph=create_graph)
        count = refs.shape[0]
        copies = x.repeat_interleave(count, dim=0)  # image-major: row r is image r // N with reference r % N
        maps = super()._explain(copies, target.repeat(count), baseline=refs.to(x.dtype).repeat(x.shape[0], 1, 1, 1),
                                eps=eps, batch_size=batch_size, create_graph=create_graph)
        return maps.view(x.shape[0], count, *x.shape[1:]).mean(dim=1)
