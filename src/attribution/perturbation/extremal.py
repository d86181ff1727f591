"""Extremal perturbations: smooth masks of a fixed area, optimised to keep (or delete) the target's score."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, fraction_list
from ..core.filters import gaussian_blur
from ..core.registry import register
from ..core.targets import Target

PERTURBATIONS = ("blur", "fade")
VARIANTS = ("preserve", "delete", "dual")
#: the authors' optimiser and area constraint (TorchRay): SGD, learning rate 0.01, momentum and dampening 0.9; the
#: area term's weight starts at 300 and grows by 0.35 % per iteration; smooth max-pooling at coldness 20
LEARNING_RATE, MOMENTUM, AREA_WEIGHT, AREA_GROWTH, COLDNESS = 0.01, 0.9, 300.0, 1.0035, 20.0


class SmoothMasks:
    """Masks of ``size`` pixels from parameters on a grid ``step`` pixels apart (the "smooth masks" of the paper).

    Each output pixel ``u`` takes the smooth maximum over the parameters ``m_i`` of the ``(2r + 1)^2`` grid points
    around it of ``k(|u - p_i| / sigma) m_i``, with ``p_i`` the grid point's position, ``k(z) = exp(-2 max(z - 1/2,
    0)^2)`` and the smooth maximum ``sum_i v_i softmax(20 v)_i``; masks are clamped to [0, 1].  The grid is padded
    by ``sigma`` pixels on every side: :meth:`__call__` returns the mask cropped to ``size`` and the padded one (on
    which the area is measured).  The cell of an output pixel is ``floor(u * mid / (step * mid))`` in float32, as
    the authors' code computes it.
    """

    def __init__(self, size: Tuple[int, int], step: int, sigma: float, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.size, self.step, self.sigma = size, step, sigma
        self.padding = 1 + math.ceil(2 * sigma / step)
        self.radius = 1 + math.ceil(sigma / step)
        self.margin = round(sigma)
        taps = 2 * self.radius + 1
        self.grid = tuple(math.ceil(s / step) for s in size)
        self.middle = tuple(g + 2 * self.padding - taps + 1 for g in self.grid)
        self.full = tuple(step * m - step + 1 for m in self.middle)
        if any(full - self.margin < s for full, s in zip(self.full, size)):
            raise ValueError(f"step={step} and sigma={sigma} give masks that do not cover a {size[0]}x{size[1]} "
                             "image (the authors' grid geometry): a sigma that is a whole multiple of the step "
                             "does, as the defaults (step 7, sigma 21)")
        axes = []
        for middle, full in zip(self.middle, self.full):
            u = torch.arange(full, dtype=torch.float32, device=device)
            scale = torch.tensor(middle, dtype=torch.float32) / torch.tensor(step * middle, dtype=torch.float32)
            cell = torch.floor(scale.to(device) * u)
            offsets = torch.arange(taps, dtype=torch.float32, device=device) - self.padding
            axes.append(u[None, :] - (sigma + step * (cell[None, :] + offsets[:, None])))  # (taps, full)
        dy, dx = axes
        distance = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2) / sigma  # (taps, taps, h, w)
        self.weight = torch.exp(-2 * (distance - 0.5).clamp(min=0) ** 2).reshape(1, taps * taps, *self.full)
        self.weight = self.weight.to(dtype)

    def __call__(self, params: Tensor) -> Tuple[Tensor, Tensor]:
        """(cropped (K, 1, H, W), padded (K, 1, h, w)) masks of parameters ``params`` (K, 1, *grid)."""
        taps = 2 * self.radius + 1
        near = F.unfold(params, taps, padding=self.padding).view(params.shape[0], taps * taps, *self.middle)
        near = F.interpolate(near, size=tuple(self.step * m for m in self.middle), mode="nearest")
        near = near[:, :, :self.full[0], :self.full[1]] * self.weight
        mask = (near * (COLDNESS * near).softmax(dim=1)).sum(dim=1, keepdim=True).clamp(0, 1)
        top, left = self.margin, self.margin
        return mask[:, :, top:top + self.size[0], left:left + self.size[1]], mask


def perturbation_pyramid(x: Tensor, levels: int, kind: str, max_blur: float) -> Tensor:
    """(B, levels, C, H, W): level ``l`` is ``x`` blurred with sigma ``(1 - l / (levels - 1)) max_blur`` (a
    Gaussian out to 4 sigma, zero padding) or faded to ``x l / (levels - 1)``; the last level is ``x`` itself."""
    pyramid = []
    for fraction in torch.linspace(0, 1, levels).tolist():
        if kind == "fade":
            pyramid.append(x * fraction)
            continue
        sigma = (1 - fraction) * max_blur
        pyramid.append(x if sigma == 0 else gaussian_blur(x, 2 * math.ceil(4 * sigma) + 1, sigma, padding="zeros"))
    return torch.stack(pyramid, dim=1)


def perturb(pyramid: Tensor, masks: Tensor) -> Tensor:
    """Images (K, C, H, W) that take each pixel from the pyramid (K, L, C, H, W) at level ``mask (L - 1)``,
    interpolating linearly between the two levels around it (mask 1: the image, mask 0: the most perturbed)."""
    levels = pyramid.shape[1]
    position = masks * (levels - 1)  # (K, 1, H, W)
    lower = position.floor()
    fraction = (position - lower).unsqueeze(1)
    index = lower.long().clamp(0, levels - 1).unsqueeze(1).expand(-1, 1, pyramid.shape[2], -1, -1)
    below = pyramid.gather(1, index)
    above = pyramid.gather(1, (index + 1).clamp(max=levels - 1))
    return ((1 - fraction) * below + fraction * above).squeeze(1)


@register("extremal_perturbation")
class ExtremalPerturbation(Explainer):
    """Extremal perturbations: the smooth mask of a given area that best keeps the target's score.

    Fong, Patrick & Vedaldi, "Understanding Deep Networks via Extremal Perturbations and Smooth Masks", ICCV 2019,
    arXiv:1910.08485.

    ``m_a = argmax_m f_t(x perturbed outside m) - lambda ||sort(m) - r_a||^2`` for each area ``a`` of ``areas``:
    ``r_a`` is the sorted mask of area ``a`` (a fraction ``1 - a`` of zeros, then ones) and the area term's weight
    grows during the optimisation, so the mask ends with the area asked for.  Pixels outside the mask are taken
    from a pyramid of increasingly blurred images (``perturbation='blur'``, sigma up to ``max_blur``) or faded to
    black (``'fade'``), ``num_levels`` levels apart.  ``variant='delete'`` instead minimises the score of the image
    perturbed *inside* the mask, ``'dual'`` maximises the difference of the two.  Masks come from parameters on a
    grid ``step`` pixels apart, smoothed over ``sigma`` pixels (:class:`SmoothMasks`).  ``jitter`` flips the
    perturbed images left to right on every other iteration.

    Defaults and optimiser from the authors' TorchRay code: ``areas=(0.1,)``, 800 iterations of SGD (learning rate
    0.01, momentum and dampening 0.9) on the raw logit (``score``), area weight 300 growing by 0.35 % per iteration,
    8 blur levels up to sigma 20, ``step=7``, ``sigma=21``.  As there, the map is the mask of the last iteration's
    parameters before their last update.  The masks of several areas are averaged into one (B, 1, H, W) map in
    [0, 1].  Each image's masks are optimised independently (SGD is element-wise), ``batch_size`` masks per pass
    (a dual pass holds two rows per mask).  ``create_graph=True`` differentiates through the whole optimisation
    (every iteration's graph is kept: memory grows with ``iterations``).

    Cost: ``iterations`` forwards and backwards to the input per image and area (two rows each for ``'dual'``).
    """

    kind = "perturbation"
    defaults = {"areas": (0.1,), "perturbation": "blur", "variant": "preserve", "iterations": 800,
                "num_levels": 8, "max_blur": 20.0, "step": 7, "sigma": 21.0, "jitter": True}

    def _explain(self, x: Tensor, target: Target, *, areas: Union[float, Sequence[float]], perturbation: str,
                 variant: str, iterations: int, num_levels: int, max_blur: float, step: int, sigma: float,
                 jitter: bool, batch_size: Optional[int], create_graph: bool) -> Tensor:
        areas = fraction_list(areas, "areas")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        for name, value, low in (("iterations", iterations, 1), ("num_levels", num_levels, 2), ("step", step, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int of at least {low}, got {value!r}")
        for name, value in (("max_blur", max_blur), ("sigma", sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(jitter, bool):
            raise TypeError(f"jitter must be a bool, got {jitter!r}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        generator = SmoothMasks(tuple(x.shape[-2:]), step, float(sigma), x.device, dtype)
        with torch.set_grad_enabled(create_graph):
            pyramid = perturbation_pyramid(x if create_graph else x.detach(), num_levels, perturbation,
                                           float(max_blur))
        cells = generator.full[0] * generator.full[1]
        # the sorted reference mask of each area: this many zeros, then ones (rounded down in double precision)
        zeros = torch.tensor([int(cells * (1 - a)) for a in areas], device=x.device)
        count = x.shape[0] * len(areas)  # masks, image-major
        masks = []
        for start, stop in RowPlanner(count, batch_size, x.device):
            rows = torch.arange(start, stop, device=x.device)
            owners = rows // len(areas)
            masks.append(self._optimise(pyramid[owners], owners, zeros[rows % len(areas)], target, generator,
                                        variant, iterations, jitter, create_graph))
        return torch.cat(masks).view(x.shape[0], len(areas), *x.shape[-2:]).mean(dim=1, keepdim=True)

    def _optimise(self, pyramid: Tensor, owners: Tensor, zeros: Tensor, target: Target, generator: SmoothMasks,
                  variant: str, iterations: int, jitter: bool, create_graph: bool) -> Tensor:
        """The cropped masks (K, 1, H, W) of K masks, one per row of ``pyramid`` (K, L, C, H, W), mask ``k``'s
        sorted reference holding ``zeros[k]`` zeros.  SGD is written out (``torch.optim.SGD``'s update: the first
        step's velocity is the gradient) so that ``create_graph`` can differentiate through every step."""
        count = owners.shape[0]
        params = torch.ones(count, 1, *generator.grid, dtype=generator.weight.dtype, device=owners.device,
                            requires_grad=True)
        cells = generator.full[0] * generator.full[1]
        reference = (torch.arange(cells, device=owners.device)[None, :] >= zeros[:, None]).to(params.dtype)
        velocity: Optional[Tensor] = None
        weight = AREA_WEIGHT
        for iteration in range(iterations):
            cropped, full = generator(params)
            keep = cropped.to(pyramid.dtype)
            if variant == "preserve":
                images, rows = perturb(pyramid, keep), owners
            elif variant == "delete":
                images, rows = perturb(pyramid, 1 - keep), owners
            else:
                images = torch.cat([perturb(pyramid, keep), perturb(pyramid, 1 - keep)])
                rows = torch.cat([owners, owners])
            if jitter and iteration % 2 == 0:
                images = images.flip(dims=(3,))
            scores = target(self._forward(images), rows).to(params.dtype)
            if variant == "delete":
                reward = -scores
            elif variant == "dual":
                reward = scores[:count] - scores[count:]
            else:
                reward = scores
            area_term = ((full.flatten(1).sort(dim=1).values - reference) ** 2).mean(dim=1) * weight
            (grad,) = torch.autograd.grad((area_term - reward).sum(), params, create_graph=create_graph)
            velocity = grad if velocity is None else MOMENTUM * velocity + (1 - MOMENTUM) * grad
            params = (params - LEARNING_RATE * velocity).clamp(0, 1)
            if not create_graph:
                params = params.detach().requires_grad_(True)
            weight *= AREA_GROWTH
        return cropped if create_graph else cropped.detach()
