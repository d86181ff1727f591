"""Recipro-CAM."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import FUSIONS
from .edited_layer import EditedLayerCAM


def location_kernel(height: int, width: int, gaussian: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(S, S) weights, S = height * width, row ``s`` saying how much of location ``s``'s feature vector each
    location of its copy holds: the identity, or the 3x3 binomial kernel ``[1, 2, 1]^T [1, 2, 1] / 16`` centred
    on ``s`` and cut at the map's border (not renormalised there, as the authors' code)."""
    if not gaussian:
        return torch.eye(height * width, device=device, dtype=dtype)

    def band(n: int) -> Tensor:
        off = torch.ones(n - 1, device=device, dtype=dtype) / 4
        return torch.eye(n, device=device, dtype=dtype) / 2 + torch.diag(off, 1) + torch.diag(off, -1)

    return torch.kron(band(height), band(width))


def location_rows(activations: Tensor, owners: Tensor, locations: Tensor, kernel: Tensor,
                  positions: Optional[Tensor] = None) -> Tensor:
    """Copies of ``activations[owners]`` in which the map holds only location ``locations[r]``'s feature vector,
    spread over the map by ``kernel[locations[r]]`` (every other map element 0).  ``positions`` (C, h*w), for a
    layer output that is not (B, C, h, w), says where the map's elements lie in one image's flattened output;
    elements outside the map (class and register tokens) are kept as they are."""
    spread = kernel[locations].unsqueeze(1)  # (N, 1, S)
    if positions is None:
        centre = activations.flatten(2)[owners, :, locations]  # (N, C): only the kept vectors are read
        return (centre.unsqueeze(2) * spread).view(owners.shape[0], *activations.shape[1:])
    rows = activations[owners]  # a copy: the elements outside the map keep their values
    flat = rows.reshape(rows.shape[0], -1)
    centre = flat.gather(1, positions[:, locations].T)  # (N, C)
    flat.scatter_(1, positions.flatten().expand(rows.shape[0], -1), (centre.unsqueeze(2) * spread).flatten(1))
    return flat.view(rows.shape)


@register("recipro_cam")
class ReciproCAM(EditedLayerCAM):
    """Recipro-CAM: the target's score when the layer's map keeps only one location, for every location.

    Byun & Lee, "Recipro-CAM: Fast gradient-free visual explanations for convolutional neural networks",
    arXiv:2209.14074 (2022); "ReciproCAM: Lightweight Gradient-free Class Activation Map for Post-hoc
    Explanations", CVPR 2024 Workshops.

    ``map(s) = softmax(g(F * M_s))_c`` for every location ``s`` of the layer's (C, h, w) output ``F``, with ``g``
    the part of the model after the layer and ``M_s`` the mask that keeps ``F``'s feature vector at ``s`` only.
    ``gaussian=True`` instead spreads that vector to the 3x3 neighbourhood with the weights
    ``[1, 2, 1]^T [1, 2, 1] / 16`` (``F(s) * k(s' - s)`` at ``s'``), the 2022 variant; the default (``False``) is
    the authors' CVPR 2024 code.  The score is the softmax probability (``score='softmax'``, as the authors; any
    ``score`` may be given).  Maps are raw probabilities upsampled to the input: the authors min-max normalise each
    map, which ``attribution.utils.normalize_saliency`` does.

    On a linear head (global average pooling and a linear layer) with ``score='logit'``, the map is exactly
    ``CAM / (h w) + b_c`` (Zhou et al.'s CAM; with ``gaussian=True``, each location's CAM term is scaled by the
    kernel mass inside the map).

    Cost: one forward per image and h*w *tail* passes per image (49 for ResNet-50 at 224 px), no backward: only
    the modules after the layer run on the copies (see :class:`attribution.cam.edited_layer.EditedLayerCAM` for
    the full-forward fallback, ``use_tail``, ``batch_size`` and ``progress``).  Token outputs of vision
    transformers are edited on their patch tokens (class and register tokens kept), as ViT-ReciproCAM
    (arXiv:2310.02588) does, on the layer this library picks by default (pass ``target_layer`` to choose another).
    """

    defaults = {**EditedLayerCAM.defaults, "score": "softmax", "gaussian": False}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, gaussian: bool, use_tail: bool, progress: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if not isinstance(gaussian, bool):
            raise TypeError(f"gaussian must be a bool, got {gaussian!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        maps = [self._layer_map_of(x, target, layer, reshape_transform, gaussian, use_tail, progress, batch_size,
                                   create_graph) for layer in layers]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _layer_map_of(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                      gaussian: bool, use_tail: bool, progress: bool, batch_size: Optional[int],
                      create_graph: bool) -> Tensor:
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = self._layer_runner(layer, x, batch_size, use_tail)
            maps, positions = self._layer_maps(run, layer, x, reshape_transform)
            height, width = maps.shape[-2:]
            acts = run.activations
            kernel = location_kernel(height, width, gaussian, acts.device, acts.dtype)
            scores = self._edited_scores(
                run, target, height * width,
                lambda image, location: location_rows(acts, image, location, kernel, positions), batch_size, progress)
        return scores.to(accumulation_dtype(x)).view(x.shape[0], 1, height, width)
