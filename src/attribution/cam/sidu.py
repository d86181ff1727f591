"""SIDU: similarity difference and uniqueness."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.resize import linear_reflect_matrix
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS

#: added to the range of the uniqueness scores before they are min-max scaled (the reference's)
RANGE_EPSILON = 1e-13


@register("sidu")
class SIDU(CAM):
    """SIDU: masks from a layer's binarised feature maps, weighted by how little they change the target's score
    (similarity difference) and how different their predictions are from the other masks' (uniqueness).

    Muddamsetty, Jahromi & Moeslund, "SIDU: Similarity Difference and Uniqueness Method for Explainable AI",
    ICIP 2020, arXiv:2006.03122; extended in Pattern Recognition 2022 ("Visual explanation of black-box model:
    Similarity Difference and Uniqueness (SIDU) method").

    Masks ``M_k = up([A_k > threshold])`` for every channel ``k`` of the layer's (C, h, w) output, upsampled
    bilinearly to the image (scikit-image's ``resize(order=1, mode='reflect')``, as the authors' code, exactly:
    :func:`attribution.core.resize.linear_reflect_matrix`); ``p_k`` the model's softmax outputs on ``x * M_k``.
    ``SD_k = exp(-(y_t(x) - y_t(x M_k))^2 / (2 kernel_width^2))`` with ``y_t`` the target's score (its softmax
    probability by default, as the authors'), ``U_k = sum_j ||p_k - p_j||`` min-max scaled over the masks of the
    image, and ``map = sum_k SD_k U_k M_k / (C p1)``.  Defaults from the authors' code: ``threshold=0.5`` on the raw
    activations, ``kernel_width=0.25``, ``p1=0.5`` (a constant scale).  The uniqueness always compares softmax
    probability vectors (the authors' models end in a softmax; here the model's outputs are taken as logits);
    the masks are resized to the image itself (the authors' code resizes to the next multiple of 8, which is the
    image for their 224 x 224 inputs).  Not rectified, not normalised.
    Cost: one forward per image and ``C`` masked forwards per image (2048 at ResNet-50's last block), no backward;
    the (C, C) distances between each image's prediction vectors.
    """

    uses_gradients = False
    defaults = {**CAM.defaults, "score": "softmax", "threshold": 0.5, "kernel_width": 0.25, "p1": 0.5}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, threshold: float, kernel_width: float, p1: float, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        for name, value, positive in (("threshold", threshold, False), ("kernel_width", kernel_width, True),
                                      ("p1", p1, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
                raise ValueError(f"{name} must be a {'positive ' if positive else ''}number, got {value!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        with torch.set_grad_enabled(create_graph):
            activations, clean = self._capture_with_scores(x, target, layers, reshape_transform, batch_size,
                                                           create_graph)
            maps = [self._layer_map_of(x, target, acts, clean, float(threshold), float(kernel_width), float(p1),
                                       batch_size) for acts in activations]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _layer_map_of(self, x: Tensor, target: Target, acts: Tensor, clean: Tensor, threshold: float,
                      kernel_width: float, p1: float, batch_size: Optional[int]) -> Tensor:
        batch, channels = acts.shape[:2]
        dtype = accumulation_dtype(x)
        cells = (acts > threshold).to(x.dtype)  # (B, C, h, w): binary, no gradient through the threshold
        empty = cells.flatten(1).amax(dim=1) == 0
        if bool(empty.any()):
            image = int(empty.nonzero()[0])
            raise ValueError(f"threshold={threshold} keeps no element of the layer's output for image {image} (its "
                             f"largest activation is {float(acts[image].max()):.4g}): every mask would be empty; "
                             "pass a lower threshold (the authors' 0.5 suits ReLU feature maps of ImageNet CNNs)")
        rows = linear_reflect_matrix(x.shape[-2], acts.shape[-2]).to(device=x.device, dtype=x.dtype)
        cols = linear_reflect_matrix(x.shape[-1], acts.shape[-1]).to(device=x.device, dtype=x.dtype)
        scores: List[Tensor] = []
        probabilities: List[Tensor] = []
        # image-major rows (row r: image r // C, channel r % C): each image's masks are its own
        for start, stop in RowPlanner(batch * channels, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            image, channel = index // channels, index % channels
            masks = rows @ cells[image, channel] @ cols.T  # (n, H, W)
            outputs = self._forward(x[image] * masks.unsqueeze(1))
            scores.append(target(outputs, image).to(dtype))
            probabilities.append(outputs.to(dtype).softmax(dim=1))
        score = torch.cat(scores).view(batch, channels)
        predictions = torch.cat(probabilities).view(batch, channels, -1)
        similarity = torch.exp(-(clean.to(dtype)[:, None] - score).square() / (2 * kernel_width ** 2))
        # pairwise, not through the Gram matrix (whose cancellation costs 1e-5 on probability vectors)
        distance = torch.cdist(predictions, predictions, compute_mode="donot_use_mm_for_euclid_dist").sum(dim=2)
        low = distance.amin(dim=1, keepdim=True)
        uniqueness = (distance - low) / (distance.amax(dim=1, keepdim=True) - low + RANGE_EPSILON)
        weights = (similarity * uniqueness).to(x.dtype)
        # the resize is linear: weigh the small binary maps, then resize once
        small = (weights[:, :, None, None] * cells).sum(dim=1, keepdim=True)
        return (rows @ small @ cols.T).to(dtype) / (channels * p1)
