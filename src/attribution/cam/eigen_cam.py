"""Eigen-CAM and Eigen-Grad-CAM, and the batched principal-component machinery they share with KPCA-CAM."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM


class _TopEigenpair(torch.autograd.Function):
    """Largest eigenvalue and its eigenvector of symmetric (n, m, m) matrices, with a backward that stays finite
    when the *other* eigenvalues are repeated (torch's eigh backward divides by every eigenvalue gap)."""

    @staticmethod
    def forward(ctx: Any, matrix: Tensor) -> Tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(matrix)
        ctx.save_for_backward(values, vectors)
        return values[..., -1], vectors[..., -1]

    @staticmethod
    def backward(ctx: Any, grad_value: Tensor, grad_vector: Tensor) -> Tensor:
        values, vectors = ctx.saved_tensors
        top, v = values[..., -1:], vectors[..., -1]
        gap = (top - values)[..., :-1]  # (n, m-1), > 0 when the top eigenvalue is simple
        others = vectors[..., :-1]
        coeff = (others.transpose(-1, -2) @ grad_vector.unsqueeze(-1)).squeeze(-1)
        coeff = torch.where(gap > 0, coeff / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        dv = (others @ coeff.unsqueeze(-1)).squeeze(-1)
        grad = grad_value[..., None, None] * (v.unsqueeze(-1) * v.unsqueeze(-2)) + dv.unsqueeze(-1) * v.unsqueeze(-2)
        return (grad + grad.transpose(-1, -2)) / 2


def top_eigenpair(matrix: Tensor) -> Tuple[Tensor, Tensor]:
    """(n,) largest eigenvalues and (n, m) unit eigenvectors of symmetric (n, m, m) matrices (batched eigh)."""
    return _TopEigenpair.apply(matrix)


def orient(projection: Tensor, reference: Tensor) -> Tensor:
    """Flip each row of (n, P) ``projection`` so that its inner product with ``reference`` is not negative.

    A principal component's sign is arbitrary (LAPACK's choice); orienting it towards the channel sum of the
    features it came from makes the positive side of the map the side where the features are large.
    """
    sign = torch.sign((projection * reference).sum(dim=1, keepdim=True)).detach()
    return projection * torch.where(sign == 0, torch.ones_like(sign), sign)


def larger_side_positive(projection: Tensor) -> Tensor:
    """Flip each row of (n, P) ``projection`` whose minimum is larger in magnitude than its maximum (Seg-Eigen-CAM's
    sign correction: the component's dominant side made positive)."""
    flip = projection.amin(dim=1, keepdim=True).abs() > projection.amax(dim=1, keepdim=True).abs()
    return torch.where(flip.detach(), -projection, projection)


def first_component(features: Tensor, sign: str = "channel_sum") -> Tensor:
    """(n, C, h, w) -> (n, 1, h, w): each position's C-vector, centred over positions, projected on the first
    principal axis (the first right singular vector of the centred (h*w, C) matrix), oriented by :func:`orient`
    (``sign='channel_sum'``) or by :func:`larger_side_positive` (``'extreme'``).

    Computed from the smaller Gram matrix, (h*w)^2 or C^2, with one batched ``eigh``.
    """
    n, c, h, w = features.shape
    rows = features.flatten(2).transpose(1, 2)  # (n, P, C)
    centred = rows - rows.mean(dim=1, keepdim=True)
    if h * w <= c:
        value, u = top_eigenpair(centred @ centred.transpose(1, 2))
        positive = value > 0  # a zero spectrum (all features equal, e.g. zero gradients) gives a zero map
        scale = torch.where(positive, value, torch.ones_like(value)).sqrt() * positive  # finite gradients at 0
        projection = u * scale.unsqueeze(1)
    else:
        _, v = top_eigenpair(centred.transpose(1, 2) @ centred)
        projection = (centred @ v.unsqueeze(-1)).squeeze(-1)
    if sign == "extreme":
        return larger_side_positive(projection).view(n, 1, h, w)
    return orient(projection, rows.sum(dim=2)).view(n, 1, h, w)


@register("eigen_cam")
class EigenCAM(CAM):
    """Eigen-CAM: the first principal component of the layer's activations (class-agnostic).

    Bany Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020,
    arXiv:2008.00299.

    With ``A`` the (h*w, C) matrix of activations centred over positions and ``v_1`` its first right singular
    vector: ``map = ReLU(A v_1)``.  The target does not change the map.  Cost: one forward (no gradient) and a
    batched eigendecomposition.  Differences from pytorch-grad-cam (same centring, same projection): the
    component's sign, which LAPACK leaves arbitrary, is fixed so that the map correlates positively with the
    channel sum of the activations (pytorch-grad-cam keeps whatever sign NumPy's SVD returns, so its map is
    sometimes the ReLU of the negated component); and it runs batched in torch.
    """

    uses_gradients = False

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return F.relu(first_component(activations))


@register("eigen_grad_cam")
class EigenGradCAM(CAM):
    """Eigen-Grad-CAM: the first principal component of gradient times activation (class-discriminative).

    A variant introduced by pytorch-grad-cam (Gildenblat et al., 2021) of Eigen-CAM (Bany Muhammad & Yeasin,
    IJCNN 2020, arXiv:2008.00299).

    ``map = ReLU(first principal component of dy/dA * A)`` as in :class:`EigenCAM`, with the sign oriented by the
    channel sum of ``dy/dA * A`` (the HiResCAM map), so the positive side is the side that raises the score.
    Cost: one forward, one gradient to the layer and a batched eigendecomposition.  Differences from
    pytorch-grad-cam: the sign rule (see :class:`EigenCAM`).
    """

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return F.relu(first_component(gradients * activations))


@register("seg_eigen_cam")
class SegEigenCAM(CAM):
    """Seg-Eigen-CAM: the first principal component of ``|dy/dA| * A``, its dominant side made positive.

    Chung & Ying, "Seg-Eigen-CAM: Eigen-Value-Based Visual Explanations for Semantic Segmentation Models", Applied
    Sciences 15(13):7562, 2025, doi:10.3390/app15137562.

    ``map = ReLU(s * A' v_1)`` with ``A'`` the positions' ``|dy/dA| * A`` vectors centred over positions (Eq. 10:
    absolute gradients, so that negative ones weigh too), ``v_1`` its first principal axis, and ``s = -1`` when the
    projection's minimum is larger in magnitude than its maximum (Eq. 13, the paper's answer to the component's sign
    ambiguity).  Written for segmentation models; with a classifier's score it is a class-discriminative CAM.
    Cost: one forward, one gradient to the layer and a batched eigendecomposition.  Same map as pytorch-grad-cam's
    ``SegEigenCAM``.
    """

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return F.relu(first_component(gradients.abs() * activations, sign="extreme"))
