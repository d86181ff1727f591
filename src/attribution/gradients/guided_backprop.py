"""Guided backpropagation, the deconvnet and RectGrad: gradients with a modified backward through rectifiers.

The "where" is separate from the "what": a :class:`torch.overrides.TorchFunctionMode`, active only around the
model's forward inside the call, reroutes every rectifier the model evaluates (``nn.ReLU``, ``nn.ReLU6``,
``nn.Hardtanh``, ``nn.LeakyReLU`` modules, their functional forms and ``Tensor.relu``) through an autograd
function with the rule's backward.  No module is replaced, no hook is registered, in-place activations are
handled (computed out of place on a copy, then written back into their argument, so that a model that calls
``h.relu_()`` as a statement sees its rectified ``h``), and nothing of it outlives the call.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from ..core.rules import OUT_OF_PLACE, ScopedRules, SequenceFirstScope, batch_dimension, in_place_call
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


RULES = ("guided", "deconvnet", "rectgrad")


def percentile_per_row(values: Tensor, q: float, batch_dim: int = 0) -> Tensor:
    """The ``q``-th percentile (0-100) of each image's entries (over all dimensions but ``batch_dim``), the nearest
    rank ``round((n - 1) q / 100)`` of the sorted entries (TensorFlow's and NumPy's ``'nearest'``), shaped to
    broadcast against ``values``."""
    if batch_dim:
        return percentile_per_row(values.movedim(batch_dim, 0), q).movedim(0, batch_dim)
    flat = values.detach().flatten(1)
    rank = round((flat.shape[1] - 1) * q / 100)
    # the (rank + 1)-th smallest is the smallest of the n - rank largest (top-k: 1.6x faster than kthvalue on CPU)
    threshold = flat.topk(flat.shape[1] - rank, dim=1, sorted=False).values.amin(dim=1)
    return threshold.view((-1,) + (1,) * (values.dim() - 1))


class _Rectifier(torch.autograd.Function):
    """Forward: ``clamp(x, low, high)`` (with leak ``slope`` below 0).  Backward: the guided, deconvnet or RectGrad
    rule (``percentile``: RectGrad's threshold)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, low: float, high: float, slope: float, rule: str, percentile: float,
                batch_dim: int) -> Tensor:
        ctx.low, ctx.high, ctx.slope, ctx.rule, ctx.percentile = low, high, slope, rule, percentile
        ctx.batch_dim = batch_dim
        out = torch.where(x > 0, x, x * slope) if slope else x.clamp(min=low, max=high)
        ctx.save_for_backward(out if rule == "rectgrad" else x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        none = (None,) * 6
        if ctx.rule == "rectgrad":  # Kim et al.: only where the unit's share, output x gradient, is in the top tail
            (out,) = ctx.saved_tensors
            share = out * grad
            return torch.where(share > percentile_per_row(share, ctx.percentile, ctx.batch_dim), grad, 0), *none
        positive = grad.clamp(min=0)
        if ctx.rule == "deconvnet":  # Zeiler & Fergus: rectify the signal coming back, ignore the forward's mask
            return positive, *none
        (x,) = ctx.saved_tensors
        if ctx.slope:
            guided = torch.where(x > 0, positive, positive * ctx.slope)
        elif ctx.high == math.inf:  # ReLU: the fused kernel of ReLU's own backward (``grad`` where ``x > low``)
            guided = torch.ops.aten.threshold_backward(positive, x, ctx.low)
        else:  # ReLU6 / Hardtanh: the fused kernel of Hardtanh's backward (``grad`` where ``low < x < high``)
            guided = torch.ops.aten.hardtanh_backward(positive, x, ctx.low, ctx.high)
        return guided, *none


class RectifierRules(ScopedRules):
    """While active, rectifier calls get the backward of ``rule`` (see :data:`RULES`; ``percentile``: RectGrad's)."""

    def __init__(self, rule: str = "guided", percentile: float = 98.0,
                 scope: Optional[SequenceFirstScope] = None) -> None:
        super().__init__(scope)
        self.rule, self.percentile = rule, percentile
        self.calls = 0
        #: the rows of the pass running (set by the explainer): the dimension of that size is the batch
        #: (the first, or the second for sequence-first layers such as nn.TransformerEncoder's default; ``scope``
        #: settles a tie, see :func:`~attribution.core.rules.batch_dimension`)
        self.rows: Optional[int] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        bounds = _bounds(func, args, kwargs)
        if bounds is None or not isinstance(args[0], Tensor):
            return func(*args, **kwargs)
        self.calls += 1
        x = args[0]
        # an in-place call (also ``h.relu_()`` as a statement) is computed on a copy and written back, so that the
        # model goes on with the rectified values, as it does without the rule
        inplace = func in OUT_OF_PLACE or in_place_call(func, args, kwargs)
        out = _Rectifier.apply(x.clone() if inplace else x, *bounds, self.rule, self.percentile,
                               batch_dimension(x, self.rows, self.scope.active))
        return x.copy_(out) if inplace else out


class _RectifiedGradient(GradientExplainer):
    """Input gradient with a rectifier backward rule (shared by guided backprop, the deconvnet and RectGrad)."""

    argmax_on_rows = True
    rule = "guided"

    def _backward_rules(self) -> RectifierRules:
        return self._rules

    def _scores_and_input_gradients(self, rows: Tensor, *args: Any, **kwargs: Any) -> Tuple[Tensor, Tensor]:
        self._rules.rows = rows.shape[0]
        return super()._scores_and_input_gradients(rows, *args, **kwargs)

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool,
                 **options: Any) -> Tensor:
        self._rules = RectifierRules(self.rule, scope=SequenceFirstScope(self.model), **options)
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

    rule = "guided"


