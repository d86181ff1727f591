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
    """f = <w, x> + c: the slope is <w, x - b> everywhere, every interval gets samples, the widths sum to 1.  The
    default difference slope is exact too, except at the first sample, which gets slope 0 (width 1 / (steps - 1))."""
    model = LinearModel().double()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = model.linear.weight.detach()[[0, 2]].view(2, 3, 8, 8)
    change = (w * x).sum((1, 2, 3)).view(2, 1, 1, 1)
    exact = attribution.IntegratedDecisionGradients(model, steps=9, slope="derivative")(x, [0, 2])
    torch.testing.assert_close(exact, x * w * change, rtol=1e-10, atol=1e-12)
    default = attribution.IntegratedDecisionGradients(model, steps=9)(x, [0, 2])
    torch.testing.assert_close(default, x * w * change * (1 - 1 / 8), rtol=1e-10, atol=1e-12)


def authors_idg_written_out(model, image, cls, steps, slope):
    """One image, as the authors' code (saliencyMethods.IDG) computes it, on the placement of decision_samples
    (the deliberate difference in placement) and without its final division by steps: gradients and logits at the
    samples, slopes ``(logit_j - logit_{j-1}) / (alpha_j - alpha_{j-1})`` with slope 0 at the first sample (or the
    exact ``grad . x`` with ``slope='derivative'``), each gradient times its slope and width, summed, times x."""
    with torch.no_grad():
        grid = [model((k / (steps - 1) * image)[None])[0, cls] for k in range(steps)]
    alphas, widths = decision_samples(torch.stack(grid)[None], steps)
    total, logits, grads = torch.zeros_like(image), [], []
    for a in alphas[0]:
        point = (a * image).requires_grad_(True)
        logit = model(point[None])[0, cls]
        (grad,) = torch.autograd.grad(logit, point)
        logits.append(logit.detach())
        grads.append(grad)
    for j in range(steps):
        if slope == "derivative":
            rise = (grads[j] * image).sum()
        else:
            rise = 0.0 if j == 0 else (logits[j] - logits[j - 1]) / (alphas[0, j] - alphas[0, j - 1])
        total += grads[j] * rise * widths[0, j]
    return total * image


@pytest.mark.parametrize("slope", ["difference", "derivative"])
def test_equals_the_authors_algorithm_written_out(slope):
    """The default slope is the authors' code's (a backward difference of the sample logits, 0 at the first
    sample); rows are split over passes of 5 so that a sample's predecessor is sometimes in the previous pass."""
    model = tiny_cnn().double()
    torch.manual_seed(3)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64) * 3
    ours = attribution.IntegratedDecisionGradients(model, steps=12, slope=slope)(x, [2, 4], batch_size=5)
    for i, cls in enumerate([2, 4]):
        torch.testing.assert_close(ours[i], authors_idg_written_out(model, x[i], cls, 12, slope))


def test_defaults_are_the_authors():
    assert attribution.IntegratedDecisionGradients.defaults == {"baseline": "zero", "steps": 50,
                                                                "slope": "difference"}


def test_half_precision_input_is_not_rounded_on_the_path():
    """A float16 image explained by a float32 model: the path points stay float32 (as in Integrated Gradients),
    so the map equals that of the same values in float32 (they were rounded to float16 first)."""
    model = tiny_cnn(torch.nn.Softplus)  # smooth: its gradient changes with any change of the point
    torch.manual_seed(5)
    x = (3 * torch.rand(1, 3, 12, 12)).half()
    explainer = attribution.IntegratedDecisionGradients(model, steps=6)
    torch.testing.assert_close(explainer(x, 1), explainer(x.float(), 1), rtol=0, atol=0)


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
    with pytest.raises(ValueError, match="slope must be one of"):
        attribution.IntegratedDecisionGradients(cnn)(images, 0, steps=4, slope="exact")
