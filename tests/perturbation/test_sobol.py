"""Sobol attribution: the Jansen estimator against closed-form total indices, the method against its algorithm
written out (OpenCV's blur and TensorFlow's bicubic resize rule, as the reference uses), a model that reads one
region."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.quasirandom import SobolEngine

import attribution
from attribution.core.resize import bicubic_resize, keys_cubic_matrix
from attribution.core.filters import box_blur
from attribution.perturbation.sobol import ReplicatedDesign, SobolAttribution, jansen_total_indices, sobol_design
from conftest import CountingModel, LinearModel, tiny_cnn

cv2 = pytest.importorskip("cv2")


def replicated_scores(f, dimension: int, n_designs: int, seed: int):
    """f on the rows of A and of every C_i (A with column i from B), for an f of (..., d) points in [0, 1]^d."""
    a, b = sobol_design(dimension, n_designs, torch.Generator().manual_seed(seed))
    c = a.repeat(dimension, 1, 1)  # (d, N, d)
    cells = torch.arange(dimension)
    c[cells, :, cells] = b.T
    return f(a), f(c)


# ------------------------------------------------------------------------------------------------ the estimator
def test_jansen_recovers_the_ishigami_total_indices():
    """Ishigami, f = sin X1 + 7 sin^2 X2 + 0.1 X3^4 sin X1 with X uniform on [-pi, pi]^3 (Sobol & Levitan):
    V1 = (1 + b pi^4 / 5)^2 / 2, V2 = a^2 / 8, V13 = 8 b^2 pi^8 / 225, V3 = 0."""
    a_, b_ = 7.0, 0.1

    def ishigami(u):
        x = math.pi * (2 * u - 1)
        return torch.sin(x[..., 0]) + a_ * torch.sin(x[..., 1]) ** 2 + b_ * x[..., 2] ** 4 * torch.sin(x[..., 0])

    v1, v2, v13 = (1 + b_ * math.pi ** 4 / 5) ** 2 / 2, a_ ** 2 / 8, 8 * b_ ** 2 * math.pi ** 8 / 225
    total = v1 + v2 + v13
    f_a, f_c = replicated_scores(ishigami, 3, 2 ** 14, seed=0)
    estimate = jansen_total_indices(f_a, f_c)
    expected = torch.tensor([(v1 + v13) / total, v2 / total, v13 / total], dtype=torch.float64)
    torch.testing.assert_close(estimate, expected, rtol=0, atol=0.01)
    assert estimate.tolist() == pytest.approx([0.5576, 0.4424, 0.2437], abs=0.01)  # the published values


def test_jansen_on_linear_and_product_functions():
    """f = <w, U>: S_Ti = w_i^2 / |w|^2, exactly 0 for an unused input; f = U1 U2: S_T = (1/3)(1/12) / (1/9 - 1/16)
    = 4/7 for both (the interaction counted in each: the indices sum past 1)."""
    w = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.5], dtype=torch.float64)
    f_a, f_c = replicated_scores(lambda u: u @ w, 5, 4096, seed=1)
    estimate = jansen_total_indices(f_a, f_c)
    torch.testing.assert_close(estimate, w ** 2 / (w ** 2).sum(), rtol=0, atol=0.01)
    assert estimate[3] == 0
    f_a, f_c = replicated_scores(lambda u: u[..., 0] * u[..., 1], 4, 4096, seed=2)
    estimate = jansen_total_indices(f_a, f_c)
    torch.testing.assert_close(estimate, torch.tensor([4 / 7, 4 / 7, 0, 0], dtype=torch.float64), rtol=0, atol=0.01)


def test_jansen_is_the_formula_on_leading_dims_and_zero_for_a_constant_score():
    torch.manual_seed(0)
    f_a, f_c = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    out = jansen_total_indices(f_a, f_c)
    assert out.shape == (2, 3, 5)
    for index in np.ndindex(2, 3, 5):
        fa, fc = f_a[index[:2]].numpy(), f_c[index].numpy()
        assert out[index].item() == pytest.approx(((fa - fc) ** 2).sum() / (2 * 8 * fa.var(ddof=1)), rel=1e-12)
    constant = jansen_total_indices(torch.ones(8), torch.ones(4, 8))
    assert torch.equal(constant, torch.zeros(4))


# ---------------------------------------------------------------------------------------------------- the design
def test_design_is_one_scrambled_sobol_sequence_split_in_two():
    a, b = sobol_design(5, 16, torch.Generator().manual_seed(7))
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=torch.Generator().manual_seed(7)))
    points = SobolEngine(10, scramble=True, seed=seed).draw(16, dtype=torch.float64)
    torch.testing.assert_close(a, points[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(b, points[:, 5:], rtol=0, atol=0)
    # a scrambled net: each coordinate of the 16 points falls once in each sixteenth of [0, 1]
    for column in torch.cat([a, b], 1).T:
        assert sorted((column * 16).floor().long().tolist()) == list(range(16))
    other, _ = sobol_design(5, 16, torch.Generator().manual_seed(8))
    assert not torch.allclose(a, other)


def test_replicated_design_rows_are_a_then_each_c_i():
    a, b = torch.rand(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    design = ReplicatedDesign(a, b)
    rows = design.cells(0, design.rows)
    assert rows.shape == (16, 3)
    torch.testing.assert_close(rows[:4], a, rtol=0, atol=0)
    for i in range(3):
        expected = a.clone()
        expected[:, i] = b[:, i]
        torch.testing.assert_close(rows[4 + 4 * i:8 + 4 * i], expected, rtol=0, atol=0)
    torch.testing.assert_close(design.cells(5, 11), rows[5:11], rtol=0, atol=0)


@pytest.mark.parametrize("size", [(13, 11), (3, 4), (1, 6)])
def test_box_blur_is_opencvs_blur(size):
    """cv2.blur(x, (10, 10)): the reference's blurred baseline (OpenCV's default border, reflected without the edge)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size, dtype=torch.float64)
    out = box_blur(x, 10, 10)
    for i in range(2):
        for c in range(3):
            expected = cv2.blur(x[i, c].numpy(), (10, 10))
            np.testing.assert_allclose(out[i, c].numpy(), expected, rtol=1e-12, atol=1e-12)


