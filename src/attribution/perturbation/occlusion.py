"""Occlusion."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, finite_number
from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import make_baseline

Size = Union[int, Tuple[int, int], None]
Fill = Union[float, Tensor]


def pair_option(value: Size, name: str) -> Optional[Tuple[int, int]]:
    """``None``, or a size option as (rows, columns): a positive int (not a bool) for both or a pair of them; else
    a ValueError naming ``name``."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


def fill_images(x: Tensor, fill: Fill) -> Tensor:
    """(B, C, H, W): the values each image's occluded pixels take, as Captum's ``baselines``: a finite number
    everywhere, or a tensor broadcast to ``x`` (one fill image per image, one for all, a (C, 1, 1) colour...)."""
    if isinstance(fill, Tensor):
        try:
            return make_baseline(x, fill)
        except ValueError:
            raise ValueError(f"fill must be a finite number or a tensor that broadcasts to x's shape "
                             f"{tuple(x.shape)}, got a tensor of shape {tuple(fill.shape)}") from None
    return torch.full_like(x, finite_number(fill, "fill"))


def window_bands(height: int, width: int, window: Tuple[int, int], stride: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """The window positions as two boolean bands, (T, H) rows and (L, W) columns: window ``t * L + l`` covers
    ``rows[t] x cols[l]``, as Captum's Occlusion places them.

    Windows start every ``stride`` pixels until one reaches the far edge; the last one is cut at the edge, so
    every pixel is covered: ``ceil((H - h) / s) + 1`` positions down, likewise across.
    """
    (wh, ww), (sh, sw) = window, stride
    if wh > height or ww > width:
        raise ValueError(f"the window {window} is larger than the image ({height}, {width})")
    tops = torch.arange(0, -(-(height - wh) // sh) * sh + 1, sh)
    lefts = torch.arange(0, -(-(width - ww) // sw) * sw + 1, sw)
    rows, cols = torch.arange(height), torch.arange(width)
    return ((rows >= tops[:, None]) & (rows < tops[:, None] + wh),
            (cols >= lefts[:, None]) & (cols < lefts[:, None] + ww))


def window_masks(in_rows: Tensor, in_cols: Tensor, positions: Tensor) -> Tensor:
    """(n, H, W) boolean masks of the windows ``positions`` (row-major over the bands' T x L places)."""
    across = in_cols.shape[0]
    return in_rows[positions // across][:, :, None] & in_cols[positions % across][:, None, :]


def window_mean(values: Tensor, in_rows: Tensor, in_cols: Tensor) -> Tensor:
    """(B, H, W): each pixel's mean of ``values`` (B, T, L) over the windows covering it (0 where none does), as
    two products with the bands (no (T L, H, W) masks)."""
    rows_f, cols_f = in_rows.to(values.dtype), in_cols.to(values.dtype)
    summed = rows_f.T @ values @ cols_f
    count = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]
    return torch.where(count > 0, summed / count.clamp(min=1), torch.zeros_like(summed))


@register("occlusion")
class Occlusion(Explainer):
    """Occlusion: how much the target score drops when a window of the image is replaced by a fill value.

    Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, arXiv:1311.2901.

    For windows ``w`` (all channels, size ``window``, moved by ``stride``): ``A(p) = mean over windows w covering
    pixel p of [f_t(x) - f_t(x with w set to fill)]``, windows placed as Captum's Occlusion places them (the last one
    cut at the image edge).  ``fill`` as Captum's ``baselines``: a finite number (default 0, Captum's) or a tensor
    broadcast to the images (a (B, C, H, W) one gives each image its own fill).  Defaults scale with the image:
    window ``round(min(H, W) / 7)``, stride half of it (32 and 16 at 224x224: 169 windows, 170 forwards per image).  Occluded
    copies run ``batch_size`` at a time, without autograd unless ``create_graph=True`` (then the map is
    differentiable w.r.t. the model's parameters).  Returns
    (B, 1, H, W).  Cost: one forward per window position per image, plus one for the unoccluded image.
    """

    kind = "perturbation"
    argmax_on_rows = False
    defaults = {"window": None, "stride": None, "fill": 0.0}

    def _explain(self, x: Tensor, target: Target, *, window: Size, stride: Size, fill: Fill,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        batch, _, height, width = x.shape
        side = max(1, round(min(height, width) / 7))
        window_hw = pair_option(window, "window") or (side, side)
        stride_hw = pair_option(stride, "stride") or (max(1, window_hw[0] // 2), max(1, window_hw[1] // 2))
        in_rows, in_cols = (band.to(x.device) for band in window_bands(height, width, window_hw, stride_hw))
        filled = fill_images(x, fill)
        n = in_rows.shape[0] * in_cols.shape[0]
        owners = torch.arange(batch, device=x.device)
        with torch.set_grad_enabled(create_graph):
            clean = torch.cat([target(self._forward(x[a:b]), owners[a:b])
                               for a, b in RowPlanner(batch, batch_size, x.device)])
            drops = torch.empty(batch, n, dtype=clean.dtype, device=x.device)
            for start, stop in RowPlanner(batch * n, batch_size, x.device):
                index = torch.arange(start, stop, device=x.device)
                image, position = index // n, index % n
                occluded = torch.where(window_masks(in_rows, in_cols, position).unsqueeze(1), filled[image], x[image])
                drops[image, position] = clean[image] - target(self._forward(occluded), image)
            saliency = window_mean(drops.view(batch, in_rows.shape[0], in_cols.shape[0]), in_rows, in_cols)
        return saliency.unsqueeze(1)
