"""HSIC attribution: its estimator against the written-out trace, its designs, resizes and the whole method
against the algorithm written out plainly."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.core.resize import keys_cubic_matrix
from attribution.perturbation.hsic import HSICAttribution, binary_hsic, latin_hypercube
from conftest import CountingModel, tiny_cnn


def plain_hsic(x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(K H L H) / n with every matrix written out: K = 1 + (1/2 - (x_i - x_j)^2), H = I - 1 1^T / n,
    L = exp(-(y_i - y_j)^2 / (2 w^2)), w the median of y (Python's statistics.median)."""
    x, y = x.double(), y.double()
    n = len(x)
    k = 1 + (0.5 - (x[:, None] - x[None, :]) ** 2)
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    w = statistics.median(y.tolist())
    l = torch.exp(-(y[:, None] - y[None, :]) ** 2 / (2 * w ** 2))
    return float(torch.trace(k @ h @ l @ h) / n)


# ----------------------------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("binary", [True, False])
def test_estimator_equals_the_trace_written_out(binary):
    torch.manual_seed(0)
    n, d = 30, 6
    designs = latin_hypercube(n, d, torch.Generator().manual_seed(1))
    designs = designs.round() if binary else designs  # the closed form holds for any real design values
    scores = torch.randn(3, n, dtype=torch.float64) + 2.0
    out = binary_hsic(designs, scores)
    assert out.shape == (3, d)
    expected = torch.tensor([[plain_hsic(designs[:, c], scores[b]) for c in range(d)] for b in range(3)],
                            dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_estimator_is_large_for_the_variable_the_output_depends_on_and_near_zero_for_the_others():
    n = 200
    designs = latin_hypercube(n, 5, torch.Generator().manual_seed(0)).round()
    noise = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scores = (3.0 + designs[:, 2] + 0.1 * noise)[None]
    out = binary_hsic(designs, scores)[0]
    others = out[[0, 1, 3, 4]]
    assert (out >= 0).all()
    # y = 3 + x_2 (+ noise): two clusters 1 apart, so HSIC = n / 8 * MMD^2 (see below) is about
    # n / 4 * (1 - exp(-1 / (2 w^2))) (about 2.3 with the median w between the clusters), less the noise's share
    w = statistics.median(scores[0].tolist())
    assert 3 < w < 4
    assert out[2].item() == pytest.approx(n / 4 * (1 - math.exp(-1 / (2 * w * w))), rel=0.2)
    assert others.max() < 0.05 * out[2]
    # under independence the estimate does not grow with n, under dependence it grows like n
    bigger = latin_hypercube(4 * n, 5, torch.Generator().manual_seed(0)).round()
    noise4 = torch.randn(4 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out4 = binary_hsic(bigger, (3.0 + bigger[:, 2] + 0.1 * noise4)[None])[0]
    assert 3.5 < out4[2] / out[2] < 4.5
    assert out4[[0, 1, 3, 4]].max() < 0.02 * out4[2]


def test_estimator_invariances():
    """Scaling the scores (the median bandwidth scales with them), flipping a mask variable (x -> 1 - x: the
    kernel depends on differences), and permuting the samples jointly leave every estimate unchanged."""
    n = 40
    designs = latin_hypercube(n, 4, torch.Generator().manual_seed(2)).round()
    scores = torch.rand(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + designs[:, :2].T
    reference = binary_hsic(designs, scores)
    torch.testing.assert_close(binary_hsic(designs, -2.5 * scores), reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(binary_hsic(1 - designs, scores), reference, rtol=1e-12, atol=1e-14)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(binary_hsic(designs[order], scores[:, order]), reference, rtol=1e-12, atol=1e-14)
    # not invariant to a shift of the scores: the bandwidth is their median, not a spread
    assert not torch.allclose(binary_hsic(designs, scores + 5), reference)


def test_estimator_on_balanced_binary_designs_is_an_mmd_between_the_two_halves():
    """With x in {0, 1}, half of each: x~ = +-1/2, so HSIC = n / 8 * MMD^2 (V-statistic, kernel L) between the
    scores of the masks that keep the cell and of those that drop it."""
    n = 24
    designs = latin_hypercube(n, 3, torch.Generator().manual_seed(5)).round()
    assert (designs.sum(0) == n // 2).all()
    scores = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 1.5
    w = statistics.median(scores[0].tolist())
    gram = torch.exp(-(scores[0, :, None] - scores[0, None, :]) ** 2 / (2 * w ** 2))
    for c in range(3):
        keep, drop = designs[:, c] == 1, designs[:, c] == 0
        mmd = gram[keep][:, keep].mean() + gram[drop][:, drop].mean() - 2 * gram[keep][:, drop].mean()
        assert binary_hsic(designs, scores)[0, c].item() == pytest.approx(n / 8 * mmd.item(), rel=1e-10)


def test_estimator_with_a_zero_median_takes_the_kernels_limit():
    designs = torch.tensor([[0.0], [1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    constant = torch.zeros(1, 5, dtype=torch.float64)
    assert abs(binary_hsic(designs, constant).item()) < 1e-15  # finite, not 0 / 0
    # median 0, three distinct values: L = identity on distinct scores
    scores = torch.tensor([[-1.0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)
    centred = designs[:, 0] - designs[:, 0].mean()
    gram = (scores[0, :, None] == scores[0, None, :]).double()
    expected = 2 * centred @ gram @ centred / 5
    assert binary_hsic(designs, scores).item() == pytest.approx(expected.item(), rel=1e-12)


def test_estimator_is_differentiable_in_the_scores_median_included():
    designs = latin_hypercube(10, 3, torch.Generator().manual_seed(7)).round()
    scores = (torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 2
              ).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: binary_hsic(designs, s), (scores,))


# -------------------------------------------------------------------------------------------- designs, resizes
@pytest.mark.parametrize("n", [10, 11])
def test_latin_hypercube_puts_one_point_in_each_stratum_and_binarises_to_halves(n):
    points = latin_hypercube(n, 7, torch.Generator().manual_seed(0))
    assert points.shape == (n, 7) and points.dtype == torch.float64
    assert ((points >= 0) & (points < 1)).all()
    strata = (points * n).floor().long()
    for c in range(7):
        assert sorted(strata[:, c].tolist()) == list(range(n))
    ones = points.round().sum(0)
    assert ((ones == n // 2) | (ones == n - n // 2)).all()
    assert not torch.equal(points[:, 0].argsort(), points[:, 1].argsort())  # independent permutations


def test_bicubic_resize_weights_by_hand():
    """[0, 1] resized to 4 samples with Keys' kernel (a = -1/2), half-pixel centres, out-of-range taps dropped and
    the rest renormalised (TensorFlow's bicubic): the first output, at -1/4, has taps 0 (distance 1/4, weight
    111/128) and 1 (distance 5/4, weight -9/128), so -9/102; the second, at 1/4, taps 0 (111/128) and 1 (29/128),
    so 29/140; the other two by symmetry."""
    values = keys_cubic_matrix(4, 2) @ torch.tensor([0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([-9 / 102, 29 / 140, 1 - 29 / 140, 1 + 9 / 102], dtype=torch.float64)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-14)
    assert torch.allclose(keys_cubic_matrix(13, 4).sum(1), torch.ones(13, dtype=torch.float64))
    torch.testing.assert_close(keys_cubic_matrix(6, 6), torch.eye(6, dtype=torch.float64))


def test_bicubic_resize_positions_match_torch_in_the_interior():
    """With a = -0.75 (torch's kernel) the weights equal torch's bicubic wherever all four taps lie inside (torch
    repeats the edge where TensorFlow renormalises), which pins the sample positions and tap order."""
    size_in, size_out = 5, 17
    basis = torch.eye(size_in, dtype=torch.float64).view(size_in, 1, size_in, 1)
    torch_matrix = F.interpolate(basis, size=(size_out, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T
    ours = keys_cubic_matrix(size_out, size_in, a=-0.75)
    position = (torch.arange(size_out, dtype=torch.float64) + 0.5) * size_in / size_out - 0.5
    interior = (position.floor() >= 1) & (position.floor() + 2 <= size_in - 1)
    assert interior.sum() >= 5
    torch.testing.assert_close(ours[interior], torch_matrix[interior], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours, torch_matrix)  # the borders differ


# ------------------------------------------------------------------------------------------------- the method
def test_the_map_peaks_on_the_only_region_the_model_reads():
    """A model that scores the mean of one 8x8 cell of a 4x4 grid on 32x32 images: the score takes two values
    (cell kept or dropped), so that cell's HSIC grows like n while the others' stay O(1)."""

    class Cell(nn.Module):
        def forward(self, x):
            region = x[:, :, 8:16, 16:24].mean((1, 2, 3))
            return torch.stack([region, -region], 1)

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    out = HSICAttribution(Cell(), grid=4, n_designs=128)(x, 0, generator=torch.Generator().manual_seed(1))
    assert out.shape == (2, 1, 32, 32)
    for image in out[:, 0]:
        peak = divmod(int(image.argmax()), 32)
        assert 8 <= peak[0] < 16 and 16 <= peak[1] < 24
        centres = image[4::8, 4::8].clone()  # the cells' centres
        read = centres[1, 2].item()
        centres[1, 2] = 0
        assert read > 8 * centres.abs().max()
        far = torch.ones(32, 32, dtype=torch.bool)
        far[:24, 8:] = False  # not the cell nor its neighbours (the bicubic resize spreads a cell over them)
        assert image[8:16, 16:24].mean() > 8 * image[far].abs().max()


def tf_bicubic_weights(i: int, size_out: int, size_in: int, a: float = -0.5):
    """Output i's (input index, weight) pairs, one by one as TensorFlow's half-pixel bicubic computes them."""
    position = (i + 0.5) * size_in / size_out - 0.5
    base = math.floor(position)
    taps = []
    for k in (-1, 0, 1, 2):
        j, dist = base + k, abs(position - (base + k))
        if dist <= 1:
            w = (a + 2) * dist ** 3 - (a + 3) * dist ** 2 + 1
        elif dist < 2:
            w = a * dist ** 3 - 5 * a * dist ** 2 + 8 * a * dist - 4 * a
        else:
            w = 0.0
        if 0 <= j < size_in:
            taps.append((j, w))
    total = sum(w for _, w in taps)
    return [(j, w / total) for j, w in taps]


def reference_hsic_attribution(model, x, classes, grid, n, seed, score):
    """The algorithm written out: Latin hypercube designs rounded to {0, 1}, masks resized by nearest neighbour,
    one forward per design and image, the trace estimator per cell, a bicubic resize pixel by pixel."""
    generator = torch.Generator().manual_seed(seed)
    strata = torch.rand((grid * grid, n), generator=generator, dtype=torch.float64).argsort(dim=1)
    jitter = torch.rand((grid * grid, n), generator=generator, dtype=torch.float64)
    designs = ((strata + jitter) / n).round().T  # (n, grid^2)
    height, width = x.shape[2:]
    masks = F.interpolate(designs.float().view(n, 1, grid, grid), size=(height, width), mode="nearest-exact")
    maps = []
    for image, cls in zip(x, classes):
        scores = []
        for mask in masks:
            with torch.no_grad():
                out = model(image[None] * mask)
            scores.append(float(out.softmax(1)[0, cls] if score == "softmax" else out[0, cls]))
        y = torch.tensor(scores, dtype=torch.float64)
        cells = [[plain_hsic(designs[:, r * grid + c], y) for c in range(grid)] for r in range(grid)]
        full = torch.zeros(height, width, dtype=torch.float64)
        for p in range(height):
            for q in range(width):
                full[p, q] = sum(wr * wc * cells[r][c] for r, wr in tf_bicubic_weights(p, height, grid)
                                 for c, wc in tf_bicubic_weights(q, width, grid))
        maps.append(full)
    return torch.stack(maps)[:, None]


@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_method_equals_the_algorithm_written_out(score):
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = HSICAttribution(model, grid=4, n_designs=12)(x, [0, 3], score=score, batch_size=5,
                                                       generator=torch.Generator().manual_seed(5))
    expected = reference_hsic_attribution(model, x, [0, 3], 4, 12, 5, score)
    assert expected.abs().max() > 0
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_defaults_are_xpliques():
    assert HSICAttribution.defaults == {"grid": 8, "n_designs": 500, "generator": None}
    assert HSICAttribution.name == "hsic" and HSICAttribution.kind == "perturbation"


def test_masks_are_shared_by_the_batch_and_each_image_is_independent_of_the_others():
    model = tiny_cnn()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    explainer = HSICAttribution(model, grid=4, n_designs=20)
    batch = explainer(x, [1, 4, 2], generator=torch.Generator().manual_seed(3))
    for i, cls in enumerate([1, 4, 2]):
        alone = explainer(x[i:i + 1], cls, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-8)
    for batch_size in (1, 7, None):
        torch.testing.assert_close(explainer(x, [1, 4, 2], batch_size=batch_size,
                                             generator=torch.Generator().manual_seed(3)), batch,
                                   rtol=1e-5, atol=1e-8)
    other = explainer(x, [1, 4, 2], generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(other, batch)


def test_forward_count_and_pass_size():
    model = CountingModel()
    HSICAttribution(model, grid=2, n_designs=10)(torch.rand(3, 3, 8, 8), 0, batch_size=4)
    assert sum(model.calls) == 30 and max(model.calls) == 4


def test_create_graph_differentiates_through_the_scores_and_the_median():
    """The map is differentiable w.r.t. the model's parameters (get_mask detaches x): the gradient of a
    parameter direction matches a central finite difference (float64, the same designs on every call)."""
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = {"grid": 4, "n_designs": 16}

    def run(create_graph=False):
        return HSICAttribution(model, **options)(x, [0, 2], create_graph=create_graph,
                                                 generator=torch.Generator().manual_seed(1))

    out = run(create_graph=True)
    plain = run()
    assert out.requires_grad and not plain.requires_grad
    torch.testing.assert_close(out.detach(), plain)
    weight = model[-1].weight
    direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad(out.sum(), weight)
    eps = 1e-6
    with torch.no_grad():
        weight += eps * direction
        up = run().sum()
        weight -= 2 * eps * direction
        down = run().sum()
        weight += eps * direction
    assert (grad * direction).sum().item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5)
    assert (grad * direction).sum().abs() > 0


@pytest.mark.parametrize("bad, message", [
    ({"grid": 0}, "grid must be a positive int"),
    ({"grid": 2.5}, "grid must be a positive int"),
    ({"grid": True}, "grid must be a positive int"),
    ({"grid": 17}, r"grid must not exceed the image's height and width \(16, 16\)"),
    ({"n_designs": 1}, "n_designs must be an int >= 2"),
    ({"n_designs": 8.0}, "n_designs must be an int >= 2"),
])
def test_bad_options_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        HSICAttribution(tiny_cnn())(torch.rand(1, 3, 16, 16), 0, **bad)


def test_a_generator_that_is_not_one_is_named():
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        HSICAttribution(tiny_cnn())(torch.rand(1, 3, 16, 16), 0, generator=3)
