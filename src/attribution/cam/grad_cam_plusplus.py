"""Grad-CAM++."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM, safe_divide


@register("grad_cam_plusplus")
class GradCAMPlusPlus(CAM):
    """Grad-CAM++: channel weights from positive gradients weighted by higher-order terms.

    Chattopadhyay, Sarkar, Howlader & Balasubramanian, "Grad-CAM++: Generalized Gradient-Based Visual Explanations
    for Deep Convolutional Networks", WACV 2018, arXiv:1710.11063.

    With ``g = dy/dA`` (the paper's closed form for an exponential output, its Eq. 19):
    ``alpha = g^2 / (2 g^2 + sum_ab A_k(a, b) g^3)`` (0 where the denominator or ``g`` is 0),
    ``w_k = sum_ij alpha * ReLU(g)``, ``map = ReLU(sum_k w_k A_k)``.  Cost: one forward and one gradient to the
    layer.  pytorch-grad-cam adds 1e-6 to the denominator instead of masking zeros, which damps the weights when
    gradients are below about 1e-3 (its maps then correlate only ~0.95 with the formula's); otherwise the same.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        g2 = gradients.square()
        g3 = g2 * gradients
        total = activations.sum(dim=(2, 3), keepdim=True)
        alpha = safe_divide(g2, 2 * g2 + total * g3)
        return (alpha * F.relu(gradients)).sum(dim=(2, 3), keepdim=True)
