"""CF-CAM: Grad-CAM with the layer's channels clustered by DBSCAN, gradients filtered per cluster, softmax weights."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.capture import ReshapeTransform
from ..core.explainer import positive_number
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from .base import CAM

#: the ``gradient_filter`` choices: the authors' filter (their code's ``_bilateral_filter``) or OpenCV's bilateral
GRADIENT_FILTERS = ("authors", "bilateral")
#: the authors' floors: DBSCAN's radius is at least ``EPS_FLOOR``, its ``min_samples`` at least ``MIN_SAMPLES_FLOOR``
EPS_FLOOR = 1e-5
MIN_SAMPLES_FLOOR = 2
#: label of a channel kept for its large norm (not clustered), and of a channel DBSCAN calls noise (dropped)
IMPORTANT, NOISE = -2, -1
#: the clustering runs on chunks of images with at most this many channel pairs (bounds its (B, C, C) memory)
CLUSTER_PAIRS = 1 << 24


# ------------------------------------------------------------------------------------------------- clustering
def pairwise_distances(features: Tensor) -> Tensor:
    """Euclidean distances of the rows of (B, N, D) ``features``, (B, N, N): exactly symmetric, zero diagonal
    (through Gram matrices, so compute them in float64)."""
    squares = features.square().sum(dim=2)
    twice = torch.baddbmm(squares[:, :, None] + squares[:, None, :], features, features.transpose(1, 2), alpha=-2)
    twice = twice + twice.transpose(1, 2)  # twice the squared distances, bitwise symmetric: a + b == b + a
    distance = twice.clamp_min_(0).mul_(0.5).sqrt_()
    distance.diagonal(dim1=1, dim2=2).zero_()
    return distance


def pair_quantile(distance: Tensor, points: Tensor, q: float) -> Tensor:
    """``numpy.percentile(d, 100 q)`` (linear interpolation) of the distances ``d`` between distinct points of each
    image (both orders, as the authors' off-diagonal list), over the points ``points`` (B, N) selects; (B,), NaN
    where fewer than two points.  Each distance appears twice in that list, so the order statistics come from the
    upper triangle (one ``kthvalue`` per distinct point count in the batch: the count varies only with ties)."""
    batch, count, _ = distance.shape
    rows, cols = torch.triu_indices(count, count, 1, device=distance.device)
    upper = distance[:, rows, cols].masked_fill(~(points[:, rows] & points[:, cols]), float("inf"))  # others last
    sizes = points.sum(dim=1)
    out = distance.new_full((batch,), float("nan"))
    for size in torch.unique(sizes).tolist():
        pairs = size * (size - 1)                                                  # ordered pairs, both orders
        if pairs == 0:
            continue
        position = q * (pairs - 1)
        low = math.floor(position)
        high = min(low + 1, pairs - 1)
        chosen = sizes == size
        values = upper[chosen]
        a = values.kthvalue(low // 2 + 1, dim=1).values                            # sorted list d[i] = u[i // 2]
        b = a if high // 2 == low // 2 else values.kthvalue(high // 2 + 1, dim=1).values
        out[chosen] = torch.lerp(a, b, position - low)
    return out


def dbscan(distance: Tensor, eps: Union[float, Tensor], min_samples: Union[int, Tensor],
           points: Optional[Tensor] = None) -> Tensor:
    """DBSCAN on a batch of (B, N, N) distance matrices at once, as scikit-learn's ``DBSCAN(eps, min_samples,
    metric='precomputed')`` on each.

    ``eps`` and ``min_samples``: numbers or (B,) tensors; ``points`` (B, N) bool: the items that take part (all by
    default; the others are labelled noise and count for nobody).  A point is a core point when at least
    ``min_samples`` points (itself included) lie within ``eps`` (``<=``); clusters are the connected components of
    the core points under that neighbourhood, found by min-label propagation with pointer jumping (each pass one
    (B, N, N) minimum); a non-core point within ``eps`` of core points joins the cluster with the smallest first
    core point among them (the cluster scikit-learn's depth-first search in index order reaches first).  Returns
    (B, N) long labels: -1 for noise, else the index of the cluster's first core point (scikit-learn numbers the
    clusters in that order).
    """
    if distance.dim() != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must be (B, N, N), got {tuple(distance.shape)}")
    batch, count, _ = distance.shape
    device = distance.device
    if points is None:
        points = torch.ones(batch, count, dtype=torch.bool, device=device)
    eps = torch.as_tensor(eps, dtype=distance.dtype, device=device).expand(batch)
    min_samples = torch.as_tensor(min_samples, device=device).expand(batch)
    near = (distance <= eps[:, None, None]) & points[:, :, None] & points[:, None, :]
    core = (near.sum(dim=2) >= min_samples[:, None]) & points
    links = near & core[:, :, None] & core[:, None, :]
    index = torch.arange(count, device=device, dtype=torch.int32).expand(batch, count)
    labels = torch.where(core, index, count)                                        # count: not yet a core label
    for _ in range(count + 1):
        spread = torch.where(links, labels[:, None, :], count).amin(dim=2)        # core points only: links
        jumped = labels.gather(1, spread.clamp_max(count - 1).long())              # the label's own label
        new = torch.minimum(spread, jumped).masked_fill(~core, count)
        if torch.equal(new, labels):
            break
        labels = new
    border = torch.where(near & core[:, None, :], labels[:, None, :], count).amin(dim=2)
    labels = torch.where(core, labels, border).long()
    return torch.where(labels < count, labels, torch.full_like(labels, NOISE))


def cluster_channels(activations: Tensor, norm_quantile: float, eps_quantile: float,
                     min_samples_fraction: float) -> Tensor:
    """The authors' hierarchical clustering of each image's channels, (B, C) long labels.

    Channels whose feature map has an L2 norm at or above the ``norm_quantile`` quantile of the image's norms are
    kept as they are (label -2); the others are clustered by DBSCAN on their flattened maps (Euclidean), with
    ``eps`` the ``eps_quantile`` quantile of their pairwise distances (at least 1e-5) and ``min_samples =
    max(2, floor(R min_samples_fraction))`` for R such channels: -1 for noise, else the cluster's first core
    channel.  Computed in float64 on detached activations (labels are constants for autograd), in chunks of
    images that bound the (B, C, C) matrices.
    """
    batch, channels = activations.shape[:2]
    step = max(1, CLUSTER_PAIRS // max(1, channels * channels))
    return torch.cat([_cluster_chunk(activations[start:start + step], norm_quantile, eps_quantile,
                                     min_samples_fraction) for start in range(0, batch, step)])


def _cluster_chunk(activations: Tensor, norm_quantile: float, eps_quantile: float,
                   min_samples_fraction: float) -> Tensor:
    features = activations.detach().to(torch.float64).flatten(2)
    norms = torch.linalg.vector_norm(features, dim=2)
    important = norms >= torch.quantile(norms, norm_quantile, dim=1, keepdim=True)
    rest = ~important
    distance = pairwise_distances(features)
    eps = pair_quantile(distance, rest, eps_quantile).nan_to_num(EPS_FLOOR).clamp_min(EPS_FLOOR)
    min_samples = torch.floor(rest.sum(dim=1).to(torch.float64) * min_samples_fraction).clamp_min(MIN_SAMPLES_FLOOR)
    labels = dbscan(distance, eps, min_samples, rest)
    return labels.masked_fill(important, IMPORTANT)


# ---------------------------------------------------------------------------------------------------- filters
def authors_gradient_filter(maps: Tensor, sigma_spatial: float, sigma_range: float) -> Tensor:
    """The authors' "bilateral" filter of (N, h, w) maps, each independently (their ``_bilateral_filter``).

    One kernel per map, as large as the map: a Gaussian of the position around ``(h/2, w/2)`` (``sigma_spatial``)
    times a Gaussian of the map's value minus the map's mean (``sigma_range``), divided by its sum plus 1e-6;
    the map is then convolved (cross-correlated) with its kernel, zero-padded to its own size (``padding='same'``).
    Unlike a textbook bilateral filter (:func:`bilateral_filter`) the kernel does not move with the pixel.
    """
    count, height, width = maps.shape
    if count == 0:
        return maps
    rows = torch.arange(height, device=maps.device, dtype=maps.dtype) - height / 2
    cols = torch.arange(width, device=maps.device, dtype=maps.dtype) - width / 2
    spatial = torch.exp(-(rows[:, None].square() + cols[None, :].square()) / (2 * sigma_spatial ** 2))
    centred = maps - maps.mean(dim=(1, 2), keepdim=True)
    kernels = spatial * torch.exp(-centred.square() / (2 * sigma_range ** 2))
    kernels = kernels / (kernels.sum(dim=(1, 2), keepdim=True) + 1e-6)
    top, left = (height - 1) // 2, (width - 1) // 2                                 # torch's padding='same'
    padded = F.pad(maps.unsqueeze(0), (left, width - 1 - left, top, height - 1 - top))
    return F.conv2d(padded, kernels.unsqueeze(1), groups=count).squeeze(0)


def reflect_101(positions: Tensor, size: int) -> Tensor:
    """Indices of ``positions`` on an axis of ``size`` mirrored at its ends without repeating the edge (OpenCV's
    BORDER_REFLECT_101, as many times as needed)."""
    if size == 1:
        return torch.zeros_like(positions)
    period = positions.remainder(2 * size - 2)
    return torch.where(period < size, period, 2 * size - 2 - period)


def bilateral_filter(maps: Tensor, sigma_color: float, sigma_space: float) -> Tensor:
    """OpenCV's ``cv2.bilateralFilter(map, 0, sigma_color, sigma_space)`` of (N, h, w) single-channel maps.

    ``out(p) = sum_q w(p, q) map(q) / sum_q w(p, q)`` over the disk ``|q - p| <= r``, ``r = max(1, round(1.5
    sigma_space))``, with ``w = exp(-|q - p|^2 / (2 sigma_space^2) - (map(q) - map(p))^2 / (2 sigma_color^2))``;
    borders mirrored without repeating the edge (BORDER_REFLECT_101).  OpenCV reads the value Gaussian from a
    4096-bin table over the image's range, so it differs by about 1e-6 from the exact Gaussian used here.  Summed
    offset by offset over the disk, batched over the maps (memory a few times the maps', not the window's).
    """
    radius = max(1, round(1.5 * sigma_space))
    _, height, width = maps.shape
    rows = reflect_101(torch.arange(-radius, height + radius, device=maps.device), height)
    cols = reflect_101(torch.arange(-radius, width + radius, device=maps.device), width)
    padded = maps[:, rows][:, :, cols]
    total = torch.zeros_like(maps)
    weight = torch.zeros_like(maps)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx > radius * radius:
                continue
            shifted = padded[:, radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            w = math.exp(-(dy * dy + dx * dx) / (2 * sigma_space ** 2)) * torch.exp(
                -(shifted - maps).square() / (2 * sigma_color ** 2))
            total = total + w * shifted
            weight = weight + w
    return total / weight


# ------------------------------------------------------------------------------------------------------ method
def _quantile_option(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@register("cf_cam")
class CFCAM(CAM):
    """CF-CAM: Grad-CAM whose channels are clustered by DBSCAN, noise channels dropped, each cluster's gradient
    filtered, and the channel weights passed through a softmax.

    He, Pan & Yao, "CF-CAM: Cluster Filter Class Activation Mapping for Reliable Gradient-Based Interpretability",
    arXiv:2504.00060 (2025); code github.com/jerryp-hfut/CF-CAM (``cfcam.py``).

    With ``A_k`` the layer's maps and ``G_k = dy/dA_k``: channels with ``||A_k||_2`` at or above the
    ``norm_quantile`` quantile keep Grad-CAM's ``w_k = mean_ij G_k``; the rest are clustered by DBSCAN
    (:func:`cluster_channels`: ``eps`` the ``eps_quantile`` quantile of their pairwise distances, ``min_samples =
    max(2, floor(0.05 R))``), noise channels are dropped, and every member of a cluster ``c`` gets ``w_k =
    mean_ij filter(mean_{j in c} G_j)``; then ``map = ReLU(sum_k softmax(w)_k A_k)`` over the kept channels.
    Defaults as the authors' code: ``norm_quantile=0.75``, ``eps_quantile=0.25``, ``min_samples_fraction=0.05``,
    ``gradient_filter='authors'`` (their ``_bilateral_filter``, :func:`authors_gradient_filter`) with
    ``sigma_spatial=5.0``, ``sigma_range=0.1``; ``gradient_filter='bilateral'`` instead runs a textbook bilateral
    filter (OpenCV's ``bilateralFilter`` with ``d=0``: :func:`bilateral_filter`) with the same sigmas.  The paper
    publishes no other values.  The softmax takes the raw weights: where gradients are small (logits of an
    ImageNet classifier: about 1e-3) it is nearly uniform and the map close to the mean of the kept channels.
    Cost: one forward and one gradient to the layer per image (Grad-CAM's), plus the clustering: a (C, C) float64
    distance matrix, two order statistics of it and a few (C, C) label passes per image (on 2 CPU cores, ResNet-50's
    layer4 at 224 px, 8 images: 3.3 s against Grad-CAM's 1.0 s).

    Deliberate differences from the authors' code: maps are raw (theirs divide by the maximum after upsampling);
    scikit-learn recomputes the distances inside DBSCAN with its own formula, so a pair at exactly ``eps`` may fall
    either side there, while here the same distances set ``eps`` and the neighbourhoods (as ``metric=
    'precomputed'``), and the clustering statistics are float64 (theirs in the model's dtype); with a single
    non-kept channel their percentile of no distances raises, here that channel is
    noise; their ``noise_level`` option changes nothing they return (it perturbs gradients after the weights are
    taken) and is left out.  Clustering and the cluster labels are constants for autograd; with
    ``create_graph=True`` the map is differentiable through the activations, the gradients, the filter and the
    softmax.
    """

    defaults: Dict[str, Any] = {**CAM.defaults, "norm_quantile": 0.75, "eps_quantile": 0.25,
                                "min_samples_fraction": 0.05, "gradient_filter": "authors", "sigma_spatial": 5.0,
                                "sigma_range": 0.1}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, batch_size: Optional[int], create_graph: bool, norm_quantile: float,
                 eps_quantile: float, min_samples_fraction: float, gradient_filter: str, sigma_spatial: float,
                 sigma_range: float) -> Tensor:
        if gradient_filter not in GRADIENT_FILTERS:
            raise ValueError(f"gradient_filter must be one of {GRADIENT_FILTERS}, got {gradient_filter!r}")
        return super()._explain(
            x, target, target_layer=target_layer, reshape_transform=reshape_transform, layer_fusion=layer_fusion,
            batch_size=batch_size, create_graph=create_graph,
            norm_quantile=_quantile_option(norm_quantile, "norm_quantile"),
            eps_quantile=_quantile_option(eps_quantile, "eps_quantile"),
            min_samples_fraction=_quantile_option(min_samples_fraction, "min_samples_fraction"),
            gradient_filter=gradient_filter, sigma_spatial=positive_number(sigma_spatial, "sigma_spatial"),
            sigma_range=positive_number(sigma_range, "sigma_range"))

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], *, norm_quantile: float,
                 eps_quantile: float, min_samples_fraction: float, gradient_filter: str, sigma_spatial: float,
                 sigma_range: float) -> Tensor:
        labels = cluster_channels(activations, norm_quantile, eps_quantile, min_samples_fraction)
        smooth = (partial(authors_gradient_filter, sigma_spatial=sigma_spatial, sigma_range=sigma_range)
                  if gradient_filter == "authors" else
                  partial(bilateral_filter, sigma_color=sigma_range, sigma_space=sigma_spatial))
        scores = torch.where(labels >= 0, cluster_weights(gradients, labels, smooth), gradients.mean(dim=(2, 3)))
        scores = scores.masked_fill(labels == NOISE, float("-inf"))
        return torch.softmax(scores, dim=1)[:, :, None, None]


def cluster_weights(gradients: Tensor, labels: Tensor, smooth: Callable[[Tensor], Tensor]) -> Tensor:
    """(B, C): for each channel of a cluster (``labels >= 0``, named by a member), the spatial mean of ``smooth``
    applied to the cluster's mean gradient map; 0 for the other channels.  All clusters of the batch are filtered
    at once, as one (K, h, w) stack."""
    batch, channels, height, width = gradients.shape
    clustered = labels >= 0
    slots = labels.clamp_min(0)
    flat = gradients.flatten(2) * clustered.unsqueeze(2).to(gradients.dtype)
    sums = torch.zeros_like(flat).scatter_add(1, slots.unsqueeze(2).expand_as(flat), flat)
    sizes = torch.zeros(batch, channels, dtype=gradients.dtype, device=gradients.device).scatter_add(
        1, slots, clustered.to(gradients.dtype))
    roots = labels == torch.arange(channels, device=labels.device)                  # one slot per cluster
    means = (sums[roots] / sizes[roots].unsqueeze(1)).view(-1, height, width)
    per_cluster = torch.zeros_like(sizes).masked_scatter(roots, smooth(means).mean(dim=(1, 2)))
    return torch.where(clustered, per_cluster.gather(1, slots), torch.zeros_like(per_cluster))
