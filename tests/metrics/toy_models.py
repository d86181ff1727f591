"""Models whose metric values are known in closed form."""
from __future__ import annotations

import torch
from torch import nn


class RegionMean(nn.Module):
    """Two scores ``[f, -f]`` with ``f`` the mean of the input over a fixed pixel region (all channels)."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.to(torch.float32).view(1, 1, *region.shape[-2:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (x * self.region).sum(dim=(1, 2, 3)) / (self.region.sum() * x.shape[1])
        return torch.stack([f, -f], dim=1)


class PixelLinear(nn.Module):
    """Two scores ``[f, -f]`` with ``f = sum(w * x)``: each pixel's contribution ``sum_c w_c x_c`` is exact."""

    def __init__(self, shape=(3, 8, 8), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(1, *shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = (self.weight * x).sum(dim=(1, 2, 3))
        return torch.stack([f, -f], dim=1)

    def contributions(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight * x).detach()


def block(height: int, width: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows, cols] = True
    return mask
