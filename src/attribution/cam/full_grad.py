"""FullGrad."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture
from ..core.layers import LayerSpec, resolve_layers
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, safe_divide, upsample


def implicit_bias(module: nn.Module) -> Optional[Tensor]:
    """The per-channel bias a module adds to its output: a convolution's bias; for batch norm (running
    statistics, as in eval mode) ``beta - mean * gamma / sqrt(var + eps)``.  None if it adds none."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return None if module.bias is None else module.bias
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias if module.bias is None else bias + module.bias
    return None


def bias_layers(model: nn.Module, within: Optional[List[nn.Module]] = None) -> List[Tuple[nn.Module, Tensor]]:
    """2-D convolutions and batch norms with a bias, in ``model`` or only inside the modules ``within``."""
    roots = within if within is not None else [model]
    found, seen = [], set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen or not isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
                continue
            seen.add(id(module))
            bias = implicit_bias(module)
            if bias is not None:
                found.append((module, bias))
    return found


def rescaled_sum(term: Tensor, weight: Optional[Tensor], per_channel: bool, in_place: bool = False) -> Tensor:
    """FullGrad's post-processing psi of ``weight_c * term_c``, summed over channels, as (N, 1, h, w): psi is the
    absolute value min-max scaled to [0, 1] per image (over all channels and positions) or, with
    ``per_channel``, per image and channel.  ``weight`` (C,) is a per-channel factor (a bias), or None.

    The scaling is folded into the channel sum (``sum_c (|t_c| - lo) / (hi - lo) = (sum_c |t_c| - C lo) / (hi -
    lo)``) and ``|w_c t_c| = |w_c| |t_c|`` keeps the weight out of the full-size tensor, so that tensor is read
    three times and written once (not at all with ``in_place``, which overwrites ``term`` with its absolute
    value).  The weighted channel sum is a matrix product on the (N, C, h * w) view, which reads the tensor in
    place (an einsum permuted it to channels-last first: a full copy, 10x slower on the CPU)."""
    magnitude = term.abs_() if in_place else term.abs()
    channels = term.shape[1]
    low, high = torch.aminmax(magnitude.flatten(2), dim=-1)                          # (N, C)
    scale = torch.ones(channels, dtype=term.dtype, device=term.device) if weight is None else weight.abs()
    low, high = low * scale, high * scale
    if per_channel:
        inverse = safe_divide(torch.ones_like(low), high - low)                      # (N, C)
        weighted = torch.bmm((scale * inverse).unsqueeze(1), magnitude.flatten(2))     # (N, 1, h * w)
        return (weighted - (low * inverse).sum(1).view(-1, 1, 1)).view_as(magnitude[:, :1])
    low, high = low.amin(dim=1).view(-1, 1, 1), high.amax(dim=1).view(-1, 1, 1)    # (N, 1, 1)
    weighted = torch.bmm(scale.expand(term.shape[0], 1, channels), magnitude.flatten(2))  # (N, 1, h * w)
    shifted = weighted.view_as(magnitude[:, 0]) - channels * low
    return safe_divide(shifted, high - low).unsqueeze(1)


@register("fullgrad")
class FullGrad(CAM):
    """FullGrad: input-gradient times input plus every layer's bias-gradients, each post-processed and summed.

    Srinivas & Fleuret, "Full-Gradient Representation for Neural Network Visualization", NeurIPS 2019,
    arXiv:1905.00780.

    ``map = sum_c psi(dy/dx * x)_c + sum_layers sum_c U(psi(b * dy/dz))_c`` where the layers are the model's
    ``Conv2d`` and ``BatchNorm2d`` modules with a bias (for batch norm the implicit bias
    ``beta - mean * gamma / sqrt(var + eps)``), ``z`` their outputs, ``U`` bilinear upsampling to the input and
    ``psi`` the absolute value min-max scaled to [0, 1] per image over all channels of the term, as in the
    authors' code; layers whose output has a single position (squeeze-excitation convolutions) would add only a
    constant and are skipped.  A module the forward runs more than once (shared weights) adds one bias term per
    call, so the map equals that of the same network with a copy of the module for each call.  ``target_layer``
    (optional) restricts the bias layers to those inside the given modules.
    Cost: one forward and one full backward (to the input and every bias layer) per image.

    Differences from pytorch-grad-cam (and the seed library): they min-max scale every channel separately
    (``per_channel=True`` reproduces that), select layers by exact type (here subclasses count too, e.g. timm's
    and efficientnet_lite's same-padding convolutions) and min-max scale the final sum (here it stays raw).
    For a batch norm that applies its activation itself (timm's ``BatchNormAct2d``) the bias-gradient is taken at
    the module's output, after the activation.
    """

    defaults = {"target_layer": None, "per_channel": False}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, per_channel: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
        within = None if target_layer is None else resolve_layers(self.model, target_layer)
        layers = bias_layers(self.model, within)
        modules = [module for module, _ in layers]
        dtype = accumulation_dtype(x)
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            rows = self._model_input(x[start:stop]).detach().requires_grad_(True)
            with LayerCapture(modules, model=self.model, keep_values=False) as capture:
                outputs = self._forward(rows)
            scores = target(outputs, owners)
            if not modules:
                per_call: List[List[Tensor]] = []
                (input_grad,) = torch.autograd.grad(scores.sum(), rows, create_graph=create_graph)
            else:  # a module the forward runs more than once has one bias-gradient per call
                per_call, (input_grad,) = capture.call_gradients(scores.sum(), create_graph, extra=[rows])
            # in_place overwrites the returned gradients with their absolute values: safe although one gradient
            # tensor may be returned for two layers (a residual add hands both the same one), since |.| is idempotent
            total = rescaled_sum((input_grad * rows).to(dtype), None, per_channel, in_place=not create_graph)
            # upsampling is linear, so the channels and all layers of one resolution are summed first and each
            # resolution is upsampled once: the same map for far less work
            by_size: Dict[Tuple[int, int], Tensor] = {}
            for (_, bias), grads in zip(layers, per_call):
                for grad in grads:
                    size = (grad.shape[-2], grad.shape[-1])
                    if size[0] * size[1] == 1:
                        continue  # one position (a squeeze-excitation convolution): only a constant offset
                    term = rescaled_sum(grad.to(dtype), bias.to(dtype), per_channel, in_place=not create_graph)
                    by_size[size] = by_size[size] + term if size in by_size else term
            for summed in by_size.values():
                total = total + upsample(summed, x.shape[-2:])
            chunks.append(total if create_graph else total.detach())
        return torch.cat(chunks)

