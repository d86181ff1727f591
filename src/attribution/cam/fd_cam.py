"""FD-CAM: gradient weights and group-score weights, combined."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import FUSIONS, channel_sum, min_max_scale, safe_divide
from .edited_layer import EditedLayerCAM


def similar_channels(maps: Tensor, threshold: float) -> Tensor:
    """(B, C, C) booleans: channel ``j`` is in channel ``i``'s group when the cosine similarity of their maps
    exceeds the ``threshold`` quantile of channel ``i``'s similarities (0 for an all-zero map)."""
    flat = maps.flatten(2)
    norms = flat.norm(dim=2)
    cosine = safe_divide(flat @ flat.transpose(1, 2), norms[:, :, None] * norms[:, None, :])
    return cosine > torch.quantile(cosine, threshold, dim=2, keepdim=True)


@register("fd_cam")
class FDCAM(EditedLayerCAM):
    """FD-CAM: each channel weighted by its gradient and by what its group of similar channels does to the score,
    kept alone and removed.

    Li, Li, Ma & Wu, "FD-CAM: Improving Faithfulness and Discriminability of Visual Explanation for CNNs", ICPR 2022,
    arXiv:2206.08792.

    Channel ``k``'s group ``G_k`` holds the channels whose maps have a cosine similarity with ``A_k`` above the
    ``threshold`` quantile (0.95) of ``A_k``'s similarities; its score ``s_k = f(A on G_k) + (f(A) - f(A off G_k))``
    adds the target's score with only the group kept (the other channels zeroed) to the score lost with the group
    zeroed (logits by default, as the authors' code).  With ``g_k`` the spatial mean of the gradient (Grad-CAM's
    weight) and ``N`` min-max scaling over the channels: ``w_k = exp(N(s)_k) N(g)_k - 0.5``, ``map = ReLU(sum_k w_k
    A_k)``.  The edited copies run only the model's tail after the layer (Ablation-CAM's runner).  Equal to the
    authors' code written out (which explains VGG16 through its pooled classifier).  Cost: one forward and the
    gradient to the layer, one more forward, and 2 C tail passes per image.
    """

    defaults = {**EditedLayerCAM.defaults, "threshold": 0.95}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, threshold: float, use_tail: bool, progress: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a quantile in [0, 1), got {threshold!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        maps = [self._layer_map_of(x, target, layer, reshape_transform, float(threshold), use_tail, progress,
                                   batch_size, create_graph) for layer in layers]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _layer_map_of(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                      threshold: float, use_tail: bool, progress: bool, batch_size: Optional[int],
                      create_graph: bool) -> Tensor:
        owners = torch.arange(x.shape[0], device=x.device)
        gradients = torch.cat([self._capture(x[a:b], owners[a:b], target, [layer], reshape_transform, create_graph,
                                             True)[2][0] for a, b in RowPlanner(x.shape[0], batch_size, x.device)])
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = self._layer_runner(layer, x, batch_size, use_tail)
            maps, positions = self._layer_maps(run, layer, x, reshape_transform)
            groups = similar_channels(maps.detach().to(accumulation_dtype(x)), threshold)  # (B, C, C)
            channels = maps.shape[1]
            acts = run.activations
            flat_positions = None if positions is None else positions.flatten()

            def edit(image: Tensor, k: Tensor) -> Tensor:  # copies 0..C-1: group k alone; C..2C-1: group k removed
                keep = groups[image, k % channels]
                keep = torch.where((k < channels)[:, None], keep, ~keep).to(acts.dtype)
                rows = acts[image]
                if flat_positions is None:
                    return rows * keep[:, :, None, None]
                per_element = torch.ones(rows[0].numel(), dtype=acts.dtype, device=acts.device)
                per_element = per_element.expand(rows.shape[0], -1).clone()
                per_element[:, flat_positions] = keep.repeat_interleave(positions.shape[1], dim=1)
                return rows * per_element.view_as(rows)

            edited = self._edited_scores(run, target, 2 * channels, edit, batch_size, progress)
            clean = target(run.clean_outputs, owners)
        dtype = accumulation_dtype(x)
        edited, clean = edited.to(dtype), clean.to(dtype).unsqueeze(1)
        scores = edited[:, :channels] + (clean - edited[:, channels:])
        grad_weights = gradients.to(dtype).mean(dim=(2, 3))
        weights = torch.exp(min_max_scale(scores)) * min_max_scale(grad_weights) - 0.5  # over each image's channels
        return channel_sum(weights[:, :, None, None], maps.to(dtype))
