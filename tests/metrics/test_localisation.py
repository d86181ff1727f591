"""Pointing game, energy-based pointing game, attribution localisation: hand-computed cases."""
from __future__ import annotations

import pytest
import torch

from attribution.metrics import attribution_localisation, boxes_to_mask, energy_pointing_game, pointing_game


def peak(height: int, width: int, x: int, y: int) -> torch.Tensor:
    m = torch.zeros(1, 1, height, width)
    m[0, 0, y, x] = 1.0
    return m


def test_pointing_game_tolerance_is_strict_and_euclidean():
    box = torch.tensor([[10, 10, 19, 19]])  # x0, y0, x1, y1 inclusive
    cases = [((15, 15), True), ((33, 15), True), ((34, 15), False),  # 14 px right of the box: hit; 15: miss
             ((29, 29), True), ((30, 30), False)]  # diagonal: 10^2 + 10^2 < 15^2 but 11^2 + 11^2 = 242 > 225
    for (x, y), expected in cases:
        result = pointing_game(peak(40, 40, x, y), box)
        assert bool(result.hit[0]) is expected, (x, y)
        assert result.point[0].tolist() == [x, y]
    assert not pointing_game(peak(40, 40, 20, 15), box, tolerance=1).hit[0]  # adjacent, distance 1: not < 1
    assert pointing_game(peak(40, 40, 20, 15), box, tolerance=2).hit[0]


def test_pointing_game_takes_boxes_lists_and_masks_alike():
    maps = torch.cat([peak(30, 30, 5, 5), peak(30, 30, 25, 25), peak(30, 30, 15, 2)])
    boxes = [[[0, 0, 9, 9]], [[0, 0, 3, 3], [20, 20, 29, 29]], torch.tensor([[10, 25, 20, 29]])]
    # multi-channel maps are summed over channels first
    from_list = pointing_game(maps.expand(3, 3, 30, 30) / 3, boxes, tolerance=1)  # only the maximum itself
    masks = boxes_to_mask(boxes, (30, 30), 3, torch.device("cpu"))
    from_masks = pointing_game(maps, masks, tolerance=1)
    assert from_list.hit.tolist() == from_masks.hit.tolist() == [True, True, False]
    assert masks[1].sum() == 16 + 100


def test_energy_and_attribution_localisation():
    m = torch.zeros(1, 1, 10, 10)
    m[0, 0, 0:2, 0:2] = 1.0   # 4 units inside the box
    m[0, 0, 8:10, 8:10] = 3.0  # 12 units outside
    m[0, 0, 5, 5] = -100.0     # negative relevance is left out
    box = torch.tensor([[0, 0, 4, 4]])  # 25 of 100 pixels
    assert energy_pointing_game(m, box).item() == pytest.approx(4 / 16)
    assert attribution_localisation(m, box).item() == pytest.approx(4 / 16)
    assert attribution_localisation(m, box, weighted=True).item() == pytest.approx(4 / 16 * 100 / 25)
    assert attribution_localisation(-m.clamp(min=0), box).item() == 0.0  # no positive mass


def test_localisation_on_the_composite(efficientnet, composite):
    """Cat on the left, espresso on the right: IG's maximum and most of its positive mass fall on the right half."""
    import attribution

    x = composite.expand(2, -1, -1, -1)
    maps = attribution.IntegratedGradients(efficientnet, steps=8)(x, [285, 967])
    halves = torch.tensor([[0, 0, 159, 159], [160, 0, 319, 159]])
    assert pointing_game(maps, halves).hit.all()
    assert (energy_pointing_game(maps, halves) > 0.55).all()


def test_pointing_game_tolerance_zero_means_inside_and_bad_tolerances_are_refused():
    """tolerance=0: a hit exactly when the maximum lies in the region (as tolerance=1 on the pixel grid); a
    negative, NaN, boolean or non-numeric tolerance gets an error naming it (it used to be squared)."""
    box = torch.tensor([[2, 2, 8, 8]])
    assert pointing_game(peak(20, 20, 5, 5), box, tolerance=0).hit[0]
    assert pointing_game(peak(20, 20, 8, 8), box, tolerance=0).hit[0]  # the box's corner (inclusive)
    assert not pointing_game(peak(20, 20, 9, 8), box, tolerance=0).hit[0]  # one pixel outside
    assert pointing_game(peak(20, 20, 5, 5), box, tolerance=0.5).hit[0]
    for bad in (-1, -30, float("nan"), True, "15", None):
        with pytest.raises(ValueError, match="tolerance"):
            pointing_game(peak(20, 20, 5, 5), box, tolerance=bad)


def test_numeric_zero_one_masks_are_masks():
    """Float or uint8 masks of 0/1 (Quantus' s_batch) are taken as masks, as bool ones (they used to be read as
    boxes: 'boxes must have shape (2, 4)'); other values get an error that says masks hold 0/1."""
    from attribution.metrics import localisation_auc, pxap, relevance_rank_accuracy

    maps = torch.rand(2, 1, 10, 14, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 10, 14, dtype=torch.bool)
    mask[0, 2:6, 3:9] = True
    mask[1, 5:, 7:] = True
    for metric in (lambda r: pointing_game(maps, r, tolerance=2).hit, lambda r: attribution_localisation(maps, r),
                   lambda r: relevance_rank_accuracy(maps, r), lambda r: localisation_auc(maps, r),
                   lambda r: pxap(maps, r).value):
        expected = metric(mask)
        for numeric in (mask.float(), mask.to(torch.uint8), mask.double().unsqueeze(1)):
            torch.testing.assert_close(metric(numeric), expected)
    with pytest.raises(ValueError, match="0/1"):
        attribution_localisation(maps, mask.float() * 0.5)


def test_box_iou_names_a_bad_shape():
    from attribution.metrics import box_iou

    with pytest.raises(ValueError, match="4"):
        box_iou(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1, 1]))


def test_maps_without_a_batch_are_named():
    """(H, W) maps get an error naming the accepted shapes (it was 'not enough values to unpack')."""
    box = torch.tensor([[0, 0, 3, 3]])
    for metric in (attribution_localisation, pointing_game, energy_pointing_game):
        with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
            metric(torch.randn(10, 14), box)
