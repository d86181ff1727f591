"""Weakly supervised object localisation metrics: MaxBoxAcc, MaxBoxAccV2 and PxAP, plus CAM-to-mask and CAM-to-box.

Choe, Oh, Lee, Chun, Akata & Shim, "Evaluating Weakly Supervised Object Localization Methods Right", CVPR 2020,
arXiv:2001.07437; protocol as in their code (clovaai/wsolevaluation):

* each map is min-max normalised to [0, 1] (a constant map becomes 0), after bicubic resizing to the image size
  when ``size`` is given;
* a threshold ``t`` of the grid ``0, 0.01, ..., 0.99`` (``cam_curve_interval`` 0.01) keeps the pixels whose 8-bit
  value ``floor(255 s)`` exceeds ``floor(t * max floor(255 s))`` (``cv2.threshold(..., THRESH_BINARY)``);
* **MaxBoxAcc** (``IoU >= 0.5``): the box of the largest connected component is compared with every ground-truth
  box; the accuracy over images at each threshold is maximised over thresholds (one threshold for the dataset);
* **MaxBoxAccV2**: every component's box (and every hole's, as ``findContours(RETR_TREE)`` lists holes too) is a
  candidate, the best IoU over candidates and ground-truth boxes counts, and the result is averaged over
  ``IoU >= 0.3, 0.5, 0.7``;
* **PxAP**: the area under the pixel precision-recall curve over the same thresholds, from histograms of all
  pixels of all images (pixels marked ``ignore`` are left out), summed as ``sum precision[1:] * diff(recall)``.

Boxes are inclusive pixel coordinates (:mod:`attribution.metrics.regions`).  ``reference_boxes=True`` (default)
reproduces the reference's box from a component, ``x1 = min(x + w, W - 1)`` (one pixel past the component unless
that leaves the image), so that numbers match the paper's code; ``False`` uses the component's exact extent.  One
knowing difference: the reference picks the largest contour by ``cv2.contourArea`` (the area of the polygon
through the border pixels' centres); here the largest component by pixel count.  Accuracies and PxAP are
fractions in [0, 1] (the paper prints percentages).  Everything is batched over images and thresholds in torch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import pixel_map
from .components import ComponentBoxes, component_boxes, connected_components, hole_boxes
from .regions import Regions, box_iou, pad_boxes, region_mask

CAM_CURVE_INTERVAL = 0.01
V2_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
#: pixels labelled per chunk of (image, threshold) maps
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}


class BoxAccuracy(NamedTuple):
    """``value``: MaxBoxAcc (mean over ``iou_thresholds``); ``per_iou`` (D,): the maximum accuracy at each IoU
    threshold; ``best_threshold`` (D,): the CAM threshold reaching it (the first, on ties); ``accuracy`` (D, T): the
    accuracy at every CAM threshold; ``iou`` (B, T): each image's best IoU at every CAM threshold."""

    value: Tensor
    per_iou: Tensor
    best_threshold: Tensor
    accuracy: Tensor
    iou: Tensor


class PixelAP(NamedTuple):
    """``value``: PxAP over the whole batch; ``per_image`` (B,) (NaN for an image without foreground);
    ``precision``, ``recall`` (T + 2,): the dataset's curve, from the highest threshold down."""

    value: Tensor
    per_image: Tensor
    precision: Tensor
    recall: Tensor


def wsol_thresholds(interval: float = CAM_CURVE_INTERVAL, device: Optional[torch.device] = None) -> Tensor:
    """The CAM threshold grid ``0, interval, ..., < 1`` (``np.arange(0, 1, interval)``)."""
    return torch.arange(0, 1, interval, dtype=torch.float64, device=device)


