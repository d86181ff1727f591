"""MFABA: gradients summed along a gradient-descent path of the target's score out to the decision boundary."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.explainer import positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target
from .adversarial import AdversarialPathExplainer, check_bounds, clip, signed_step

VARIANTS = ("sharp", "smooth")
#: each variant's step when ``step_size`` is None: the code's ``alpha * 100`` (L2 length) and ``alpha``
#: (per feature), ``alpha = 0.001``
STEP_SIZES = {"sharp": 0.1, "smooth": 0.001}


@register("mfaba")
class MFABA(AdversarialPathExplainer):
    """MFABA: the target's score descends along its own gradient until the prediction leaves the target class, and
    the gradients met on the way are summed against the steps.

    Zhu, Chen, Zhang, Wang, Jin, Xue, Zhu & Choo, "MFABA: A More Faithful and Accelerated Boundary-based Attribution
    Method for Deep Neural Networks", AAAI 2024, arXiv:2312.13630.

    From ``p_0 = x``: ``p_{k+1} = clip(p_k - step_size * g_k / |g_k|_2)`` with ``g_k = grad s_t(p_k)``, and
    ``A = -sum_k (p_{k+1} - p_k) * g_k`` (so ``sum A ~ s_t(x) - s_t(p_n)``, exactly on a linear score).  Each path
    stops after ``steps`` steps or, with ``early_stop``, at the first point past ``p_0`` whose arg-max is not the
    target class.  ``variant='smooth'`` (MFABA-SMOOTH) steps by ``step_size * sign(g_k)`` instead, kept within
    ``epsilon`` of ``x`` in every feature.

    Defaults are the authors' code (``saliency_zoo.mfaba_sharp``, the default method of their scripts and README):
    the SHARP variant on the softmax probability (``score='softmax'``), ``steps=50``, ``alpha=0.001`` whose sharp
    step is ``100 * alpha = 0.1`` in L2 norm (smooth: ``alpha = 0.001`` per feature, ``epsilon = 0.3``), early
    stopping on.  Step sizes are in the input's units: the code works on [0, 1] images (normalisation inside the
    model) and clips to [0, 1], which ``bounds=(0, 1)`` reproduces; ``bounds=None`` (the default here) does not
    clip, as the inputs of this library are often normalised.  Cost: at most ``steps`` forwards and input-gradient
    backwards per image (fewer when the boundary is reached); all paths of all images advance together.

    Deliberate differences from the code: the arg-max that stops a path comes from the forward that the next step
    needs (the code runs an extra forward per step, and one more for a gradient it then drops); a zero gradient
    gives a zero step (the code divides by its norm: NaN); the softmax is taken once (the authors' scripts
    append a softmax layer to the model and ``use_softmax`` takes another).  A callable target needs
    ``early_stop=False`` (the stop needs the target's class).
    """

    needs_class_indices = True  # unless early_stop=False
    defaults = {"score": "softmax", "steps": 50, "variant": "sharp", "step_size": None, "epsilon": 0.3,
                "early_stop": True, "bounds": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        steps: int,
        variant: str,
        step_size: Optional[float],
        epsilon: float,
        early_stop: bool,
        bounds: Any,
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        steps = positive_int(steps, "steps")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        size = STEP_SIZES[variant] if step_size is None else positive_number(step_size, "step_size")
        radius = positive_number(epsilon, "epsilon")
        if not isinstance(early_stop, bool):
            raise TypeError(f"early_stop must be a bool, got {early_stop!r}")
        limits = check_bounds(bounds)
        if early_stop and target.classes is None:
            raise ValueError("MFABA stops each path where the prediction leaves the target class, so it needs class "
                             "indices as the target, not a callable; pass early_stop=False to follow a callable "
                             "objective for all steps")

        def move(point: Tensor, image: Tensor, grad: Tensor, walkers: Tensor) -> Tensor:
            if variant == "smooth":
                return clip(image + (signed_step(point, grad, -size, None) - image).clamp(-radius, radius), limits)
            norm = grad.flatten(1).norm(dim=1).view((-1,) + (1,) * (grad.dim() - 1))
            unit = torch.where(norm > 0, grad / torch.where(norm > 0, norm, torch.ones_like(norm)),
                               torch.zeros_like(grad))
            return clip(point - size * unit, limits)

        owners = torch.arange(x.shape[0], device=x.device)
        classes = target.classes

        def stop(predicted: Tensor, walkers: Tensor, k: int) -> Tensor:
            if not early_stop or k == 0:  # the code checks after each step, so the first step is always taken
                return torch.zeros_like(predicted, dtype=torch.bool)
            return predicted != classes[owners[walkers]]

        return self._walk(x, target, owners, steps=steps, move=move, stop=stop, batch_size=batch_size,
                          create_graph=create_graph)
