"""ROAD: RemOve And Debias, with the noisy linear imputation, batched on the device.

Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022, arXiv:2202.00449.

Removed pixels are not set to a constant (whose shape leaks the mask to the model) but imputed from their
neighbours, with noise: :func:`attribution.metrics.imputation.noisy_linear_impute` (the paper's noisy linear
imputation, solved for the whole batch at once on the device).

MoRF removes the most relevant fraction ``f`` of pixels first, LeRF the least relevant; the score falls fast under
MoRF and slowly under LeRF for a good map.  pytorch-grad-cam's ``ROADCombined`` averages ``(LeRF - MoRF) / 2`` over
removal fractions 10 %, 20 %, ..., 90 % (its ``percentiles``), which is ``combined`` here (higher is better).
Pixels are selected by rank (exactly ``round(f * H * W)``), not by a percentile threshold.  Cost: ``2 * len(fractions)``
forwards per image plus the imputations.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import as_fractions, check_maps, counts_for, resolve_scorer, salience_ranks, score_rows
from .imputation import MAX_ITER, noisy_linear_impute

ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class RoadResult(NamedTuple):
    """``combined`` (B,): mean over fractions of ``(lerf - morf) / 2``; ``morf``, ``lerf`` (B, F): the scores after
    removing each fraction (most / least relevant first); ``fractions`` (F,)."""

    combined: Tensor
    morf: Tensor
    lerf: Tensor
    fractions: Tensor


def road(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
         fractions: Union[Sequence[float], Tensor] = ROAD_FRACTIONS, noise: float = 0.01, score: str = "softmax",
         batch_size: Optional[int] = None, seed: int = 0, tol: Optional[float] = None,
         max_iter: int = MAX_ITER) -> RoadResult:
    """ROAD with noisy linear imputation: MoRF and LeRF curves and their combination (see the module docstring).

    ``images`` (B, C, H, W) as the model takes them (imputation happens in that space, as in the reference);
    ``maps`` (B, C or 1, H, W); ``fractions`` the removal fractions (default 0.1, ..., 0.9); ``score`` the measured
    value (default softmax probability of the target; ``'accuracy'`` for the paper's accuracy curves).  The noise
    (standard deviation ``noise``) is one draw per step, shared by the images: ``(2 F, C, H, W)`` standard normals
    in float64 from a CPU generator seeded with ``seed`` (the F MoRF steps, then the F LeRF steps), so that an
    image's scores depend neither on the other images of the batch nor on ``batch_size`` nor on the device (the
    reference draws per image, from NumPy's global state).  ``tol`` and ``max_iter`` go to the solver of
    :func:`attribution.metrics.imputation.noisy_linear_impute`.  The imputations of a pass's rows run as one batch.
    """
    values = check_maps(images, maps)
    batch, channels, height, width = images.shape
    n = height * width
    grid = as_fractions(fractions, images.device)
    counts = counts_for(grid, n)
    steps = grid.numel()
    ranks = salience_ranks(values, seed).view(batch, 1, height, width)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    bank = _noise_bank(2 * steps, (channels, height, width), seed, images)

    def rows(owners: Tensor, k: Tensor) -> Tensor:
        lerf = k >= steps
        count = counts[k % steps].view(-1, 1, 1, 1)
        rank = ranks[owners]
        removed = torch.where(lerf.view(-1, 1, 1, 1), rank >= n - count, rank < count)
        imputed = noisy_linear_impute(images[owners], removed, 0.0, None, tol, max_iter)
        return torch.where(removed, imputed + noise * bank[k].to(imputed.dtype), imputed) if noise else imputed

    y = score_rows(model, rows, batch, 2 * steps, scorer, batch_size, images.device, images.dtype)
    morf, lerf = y[:, :steps], y[:, steps:]
    return RoadResult(((lerf - morf) / 2).mean(dim=1), morf, lerf, grid.to(y.dtype))


def _noise_bank(steps: int, shape: Sequence[int], seed: int, images: Tensor) -> Tensor:
    """ROAD's noise, one standard-normal draw of ``shape`` per step: (steps, *shape), drawn in float64 on the CPU
    from ``seed`` (the same on every device), kept on the images' device in the imputation's precision."""
    draw = torch.randn(steps, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return draw.to(device=images.device, dtype=torch.float64 if images.dtype == torch.float64 else torch.float32)
