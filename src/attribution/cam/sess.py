"""SESS: a base CAM on patches of the image at several scales, fused back into one map."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import filters
from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import min_max_scale, safe_divide
from .grad_cam import GradCAM
from .meta import MetaCAM

POOLS = ("mean", "max")
#: the fused map's smoothing: OpenCV's ``GaussianBlur(map, (11, 11), 5)`` as pytorch-grad-cam applies it
BLUR_SIZE, BLUR_SIGMA = 11, 5.0
#: windows handed to the base method in one call (it batches them further by ``batch_size``)
ROWS_PER_BASE_CALL = 256


def window_starts(length: int, window: int, step: int) -> List[int]:
    """Leading edges of windows of ``window`` pixels every ``step`` pixels along ``length``; the last window is
    moved back to end at the far edge, so that every window lies inside and all are the same size."""
    last = max(length - window, 0)
    return list(range(0, last, step)) + [last]


def scaled_size(height: int, width: int, short: int) -> Tuple[int, int]:
    """The size with the shorter side resized to ``short`` and the aspect ratio kept (torchvision's rule)."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def resize_matrix(length: int, size: int, dtype: torch.dtype, device: torch.device,
                  antialias: bool = False) -> Tensor:
    """(size, length) matrix of 1-D bilinear resizing (``align_corners=False``, as ``F.interpolate``), so that
    resizing a map ``M`` is ``R_h M R_w^T``.  Built by resizing the identity along one axis of a 2-D call (the
    other axis kept at 2 pixels: ``F.interpolate`` antialiases only in 2-D and mishandles 1-pixel axes there)."""
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    eye = torch.eye(length, dtype=work, device=device).view(length, 1, length, 1).expand(-1, -1, -1, 2)
    resized = F.interpolate(eye, size=(size, 2), mode="bilinear", align_corners=False, antialias=antialias)
    return resized[:, 0, :, 0].T.to(dtype)


