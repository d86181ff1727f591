"""FORGrad: a gradient method's map with its high spatial frequencies filtered out."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.explainer import positive_number
from ..core.filters import ideal_low_pass
from ..core.registry import register
from ..core.targets import Target
from .base import WrappingExplainer
from .vanilla import VanillaGradient


@register("forgrad")
class FORGrad(WrappingExplainer):
    """FORGrad: low-pass filter the magnitude of any gradient method's map.

    Muzellec, Fel, Boutin, Andeol, VanRullen & Serre, "Gradient strikes back: How filtering out high frequencies
    improves explanations", arXiv:2307.09591, 2023 (later titled "Saliency strikes back: ...").

    ``A = | F^-1( F(|mean_c M(x)|) * w_sigma ) |`` with ``M`` the wrapped method (``method``, any gradient explainer
    class or registry name, default the vanilla gradient), ``F`` the 2-D DFT and ``w_sigma`` the ideal low-pass
    disk that keeps the frequencies within ``sigma`` cycles per image of zero: (B, 1, H, W), non-negative.  The
    paper picks an optimal cutoff per architecture; ``sigma=15`` is its recommendation for 224 x 224 ImageNet models
    (the default of Xplique's ``forgrad``, the authors' group's library).  Options of the wrapped method pass
    through.  Cost: the wrapped method's plus two FFTs of the map.

    Equal to Xplique's ``forgrad`` on even square maps.  Deliberate differences: any H x W is accepted (the disk is
    over the signed DFT frequencies of each axis); an odd size is transformed back at its own size (Xplique's inverse
    drops the last column and resizes bicubically, and its shifted disk sits one frequency off centre); a sigma at or
    above the largest frequency returns ``|mean_c M(x)|`` (Xplique asserts ``sigma <= size``).
    """

    kind = "magnitude"
    defaults = {"method": VanillaGradient, "sigma": 15}

    def _explain(self, x: Tensor, target: Target, *, sigma: float, method: Any = None, **inner: Any) -> Tensor:
        cutoff = positive_number(sigma, "sigma")
        maps = self.inner._explain(x, target, **{**self.inner.defaults, **inner})
        magnitude = maps.mean(dim=1, keepdim=True).abs()
        return ideal_low_pass(magnitude, cutoff).abs()
