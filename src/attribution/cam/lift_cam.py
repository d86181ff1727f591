"""LIFT-CAM."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import non_negative_number
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from ..gradients.deeplift import RescaleRules
from .base import FUSIONS, channel_sum
from .edited_layer import EditedLayerCAM, LayerRunner


@register("lift_cam")
class LIFTCAM(EditedLayerCAM):
    """LIFT-CAM: channel weights from DeepLIFT's contributions of the layer's maps to the target's score.

    Jung & Oh, "Towards Better Explanations of Class Activation Mapping", ICCV 2021, arXiv:2105.09547.

    ``w_k = sum_ij (A_k(ij) - 0) m_k(ij)``, ``map = ReLU(sum_k w_k A_k)``: the weight of channel ``k`` is its share of
    ``g_c(A) - g_c(0)`` by DeepLIFT (Rescale rule, :class:`attribution.gradients.deeplift.DeepLift`) through ``g``,
    the part of the model after the layer, with the all-zero map as the reference, which the authors present as an
    approximation of the channel's Shapley value.  Summation to delta makes ``sum_k w_k = g_c(A) - g_c(0)`` exactly
    for tails of linear layers, elementwise nonlinearities and max pooling.  As the authors' code: the target's
    logit, DeepLIFT's ``eps=1e-10``.  Vision transformers' token outputs get the zero reference on their patch tokens
    (class and register tokens kept), which the paper, on CNNs only, does not cover.

    Cost: one forward per image and one *tail* pass with its backward of the layer's output and the reference
    together (the modules after the layer only; full forwards where torch.fx cannot cut the model, see
    :class:`attribution.cam.edited_layer.EditedLayerCAM` for ``use_tail`` and ``batch_size``).
    """

    #: one tail pass per chunk of images: the copies' progress bar of the base has nothing to show
    defaults = {**{k: v for k, v in EditedLayerCAM.defaults.items() if k != "progress"}, "eps": 1e-10}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, eps: float, use_tail: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        non_negative_number(eps, "eps")
        maps = []
        for layer in self.target_layers(x, target_layer, reshape_transform):
            with torch.set_grad_enabled(create_graph), self._autocast():
                run = self._layer_runner(layer, x, batch_size, use_tail)
                acts, _ = self._layer_maps(run, layer, x, reshape_transform)
            weights = self.channel_weights(run, target, layer, x, reshape_transform, float(eps), batch_size,
                                           create_graph)
            maps.append(channel_sum(weights[:, :, None, None], acts.to(weights.dtype)))
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def channel_weights(self, run: LayerRunner, target: Target, layer: nn.Module, x: Tensor,
                        reshape_transform: ReshapeTransform, eps: float, batch_size: Optional[int],
                        create_graph: bool) -> Tensor:
        """(B, C) DeepLIFT contributions of the layer's channels to the target's score, against the zero map."""
        acts = run.activations
        if target.pending:
            target.classes = run.clean_outputs.argmax(dim=1)
        maps, positions = self._layer_maps(run, layer, x, reshape_transform)
        if positions is None:
            reference = torch.zeros_like(acts)
        else:  # zero where the map's elements lie, the rest (class and register tokens) as it is
            reference = acts.detach().reshape(acts.shape[0], -1).clone()
            reference[:, positions.flatten()] = 0
            reference = reference.view_as(acts)
        rows = None if batch_size is None else max(1, batch_size // 2)
        parts = []
        for start, stop in RowPlanner(acts.shape[0], rows, acts.device):
            owners = torch.arange(start, stop, device=acts.device)
            kept = acts[start:stop] if create_graph else acts[start:stop].detach().requires_grad_(True)
            with torch.enable_grad(), self._autocast(), RescaleRules(eps, rows=2 * (stop - start)):
                both = torch.cat([owners, owners])
                scores = target(run(torch.cat([kept, reference[start:stop]]), both), both)
            (grads,) = torch.autograd.grad(scores.sum(), kept, create_graph=create_graph)
            parts.append(((kept if create_graph else kept.detach()) - reference[start:stop]) * grads)
        contributions = torch.cat(parts).to(accumulation_dtype(x))
        if positions is not None:
            contributions = contributions.flatten(1)[:, positions]  # (B, C, h*w)
        return contributions.flatten(2).sum(dim=2) if positions is None else contributions.sum(dim=2)
