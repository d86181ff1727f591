"""XGrad-CAM."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.registry import register
from .base import CAM, safe_divide


@register("xgrad_cam")
class XGradCAM(CAM):
    """XGrad-CAM: gradients averaged with the normalised activations as weights.

    Fu, Hu, Dong, Guo, Gao & Li, "Axiom-based Grad-CAM: Towards Accurate Visualization and Explanation of CNNs",
    BMVC 2020, arXiv:2008.02312.

    ``w_k = sum_ij (A_k(i, j) / sum_ab A_k(a, b)) * dy/dA_k(i, j)`` (0 for a channel whose activations sum to 0),
    ``map = ReLU(sum_k w_k A_k)``.  Cost: one forward and one gradient to the layer.  pytorch-grad-cam adds 1e-7 to
    the channel sum instead of masking zeros; otherwise the same formula.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        total = activations.sum(dim=(2, 3), keepdim=True)
        return safe_divide(activations * gradients, total).sum(dim=(2, 3), keepdim=True)
