"""WSOL metrics (Choe et al. 2020): hand-computed cases and parity with the reference's OpenCV pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.metrics import (box_iou, cam_to_boxes, cam_to_mask, connected_components, max_box_acc,
                                 max_box_acc_v2, pxap, wsol_thresholds)


def two_cases() -> tuple:
    """Image 0 (24 x 24): object A, GT (2, 2, 7, 7), score 1; object B, GT (14, 2, 19, 9), score 0.5 on (14..19,
    2..6); a bridge of score 0.3 joins them below threshold 0.30.  Image 1: one object, GT (2, 2, 17, 7), score 1 on
    columns 2..7 and 0.4 on columns 8..17, so thresholds from 0.40 keep only its left part."""
    maps = torch.zeros(2, 1, 24, 24)
    maps[0, 0, 2:8, 2:8] = 1.0
    maps[0, 0, 2:7, 14:20] = 0.5
    maps[0, 0, 4:6, 8:14] = 0.3
    maps[1, 0, 2:8, 2:8] = 1.0
    maps[1, 0, 2:8, 8:18] = 0.4
    boxes = [torch.tensor([[2, 2, 7, 7], [14, 2, 19, 9]]), torch.tensor([[2, 2, 17, 7]])]
    return maps, boxes


def test_box_iou_uses_inclusive_corners():
    a = torch.tensor([2, 2, 8, 8])
    assert box_iou(a, torch.tensor([2, 2, 7, 7])).item() == pytest.approx(36 / 49)
    assert box_iou(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0])).item() == 1.0
    assert box_iou(a, torch.tensor([9, 9, 12, 12])).item() == 0.0


def test_hand_computed_ious_and_best_threshold():
    """With the reference's boxes (x1 = min(x + w, W - 1)): image 0 below 0.30 is one merged box (2, 2, 20, 8),
    IoU 42/139 with B; from 0.30 the largest part is A's box (2, 2, 8, 8), IoU 36/49.  Image 1 below 0.40 is
    (2, 2, 18, 8), IoU 96/119; from 0.40 only (2, 2, 8, 8), IoU 42/103.  Both right at IoU 0.5 exactly on
    0.30..0.39, so MaxBoxAcc is 1 at the best threshold 0.30."""
    maps, boxes = two_cases()
    v1 = max_box_acc(maps, boxes)
    t = wsol_thresholds()
    at = lambda value: int(torch.isclose(t, torch.tensor(value, dtype=t.dtype)).nonzero())  # noqa: E731
    expected = {(0, 0.0): 42 / 139, (0, 0.29): 42 / 139, (0, 0.30): 36 / 49, (0, 0.99): 36 / 49,
                (1, 0.0): 96 / 119, (1, 0.39): 96 / 119, (1, 0.40): 42 / 103, (1, 0.99): 42 / 103}
    for (image, threshold), iou in expected.items():
        assert v1.iou[image, at(threshold)].item() == pytest.approx(iou), (image, threshold)
    assert v1.value.item() == 1.0
    assert v1.best_threshold.item() == pytest.approx(0.30)
    torch.testing.assert_close(v1.accuracy[0, at(0.30):at(0.39) + 1], torch.ones(10, dtype=torch.float64))
    assert v1.accuracy[0, at(0.29)].item() == 0.5 and v1.accuracy[0, at(0.40)].item() == 0.5
    # at IoU 0.75 only image 1 can be right (96/119 = 0.81), below 0.40: accuracy 1/2 from threshold 0
    strict = max_box_acc(maps, boxes, iou_threshold=0.75)
    assert strict.value.item() == 0.5 and strict.best_threshold.item() == 0.0


def test_v2_counts_every_contour():
    """Image 0 from 0.30 to 0.49 has two parts; V1 sees only A's (36/49 with A), V2 also B's box (14, 2, 20, 7),
    IoU 36/54 with B.  Against B's ground truth alone, V1 scores 0 there and V2 2/3."""
    maps, _ = two_cases()
    only_b = torch.tensor([[14, 2, 19, 9]])
    t = wsol_thresholds()
    v1 = max_box_acc(maps[:1], only_b)
    v2 = max_box_acc_v2(maps[:1], only_b)
    assert v1.iou[0, 30].item() == 0.0
    assert v2.iou[0, 30].item() == pytest.approx(36 / 54)
    assert v2.iou[0, 50].item() == 0.0  # B's part is gone from 0.50
    # the mean over IoU 0.3, 0.5, 0.7: right at 0.3 (merged box 42/139 = 0.302 too) and 0.5, never at 0.7
    torch.testing.assert_close(v2.per_iou, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    assert v2.value.item() == pytest.approx(2 / 3)
    assert t.numel() == 100


def test_holes_are_contours_too():
    """A ring: its hole's box (the hole grown by one pixel) is a candidate in V2, as findContours(RETR_TREE) lists it."""
    maps = torch.zeros(1, 1, 20, 20)
    maps[0, 0, 2:18, 2:18] = 1.0
    maps[0, 0, 6:14, 6:14] = 0.0
    hole_gt = torch.tensor([[5, 5, 14, 14]])  # the hole's border box; the reference box is (5, 5, 15, 15)
    v2 = max_box_acc_v2(maps, hole_gt)
    assert v2.iou[0, 50].item() == pytest.approx(100 / 121)


def test_mask_and_box_helpers():
    maps, _ = two_cases()
    mask = cam_to_mask(maps, 0.5)
    assert mask.shape == (2, 24, 24) and mask[0].sum() == 36 and mask[1].sum() == 36
    torch.testing.assert_close(cam_to_boxes(maps, 0.5), torch.tensor([[2, 2, 7, 7], [2, 2, 7, 7]]))
    torch.testing.assert_close(cam_to_boxes(maps[1:], 0.2), torch.tensor([[2, 2, 17, 7]]))
    torch.testing.assert_close(cam_to_boxes(maps, 0.5, reference_boxes=True), torch.tensor([[2, 2, 8, 8]] * 2))
    many = cam_to_boxes(maps[:1], 0.35, multi_contour=True)
    assert sorted(tuple(b) for b, v in zip(many.boxes[0].tolist(), many.valid[0].tolist()) if v) == [
        (2, 2, 7, 7), (14, 2, 19, 6)]
    assert cam_to_boxes(torch.zeros(1, 1, 8, 8), 0.5).tolist() == [[0, 0, 0, 0]]  # no foreground: the reference's box


def test_connected_components_agree_with_scipy():
    from scipy import ndimage

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 30, 33, generator=generator) < 0.45
    for connectivity, structure in ((8, np.ones((3, 3))), (4, None)):
        labels = connected_components(masks, connectivity)
        for i in range(4):
            reference, count = ndimage.label(masks[i].numpy(), structure=structure)
            ours = labels[i].numpy()
            fg = masks[i].numpy()
            assert len(set(zip(reference[fg], ours[fg]))) == count == len(np.unique(ours[fg]))
            assert (ours[~fg] == 0).all()


