"""HiPe: the authors' HiPe.py written out one image at a time, a closed form on a square-sum model, the adaptive
forward count, batch and batch_size independence, create_graph, defaults and bad options."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from attribution.perturbation.hipe import HiPe, cell_schedule, nearest_cells
from conftest import RowCounter, check_parameter_derivative, tiny_cnn

ndimage = pytest.importorskip("scipy.ndimage")


def authors_blur(images: torch.Tensor) -> torch.Tensor:
    """The authors' ``blur``: ``gkern(11, 5)`` (``scipy.ndimage.gaussian_filter`` of a centred 11 x 11 delta) per
    channel, ``conv2d`` with zero padding 5."""
    delta = torch.zeros(11, 11, dtype=torch.float64)
    delta[5, 5] = 1
    kernel = torch.from_numpy(ndimage.gaussian_filter(delta.numpy(), 5)).to(images.dtype)
    channels = images.shape[1]
    weight = torch.zeros(channels, channels, 11, 11, dtype=images.dtype)
    for c in range(channels):
        weight[c, c] = kernel
    return F.conv2d(images, weight, padding=5)


def hipe_written_out(model, image, cls, perturbation="mean", threshold_mode="mid-range", depths=None, chunk=32):
    """The newest ``HiPe.py`` of jessicarumbelow/Hierarchical-Perturbation for one image, its loops as they are
    (``depths`` stops after that many doublings instead of the ``num_cells * 2 <= dim / 4`` rule).  Returns the
    (1, H, W) map and the number of masked forwards."""
    inp = image[None]
    _, _, input_y_dim, input_x_dim = inp.shape
    dim = min(input_x_dim, input_y_dim)
    num_cells = int(max(math.ceil(math.log2(dim)), 1) / 2)
    saliency = torch.zeros((1, 1, input_y_dim, input_x_dim), dtype=inp.dtype)
    total_masks, depth = 0, 0
    with torch.no_grad():
        output = model(inp)[:, cls]
        pre_b_image = authors_blur(inp) if perturbation == "blur" else None
        while (num_cells * 2 <= dim / 4) if depths is None else depth < depths:
            masks_list, b_list = [], []
            num_cells *= 2
            depth += 1
            if threshold_mode == "mean":
                threshold = saliency.mean()
            else:
                threshold = saliency.min() + (saliency.max() - saliency.min()) / 2
            x_cell_dim, y_cell_dim = input_x_dim // num_cells, input_y_dim // num_cells
            for x in range(-1, num_cells):
                for y in range(-1, num_cells):
                    x1, y1 = max(0, x), max(0, y)
                    x2, y2 = min(x + 2, num_cells), min(y + 2, num_cells)
                    mask = torch.zeros((1, 1, num_cells, num_cells), dtype=inp.dtype)
                    mask[:, :, y1:y2, x1:x2] = 1.0
                    local = F.interpolate(mask, (input_y_dim, input_x_dim), mode="nearest") * saliency
                    local = local.max() if depth > 1 else 0
                    if local >= threshold:
                        masks_list.append((mask - 1).abs())
                        rows = slice(y1 * y_cell_dim, y2 * y_cell_dim)
                        cols = slice(x1 * x_cell_dim, x2 * x_cell_dim)
                        if perturbation == "blur":
                            b_image = inp.clone()
                            b_image[:, :, rows, cols] = pre_b_image[:, :, rows, cols]
                            b_list.append(b_image)
                        if perturbation == "mean":
                            b_image = inp.clone()
                            b_image[:, :, rows, cols] = b_image[:, :, rows, cols].mean((-1, -2), keepdim=True)
                            b_list.append(b_image)
            if not masks_list:
                break
            total_masks += len(masks_list)
            while masks_list:
                m_ix = min(len(masks_list), chunk)
                masks = F.interpolate(torch.cat(masks_list[:m_ix]), (input_y_dim, input_x_dim), mode="nearest")
                if perturbation == "fade":
                    perturbed = model(inp * masks)[:, cls]
                else:
                    perturbed = model(torch.cat(b_list[:m_ix]))[:, cls]
                    del b_list[:m_ix]
                del masks_list[:m_ix]
                sal = torch.relu(output - perturbed).reshape(-1, 1, 1, 1) * (masks - 1).abs()
                saliency += sal.sum((0, 1))
    return saliency[0], total_masks


@pytest.fixture(scope="module")
def model():
    return tiny_cnn().double()


@pytest.fixture(scope="module")
def images():
    """Three 48 x 56 images: two depths (6 and 12 cells), a width neither count divides (the 'mean' and 'blur'
    windows stop short of the far edge)."""
    return torch.randn(3, 3, 48, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def counting(model: nn.Module):
    """The rows of the model's forwards inside the block (``counter.rows``)."""
    counter = RowCounter(model)
    try:
        yield counter
    finally:
        counter.close()