def normalize_scoremap(maps: Tensor, size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Maps (B, C, H, W) / (B, 1, H, W) / (B, H, W) -> (B, H, W) min-max normalised per image, float32.

    Channels are summed; with ``size`` the map is first resized bicubically (as ``cv2.resize(INTER_CUBIC)``); a
    constant or non-finite map becomes zeros, as in the reference's ``normalize_scoremap``.
    """
    m = pixel_map(maps).to(torch.float32)
    if size is not None and tuple(size) != tuple(m.shape[-2:]):
        m = F.interpolate(m.unsqueeze(1), size=tuple(size), mode="bicubic", align_corners=False).squeeze(1)
    flat = m.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    ok = torch.isfinite(flat).all(dim=1, keepdim=True) & (high > low)
    out = torch.where(ok, (flat - low) / torch.where(ok, high - low, torch.ones_like(high)), torch.zeros_like(flat))
    return out.view_as(m)


def binarize(scoremaps: Tensor, thresholds: Union[float, Tensor]) -> Tensor:
    """Foreground of normalised ``scoremaps`` (B, H, W) at each threshold: (B, T, H, W) bool (or (B, H, W) for a
    float threshold), by the reference's 8-bit rule ``floor(255 s) > floor(t * max floor(255 s))``."""
    single = not isinstance(thresholds, Tensor)
    t = torch.as_tensor(thresholds, dtype=torch.float64, device=scoremaps.device).reshape(-1)
    quantised = torch.floor(scoremaps.to(torch.float32) * 255)
    top = quantised.flatten(1).amax(dim=1).to(torch.float64)
    cut = torch.floor(t.view(1, -1) * top.view(-1, 1))  # (B, T)
    fg = quantised.unsqueeze(1) > cut.to(quantised.dtype).view(*cut.shape, 1, 1)
    return fg[:, 0] if single else fg


def cam_to_mask(maps: Tensor, threshold: Union[float, Tensor] = 0.5, size: Optional[Tuple[int, int]] = None) -> Tensor:
    """Foreground masks of maps at ``threshold`` of each normalised map, by the WSOL protocol's rule."""
    return binarize(normalize_scoremap(maps, size), threshold)


def cam_to_boxes(maps: Tensor, threshold: Union[float, Tensor] = 0.5, multi_contour: bool = False,
                 size: Optional[Tuple[int, int]] = None, reference_boxes: bool = False
                 ) -> Union[Tensor, ComponentBoxes]:
    """Boxes from maps at ``threshold``: the largest component's box, (B, 4) (or (B, T, 4) for a tensor of
    thresholds), or with ``multi_contour=True`` every component's and hole's box as :class:`ComponentBoxes`
    (over B, or B * T maps).  A map with no foreground gives the box ``(0, 0, 0, 0)``, as in the reference."""
    fg = cam_to_mask(maps, threshold, size)
    shape = fg.shape[:-2]
    fg = fg.reshape(-1, *fg.shape[-2:])
    found = _candidate_boxes(fg, multi_contour, reference_boxes)
    if multi_contour:
        return found
    return found.boxes[:, 0].reshape(*shape, 4)


def _candidate_boxes(fg: Tensor, multi_contour: bool, reference_boxes: bool) -> ComponentBoxes:
    """Candidate boxes of foreground masks (N, H, W); one per map (the largest component) unless ``multi_contour``."""
    count, height, width = fg.shape
    found = component_boxes(connected_components(fg, 8))
    if multi_contour:
        holes = hole_boxes(fg)
        found = ComponentBoxes(torch.cat([found.boxes, holes.boxes], 1), torch.cat([found.area, holes.area], 1),
                               torch.cat([found.valid, holes.valid], 1))
    else:
        largest = found.area.argmax(dim=1, keepdim=True)
        found = ComponentBoxes(found.boxes.gather(1, largest.unsqueeze(-1).expand(-1, -1, 4)),
                               found.area.gather(1, largest), found.valid.gather(1, largest))
    boxes = found.boxes
    if reference_boxes:  # cv2.boundingRect gives (x, y, w, h); the reference takes x1 = min(x + w, W - 1)
        limit = torch.tensor([width - 1, height - 1], device=fg.device)
        boxes = torch.cat([boxes[..., :2], torch.minimum(boxes[..., 2:] + 1, limit)], dim=-1)
    empty = ~found.valid.any(dim=1)  # no contour: the reference returns the box [0, 0, 0, 0]
    boxes = torch.where(found.valid.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    valid = found.valid.clone()
    valid[:, 0] |= empty
    return ComponentBoxes(boxes, found.area, valid)


def _chunk(batch: int, pixels: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // max(1, batch * pixels))


def box_accuracy(maps: Tensor, boxes: Regions, iou_thresholds: Sequence[float] = (0.5,), multi_contour: bool = False,
                 thresholds: Optional[Tensor] = None, size: Optional[Tuple[int, int]] = None,
                 reference_boxes: bool = True) -> BoxAccuracy:
    """MaxBoxAcc over a batch (the general form; see :func:`max_box_acc` and :func:`max_box_acc_v2`)."""
    scoremaps = normalize_scoremap(maps, size)
    batch, height, width = scoremaps.shape
    device = scoremaps.device
    gt, gt_valid = pad_boxes(boxes, batch, device)
    grid = wsol_thresholds(device=device) if thresholds is None else torch.as_tensor(
        thresholds, dtype=torch.float64, device=device).reshape(-1)
    best = torch.empty(batch, grid.numel(), dtype=torch.float64, device=device)
    step = _chunk(batch, height * width, device)
    for start in range(0, grid.numel(), step):
        part = grid[start:start + step]
        fg = binarize(scoremaps, part).reshape(-1, height, width)
        found = _candidate_boxes(fg, multi_contour, reference_boxes)
        cand = found.boxes.view(batch, part.numel(), -1, 1, 4)
        iou = box_iou(cand, gt.view(batch, 1, 1, -1, 4))
        keep = found.valid.view(batch, part.numel(), -1, 1) & gt_valid.view(batch, 1, 1, -1)
        best[:, start:start + part.numel()] = torch.where(keep, iou, torch.zeros_like(iou)).flatten(2).amax(dim=2)
    deltas = torch.as_tensor(iou_thresholds, dtype=torch.float64, device=device).reshape(-1)
    accuracy = (best.unsqueeze(0) >= deltas.view(-1, 1, 1)).to(torch.float64).mean(dim=1)  # (D, T)
    per_iou, index = accuracy.max(dim=1)
    return BoxAccuracy(per_iou.mean(), per_iou, grid[index], accuracy, best)


def max_box_acc(maps: Tensor, boxes: Regions, iou_threshold: float = 0.5, **options) -> BoxAccuracy:
    """MaxBoxAcc (Choe et al. 2020): the largest component's box, ``IoU >= 0.5``, best CAM threshold."""
    return box_accuracy(maps, boxes, (iou_threshold,), multi_contour=False, **options)


def max_box_acc_v2(maps: Tensor, boxes: Regions, iou_thresholds: Sequence[float] = V2_IOU_THRESHOLDS, **options
                   ) -> BoxAccuracy:
    """MaxBoxAccV2 (Choe et al. 2020): all contours' boxes, mean over ``IoU >= 0.3, 0.5, 0.7``."""
    return box_accuracy(maps, boxes, iou_thresholds, multi_contour=True, **options)


def _average_precision(hist_true: Tensor, hist_false: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """AP from per-bin counts (..., bins) in ascending score order, as the reference's ``MaskEvaluator.compute``."""
    tp = hist_true.flip(-1).cumsum(-1)
    fp = hist_false.flip(-1).cumsum(-1)
    positives = hist_true.sum(-1, keepdim=True)
    predicted = tp + fp
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = tp / positives.clamp(min=1)
    area = (precision[..., 1:] * recall.diff(dim=-1) * (predicted[..., 1:] > 0)).sum(-1)
    area = torch.where(positives.squeeze(-1) > 0, area, torch.full_like(area, float("nan")))
    return area, precision, recall


def pxap(maps: Tensor, masks: Regions, ignore: Optional[Tensor] = None, thresholds: Optional[Tensor] = None,
         size: Optional[Tuple[int, int]] = None) -> PixelAP:
    """PxAP (Choe et al. 2020): pixel average precision of the normalised maps against ground-truth ``masks``.

    ``masks``: (B, H, W) bool (or boxes, turned into masks); ``ignore``: optional (B, H, W) bool of pixels left out
    (the reference's ignore regions).  Bins are ``[t_i, t_i+1)`` over the threshold grid, then ``[1, 2)``, ``[2, 3]``.
    """
    scoremaps = normalize_scoremap(maps, size)
    batch, height, width = scoremaps.shape
    device = scoremaps.device
    gt = region_mask(masks, (height, width), batch, device)
    grid = wsol_thresholds(device=device) if thresholds is None else torch.as_tensor(
        thresholds, dtype=torch.float64, device=device).reshape(-1)
    edges = torch.cat([grid, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, device=device)])
    bins = edges.numel() - 1
    index = (torch.bucketize(scoremaps.to(torch.float64), edges, right=True) - 1).clamp(0, bins - 1).flatten(1)
    counted = torch.ones_like(gt) if ignore is None else ~ignore.reshape(batch, height, width).to(device, torch.bool)
    weights_true = (gt & counted).flatten(1).to(torch.float64)
    weights_false = (~gt & counted).flatten(1).to(torch.float64)
    zeros = torch.zeros(batch, bins, dtype=torch.float64, device=device)
    hist_true = zeros.scatter_add(1, index, weights_true)
    hist_false = zeros.scatter_add(1, index, weights_false)
    per_image, _, _ = _average_precision(hist_true, hist_false)
    value, precision, recall = _average_precision(hist_true.sum(0), hist_false.sum(0))
    return PixelAP(value, per_image, precision, recall)
