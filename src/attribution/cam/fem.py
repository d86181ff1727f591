"""FEM, the feature explanation method."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.explainer import finite_number
from ..core.registry import register
from .base import CAM


@register("fem")
class FEM(CAM):
    """FEM: each channel weighted by the share of its positions that stand out, by a k-sigma rule (class-agnostic).

    Fuad, Martin, Giot, Bourqui, Benois-Pineau & Zemmari, "Features Understanding in 3D CNNs for Actions
    Recognition in Video", IPTA 2020 (HAL hal-02963298; no arXiv version).

    With ``mu_k`` and ``sigma_k`` the mean and (population) standard deviation of channel ``k`` over positions:
    ``w_k = mean_ij [A_k(i, j) > mu_k + k sigma_k]`` (option ``k``, default 2), ``map = ReLU(sum_k w_k A_k)``.
    The target does not enter the map.  No value of ``n`` positions lies more than ``sqrt(n - 1)`` standard
    deviations above their mean, so on layers of ``n <= k^2 + 1`` positions (5 at ``k=2``: a 2 x 2 map of a small
    input) every weight is 0 and so is the map.  Cost: one forward (no gradient).  Same formula as pytorch-grad-cam's
    ``FEM``; the thresholded weights carry no gradient, so with ``create_graph=True`` the map is differentiable
    through the activations only.
    """

    uses_gradients = False
    defaults = {**CAM.defaults, "k": 2.0}

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], *, k: float, **options: Any) -> Tensor:
        k = finite_number(k, "k")
        mean = activations.mean(dim=(2, 3), keepdim=True)
        std = activations.std(dim=(2, 3), keepdim=True, correction=0)
        return (activations > mean + k * std).to(activations.dtype).mean(dim=(2, 3), keepdim=True)
