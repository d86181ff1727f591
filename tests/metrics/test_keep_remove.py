"""KPM, KNM, KAM, RAM: exact values on a model whose pixel contributions are known, SHAP's grid, the seed's names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution.metrics import (kam, keep_absolute_mask, keep_negative_mask, keep_positive_mask, kpm, knm, ram,
                                 remove_absolute_mask, shap_fractions)
from toy_models import PixelLinear

SHAPE = (3, 6, 7)
N = SHAPE[1] * SHAPE[2]


def setup():
    model = PixelLinear(SHAPE)
    torch.manual_seed(3)
    x = torch.randn(2, *SHAPE)
    attribution = model.contributions(x)  # exact: f(x) = sum of the per-pixel channel sums
    return model, x, attribution, attribution.sum(dim=1).flatten(1)


def expected_sums(c: torch.Tensor, fractions: torch.Tensor, sign: int) -> torch.Tensor:
    """sum of the top min(round(f N), #(sign * c >= 0)) contributions by sign * c, per image and fraction."""
    out = torch.zeros(c.shape[0], fractions.numel())
    for b in range(c.shape[0]):
        ranked = sign * c[b]
        order = ranked.argsort(descending=True)
        cap = int((ranked >= 0).sum())
        for j, f in enumerate(fractions.tolist()):
            out[b, j] = c[b, order[: min(round(f * N), cap)]].sum()
    return out


def test_shap_grid():
    """SHAP's __intlogspace(0, N, 11): round(N (logspace(0, 1, 11) - 1) / 9)."""
    for n in (100, N, 224 * 224):
        reference = np.round(n * (np.logspace(0, 1, 11) - 1) / 9).astype(int)
        np.testing.assert_array_equal(torch.round(shap_fractions() * n).long().numpy(), reference)


def test_kpm_and_knm_are_sums_of_kept_contributions():
    model, x, a, c = setup()
    grid = shap_fractions()
    positive = keep_positive_mask(model, x, a, 0, score="logit")
    negative = keep_negative_mask(model, x, a, 0, score="logit")
    torch.testing.assert_close(positive.y, expected_sums(c, grid, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negative.y, expected_sums(c, grid, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(positive.x, grid.float())
    torch.testing.assert_close(positive.auc, torch.trapezoid(positive.y, grid.float()))
    assert (positive.auc > 0).all() and (negative.auc < 0).all()


def test_kam_and_ram_measure_accuracy():
    model, x, a, c = setup()
    grid = torch.linspace(0, 1, 6)
    keep = keep_absolute_mask(model, x, a, 0, fractions=grid)
    remove = remove_absolute_mask(model, x, a, 0, fractions=grid)
    kept = torch.zeros(2, grid.numel())  # the sum of the top round(f N) contributions by |c|
    for b in range(2):
        order = c[b].abs().argsort(descending=True)
        for j, f in enumerate(grid.tolist()):
            top = order[: round(f * N)]
            kept[b, j] = c[b, top].sum()
    total = c.sum(dim=1, keepdim=True)
    # target 0 scores f, class 1 scores -f: class 0 is the arg-max when f >= 0 (arg-max takes the first on ties)
    torch.testing.assert_close(keep.y, (kept >= 0).float())
    torch.testing.assert_close(remove.y, (total - kept >= 0).float())


def test_ranking_ties_are_broken_by_a_fixed_permutation():
    model, x, _, _ = setup()
    flat = torch.zeros(2, 1, *SHAPE[1:])
    a = keep_positive_mask(model, x, flat, 0, score="logit", seed=0)
    b = keep_positive_mask(model, x, flat, 0, score="logit", seed=0)
    c = keep_positive_mask(model, x, flat, 0, score="logit", seed=1)
    torch.testing.assert_close(a.y, b.y)
    assert not torch.allclose(a.y, c.y)


@pytest.mark.parametrize("name", ["kpm", "knm", "kam", "ram"])
def test_seed_names_keep_working(name):
    """``f(original_input, attribution, target_label, forward, step)`` -> ``(auc, x, y)`` with the model or with the
    seed's ``forward(masked, labels) -> (mean score, accuracy)``: both give the same numbers."""
    fn = {"kpm": kpm, "knm": knm, "kam": kam, "ram": ram}[name]
    model = PixelLinear((3, 28, 28))
    torch.manual_seed(4)
    x = torch.randn(2, 3, 28, 28)
    a = model.contributions(x)
    labels = torch.tensor([0, 1])

    def forward(masked, target):
        probs = model(masked).softmax(dim=1)
        score = probs.gather(1, target[:, None]).mean()
        accuracy = (probs.argmax(dim=1) == target).float().mean()
        return score, accuracy

    auc, xs, ys = fn(x, a, labels, model, step=0.25)
    auc_legacy, xs_legacy, ys_legacy = fn(x, a, labels, forward, step=0.25)
    assert isinstance(auc, float) and isinstance(xs, np.ndarray)
    np.testing.assert_allclose(xs, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(ys, ys_legacy, rtol=1e-5, atol=1e-6)
    assert auc == pytest.approx(auc_legacy, rel=1e-5, abs=1e-6)
    assert auc == pytest.approx(float(np.trapezoid(ys, xs)), rel=1e-6)
