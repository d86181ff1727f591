"""FORGrad: a gradient method's map with its high spatial frequencies filtered out."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.explainer import positive_number
from ..core.filters import ideal_low_pass
from ..core.registry import register
from ..core.targets import Target
from .base import WrappingExplainer
from .vanilla import VanillaGradient


REDUCTIONS = ("max_abs", "mean")


@register("forgrad")
class FORGrad(WrappingExplainer):
    """FORGrad: low-pass filter the magnitude of any gradient method's map.

    Muzellec, Fel, Boutin, Andeol, VanRullen & Serre, "Gradient strikes back: How filtering out high frequencies
    improves explanations", arXiv:2307.09591, 2023 (later titled "Saliency strikes back: ...").

    ``A = | F^-1( F(R(M(x))) * w_sigma ) |`` with ``M`` the wrapped method (``method``, any gradient explainer
    class or registry name, default the vanilla gradient), ``F`` the 2-D DFT and ``w_sigma`` the ideal low-pass
    disk that keeps the frequencies within ``sigma`` cycles per image of zero: (B, 1, H, W), non-negative.  ``R``
    (``reduce``) makes one channel of the map as Xplique's methods do before its ``forgrad``: ``'max_abs'``,
    ``max_c |M|`` (Xplique's Saliency), ``'mean'``, ``|mean_c M|`` (its other methods' default reducer, then
    ``forgrad``'s absolute value); the default None picks ``'max_abs'`` for the vanilla gradient (the paper's
    "FORGrad on Saliency") and ``'mean'`` for any other method.  The
    paper picks an optimal cutoff per architecture; ``sigma=15`` is its recommendation for 224 x 224 ImageNet models
    (the default of Xplique's ``forgrad``, the authors' group's library).  Options of the wrapped method pass
    through.  Cost: the wrapped method's plus two FFTs of the map.

    Equal to Xplique's Saliency then ``forgrad`` (and to ``forgrad`` of any method's channel-mean map) on even
    square maps.  Deliberate differences: any H x W is accepted (the disk is over the signed DFT frequencies of each
    axis); an odd size is transformed back at its own size (Xplique's inverse drops the last column and resizes
    bicubically, and its shifted disk sits one frequency off centre); a sigma at or above the largest frequency
    returns ``R(M(x))`` (Xplique asserts ``sigma <= size``).
    """

    kind = "magnitude"
    defaults = {"method": VanillaGradient, "sigma": 15, "reduce": None}

    def _explain(self, x: Tensor, target: Target, *, sigma: float, reduce: Optional[str], method: Any = None,
                 **inner: Any) -> Tensor:
        cutoff = positive_number(sigma, "sigma")
        if reduce is None:
            reduce = "max_abs" if self.inner_class is VanillaGradient else "mean"
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be None or one of {REDUCTIONS}, got {reduce!r}")
        maps = self.inner._explain(x, target, **self._inner_options(inner))
        if reduce == "max_abs":
            magnitude = maps.abs().amax(dim=1, keepdim=True)
        else:
            magnitude = maps.mean(dim=1, keepdim=True).abs()
        return ideal_low_pass(magnitude, cutoff).abs()
