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

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture, ReshapeTransform
from ..core.layers import LayerSpec, resolve_layers
from ..core.registry import register
from ..core.rules import LinearCall, Norm, RuleMode, differentiable, widened
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS

#: added to the forward values that excitations are divided by, as TorchRay (so a zero output passes nothing)
EPSILON = 1e-20


class _Excitation:
    """Excitation backprop's rule for a convolution or linear call: ``p' = x * f*(W+, p / (f(x, W+) + 1e-20))``
    (no bias; ``switch[0]``, read at backward time: with the weights' negative part instead, the contrastive
    pass's classifier)."""

    def __init__(self) -> None:
        self.switch = [False]

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        positive = (-weight if self.switch[0] else weight).clamp(min=0)
        local = widened(differentiable(x, create_graph))  # float32 for half inputs: 1 / (0 + 1e-20) overflows there
        out = call(local, positive, None)
        denominator = (out if create_graph else out.detach()) + EPSILON
        (spread,) = torch.autograd.grad(out, local, grad.to(out.dtype) / denominator, create_graph=create_graph)
        return (local * spread).to(x.dtype)


class ExcitationRules(RuleMode):
    """While active, the forward records excitation backprop's rules (see the module docstring; the machinery is
    :mod:`attribution.core.rules`'s).  Each convolution or linear call gets a switch read at backward time;
    :meth:`classifier_switch` is the last call's (the classifier's): ``[True]`` gives the contrastive pass's
    flipped classifier."""

    def __init__(self) -> None:
        super().__init__(lambda func: _Excitation(), Norm(lambda out: out + EPSILON),
                         lambda out: torch.where(out == 0, torch.ones_like(out), out))

    def classifier_switch(self) -> List[bool]:
        """The switch of the forward's last convolution or linear call (the classifier)."""
        if not self.calls:
            raise ValueError("excitation backprop found no convolution or linear layer in the model's forward")
        return self.calls[-1].rule.switch


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
            try:
                if contrast is None:
                    grads = torch.autograd.grad(score, raw[:len(layers)], create_graph=create_graph)
                else:
                    grads = self._contrastive(score, raw, len(layers), watched.index(contrast[0]), rules,
                                              self._name(contrast[0]), create_graph)
            finally:  # from here on, derivatives of the map (create_graph) go through the forward's true ones
                rules.state.plain = True
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
            (negative,) = torch.autograd.grad(score, raw[where], retain_graph=True, create_graph=create_graph)
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
