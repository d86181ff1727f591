"""Integrated Gradients."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..core.explainer import positive_int
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline, quadrature


@register("integrated_gradients")
class IntegratedGradients(GradientExplainer):
    """Integrated Gradients.

    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017, arXiv:1703.01365.

    ``A = (x - b) * integral_0^1 grad f_t(b + a (x - b)) da``, approximated by ``sum_k w_k grad f_t(b + a_k (x-b))``
    with the quadrature rule ``method`` (see :func:`attribution.gradients.paths.quadrature`).  Completeness:
    ``sum A = f_t(x) - f_t(b)`` up to the quadrature error.  Cost: ``steps`` forwards and input-gradient backwards
    per image, ``batch_size`` rows per pass.

    Defaults follow the seed: ``baseline='black'`` (each image's minimum, the paper's black image whatever the
    normalisation), ``steps=128``, ``method='linspace'`` (the seed's and PAIR's rule).
    """

    defaults = {"baseline": "black", "steps": 128, "method": "linspace"}
    per_image_options = ("baseline",)

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        baseline: BaselineSpec,
        steps: int,
        method: str,
        batch_size: Optional[int],
        create_graph: bool,
        idgi: bool = False,
    ) -> Tensor:
        """With ``idgi`` (set by :class:`~attribution.gradients.idgi.IDGI`): IDGI on ``steps`` evenly spaced points
        from the baseline to the image, both included, whatever ``method``."""
        steps = positive_int(steps, "steps")
        dtype = accumulation_dtype(x)
        rule = "linspace" if idgi else method
        alphas, weights = (t.to(device=x.device, dtype=dtype) for t in quadrature(rule, steps))
        start = make_baseline(x, baseline).to(dtype)
        delta = x.to(dtype) - start

        def points(owners: Tensor, step: Tensor):
            a = alphas[step].view(-1, 1, 1, 1)
            return start[owners] + a * delta[owners], weights[step].view(-1, 1, 1, 1)

        total = self._integrate(x, target, steps, points, batch_size, create_graph, idgi)
        return total if idgi else delta * total
