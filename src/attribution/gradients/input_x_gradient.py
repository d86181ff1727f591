"""Input x gradient."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer


@register("input_x_gradient")
class InputXGradient(GradientExplainer):
    """Input times its gradient.

    Shrikumar, Greenside, Shcherbina & Kundaje, "Not Just a Black Box: Learning Important Features Through
    Propagating Activation Differences", arXiv:1605.01713, 2016.

    ``A = x * d f_t(x) / d x``, signed, (B, C, H, W).  Cost: one forward and one input-gradient backward per image.
    """

    argmax_on_rows = True

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool) -> Tensor:
        return x * self._gradient_at_input(x, target, batch_size, create_graph)
