"""Ablation-CAM."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.capture import ReshapeTransform
from ..core.explainer import finite_number
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import FUSIONS, channel_sum, safe_divide
from .edited_layer import EditedLayerCAM
from .tail import ablation_rows


@register("ablation_cam")
class AblationCAM(EditedLayerCAM):
    """Ablation-CAM: each channel weighted by the relative drop of the target score when it is zeroed.

    Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via Gradient-free
    Localization", WACV 2020 (no arXiv version).

    ``w_k = (y - y_k) / y`` with ``y`` the target score and ``y_k`` the score with channel ``k`` of the layer's
    output set to ``ablation_value`` (0, as the paper), ``map = ReLU(sum_k w_k A_k)`` (weights 0 if ``y = 0``).

    Cost: one forward per image, then C *tail* passes per image (C = the layer's channels): the layer's output is
    computed once and only the modules after the layer run on the ablated copies.  The tail comes from tracing the
    model with ``torch.fx`` (see :mod:`attribution.cam.tail`); when fx cannot trace the model or cut it after the
    layer, AblationCAM falls back to C full forwards per image with a forward hook that replaces the layer's
    output by the ablated copies (``self.last_mode`` says ``'tail'`` or ``'full'``; ``use_tail=False`` forces full
    forwards).  Ablated copies run
    ``batch_size`` rows at a time (``None``: on a CPU, as many tail rows as fit in 64 MiB of layer output, at least
    16, or 16 full forwards; on CUDA, sized by the memory probe), without autograd unless ``create_graph=True``;
    ``progress=True`` shows a bar.

    Layers whose output is not (B, C, h, w) are read through the same layout as every CAM's (token sequences,
    channels-last maps; see :mod:`attribution.core.spatial`) or through ``reshape_transform``: channel ``k`` is
    ablated where the layout takes map ``A_k`` from, i.e. feature ``k`` of every *patch* token of a vision
    transformer (class, distillation and register tokens are left as they are, as they are not part of the map),
    and the model runs on with the output kept in its own shape.  A ``reshape_transform`` must only select and
    rearrange elements (a view, permute or slice), so that the ablated elements can be found.

    Differences from pytorch-grad-cam: it ablates with 0 only when the layer's minimum activation is exactly 0
    and otherwise with ``min - 1e7`` (here: always ``ablation_value``), always runs full forwards, and offers
    ``ratio_channels_to_ablate`` (here all channels are ablated).
    """

    defaults = {**EditedLayerCAM.defaults, "ablation_value": 0.0}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, ablation_value: float, use_tail: bool, progress: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        value = finite_number(ablation_value, "ablation_value")
        layers = self.target_layers(x, target_layer, reshape_transform)
        maps = [self._layer_ablation(x, target, layer, reshape_transform, value, use_tail, progress,
                                     batch_size, create_graph) for layer in layers]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _layer_ablation(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                        value: float, use_tail: bool, progress: bool, batch_size: Optional[int],
                        create_graph: bool) -> Tensor:
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = self._layer_runner(layer, x, batch_size, use_tail)
            maps, positions = self._layer_maps(run, layer, x, reshape_transform)
            owners = torch.arange(x.shape[0], device=x.device)
            clean = target(run.clean_outputs, owners)
            acts = run.activations
            ablated = self._edited_scores(
                run, target, maps.shape[1],
                lambda image, channel: ablation_rows(acts, image, channel, value, positions), batch_size, progress)
        dtype = accumulation_dtype(x)
        clean = clean.to(dtype).unsqueeze(1)
        weights = safe_divide(clean - ablated.to(dtype), clean)
        return channel_sum(weights[:, :, None, None], maps.to(dtype))
