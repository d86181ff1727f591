"""Excitation backprop and its contrastive variant: a probabilistic winner-take-all backward to a layer.

While a forward runs under :class:`ExcitationRules` (a :class:`torch.overrides.TorchFunctionMode`, no hooks and no
change to the model), convolutions and linear layers, average pooling, batch normalisation and the sum of two
same-shaped tensors (residual connections) are computed by autograd functions whose backward is excitation
backprop's: the excitation ``p`` of the outputs is shared among the inputs in proportion to their positive
contributions, ``p' = x * f*(W+, p / f(x, W+))`` for a linear ``f`` (``W+ = max(W, 0)``, no bias), ``x *
pool*(p / pool(x))`` for average pooling, ``p`` unchanged through batch normalisation, ``x_i / (x_1 + x_2) * p`` at
a sum.  Everything else (ReLU, max pooling) passes its plain gradient, as in TorchRay.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.capture import LayerCapture, ReshapeTransform
from ..core.layers import LayerSpec, resolve_layers
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS

#: added to the forward values that excitations are divided by, as TorchRay (so a zero output passes nothing)
EPSILON = 1e-20
_LINEAR = (F.conv1d, F.conv2d, F.conv3d, F.linear)
_POOLS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
          F.adaptive_avg_pool3d)
_SUMS = (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
_IN_PLACE_SUMS = (Tensor.add_, Tensor.__iadd__)  # ``out += identity`` in torchvision's residual blocks


class _Linear(torch.autograd.Function):
    """A convolution or linear layer with excitation backprop's backward for its input (``flip``: with the
    weights' negative part instead, the contrastive pass's classifier)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], fn: Callable[..., Tensor],
                rest: Tuple[Any, ...], kwargs: dict, switch: List[bool]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.fn, ctx.rest, ctx.kwargs, ctx.switch = fn, rest, kwargs, switch
        return fn(x, weight, bias, *rest, **kwargs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        positive = (-weight if ctx.switch[0] else weight).clamp(min=0).to(x.dtype)  # x's dtype: autocast's
        with torch.enable_grad():
            local = x.detach().requires_grad_(True)
            out = ctx.fn(local, positive, None, *ctx.rest, **ctx.kwargs)
            (spread,) = torch.autograd.grad(out, local, (grad / (out.detach() + EPSILON)).to(out.dtype),
                                            create_graph=torch.is_grad_enabled())
        return x * spread, None, None, None, None, None, None


class _Pool(torch.autograd.Function):
    """Average pooling with excitation backprop's backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[..., Tensor], rest: Tuple[Any, ...], kwargs: dict) -> Tensor:
        ctx.save_for_backward(x)
        ctx.fn, ctx.rest, ctx.kwargs = fn, rest, kwargs
        return fn(x, *rest, **kwargs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            local = x.detach().requires_grad_(True)
            out = ctx.fn(local, *ctx.rest, **ctx.kwargs)
            (spread,) = torch.autograd.grad(out, local, (grad / (out.detach() + EPSILON)).to(out.dtype),
                                            create_graph=torch.is_grad_enabled())
        return x * spread, None, None, None


class _PassThrough(torch.autograd.Function):
    """Batch normalisation whose backward passes the excitation unchanged."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Callable[..., Tensor], rest: Tuple[Any, ...], kwargs: dict) -> Tensor:
        return fn(x, *rest, **kwargs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        return grad, None, None, None


class _Sum(torch.autograd.Function):
    """``a + b`` whose backward shares the excitation in proportion: ``a / (a + b) * p`` and ``b / (a + b) * p``."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        out = a + b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, Tensor]:
        a, b, out = ctx.saved_tensors
        share = grad / torch.where(out == 0, torch.ones_like(out), out)
        return a * share, b * share


class _SumInPlace(torch.autograd.Function):
    """``a += b`` with :class:`_Sum`'s backward (``a``'s value before the sum is kept for it)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a.clone(), b)
        ctx.mark_dirty(a)
        return a.add_(b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, Tensor]:
        a, b = ctx.saved_tensors
        out = a + b
        share = grad / torch.where(out == 0, torch.ones_like(out), out)
        return a * share, b * share


class ExcitationRules(TorchFunctionMode):
    """While active, the forward records excitation backprop's rules (see the module docstring).  Each convolution
    or linear call gets a switch read at backward time; :meth:`classifier_switch` is the last call's (the
    classifier's): ``[True]`` gives the contrastive pass's flipped classifier."""

    def __init__(self) -> None:
        super().__init__()
        self._last: Optional[List[bool]] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func in _LINEAR:
            x, weight, bias, rest = args[0], *(list(args[1:3]) + [None] * (3 - len(args)))[:2], tuple(args[3:])
            weight, bias = kwargs.pop("weight", weight), kwargs.pop("bias", bias)
            switch = [False]  # read at backward time; the last call's is the classifier's
            self._last = switch
            return _Linear.apply(x, weight, bias, func, rest, kwargs, switch)
        if func in _POOLS:
            return _Pool.apply(args[0], func, tuple(args[1:]), kwargs)
        if func is F.batch_norm:
            return _PassThrough.apply(args[0], func, tuple(args[1:]), kwargs)
        if (func in _SUMS or func in _IN_PLACE_SUMS) and len(args) == 2 and not kwargs \
                and all(isinstance(a, Tensor) for a in args) and args[0].shape == args[1].shape \
                and args[0].is_floating_point() and args[0].dim() > 0:
            return (_Sum if func in _SUMS else _SumInPlace).apply(args[0], args[1])
        return func(*args, **kwargs)

    def classifier_switch(self) -> List[bool]:
        """The switch of the forward's last convolution or linear call (the classifier)."""
        if self._last is None:
            raise ValueError("excitation backprop found no convolution or linear layer in the model's forward")
        return self._last