def keys(t: float, a: float = -0.5) -> float:
    """Keys' cubic convolution kernel."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0


def tf_bicubic(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """TensorFlow's bicubic resize (half-pixel centres, Keys' kernel, taps outside the input dropped and the rest
    renormalised), one output pixel at a time."""
    rows_in, cols_in = values.shape

    def taps(o, size_out, size_in):
        position = (o + 0.5) * size_in / size_out - 0.5
        found = [(i, keys(position - i)) for i in range(math.floor(position) - 1, math.floor(position) + 3)
                 if 0 <= i < size_in]
        total = sum(w for _, w in found)
        return [(i, w / total) for i, w in found]

    out = np.zeros((height, width))
    for r in range(height):
        for c in range(width):
            out[r, c] = sum(wr * wc * values[i, j] for i, wr in taps(r, height, rows_in)
                            for j, wc in taps(c, width, cols_in))
    return out


def test_bicubic_resize_is_tensorflows_rule_and_reproduces_quadratics():
    torch.manual_seed(0)
    grid_map = torch.rand(2, 1, 3, 5, dtype=torch.float64)
    out = bicubic_resize(grid_map, (11, 17))
    for i in range(2):
        np.testing.assert_allclose(out[i, 0].numpy(), tf_bicubic(grid_map[i, 0].numpy(), 11, 17), rtol=1e-12)
    # Keys' kernel (a = -0.5) reproduces quadratics wherever all four taps are inside (a = -0.75 would not)
    source = torch.arange(10, dtype=torch.float64)
    weights = keys_cubic_matrix(37, 10)
    position = (torch.arange(37, dtype=torch.float64) + 0.5) * 10 / 37 - 0.5
    inside = (position.floor() >= 1) & (position.floor() <= 7)
    quadratic = lambda p: 0.3 * p ** 2 - 2 * p + 1  # noqa: E731
    torch.testing.assert_close((weights @ quadratic(source))[inside], quadratic(position[inside]), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(weights.sum(1), torch.ones(37, dtype=torch.float64))
    torch.testing.assert_close(keys_cubic_matrix(6, 6), torch.eye(6, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------- the method
def reference_sobol(model, x, targets, grid, design, perturbation):
    """The algorithm written out: per image, per design row, build the mask (half-pixel nearest upsampling, as
    TensorFlow's resize in the reference), perturb, forward, read the target's logit; Jansen's estimator in NumPy;
    the (grid, grid) indices resized by TensorFlow's bicubic rule (:func:`tf_bicubic`)."""
    a, b = (m.numpy() for m in design)
    n_designs, dimension = a.shape
    height, width = x.shape[2:]
    row_cell = [min(int((r + 0.5) * grid / height), grid - 1) for r in range(height)]
    col_cell = [min(int((c + 0.5) * grid / width), grid - 1) for c in range(width)]
    maps = []
    for image, cls in zip(x, targets):
        pixels = image.numpy()
        blurred = np.stack([cv2.blur(channel, (10, 10)) for channel in pixels])

        def score(cells):
            mask = cells.reshape(grid, grid)[np.ix_(row_cell, col_cell)][None]
            if perturbation == "inpainting":
                perturbed = pixels * mask
            elif perturbation == "blurring":
                perturbed = pixels * mask + (1 - mask) * blurred
            else:
                perturbed = pixels * (mask - 0.5) * 1.0
            with torch.no_grad():
                return model(torch.from_numpy(perturbed)[None])[0, cls].item()

        f_a = np.array([score(a[j]) for j in range(n_designs)])
        f_c = np.empty((dimension, n_designs))
        for i in range(dimension):
            for j in range(n_designs):
                row = a[j].copy()
                row[i] = b[j, i]
                f_c[i, j] = score(row)
        variance = f_a.var(ddof=1)
        indices = np.array([((f_a - f_c[i]) ** 2).sum() / (2 * n_designs * variance) for i in range(dimension)])
        maps.append(tf_bicubic(indices.reshape(grid, grid), height, width))
    return torch.from_numpy(np.stack(maps))[:, None]


@pytest.mark.parametrize("perturbation", ["inpainting", "blurring", "amplitude"])
def test_sobol_equals_the_algorithm_written_out(perturbation):
    """12x10 images and an odd grid: the cells do not divide the image, so the nearest rule and the cubic resize
    are both exercised (no pixel centre falls on a cell boundary)."""
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    out = SobolAttribution(model, grid=3, n_designs=4, perturbation=perturbation)(
        x, [1, 3], generator=torch.Generator().manual_seed(5), batch_size=7)
    design = sobol_design(9, 4, torch.Generator().manual_seed(5))
    expected = reference_sobol(model, x, [1, 3], 3, design, perturbation)
    assert out.shape == (2, 1, 12, 10) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)


