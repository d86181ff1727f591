"""What the metrics share: pixel maps and their orderings, substrates, the batched scoring of perturbed copies,
trapezoid areas, and the result type of a curve metric.

Conventions used by every metric in :mod:`attribution.metrics`:

* ``maps`` are (B, C, H, W) or (B, 1, H, W) attributions (any explainer's output).  A per-pixel map is the sum over
  channels (signed); pass ``maps.abs()`` to rank by magnitude instead.
* ``target`` is what an explainer takes: ``None`` (each image's arg-max class on the unperturbed image), an int, a
  sequence or LongTensor of class indices, or a callable objective (see :mod:`attribution.core.targets`).
* ``score`` is what is measured on each perturbed copy: ``'softmax'``, ``'logit'``, ``'log_softmax'`` (the target's
  score) or ``'accuracy'`` (1 when the target class is still the arg-max, else 0; needs class indices).
* Perturbed copies are built on the images' device, ``batch_size`` rows per forward (``None``: the memory-aware
  default of :class:`attribution.core.batching.RowPlanner`), under ``torch.no_grad`` and the model state guard.
* Ties between equal attributions are broken by a fixed random permutation of the pixels (``seed``), as SHAP's
  benchmark does with its constant tie-breaking noise, so that flat regions of a map are not removed top-left first.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.filters import gaussian_blur
from ..core.explainer import model_dtype
from ..core.guard import preserve_model
from ..core.targets import SCORES, Target, TargetSpec, resolve_target

MEASURES = SCORES + ("accuracy",)
SubstrateSpec = Union[str, float, Tensor, Callable[[Tensor], Tensor]]
RowFn = Callable[[Tensor, Tensor], Tensor]


class Curve(NamedTuple):
    """A perturbation curve per image.  Unpacks as ``auc, x, y`` (the seed's ``kpm`` returned that triple).

    ``auc`` (B,): trapezoid area under each image's curve over ``x``; ``x`` (S,): the fraction of pixels changed
    (inserted, deleted, kept or removed) at each step; ``y`` (B, S): the measured score at each step.
    """

    auc: Tensor
    x: Tensor
    y: Tensor


# ------------------------------------------------------------------------------------------------------- maps
def check_images(images: Tensor) -> None:
    """Raise a clear error unless ``images`` is a floating (B, C, H, W) tensor."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {shape}")


def check_maps(images: Tensor, maps: Tensor) -> Tensor:
    """Validate ``maps`` against ``images`` and return the per-pixel map (B, H*W) (channel sum) in float."""
    check_images(images)
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise ValueError("maps must be a tensor of shape (B, C, H, W), (B, 1, H, W) or (B, H, W)")
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    if maps.shape[0] != images.shape[0] or maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not match images of shape {tuple(images.shape)} "
            "(same batch and height/width needed; resize the maps to the image first)"
        )
    check_finite(maps)
    return pixel_map(maps.detach()).flatten(1).to(device=images.device)


def check_finite(maps: Tensor, name: str = "maps") -> None:
    """Raise a ValueError naming ``name`` unless every entry of ``maps`` is finite: a NaN or infinite map has no
    ranking, mass or maximum to score (left as it is, it would score like a zero or constant map)."""
    bad = ~torch.isfinite(maps.detach())
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite; got {int(bad.sum())} NaN or infinite entries of {maps.numel()} "
                         f"(in image(s) {sorted(set(bad.flatten(1).any(dim=1).nonzero().flatten().tolist()))})")


def pixel_map(maps: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H, W): the channel sum, in float32 (float64 stays float64)."""
    if maps.dim() == 3:
        maps = maps.unsqueeze(1)
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    return maps.to(dtype).sum(dim=1)


def salience_ranks(values: Tensor, seed: int = 0, prefix_stable: bool = False) -> Tensor:
    """Rank of every pixel in descending order of ``values`` (B, N): 0 for the most salient.

    Equal values are ordered by one fixed random permutation of the pixel indices (drawn from ``seed``).
    ``prefix_stable``: the tie order of the first ``n`` indices does not depend on ``N`` (a multiplicative hash of
    each index instead of a drawn permutation), for rows padded to a common length (segments of several images).
    """
    batch, n = values.shape
    if prefix_stable:
        keys = ((torch.arange(n, dtype=torch.int64) + seed * 7919) * 2654435761) % (1 << 32)
        perm = keys.argsort().to(values.device)
    else:
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=generator).to(values.device)
    order = perm[values[:, perm].argsort(dim=1, descending=True, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=values.device).expand(batch, n))
    return ranks


def trapezoid(y: Tensor, x: Tensor) -> Tensor:
    """Trapezoid area under ``y`` (..., S) over ``x`` (S,), the rule RISE's ``auc`` applies on a uniform grid."""
    return torch.trapezoid(y, x.to(y), dim=-1)


# -------------------------------------------------------------------------------------------------- substrates
def rise_blur(images: Tensor) -> Tensor:
    """RISE's insertion substrate: the 11 x 11 kernel of ``gkern(11, 5)``, zero padding (Petsiuk et al. 2018)."""
    return gaussian_blur(images, 11, 5.0, padding="zeros", reflect_kernel=True)


