"""CAMERAS."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from .base import CAM, FUSIONS, upsample

#: the authors' input resolutions for a 224-pixel image: 224, 324, ..., 924
RESOLUTIONS = tuple(range(224, 1000, 100))
#: channels combined at once at the input's resolution (bounds the memory of the upsampled maps)
CHANNEL_CHUNK = 64
#: the Gram route is taken while (layer positions over all resolutions)^2 <= this x resolutions x H x W: its
#: matrix products run about this much faster per operation than the direct route's memory-bound passes
GRAM_FACTOR = 64


@register("cameras")
class CAMERAS(CAM):
    """CAMERAS: activations and gradients of the image at several input resolutions, averaged at the input's
    resolution, multiplied element-wise.

    Jalwana, Akhtar, Bennamoun & Mian, "CAMERAS: Enhanced Resolution And Sanity preserving Class Activation Mapping
    for image saliency", CVPR 2021, arXiv:2106.10649.

    The image is resized (bicubic) to each of ``resolutions`` (the first is the image itself); at each, the layer's
    activations ``A_r`` and the gradient ``G_r`` of the target's score are upsampled bilinearly to the input's size
    and averaged over the resolutions at which the model's top class is the one it predicts for the image or the
    target class (the authors' consistency rule): ``map = ReLU(sum_k mean_r(A_r)_k * mean_r(G_r)_k)``, at the
    input's full resolution (no upsampling of the map itself).  Defaults from the authors' code: resolutions 224,
    324, ..., 924 for a 224-pixel side, scaled with the input (an H x W image takes (H r / 224, W r / 224) for each
    r), the logit's gradient.  Maps are raw (the authors min-max scale them).  The model must accept larger
    inputs (CNNs; not fixed-size position embeddings).  Cost per image: one forward and a backward to the layer at
    each resolution (about 61 times the pixels of the image at the defaults), plus one forward to fix ``target=None``.
    The average of products is never formed channel by channel at full resolution when the layer's maps are
    small: a bilinear pixel mixes four positions, so the channel sum needs only the Gram matrices of the
    resolutions' activations and gradients (1.0-1.4x the model passes on a 2-core CPU against 5-9x upsampling
    every channel).
    """

    argmax_on_rows = False  # resized copies are not the image: None is resolved to the image's arg-max first
    defaults: Dict[str, Any] = {**CAM.defaults, "resolutions": RESOLUTIONS}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, resolutions: Sequence[int], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        sizes = _sizes(tuple(x.shape[-2:]), resolutions)
        layers = self.target_layers(x, target_layer, reshape_transform)
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            images = x[start:stop]
            acts: List[List[Tensor]] = [[] for _ in layers]
            grads: List[List[Tensor]] = [[] for _ in layers]
            kept, base = [], None
            for size in sizes:
                rows = images if size == sizes[0] else F.interpolate(images, size=size, mode="bicubic",
                                                                      align_corners=False)
                try:
                    outputs, layer_acts, layer_grads = self._capture(rows, owners, target, layers,
                                                                     reshape_transform, create_graph, gradients=True)
                except (AssertionError, RuntimeError) as error:
                    if size == sizes[0]:
                        raise
                    raise ValueError(f"CAMERAS runs the model at the resolutions {sizes}; {type(self.model).__name__} "
                                     f"refused a {size[0]} x {size[1]} input ({error}): it needs a model that takes "
                                     "other input sizes (CNNs; timm ViTs built with dynamic_img_size=True), or "
                                     "resolutions=[one value] for the image's own size only") from error
                predicted = outputs.argmax(dim=1)
                base = predicted if base is None else base
                agree = predicted == base
                if target.classes is not None:
                    agree = agree | (predicted == target.classes[owners])
                kept.append(agree)
                for store, a in zip(acts, layer_acts):
                    store.append(a)
                for store, g in zip(grads, layer_grads):
                    store.append(g)
            weights = torch.stack(kept, dim=1).to(acts[0][0].dtype)  # (n, R): 1 where a resolution counts
            maps = [_combine(a, g, weights, tuple(x.shape[-2:])) for a, g in zip(acts, grads)]
            chunks.append(self._fuse(maps, x.shape[-2:], layer_fusion))
        return torch.cat(chunks)


def _combine(acts: List[Tensor], grads: List[Tensor], weights: Tensor, size: Tuple[int, int]) -> Tensor:
    """ReLU(sum_k mean_r(up(A_r))_k mean_r(up(G_r))_k), the means over the resolutions ``weights`` (n, R) keeps:
    (n, 1, H, W).  Small layer maps take the Gram route (:func:`_gram_sum`), large ones the direct one
    (:func:`_direct_sum`); both compute the same sum."""
    count = weights.sum(dim=1)[:, None, None, None]
    keep = [w[:, None, None, None] for w in weights.unbind(1)]
    acts = [a * w for a, w in zip(acts, keep)]  # upsampling is linear: a left-out resolution is zeroed before it
    grads = [g * w for g, w in zip(grads, keep)]
    positions = sum(a.shape[-2] * a.shape[-1] for a in acts)
    direct = positions ** 2 > GRAM_FACTOR * len(acts) * size[0] * size[1]
    total = _direct_sum(acts, grads, size) if direct else _gram_sum(acts, grads, size)
    return F.relu(total / count ** 2)


def _direct_sum(acts: List[Tensor], grads: List[Tensor], size: Tuple[int, int]) -> Tensor:
    """sum_k (sum_r up(A_r))_k (sum_r up(G_r))_k with the maps upsampled, ``CHANNEL_CHUNK`` channels at a time."""
    total = None
    for first in range(0, acts[0].shape[1], CHANNEL_CHUNK):
        part = slice(first, first + CHANNEL_CHUNK)
        mean_a = _upsampled_sum([a[:, part] for a in acts], size)
        mean_g = _upsampled_sum([g[:, part] for g in grads], size)
        term = (mean_a * mean_g).sum(dim=1, keepdim=True)
        total = term if total is None else total + term
    return total


def _gram_sum(acts: List[Tensor], grads: List[Tensor], size: Tuple[int, int]) -> Tensor:
    """The same sum without upsampling any channel: a bilinear output pixel mixes four input positions, so the
    channel sum of a product of two upsampled maps is a mix of 16 entries of their Gram matrix
    ``M[i, j] = sum_k A_k(i) G_k(j)`` (one matrix product per pair of resolutions)."""
    taps = [_bilinear_taps(tuple(a.shape[-2:]), size, a.device, a.dtype) for a in acts]
    total = torch.zeros(acts[0].shape[0], size[0] * size[1], dtype=acts[0].dtype, device=acts[0].device)
    for a, (rows_a, mix_a) in zip(acts, taps):
        flat_a = a.flatten(2).transpose(1, 2)  # (n, P_r, C)
        for g, (rows_g, mix_g) in zip(grads, taps):
            gram = flat_a @ g.flatten(2)  # (n, P_r, P_s)
            index = (rows_a[:, :, None] * gram.shape[2] + rows_g[:, None, :]).flatten()
            entries = gram.flatten(1)[:, index].view(gram.shape[0], -1, 16)
            total = total + (entries * (mix_a[:, :, None] * mix_g[:, None, :]).flatten(1)).sum(dim=2)
    return total.view(-1, 1, *size)


def _bilinear_taps(source: Tuple[int, int], size: Tuple[int, int], device: torch.device,
                   dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """For bilinear upsampling from ``source`` to ``size`` (``align_corners=False``): each output pixel's four
    input positions (H*W, 4) and weights (H*W, 4), read from ``F.interpolate`` of unit vectors (so exactly its)."""
    axes = []
    for length, target in zip(source, size):
        basis = torch.eye(length, dtype=dtype, device=device).view(1, length, length, 1)
        matrix = F.interpolate(basis, size=(target, 1), mode="bilinear", align_corners=False)[0, :, :, 0].T
        weight, index = matrix.topk(min(2, length), dim=1)  # (target, 2): at most two inputs per output
        if length == 1:
            weight, index = torch.cat([weight, weight * 0], 1), torch.cat([index, index], 1)
        axes.append((index, weight))
    (row_index, row_weight), (col_index, col_weight) = axes
    index = row_index[:, None, :, None] * source[1] + col_index[None, :, None, :]  # (H, W, 2, 2)
    weight = row_weight[:, None, :, None] * col_weight[None, :, None, :]
    return index.reshape(-1, 4), weight.reshape(-1, 4)


def _upsampled_sum(maps: List[Tensor], size: Tuple[int, int]) -> Tensor:
    """sum_r up(maps[r]) at ``size``, accumulated in place."""
    total = upsample(maps[0], size)
    total = total.clone() if total is maps[0] else total  # never add into a caller's tensor
    for m in maps[1:]:
        total += upsample(m, size)
    return total


def _sizes(size: Tuple[int, int], resolutions: Sequence[int]) -> List[Tuple[int, int]]:
    """The input sizes: the image's own, then each resolution scaled by the image's size over the first one."""
    values = tuple(resolutions) if not isinstance(resolutions, (int, str)) else ()
    if not values or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values):
        raise ValueError(f"resolutions must be a non-empty sequence of positive ints, got {resolutions!r}")
    height, width = size
    return [size] + [(max(1, round(height * r / values[0])), max(1, round(width * r / values[0])))
                     for r in values[1:]]