# --------------------------------------------------------------------------------- the reference, with OpenCV
def reference_best_ious(maps: np.ndarray, gt_boxes, thresholds, multi_contour: bool) -> np.ndarray:
    """Choe et al.'s box pipeline written out with OpenCV (test-only): best IoU per image and CAM threshold."""
    cv2 = pytest.importorskip("cv2")
    out = np.zeros((len(maps), len(thresholds)))
    for i, cam in enumerate(maps):
        height, width = cam.shape
        image = np.expand_dims((cam * 255).astype(np.uint8), 2)
        for j, t in enumerate(thresholds):
            _, binary = cv2.threshold(image, int(t * np.max(image)), 255, cv2.THRESH_BINARY)
            contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
            if len(contours) == 0:
                boxes = [[0, 0, 0, 0]]
            else:
                if not multi_contour:
                    contours = [max(contours, key=cv2.contourArea)]
                boxes = []
                for c in contours:
                    x, y, w, h = cv2.boundingRect(c)
                    boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
            ious = box_iou(torch.tensor(boxes)[:, None], torch.as_tensor(gt_boxes[i])[None])
            out[i, j] = ious.max().item()
    return out


def smooth_maps(count: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 1, 6, 6, generator=generator) ** 3
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def test_maxboxacc_v2_matches_the_opencv_reference():
    from attribution.metrics import normalize_scoremap

    maps = smooth_maps(6, 40, 0)
    generator = torch.Generator().manual_seed(1)
    corners = torch.randint(0, 20, (6, 2, 2), generator=generator)
    gt = torch.cat([corners, corners + torch.randint(5, 20, (6, 2, 2), generator=generator)], -1)  # (6, 2, 4)
    thresholds = wsol_thresholds()
    reference = reference_best_ious(normalize_scoremap(maps).numpy(), gt.numpy(), thresholds.numpy(), True)
    ours = max_box_acc_v2(maps, gt)
    np.testing.assert_allclose(ours.iou.numpy(), reference, atol=1e-12)