def gaussian_blur(maps: Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W) maps with mirrored borders (OpenCV's default, BORDER_REFLECT_101)."""
    return filters.gaussian_blur(maps, size, sigma, padding="reflect")


class Scale:
    """One scale of the pyramid: the resized image's size and the windows' top-left corners (row-major)."""

    def __init__(self, height: int, width: int, short: int, window: int, step: int) -> None:
        self.image_size = (height, width)
        self.size = scaled_size(height, width, short)
        ys, xs = window_starts(self.size[0], window, step), window_starts(self.size[1], window, step)
        self.corners = [(y, x) for y in ys for x in xs]
        self.window = window

    def __len__(self) -> int:
        return len(self.corners)

    def _bands(self, which: Tensor, matrices: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
        """(n, w, .) rows of the (scaled height, .) and (scaled width, .) ``matrices`` that windows ``which`` cover."""
        corners = torch.tensor(self.corners, device=which.device)[which]  # (n, 2)
        steps = torch.arange(self.window, device=which.device)
        return matrices[0][corners[:, 0, None] + steps], matrices[1][corners[:, 1, None] + steps]

    def windows(self, x: Tensor, images: Tensor, which: Tensor) -> Tensor:
        """(n, C, w, w): window ``which[i]`` of image ``images[i]`` resized to this scale (bilinear,
        antialiased as torchvision's ``resize``), computed window by window without resizing the whole image."""
        matrices = [resize_matrix(n, s, x.dtype, x.device, antialias=True) for n, s in zip(self.image_size, self.size)]
        left, right = self._bands(which, matrices)  # (n, w, H), (n, w, W)
        return left.unsqueeze(1) @ x[images] @ right.unsqueeze(1).transpose(-1, -2)

    def paste(self, maps: Tensor, size: Sequence[int]) -> Tensor:
        """(B, n, w, w) window maps -> (B, n, H, W): each pasted into a zero map of this scale at its window and
        resized to ``size`` (bilinear), computed as ``R_h[:, rows] map R_w[:, cols]^T`` without the zeros."""
        matrices = [resize_matrix(s, n, maps.dtype, maps.device).T for s, n in zip(self.size, size)]
        left, right = self._bands(torch.arange(len(self), device=maps.device), matrices)  # (n, w, H), (n, w, W)
        return left.transpose(1, 2) @ maps @ right


class Pyramid:
    """The windows of every scale, numbered scale after scale."""

    def __init__(self, scales: List[Scale]) -> None:
        self.scales = scales
        self.offsets = [0]
        for scale in scales:
            self.offsets.append(self.offsets[-1] + len(scale))

    def __len__(self) -> int:
        return self.offsets[-1]

    def windows(self, x: Tensor, images: Tensor, which: Tensor) -> Tensor:
        """(n, C, w, w): window ``which[i]`` (a pyramid-wide number) of image ``images[i]``."""
        window = self.scales[0].window
        out = x.new_empty(images.shape[0], x.shape[1], window, window)
        for scale, first, last in zip(self.scales, self.offsets, self.offsets[1:]):
            here = (which >= first) & (which < last)
            if here.any():
                out[here] = scale.windows(x, images[here], which[here] - first)
        return out


@register("sess")
class SESS(MetaCAM):
    """SESS: the base CAM (Grad-CAM by default) of windows slid over the image at several scales, each weighted by
    its window's target probability and fused by a spatially weighted average.

    Tursun, Denman, Sridharan & Fookes, "SESS: Saliency Enhancing with Scaling and Sliding", ECCV 2022,
    arXiv:2207.01769.

    The image is resized so that its shorter side is each of ``scales`` (default ``num_scales=12`` sizes from the
    window size up in steps of ``round(scale_step_ratio * window)``, ratio 2/7: 224, 288, ..., 928 for a 224 image),
    and square windows of ``window_size`` (default the image's shorter side) are taken every ``step_size`` (default
    the window size; the last window of a row or column is moved back inside).  Each window's weight is its
    target score (the softmax probability with ``softmax_weights=True``, else the call's ``score``), clipped at 0
    and divided by the image's largest; windows below the ``pre_filter_ratio`` quantile of the weights are dropped.
    Each remaining window's ``base_method`` map (any CAM class or registry name; its options are SESS's) is
    min-max scaled to [0, 1], times the weight, pasted at the window, resized to the input, and the maps are fused
    per pixel by ``pool``: ``'mean'`` averages the values above ``theta`` (default 0) over the windows whose value
    there is above ``theta``, ``'max'`` takes the maximum.  ``smooth=True`` then blurs with a Gaussian (11x11,
    sigma 5).  Output in [0, 1] (the per-window scaling is part of the method), not rescaled afterwards.
    Cost: one forward per window and one base-method run per kept window (122 windows for a square image with the
    defaults), batched over windows and images.

    Same map as pytorch-grad-cam's ``SESS`` (whose defaults these are) except that its final min-max scaling per
    image is left out; the windows of all images run together instead of one image at a time.
    """

    base_default = GradCAM
    own_defaults = {"scales": None, "num_scales": 12, "scale_step_ratio": 2.0 / 7.0, "window_size": None,
                    "step_size": None, "pre_filter_ratio": 0.0, "theta": 0.0, "pool": "mean", "smooth": True,
                    "softmax_weights": True}
    same_rows = False
    argmax_on_rows = False  # the windows are not the image: None is resolved to the image's arg-max first

    def _explain(self, x: Tensor, target: Target, *, scales: Optional[Sequence[int]], num_scales: int,
                 scale_step_ratio: float, window_size: Optional[int], step_size: Optional[int],
                 pre_filter_ratio: float, theta: float, pool: str, smooth: bool, softmax_weights: bool,
                 batch_size: Optional[int], create_graph: bool, **options: Any) -> Tensor:
        height, width = x.shape[-2:]
        window = min(height, width) if window_size is None else _positive(window_size, "window_size")
        step = window if step_size is None else _positive(step_size, "step_size")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 <= pre_filter_ratio < 1.0:
            raise ValueError(f"pre_filter_ratio must be in [0, 1), got {pre_filter_ratio!r}")
        if not isinstance(smooth, bool) or not isinstance(softmax_weights, bool):
            raise TypeError("smooth and softmax_weights must be bools")
        pyramid = Pyramid([Scale(height, width, s, window, step)
                           for s in _scales(scales, num_scales, scale_step_ratio, window)])
        weight_target = target.with_score("softmax") if softmax_weights else target
        weights = self._window_weights(x, pyramid, weight_target, batch_size, create_graph)
        images, which = self._kept(weights, pre_filter_ratio).nonzero(as_tuple=True)

        dtype = accumulation_dtype(x)
        maps = []
        for start in range(0, images.shape[0], ROWS_PER_BASE_CALL):
            part = slice(start, start + ROWS_PER_BASE_CALL)
            rows = pyramid.windows(x, images[part], which[part])
            maps.append(self.base._explain(rows, target.select(images[part]), batch_size=batch_size,
                                           create_graph=create_graph, **options))
        maps = min_max_scale(torch.cat(maps).to(dtype))[:, 0] * weights[images, which, None, None]

        fused = self._fuse_windows(maps, images, which, pyramid, x.shape[0], (height, width), pool, theta)
        return gaussian_blur(fused) if smooth else fused

    @staticmethod
    def _fuse_windows(maps: Tensor, images: Tensor, which: Tensor, pyramid: Pyramid, batch: int,
                      size: Tuple[int, int], pool: str, theta: float) -> Tensor:
        """(B, 1, H, W): the (n, w, w) maps of windows ``which`` of ``images`` pasted back and pooled per pixel."""
        total = maps.new_zeros(batch, *size)
        count = torch.zeros_like(total)
        for scale, first, last in zip(pyramid.scales, pyramid.offsets, pyramid.offsets[1:]):
            here = (which >= first) & (which < last)
            if not here.any():
                continue
            index = (images[here], which[here] - first)
            dense = maps.new_zeros(batch, len(scale), *maps.shape[-2:]).index_put(index, maps[here])
            pasted = scale.paste(dense, size)  # (B, n, H, W), zero for the windows not run
            if pool == "max":
                total = torch.maximum(total, pasted.amax(dim=1))
                continue
            run = torch.zeros(batch, len(scale), dtype=torch.bool, device=maps.device).index_put(
                index, torch.ones_like(index[0], dtype=torch.bool))
            counted = (pasted > theta) & run[:, :, None, None]
            total = total + (pasted * counted).sum(dim=1)
            count = count + counted.sum(dim=1)
        return (total if pool == "max" else safe_divide(total, count)).unsqueeze(1)

    def _window_weights(self, x: Tensor, pyramid: Pyramid, target: Target, batch_size: Optional[int],
                        create_graph: bool) -> Tensor:
        """(B, n): every window's target score, clipped at 0 and divided by its image's largest (1 if none > 0)."""
        count = len(pyramid)
        scores = []
        for start, stop in RowPlanner(x.shape[0] * count, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            images, which = index // count, index % count
            with torch.set_grad_enabled(create_graph):
                outputs = self._forward(pyramid.windows(x, images, which))
                scores.append(target(outputs, images).to(accumulation_dtype(x)))
        scores = torch.cat(scores).view(x.shape[0], count).clamp(min=0)
        best = scores.amax(dim=1, keepdim=True)
        return torch.where(best > 0, safe_divide(scores, best), torch.ones_like(scores))

    @staticmethod
    def _kept(weights: Tensor, ratio: float) -> Tensor:
        """(B, n) bool: the windows left after dropping the ``int(n * ratio)`` lowest-weighted of each image."""
        dropped = int(weights.shape[1] * ratio)
        rank = weights.detach().argsort(dim=1, stable=True).argsort(dim=1)
        return rank >= dropped


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _scales(scales: Optional[Sequence[int]], count: int, ratio: float, window: int) -> List[int]:
    """The shorter-side sizes: ``scales`` as given, or ``count`` sizes from ``window`` up in equal steps."""
    if scales is None:
        _positive(count, "num_scales")
        if not ratio > 0:
            raise ValueError(f"scale_step_ratio must be positive, got {ratio!r}")
        step = int(round(window * ratio))
        scales = [window + step * i for i in range(count)]
    scales = [_positive(s, "each scale") for s in scales]
    if not scales or min(scales) < window:
        raise ValueError(f"every scale must be at least the window size {window}; got {list(scales)}")
    return scales
