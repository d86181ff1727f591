"""Localisation against ground-truth regions: the pointing game, its energy-based variant, attribution localisation.

Maps are (B, C, H, W) or (B, 1, H, W) at the regions' resolution (the image's); the per-pixel map is the channel
sum (:func:`attribution.metrics.common.pixel_map`).  Regions are boxes or masks
(:mod:`attribution.metrics.regions`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..core.explainer import non_negative_number
from .common import check_finite, pixel_map
from .regions import Regions, region_mask

EPS = 1e-12


def _pixel_map(maps: Tensor) -> Tensor:
    """The per-pixel map (B, H, W) of finite ``maps`` (B, C, H, W), (B, 1, H, W) or (B, H, W); else a clear error."""
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor of shape (B, C, H, W), (B, 1, H, W) or (B, H, W), got {shape}")
    check_finite(maps)
    return pixel_map(maps)


class Pointing(NamedTuple):
    """``hit`` (B,) bool; ``point`` (B, 2) the maximum's ``(x, y)``.  The game's accuracy is ``hit.float().mean()``."""

    hit: Tensor
    point: Tensor


def pointing_game(maps: Tensor, regions: Regions, tolerance: float = 15) -> Pointing:
    """The pointing game: a hit when the map's maximum lies within ``tolerance`` pixels of the region.

    Zhang, Bargal, Lin, Brandt, Shen & Sclaroff, "Top-down Neural Attention by Excitation Backprop", ECCV 2016
    (IJCV 2018), arXiv:1608.00507.  As TorchRay's reference: a hit when some region pixel lies at Euclidean distance
    strictly below ``tolerance`` (15 px) from the maximum (the first maximum in row-major order on ties).  Accuracy
    is hits / (hits + misses); TorchRay averages it per class, which is left to the caller.  ``tolerance`` is a
    number >= 0; 0 (where the strict rule would never hit) asks for the maximum inside the region, as 1 does.
    """
    tolerance = non_negative_number(tolerance, "tolerance")
    m = _pixel_map(maps)
    batch, height, width = m.shape
    mask = region_mask(regions, (height, width), batch, m.device)
    flat = m.flatten(1).argmax(dim=1)
    py, px = flat // width, flat % width
    ys = torch.arange(height, device=m.device).view(1, height, 1)
    xs = torch.arange(width, device=m.device).view(1, 1, width)
    squared = (ys - py.view(-1, 1, 1)) ** 2 + (xs - px.view(-1, 1, 1)) ** 2
    near = (squared < tolerance ** 2) | (squared == 0)
    return Pointing((near & mask).flatten(1).any(dim=1), torch.stack([px, py], dim=1))


def attribution_localisation(maps: Tensor, regions: Regions, weighted: bool = False) -> Tensor:
    """The share of positive attribution inside the region, (B,).

    Kohlbrenner, Bauer, Nakajima, Binder, Samek & Lapuschkin, "Towards Best Practice in Explaining Neural Network
    Decisions with LRP", IJCNN 2020, arXiv:1910.09840: ``mu = R_in / R_tot`` over the positive part of the map;
    ``weighted=True`` gives ``mu_w = mu * S_tot / S_in`` (the ratio to what a uniform map would score).  A map with
    no positive mass scores 0.
    """
    m = _pixel_map(maps).clamp(min=0)
    batch, height, width = m.shape
    mask = region_mask(regions, (height, width), batch, m.device)
    inside = (m * mask).flatten(1).sum(dim=1)
    total = m.flatten(1).sum(dim=1)
    share = torch.where(total > EPS, inside / total.clamp(min=EPS), torch.zeros_like(total))
    if weighted:
        area = mask.flatten(1).sum(dim=1).to(share.dtype)
        share = torch.where(area > 0, share * (height * width) / area.clamp(min=1), torch.zeros_like(share))
    return share


def energy_pointing_game(maps: Tensor, regions: Regions) -> Tensor:
    """The energy-based pointing game, (B,): the map's energy inside the box over its total energy.

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu, "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020, arXiv:1910.01279.  The energy is the positive part of the
    map, so this equals the unweighted :func:`attribution_localisation` (it is also unchanged by the min-max normalisation
    Score-CAM applies to its maps whenever a map's minimum is 0, as for a ReLU'd CAM).
    """
    return attribution_localisation(maps, regions, weighted=False)
