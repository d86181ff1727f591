"""Resizing coarse maps to the image exactly as a method's reference implementation does, as (out, in) matrices
applied along each axis: TensorFlow's bicubic resize (Xplique's Sobol and HSIC attributions) and scikit-image's
bilinear resize with reflected edges (SIDU's masks)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def keys_cubic_matrix(size_out: int, size_in: int, a: float = -0.5) -> Tensor:
    """(size_out, size_in) float64 weights of TensorFlow's bicubic resize along one axis
    (``tf.image.resize(..., method='bicubic')``): output pixel ``o`` reads the source position
    ``(o + 0.5) * size_in / size_out - 0.5`` through Keys' cubic kernel (``a = -0.5``) at its four nearest taps;
    taps outside the input get no weight and the others are renormalised to sum to 1.  (TensorFlow reads the kernel
    from a 1024-entry table; these are its exact values.)  Built on the CPU: a few hundred numbers."""
    position = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5
    taps = position.floor()[:, None] + torch.arange(-1, 3, dtype=torch.float64)  # (out, 4)
    t = (position[:, None] - taps).abs()
    weights = torch.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                          torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, torch.zeros_like(t)))
    weights = weights * ((taps >= 0) & (taps < size_in))
    weights = weights / weights.sum(dim=1, keepdim=True)
    index = taps.clamp(0, size_in - 1).long()
    return torch.zeros(size_out, size_in, dtype=torch.float64).scatter_add_(1, index, weights)


def bicubic_resize(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """Maps (..., h, w) resized to (..., H, W) with :func:`keys_cubic_matrix` along each axis (separable, as
    TensorFlow's resize), in the maps' dtype and on their device; differentiable.  It over- and undershoots a little
    next to steep steps, as any cubic resize."""
    rows = keys_cubic_matrix(size[0], maps.shape[-2]).to(device=maps.device, dtype=maps.dtype)
    cols = keys_cubic_matrix(size[1], maps.shape[-1]).to(device=maps.device, dtype=maps.dtype)
    return rows @ maps @ cols.T


def linear_reflect_matrix(size_out: int, size_in: int) -> Tensor:
    """(size_out, size_in) float64 weights of scikit-image's ``resize(..., order=1, mode='reflect',
    anti_aliasing=False)`` along one axis: output pixel ``o`` reads the source position
    ``(o + 0.5) * size_in / size_out - 0.5`` from its two nearest taps, linearly; taps outside the input are
    reflected about the edge pixels (NumPy's 'reflect', ``c b | a b c``), where torch's bilinear repeats the edge."""
    position = (torch.arange(size_out, dtype=torch.float64) + 0.5) * (size_in / size_out) - 0.5
    low = position.floor()
    taps = torch.stack([low, low + 1], dim=1).long()  # (out, 2)
    weights = torch.stack([1 - (position - low), position - low], dim=1)
    if size_in == 1:
        taps = torch.zeros_like(taps)
    else:
        period = 2 * (size_in - 1)
        taps = taps.remainder(period)
        taps = torch.where(taps >= size_in, period - taps, taps)
    return torch.zeros(size_out, size_in, dtype=torch.float64).scatter_add_(1, taps, weights)
