"""BagCAM (BagCAMs)."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("bag_cam")
class BagCAM(CAM):
    """BagCAM: every location's gradient-times-activation, weighted by the channel's mean of it plus one.

    Zhu, Chen, Jin, You & Lu, "Bagging Regional Classification Activation Maps for Weakly Supervised Object
    Localization", ECCV 2022, arXiv:2207.07818.

    With ``t = dy/dA * A`` (element-wise): ``map = sum_k ReLU((mean_ab t_k(a, b) + 1) * t_k)``, the formula of the
    authors' code and of the seed library.  Not in pytorch-grad-cam.  The authors' code backpropagates the log of
    a softmax probability through ReLUs that pass only positive gradients; here the gradient is the plain one of
    the chosen ``score`` (``score='log_softmax'`` is the closest match).  Cost: one forward and one gradient to the
    layer.
    """

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        product = gradients * activations
        return (product.mean(dim=(2, 3), keepdim=True) + 1) * gradients

    def _combine(self, weights: Tensor, activations: Tensor) -> Tensor:
        return F.relu(weights * activations).sum(dim=1, keepdim=True)
