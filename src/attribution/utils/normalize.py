"""Normalising maps for display and comparison."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-12


def normalize_saliency(saliency_map: Tensor, return_device: Optional[Union[str, torch.device]] = None) -> Tensor:
    """Seed-compatible normalisation of (B, C, H, W) maps to (B, 1, H, W) in [0, 1].

    Channel maximum for C > 1, then ReLU, then per-image min-max scaling (a constant map becomes all zeros).
    Stays on the map's device unless ``return_device`` is given, and is differentiable.
    """
    if saliency_map.dim() != 4:
        raise ValueError(f"saliency_map must have shape (B, C, H, W), got {tuple(saliency_map.shape)}")
    if saliency_map.shape[1] > 1:
        saliency_map = saliency_map.amax(dim=1, keepdim=True)
    saliency_map = F.relu(saliency_map)
    flat = saliency_map.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - low
    flat = (flat - low) / span.clamp(min=EPS)
    out = flat.view_as(saliency_map)
    return out if return_device is None else out.to(return_device)


def minmax(maps: Tensor) -> Tensor:
    """Per-image min-max scaling of (B, ...) maps to [0, 1], keeping sign information out (no ReLU)."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    return ((flat - low) / (flat.amax(dim=1, keepdim=True) - low).clamp(min=EPS)).view_as(maps)


def magnitude(maps: Tensor, percentile: float = 99.0) -> Tensor:
    """Display scaling of signed (B, C, H, W) gradient maps, as PAIR ``saliency`` shows them: the absolute value
    summed over channels, divided by its per-image ``percentile``-th percentile and clipped to [0, 1]; (B, 1, H, W).
    """
    total = maps.abs().sum(dim=1, keepdim=True)
    flat = total.flatten(1).float()
    k = min(flat.shape[1], max(1, math.ceil(percentile / 100.0 * flat.shape[1])))
    top = flat.kthvalue(k, dim=1, keepdim=True).values
    return (flat / top.clamp(min=EPS)).clamp(max=1.0).view_as(total).to(total.dtype)
