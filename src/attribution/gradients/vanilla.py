"""Vanilla gradient (saliency map)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer


@register("vanilla_gradient")
class VanillaGradient(GradientExplainer):
    """Gradient of the target score w.r.t. the input.

    Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image Classification Models
    and Saliency Maps", ICLR workshop 2014, arXiv:1312.6034.

    ``A = d f_t(x) / d x``, signed, (B, C, H, W).  Cost: one forward and one input-gradient backward per image.
    """

    argmax_on_rows = True

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool) -> Tensor:
        return self._gradient_at_input(x, target, batch_size, create_graph)
