"""Keep and remove masks: KPM, KNM, KAM, RAM as SHAP's benchmark defines them.

Lundberg et al., "From local explanations to global understanding with explainable AI for trees", Nature Machine
Intelligence 2020 (the benchmark of the ``shap`` package, ``shap/benchmark/metrics.py``).

For each fraction ``f`` of a grid, each image keeps (or loses) its ``k = round(f * N)`` top-ranked pixels and the
others (or those) are set to the masking value; the model is run on the masked image.  Definitions:

* **KPM**, keep positive (mask): rank by the attribution, keep the top ``min(k, #{A >= 0})``; measure the target's
  mean output (higher area is better).
* **KNM**, keep negative (mask): rank by ``-A``, keep the top ``min(k, #{A <= 0})``; the mean output should stay low
  (SHAP reports it negated: lower area is better here).
* **KAM**, keep absolute (mask): rank by ``|A|``, keep the top ``k``; SHAP measures ROC AUC over a test set; per
  image we measure accuracy (the target is still the arg-max), as the seed did (higher is better).
* **RAM**, remove absolute (mask): rank by ``|A|``, mask the top ``k``; accuracy (lower is better).

SHAP's defaults: 11 feature counts ``round(N (10^(i/10) - 1) / 9)``, ``i = 0..10`` (denser at small fractions), and
the training-set mean as the masking value, which for inputs normalised by their dataset mean is 0 (the default
``substrate='zeros'``).  Curves unpack as ``auc, x, y`` with ``x`` the nominal (maximum) fraction kept or removed.
Cost: one forward per grid point per image.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import (Curve, SubstrateSpec, as_fractions, check_maps, counts_for, gaussian_blur, make_substrate,
                     resolve_scorer, salience_ranks, score_rows, step_fractions, trapezoid)

Fractions = Optional[Union[Sequence[float], Tensor]]


def shap_fractions(count: int = 11) -> Tensor:
    """SHAP's benchmark grid of fractions: ``(10 ** linspace(0, 1, count) - 1) / 9`` (from 0 to 1)."""
    return (torch.logspace(0, 1, count, dtype=torch.float64) - 1) / 9


def _mask_curve(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec, *, sign: int, keep: bool,
                fractions: Fractions, substrate: SubstrateSpec, score: str, batch_size: Optional[int],
                seed: int) -> Curve:
    values = check_maps(images, maps)
    batch, _, height, width = images.shape
    n = height * width
    grid = as_fractions(shap_fractions() if fractions is None else fractions, images.device)
    counts = counts_for(grid, n)
    ranked = values.abs() if sign == 0 else sign * values
    cap = (ranked >= 0).sum(dim=1)  # SHAP: nmask = min(fcount, #(A >= 0))
    limits = torch.minimum(counts[None, :], cap[:, None])  # (B, S)
    ranks = salience_ranks(ranked, seed).view(batch, 1, height, width)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    other = make_substrate(images, substrate)

    def rows(owners: Tensor, k: Tensor) -> Tensor:
        top = ranks[owners] < limits[owners, k].view(-1, 1, 1, 1)
        original = top if keep else ~top
        return torch.where(original, images[owners], other[owners])

    y = score_rows(model, rows, batch, grid.numel(), scorer, batch_size, images.device, images.dtype)
    x = grid.to(y.dtype)
    return Curve(trapezoid(y, x), x, y)


def _metric(name: str, sign: int, keep: bool, default_score: str, doc: str):
    """One of the four public metrics: ``f(model, images, maps, target=None, *, fractions, substrate, score,
    batch_size, seed) -> Curve``."""

    def metric(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
               fractions: Fractions = None, substrate: SubstrateSpec = "zeros", score: str = default_score,
               batch_size: Optional[int] = None, seed: int = 0) -> Curve:
        return _mask_curve(model, images, maps, target, sign=sign, keep=keep, fractions=fractions,
                           substrate=substrate, score=score, batch_size=batch_size, seed=seed)

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = doc + "\n\n    See the module docstring for the protocol; returns a :class:`Curve` ``(auc, x, y)``."
    return metric


