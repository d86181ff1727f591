"""Average drop and increase in confidence: closed forms on a toy model, and pytorch-grad-cam's metrics."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.metrics import average_drop, confidence_change, evaluate, increase_in_confidence
from conftest import cam_cnn
from toy_models import PixelLinear


def test_on_a_pixel_linear_model_the_scores_are_the_weighted_sums():
    """f = sum(w x): O = sum(w x N(L)), Y = sum(w x), with logits the drop is max(0, Y - O) / Y exactly."""
    model = PixelLinear().double()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) + 0.5
    maps = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 4 - 1
    change = confidence_change(model, x, maps, 0, score="logit")
    flat = maps.flatten(1)
    scaled = ((flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True)))
    w = model.weight.detach()
    y = (w * x).sum((1, 2, 3))
    o = (w * x * scaled.view(3, 1, 8, 8)).sum((1, 2, 3))
    torch.testing.assert_close(change.original, y)
    torch.testing.assert_close(change.explained, o)
    torch.testing.assert_close(change.drop, (y - o).clamp(min=0) / y)
    torch.testing.assert_close(change.increase, (o > y).double())


def test_a_map_of_ones_keeps_the_score_and_a_constant_map_removes_the_image():
    model = cam_cnn()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    ones = confidence_change(model, x, torch.ones(2, 1, 32, 32), [3, 4], normalize=False)
    torch.testing.assert_close(ones.explained, ones.original)
    assert (ones.drop == 0).all() and (ones.increase == 0).all()
    flat = confidence_change(model, x, torch.full((2, 1, 32, 32), 5.0), [3, 4])  # scales to zeros
    with torch.no_grad():
        empty = model(torch.zeros_like(x)).softmax(1)[[0, 1], [3, 4]]
    torch.testing.assert_close(flat.explained, empty)


def test_equals_pytorch_grad_cams_drop_and_increase():
    metrics = pytest.importorskip("pytorch_grad_cam.metrics.cam_mult_image")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = cam_cnn()
    torch.manual_seed(2)
    x = torch.randn(4, 3, 32, 32)
    classes = [1, 5, 7, 2]
    cams = attribution.utils.normalize_saliency(attribution.GradCAM(model, "2")(x, classes))[:, 0]
    targets = [ClassifierOutputSoftmaxTarget(c) for c in classes]
    theirs_drop = metrics.DropInConfidence()(x, cams.numpy(), targets, model)
    theirs_increase = metrics.IncreaseInConfidence()(x, cams.numpy(), targets, model)
    change = confidence_change(model, x, cams[:, None], classes, normalize=False)
    torch.testing.assert_close(change.absolute_drop, torch.from_numpy(theirs_drop).flatten(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(change.increase, torch.from_numpy(theirs_increase).flatten())
    torch.testing.assert_close(average_drop(model, x, cams[:, None], classes, normalize=False),
                               change.absolute_drop / change.original)


def test_evaluate_reports_both_and_knows_their_direction():
    model = cam_cnn()
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    explainer = attribution.GradCAM(model, "2")
    table = evaluate(explainer, model, x, [0, 1, 2], ["average_drop", "increase_in_confidence"])
    maps = explainer(x, [0, 1, 2])
    torch.testing.assert_close(table["average_drop"], average_drop(model, x, maps, [0, 1, 2]))
    torch.testing.assert_close(table["increase_in_confidence"], increase_in_confidence(model, x, maps, [0, 1, 2]))
    assert "average_drop  " in table.summary() and "(lower is better)" in table.summary().splitlines()[0]


def test_grad_cam_on_the_pretrained_model_drops_less_than_an_inverted_map(efficientnet, composite):
    """The cat's Grad-CAM keeps more of the cat's probability than the same map turned upside down."""
    from attribution.data import EGYPTIAN_CAT

    maps = attribution.GradCAM(efficientnet)(composite, EGYPTIAN_CAT)
    good = average_drop(efficientnet, composite, maps, EGYPTIAN_CAT)
    inverted = average_drop(efficientnet, composite, -maps, EGYPTIAN_CAT)
    assert good.item() < inverted.item() - 0.2, (good, inverted)