def masked_forwards(counter: RowCounter, images: int) -> int:
    return sum(counter.rows) - images


@pytest.mark.parametrize("perturbation", ["mean", "blur", "fade"])
@pytest.mark.parametrize("threshold", ["mid-range", "mean"])
def test_equals_the_authors_code_one_image_at_a_time(model, images, perturbation, threshold):
    """Two images together, 7 rows per forward: each map and the number of masked forwards equal the authors'
    loops run on that image alone; the second depth perturbs only part of its 169 windows."""
    x, targets = images[:2], [1, 3]
    with counting(model) as counter:
        ours = HiPe(model)(x, targets, perturbation=perturbation, threshold=threshold, batch_size=7)
    totals = 0
    for i, cls in enumerate(targets):
        theirs, total = hipe_written_out(model, x[i], cls, perturbation, threshold)
        torch.testing.assert_close(ours[i], theirs, rtol=1e-10, atol=1e-12)
        totals += total
        assert 49 < total < 49 + 169
    assert masked_forwards(counter, 2) == totals


def test_three_depths_and_max_depth(model):
    """100 x 120 pixels: 6, 12 and 24 cells, and ``max_depth=1`` the first depth alone; at 32 x 40 pixels
    ``max_depth=3`` goes past the authors' 4 and 8 cells to 16, each as the authors' loops stopped (or continued)
    there.  (A cheap pooled MLP at the larger size: hundreds of forwards of the convolutional net take seconds.)"""
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * 25 * 30, 16), nn.Tanh(), nn.Linear(16, 5))
    pooled = pooled.double().eval()
    x = torch.randn(1, 3, 100, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert cell_schedule(100, 120, None) == [6, 12, 24]
    for depths in (None, 1):
        theirs, total = hipe_written_out(pooled, x[0], 2, depths=depths)
        torch.testing.assert_close(HiPe(pooled)(x, 2, max_depth=depths)[0], theirs, rtol=1e-10, atol=1e-12)
        assert (total < 49 + 169 + 625) if depths is None else total == 49
    small = x[..., :32, :40]
    theirs, _ = hipe_written_out(model, small[0], 2, depths=3)
    torch.testing.assert_close(HiPe(model)(small, 2, max_depth=3)[0], theirs, rtol=1e-10, atol=1e-12)


class SquareSum(nn.Module):
    """Class 0: the sum of channel 0 over the square ``rows`` x ``cols``; class 1: 0."""

    def __init__(self, rows: slice, cols: slice) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols

    def forward(self, x):
        score = x[:, 0, self.rows, self.cols].sum((1, 2))
        return torch.stack([score, torch.zeros_like(score)], 1)


def overlaps(cell: int, square: range) -> torch.Tensor:
    """For each cell index c of a grid, the number of windows ``w`` (spanning cells w - 1 and w) that cover both
    cell c and every cell of ``square``: ``|{c, c + 1} & {windows covering the square}|``."""
    covering = set(range(square.stop - 1, square.start + 2))  # windows holding all of the square's cells
    return torch.tensor([len({c, c + 1} & covering) for c in range(cell)], dtype=torch.float64)


def test_closed_form_on_a_square_sum_model():
    """32 x 32 ones, 'fade', the score the sum of a 4 x 4 square at rows 8-11, columns 12-15 (one cell of the
    8 x 8 grid, inside cell (1, 1) of the 4 x 4 grid).  A window's drop is the square's pixels it holds (16 or 0):
    depth 1 adds ``16 a(r) b(c)`` per 8-pixel cell (a, b: windows covering the cell and the square), depth 2
    ``16 a'(r) b'(c)`` per 4-pixel cell, and its selected windows are those touching a pixel of at least the
    mid-range 32 (a tie included: ``>=``)."""
    model = SquareSum(slice(8, 12), slice(12, 16))
    x = torch.ones(1, 3, 32, 32, dtype=torch.float64)
    with counting(model) as counter:
        ours = HiPe(model)(x, 0, perturbation="fade")[0, 0]
    coarse = 16 * torch.outer(overlaps(4, range(1, 2)), overlaps(4, range(1, 2)))
    fine = 16 * torch.outer(overlaps(8, range(2, 3)), overlaps(8, range(3, 4)))
    expected = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1) + fine.repeat_interleave(4, 0).repeat_interleave(
        4, 1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert ours.max() == 128 and (ours == 128).nonzero().unique(dim=0).tolist() == [
        [r, c] for r in range(8, 12) for c in range(12, 16)]  # the map's maximum is the square, all of it
    # depth 2: windows (spanning 4-pixel cells w - 1, w) touching an 8-pixel cell of value >= 32
    high = {(r, c) for r in range(4) for c in range(4) if coarse[r, c] >= 32}
    chosen = sum(1 for wy in range(9) for wx in range(9)
                 if any((fy // 2, fx // 2) in high for fy in (wy - 1, wy) if 0 <= fy < 8
                        for fx in (wx - 1, wx) if 0 <= fx < 8))
    assert masked_forwards(counter, 1) == 25 + chosen == 25 + 33  # the plus of 8-pixel cells >= 32: 21 + 21 - 9 windows


def test_forwards_adapt_to_the_image_and_stay_below_occlusion_at_the_finest_scale():
    """224 x 224: a flat model leaves the map at zero, so every window of every depth reaches the threshold:
    1 + 9^2 + 17^2 + 33^2 forwards, the most HiPe runs.  A model that reads one 14 x 14 square refines only
    around it: far fewer than occlusion's 32 x 32 cells of 7 pixels at the finest depth, and the map's maximum
    lies on the square."""
    flat = SquareSum(slice(0, 0), slice(0, 0))
    x = torch.ones(1, 3, 224, 224)
    with counting(flat) as counter:
        HiPe(flat)(x, 0, perturbation="fade", batch_size=512)
    assert sum(counter.rows) == 1 + 81 + 289 + 1089
    square = SquareSum(slice(100, 114), slice(60, 74))
    with counting(square) as counter:
        ours = HiPe(square)(x, 0, perturbation="fade", batch_size=512)[0, 0]
    forwards = sum(counter.rows)
    assert forwards < 81 + 32 * 32 // 4, forwards
    top = (ours == ours.max()).nonzero()
    assert (top[:, 0] >= 100).all() and (top[:, 0] < 114).all() and (top[:, 1] >= 60).all() and (top[:, 1] < 74).all()


def test_batch_and_batch_size_independence(model, images):
    """Each image's windows are chosen from its own map: three images together, in passes of any size, equal
    each image alone."""
    explainer = HiPe(model)
    alone = torch.cat([explainer(images[i:i + 1], t) for i, t in enumerate([0, 2, 4])])
    for batch_size in (1, 5, None):
        together = explainer(images, [0, 2, 4], batch_size=batch_size)
        torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_argmax_target_from_the_clean_pass(model, images):
    """``target=None`` explains each image's arg-max class, read from HiPe's own pass over the images (no extra
    forward)."""
    x = images[:2]
    classes = model(x).argmax(1)
    with counting(model) as by_none_rows:
        by_none = HiPe(model)(x, None)
    with counting(model) as by_list_rows:
        by_list = HiPe(model)(x, classes.tolist())
    torch.testing.assert_close(by_none, by_list)
    assert sum(by_none_rows.rows) == sum(by_list_rows.rows)


def test_create_graph_matches_finite_differences():
    """The map is a sum of ReLU score drops: with ``create_graph`` its derivative in the model's weights (the
    refined windows held fixed) equals central differences, and its values equal the plain call's (a tanh net:
    the ReLU net's own kinks, crossed by some of the many perturbed copies, would blur the differences)."""
    x = torch.randn(2, 3, 32, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = tiny_cnn(nn.Tanh).double()
    explainer = HiPe(model)
    torch.testing.assert_close(explainer(x, [1, 3], create_graph=True).detach(), explainer(x, [1, 3]))
    check_parameter_derivative(lambda graph: explainer(x, [1, 3], create_graph=graph), model, ["0.weight", "8.weight"],
                               rtol=1e-6)


def test_defaults_are_the_authors():
    """The newest HiPe.py's defaults: perturbation_type='mean', threshold_mode='mid-range', no depth cap, raw
    scores; 8, 16 and 32 cells at 224 pixels (the paper's d = 8 doubled while d < min(H, W) / 4)."""
    assert HiPe.defaults == {"perturbation": "mean", "threshold": "mid-range", "max_depth": None}
    assert attribution.create("hipe", tiny_cnn()).resolved_options()["score"] == "logit"
    assert cell_schedule(224, 224, None) == [8, 16, 32]
    assert cell_schedule(16, 16, None) == [4] and cell_schedule(32, 40, None) == [4, 8]
    assert cell_schedule(256, 300, None) == [8, 16, 32, 64]


@pytest.mark.parametrize("bad, message", [
    ({"perturbation": "noise"}, r"perturbation must be one of \('mean', 'blur', 'fade'\), got 'noise'"),
    ({"threshold": "median"}, r"threshold must be one of \('mid-range', 'mean'\), got 'median'"),
    ({"max_depth": 0}, "max_depth must be a positive int, got 0"),
    ({"max_depth": 2.5}, "max_depth must be a positive int, got 2.5"),
    ({"max_depth": True}, "max_depth must be a positive int, got True"),
    ({"max_depth": 4}, r"max_depth=4 asks for 32 cells a side, more than the 16x20 image's 16 pixels"),
])
def test_bad_options_are_named(bad, message):
    x = torch.randn(1, 3, 16, 20)
    with pytest.raises(ValueError, match=message):
        HiPe(tiny_cnn())(x, 0, **bad)


def test_images_too_small_for_the_schedule_are_named():
    """The default schedule runs on a smaller side of 8 or at least 16 (the authors' loop runs no depth on the
    others: 2-7 and 9-15); the message says so (it said "at least 8" once, wrong for 9-15)."""
    for height, width in ((7, 12), (12, 64), (64, 15)):
        with pytest.raises(ValueError, match=f"no depth on a {height}x{width} image \\(its smaller side must be 8 or "
                                             "at least 16 pixels\\); pass max_depth"):
            HiPe(tiny_cnn())(torch.randn(1, 3, height, width), 0)
    assert [cell_schedule(side, 64, None) for side in (8, 16, 17)] == [[2], [4], [4]]
    out = HiPe(tiny_cnn())(torch.randn(1, 3, 7, 12), 0, max_depth=1)  # 1 cell doubled: 2 x 2 cells
    assert out.shape == (1, 1, 7, 12) and torch.isfinite(out).all()


def test_nearest_cells_are_the_authors_upsampling_in_the_images_dtype_with_no_float64_for_float32():
    """The authors' masks are in the images' dtype: the cells of float32 images are those of a float32 grid (which
    on a CPU differ from a float64 grid's at some pixels, e.g. pixel 41 of 2 cells on 82: they were taken from a
    float64 grid once, which MPS does not have either), float64 images' those of a float64 grid."""
    from torch.overrides import TorchFunctionMode

    class Dtypes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.add(out.dtype)
            return out

    with Dtypes() as mode:
        HiPe(tiny_cnn())(torch.randn(1, 3, 32, 32), 0)
    assert torch.float64 not in mode.seen, mode.seen
    differ = 0
    for cells in (1, 2, 3, 7, 8, 16, 33):
        for size in range(cells, 200, 3):
            mask = torch.arange(cells * cells, dtype=torch.float32).view(1, 1, cells, cells)  # the authors' 2-D masks
            upsampled = F.interpolate(mask, (size, size + 5), mode="nearest")[0, 0].long()
            rows = nearest_cells(cells, size, torch.device("cpu"))
            columns = nearest_cells(cells, size + 5, torch.device("cpu"))
            assert torch.equal(rows[:, None] * cells + columns[None], upsampled), (cells, size)
            grid = torch.arange(cells, dtype=torch.float64).view(1, 1, cells)
            wide = F.interpolate(grid, size=size, mode="nearest").view(size).long()
            assert torch.equal(nearest_cells(cells, size, torch.device("cpu"), torch.float64), wide), (cells, size)
            differ += not torch.equal(rows, wide)
    assert differ > 0  # the dtype matters
    assert nearest_cells(2, 82, torch.device("cpu"))[41] == 0 and nearest_cells(2, 82, torch.device("cpu"),
                                                                                 torch.float64)[41] == 1
