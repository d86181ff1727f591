"""SISE: score-weighted maps of the positive-gradient feature maps of every block, fused block by block."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import positive_number
from ..core.layers import LayerSpec
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.targets import Target
from .base import min_max_scale, upsample
from .poly_cam import StageEndCAM

FUSIONS = ("otsu", "simple")
#: the authors' ``10e-7`` added to a mask's range and to its pixel sum
MASK_EPS = 1e-6
#: the authors' ``otsu``: histogram of ``round(map * 256)`` over 256 bins, bottleneck ``tau = 1.5`` and its 10% tail
OTSU_BINS = 256
OTSU_TAU = 1.5
OTSU_TAIL = 0.1


def attribution_masks(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(n, h, w) feature maps to (n, H, W) masks as the authors' ``create_attribution_masks``: bilinear upsampling
    to ``size``, minus the minimum, divided by the range plus 1e-6."""
    masks = upsample(maps.unsqueeze(1), size).flatten(1)
    masks = masks - masks.amin(dim=1, keepdim=True)
    masks = masks / (masks.amax(dim=1, keepdim=True) + MASK_EPS)
    return masks.view(maps.shape[0], *size)


def otsu_level(maps: Tensor, bins: int = OTSU_BINS) -> Tuple[Tensor, Tensor]:
    """Otsu's level of each (H, W) map of (N, H, W) on the authors' histogram, and that histogram.

    A pixel ``v`` counts in bin ``round(v * bins)`` (half to even, as NumPy), ``bins`` itself in the last bin and
    values outside ``[0, bins]`` nowhere (``np.histogram(..., bins, [0, bins])``).  The level ``t`` in
    ``1 .. bins - 1`` splits the bins into ``[0, t)`` and ``[t, bins)`` and maximises the between-class variance
    ``w0 w1 (u0 - u1)^2`` (unnormalised counts; the first maximum); a split with an empty class scores 0, so a map
    with a single occupied bin gets 0.  Returns ``t`` (N,) as integers and the counts (N, bins), in float64.
    """
    flat = torch.round(maps.detach().flatten(1).to(torch.float64) * bins)
    inside = (flat >= 0) & (flat <= bins)
    index = flat.clamp(0, bins - 1).nan_to_num(0).long()
    hist = torch.zeros(flat.shape[0], bins, dtype=torch.float64, device=maps.device)
    hist.scatter_add_(1, index, inside.to(torch.float64))
    levels = torch.arange(bins, dtype=torch.float64, device=maps.device)
    w0 = hist.cumsum(dim=1)[:, :-1]  # pixels below level j, j = 1 .. bins - 1
    m0 = (hist * levels).cumsum(dim=1)[:, :-1]
    w1 = hist.sum(dim=1, keepdim=True) - w0
    m1 = (hist * levels).sum(dim=1, keepdim=True) - m0
    both = (w0 > 0) & (w1 > 0)
    u0 = m0 / torch.where(both, w0, torch.ones_like(w0))
    u1 = m1 / torch.where(both, w1, torch.ones_like(w1))
    variance = torch.where(both, w0 * w1 * (u0 - u1) * (u0 - u1), torch.zeros_like(w0))
    variance = torch.cat([torch.zeros_like(variance[:, :1]), variance], dim=1)  # level 0: nothing below
    return variance.argmax(dim=1), hist


def otsu_threshold(maps: Tensor, bins: int = OTSU_BINS, tau: float = OTSU_TAU) -> Tensor:
    """The authors' adaptive threshold of each map of (N, H, W) in [0, 1], (N,) in the maps' dtype.

    With ``t`` = :func:`otsu_level`: ``t * tau / bins`` when fewer than 10% of the pixels lie in the bins from
    ``round(t * tau)`` up (the map's top is a small peak: the threshold is raised), else ``t / bins``.
    """
    level, hist = otsu_level(maps, bins)
    level = level.to(torch.float64)
    raised = torch.round(level * tau)
    before = torch.cat([torch.zeros_like(hist[:, :1]), hist.cumsum(dim=1)], dim=1)
    total = before[:, -1]
    tail = total - before.gather(1, raised.clamp(max=bins).long().unsqueeze(1)).squeeze(1)
    threshold = torch.where(tail < OTSU_TAIL * total, level * tau, level) / bins
    return threshold.to(maps.dtype)


