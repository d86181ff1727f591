"""Boundary-based Integrated Gradients: Integrated Gradients from the nearest adversarial example to the image."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target
from .adversarial import AdversarialPathExplainer, check_bounds, clip, signed_step
from .base import accumulation_dtype
from .paths import quadrature

#: the authors' radii in the units of [0, 1] images: 36/255, 64/255, then 0.3 to 1.1 (the code's eps / 255)
EPSILONS = (36 / 255, 64 / 255, 0.3, 0.5, 0.7, 0.9, 1.1)


@register("big")
class BoundaryIG(AdversarialPathExplainer):
    """Boundary-based Integrated Gradients (BIG): Integrated Gradients whose baseline is the closest adversarial
    example that attacks of several radii find around the image.

    Wang, Fredrikson & Datta, "Robust Models Are More Interpretable Because Attributions Look Normal", ICML 2022,
    arXiv:2103.11257 (code: github.com/zifanw/boundary).

    For each radius ``e`` in ``epsilons`` an L-infinity attack lowers the target's score from ``p_0 = x`` by signed
    steps kept in the ``e``-box around ``x``: ``p_{k+1} = clip(x + clamp(p_k - step_size * sign(grad s_t(p_k)) - x,
    -e, e))``, ``attack_steps`` steps (no early stop).  The baseline ``b`` is, per image, the end point nearest to
    ``x`` (L2) among those no longer predicted as the target (ties: the earlier radius), or the first radius' end
    point when no attack succeeds; then ``A = (x - b) * sum_k w_k grad s_t(b + a_k (x - b))`` with the quadrature
    rule ``method`` over ``steps`` points (so ``sum A ~ s_t(x) - s_t(b)``).

    Defaults are those of ``saliency_zoo.big`` in github.com/LMBTough/LA (the benchmark code of the LA paper, by
    MFABA's and AttEXplore's authors): radii ``(36, 64, 76.5, 127.5, 178.5, 229.5, 280.5) / 255``, 50 attack
    steps of ``0.001``, and Integrated Gradients of the softmax probability (``score='softmax'``: that script
    appends a softmax layer to the model) with Captum's ``riemann_trapezoid`` rule over 50 points.  Step sizes and
    radii are in the input's units: that code works on [0, 1] images (normalisation inside the model) and clips to
    [0, 1], which ``bounds=(0, 1)`` reproduces; ``bounds=None`` (the default here) does not clip, as this library's
    inputs are often normalised.  Cost per image: ``attack_steps`` forwards and input-gradient backwards per
    distinct attack, one forward per attack to check its success, then ``steps`` forwards and backwards.  Attacks
    whose radius is at least ``attack_steps * step_size`` never reach the edge of their box, so they are one
    attack, run once (with the defaults all seven are: 50 + 1 + 50 passes), unless an image lies outside
    ``bounds`` (clipping can then move it further: every radius runs).  All attacks of all images advance
    together.

    Deliberate differences from the code: each attack step follows the sign of the current gradient (the LA
    code's attack never clears the input's ``.grad``, so it follows the sign of the running sum of the gradients
    met so far; the original BIG code runs foolbox's PGD, which follows the current gradient, from a random start
    in the ball: no random start here); the direction is the gradient of the target's score, which for the softmax
    probability has the sign of the gradient of the cross-entropy on the logits that the attacks ascend (the LA
    script's model outputs probabilities, so its cross-entropy is taken of them again); the baseline is the
    closest successful end point as the paper describes (the original code keeps the first successful radius in
    the list, the LA code the first radius whatever its success); the trapezoid rule is the composite one (weights
    summing to 1: Captum's ``riemann_trapezoid`` returns ``(steps - 1) / steps`` times this map).
    """

    needs_class_indices = True
    defaults = {"score": "softmax", "steps": 50, "method": "trapezoid", "epsilons": EPSILONS, "attack_steps": 50,
                "step_size": 0.001, "bounds": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        steps: int,
        method: str,
        epsilons: Union[float, Sequence[float]],
        attack_steps: int,
        step_size: float,
        bounds: Any,
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        steps = positive_int(steps, "steps")
        dtype = accumulation_dtype(x)
        alphas, weights = (t.to(device=x.device, dtype=dtype) for t in quadrature(method, steps))
        radii = check_epsilons(epsilons)
        attack_steps = positive_int(attack_steps, "attack_steps")
        size = positive_number(step_size, "step_size")
        limits = check_bounds(bounds)
        if target.classes is None:
            raise ValueError("BIG's attacks stop being successful where the prediction leaves the target class, so "
                             "it needs class indices as the target, not a callable")
        baseline = self._boundary_points(x, target, radii, attack_steps, size, limits, batch_size).to(dtype)
        delta = x.to(dtype) - baseline

        def points(owners: Tensor, step: Tensor):
            return baseline[owners] + alphas[step].view(-1, 1, 1, 1) * delta[owners], weights[step].view(-1, 1, 1, 1)

        return delta * self._integrate(x, target, steps, points, batch_size, create_graph)

    def _boundary_points(self, x: Tensor, target: Target, radii: Tuple[float, ...], attack_steps: int, size: float,
                         limits: Any, batch_size: Optional[int]) -> Tensor:
        """Each image's baseline (B, C, H, W): the closest successful attack's end point (see the class)."""
        # no attack leaves the box of a radius at least this, so those radii are one attack; clipping to bounds can
        # move an image that lies outside them further, so then every radius is its own attack
        inside = limits is None or bool(((x >= limits[0]) & (x <= limits[1])).all())
        reach = attack_steps * size if inside else float("inf")
        runs = sorted({r for r in radii if r < reach})
        if any(r >= reach for r in radii):
            runs.append(min(r for r in radii if r >= reach))
        run_of = torch.tensor([runs.index(r if r < reach else runs[-1]) for r in radii], device=x.device)
        batch, count = x.shape[0], len(runs)
        owners = torch.arange(batch, device=x.device).repeat_interleave(count)  # image-major
        radius = torch.tensor(runs, dtype=x.dtype, device=x.device).repeat(batch).view(-1, *(1,) * (x.dim() - 1))

        def move(point: Tensor, image: Tensor, grad: Tensor, walkers: Tensor) -> Tensor:
            r = radius[walkers]
            return clip(image + torch.maximum(torch.minimum(signed_step(point, grad, -size, None) - image, r), -r),
                        limits)

        ends = x[owners].clone()
        for _ in self._advance(x, target, owners, ends, steps=attack_steps, move=move, stop=None,
                               batch_size=batch_size, create_graph=False):
            pass
        predicted = torch.empty(owners.shape[0], dtype=torch.long, device=x.device)
        with torch.no_grad():
            for start, stop in RowPlanner(owners.shape[0], batch_size, x.device):
                predicted[start:stop] = self._forward(ends[start:stop]).argmax(dim=1)
        distance = (ends - x[owners]).to(accumulation_dtype(x)).flatten(1).norm(dim=1).view(batch, count)
        distance = distance.masked_fill((predicted == target.classes[owners]).view(batch, count), float("inf"))
        distance = distance[:, run_of]  # (B, len(radii)), in the order given
        chosen = distance.argmin(dim=1)  # the first minimum: the earlier radius on ties, the first when all failed
        return ends.view(batch, count, *x.shape[1:])[torch.arange(batch, device=x.device), run_of[chosen]]


def check_epsilons(epsilons: Any) -> Tuple[float, ...]:
    """A positive number or a non-empty list or tuple of them, as a tuple of floats; else a ValueError."""
    values = tuple(epsilons) if isinstance(epsilons, (list, tuple)) else (epsilons,)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in values):
        raise ValueError(f"epsilons must be a positive number or a non-empty list or tuple of positive numbers, got "
                         f"{epsilons!r}")
    return tuple(float(v) for v in values)