keep_positive_mask = _metric("keep_positive_mask", 1, True, "softmax",
                             "KPM: keep the most positively attributed pixels, mask the rest; higher area is better.")
keep_negative_mask = _metric("keep_negative_mask", -1, True, "softmax",
                             "KNM: keep the most negatively attributed pixels, mask the rest; lower area is better.")
keep_absolute_mask = _metric("keep_absolute_mask", 0, True, "accuracy",
                             "KAM: keep the pixels of largest ``|A|``, mask the rest; accuracy; higher area is better.")
remove_absolute_mask = _metric("remove_absolute_mask", 0, False, "accuracy",
                               "RAM: mask the pixels of largest ``|A|``, keep the rest; accuracy; lower area is better.")


# ------------------------------------------------------------------------------------------- the seed's names
_SEED = {"kpm": (1, True, "softmax"), "knm": (-1, True, "softmax"), "kam": (0, True, "accuracy"),
         "ram": (0, False, "accuracy")}


def _seed_metric(name: str, original_input: Tensor, attribution: Tensor, target_label, forward, step: float):
    """The seed's call ``f(original_input, attribution, target_label, forward, step)`` -> ``(auc, x, y)``.

    As in the seed: the grid ``0, step, ..., 1``, masked pixels taken from the image blurred by torchvision's
    ``GaussianBlur(51, 41)``, and ``(auc, x, y)`` as a float and NumPy arrays averaged over the batch.  ``forward``
    may be the model (the batch is then evaluated with the batched machinery) or the seed's
    ``forward(masked_input, target_label) -> (mean score, accuracy)``.  Pixels are selected by rank (SHAP), not by
    value thresholds as the seed did.
    """
    sign, keep, score = _SEED[name]
    grid = step_fractions(step)
    blurred = gaussian_blur(original_input, 51, 41.0, padding="reflect")
    if isinstance(forward, nn.Module):
        curve = _mask_curve(forward, original_input, attribution, target_label, sign=sign, keep=keep, fractions=grid,
                            substrate=blurred, score=score, batch_size=None, seed=0)
        y = curve.y.mean(dim=0)
    else:  # the seed's forward: one call per grid point on the whole batch
        values = check_maps(original_input, attribution)
        ranked = values.abs() if sign == 0 else sign * values
        cap = (ranked >= 0).sum(dim=1, keepdim=True)
        ranks = salience_ranks(ranked).view(original_input.shape[0], 1, *original_input.shape[-2:])
        points = []
        for count in counts_for(grid, values.shape[1]).tolist():
            top = ranks < torch.clamp(cap, max=count).view(-1, 1, 1, 1)
            masked = torch.where(top if keep else ~top, original_input, blurred)
            with torch.no_grad():
                result = forward(masked, target_label)
            points.append(float(result[0] if score == "softmax" else result[1]))
        y = torch.tensor(points, dtype=torch.float64)
    x = grid.to(y.dtype)
    return float(trapezoid(y, x.to(y.device))), x.cpu().numpy(), y.detach().cpu().numpy().astype(np.float64)


def kpm(original_input: Tensor, attribution: Tensor, target_label, forward, step: float = 0.05):
    """The seed's KPM call (see :func:`_seed_metric`); new code should call :func:`keep_positive_mask`."""
    return _seed_metric("kpm", original_input, attribution, target_label, forward, step)


def knm(original_input: Tensor, attribution: Tensor, target_label, forward, step: float = 0.05):
    """The seed's KNM call; new code should call :func:`keep_negative_mask`."""
    return _seed_metric("knm", original_input, attribution, target_label, forward, step)


def kam(original_input: Tensor, attribution: Tensor, target_label, forward, step: float = 0.05):
    """The seed's KAM call; new code should call :func:`keep_absolute_mask`."""
    return _seed_metric("kam", original_input, attribution, target_label, forward, step)


def ram(original_input: Tensor, attribution: Tensor, target_label, forward, step: float = 0.05):
    """The seed's RAM call; new code should call :func:`remove_absolute_mask`."""
    return _seed_metric("ram", original_input, attribution, target_label, forward, step)
