"""Infidelity and max-sensitivity.

Yeh, Hsieh, Suggala, Inouye & Ravikumar, "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019,
arXiv:1901.09392.

Infidelity: how far the map's linear prediction of a perturbation's effect is from the effect,
``E_I [(I . Phi - (f_t(x) - f_t(x - I)))^2]`` over random perturbations ``I``; with ``normalize`` (the authors' code
always does it) the map is first scaled by the optimal ``beta = E[I.Phi d] / E[(I.Phi)^2]``, so only its shape counts.
The default perturbation is the authors' noisy baseline: ``x - I`` is Gaussian noise of standard deviation ``std``
around a zero baseline (zero = the dataset mean for normalised inputs; the authors clip to MNIST's pixel range,
which normalised inputs do not have); any ``perturbation(rows) -> I`` may replace it.  Lower is better.

Max-sensitivity: how much the map moves when the input moves a little,
``max_{|delta|_inf <= r} |Phi(x + delta) - Phi(x)|_2 / |Phi(x)|_2`` over ``samples`` uniform draws (the
authors' radius 0.2 and 50 samples; Captum's ``sensitivity_max`` divides by the norm too, with radius 0.02 and
10 samples; ``normalize=False`` drops the division).  Average sensitivity takes the mean over the draws instead
of the maximum (Quantus' ``AvgSensitivity``: radius 0.2, 200 samples).
Lower is better.

Random draws are made per sample and shared by the images (``generator`` fixes them), so an image's value does
not depend on the rest of the batch or on ``batch_size``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import model_dtype
from ..core.guard import preserve_model
from ..core.targets import TargetSpec
from .common import check_finite, resolve_scorer

Perturbation = Callable[[Tensor], Tensor]


def _sample_seeds(samples: int, generator: Optional[torch.Generator]) -> list:
    """One seed per sample, drawn from ``generator`` (or the global generator)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    return torch.randint(0, 2 ** 62, (samples,), generator=generator).tolist()


def _draw(seed: int, shape, like: Tensor, uniform: bool) -> Tensor:
    """The draw of one sample: standard normal (or uniform in [-1, 1]) of ``shape``, on ``like``'s device."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator) * 2 - 1 if uniform else torch.randn(shape, generator=generator)
    return values.to(device=like.device, dtype=like.dtype)


def _check_maps(images: Tensor, maps: Tensor) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 4 or maps.shape[0] != images.shape[0] \
            or maps.shape[-2:] != images.shape[-2:] or maps.shape[1] not in (1, images.shape[1]):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must have shape (B, C or 1, H, W) matching images {tuple(images.shape)}, got {shape}")
    check_finite(maps)
    return maps.detach().to(device=images.device, dtype=torch.float64 if images.dtype == torch.float64
                            else torch.float32)


def infidelity(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *, samples: int = 100,
               std: float = 0.2, perturbation: Optional[Perturbation] = None, normalize: bool = True,
               score: str = "logit", batch_size: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Infidelity of each map (B,); see the module docstring.

    ``maps`` (B, C or 1, H, W): (B, 1, H, W) maps count once for every channel of a pixel.  ``perturbation``, if
    given, maps (n, C, H, W) rows of images to their perturbations ``I`` (same shape).  ``samples`` perturbations
    per image (the authors' code used 10000 on MNIST, Captum's default is 10).
    """
    phi = _check_maps(images, maps)
    seeds = _sample_seeds(samples, generator)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    batch = images.shape[0]
    run_dtype = model_dtype(model, images.dtype)
    dots = torch.empty(batch * samples, dtype=phi.dtype, device=images.device)
    scores = torch.empty_like(dots)
    owners_all = torch.arange(batch, device=images.device)
    with torch.no_grad(), preserve_model(model):
        clean = torch.cat([scorer(model(images[a:b].to(run_dtype)), owners_all[a:b]).to(phi.dtype)
                           for a, b in RowPlanner(batch, batch_size, images.device)])
        # rows are sample-major (row r: sample r // B of image r % B), so a pass draws each of its samples once
        for start, stop in RowPlanner(batch * samples, batch_size, images.device):
            index = torch.arange(start, stop, device=images.device)
            owners, sample = index % batch, index // batch
            rows = images[owners]
            if perturbation is None:  # x - I = std * noise: I = x - std * noise
                first = int(sample[0])
                noise = torch.stack([_draw(seeds[s], images.shape[1:], images, False)
                                     for s in range(first, int(sample[-1]) + 1)])
                change = rows - std * noise[sample - first]
            else:
                change = perturbation(rows)
            dots[start:stop] = (change.to(phi.dtype) * phi[owners]).flatten(1).sum(1)
            scores[start:stop] = scorer(model((rows - change).to(run_dtype)), owners).to(phi.dtype)
    dot = dots.view(samples, batch).T
    effect = clean[:, None] - scores.view(samples, batch).T
    if normalize:
        denominator = dot.square().mean(1, keepdim=True)
        beta = torch.where(denominator > 0, (dot * effect).mean(1, keepdim=True) / denominator.clamp(min=1e-300),
                           torch.zeros_like(denominator))
        dot = beta * dot
    return (dot - effect).square().mean(1)


