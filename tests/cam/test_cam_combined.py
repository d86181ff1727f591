"""Guided Grad-CAM, CombinedWrapper (the seed's semantics and option routing) and the seed's quick start."""
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


# ---------------------------------------------------------------------------------------------- the quick start
def quick_start(model, img):
    """The seed's quick start (issue 2), with only the model and image lines changed."""
    import matplotlib

    matplotlib.use("Agg")
    from attribution import BlurIG, CombinedWrapper, GradCAM
    from attribution.utils import normalize_saliency, visualize_single_saliency

    blur_ig_kwargs = {'steps': 100, 'batch_size': 4, 'max_sigma': 50, 'grad_step': 0.01, 'sqrt': False}
    img = torch.cat([img, img])  # batch input
    target_index = torch.argmax(model(img), dim=1).cpu()
    blur_ig = normalize_saliency(BlurIG(model).get_mask(img, target_index, **blur_ig_kwargs))
    gradcam = normalize_saliency(GradCAM(model).get_mask(img, target_index, target_layer='layer3'))
    combined = CombinedWrapper(model, BlurIG, GradCAM)
    combined_saliency = normalize_saliency(combined.get_mask(img, target_index, target_layer='layer3',
                                                             **blur_ig_kwargs))
    visualize_single_saliency(blur_ig[0].unsqueeze(0))
    return blur_ig, gradcam, combined_saliency


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_seed_quick_start_on_resnet50(library):
    """Random-weight ResNet-50s, a batch of 2 small images (32x32 keeps the 2 x 100 BlurIG steps fast)."""
    if library == "torchvision":
        torchvision = pytest.importorskip("torchvision")
        torch.manual_seed(0)
        model = torchvision.models.resnet50(num_classes=10).eval()
    else:
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        model = timm.create_model("resnet50", num_classes=10).eval()
    torch.manual_seed(1)
    img = torch.rand(1, 3, 32, 32)
    blur_ig, gradcam, combined = quick_start(model, img)
    for saliency in (blur_ig, gradcam, combined):
        assert saliency.shape == (2, 1, 32, 32) and torch.isfinite(saliency).all()
        assert saliency.min() >= 0 and saliency.max() <= 1
        torch.testing.assert_close(saliency[0], saliency[1])  # the two copies of the image agree
    assert gradcam.amax() == 1 and combined.amax() == 1
