"""NormGrad: the norm of the gradient a virtual identity layer's weights would receive, per location."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM

VARIANTS = ("identity", "selective")


@register("norm_grad")
class NormGrad(CAM):
    """NormGrad: how much each location of a layer would change a 1x1 layer inserted there, if trained on the target.

    Rebuffi, Fong, Ji & Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency Methods", CVPR 2020,
    arXiv:2004.02866.

    A virtual identity 1x1 convolution after the layer, ``A -> W A`` with ``W = I``, gets at location ``(i, j)`` the
    weight gradient ``g_ij a_ij^T`` (``g = dy/dA``): an outer product, whose Frobenius norm is
    ``||g_ij|| ||a_ij||`` (``variant='identity'``, the default).  ``variant='selective'`` keeps the positive part
    of the element-wise contributions, ``|| ReLU(a_ij * g_ij) ||`` over the channels, which the paper finds more
    class-selective.  Before a head of global average pooling and a linear layer the gradient is the same at every
    location, so there the identity map is ``||a||`` scaled by a class-dependent constant: use earlier layers (the
    paper combines several).  Maps are non-negative and unnormalised; several layers are fused by ``layer_fusion`` (the
    paper's combined NormGrad multiplies or sums the layers' maps: ``'product'`` or ``'mean'``).  Same maps as
    TorchRay's ``norm_grad`` and ``norm_grad_selective`` (its GitHub version), upsampled bilinearly to the input.
    Cost: one forward and one gradient to the (first) layer.
    """

    defaults = {**CAM.defaults, "variant": "identity"}

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], *, variant: str = "identity",
                   **options: Any) -> Tensor:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "selective":
            return F.relu(activations * gradients).norm(dim=1, keepdim=True)
        return gradients.norm(dim=1, keepdim=True) * activations.norm(dim=1, keepdim=True)
