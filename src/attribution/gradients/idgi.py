"""IDGI: Important Direction Gradient Integration, on the path of Integrated Gradients, Blur IG or Guided IG."""
from __future__ import annotations

import numbers

from typing import Any, Type, Union

from torch import Tensor, nn

from ..core.explainer import COMMON_OPTIONS
from ..core.registry import register, resolve_method
from ..core.targets import Target
from .base import GradientExplainer
from .blur_ig import BlurIG
from .guided_ig import GuidedIG
from .integrated import IntegratedGradients

#: the path methods IDGI applies to
PATH_METHODS = (IntegratedGradients, BlurIG, GuidedIG)


@register("idgi")
class IDGI(GradientExplainer):
    """IDGI: integrate only along the gradient's own direction, so that the parts of each step orthogonal to it
    (which add noise, not score) drop out.

    Yang, Wang & Bilodeau, "IDGI: A Framework to Eliminate Explanation Noise from Integrated Gradients", CVPR 2023,
    arXiv:2303.14242.

    On the points ``p_0, ..., p_K`` of a path method's path (``p_0`` its start, ``p_K`` the image) with gradients
    ``g_k = grad f_t(p_k)``: ``A = sum_{k<K} g_k^2 / |g_k|^2 * (f_t(p_{k+1}) - f_t(p_k))``.  Each step's score change
    is shared out in proportion to the squared gradient (the authors' formula, as their reference code computes
    it), so ``sum A = f_t(x) - f_t(p_0)`` exactly, whatever the number of steps, as long as no step starts at a
    point where the gradient is zero.  A step that does (``g_k = 0``, e.g. every ReLU dead near a black baseline)
    has no direction to share its change along and contributes nothing here (the authors' code divides 0 by 0
    there and returns NaN), so ``sum A`` then misses that step's score change.  ``method`` picks the path and
    its options pass through: Integrated Gradients' straight line (``steps`` evenly spaced points, baseline and
    image included; the quadrature rule does not apply), Blur IG's ``steps + 1`` blurred images from
    ``max_sigma`` down to the image, or Guided IG's adaptive path (the points where it takes its gradients, then
    the image).  Cost: the wrapped method's (Blur IG: one more point per image; Guided IG: one more forward).
    """

    defaults = {"method": IntegratedGradients}

    def __init__(self, model: nn.Module, method: Union[str, Type[GradientExplainer]] = IntegratedGradients,
                 **options: Any) -> None:
        self.inner_class = resolve_method(method, GradientExplainer, "IDGI's method")
        if not issubclass(self.inner_class, PATH_METHODS):
            names = ", ".join(cls.name for cls in PATH_METHODS)
            raise TypeError(f"IDGI integrates along a path method's path ({names}); got {self.inner_class.__name__}")
        self.inner = self.inner_class(model)
        self.per_image_options = self.inner.per_image_options  # its options pass through
        super().__init__(model, **options)

    def option_names(self) -> set:
        return (set(COMMON_OPTIONS) | self.inner.option_names()) - {"method"}

    def _explain(self, x: Tensor, target: Target, *, method: Any = None, **options: Any) -> Tensor:
        # ``method`` here is the wrapped class; Integrated Gradients' own (its quadrature rule) keeps its default,
        # which IDGI does not use
        inner = {**self.inner.defaults, **options}
        if self.inner_class is IntegratedGradients and (isinstance(inner["steps"], bool) or not isinstance(
                inner["steps"], numbers.Integral) or inner["steps"] < 2):
            raise ValueError(f"IDGI on the straight line needs steps >= 2 (the baseline and the image), "
                             f"got {inner['steps']!r}")
        return self.inner._explain(x, target, idgi=True, **inner)
