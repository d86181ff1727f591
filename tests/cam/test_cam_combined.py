"""Guided Grad-CAM and CombinedWrapper (the seed's semantics and option routing); the quick start is in
tests/test_quickstart.py."""
from __future__ import annotations

import pytest
import torch

import attribution as A
from attribution.utils import normalize_saliency
from conftest import cam_cnn


@pytest.fixture
def x():
    torch.manual_seed(6)
    return torch.randn(2, 3, 32, 32)


def test_guided_grad_cam_is_guided_backprop_times_grad_cam(x):
    model = cam_cnn()
    out = A.GuidedGradCAM(model, "2")(x, [3, 4])
    expected = A.GuidedBackProp(model)(x, [3, 4]) * A.GradCAM(model, "2")(x, [3, 4])
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)


def test_combined_is_the_seed_formula(x):
    model = cam_cnn()
    combined = A.CombinedWrapper(model, A.IntegratedGradients, A.GradCAM)
    out = combined(x, [3, 4], target_layer="2", steps=5)
    gradient = A.IntegratedGradients(model, steps=5)(x, [3, 4])
    cam = A.GradCAM(model, "2")(x, [3, 4])
    expected = normalize_saliency(torch.relu(normalize_saliency(gradient) * normalize_saliency(cam)))
    assert out.shape == (2, 1, 32, 32) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, expected)


def test_combined_routes_options_to_their_owner(x):
    model = cam_cnn()
    combined = A.CombinedWrapper(model, "blur_ig", "score_cam", steps=4, max_sigma=3.0)
    out = combined(x, None, target_layer="3")  # the predicted classes: their Score-CAM maps are not empty
    cam = A.ScoreCAM(model, "3")(x)  # its own default score: softmax
    expected = normalize_saliency(
        normalize_saliency(A.BlurIG(model)(x, None, steps=4, max_sigma=3.0)) * normalize_saliency(cam))
    assert cam.flatten(1).amax(1).min() > 0
    torch.testing.assert_close(out, expected)
    # a score given explicitly goes to both
    logit = combined(x, None, target_layer="3", score="logit")
    assert not torch.allclose(logit, out)
    with pytest.raises(TypeError, match="unknown option 'target_layr'.*'target_layer'"):
        combined(x, 0, target_layr="3")


def test_combined_refuses_options_both_methods_own(x):
    model = cam_cnn()
    with pytest.raises(TypeError, match=r"\['samples', 'std'\] belong to both SmoothGrad and SSCAM"):
        A.CombinedWrapper(model, A.SmoothGrad, A.SSCAM, samples=2)(x, 0, std=0.1)
    with pytest.raises(TypeError, match="cam_method must be a CAM"):
        A.CombinedWrapper(model, A.VanillaGradient, A.VanillaGradient)
