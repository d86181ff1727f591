"""XRAI: the region growth and the segmentation against the authors' code (PAIR ``saliency``), closed forms of the
map, and the whole method against PAIR's with the same model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attribution
from attribution.gradients.xrai import disk_offsets, felzenszwalb_segments, grow_regions, label_masks
from conftest import tiny_cnn

pair = pytest.importorskip("saliency.core")
skimage = pytest.importorskip("skimage")


def random_masks(seed: int, size: int = 24, radius: int = 2) -> torch.Tensor:
    """Overlapping candidate masks: the dilated segments of three coarse random label maps."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for cells in (3, 4, 6):
        coarse = torch.randint(0, cells * cells, (cells, cells), generator=g)
        labels = coarse.repeat_interleave(size // cells + 1, 0).repeat_interleave(size // cells + 1, 1)[:size, :size]
        labels = torch.unique(labels, return_inverse=True)[1]
        masks.append(label_masks(labels, radius))
    return torch.cat(masks)


def pair_map(attr: np.ndarray, masks: torch.Tensor, **parameters) -> np.ndarray:
    """PAIR's XRAI map for a given (H, W, C) attribution and candidate masks."""
    settings = pair.XRAIParameters(algorithm=parameters.pop("algorithm", "full"),
                                   area_threshold=parameters.pop("area_threshold", 1.0))
    settings.experimental_params["min_pixel_diff"] = parameters.pop("min_pixel_diff", 50)
    return pair.XRAI().GetMask(attr, None, base_attribution=attr, segments=list(masks.numpy()),
                               extra_parameters=settings)


@pytest.mark.parametrize("parameters", [{}, {"min_pixel_diff": 5}, {"area_threshold": 0.4, "min_pixel_diff": 3},
                                        {"algorithm": "fast", "min_pixel_diff": 5}, {"algorithm": "fast"}])
def test_region_growth_equals_the_authors_code(parameters):
    model = tiny_cnn()
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    attr = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    own = [random_masks(seed) for seed in range(3)]  # 33 to 38 masks: padded with all-False ones
    count = max(len(m) for m in own)
    masks = torch.stack([torch.cat([m, m.new_zeros(count - len(m), 24, 24)]) for m in own])
    ours = attribution.XRAI(model)(x, 0, base_attribution=attr, segments=masks, **parameters)
    for i in range(3):
        theirs = pair_map(attr[i].permute(1, 2, 0).numpy(), own[i], **dict(parameters))
        torch.testing.assert_close(ours[i, 0], torch.from_numpy(theirs).float(), rtol=1e-5, atol=1e-6)


def test_shared_segments_and_ties_pick_the_first_mask():
    """Duplicated masks add the same pixels at the same gain: the first is taken (as PAIR's dict order does) and
    its twin then adds nothing; the map does not depend on which twin is taken, the regions' order does not
    change either."""
    masks = random_masks(0)
    masks = torch.cat([masks, masks.flip(0)])
    attr = torch.randn(24 * 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    regions = grow_regions(masks.flatten(1), attr, min_pixel_diff=1)
    theirs = pair_map(attr.view(24, 24, 1).numpy(), masks, min_pixel_diff=1)
    means = torch.zeros(int(regions.max()) + 1, dtype=torch.float64).index_add_(0, regions, attr)
    means /= torch.bincount(regions).double().clamp(min=1)
    torch.testing.assert_close(means[regions].view(24, 24), torch.from_numpy(theirs))


def test_map_is_each_regions_mean_and_orders_a_planted_square():
    """Attribution 1 on a square, 0 elsewhere, candidate masks a grid of cells and the square: the square is the
    first region (gain 1) and the map is 1 there and 0 elsewhere; the map sums to the attribution's sum."""
    attr = torch.zeros(1, 1, 20, 20)
    attr[..., 5:12, 6:13] = 1.0
    grid = torch.arange(20) // 5
    cells = label_masks(grid[:, None] * 4 + grid[None, :], 0)
    square = (attr[0, 0] > 0)[None]
    masks = torch.cat([cells, square])
    x = torch.zeros(1, 3, 20, 20)
    out = attribution.XRAI(tiny_cnn())(x, 0, base_attribution=attr, segments=masks, min_pixel_diff=1)
    torch.testing.assert_close(out, attr)
    regions = grow_regions(masks.flatten(1), attr.flatten().double(), min_pixel_diff=1)
    assert bool((regions.view(20, 20)[square[0]] == 1).all())


def test_map_is_differentiable_in_the_base_attribution():
    """With the regions fixed, the map is linear in the attribution: d sum(w * map) / d a_p is the mean of w over
    p's region."""
    x = torch.zeros(1, 3, 24, 24)
    masks = random_masks(4)
    attr = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(6))
    out = attribution.XRAI(tiny_cnn())(x, 0, base_attribution=attr, segments=masks, min_pixel_diff=10)
    (grad,) = torch.autograd.grad((out * w).sum(), attr)
    regions = grow_regions(masks.flatten(1), attr.detach().flatten().double(), min_pixel_diff=10)
    mean_w = torch.zeros(int(regions.max()) + 1).index_add_(0, regions, w.flatten())
    mean_w /= torch.bincount(regions).float()
    torch.testing.assert_close(grad.flatten(), mean_w[regions])


def test_dilated_label_masks_equal_scikit_image_dilation():
    from skimage.morphology import dilation, disk

    labels = torch.randint(0, 5, (4, 5), generator=torch.Generator().manual_seed(0))
    labels = labels.repeat_interleave(6, 0).repeat_interleave(5, 1)
    ours = label_masks(labels, 5)
    theirs = np.stack([dilation((labels == l).numpy(), footprint=disk(5)) for l in range(5)])
    assert np.array_equal(ours.numpy(), theirs)
    assert len(disk_offsets(5)) == int(disk(5).sum())


def test_default_segments_equal_the_authors():
    from saliency.core.xrai import _get_segments_felzenszwalb

    image = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(0))
    image[:, 10:30, 20:45] += 1.0  # a bright block, so the segmentations have something to find
    ours = felzenszwalb_segments(image)
    theirs = np.stack(_get_segments_felzenszwalb(image.permute(1, 2, 0).numpy()))
    assert ours.shape[0] > 6
    assert np.array_equal(ours.numpy(), theirs)


