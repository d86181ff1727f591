"""ROAD: RemOve And Debias, with the noisy linear imputation, batched on the device.

Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022, arXiv:2202.00449.

Removed pixels are not set to a constant (whose shape leaks the mask to the model) but imputed: each removed
pixel's value is the weighted mean of its 8 neighbours (weight 1/6 for the 4 edge neighbours, 1/12 for the 4
diagonal ones, neighbours outside the image left out and the weights not renormalised away: the pixel's own weight
is the sum of its in-image neighbours' weights), solved jointly for all removed pixels of a channel, plus Gaussian
noise of standard deviation ``noise`` (0.01).  The reference (the authors' code, also shipped by
pytorch-grad-cam as ``NoisyLinearImputer``) builds that sparse system per image and solves it with SciPy on the
CPU.  Here the same system ``(D - W) u = W x_known`` (a weighted graph Laplacian restricted to the removed pixels,
symmetric positive definite) is solved for every image and channel of a batch at once with Jacobi-preconditioned
conjugate gradients whose matrix-vector product is one depthwise 3 x 3 convolution, on the images' device.  It
stops when every system's residual is below ``tol`` times its right-hand side (the test suite checks it against
the exact SciPy solve to 1e-4).

MoRF removes the most relevant fraction ``f`` of pixels first, LeRF the least relevant; the score falls fast under
MoRF and slowly under LeRF for a good map.  pytorch-grad-cam's ``ROADCombined`` averages ``(LeRF - MoRF) / 2`` over
removal fractions 10 %, 20 %, ..., 90 % (its ``percentiles``), which is ``combined`` here (higher is better).
Pixels are selected by rank (exactly ``round(f * H * W)``), not by a percentile threshold.  Cost: ``2 * len(fractions)``
forwards per image plus the imputations.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import as_fractions, check_maps, counts_for, resolve_scorer, salience_ranks, score_rows

#: the ROAD paper's neighbour weights: 1/6 for edge neighbours, 1/12 for diagonal ones (the centre is unused)
NEIGHBOUR_WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHECK_EVERY = 8


class RoadResult(NamedTuple):
    """``combined`` (B,): mean over fractions of ``(lerf - morf) / 2``; ``morf``, ``lerf`` (B, F): the scores after
    removing each fraction (most / least relevant first); ``fractions`` (F,)."""

    combined: Tensor
    morf: Tensor
    lerf: Tensor
    fractions: Tensor


def noisy_linear_impute(images: Tensor, removed: Tensor, noise: float = 0.01, generator: Optional[torch.Generator] = None,
                        tol: float = 1e-6, max_iter: Optional[int] = None) -> Tensor:
    """Impute the ``removed`` pixels of ``images`` (B, C, H, W) by ROAD's noisy linear imputation.

    ``removed``: (B, 1, H, W) or (B, H, W) boolean, True where a pixel (all channels) is to be imputed.  Returns a
    new tensor; kept pixels are unchanged.  ``noise``: standard deviation of the Gaussian noise added to imputed
    pixels (0 for the plain linear imputation).  ``tol``: relative residual at which conjugate gradients stop;
    ``max_iter`` (default ``20 * max(H, W) + 100``) bounds the iterations.  Computes in float64 for float64 input,
    else float32.
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    removed = removed.reshape(batch, 1, height, width).to(device=images.device, dtype=torch.bool)
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(dtype)
    u = _linear_impute(x, removed, tol, max_iter)
    if noise:
        u = u + noise * torch.randn(u.shape, generator=generator, dtype=dtype, device=u.device)
    return torch.where(removed, u, x).to(images.dtype)


def _linear_impute(x: Tensor, removed: Tensor, tol: float, max_iter: Optional[int]) -> Tensor:
    """Solve ROAD's system for the removed pixels by Jacobi-preconditioned conjugate gradients, every image and
    channel at once; returns the solution on the full grid (values off the removed pixels are meaningless)."""
    batch, channels, height, width = x.shape
    hole = removed.to(x.dtype)
    kernel = torch.tensor(NEIGHBOUR_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 1, 3, 3)

    def neighbours(t: Tensor) -> Tensor:  # sum of the weighted in-image neighbours, per channel
        return F.conv2d(t.reshape(-1, 1, height, width), kernel, padding=1).view(t.shape)

    diag = neighbours(torch.ones(1, 1, height, width, dtype=x.dtype, device=x.device))  # D: in-image weight sum

    def apply(v: Tensor) -> Tensor:  # (D - W) v on the removed pixels (v is zero elsewhere)
        return hole * (diag * v - neighbours(v))

    b = hole * neighbours(x * (1 - hole))
    u = torch.zeros_like(x)
    r = b.clone()
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(dim=(2, 3), keepdim=True)
    limit = (tol * b.flatten(2).norm(dim=2)).view(batch, channels, 1, 1)
    tiny = torch.finfo(x.dtype).tiny
    iterations = max_iter if max_iter is not None else 20 * max(height, width) + 100
    for i in range(iterations):
        if i % CHECK_EVERY == 0 and bool((r.flatten(2).norm(dim=2).view_as(limit) <= limit).all()):
            break
        ap = apply(p)
        curvature = (p * ap).sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp(min=tiny), torch.zeros_like(rz))
        u = u + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_next = (r * z).sum(dim=(2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp(min=tiny), torch.zeros_like(rz))
        rz = rz_next
        p = z + beta * p
    return u


def road(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
         fractions: Union[Sequence[float], Tensor] = ROAD_FRACTIONS, noise: float = 0.01, score: str = "softmax",
         batch_size: Optional[int] = None, seed: int = 0, tol: float = 1e-6,
         max_iter: Optional[int] = None) -> RoadResult:
    """ROAD with noisy linear imputation: MoRF and LeRF curves and their combination (see the module docstring).

    ``images`` (B, C, H, W) as the model takes them (imputation happens in that space, as in the reference);
    ``maps`` (B, C or 1, H, W); ``fractions`` the removal fractions (default 0.1, ..., 0.9); ``score`` the measured
    value (default softmax probability of the target; ``'accuracy'`` for the paper's accuracy curves).  The noise is
    drawn from a generator seeded with ``seed`` on the images' device.
    """
    values = check_maps(images, maps)
    batch, _, height, width = images.shape
    n = height * width
    grid = as_fractions(fractions, images.device)
    counts = counts_for(grid, n)
    steps = grid.numel()
    ranks = salience_ranks(values, seed).view(batch, 1, height, width)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    generator = torch.Generator(device=images.device).manual_seed(seed)

    def rows(owners: Tensor, k: Tensor) -> Tensor:
        lerf = k >= steps
        count = counts[k % steps].view(-1, 1, 1, 1)
        rank = ranks[owners]
        removed = torch.where(lerf.view(-1, 1, 1, 1), rank >= n - count, rank < count)
        return noisy_linear_impute(images[owners], removed, noise, generator, tol, max_iter)

    y = score_rows(model, rows, batch, 2 * steps, scorer, batch_size, images.device, images.dtype)
    morf, lerf = y[:, :steps], y[:, steps:]
    return RoadResult(((lerf - morf) / 2).mean(dim=1), morf, lerf, grid.to(y.dtype))
