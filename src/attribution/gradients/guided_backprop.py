"""Guided backpropagation and the deconvnet: gradients with a modified backward through rectifiers.

The "where" is separate from the "what": a :class:`torch.overrides.TorchFunctionMode`, active only around the
model's forward inside the call, reroutes every rectifier the model evaluates (``nn.ReLU``, ``nn.ReLU6``,
``nn.Hardtanh``, ``nn.LeakyReLU`` modules, their functional forms and ``Tensor.relu``) through an autograd
function with the rule's backward.  No module is replaced, no hook is registered, in-place activations are
handled (the rerouted activation is computed out of place), and nothing of it outlives the call.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer

Bounds = Tuple[float, float, float]  # (lower, upper, negative slope)


def _bounds(func: Callable[..., Any], args: tuple, kwargs: Dict[str, Any]) -> Optional[Bounds]:
    """The clamp bounds and leak of a rectifier call, or None if ``func`` is not a rectifier."""
    if func in _RELU:
        return 0.0, float("inf"), 0.0
    if func in _RELU6:
        return 0.0, 6.0, 0.0
    if func in _HARDTANH:
        low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
        high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
        return float(low), float(high), 0.0
    if func in _LEAKY:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return 0.0, float("inf"), float(slope)
    return None


_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_RELU6 = {F.relu6}
_HARDTANH = {F.hardtanh, F.hardtanh_}
_LEAKY = {F.leaky_relu, F.leaky_relu_}


class _Rectifier(torch.autograd.Function):
    """Forward: ``clamp(x, low, high)`` (with leak ``slope`` below 0).  Backward: the guided or deconvnet rule."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, low: float, high: float, slope: float, deconvnet: bool) -> Tensor:
        ctx.low, ctx.high, ctx.slope, ctx.deconvnet = low, high, slope, deconvnet
        ctx.save_for_backward(x)
        if slope:
            return torch.where(x > 0, x, x * slope)
        return x.clamp(min=low, max=high)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        positive = grad.clamp(min=0)
        if ctx.deconvnet:  # Zeiler & Fergus: rectify the signal coming back, ignore the forward's mask
            return positive, None, None, None, None
        (x,) = ctx.saved_tensors
        if ctx.slope:
            guided = torch.where(x > 0, positive, positive * ctx.slope)
        elif ctx.high == math.inf:  # ReLU: the fused kernel of ReLU's own backward (``grad`` where ``x > low``)
            guided = torch.ops.aten.threshold_backward(positive, x, ctx.low)
        else:  # ReLU6 / Hardtanh: the fused kernel of Hardtanh's backward (``grad`` where ``low < x < high``)
            guided = torch.ops.aten.hardtanh_backward(positive, x, ctx.low, ctx.high)
        return guided, None, None, None, None


class RectifierRules(TorchFunctionMode):
    """While active, rectifier calls get the guided-backprop (or, with ``deconvnet=True``, deconvnet) backward."""

    def __init__(self, deconvnet: bool = False) -> None:
        super().__init__()
        self.deconvnet = deconvnet
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        bounds = _bounds(func, args, kwargs)
        if bounds is None or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        self.calls += 1
        return _Rectifier.apply(args[0], *bounds, self.deconvnet)


class _RectifiedGradient(GradientExplainer):
    """Input gradient with a rectifier backward rule (shared by guided backprop and the deconvnet)."""

    argmax_on_rows = True
    deconvnet = False

    def _backward_rules(self) -> RectifierRules:
        return self._rules

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool) -> Tensor:
        self._rules = RectifierRules(self.deconvnet)
        saliency = self._gradient_at_input(x, target, batch_size, create_graph)
        if self._rules.calls == 0:
            warnings.warn(
                f"{type(self).__name__} found no ReLU-family activation in the model's forward pass; "
                "its map equals the plain gradient",
                stacklevel=3,
            )
        return saliency


@register("guided_backprop")
class GuidedBackProp(_RectifiedGradient):
    """Guided backpropagation.

    Springenberg, Dosovitskiy, Brox & Riedmiller, "Striving for Simplicity: The All Convolutional Net", ICLR
    workshop 2015, arXiv:1412.6806.

    The gradient, except that at every rectifier ``y = clamp(x, low, high)`` the backward passes
    ``relu(dL/dy) * [low < x < high]`` (only positive signal, only where the unit was active); for LeakyReLU the
    local slope replaces the indicator.  Covers ReLU, ReLU6 / Hardtanh (EfficientNet-Lite, MobileNet) and
    LeakyReLU.  Cost: one forward and one backward per image.
    """

    deconvnet = False


@register("deconvnet")
class Deconvnet(_RectifiedGradient):
    """Deconvnet (deconvolution) visualisation.

    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv:1311.2901.

    The gradient, except that every rectifier passes ``relu(dL/dy)`` backwards, regardless of its input's sign.
    Cost: one forward and one backward per image.
    """

    deconvnet = True
