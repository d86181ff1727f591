"""What the segment-based methods (Kernel SHAP, LIME, Shapley value sampling) share: segment label maps, and the
target's score on copies of the images in which only some segments are kept.

``segments`` may be ``None`` (a ``grid`` x ``grid`` partition), one (H, W) label map for every image, a (B, H, W)
stack of label maps (one per image), or the name of a scikit-image superpixel algorithm run on each image:
``'quickshift'`` with ``lime_image``'s parameters (``kernel_size=4, max_dist=200, ratio=0.2``) or ``'slic'`` with
scikit-image's defaults (``n_segments=100, compactness=10``), on the image min-max scaled to [0, 1].  With one
label map per image the images are explained one at a time (their segment counts differ), the random draws
continuing from one image to the next.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer
from ..core.targets import Target
from ..gradients.base import accumulation_dtype


#: the superpixel algorithms ``segments`` may name
SEGMENTERS = ("quickshift", "slic")
SegmentSpec = Union[None, str, Tensor]


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
        raise ValueError(f"segments must be an integer label map of shape {tuple(size)} (shared by the batch), a "
                         f"(B, {size[0]}, {size[1]}) stack of them (one per image) or one of {SEGMENTERS}, got {shape}")
    return torch.unique(segments.reshape(size).to(device), return_inverse=True)[1]


def superpixels(x: Tensor, name: str) -> Tensor:
    """(B, H, W) label maps of scikit-image's ``name`` algorithm on each image (min-max scaled to [0, 1], channels
    last; quickshift's Lab conversion only for three channels), on the CPU, returned on ``x``'s device."""
    try:
        from skimage import segmentation
    except ImportError:  # pragma: no cover - scikit-image is in the test extra
        raise ImportError(f"segments={name!r} needs scikit-image (pip install scikit-image); or pass label maps") from None
    maps = []
    for image in x:
        im = image.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
        low, high = im.min(), im.max()
        im = (im - low) / (high - low) if high > low else im * 0
        if name == "quickshift":
            labels = segmentation.quickshift(im, kernel_size=4, max_dist=200, ratio=0.2, convert2lab=im.shape[2] == 3)
        else:
            labels = segmentation.slic(im, n_segments=100, compactness=10, start_label=0, channel_axis=-1)
        maps.append(torch.from_numpy(labels.astype("int64")))
    return torch.stack(maps).to(x.device)


def image_segments(x: Tensor, segments: SegmentSpec) -> Optional[Tensor]:
    """The (B, H, W) label maps when ``segments`` gives one per image (a stack or an algorithm's name), else None."""
    if isinstance(segments, str):
        if segments not in SEGMENTERS:
            raise ValueError(f"segments must be None, a label map, a stack of them or one of {SEGMENTERS}, "
                             f"got {segments!r}")
        return superpixels(x, segments)
    if isinstance(segments, Tensor) and segments.dim() == 3 and segments.shape[0] == x.shape[0] > 1:
        return segments
    return None


class SegmentExplainer(Explainer):
    """Base of the methods over image segments: resolves ``grid``/``segments`` to one (H, W) label map and hands it
    to :meth:`_explain_segments`; with one label map per image (a stack or a superpixel algorithm's name) it runs
    image by image, each with its own map and its own row of any (B, C, H, W) option (a baseline per image)."""

    kind = "perturbation"

    def _explain(self, x: Tensor, target: Target, *, grid: int, segments: SegmentSpec, **options: Any) -> Tensor:
        per_image = image_segments(x, segments)
        if per_image is None:
            return self._explain_segments(x, target, segment_labels(x, grid, segments), **options)
        batch = x.shape[0]

        def own(value: Any, i: int) -> Any:
            return value[i:i + 1] if isinstance(value, Tensor) and value.dim() == 4 and value.shape[0] == batch \
                else value

        return torch.cat([self._explain_segments(x[i:i + 1], target.select(torch.tensor([i], device=x.device)),
                                                 segment_labels(x[i:i + 1], grid, per_image[i]),
                                                 **{k: own(v, i) for k, v in options.items()})
                          for i in range(batch)])

    def _explain_segments(self, x: Tensor, target: Target, labels: Tensor, **options: Any) -> Tensor:
        """The (B, 1, H, W) map of ``x`` over the segments ``labels`` (H, W), 0..M-1."""
        raise NotImplementedError


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