def make_substrate(images: Tensor, substrate: SubstrateSpec) -> Tensor:
    """The image that replaces removed pixels, (B, C, H, W) on the images' device.

    ``'zeros'``: 0 in the model's input space (the dataset mean for inputs normalised by it, SHAP's mean
    imputation); ``'blur'``: RISE's blurred image; ``'mean'``: each image's per-channel mean; ``'black'`` /
    ``'white'``: each image's smallest / largest entry over all channels (Quantus' ``perturb_baseline``); a float:
    that constant; a tensor broadcastable to the images; or a callable ``f(images) -> tensor``.
    """
    if isinstance(substrate, str):
        if substrate == "zeros":
            return torch.zeros_like(images)
        if substrate == "blur":
            return rise_blur(images)
        if substrate == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if substrate in ("black", "white"):
            extreme = images.amin if substrate == "black" else images.amax
            return extreme(dim=tuple(range(1, images.dim())), keepdim=True).expand_as(images)
        raise ValueError(f"substrate must be 'zeros', 'blur', 'mean', 'black', 'white', a number, a tensor or a "
                         f"callable, got {substrate!r}")
    if isinstance(substrate, (int, float)) and not isinstance(substrate, bool):
        return torch.full_like(images, float(substrate))
    if isinstance(substrate, Tensor):
        return _broadcast_substrate(substrate, images)
    if callable(substrate):
        return _broadcast_substrate(substrate(images), images)
    raise TypeError(f"substrate must be a string, a number, a tensor or a callable, got {type(substrate).__name__}")


def _broadcast_substrate(substrate: Tensor, images: Tensor) -> Tensor:
    """A substrate tensor on the images' device and dtype, broadcast to their shape; else a ValueError naming both
    shapes."""
    if not isinstance(substrate, Tensor):
        raise TypeError(f"a substrate callable must return a tensor, got {type(substrate).__name__}")
    try:
        return substrate.to(device=images.device, dtype=images.dtype).expand_as(images)
    except RuntimeError:
        raise ValueError(f"substrate of shape {tuple(substrate.shape)} does not broadcast to the images' shape "
                         f"{tuple(images.shape)}") from None


# ------------------------------------------------------------------------------------------------ run order
def run_order(model: nn.Module, images: Tensor, modules: "list[nn.Module]") -> "list[int]":
    """The indices of ``modules`` in the order they first run in a forward of one image (no autograd, the model
    guarded; modules that do not run are left out)."""
    seen: "list[int]" = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, i=i: seen.append(i) if i not in seen else None)
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad(), preserve_model(model):
            model(images[:1].to(model_dtype(model, images.dtype)))
    finally:
        for handle in handles:
            handle.remove()
    return seen


# ------------------------------------------------------------------------------------------- scoring of rows
class RowScorer:
    """Maps raw model outputs of perturbed rows to the measured value per row (see the module docstring)."""

    def __init__(self, target: Target, measure: str) -> None:
        self.target = target
        self.measure = measure

    def __call__(self, outputs: Tensor, owners: Tensor) -> Tensor:
        if self.measure == "accuracy":
            return (outputs.argmax(dim=1) == self.target.classes[owners]).to(torch.float32)
        return self.target(outputs, owners)


def resolve_scorer(model: nn.Module, images: Tensor, target: TargetSpec, score: str,
                   batch_size: Optional[int]) -> RowScorer:
    """Resolve ``target`` for ``images`` (``None``: the model's arg-max on each image) and ``score``."""
    if score not in MEASURES:
        raise ValueError(f"score must be one of {MEASURES}, got {score!r}")
    resolved = resolve_target(target, images.shape[0], images.device, "logit" if score == "accuracy" else score)
    if resolved.pending:
        classes = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
        dtype = model_dtype(model, images.dtype)
        with torch.no_grad(), preserve_model(model):
            for start, stop in RowPlanner(images.shape[0], batch_size, images.device):
                classes[start:stop] = model(images[start:stop].to(dtype)).argmax(dim=1)
        resolved.classes = classes
    if score == "accuracy" and resolved.classes is None:
        raise ValueError("score='accuracy' needs class indices as the target, not a callable objective")
    return RowScorer(resolved, score)


def score_rows(model: nn.Module, rows: RowFn, batch: int, steps: int, scorer: RowScorer,
               batch_size: Optional[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """Evaluate ``batch * steps`` perturbed rows, image-major, and return the measured values (batch, steps).

    ``rows(owners, step)`` builds the rows for (n,) image indices and (n,) step indices; they are evaluated
    ``batch_size`` at a time without autograd, the model held in eval mode by the state guard.
    """
    out = torch.empty(batch * steps, dtype=torch.float32 if dtype != torch.float64 else dtype, device=device)
    run_dtype = model_dtype(model, dtype)
    with torch.no_grad(), preserve_model(model):
        for start, stop in RowPlanner(batch * steps, batch_size, device):
            index = torch.arange(start, stop, device=device)
            owners, step = index // steps, index % steps
            out[start:stop] = scorer(model(rows(owners, step).to(run_dtype)), owners).to(out.dtype)
    return out.view(batch, steps)


def counts_for(fractions: Tensor, n: int) -> Tensor:
    """Pixel counts ``round(fraction * n)`` for fractions in [0, 1]."""
    if fractions.dim() != 1 or fractions.numel() < 1:
        raise ValueError("fractions must be a non-empty 1-D sequence of values in [0, 1]")
    if (fractions < 0).any() or (fractions > 1).any():
        raise ValueError("fractions must lie in [0, 1]")
    return torch.round(fractions.to(torch.float64) * n).long()


def as_fractions(values, device: torch.device) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float64, device=device).flatten()


def step_fractions(step: float) -> Tensor:
    """The grid 0, step, 2 step, ..., 1 (the seed's ``np.arange(0, 1 + step, step)``, clipped to 1)."""
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step!r}")
    count = int(math.floor(1 / step + 1e-9)) + 1
    grid = torch.arange(count, dtype=torch.float64) * step
    if grid[-1] < 1 - 1e-9:
        grid = torch.cat([grid, torch.ones(1, dtype=torch.float64)])
    return grid.clamp(max=1.0)