def fuse_visualization_maps(maps: Sequence[Tensor], fusion: str = "otsu", temperature: float = 100.0) -> Tensor:
    """The authors' cascade over (N, H, W) maps in [0, 1], shallow to deep: ``E = V_1``, then for each deeper
    ``V``: ``E = (E + V) * g(V)`` with ``g(V) = sigmoid(temperature * (V - otsu_threshold(V)))`` (``'otsu'``) or
    ``g(V) = V`` (``'simple'``).  The threshold is a constant for autograd (a histogram's argmax)."""
    fused = maps[0]
    for current in maps[1:]:
        if fusion == "simple":
            gate = current
        else:
            threshold = otsu_threshold(current.detach()).view(-1, 1, 1)
            gate = torch.sigmoid((current - threshold) * temperature)
        fused = (fused + current) * gate
    return fused


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


@register("sise")
class SISE(StageEndCAM):
    """SISE (Semantic Input Sampling for Explanation): score-weighted masks of the positive-gradient feature maps
    at the end of every block, fused from the shallowest block to the deepest.

    Sattarzadeh, Sudhakar, Lem, Mehryar, Plataniotis, Jang, Kim, Jeong, Lee & Bae, "Explaining Convolutional Neural
    Networks through Attribution-Based Input Sampling and Block-Wise Feature Aggregation", AAAI 2021,
    arXiv:2010.00672.

    At each layer ``l``, channel ``k`` is kept when its mean gradient ``b_k = mean(d f / d A_k)`` exceeds
    ``grad_threshold * max_j b_j``; its mask ``M_k`` is ``A_k`` upsampled (bilinear) to the input, minus its
    minimum, over its range + 1e-6.  The layer's visualisation map is
    ``V_l = minmax(sum_k f(x * M_k) * M_k / (sum_pixels M_k + 1e-6))``; the maps are fused shallow to deep,
    ``E = V_1``, ``E = (E + V_l) * sigmoid(temperature * (V_l - otsu(V_l)))`` (:func:`fuse_visualization_maps`,
    :func:`otsu_threshold`).  The map returned is ``E`` at the input's size (non-negative, not rescaled: at most
    ``L`` for ``L`` layers).

    Defaults, from the authors' TensorFlow code (``create_attribution_masks``, ``visualize_layers``, ``otsu``,
    ``otsu_sigmoid``, ``fuse_visualization_maps``): ``score='softmax'`` (their Keras models end in a softmax, which
    both the gradients and the masked scores read), ``fusion='otsu'``, ``temperature=100``, Otsu's histogram of 256
    bins with their bottleneck (``tau = 1.5``, 10% tail); ``fusion='simple'`` is their other fusion,
    ``E = (E + V_l) * V_l``.  ``grad_threshold=0`` keeps the maps whose mean gradient is positive, the paper's
    selection (their code takes the threshold as a required argument; raising it keeps fewer maps and costs fewer
    forwards).  ``target_layer=None`` takes the end of every resolution stage (Poly-CAM's
    :func:`~attribution.cam.poly_cam.stage_ends`, the layers the authors' ``layer_finder`` picks before each
    downsampling: ``relu, layer1..layer4`` on a torchvision ResNet, the ReLU before each max-pooling on a VGG; on a
    model whose maps never shrink, the default CAM layer alone); a list given must be in forward order (shallow to
    deep, grids never growing).

    Cost: one forward and one backward to the shallowest layer per image (the gradients of every layer), then one
    masked forward per kept channel: at most ``sum_l C_l`` per image, about half of it at ``grad_threshold=0``
    (ResNet-50: 64 + 256 + 512 + 1024 + 2048 channels), ``batch_size`` at a time under ``torch.inference_mode``
    (with autograd when ``create_graph=True``: the map is then differentiable through the activations, the masks
    and the scores; the channel selection and the Otsu thresholds are constants).  ``progress=True`` shows a bar.

    Differences from the authors' code: their layer rule for VGG takes the max-pooling *outputs* (half the grid of
    each block's last layer; pass them as ``target_layer`` to match); a layer with no channel kept, or whose map is
    constant, gets the all-zero visualisation map (their division by a zero range gives NaN) and then the Otsu
    threshold 0; their Otsu treats an empty class as the best split (NumPy's argmax of NaN), which cannot happen on
    their min-max scaled maps and scores 0 here.  Kept from their code: when a layer's map is high almost
    everywhere (Otsu level above 256 / 1.5), the bin ``round(1.5 t)`` lies past the histogram, its tail is empty
    and the raised threshold exceeds 1, which gates that layer's whole contribution off.  The later PyTorch and
    TensorFlow ``SISE`` classes with ``grouping_thr`` (merging masks whose Otsu boxes overlap; ``detail`` prints
    the counts) compress the masks in a way the paper does not, and are not followed; they also weight by the
    model's raw outputs and fuse with hard Otsu masks (scikit-image).  Copies of one image explained for other
    classes do not share their masked forwards (the channels kept depend on the class).
    """

    uses_gradients = True
    defaults: Dict[str, Any] = {"target_layer": None, "reshape_transform": None, "grad_threshold": 0.0,
                                "fusion": "otsu", "temperature": 100.0, "score": "softmax", "progress": False}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 grad_threshold: float, fusion: str, temperature: float, progress: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        threshold = _fraction(grad_threshold, "grad_threshold")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        temperature = positive_number(temperature, "temperature")
        layers = self.target_layers(x, target_layer, reshape_transform)
        activations, kept = self._select(x, target, layers, reshape_transform, threshold, batch_size, create_graph)
        areas = [a.shape[-2] * a.shape[-1] for a in activations]
        if any(deeper > shallower for shallower, deeper in zip(areas, areas[1:])):
            names = [self._name(layer) for layer in layers]
            raise ValueError(f"target_layer must list the layers shallow to deep (grids never growing); got {names} "
                             f"with grids {[tuple(a.shape[-2:]) for a in activations]}")
        maps = self._visualization_maps(x, target, activations, kept, batch_size, create_graph, progress)
        return fuse_visualization_maps(maps, fusion, temperature).unsqueeze(1)

    def _select(self, x: Tensor, target: Target, layers: Sequence[nn.Module], reshape_transform: ReshapeTransform,
                threshold: float, batch_size: Optional[int],
                create_graph: bool) -> Tuple[List[Tensor], List[Tensor]]:
        """Every image's activations at every layer and which channels it keeps there, (B, C) booleans: mean
        gradient above ``threshold`` times the largest.  Resolves ``target=None`` to classes."""
        activations: List[List[Tensor]] = [[] for _ in layers]
        kept: List[List[Tensor]] = [[] for _ in layers]
        classes = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            outputs, acts, grads = self._capture(x[start:stop], owners, target, layers, reshape_transform,
                                                 create_graph, gradients=True)
            classes.append(outputs.detach().argmax(dim=1))
            for layer, act, grad in zip(range(len(layers)), acts, grads):
                significance = grad.detach().mean(dim=(2, 3))
                kept[layer].append(significance > threshold * significance.amax(dim=1, keepdim=True))
                activations[layer].append(act)
        if target.pending:
            target.classes = torch.cat(classes)
        return [torch.cat(chunks) for chunks in activations], [torch.cat(chunks) for chunks in kept]

    def _visualization_maps(self, x: Tensor, target: Target, activations: Sequence[Tensor], kept: Sequence[Tensor],
                            batch_size: Optional[int], create_graph: bool, progress: bool) -> List[Tensor]:
        """Each layer's (B, H, W) map ``minmax(sum_k f(x M_k) M_k / (sum M_k + 1e-6))`` over its kept channels;
        the masked forwards of all layers run ``batch_size`` at a time."""
        size = tuple(x.shape[-2:])
        rows = [mask.nonzero() for mask in kept]  # (R_l, 2): image, channel
        ends = torch.tensor([r.shape[0] for r in rows]).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        sums = [torch.zeros(x.shape[0], *size, dtype=a.dtype, device=x.device) for a in activations]
        bar = progress_bar(progress, ends[-1], f"{type(self).__name__} masked forwards")
        try:
            for start, stop in RowPlanner(ends[-1], batch_size, x.device):
                pieces = [(layer, rows[layer][max(start, first) - first:min(stop, last) - first])
                          for layer, (first, last) in enumerate(zip(starts, ends)) if first < stop and start < last]
                with torch.enable_grad() if create_graph else torch.inference_mode():
                    masks = torch.cat([attribution_masks(activations[layer][r[:, 0], r[:, 1]], size)
                                       for layer, r in pieces])
                    images = torch.cat([r[:, 0] for _, r in pieces])
                    outputs = self._forward(x[images] * masks.unsqueeze(1).to(x.dtype))
                    scores = target(outputs, images).to(masks.dtype)
                    weighted = masks * (scores / (masks.sum(dim=(1, 2)) + MASK_EPS)).view(-1, 1, 1)
                offset = 0
                for layer, r in pieces:
                    sums[layer] = sums[layer].index_add(0, r[:, 0], weighted[offset:offset + r.shape[0]])
                    offset += r.shape[0]
                bar.update(stop - start)
        finally:
            bar.close()
        return [min_max_scale(total.unsqueeze(1)).squeeze(1) for total in sums]
