"""Spearman, SSIM, the seed's class-specific rank correlation, the Gini index and the entropy."""
from __future__ import annotations

import math

import pytest
import torch

from attribution.metrics import (class_specific_spearman_rank_corr, entropy, gini, rank_data, spearman,
                                 spearman_rank_correlation_value, ssim)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import rankdata, spearmanr

    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 6, (3, 1, 10, 10), generator=generator).float()  # many ties
    b = torch.rand(3, 1, 10, 10, generator=generator)
    expected = torch.tensor([spearmanr(a[i].flatten(), b[i].flatten())[0] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(spearman(a, b), expected)
    torch.testing.assert_close(rank_data(a.flatten(1)), torch.from_numpy(rankdata(a.flatten(1), axis=1) - 1))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 20, 23, generator=generator)
    y = (x + 0.3 * torch.rand(2, 20, 23, generator=generator)).clamp(0, 1)
    expected = torch.tensor([structural_similarity(x[i].numpy(), y[i].numpy(), data_range=1.0) for i in range(2)],
                            dtype=torch.float64)
    torch.testing.assert_close(ssim(x, y), expected)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_class_specific_rank_correlation_as_the_seed():
    """The seed's own example: the same map correlates 1, its negation -1; the mean over the list."""
    generator = torch.Generator().manual_seed(2)
    a = torch.rand(4, 1, 8, 8, generator=generator)
    others = [-a, a.clone(), torch.rand(4, 1, 8, 8, generator=generator)]
    result = class_specific_spearman_rank_corr(a, others)
    expected = (-1 + 1 + spearman_rank_correlation_value(a, others[2])) / 3
    torch.testing.assert_close(result, expected)


def test_gini_closed_forms():
    n = 64
    one_hot = torch.zeros(2, 1, 8, 8)
    one_hot[:, 0, 3, 4] = -5.0
    assert gini(one_hot).tolist() == pytest.approx([(n - 1) / n] * 2)
    assert gini(torch.ones(1, 3, 4, 4)).item() == pytest.approx(0.0, abs=1e-12)
    assert gini(torch.zeros(1, 1, 4, 4)).item() == 0.0
    # two levels, half the entries 0 and half 1: G = 1/2
    half = torch.cat([torch.zeros(32), torch.ones(32)]).view(1, 1, 8, 8)
    assert gini(half).item() == pytest.approx(0.5)


def test_entropy_closed_forms():
    """-sum p log p of |A| / sum |A|: 0 for one entry, log n uniform, log 32 for half the entries equal."""
    one_hot = torch.zeros(2, 1, 8, 8)
    one_hot[:, 0, 3, 4] = -5.0
    assert entropy(one_hot).tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    assert entropy(-torch.ones(1, 3, 4, 4)).item() == pytest.approx(math.log(48))
    assert entropy(torch.zeros(1, 1, 4, 4)).item() == 0.0
    half = torch.cat([torch.zeros(32), 2 * torch.ones(32)]).view(1, 1, 8, 8)
    assert entropy(half).item() == pytest.approx(math.log(32))
    maps = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    p = maps.flatten(1).abs() / maps.flatten(1).abs().sum(1, keepdim=True)
    torch.testing.assert_close(entropy(maps), -(p * p.log()).sum(1))


@pytest.mark.parametrize("scale", [1.0, 1e-7, 1e-20, 1e20])
def test_pearson_matches_scipy_at_any_scale(scale):
    """The test for a constant row is relative to the row's own scale: tiny or huge but varying rows correlate as
    SciPy says (an absolute threshold on the product of norms scored tiny rows 0); constant rows give 0."""
    from scipy.stats import pearsonr

    from attribution.metrics.similarity import pearson

    generator = torch.Generator().manual_seed(3)
    a = torch.randn(3, 50, generator=generator, dtype=torch.float64) * scale
    b = a * 3e-6 + 1e-9 * scale * torch.randn(3, 50, generator=generator, dtype=torch.float64)
    expected = torch.tensor([pearsonr(a[i].numpy(), b[i].numpy())[0] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(pearson(a, b), expected, rtol=1e-9, atol=1e-12)
    constant = torch.full((3, 50), 0.1 * scale, dtype=torch.float64)
    torch.testing.assert_close(pearson(constant, b), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(pearson(a, torch.zeros_like(a)), torch.zeros(3, dtype=torch.float64))


def test_complexity_metrics_name_a_map_without_a_batch():
    """A single map without its batch dimension gets an error naming the expected shape (gini raised IndexError)."""
    from attribution.metrics import effective_complexity

    for metric in (gini, entropy, effective_complexity):
        with pytest.raises(ValueError, match=r"\(B, \.\.\.\)"):
            metric(torch.randn(10))
