"""KPCA-CAM."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.explainer import finite_number, positive_int, positive_number
from ..core.registry import register
from .base import CAM
from .eigen_cam import orient, top_eigenpair

KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_matrix(rows: Tensor, kernel: str, gamma: float, coef0: float, degree: int) -> Tensor:
    """(n, P, P) kernel of (n, P, C) rows, with scikit-learn's definitions of each kernel."""
    dot = rows @ rows.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    if kernel == "rbf":
        squared = rows.square().sum(dim=2)
        return torch.exp(-gamma * (squared.unsqueeze(2) + squared.unsqueeze(1) - 2 * dot).clamp(min=0))
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    if kernel == "linear":
        return dot
    if kernel == "cosine":
        norms = rows.norm(dim=2).clamp(min=torch.finfo(rows.dtype).tiny)
        return dot / (norms.unsqueeze(2) * norms.unsqueeze(1))
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def kernel_first_component(features: Tensor, kernel: str, gamma: Optional[float], coef0: float,
                           degree: int) -> Tensor:
    """(n, C, h, w) -> (n, 1, h, w): first kernel principal component of the positions' C-vectors (centred over
    positions first), scaled like scikit-learn's ``KernelPCA.fit_transform`` (eigenvector times the square root
    of its eigenvalue) and oriented by :func:`attribution.cam.eigen_cam.orient`."""
    n, c, h, w = features.shape
    rows = features.flatten(2).transpose(1, 2)
    centred = rows - rows.mean(dim=1, keepdim=True)
    k = kernel_matrix(centred, kernel, 1.0 / c if gamma is None else float(gamma), coef0, degree)
    k = k - k.mean(dim=1, keepdim=True) - k.mean(dim=2, keepdim=True) + k.mean(dim=(1, 2), keepdim=True)
    value, u = top_eigenpair(k)
    projection = u * value.clamp(min=torch.finfo(value.dtype).tiny).sqrt().unsqueeze(1)
    return orient(projection, rows.sum(dim=2)).view(n, 1, h, w)


@register("kpca_cam")
class KPCACAM(CAM):
    """KPCA-CAM: the first kernel principal component of the layer's activations (class-agnostic).

    Karmani, Sivakaran, Prasad, Ali, Yang & Tang, "KPCA-CAM: Visual Explainability of Deep Computer Vision Models
    using Kernel PCA", IEEE MMSP 2024, arXiv:2410.00267.

    Eigen-CAM with the linear PCA replaced by kernel PCA over the h*w positions: with ``K`` the centred kernel
    matrix of the centred activation vectors and ``(lambda_1, u_1)`` its top eigenpair,
    ``map = ReLU(sqrt(lambda_1) u_1)``.  Options ``kernel`` (``'sigmoid'`` default, ``'rbf'``, ``'poly'``,
    ``'linear'``, ``'cosine'``), ``gamma`` (default 1/C), ``coef0`` (1), ``degree`` (3), as scikit-learn's
    ``KernelPCA`` which pytorch-grad-cam's ``KPCA_CAM`` calls once per image.  The target does not change the map.
    Cost: one forward and a batched (h*w)x(h*w) eigendecomposition per image (heavy for large maps).
    Difference from pytorch-grad-cam: the sign rule of :class:`attribution.EigenCAM` instead of scikit-learn's
    (which makes the largest-magnitude entry of the eigenvector positive).
    """

    uses_gradients = False
    defaults = {**CAM.defaults, "kernel": "sigmoid", "gamma": None, "coef0": 1.0, "degree": 3}

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], *, kernel: str, gamma: Optional[float],
                   coef0: float, degree: int) -> Tensor:
        positive_int(degree, "degree")
        gamma = None if gamma is None else positive_number(gamma, "gamma")
        coef0 = finite_number(coef0, "coef0")
        return F.relu(kernel_first_component(activations, kernel, gamma, coef0, degree))
