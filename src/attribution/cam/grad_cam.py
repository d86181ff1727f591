"""Grad-CAM."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("grad_cam")
class GradCAM(CAM):
    """Grad-CAM: activations weighted by their spatially averaged gradients.

    Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, arXiv:1610.02391.

    ``w_k = mean_ij dy/dA_k(i, j)``, ``map = ReLU(sum_k w_k A_k)``.  For a network ending in global average pooling
    and a linear layer this is the original CAM (Zhou et al., CVPR 2016) divided by ``h * w``.
    Cost: one forward and one gradient from the score to the layer (no backward below it).
    Same formula as pytorch-grad-cam's and Captum's ``LayerGradCam(relu_attributions=True)``.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)