def test_whole_method_equals_the_authors_with_the_same_model():
    """Integrated Gradients from the black and the white image, averaged, max over channels, the authors'
    segmentation and growth: PAIR's XRAI with a call_model_function on the same model."""
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    targets = [1, 3]

    def call(target):
        def call_model(batch, call_model_args=None, expected_keys=None):
            rows = torch.tensor(np.asarray(batch)).permute(0, 3, 1, 2).requires_grad_(True)
            (grads,) = torch.autograd.grad(model(rows)[:, target].sum(), rows)
            return {pair.base.INPUT_OUTPUT_GRADIENTS: grads.permute(0, 2, 3, 1).numpy()}
        return call_model

    settings = pair.XRAIParameters(steps=6)
    theirs = [pair.XRAI().GetMask(x[i].permute(1, 2, 0).numpy(), call(t), batch_size=4, extra_parameters=settings)
              for i, t in enumerate(targets)]
    ours = attribution.XRAI(model)(x, targets, steps=6, batch_size=5)
    torch.testing.assert_close(ours[:, 0], torch.from_numpy(np.stack(theirs)), rtol=1e-6, atol=1e-9)


def test_bad_options_name_what_is_wrong():
    model, x = tiny_cnn(), torch.randn(2, 3, 16, 16)
    xrai = attribution.XRAI(model, steps=2)
    with pytest.raises(ValueError, match="segments must be boolean masks"):
        xrai(x, 0, segments=torch.zeros(4, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="segments must be boolean masks"):
        xrai(x, 0, segments=torch.zeros(3, 4, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="base_attribution must be"):
        xrai(x, 0, base_attribution=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        xrai(x, 0, algorithm="greedy")
    with pytest.raises(ValueError, match="min_pixel_diff"):
        xrai(x, 0, min_pixel_diff=0)
    with pytest.raises(ValueError, match="area_threshold"):
        xrai(x, 0, area_threshold=1.5)
    with pytest.raises(ValueError, match="baselines must be"):
        xrai(x, 0, baselines="black")


def test_bad_options_fail_before_the_segmentation(monkeypatch):
    """Bad steps or baselines are named at once, not after the worker thread has segmented every image."""
    import attribution.gradients.xrai as xrai_module

    calls = []
    monkeypatch.setattr(xrai_module, "felzenszwalb_segments", lambda image: calls.append(1))
    xrai = attribution.XRAI(tiny_cnn())
    x = torch.randn(2, 3, 16, 16)
    for options, message in (({"steps": 0}, "steps must be"), ({"baselines": ["grey"]}, "baseline must be")):
        with pytest.raises(ValueError, match=message):
            xrai(x, 0, **options)
    assert calls == []


def test_label_maps_are_remembered_by_content_and_bounded(monkeypatch):
    import attribution.gradients.xrai as xrai_module

    monkeypatch.setattr(xrai_module, "LABEL_CACHE_SIZE", 3)  # a small bound, so that few images fill it
    image = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    first = xrai_module.felzenszwalb_labels(image)
    assert xrai_module.felzenszwalb_labels(image.clone()) is first  # the same content: not segmented again
    assert xrai_module.felzenszwalb_labels(image + 0.5) is not first  # min-max scaling aside, another key
    for seed in range(xrai_module.LABEL_CACHE_SIZE):
        xrai_module.felzenszwalb_labels(torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    assert len(xrai_module._label_cache) == xrai_module.LABEL_CACHE_SIZE
    assert xrai_module.felzenszwalb_labels(image) is not first  # evicted, segmented again, equal
    assert torch.equal(xrai_module.felzenszwalb_labels(image), first)
