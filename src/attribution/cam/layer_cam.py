"""LayerCAM."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("layer_cam")
class LayerCAM(CAM):
    """LayerCAM: activations weighted element-wise by their positive gradients.

    Jiang, Zhang, Hou, Cheng & Wei, "LayerCAM: Exploring Hierarchical Class Activation Maps for Localization",
    IEEE Transactions on Image Processing 30, 2021 (IEEE Xplore 9462463; no arXiv version).

    ``map = ReLU(sum_k ReLU(dy/dA_k) * A_k)`` at each layer; with several layers the maps are fused by
    ``layer_fusion`` (the paper's tanh rescaling of shallow layers is left out, as in pytorch-grad-cam).
    Cost: one forward and one gradient to the (first) layer.  Same formula as pytorch-grad-cam's ``LayerCAM``.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return F.relu(gradients)