@register("deconvnet")
class Deconvnet(_RectifiedGradient):
    """Deconvnet (deconvolution) visualisation.

    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv:1311.2901.

    The gradient, except that every rectifier passes ``relu(dL/dy)`` backwards, regardless of its input's sign.
    Cost: one forward and one backward per image.
    """

    rule = "deconvnet"


@register("rect_grad")
class RectGrad(_RectifiedGradient):
    """Rectified gradient (RectGrad): input x gradient with each rectifier passing the gradient only where the
    unit's importance is in the top tail.

    Kim, Seo, Jeong, Lee & Yoon, "Why are Saliency Maps Noisy? Cause of and Solution to Noisy Saliency Maps", ICCV
    workshops 2019, arXiv:1902.04893.

    At every rectifier ``a = clamp(x, ...)`` the backward passes ``g * [a * g > tau]``, ``tau`` the ``percentile``-th
    percentile of ``a * g`` over the layer's units, per image (over all dimensions but the batch's: the first, or the
    second in sequence-first layers such as ``nn.TransformerEncoder``'s default, found as the dimension of the
    pass's row count, or, when the token count is that too, the second of 3-D tensors inside the blocks that hold
    a sequence-first ``nn.MultiheadAttention``; nearest rank, as the authors' TensorFlow code), in
    place of the local derivative; the map is ``x * grad``.  Default percentile 98 as the authors' code.  Covers the
    rectifiers of guided backprop (ReLU, ReLU6 / Hardtanh, LeakyReLU); as in the authors' code, the indicator
    replaces the local derivative entirely (a saturated ReLU6 unit passes the gradient when its share is in the
    tail).  Deliberate difference: the authors' code also zeroes the one-pixel border of the output gradient of
    every 'SAME'-padded convolution (a trick against border artefacts, written for 3x3 kernels); not here.
    Cost: one forward and one backward per image (plus a k-th value per rectifier).
    """

    rule = "rectgrad"
    defaults = {"percentile": 98.0}

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool,
                 percentile: float) -> Tensor:
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be a number from 0 to 100, got {percentile!r}")
        return x * super()._explain(x, target, batch_size=batch_size, create_graph=create_graph,
                                    percentile=float(percentile))
