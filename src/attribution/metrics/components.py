"""Connected components and their bounding boxes in pure torch (no OpenCV, no SciPy), batched on the device.

Labels propagate the largest pixel index through each component (max over the 8 or 4 neighbours) with pointer
jumping (a pixel adopts the label of the pixel its label names), which converges in a number of rounds that grows
with the logarithm of the component's size for compact shapes (linearly at worst, for long thin snakes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

_OFFSETS = {
    8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
    4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
}
CHECK_EVERY = 2


class ComponentBoxes(NamedTuple):
    """Per map: ``boxes`` (N, K, 4) inclusive ``(x0, y0, x1, y1)``, ``area`` (N, K) pixel counts, ``valid`` (N, K)
    (maps have up to K components; the rest are padding)."""

    boxes: Tensor
    area: Tensor
    valid: Tensor


def _neighbour_max(labels: Tensor, connectivity: int) -> Tensor:
    height, width = labels.shape[-2:]
    padded = F.pad(labels, (1, 1, 1, 1))
    out = labels
    for dy, dx in _OFFSETS[connectivity]:
        out = torch.maximum(out, padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width])
    return out


def connected_components(mask: Tensor, connectivity: int = 8) -> Tensor:
    """Label the connected components of a boolean ``mask`` (..., H, W).

    Returns a long tensor of the same shape: 0 on background, and on each component ``1 +`` the flat index (within
    its H x W map) of the component's last pixel in row-major order, so labels are unique within a map but not
    consecutive.  ``connectivity``: 8 (diagonal neighbours connect, OpenCV's rule for foreground) or 4.
    """
    if connectivity not in _OFFSETS:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    shape = mask.shape
    height, width = shape[-2:]
    mask = mask.reshape(-1, height, width).to(torch.bool)
    index = torch.arange(1, height * width + 1, device=mask.device).view(1, height, width)
    labels = torch.where(mask, index, torch.zeros((), dtype=torch.long, device=mask.device))
    rounds = 0
    while True:
        spread = torch.where(mask, _neighbour_max(labels, connectivity), labels).flatten(1)
        jumped = spread.gather(1, (spread - 1).clamp(min=0))  # the label of the pixel my label names
        updated = torch.where(spread > 0, torch.maximum(spread, jumped), spread).view_as(labels)
        rounds += 1
        if rounds % CHECK_EVERY == 0 and torch.equal(updated, labels):
            break
        labels = updated
    return labels.view(shape)


def component_boxes(labels: Tensor) -> ComponentBoxes:
    """Bounding boxes and pixel counts of the components of labelled maps (N, H, W) from
    :func:`connected_components`."""
    count, height, width = labels.shape
    n = height * width
    flat = labels.reshape(count, n)
    fg = flat > 0
    slot = (flat - 1).clamp(min=0)
    xs = torch.arange(width, device=labels.device).repeat(height).expand(count, n)
    ys = torch.arange(height, device=labels.device).repeat_interleave(width).expand(count, n)
    big = torch.full((count, n), n, dtype=torch.long, device=labels.device)
    small = torch.full((count, n), -1, dtype=torch.long, device=labels.device)
    x0 = big.scatter_reduce(1, slot, torch.where(fg, xs, big), "amin")
    y0 = big.scatter_reduce(1, slot, torch.where(fg, ys, big), "amin")
    x1 = small.scatter_reduce(1, slot, torch.where(fg, xs, small), "amax")
    y1 = small.scatter_reduce(1, slot, torch.where(fg, ys, small), "amax")
    area = torch.zeros_like(flat).scatter_add(1, slot, fg.long())
    roots = area > 0
    most = max(1, int(roots.sum(dim=1).max()))
    pick = roots.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :most]
    boxes = torch.stack([t.gather(1, pick) for t in (x0, y0, x1, y1)], dim=-1)
    return ComponentBoxes(boxes, area.gather(1, pick), roots.gather(1, pick))


def hole_boxes(mask: Tensor) -> ComponentBoxes:
    """Boxes of the holes of a foreground ``mask`` (N, H, W): 4-connected background components that do not touch
    the image border, each box grown by one pixel on every side (the bounding rectangle of the hole's border in
    the foreground, which is what OpenCV's ``findContours(RETR_TREE)`` reports for a hole)."""
    background = ~mask.to(torch.bool)
    labels = connected_components(background, connectivity=4)
    border = torch.zeros_like(background)
    border[:, 0, :] = border[:, -1, :] = True
    border[:, :, 0] = border[:, :, -1] = True
    flat = labels.flatten(1)
    slot = (flat - 1).clamp(min=0)
    touches = torch.zeros_like(flat).scatter_reduce(1, slot, (border.flatten(1) & (flat > 0)).long(), "amax")
    inner = torch.where((touches.gather(1, slot) > 0) & (flat > 0), torch.zeros_like(flat), flat).view_as(labels)
    found = component_boxes(inner)
    grow = torch.tensor([-1, -1, 1, 1], device=mask.device)
    return ComponentBoxes(found.boxes + grow, found.area, found.valid)
