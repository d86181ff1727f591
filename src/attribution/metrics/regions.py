"""Ground-truth regions: boxes and masks, and the conversions the localisation metrics share.

Boxes are ``(x0, y0, x1, y1)`` pixel coordinates with ``x1``, ``y1`` *inclusive* (the convention of Choe et al.'s
WSOL evaluation: a box covers ``(x1 - x0 + 1) * (y1 - y0 + 1)`` pixels).  A batch of regions is given as

* a bool tensor (B, H, W) or (B, 1, H, W): a mask per image (a numeric tensor of that shape holding 0/1, such as
  Quantus' ``s_batch``, is taken as one; a (B, H, 4) tensor is read as boxes);
* a numeric tensor (B, 4) (one box per image) or (B, G, 4) (G boxes per image; rows of ``-1`` are padding);
* a list of B box sets, each (G_i, 4) (a tensor, or nested lists).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

Regions = Union[Tensor, Sequence[Union[Tensor, Sequence[Sequence[int]]]]]


def pad_boxes(boxes: Regions, batch: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Boxes as a (B, G, 4) long tensor and a (B, G) validity mask (padding rows are invalid)."""
    if isinstance(boxes, Tensor):
        b = boxes.to(device=device)
        if b.dim() == 2:
            b = b.unsqueeze(1)
        if b.dim() != 3 or b.shape[-1] != 4 or b.shape[0] != batch:
            raise ValueError(f"boxes must have shape ({batch}, 4) or ({batch}, G, 4), got {tuple(boxes.shape)}")
        b = b.round().long() if b.is_floating_point() else b.long()
    else:
        if len(boxes) != batch:
            raise ValueError(f"got box sets for {len(boxes)} images, expected {batch}")
        sets: List[Tensor] = [torch.as_tensor(s, dtype=torch.float64).reshape(-1, 4).round().long() for s in boxes]
        most = max(1, max(s.shape[0] for s in sets))
        b = torch.full((batch, most, 4), -1, dtype=torch.long)
        for i, s in enumerate(sets):  # building the padded tensor from the user's Python lists
            b[i, : s.shape[0]] = s
        b = b.to(device)
    valid = (b >= 0).all(dim=-1) & (b[..., 2] >= b[..., 0]) & (b[..., 3] >= b[..., 1])
    return b, valid


def boxes_to_mask(boxes: Regions, size: Tuple[int, int], batch: int, device: torch.device) -> Tensor:
    """The union of each image's boxes as a (B, H, W) bool mask (inclusive corners)."""
    b, valid = pad_boxes(boxes, batch, device)
    height, width = size
    ys = torch.arange(height, device=device).view(1, 1, height, 1)
    xs = torch.arange(width, device=device).view(1, 1, 1, width)
    x0, y0, x1, y1 = (b[..., i].view(batch, -1, 1, 1) for i in range(4))
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1) & valid.view(batch, -1, 1, 1)
    return inside.any(dim=1)


def region_mask(regions: Regions, size: Tuple[int, int], batch: int, device: torch.device) -> Tensor:
    """Any accepted form of regions (module docstring) as a (B, H, W) bool mask."""
    if isinstance(regions, Tensor) and regions.dtype != torch.bool and _mask_shaped(regions, size, batch):
        if not ((regions == 0) | (regions == 1)).all():
            raise ValueError(f"a numeric region mask of shape {tuple(regions.shape)} must hold 0/1 values (or pass a "
                             f"bool mask; boxes are ({batch}, 4) or ({batch}, G, 4))")
        regions = regions != 0
    if isinstance(regions, Tensor) and regions.dtype == torch.bool:
        mask = regions.to(device)
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != (batch, *size):
            raise ValueError(f"a region mask must have shape ({batch}, {size[0]}, {size[1]}), got {tuple(regions.shape)}")
        return mask
    return boxes_to_mask(regions, size, batch, device)


def _mask_shaped(regions: Tensor, size: Tuple[int, int], batch: int) -> bool:
    """Whether a non-bool tensor has a mask's shape, (B, H, W) or (B, 1, H, W), and not a box tensor's (B, G, 4)."""
    shape = tuple(regions.shape)
    return shape == (batch, 1, *size) or (shape == (batch, *size) and size[1] != 4)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a`` (..., 4) and ``b`` (..., 4) (broadcast), inclusive corners, degenerate unions give 0."""
    for name, boxes in (("a", a), ("b", b)):
        if not isinstance(boxes, Tensor) or boxes.dim() < 1 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"{name} must hold boxes (..., 4) as (x0, y0, x1, y1), got {shape}")
    ix = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    iy = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = (ix * iy).to(torch.float64)
    area_a = ((a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)).to(torch.float64)
    area_b = ((b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)).to(torch.float64)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