@register("excitation_backprop")
class ExcitationBackprop(CAM):
    """Excitation backprop (and contrastive excitation backprop): the target's excitation, propagated down to a
    layer by the probabilistic winner-take-all rule, summed over the layer's channels.

    Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by Excitation Backprop", ECCV 2016 /
    IJCV 2018, arXiv:1608.00507.

    From the one-hot target at the output, every linear operation shares its outputs' excitation among its inputs
    in proportion to their positive contributions ``x_j W+_ij`` (see :class:`ExcitationRules`; TorchRay's rules,
    including the proportional split at residual sums that TorchRay applies to ResNets after ``update_resnet``);
    the map is ``sum_c P_c`` at ``target_layer`` (a CAM's layer option; default: the library's default CAM layer,
    where the map is coarse, TorchRay's examples read an earlier one).  ``contrastive=True``: the excitation reaching
    ``contrast_layer`` (default: the target layer) from the classifier with its weights negated (the forward's last
    convolution or linear call) is subtracted there from the excitation of the target, and the difference goes on
    to the target layer; the map is ``ReLU(sum_c P_c)``.  Inputs to linear layers are assumed non-negative (ReLU
    networks), as in the paper; nothing is clamped.  Raw maps, not normalised.
    Cost: one forward and one backward to the layer (contrastive: one forward and three partial backwards).
    """

    defaults = {**CAM.defaults, "contrastive": False, "contrast_layer": None}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, contrastive: bool, contrast_layer: LayerSpec, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        from ..core.batching import RowPlanner

        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be a bool, got {contrastive!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        contrast = None
        if contrastive:
            contrast = layers if contrast_layer is None else resolve_layers(self.model, contrast_layer)
            if len(contrast) != 1:
                raise ValueError("contrast_layer must name one layer")
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            maps = self._excitations(x[start:stop], owners, target, layers, contrast, reshape_transform,
                                     create_graph)
            chunks.append(self._fuse(maps, x.shape[-2:], layer_fusion))
        return torch.cat(chunks)

    def _excitations(self, rows: Tensor, owners: Tensor, target: Target, layers: Sequence[nn.Module],
                     contrast: Optional[Sequence[nn.Module]], reshape_transform: ReshapeTransform,
                     create_graph: bool) -> List[Tensor]:
        """The (n, 1, h, w) map of each layer for one chunk of rows."""
        watched = list(layers) + ([contrast[0]] if contrast is not None and contrast[0] not in layers else [])
        rules = ExcitationRules()
        with LayerCapture(watched, reshape_transform, False, self.model, rows.shape[-2:]) as capture:
            with torch.enable_grad(), rules:
                outputs = self._forward(rows.requires_grad_(True) if not rows.requires_grad else rows)
            capture._check_ran()
            score = target(outputs, owners).sum()
            raw = capture.outputs
            if target.pending:
                target.classes = outputs.argmax(dim=1)
            if contrast is None:
                grads = torch.autograd.grad(score, raw[:len(layers)], create_graph=create_graph)
            else:
                grads = self._contrastive(score, raw, len(layers), watched.index(contrast[0]), rules,
                                          self._name(contrast[0]), create_graph)
            transforms = [capture.transform(i) for i in range(len(layers))]
        dtype = accumulation_dtype(rows)
        maps = []
        for layer, grad, transform in zip(layers, grads, transforms):
            laid = transform(grad)
            if laid.dim() != 4:
                raise ValueError(f"the output of layer {self._name(layer)!r} has shape {tuple(laid.shape)}; "
                                 "excitation maps need (B, C, h, w): pass a reshape_transform")
            total = laid.to(dtype).sum(dim=1, keepdim=True)
            maps.append(total.clamp(min=0) if contrast is not None else total)
        return maps if create_graph else [m.detach() for m in maps]

    @staticmethod
    def _contrastive(score: Tensor, raw: Sequence[Tensor], count: int, where: int, rules: ExcitationRules,
                     contrast_name: str, create_graph: bool) -> Tuple[Tensor, ...]:
        """Excitations at the first ``count`` captured outputs after the contrast signal, read at output ``where``
        with the classifier flipped, is subtracted there from the target's."""
        switch = rules.classifier_switch()
        switch[0] = True
        try:
            (negative,) = torch.autograd.grad(score, raw[where], retain_graph=True)
        finally:
            switch[0] = False
        (positive,) = torch.autograd.grad(score, raw[where], retain_graph=True, create_graph=create_graph)
        delta = positive - negative
        grads = []
        for i in range(count):
            if i == where:
                grads.append(delta)
                continue
            (grad,) = torch.autograd.grad(raw[where], raw[i], delta, retain_graph=True, allow_unused=True,
                                          create_graph=create_graph)
            if grad is None:
                raise ValueError(f"contrast_layer {contrast_name!r} must come after the target layer in the "
                                 "forward: no excitation reaches the target layer from it")
            grads.append(grad)
        return tuple(grads)
