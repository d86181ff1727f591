"""SESS: a base CAM on patches of the image at several scales, fused back into one map."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


def resize_matrix(length: int, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, length) matrix of 1-D linear resizing (``align_corners=False``): bilinear resizing of a map ``M`` is
    ``R_h M R_w^T``."""
    identity = torch.eye(length, dtype=dtype, device=device).unsqueeze(0)
    return F.interpolate(identity, size=size, mode="linear", align_corners=False)[0].T


def gaussian_blur(maps: Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur of (N, 1, H, W) maps with mirrored borders (OpenCV's default, BORDER_REFLECT_101)."""
    half = size // 2
    offsets = torch.arange(size, dtype=maps.dtype, device=maps.device) - half
    kernel = torch.exp(-offsets.square() / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    mode = "reflect" if min(maps.shape[-2:]) > half else "replicate"
    padded = F.pad(maps, (half, half, half, half), mode=mode)
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, size)), kernel.view(1, 1, size, 1))


class Scale:
    """One scale of the pyramid: the resized image's size and the windows' top-left corners (row-major)."""

    def __init__(self, height: int, width: int, short: int, window: int, step: int) -> None:
        self.size = scaled_size(height, width, short)
        ys, xs = window_starts(self.size[0], window, step), window_starts(self.size[1], window, step)
        self.corners = [(y, x) for y in ys for x in xs]
        self.window = window

    def __len__(self) -> int:
        return len(self.corners)

    def patches(self, x: Tensor) -> Tensor:
        """(B, n, C, w, w): every window of every image resized to this scale (bilinear, antialiased)."""
        scaled = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        w = self.window
        return torch.stack([scaled[:, :, y:y + w, x:x + w] for y, x in self.corners], dim=1)

    def paste(self, maps: Tensor, size: Sequence[int]) -> Tensor:
        """(B, n, w, w) window maps -> (B, n, H, W): each pasted into a zero map of this scale at its window and
        resized to ``size`` (bilinear), computed as ``R_h[:, rows] map R_w[:, cols]^T`` without the zeros."""
        w = self.window
        rows = resize_matrix(self.size[0], size[0], maps.dtype, maps.device)
        cols = resize_matrix(self.size[1], size[1], maps.dtype, maps.device)
        left = torch.stack([rows[:, y:y + w] for y, _ in self.corners])  # (n, H, w)
        right = torch.stack([cols[:, x:x + w] for _, x in self.corners])  # (n, W, w)
        return left @ maps @ right.transpose(1, 2)


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
        pyramid = [Scale(height, width, s, window, step)
                   for s in _scales(scales, num_scales, scale_step_ratio, window)]
        weight_target = target.with_score("softmax") if softmax_weights else target
        weights = self._window_weights(x, pyramid, weight_target, batch_size, create_graph)
        kept = self._kept(weights, pre_filter_ratio)

        dtype = accumulation_dtype(x)
        total = torch.zeros(x.shape[0], height, width, dtype=dtype, device=x.device)
        count = torch.zeros_like(total)
        offset = 0
        for scale in pyramid:
            kept_here = kept[:, offset:offset + len(scale)]
            images, windows = kept_here.nonzero(as_tuple=True)
            if images.numel():
                patches = scale.patches(x)[images, windows]
                maps = self.base._explain(patches, target.select(images), batch_size=batch_size,
                                          create_graph=create_graph, **options)
                maps = min_max_scale(maps.to(dtype))[:, 0] * weights[images, offset + windows, None, None]
                dense = maps.new_zeros(x.shape[0], len(scale), window, window).index_put((images, windows), maps)
                pasted = scale.paste(dense, (height, width))
                if pool == "max":
                    total = torch.maximum(total, pasted.amax(dim=1))
                else:
                    counted = (pasted > theta) & kept_here[:, :, None, None]
                    total = total + (pasted * counted).sum(dim=1)
                    count = count + counted.sum(dim=1)
            offset += len(scale)
        fused = (total if pool == "max" else safe_divide(total, count)).unsqueeze(1)
        return gaussian_blur(fused) if smooth else fused

    def _window_weights(self, x: Tensor, pyramid: List[Scale], target: Target, batch_size: Optional[int],
                        create_graph: bool) -> Tensor:
        """(B, n): every window's target score, clipped at 0 and divided by its image's largest (1 if none > 0)."""
        per_scale = []
        for scale in pyramid:
            rows = scale.patches(x).flatten(0, 1)  # image-major: row r is window r % n of image r // n
            scores = []
            for start, stop in RowPlanner(rows.shape[0], batch_size, x.device):
                owners = torch.arange(start, stop, device=x.device) // len(scale)
                with torch.set_grad_enabled(create_graph):
                    scores.append(target(self._forward(rows[start:stop]), owners).to(accumulation_dtype(x)))
            per_scale.append(torch.cat(scores).view(x.shape[0], len(scale)))
        scores = torch.cat(per_scale, dim=1).clamp(min=0)
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
