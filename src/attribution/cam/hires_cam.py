"""HiResCAM."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("hires_cam")
class HiResCAM(CAM):
    """HiResCAM: activations times their gradients element-wise, summed over channels.

    Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of convolutional neural networks",
    arXiv:2011.08891, 2020.

    ``map = ReLU(sum_k dy/dA_k * A_k)`` (element-wise product; no spatial averaging of the gradient, so the map is
    the first-order contribution of each location).  Cost: one forward and one gradient to the layer.
    Same formula as pytorch-grad-cam's ``HiResCAM``.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return gradients
