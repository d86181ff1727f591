"""Group-CAM."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.filters import gaussian_blur
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from .base import CAM, FUSIONS, scale_as_upsampled, upsample


def group_maps(activations: Tensor, gradients: Tensor, groups: int, percentile: float) -> Tensor:
    """(n, G, h, w): Grad-CAM's weighted channels ``mean(g_k) A_k`` summed within ``groups`` runs of consecutive
    channels (``torch.chunk``'s split: ``ceil(C / groups)`` channels each, so ``G <= groups``), rectified, and set
    to 0 wherever they do not exceed their own ``percentile``-th percentile (linear interpolation, as NumPy's)."""
    channels = activations.shape[1]
    weighted = gradients.mean(dim=(2, 3), keepdim=True) * activations
    group = torch.arange(channels, device=activations.device) // -(-channels // groups)
    summed = torch.zeros((activations.shape[0], int(group[-1]) + 1) + tuple(activations.shape[2:]),
                         dtype=weighted.dtype, device=weighted.device).index_add(1, group, weighted).relu()
    threshold = torch.quantile(summed.flatten(2), percentile / 100.0, dim=2)[..., None, None]
    return torch.where(summed > threshold, summed, torch.zeros_like(summed))


@register("group_cam")
class GroupCAM(CAM):
    """Group-CAM: Grad-CAM's weighted channels in groups, each group scored by how much of the target's
    probability it restores when it unveils the image over a blurred copy.

    Zhang, Rao & Yang, "Group-CAM: Group Score-Weighted Visual Explanations for Deep Convolutional Networks",
    arXiv:2103.13859, 2021.

    ``M_g`` = :func:`group_maps` (``groups`` groups of Grad-CAM-weighted channels, kept above their
    ``percentile``-th percentile), upsampled and min-max scaled to [0, 1]; ``x_g = x * M_g + blur(x) * (1 - M_g)``;
    ``s_g = p_t(x_g) - p_t(blur(x))``; ``map = ReLU(sum_g s_g M_g)``.  The Grad-CAM weights are gradients of the
    target's logit, the scores ``s_g`` follow ``score`` (a callable target gets logits, then scores).  Defaults from the authors' code: 32 groups,
    the 70th percentile, the target's softmax probability, a 51 x 51 Gaussian blur of sigma 50 with mirrored
    borders (kornia's ``gaussian_blur2d``; edge pixels repeated for images too small to mirror 25 pixels).  The
    map is raw: the authors' code min-max scales it at the end (``attribution.utils.normalize_saliency``), and it
    skips groups whose map is constant, which here get a zero mask and so a zero score.  Cost: one forward and the
    gradient to the layer, then ``G + 1`` forwards per image (the blurred image and one per group).
    """

    defaults: Dict[str, Any] = {**CAM.defaults, "score": "softmax", "groups": 32, "percentile": 70.0,
                                "blur_size": 51, "blur_sigma": 50.0}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, groups: int, percentile: float, blur_size: int, blur_sigma: float,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        for name, value in (("groups", groups), ("blur_size", blur_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0 <= percentile <= 100:
            raise ValueError(f"percentile must lie in [0, 100], got {percentile!r}")
        if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not blur_sigma > 0:
            raise ValueError(f"blur_sigma must be a positive number, got {blur_sigma!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        per_layer: List[List[Tensor]] = [[] for _ in layers]
        classes = []
        logit = target.with_score("logit")  # Grad-CAM's weights come from the target's logit, as the authors' code
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            outputs, acts, grads = self._capture(x[start:stop], owners, logit, layers, reshape_transform,
                                                 create_graph, gradients=True)
            classes.append(outputs.argmax(dim=1))
            for store, a, g in zip(per_layer, acts, grads):
                store.append(group_maps(a, g, groups, float(percentile)))
        if target.pending:
            target.classes = torch.cat(classes)
        blurred = gaussian_blur(x, blur_size, float(blur_sigma), padding="reflect")
        owners = torch.arange(x.shape[0], device=x.device)
        with torch.set_grad_enabled(create_graph):
            base = torch.cat([target(self._forward(blurred[a:b]), owners[a:b]) for a, b in
                              RowPlanner(x.shape[0], batch_size, x.device)])
        maps = [self._scored_sum(x, blurred, base, torch.cat(chunks), target, batch_size, create_graph)
                for chunks in per_layer]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _scored_sum(self, x: Tensor, blurred: Tensor, base: Tensor, grouped: Tensor, target: Target,
                    batch_size: Optional[int], create_graph: bool) -> Tensor:
        """``ReLU(sum_g s_g M_g)`` at the input's resolution, the B x G unveiled copies ``batch_size`` at a time."""
        batch, count = grouped.shape[:2]
        total = torch.zeros((batch, 1) + tuple(x.shape[-2:]), dtype=grouped.dtype, device=x.device)
        with torch.set_grad_enabled(create_graph):
            for start, stop in RowPlanner(batch * count, batch_size, x.device):
                index = torch.arange(start, stop, device=x.device)
                image, group = index // count, index % count
                masks = upsample(scale_as_upsampled(grouped[image, group].unsqueeze(1), x.shape[-2:]),
                                 x.shape[-2:]).clamp(0, 1)
                unveiled = x[image] * masks.to(x.dtype) + blurred[image] * (1 - masks.to(x.dtype))
                scores = (target(self._forward(unveiled), image) - base[image]).to(total.dtype)
                weighted = scores.view(-1, 1, 1, 1) * masks
                total = total.index_add(0, image, weighted) if create_graph else total.index_add_(0, image, weighted)
        return total.relu()