def _sensitivity_samples(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec, radius: float,
                         samples: int, normalize: bool, perturbation: Optional[Perturbation],
                         model: Optional[nn.Module], generator: Optional[torch.Generator]) -> Tensor:
    """``|Phi(x + d_s) - Phi(x)|_2`` (over ``|Phi(x)|_2`` with ``normalize``) per image and sample, (B, samples),
    in float64.

    The code path of :func:`max_sensitivity` and :func:`avg_sensitivity` (they differ in the reduction only).
    """
    model = model if model is not None else getattr(explainer, "model", None)
    if target is None:
        if not isinstance(model, nn.Module):
            raise TypeError("target=None needs the model (model=, or an explainer with a .model) to pick classes")
        target = resolve_scorer(model, images, None, "logit", None).target.classes
    seeds = _sample_seeds(samples, generator)
    reference = explainer(images, target).detach()
    flat = reference.flatten(1).to(torch.float64)
    moves = torch.empty(images.shape[0], samples, dtype=torch.float64, device=images.device)
    for index, seed in enumerate(seeds):
        if perturbation is None:
            shifted = images + radius * _draw(seed, images.shape[1:], images, True)
        else:
            shifted = perturbation(images)
        moved = explainer(shifted, target).detach().flatten(1).to(torch.float64)
        moves[:, index] = (moved - flat).norm(dim=1)
    if normalize:
        norm = flat.norm(dim=1, keepdim=True)
        unbounded = torch.where(moves > 0, torch.full_like(moves, float("inf")), torch.zeros_like(moves))
        moves = torch.where(norm > 0, moves / norm.clamp(min=1e-300), unbounded)  # a zero map: 0 if it stays zero
    return moves


def max_sensitivity(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                    radius: float = 0.2, samples: int = 50, normalize: bool = True,
                    perturbation: Optional[Perturbation] = None, model: Optional[nn.Module] = None,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Max-sensitivity of ``explainer`` at each image (B,); see the module docstring.

    ``explainer(images, target) -> maps`` (any attribution method); ``target`` is fixed to class indices once
    (``None``: the model's arg-max on the clean images, the model being ``model`` or the explainer's), so that every
    perturbed copy explains the same class.  ``perturbation``, if given, maps (B, C, H, W) images to perturbed
    copies (one call per sample) instead of the uniform draw in the ``radius`` ball.  Quantus' ``MaxSensitivity``
    is the same protocol with 200 samples.
    """
    moves = _sensitivity_samples(explainer, images, target, radius, samples, normalize, perturbation, model,
                                 generator)
    return moves.amax(dim=1).to(torch.float64 if images.dtype == torch.float64 else torch.float32)


def avg_sensitivity(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                    radius: float = 0.2, samples: int = 200, normalize: bool = True,
                    perturbation: Optional[Perturbation] = None, model: Optional[nn.Module] = None,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Average sensitivity of ``explainer`` at each image (B,): the mean instead of the maximum of
    ``|Phi(x + d) - Phi(x)|_2 / |Phi(x)|_2`` over the same uniform draws in the L-inf ball: Quantus'
    ``AvgSensitivity``, the expected counterpart of the max-sensitivity of Yeh, Hsieh, Suggala, Inouye & Ravikumar
    (NeurIPS 2019, arXiv:1901.09392).  Lower is better.

    Defaults as Quantus' ``AvgSensitivity``: radius 0.2, 200 samples, the division by the unperturbed map's norm
    (``normalize``), no normalisation or absolute value of the maps.  Cost: ``samples + 1`` explanations of the
    batch.  Arguments as :func:`max_sensitivity`, which shares the code path and the draws (with the same
    ``generator`` state and ``samples``, the two see the same perturbed copies).
    """
    moves = _sensitivity_samples(explainer, images, target, radius, samples, normalize, perturbation, model,
                                 generator)
    return moves.mean(dim=1).to(torch.float64 if images.dtype == torch.float64 else torch.float32)
