"""DecomCAM: a gradient-weighted layer decomposed by SVD into orthogonal sub-saliency maps, integrated by the target's
score on images masked with each."""
from __future__ import annotations

import contextvars
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import finite_number, non_negative_number, positive_int
from ..core.filters import reflect_blur_matrix
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target, TargetSpec
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS, min_max_scale
from .eigen_cam import larger_side_positive

#: the reference's Gaussian blur (``scipy.ndimage.gaussian_filter(..., sigma, truncate=4)``) reaches 4 sigma

#: set by :meth:`DecomCAM.decompose` around its call: each layer's (sub-maps, weights) are appended to the list
_PARTS: contextvars.ContextVar[Optional[List[Tuple[Tensor, Tensor]]]] = contextvars.ContextVar("decom_cam_parts",
                                                                                               default=None)


class DecomCAMParts(NamedTuple):
    """What :meth:`DecomCAM.decompose` returns.

    ``map``: (B, 1, H, W), the DecomCAM map (the ordinary call's result).  ``sub_maps``: (B, L*K, H, W), the
    orthogonal sub-saliency maps ``S_i`` (rectified, upsampled to the input, not scaled), the K of each of the L
    layers one layer after the other.  ``weights``: (B, L*K), their integration weights ``w_i``.  For one layer,
    ``map == relu((weights[:, :, None, None] * sub_maps).sum(1, keepdim=True))``; ``min_max_scale`` of a sub-map is
    the mask its score was measured with (and what the authors' ``get_pca`` returns).
    """

    map: Tensor
    sub_maps: Tensor
    weights: Tensor


def blur_images(x: Tensor, sigma: float) -> Tensor:
    """Each channel of (B, C, H, W) ``x`` blurred as the reference's ``gaussian_blur_image`` (SciPy, reflect)."""
    rows = reflect_blur_matrix(x.shape[-2], sigma).to(device=x.device, dtype=x.dtype)
    cols = reflect_blur_matrix(x.shape[-1], sigma).to(device=x.device, dtype=x.dtype)
    return rows @ x @ cols.T


