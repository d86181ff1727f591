"""What the segment-based methods (Kernel SHAP, LIME) share: segment label maps, and the target's score on copies
of the images in which only some segments are kept."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer
from ..core.targets import Target
from ..gradients.base import accumulation_dtype


def grid_segments(height: int, width: int, grid: int, device: torch.device) -> Tensor:
    """(H, W) segment labels of a ``grid`` x ``grid`` partition into near-equal rectangles, row-major."""
    rows = torch.arange(height, device=device) * grid // height
    cols = torch.arange(width, device=device) * grid // width
    return rows[:, None] * grid + cols[None, :]


def checked_segments(segments: Tensor, size: Tuple[int, int], device: torch.device) -> Tensor:
    """User segment labels (H, W) of any integers, relabelled 0..M-1 in order of their values."""
    if not isinstance(segments, Tensor) or segments.is_floating_point() or segments.is_complex() \
            or tuple(segments.shape[-2:]) != tuple(size) or segments[..., 0, 0].numel() != 1:
        shape = tuple(segments.shape) if isinstance(segments, Tensor) else type(segments).__name__
        raise ValueError(f"segments must be an integer tensor of shape {tuple(size)} (one label per pixel, shared "
                         f"by the batch), got {shape}")
    return torch.unique(segments.reshape(size).to(device), return_inverse=True)[1]


def segment_labels(x: Tensor, grid: int, segments: Optional[Tensor]) -> Tensor:
    """The (H, W) labels 0..M-1 a call uses: ``segments`` if given, else a ``grid`` x ``grid`` partition."""
    if segments is not None:
        return checked_segments(segments, tuple(x.shape[-2:]), x.device)
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    return grid_segments(x.shape[-2], x.shape[-1], grid, x.device)


def segment_means(x: Tensor, labels: Tensor) -> Tensor:
    """(B, C, H, W): every pixel replaced by its segment's mean colour in its image (LIME's default hiding)."""
    count = int(labels.max()) + 1
    flat = labels.flatten()
    sums = torch.zeros(x.shape[:2] + (count,), dtype=x.dtype, device=x.device).index_add_(2, flat, x.flatten(2))
    sizes = torch.bincount(flat, minlength=count).to(x.dtype)
    return (sums / sizes)[:, :, flat].view_as(x)


def coalition_scores(explainer: Explainer, x: Tensor, target: Target, labels: Tensor, plan: Tensor, fill: Tensor,
                     batch_size: Optional[int]) -> Tensor:
    """(B, S): the target's score on each image with the segments of each coalition of ``plan`` (S, M) kept and the
    others taken from ``fill`` (B, C, H, W).  Rows are coalition-major, so a pass builds each of its masks once;
    autograd records them only when the caller has it enabled (``create_graph``)."""
    batch = x.shape[0]
    dtype = accumulation_dtype(x)
    scores = []
    for start, stop in RowPlanner(batch * plan.shape[0], batch_size, x.device):
        index = torch.arange(start, stop, device=x.device)
        image, row = index % batch, index // batch
        keep = plan[row][:, labels].unsqueeze(1)  # (n, 1, H, W)
        scores.append(target(explainer._forward(torch.where(keep, x[image], fill[image])), image).to(dtype))
    return torch.cat(scores).view(plan.shape[0], batch).T