def test_on_a_linear_model_the_cell_indices_are_the_squared_cell_contributions():
    """f(x * M) = sum_i M_i a_i + c with a_i = sum over cell i of w x: S_Ti = a_i^2 / sum_j a_j^2 (uniform M_i of equal
    variance).  grid = image side, so each cell is a pixel and the final resize is the identity."""
    linear = LinearModel().double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = SobolAttribution(linear, grid=8, n_designs=4096)(x, [1, 2], generator=torch.Generator().manual_seed(1),
                                                           batch_size=8192)
    contribution = (linear.linear.weight[[1, 2]].detach().view(2, 3, 8, 8) * x).sum(1, keepdim=True)
    expected = contribution ** 2 / (contribution ** 2).sum((2, 3), keepdim=True)
    assert expected.max() > 0.15
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.001)


class Corner(nn.Module):
    """Scores from the top-left 8x8 corner only (a non-linear function of its mean)."""

    def forward(self, x):
        corner = x[:, :, :8, :8].mean((1, 2, 3))
        return torch.stack([torch.tanh(3 * corner), -corner], 1)


def test_sobol_finds_the_only_region_the_model_reads():
    """With grid 4 on 32x32 the corner is cell (0, 0): the score is a function of M_00 alone, so S_T = 1 there and
    exactly 0 in every other cell; the bicubic resize reaches 1.5 cells from a cell, so past pixel 20 the map is 0
    (and it overshoots the cell's value a little next to the step, as TensorFlow's does)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) + 0.5
    out = attribution.create("sobol", Corner(), grid=4, n_designs=32)(
        x, 0, generator=torch.Generator().manual_seed(0))[0, 0]
    assert 0.9 < out.max().item() < 1.2
    assert out[:4, :4].min() > 0.9
    assert out[:, 20:].abs().max() == 0 and out[20:, :].abs().max() == 0
    assert out[:8, :8].mean() > 20 * out[8:, 8:].abs().mean()


# ---------------------------------------------------------------------------------------------- the call contract
def test_same_generator_same_map_and_images_independent_of_the_batch(cnn, images):
    sobol = SobolAttribution(cnn, grid=3, n_designs=8)
    batch = sobol(images, [3, 1, 4], generator=torch.Generator().manual_seed(4))
    again = sobol(images, [3, 1, 4], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    for i, t in enumerate([3, 1, 4]):
        alone = sobol(images[i:i + 1], t, generator=torch.Generator().manual_seed(4), batch_size=5)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-6)
    other = sobol(images, [3, 1, 4], generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(batch, other)


def test_sobol_counts_its_forwards():
    model = CountingModel()
    SobolAttribution(model, grid=2, n_designs=4)(torch.randn(3, 3, 8, 8), 0, batch_size=5)
    assert sum(model.calls) == 3 * 4 * (4 + 1) and max(model.calls) == 5


def test_create_graph_keeps_the_map_differentiable_in_the_parameters(cnn, images):
    """(The base class detaches x, so the map is a function of the model's parameters, not of x.)"""
    sobol = SobolAttribution(cnn, grid=3, n_designs=4)
    out = sobol(images, [0, 1, 2], create_graph=True, generator=torch.Generator().manual_seed(0))
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), list(cnn.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = sobol(images, [0, 1, 2], generator=torch.Generator().manual_seed(0))
    assert not plain.requires_grad
    torch.testing.assert_close(out.detach(), plain)


@pytest.mark.parametrize("bad, message", [({"grid": 0}, "grid must be a positive int"),
                                          ({"grid": 2.5}, "grid must be a positive int"),
                                          ({"grid": True}, "grid must be a positive int"),
                                          ({"grid": 17}, r"grid must be at most the image's height and width"),
                                          ({"n_designs": 12}, "n_designs must be a power of two, at least 2"),
                                          ({"n_designs": 1}, "n_designs must be a power of two, at least 2"),
                                          ({"n_designs": 8.0}, "n_designs must be a power of two, at least 2"),
                                          ({"perturbation": "blur"}, "perturbation must be one of")])
def test_bad_options_are_named(cnn, images, bad, message):
    with pytest.raises(ValueError, match=message):
        SobolAttribution(cnn)(images, 0, **bad)


def test_a_generator_that_is_not_one_is_named(cnn, images):
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        SobolAttribution(cnn)(images, 0, generator=3)


def test_a_grid_past_torchs_sobol_dimensions_is_named():
    with pytest.raises(ValueError, match=r"grid must be at most 102 \(torch's Sobol sequences"):
        SobolAttribution(CountingModel())(torch.randn(1, 3, 104, 104), 0, grid=103)
