"""HiPe: hierarchical perturbation."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, positive_int
from ..core.filters import gaussian_blur
from ..core.registry import register
from ..core.targets import Target

PERTURBATIONS = ("mean", "blur", "fade")
THRESHOLDS = ("mid-range", "mean")
#: the authors' ``blur``: an 11 x 11 Gaussian of sigma 5 (``scipy.ndimage.gaussian_filter`` of a centred delta),
#: zero padding
BLUR_SIZE, BLUR_SIGMA = 11, 5.0


def cell_schedule(height: int, width: int, max_depth: Optional[int]) -> List[int]:
    """Cells per side of the grid at each depth.

    The authors start from ``int(ceil(log2(min(H, W))) / 2)`` cells and double them before every depth while the
    doubled count is at most ``min(H, W) / 4`` (8, 16, 32 at 224 pixels).  ``max_depth`` runs that many depths of
    the same doubling instead (fewer or more), as long as a cell keeps at least one pixel.
    """
    side = min(height, width)
    cells = int(max(math.ceil(math.log2(side)), 1) / 2)
    if max_depth is None:
        schedule = []
        while cells >= 1 and cells * 2 <= side / 4:
            cells *= 2
            schedule.append(cells)
        if not schedule:
            raise ValueError(f"HiPe's schedule runs no depth on a {height}x{width} image (its smaller side must be 8 "
                             "or at least 16 pixels); pass max_depth to run depths on it")
        return schedule
    schedule = [cells * 2 ** depth for depth in range(1, max_depth + 1)]
    if cells < 1 or schedule[-1] > side:
        raise ValueError(f"max_depth={max_depth} asks for {schedule[-1]} cells a side, more than the "
                         f"{height}x{width} image's {side} pixels")
    return schedule


def nearest_cells(cells: int, size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """(size,) the grid cell of each pixel when a ``cells``-long grid is upsampled to ``size`` pixels with
    ``F.interpolate(mode='nearest')``, as the authors upsample their masks (computed by that very operation, in
    ``dtype``: the authors' masks are in the images' dtype, and on a CPU the nearest index of a float32 grid differs
    from a float64 one's at some pixels, e.g. pixel 41 of 2 cells on 82; float32 also where float64 does not exist,
    as on MPS)."""
    grid = torch.arange(cells, dtype=dtype, device=device).view(1, 1, cells)
    return F.interpolate(grid, size=size, mode="nearest").view(size).long()


def window_cells(cells: int, device: torch.device) -> Tensor:
    """(cells + 1, cells) bool: window ``w`` spans the cells ``max(0, w - 1)`` to ``min(w + 1, cells) - 1`` (two
    cells, one at the grid's edges), the authors' ``range(-1, num_cells)`` positions."""
    window = torch.arange(cells + 1, device=device)[:, None]
    cell = torch.arange(cells, device=device)[None, :]
    return (cell >= window - 1) & (cell <= window)


def window_pixels(cells: int, size: int, device: torch.device) -> Tensor:
    """(cells + 1, size) bool: the pixels the authors' 'mean' and 'blur' substrates replace for each window,
    ``[y1 * (size // cells), y2 * (size // cells))`` (short of the far edge when ``cells`` does not divide ``size``)."""
    step = size // cells
    window = torch.arange(cells + 1, device=device)[:, None]
    pixel = torch.arange(size, device=device)[None, :]
    return (pixel >= (window - 1).clamp(min=0) * step) & (pixel < (window + 1).clamp(max=cells) * step)


def selected_windows(saliency: Tensor, row_cell: Tensor, col_cell: Tensor, cells: int, threshold: str) -> Tensor:
    """(B, cells + 1, cells + 1) bool: windows whose largest saliency so far (B, H, W) reaches the image's
    threshold (the mid-range or the mean of its map).  Cell maxima come from one scatter, window maxima from a
    2 x 2 max-pool over the cells (every cell holds a pixel, as cells <= pixels)."""
    batch = saliency.shape[0]
    flat = saliency.flatten(1)
    index = (row_cell[:, None] * cells + col_cell[None, :]).flatten().expand(batch, -1)
    cell_max = flat.new_full((batch, cells * cells), float("-inf")).scatter_reduce(1, index, flat, "amax")
    window_max = F.max_pool2d(cell_max.view(batch, 1, cells, cells), 2, stride=1, padding=1)[:, 0]
    if threshold == "mean":
        bar = flat.mean(1)
    else:
        low, high = flat.amin(1), flat.amax(1)
        bar = low + (high - low) / 2
    return window_max >= bar[:, None, None]


def check_options(perturbation: str, threshold: str, max_depth: Optional[int]) -> None:
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if max_depth is not None:
        positive_int(max_depth, "max_depth")


@register("hipe")
class HiPe(Explainer):
    """HiPe (hierarchical perturbation): occlusion by overlapping windows, coarse to fine, refined only where the
    saliency found so far is high.

    Cooper, Arandjelović & Harrison, "Believe the HiPe: Hierarchical Perturbation for Fast, Robust, and
    Model-Agnostic Saliency Mapping", Pattern Recognition 2022, arXiv:2103.05108.

    At each depth an ``n`` x ``n`` grid of cells is laid over the image; every window of 2 x 2 cells at a stride of
    one cell (one cell wide at the grid's edges: ``(n + 1)^2`` windows) whose largest saliency so far reaches the
    image's threshold is perturbed, and ``S += ReLU(f_t(x) - f_t(x with the window perturbed)) * window``.  The
    first depth perturbs every window (the map is still zero); ``n`` doubles from depth to depth.  Defaults, from
    the newest ``HiPe.py`` of the authors' repository (jessicarumbelow/Hierarchical-Perturbation, commit 716bec3):
    threshold ``'mid-range'`` (``min S + (max S - min S) / 2``, or ``'mean'``), ``perturbation='mean'`` (each
    window replaced by its per-channel mean, the "local mean" their draft paper proposes and their benchmark script
    runs; ``'blur'``: the image blurred with their 11 x 11, sigma 5 Gaussian; ``'fade'``: set to 0), masks
    upsampled to the image by nearest interpolation, raw scores (logits).  Schedule: ``int(ceil(log2 min(H, W)) /
    2)`` cells, doubled before each depth while ``n <= min(H, W) / 4`` (224 pixels: n = 8, 16, 32, cells of 28, 14,
    7 pixels, the draft's "d = 8 ... while d < min(H, W) / 4"); ``max_depth`` runs that many depths of the doubling
    instead (the cap of the authors' later ``HiPe_all_classes.py``).  No normalisation (their newest code returns
    the raw sum).

    Batched: each depth's selected (image, window) pairs of all images run as rows, ``batch_size`` at a time,
    without autograd unless ``create_graph=True`` (then the map is differentiable w.r.t. the model's parameters;
    which windows are refined is a discrete choice, held fixed).  Each image's choices depend on its own map only.
    Returns (B, 1, H, W).  Cost: one forward per image plus one per selected window: ``(n_1 + 1)^2`` at the first
    depth, adaptive after it, at most ``1 + 81 + 289 + 1089`` forwards at 224 x 224.

    As the authors' code, the windows ``'mean'`` and ``'blur'`` replace span ``size // n`` pixels per cell from the
    top-left (short of the far edge when ``n`` does not divide the size) while the credited window and the ``'fade'``
    mask are the nearest-upsampled cells.  Deliberate differences: ``'blur'`` works here (the newest ``HiPe.py``
    calls ``b_list.add``, which fails; earlier versions append) and on any number of channels (theirs is
    3-channel only); their stop when a depth selects no window is not needed (a window holding the map's maximum
    always reaches either threshold; only a NaN map selects none, and then adds nothing); options ``interp_mode``
    (only 'nearest'), ``resize``, ``vis`` and ``return_info`` are not offered.
    """

    kind = "perturbation"
    argmax_on_rows = True
    defaults = {"perturbation": "mean", "threshold": "mid-range", "max_depth": None}

    def _explain(self, x: Tensor, target: Target, *, perturbation: str, threshold: str, max_depth: Optional[int],
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        check_options(perturbation, threshold, max_depth)
        batch, _, height, width = x.shape
        schedule = cell_schedule(height, width, max_depth)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows_per_pass = [batch_size]  # the size a CUDA probe finds at the first depth serves the later ones
        with torch.set_grad_enabled(create_graph):
            clean = self._clean_scores(x, target, batch_size).to(dtype)
            substrate = gaussian_blur(x, BLUR_SIZE, BLUR_SIGMA, padding="zeros", reflect_kernel=True) \
                if perturbation == "blur" else None
            saliency = torch.zeros(batch, height, width, dtype=dtype, device=x.device)
            for cells in schedule:
                saliency = saliency + self._depth(x, substrate, clean, saliency, cells, target, perturbation,
                                                  threshold, rows_per_pass)
        return saliency.unsqueeze(1)

    def _clean_scores(self, x: Tensor, target: Target, batch_size: Optional[int]) -> Tensor:
        """(B,) the target's score on each image; ``target=None`` takes each image's arg-max from this pass."""
        owners = torch.arange(x.shape[0], device=x.device)
        scores, classes = [], []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            outputs = self._forward(x[start:stop])
            scores.append(target(outputs, owners[start:stop]))
            classes.append(outputs.argmax(dim=1))
        if target.pending:
            target.classes = torch.cat(classes)
        return torch.cat(scores)

    def _depth(self, x: Tensor, substrate: Optional[Tensor], clean: Tensor, saliency: Tensor, cells: int,
               target: Target, perturbation: str, threshold: str, rows_per_pass: List[Optional[int]]) -> Tensor:
        """The saliency one depth of ``cells`` x ``cells`` cells adds: each selected window's score drop (ReLU) over
        the window's nearest-upsampled cells."""
        batch, _, height, width = x.shape
        windows = window_cells(cells, x.device)
        row_cell, col_cell = (nearest_cells(cells, side, x.device, saliency.dtype) for side in (height, width))
        credit = (windows[:, row_cell], windows[:, col_cell])  # (n + 1, H), (n + 1, W)
        chosen = selected_windows(saliency.detach(), row_cell, col_cell, cells, threshold)
        image, wy, wx = chosen.nonzero(as_tuple=True)
        bands = credit if perturbation == "fade" else (window_pixels(cells, height, x.device),
                                                       window_pixels(cells, width, x.device))
        fills = window_means(x, *bands) if perturbation == "mean" else substrate
        drops = self._drops(x, fills, clean, (image, wy, wx), bands, target, perturbation, rows_per_pass)
        grid = saliency.new_zeros(batch, cells + 1, cells + 1).index_put((image, wy, wx), drops)
        rows, cols = (band.to(saliency.dtype) for band in credit)
        return rows.T @ grid @ cols

    def _drops(self, x: Tensor, fills: Optional[Tensor], clean: Tensor, pairs: Tuple[Tensor, Tensor, Tensor],
               bands: Tuple[Tensor, Tensor], target: Target, perturbation: str,
               rows_per_pass: List[Optional[int]]) -> Tensor:
        """(R,) ``ReLU(f_t(x) - f_t(perturbed))`` of the selected (image, window row, window column) ``pairs``,
        ``batch_size`` rows per forward."""
        image, wy, wx = pairs
        drops = []
        planner = RowPlanner(image.shape[0], rows_per_pass[0], x.device)
        for start, stop in planner:
            i, r, c = image[start:stop], wy[start:stop], wx[start:stop]
            region = (bands[0][r][:, :, None] & bands[1][c][:, None, :]).unsqueeze(1)  # (r, 1, H, W)
            if perturbation == "fade":
                rows = x[i] * (~region).to(x.dtype)
            elif perturbation == "mean":
                rows = torch.where(region, fills[i, :, r, c][:, :, None, None], x[i])
            else:
                rows = torch.where(region, fills[i], x[i])
            drops.append(torch.relu(clean[i] - target(self._forward(rows), i).to(clean.dtype)))
        rows_per_pass[0] = rows_per_pass[0] or planner.size
        return torch.cat(drops) if drops else clean.new_zeros(0)


def window_means(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """(B, C, n + 1, n + 1) each channel's mean over each window's pixels (``rows`` (n + 1, H) x ``cols``
    (n + 1, W)), as two products with the bands."""
    rows_f, cols_f = rows.to(x.dtype), cols.to(x.dtype)
    sums = rows_f @ x @ cols_f.T
    return sums / (rows_f.sum(1)[:, None] * cols_f.sum(1)[None, :])