class _LeadingScores(torch.autograd.Function):
    """``U_k S_k``: the scores of the first ``k`` components of (n, m, p) matrices ``X = U S V^T``.

    Forward: ``torch.linalg.svd``.  Backward through the ``k`` kept components only, as ``X V_k`` with ``V_k`` the
    leading eigenvectors of ``X^T X``: torch's SVD backward divides by the gap of every *pair* of singular values and
    returns NaN when two of the discarded ones are equal (two dead channels give two zeros); here a pair with no gap
    gets no coupling, so the gradient is finite whenever the kept singular values are distinct from the others.
    """

    @staticmethod
    def forward(ctx: Any, matrix: Tensor, k: int) -> Tensor:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        ctx.save_for_backward(matrix, s, vh)
        ctx.k = k
        return u[..., :k] * s[..., None, :k]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        matrix, s, vh = ctx.saved_tensors
        v = vh.transpose(-1, -2)  # (n, p, r)
        kept = v[..., :ctx.k]
        eig = s.square()
        grad_v = matrix.transpose(-1, -2) @ grad  # (n, p, k): d loss / d V_k through Y = X V_k
        gap = eig[..., None, :ctx.k] - eig[..., :, None]  # (n, r, k): lambda_i - lambda_j
        coeff = v.transpose(-1, -2) @ grad_v
        coeff = torch.where(gap != 0, coeff / torch.where(gap != 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        move = v @ coeff  # (n, p, k): how each kept eigenvector moves, within the computed basis
        if v.shape[-1] < v.shape[-2]:  # the rest of R^p: eigenvalue 0
            top = eig[..., None, :ctx.k]
            rest = grad_v - v @ (v.transpose(-1, -2) @ grad_v)
            move = move + torch.where(top > 0, rest / torch.where(top > 0, top, torch.ones_like(top)),
                                      torch.zeros_like(rest))
        grad_gram = move @ kept.transpose(-1, -2)
        return grad @ kept.transpose(-1, -2) + matrix @ (grad_gram + grad_gram.transpose(-1, -2)), None


def principal_scores(features: Tensor, alpha: Tensor, channels: int, components: int) -> Tensor:
    """(n, C, h, w) activations and (n, C) Grad-CAM weights -> (n, K, h, w) principal component scores.

    The ``channels`` channels of largest weight are kept, weighted (``alpha_c A_c``), laid out as the (h*w, P)
    matrix of positions by channels and centred over positions; its batched SVD ``U S V^T`` gives the scores
    ``U_i S_i`` of the first ``K = min(components, h*w, P)`` components (scikit-learn's ``PCA.fit_transform``).
    Sign: each score map's entry of largest magnitude is positive (scikit-learn's ``svd_flip`` on ``U``, the rule of
    the versions before 1.5 that the authors ran; :func:`attribution.cam.eigen_cam.larger_side_positive`).
    """
    n, c, h, w = features.shape
    keep = min(channels, c)
    top = alpha.topk(keep, dim=1).indices  # (n, P), largest weights first
    weighted = (features.flatten(2) * alpha.unsqueeze(2)).gather(1, top.unsqueeze(2).expand(-1, -1, h * w))
    rows = weighted.transpose(1, 2)  # (n, h*w, P)
    k = min(components, h * w, keep)
    scores = _LeadingScores.apply(rows - rows.mean(dim=1, keepdim=True), k).transpose(1, 2)  # (n, K, h*w)
    return larger_side_positive(scores.reshape(n * k, h * w)).view(n, k, h, w)


def sub_saliency_maps(scores: Tensor, size: Tuple[int, int]) -> Tensor:
    """(n, K, h, w) component scores -> (n, K, H, W) sub-saliency maps: rectified, then upsampled bicubically
    (``F.interpolate(..., mode='bicubic', align_corners=False)``, as the reference)."""
    return F.interpolate(F.relu(scores), size=tuple(size), mode="bicubic", align_corners=False)


def integration_weights(scores: Tensor, threshold: float) -> Tensor:
    """(n, K) scores -> weights: 0 for a score below ``threshold``, else the score over the image's largest score
    (the reference's ``ScaleNormalize``); all 0 where the largest score is not positive (the reference's division
    gives NaN there, or inverts the order of negative scores)."""
    largest = scores.amax(dim=1, keepdim=True)
    kept = (scores >= threshold) & (largest > 0)
    safe = torch.where(kept, largest, torch.ones_like(largest))
    return torch.where(kept, scores / safe, torch.zeros_like(scores))


@register("decom_cam")
class DecomCAM(CAM):
    """DecomCAM: the gradient-weighted activations decomposed into orthogonal sub-saliency maps (SVD), each weighted
    by the target's score on the image masked with it.

    Yang, Guo, Wu, Wang, Yang, Fan, Zhong, Zhang & Zhang, "DecomCAM: Advancing Beyond Saliency Maps through
    Decomposition and Integration", Neurocomputing 610:127826, 2024, arXiv:2405.18882 (preprint: "Decom-CAM: Tell
    Me What You See, In Details! Feature-Level Interpretation via Decomposition Class Activation Map", 2023).
    Reference: the authors' ``pytorch_grad_cam/decom_cam.py`` (github.com/CapricornGuang/DecomCAM).

    With ``alpha_c`` the Grad-CAM weight (mean gradient of the target's score over channel ``c``'s positions), the
    ``channels`` channels of largest ``alpha_c`` give the (h*w, P) matrix ``X = [alpha_c A_c]``, centred over
    positions; its SVD's first ``K = components`` scores ``U_i S_i`` are the orthogonal sub-saliency maps
    ``S_i = up(ReLU(U_i S_i))`` (:func:`principal_scores` states the sign rule; ``up`` is bicubic).  Each is scored on
    ``x_i = max(x * M_i, blur(x) * (1 - M_i))`` (element-wise maximum, as the reference), ``M_i`` = ``S_i`` min-max
    scaled, ``blur`` a Gaussian of ``blur_sigma`` pixels (SciPy's, reflected edges) of the model's input:
    ``s_i = f_t(x_i)``, minus ``f_t(blur(x))`` with ``baseline=True``.  ``w_i = 0`` if ``s_i < threshold`` else
    ``s_i / max_j s_j``; ``map = ReLU(sum_i w_i S_i)``.

    Defaults from the authors' CNN code: ``components=10``, ``channels=500`` (P), ``blur_sigma=10.0``,
    ``threshold=0.001``, ``baseline=False`` (their earlier ``src/cam/decom_cam.py`` subtracts the blurred image's
    score: ``baseline=True``; their CLIP notebook thresholds at 0.01), scores are the target's logits (the library's
    default ``score='logit'``, their ``ClassifierOutputTarget``).  ``K`` is at most ``h*w`` and ``P``.  Sub-maps are
    upsampled bicubically as the authors do (the other CAMs here upsample bilinearly).
    :meth:`decompose` also returns the sub-maps and their weights (the authors' ``get_pca`` returns the sub-maps).
    Differentiable with ``create_graph=True`` (the SVD's backward runs through the kept components only, finite
    with dead channels), piecewise: the kept channels, the components' signs and the thresholded weights are
    locally constant.
    Cost: one forward and one gradient to the layer per image, a batched SVD of (h*w, P) matrices, then K masked
    forwards per image (``batch_size`` at a time, under ``torch.inference_mode`` unless ``create_graph=True``); with
    ``baseline=True`` one forward of each blurred image; with ``target=None`` one forward per image to find its class.

    Differences from the reference: batched over images in torch (it runs one image, in NumPy and scikit-learn); the
    map is not min-max scaled to [0, 1] (its last step); channel ties are broken by ``torch.topk``; its
    IncrementalPCA branch (only for ``channels > 500``) is replaced by the exact SVD; activations are not scanned for
    NaNs.  The sign of a component whose scores have two entries of equal largest magnitude is left as the SVD gives
    it.  Like the reference, the blur and the masking act on the model's input tensor (normalised, not the photo).
    """

    #: ``target=None`` is resolved by a forward first: the masked images are scored for the images' classes
    argmax_on_rows = False
    defaults = {**CAM.defaults, "components": 10, "channels": 500, "blur_sigma": 10.0, "threshold": 0.001,
                "baseline": False}

    def decompose(self, x: Tensor, target: TargetSpec = None, **options: Any) -> DecomCAMParts:
        """The map, its sub-saliency maps and their weights (see :class:`DecomCAMParts`); same options as a call."""
        parts: List[Tuple[Tensor, Tensor]] = []
        token = _PARTS.set(parts)
        try:
            saliency = self.get_mask(x, target, **options)
        finally:
            _PARTS.reset(token)
        sub_maps = torch.cat([p[0] for p in parts], dim=1).to(saliency.dtype)
        weights = torch.cat([p[1] for p in parts], dim=1).to(saliency.dtype)
        return DecomCAMParts(saliency, sub_maps.contiguous(), weights.contiguous())

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, components: int, channels: int, blur_sigma: float, threshold: float,
                 baseline: bool, batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        settings = {"components": positive_int(components, "components"),
                    "channels": positive_int(channels, "channels"),
                    "blur_sigma": non_negative_number(blur_sigma, "blur_sigma"),
                    "threshold": finite_number(threshold, "threshold")}
        if not isinstance(baseline, bool):
            raise TypeError(f"baseline must be a bool, got {baseline!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        per_layer: List[List[Tuple[Tensor, Tensor]]] = [[] for _ in layers]
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            _, acts, grads = self._capture(x[start:stop], owners, target, layers, reshape_transform, create_graph,
                                           gradients=True)
            with torch.set_grad_enabled(create_graph):
                reference = blur_images(x[start:stop], settings["blur_sigma"])
                offset = None
                if baseline:
                    offset = self._scores(stop - start, lambda i: reference[i], owners, target, batch_size,
                                          create_graph)
                for store, a, g in zip(per_layer, acts, grads):
                    store.append(self._parts(x[start:stop], reference, owners, offset, target, a, g, batch_size,
                                             create_graph, settings))
        maps, collected = [], _PARTS.get()
        for store in per_layer:
            sub_maps, weights = torch.cat([s for s, _ in store]), torch.cat([w for _, w in store])
            maps.append(F.relu((weights[:, :, None, None] * sub_maps).sum(dim=1, keepdim=True)))
            if collected is not None:
                collected.append((sub_maps, weights))
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _parts(self, rows: Tensor, reference: Tensor, owners: Tensor, offset: Optional[Tensor], target: Target,
               activations: Tensor, gradients: Tensor, batch_size: Optional[int], create_graph: bool,
               settings: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
        """One layer, one chunk of images: the (n, K, H, W) sub-saliency maps and their (n, K) weights."""
        alpha = gradients.mean(dim=(2, 3))
        scores = principal_scores(activations, alpha, settings["channels"], settings["components"])
        sub_maps = sub_saliency_maps(scores, rows.shape[-2:])
        n, k = sub_maps.shape[:2]
        masks = min_max_scale(sub_maps.reshape(n * k, 1, *rows.shape[-2:])).to(rows.dtype)
        image = torch.arange(n, device=rows.device).repeat_interleave(k)

        def masked(index: Tensor) -> Tensor:
            return torch.maximum(rows[image[index]] * masks[index], reference[image[index]] * (1 - masks[index]))

        values = self._scores(n * k, masked, owners[image], target, batch_size, create_graph).view(n, k)
        if offset is not None:
            values = values - offset.unsqueeze(1)
        return sub_maps, integration_weights(values, settings["threshold"])

    def _scores(self, count: int, images: Callable[[Tensor], Tensor], owners: Tensor, target: Target,
                batch_size: Optional[int], create_graph: bool) -> Tensor:
        """(count,) target scores of the rows ``images(index)`` builds (row ``i``'s target: image ``owners[i]``'s),
        ``batch_size`` rows at a time."""
        values = []
        for start, stop in RowPlanner(count, batch_size, owners.device):
            index = torch.arange(start, stop, device=owners.device)
            with torch.enable_grad() if create_graph else torch.inference_mode():
                batch = images(index)
                score = target(self._forward(batch), owners[index]).to(accumulation_dtype(batch))
            values.append(score if create_graph else score.clone())
        return torch.cat(values)
