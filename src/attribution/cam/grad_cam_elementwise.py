"""Grad-CAM element-wise."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("grad_cam_elementwise")
class GradCAMElementWise(CAM):
    """Element-wise Grad-CAM: rectified element-wise products of gradients and activations, summed over channels.

    A variant introduced by pytorch-grad-cam (Gildenblat et al., https://github.com/jacobgil/pytorch-grad-cam,
    2021) without a paper of its own; it is HiResCAM (Draelos & Carin, arXiv:2011.08891) with the ReLU moved
    inside the channel sum.

    ``map = sum_k ReLU(dy/dA_k * A_k)``.  Cost: one forward and one gradient to the layer.
    Same formula as pytorch-grad-cam's ``GradCAMElementWise``.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return gradients

    def _combine(self, weights: Tensor, activations: Tensor) -> Tensor:
        return F.relu(weights * activations).sum(dim=1, keepdim=True)
