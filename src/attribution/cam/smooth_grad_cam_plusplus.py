"""Smooth Grad-CAM++."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import non_negative_number, optional_generator, positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS, channel_sum, safe_divide


@register("smooth_grad_cam_plusplus")
class SmoothGradCAMPlusPlus(CAM):
    """Smooth Grad-CAM++: Grad-CAM++ with its three derivatives averaged over noisy copies of the image.

    Omeiza, Speakman, Cintas & Weldemariam, "Smooth Grad-CAM++: An Enhanced Inference Level Visualization Technique
    for Deep Convolutional Neural Network Models", arXiv:1908.01224 (2019).

    With ``g_s = dy/dA`` at the layer for the noisy copy ``x + e_s`` (``e_s ~ N(0, (std (max x - min x))^2)``, as
    SmoothGrad) and ``D_p = mean_s g_s^p``: ``alpha = D_2 / (2 D_2 + sum_ab A_k(a, b) D_3)`` (0 where the
    denominator is 0), ``w_k = sum_ij alpha ReLU(D_1)``, ``map = ReLU(sum_k w_k A_k)`` with ``A`` the activations
    of the image itself.  Defaults ``samples=25``, ``std=0.15`` (SmoothGrad's, relative to each image's value
    range); noise from ``generator``.  Differences from torchcam's ``SmoothGradCAMpp`` (4 samples of absolute
    noise 0.3): it weighs ``alpha`` by the last noisy copy's gradient, here by the mean ``D_1`` as in the paper; with
    one sample the two agree.  Cost: one forward, then ``samples`` forwards and gradients to the layer per image.
    """

    defaults: Dict[str, Any] = {**CAM.defaults, "samples": 25, "std": 0.15, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, samples: int, std: float, generator: Optional[torch.Generator],
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        positive_int(samples, "samples")
        non_negative_number(std, "std")
        optional_generator(generator)
        draw_device = generator.device if generator is not None else x.device  # then moved, as SmoothGrad
        layers = self.target_layers(x, target_layer, reshape_transform)
        clean = self._capture_all(x, target, layers, reshape_transform, batch_size, create_graph)
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        sigma = (std * (flat.amax(dim=1) - flat.amin(dim=1))).view(batch, 1, 1, 1)
        dtype = accumulation_dtype(x)
        moments: List[List[Tensor]] = [[torch.zeros_like(a) for _ in range(3)] for a in clean]
        for start, stop in RowPlanner(batch * samples, batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device) // samples  # rows image-major
            noise = torch.randn((stop - start,) + tuple(x.shape[1:]), generator=generator,
                                device=draw_device).to(x.device)
            noisy = (x[owners] + sigma[owners] * noise).to(x.dtype)
            _, _, grads = self._capture(noisy, owners, target, layers, reshape_transform, create_graph, True)
            for sums, grad in zip(moments, grads):
                for power, total in enumerate(sums):
                    sums[power] = total.index_add(0, owners, grad.to(dtype) ** (power + 1))
        maps = []
        for acts, (first, second, third) in zip(clean, moments):
            first, second, third = first / samples, second / samples, third / samples
            alpha = safe_divide(second, 2 * second + acts.sum(dim=(2, 3), keepdim=True) * third)
            weights = (alpha * F.relu(first)).sum(dim=(2, 3), keepdim=True)
            maps.append(channel_sum(weights, acts))
        return self._fuse(maps, x.shape[-2:], layer_fusion)
