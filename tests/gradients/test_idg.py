"""Integrated Decision Gradients: the sample placement against a plain re-count, closed forms, the integral."""
from __future__ import annotations

import math

import pytest
import torch

import attribution
from attribution.gradients.idg import decision_samples
from conftest import LinearModel, tiny_cnn


def placement_written_out(scores, steps):
    """One image: slopes with a leading 0 min-max scaled, shares of `steps` floored, leftovers to empty intervals
    (largest share first) then by largest remainder; each interval's samples split it evenly."""
    dx = 1 / (steps - 1)
    slopes = [0.0] + [(scores[k] - scores[k - 1]) / dx for k in range(1, steps)]
    low, high = min(slopes), max(slopes)
    scaled = [(s - low) / (high - low) for s in slopes][1:]
    share = [v / sum(scaled) * steps for v in scaled]
    counts = [math.floor(v) for v in share]
    left = steps - sum(counts)
    empty = sorted((k for k in range(steps - 1) if counts[k] == 0), key=lambda k: -share[k])
    rest = sorted((k for k in range(steps - 1) if counts[k] > 0), key=lambda k: -(share[k] - math.floor(share[k])))
    for k in (empty + rest)[:left]:
        counts[k] += 1
    alphas, widths = [], []
    for k, n in enumerate(counts):
        if n == 0:
            continue
        alphas += [(k + j / n) * dx for j in range(n)]
        widths += [dx / n] * n
    return alphas, widths


def test_samples_follow_the_rise_of_the_score():
    torch.manual_seed(0)
    scores = torch.randn(3, 12, dtype=torch.float64).cumsum(1)
    alphas, widths = decision_samples(scores, 12)
    for i in range(3):
        expected_alphas, expected_widths = placement_written_out(scores[i].tolist(), 12)
        torch.testing.assert_close(alphas[i], torch.tensor(expected_alphas, dtype=torch.float64))
        torch.testing.assert_close(widths[i], torch.tensor(expected_widths, dtype=torch.float64))
    steep = torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0, 5.0]], dtype=torch.float64)
    alphas, _ = decision_samples(steep, 6)
    assert ((alphas >= 0.4) & (alphas < 0.6)).all()  # all 6 samples in the one interval where the score rises


def test_on_a_linear_model_it_is_delta_times_weight_times_the_score_change():
    """f = <w, x> + c: the slope is <w, x - b> everywhere, every interval gets samples, the widths sum to 1."""
    model = LinearModel().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ours = attribution.IntegratedDecisionGradients(model, steps=9)(x, [0, 2])
    w = model.linear.weight.detach()[[0, 2]].view(2, 3, 8, 8)
    change = (w * x).sum((1, 2, 3)).view(2, 1, 1, 1)
    torch.testing.assert_close(ours, x * w * change, rtol=1e-10, atol=1e-12)


def test_many_steps_approach_the_integral():
    """With many steps the sum approaches (x - b) * integral (df/da) grad f da, computed on a fine even grid."""
    model = tiny_cnn().double()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    ours = attribution.IntegratedDecisionGradients(model, steps=400)(x, 1, batch_size=200)
    total = torch.zeros_like(x)
    for a in (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000:
        point = (a * x).requires_grad_(True)
        (grad,) = torch.autograd.grad(model(point)[0, 1], point)
        total += (grad * x).sum() * grad / 4000
    assert torch.corrcoef(torch.stack([ours.flatten(), (x * total).flatten()]))[0, 1] > 0.99


def test_bad_steps_are_named(cnn, images):
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        attribution.IntegratedDecisionGradients(cnn)(images, 0, steps=1)