def test_maxboxacc_matches_the_opencv_reference_on_single_blobs():
    """V1 picks the largest contour by cv2.contourArea, here the largest component by pixels: the same pick when one
    component dominates (a single Gaussian blob per map)."""
    from attribution.metrics import normalize_scoremap

    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    centres = torch.tensor([[10.0, 12.0], [25.0, 30.0], [20.0, 20.0]])
    maps = torch.stack([torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 60) for cx, cy in centres])[:, None]
    gt = torch.tensor([[5, 5, 16, 20], [20, 22, 33, 38], [10, 10, 30, 30]])
    thresholds = wsol_thresholds()
    reference = reference_best_ious(normalize_scoremap(maps).numpy(), gt[:, None].numpy(), thresholds.numpy(), False)
    np.testing.assert_allclose(max_box_acc(maps, gt).iou.numpy(), reference, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ PxAP
def test_pxap_hand_computed():
    """Scores 0, 0.25, 0.5, 1 with positives at 0.25 and 1: precision 1 at recall 1/2, 2/3 at recall 1: AP 5/6."""
    maps = torch.tensor([[0.0, 0.25], [0.5, 1.0]]).view(1, 1, 2, 2)
    assert pxap(maps, torch.tensor([[[False, True], [False, True]]])).value.item() == pytest.approx(5 / 6)
    assert pxap(maps, torch.tensor([[[False, False], [True, True]]])).value.item() == pytest.approx(1.0)
    ignore = torch.tensor([[[False, False], [True, False]]])  # drop the false positive at 0.5: AP 1
    assert pxap(maps, torch.tensor([[[False, True], [False, True]]]), ignore=ignore).value.item() == pytest.approx(1)


def test_pxap_matches_the_reference_histograms():
    """The reference's MaskEvaluator, written out with numpy.histogram over the whole batch (test-only)."""
    from attribution.metrics import normalize_scoremap

    maps = smooth_maps(5, 32, 2)
    generator = torch.Generator().manual_seed(3)
    masks = F.interpolate(torch.rand(5, 1, 4, 4, generator=generator), size=(32, 32))[:, 0] > 0.6
    scores = normalize_scoremap(maps).numpy()
    edges = np.append(np.arange(0, 1, 0.01), [1.0, 2.0, 3.0])
    true_hist = sum(np.histogram(scores[i][masks[i].numpy()], bins=edges)[0] for i in range(5)).astype(float)
    false_hist = sum(np.histogram(scores[i][~masks[i].numpy()], bins=edges)[0] for i in range(5)).astype(float)
    tp, fp = true_hist[::-1].cumsum(), false_hist[::-1].cumsum()
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / true_hist.sum()
    expected = (precision[1:] * np.diff(recall))[nonzero[1:]].sum()
    result = pxap(maps, masks)
    assert result.value.item() == pytest.approx(expected, abs=1e-12)
    assert result.per_image.shape == (5,) and torch.isfinite(result.per_image).all()
