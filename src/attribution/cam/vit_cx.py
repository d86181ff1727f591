"""ViT-CX: masks from a layer's feature maps, merged by clustering, scored by their causal impact on the output."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import non_negative_number
from ..core.layers import LayerSpec
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, safe_divide, scale_as_upsampled, upsample


def complete_linkage(distance: Tensor, threshold: float) -> Tensor:
    """Agglomerative clustering with complete linkage, for a batch of (N, N) distance matrices at once.

    Repeatedly merges the two closest clusters, the distance of two clusters being the largest distance between
    their members, while that distance is below ``threshold`` (as scikit-learn's ``AgglomerativeClustering(
    linkage='complete', distance_threshold=threshold)``).  Returns (B, N) labels: each item's cluster is named by
    the smallest index among its members.  Cost: at most N - 1 merges, each a (B, N, N) minimum.
    """
    if distance.dim() != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must be (B, N, N), got {tuple(distance.shape)}")
    batch, count, _ = distance.shape
    inf = torch.tensor(float("inf"), dtype=distance.dtype, device=distance.device)
    work = distance.clone()
    eye = torch.eye(count, dtype=torch.bool, device=distance.device)
    work = torch.where(eye, inf, work)
    labels = torch.arange(count, device=distance.device).expand(batch, count).clone()
    images = torch.arange(batch, device=distance.device)
    for _ in range(count - 1):
        closest, where = work.flatten(1).min(dim=1)
        live = closest < threshold
        if not bool(live.any()):
            break
        b = images[live]
        first, second = where[live] // count, where[live] % count
        keep, gone = torch.minimum(first, second), torch.maximum(first, second)
        merged = torch.maximum(work[b, keep], work[b, gone])           # complete linkage: the farther member
        merged[torch.arange(b.shape[0], device=b.device), keep] = inf
        work[b, keep] = merged
        work[b, :, keep] = merged
        work[b, gone] = inf
        work[b, :, gone] = inf
        relabel = labels[b] == gone.unsqueeze(1)
        labels[b] = torch.where(relabel, keep.unsqueeze(1), labels[b])
    return labels


def upsampling_gram(size: Sequence[int], out_size: Sequence[int], dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """``U^T U`` (hw, hw) for the bilinear upsampling ``U`` from ``size`` to ``out_size``: inner products of
    upsampled maps, ``<U a, U b> = a^T (U^T U) b``, without upsampling them."""
    h, w = size
    basis = torch.eye(h * w, dtype=dtype, device=device).view(h * w, 1, h, w)
    up = upsample(basis, out_size).flatten(1)                           # (hw, H*W): row j is U e_j
    return up @ up.T


@register("vit_cx")
class ViTCX(CAM):
    """ViT-CX: the layer's feature maps as masks, merged by clustering, each weighted by its causal impact.

    Xie, Li, Cao & Zhang, "ViT-CX: Causal Explanation of Vision Transformers", IJCAI 2023, arXiv:2211.03064.

    With ``M_c`` channel ``c``'s feature map upsampled (bilinear) to the input and min-max scaled to [0, 1]:
    channels whose masks are similar (cosine distance ``1 - cos(M_c, M_d)``) are merged by agglomerative
    clustering with complete linkage while the distance is below ``distance_threshold`` (default 0.1, as the
    authors); each cluster's mask ``M_k`` is the min-max scaled sum of its members.  Each mask is scored by its
    causal impact with noise ``n_k ~ N(0, noise^2)`` per pixel (default 0.1, in the model's input space) filling
    what the mask removes:
    ``s_k = f_t(x * M_k + (1 - M_k) * n_k) - f_t(x + (1 - M_k) * n_k) + f_t(x)``,
    so that the noise's own effect cancels; and the map corrects the pixel coverage bias (pixels covered by many
    masks would otherwise collect more score): ``map = (1/K) sum_k s_k M_k / sum_j M_j``.  ``f_t`` is the
    target's softmax probability by default (``score='softmax'``, as the authors).  Raw: no ReLU, no scaling.

    Options: ``distance_threshold``, ``noise`` (0 turns the noise off: ``s_k = f_t(x * M_k)``), ``generator`` (for
    the noise; one draw per mask, image by image, clusters ordered by their first channel), ``progress``; the
    layer as every CAM (ViTs need no reshape; the authors' examples use the last block's ``norm1``, the default
    here is the library's rule).  Similarities are computed at the layer's resolution (a map is scaled by the
    range of its upsampled version, which upsampling then preserves, and ``U^T U`` gives the inner products of
    upsampled maps) and the clustering runs for the whole batch at once (up to C - 1 merges over a (B, C, C)
    matrix).  Cost per image: two forwards, then 2 K masked forwards (K with ``noise=0``; K clusters, at most the
    layer's C channels) run ``batch_size`` at a time under ``torch.inference_mode``.  After a call,
    ``last_cluster_counts`` holds K for every image (one tensor per layer).
    """

    uses_gradients = False
    defaults: Dict[str, Any] = {**CAM.defaults, "score": "softmax", "distance_threshold": 0.1, "noise": 0.1,
                                "generator": None, "progress": False}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, distance_threshold: float, noise: float, generator: Optional[torch.Generator],
                 progress: bool, batch_size: Optional[int], create_graph: bool) -> Tensor:
        if not isinstance(distance_threshold, (int, float)) or isinstance(distance_threshold, bool) \
                or not 0 <= distance_threshold <= 2:
            raise ValueError(f"distance_threshold must be a number in [0, 2], got {distance_threshold!r}")
        non_negative_number(noise, "noise")
        layers = self.target_layers(x, target_layer, reshape_transform)
        activations = self._capture_all(x, target, layers, reshape_transform, batch_size, create_graph)
        clean = self._scores(x, torch.arange(x.shape[0], device=x.device), target, create_graph)
        maps = []
        self.last_cluster_counts: List[Tensor] = []
        for acts in activations:
            masks, counts = self._cluster_masks(acts, x.shape[-2:], float(distance_threshold))
            self.last_cluster_counts.append(counts.cpu())
            maps.append(self._causal_map(x, masks, counts, clean, target, float(noise), generator, batch_size,
                                         create_graph, progress))
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _scores(self, rows: Tensor, owners: Tensor, target: Target, create_graph: bool) -> Tensor:
        """``f_t`` of ``rows`` for their owners' targets (no autograd unless ``create_graph``)."""
        with torch.enable_grad() if create_graph else torch.inference_mode():
            values = target(self._forward(rows), owners).to(accumulation_dtype(rows))
        return values if create_graph else values.clone()

    @staticmethod
    def _cluster_masks(acts: Tensor, size: Sequence[int], threshold: float) -> Tuple[Tensor, Tensor]:
        """The min-max scaled cluster masks of every image at the layer's resolution, (sum K, 1, h, w) image by
        image and within an image by first channel, and each image's K, (B,)."""
        batch, channels, h, w = acts.shape
        scaled = scale_as_upsampled(acts.reshape(batch * channels, 1, h, w), size).view(batch, channels, h * w)
        gram = upsampling_gram((h, w), size, scaled.dtype, scaled.device)
        inner = scaled @ gram @ scaled.transpose(1, 2)                               # (B, C, C)
        norms = inner.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        cosine = safe_divide(inner, norms.unsqueeze(2) * norms.unsqueeze(1))
        labels = complete_linkage(1 - cosine.detach(), threshold)  # discrete: no gradient flows through it
        # a cluster is named by its first channel: sum every channel into that slot, keep the slots that name one
        summed = torch.zeros_like(scaled).scatter_add(1, labels.unsqueeze(2).expand_as(scaled), scaled)
        roots = labels == torch.arange(channels, device=labels.device)               # (B, C)
        masks = scale_as_upsampled(summed[roots].view(-1, 1, h, w), size)
        return masks, roots.sum(dim=1)

    def _causal_map(self, x: Tensor, flat_masks: Tensor, counts: Tensor, clean: Tensor, target: Target,
                    noise: float, generator: Optional[torch.Generator], batch_size: Optional[int],
                    create_graph: bool, progress: bool) -> Tensor:
        """``(1/K) sum_k s_k M_k / sum_j M_j`` for every image (see the class docstring), from the masks of
        :meth:`_cluster_masks`."""
        owners_of_mask = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), counts)
        total = flat_masks.shape[0]
        dtype = accumulation_dtype(x)
        changes = []
        bar = progress_bar(progress, total, f"{type(self).__name__} masks scored")
        try:
            for start, stop in RowPlanner(total, None if batch_size is None else max(1, batch_size // 2), x.device):
                owners = owners_of_mask[start:stop]
                mask = upsample(flat_masks[start:stop], x.shape[-2:]).to(x.dtype)
                images = x[owners]
                if noise:
                    draw = torch.randn(images.shape, generator=generator, dtype=x.dtype,
                                       device=x.device if generator is None else generator.device)
                    fill = (1 - mask) * noise * draw.to(x.device)
                    both = self._scores(torch.cat([images * mask + fill, images + fill]), owners.repeat(2), target,
                                        create_graph)
                    changes.append(both[: stop - start] - both[stop - start:])
                else:  # without noise the second image is x itself, whose score is known
                    changes.append(self._scores(images * mask, owners, target, create_graph) - clean[owners])
                bar.update(stop - start)
        finally:
            bar.close()
        impact = torch.cat(changes) + clean[owners_of_mask]
        size = flat_masks.shape[-2:]
        weighted = torch.zeros(x.shape[0], 1, *size, dtype=dtype, device=x.device)
        weighted = weighted.index_add(0, owners_of_mask, impact.view(-1, 1, 1, 1) * flat_masks)
        coverage = torch.zeros_like(weighted).index_add(0, owners_of_mask, flat_masks)
        up_weighted, up_coverage = upsample(weighted, x.shape[-2:]), upsample(coverage, x.shape[-2:])
        return safe_divide(up_weighted, up_coverage) / counts.to(dtype).view(-1, 1, 1, 1)
