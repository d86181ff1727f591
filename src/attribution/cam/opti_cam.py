"""Opti-CAM."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.optim import Adam
from ..core.registry import register
from ..core.targets import Target
from .base import CAM, FUSIONS, min_max_scale, upsample


def saliency_of(weights: Tensor, features: Tensor, size: tuple) -> Tensor:
    """Opti-CAM's map for channel logits ``weights`` (n, C): ``softmax(u)``-weighted sum of the ``features``
    (n, C, h, w), upsampled to ``size`` and min-max scaled to [0, 1] per image: (n, 1, H, W)."""
    combined = (weights.softmax(dim=1)[:, :, None, None] * features).sum(dim=1, keepdim=True)
    return min_max_scale(upsample(combined, size))


@register("opti_cam")
class OptiCAM(CAM):
    """Opti-CAM: channel weights found by gradient ascent on the target's score of the image masked by the map.

    Zhang, Torres, Sicre, Avrithis & Ayache, "Opti-CAM: Optimizing saliency maps for interpretability", CVIU 2024,
    arXiv:2301.07002.

    With ``A = ReLU(activations)`` at the layer and ``S(u) = n(up(sum_k softmax(u)_k A_k))`` (bilinear upsampling,
    per-image min-max scaling to [0, 1]): ``u* = argmax_u f_t(x * S(u))`` by ``iterations`` steps of Adam with
    learning rate ``lr`` from uniform weights, per image; the map is ``S(u*)``, (B, 1, H, W) in [0, 1].  Defaults
    from the authors' script (50 iterations, learning rate 0.1, the target's logit).  Their script stops a batch
    early when its summed loss rises between checks; here every image takes all ``iterations`` steps, so a map does
    not depend on the other images of the batch.  Adam is written out (``torch.optim.Adam``'s update), so that with
    ``create_graph=True`` the map is differentiable through the activations and through every step of the
    optimisation of the weights (memory grows with ``iterations``).  Cost: one forward, then ``iterations``
    forwards and backwards to the channel weights (through the whole model) per image.
    """

    uses_gradients = False
    defaults: Dict[str, Any] = {**CAM.defaults, "iterations": 50, "lr": 0.1}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, iterations: int, lr: float, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        activations = self._capture_all(x, target, layers, reshape_transform, batch_size, create_graph)
        size = tuple(x.shape[-2:])
        maps = []
        for acts in activations:
            features = acts.relu()
            chunks = []
            for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
                owners = torch.arange(start, stop, device=x.device)
                weights = self._optimise(x[start:stop], owners, target, features[start:stop], iterations, lr,
                                         create_graph)
                chunks.append(saliency_of(weights, features[start:stop], size))
            maps.append(torch.cat(chunks))
        return self._fuse(maps, size, layer_fusion)

    def _optimise(self, x: Tensor, owners: Tensor, target: Target, features: Tensor, iterations: int,
                  lr: float, create_graph: bool) -> Tensor:
        """The channel logits (n, C) after ``iterations`` Adam steps on ``-f_t(x * S(u))``, from zeros (with the
        graph of every step when ``create_graph``)."""
        if not create_graph:
            features = features.detach()
        weights = torch.zeros(features.shape[:2], dtype=features.dtype, device=x.device, requires_grad=True)
        adam = Adam(lr)
        for _ in range(iterations):
            masked = x * saliency_of(weights, features, tuple(x.shape[-2:])).to(x.dtype)
            score = target(self._forward(masked), owners).sum()
            (grad,) = torch.autograd.grad(-score, weights, create_graph=create_graph)
            weights = adam.step(weights, grad)
            if not create_graph:
                weights = weights.detach().requires_grad_(True)
                adam.detach_()
        return weights if create_graph else weights.detach()
