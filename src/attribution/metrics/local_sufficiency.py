"""Sufficiency of explanations: do the images whose maps look alike get the same prediction?

Dasgupta, Frost & Moshkovitz, "Framework for Evaluating Faithfulness of Local Explanations", ICML 2022,
arXiv:2202.00734.  An explanation is *sufficient* when every input it applies to gets the prediction it explains;
local sufficiency is ``P[f(x') = f(x) | e applies to x']``.  As in Quantus 0.6.0's ``Sufficiency``, an explanation
"applies" to the other images of the batch whose maps lie close to it: distance (standardised Euclidean by default)
at most ``threshold`` times the largest distance in the batch.  The sibling measure, consistency
(``P[f(x') = f(x) | e(x') = e(x)]``), is :func:`attribution.metrics.consistency`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .robustness import _forward, _result_dtype, check_model_and_maps, prepare_maps

Distance = Union[str, Callable[[Tensor], Tensor]]
DISTANCES = ("seuclidean", "euclidean", "cityblock")


def map_distances(flat: Tensor, distance: Distance = "seuclidean") -> Tensor:
    """Pairwise distances (B, B) of the rows of ``flat`` (B, N), float64: ``'seuclidean'`` (SciPy's standardised
    Euclidean, ``sqrt(sum_i (u_i - v_i)^2 / V_i)``, ``V_i`` the sample variance of feature ``i`` over the rows; a
    feature constant over the rows adds 0, where SciPy's 0/0 makes every distance NaN), ``'euclidean'``,
    ``'cityblock'``, or a callable ``f(flat) -> (B, B)``."""
    flat = flat.to(torch.float64)
    if callable(distance):
        values = distance(flat)
        if not isinstance(values, Tensor) or values.shape != (flat.shape[0], flat.shape[0]):
            raise ValueError(f"a distance callable must return a ({flat.shape[0]}, {flat.shape[0]}) tensor")
        return values.to(torch.float64)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES} or a callable, got {distance!r}")
    if distance == "seuclidean":
        variance = flat.var(dim=0, unbiased=True) if flat.shape[0] > 1 else torch.zeros_like(flat[0])
        scale = torch.where(variance > 0, variance.clamp(min=1e-300).rsqrt(), torch.zeros_like(variance))
        flat = flat * scale
    p = 1.0 if distance == "cityblock" else 2.0
    return torch.cdist(flat[None], flat[None], p=p, compute_mode="donot_use_mm_for_euclid_dist")[0]


def sufficiency(model: nn.Module, images: Tensor, maps: Tensor, *, threshold: float = 0.6,
                distance: Distance = "seuclidean", normalise: bool = True, absolute: bool = True,
                batch_size: Optional[int] = None) -> Tensor:
    """Local sufficiency of the maps (B,): among the *other* images of the call whose map lies within ``threshold``
    of this image's, the share the model gives this image's predicted class; higher is better.

    Dasgupta, Frost & Moshkovitz, ICML 2022, arXiv:2202.00734 (module docstring):

        S(x) = #{x' != x : d(x, x') <= t, f(x') = f(x)} / #{x' != x : d(x, x') <= t},

    ``d`` the :func:`map_distances` of the flattened maps divided by the largest distance in the call, ``f`` the
    model's arg-max.  Defaults as Quantus' ``Sufficiency``: ``threshold`` 0.6, standardised Euclidean distance,
    maps normalised by their largest magnitude and made absolute first.  Differences: each map is divided by its own
    maximum (Quantus: the batch's; a choice that moves the distances and hence the neighbours); an image with no
    neighbour gets NaN (the conditional probability is undefined; Quantus returns 0); a feature constant over the
    maps is left out of the standardised distance (with SciPy every distance becomes NaN, and Quantus then scores
    every image 0 -- maps that are zero at one common pixel suffice); all images of the call are compared (Quantus
    compares within each of its batches of ``batch_size`` = 64).  The value depends on the other images of the
    call by design.  Cost: one forward of the batch (``batch_size`` rows a pass) and a (B, B) distance matrix.
    """
    check_model_and_maps(model, images, maps)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    flat = prepare_maps(maps.to(images.device), normalise, absolute)
    d = map_distances(flat, distance)
    peak = d.abs().amax()
    d = torch.where(peak > 0, d / peak.clamp(min=1e-300), d)
    others = ~torch.eye(images.shape[0], dtype=torch.bool, device=images.device)
    near = (d <= threshold) & others
    predicted = _forward(model, images, batch_size).argmax(dim=1)
    agree = (near & (predicted[:, None] == predicted[None, :])).sum(dim=1).to(torch.float64)
    count = near.sum(dim=1).to(torch.float64)
    share = torch.where(count > 0, agree / count.clamp(min=1), torch.full_like(count, float("nan")))
    return share.to(_result_dtype(images))
