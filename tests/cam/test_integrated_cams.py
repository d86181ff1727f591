"""Integrated Grad-CAM and RSI-Grad-CAM against the authors' procedures written out one image and one path point at
a time, their closed forms on nets that are linear above the layer, their defaults and their argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from conftest import RowCounter, cam_cnn, central_difference


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 32, 32)


def upsample(maps, size):
    return F.interpolate(torch.stack(maps), size=size, mode="bilinear", align_corners=False)


def features_and_gradient(model, point, cls, softmax=False):
    """Block "2"'s activations at ``point`` (1, 3, H, W) and the gradient of the class's score w.r.t. them."""
    features = model[:3](point).detach().requires_grad_(True)
    scores = model[3:](features)
    scores = scores.softmax(dim=1) if softmax else scores
    (grad,) = torch.autograd.grad(scores[0, cls], features)
    return features.detach(), grad


def integrated_grad_cam_written_out(model, x, classes, steps, baseline):
    """The authors' notebook per image: points b + (i/m)(x - b) for i < m, plain Grad-CAM of each, ReLU, summed."""
    maps = []
    for image, base, cls in zip(x, baseline, classes):
        total = 0
        for i in range(steps):
            acts, grad = features_and_gradient(model, (base + (image - base) * (i / steps))[None], cls)
            total = total + F.relu((acts * grad.mean(dim=(2, 3), keepdim=True)).sum(dim=1))
        maps.append(total)
    return upsample(maps, x.shape[-2:])


def rsi_grad_cam_written_out(model, x, classes, steps, baseline, positive_gradients, softmax):
    """The authors' PyTorch notebook per image: m + 1 points from the baseline to the image, the (rectified)
    gradients and activations at each, the trapezoidal Riemann-Stieltjes sum, pooled per channel, times the image's
    activations, summed over channels (the notebook averages: 1/C of this), ReLU."""
    maps = []
    for image, base, cls in zip(x, baseline, classes):
        acts_list, grads_list = [], []
        for j in range(steps + 1):
            acts, grad = features_and_gradient(model, (base + (image - base) * (j / steps))[None], cls, softmax)
            acts_list.append(acts)
            grads_list.append(F.relu(grad) if positive_gradients else grad)
        acts_batch, grads_batch = torch.stack(acts_list), torch.stack(grads_list)
        summands = (grads_batch[:-1] + grads_batch[1:]) / 2.0 * (acts_batch[1:] - acts_batch[:-1])
        pooled = summands.sum(dim=0).mean(dim=(0, 2, 3))
        maps.append(F.relu((acts_list[-1][0] * pooled[:, None, None]).sum(dim=0, keepdim=True)))
    return upsample(maps, x.shape[-2:])


def head_linear_net(seed=0):
    """Bias-free convolutions and ReLUs (positively homogeneous), then global average pooling and a linear layer:
    above its last ReLU ("3") the score is linear, so the gradient there is the constant ``W_c / (h w)``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()


# ------------------------------------------------------------------------------------------- Integrated Grad-CAM
@pytest.mark.parametrize("baseline", ["zero", 0.3])
def test_integrated_grad_cam_equals_the_authors_procedure(x, baseline):
    model = cam_cnn()
    start = torch.zeros_like(x) if baseline == "zero" else torch.full_like(x, baseline)
    expected = integrated_grad_cam_written_out(model, x, [1, 4, 7], 5, start)
    ours = A.IntegratedGradCAM(model, "2")(x, [1, 4, 7], steps=5, baseline=baseline, batch_size=4)  # chunks straddle
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_integrated_grad_cam_with_one_step_is_grad_cam_of_the_baseline(x):
    model = cam_cnn()
    black = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1).expand_as(x)
    ours = A.IntegratedGradCAM(model, "2")(x, [1, 4, 7], steps=1, baseline="black")
    torch.testing.assert_close(ours, A.GradCAM(model, "2")(black.contiguous(), [1, 4, 7]), rtol=1e-5, atol=1e-6)


def test_integrated_grad_cam_on_a_homogeneous_net_is_a_multiple_of_grad_cam(x):
    """A(a x) = a A(x) and a constant gradient: each point's map is (i/m) Grad-CAM(x), summing to (m-1)/2 of it."""
    model, steps = head_linear_net(), 6
    ours = A.IntegratedGradCAM(model, "3")(x, [0, 2, 4], steps=steps)
    torch.testing.assert_close(ours, (steps - 1) / 2 * A.GradCAM(model, "3")(x, [0, 2, 4]), rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- RSI-Grad-CAM
@pytest.mark.parametrize("positive_gradients", [True, False])
def test_rsi_grad_cam_equals_the_authors_procedure(x, positive_gradients):
    model = cam_cnn()
    black = x.flatten(1).amin(dim=1).view(-1, 1, 1, 1).expand_as(x)
    expected = rsi_grad_cam_written_out(model, x, [1, 4, 7], 4, black, positive_gradients, softmax=True)
    ours = A.RSIGradCAM(model, "2")(x, [1, 4, 7], steps=4, positive_gradients=positive_gradients,
                                    batch_size=3)  # 5 points per image, 3 rows per pass: pairs straddle passes
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    assert ours.amax() > 0


def test_rsi_grad_cam_with_logits_and_a_tensor_baseline(x):
    model = cam_cnn()
    base = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = rsi_grad_cam_written_out(model, x, [0, 3, 9], 3, base.expand_as(x), False, softmax=False)
    ours = A.RSIGradCAM(model, "2")(x, [0, 3, 9], steps=3, baseline=base, positive_gradients=False, score="logit")
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_rsi_grad_cam_above_a_linear_head_has_its_closed_form(x):
    """Constant gradient W_c/(h w) at "3": the sum is exact, IG = W_c/(h w) (A(x) - A(b)), so
    w_k = W_ck mean(A_k(x) - A_k(b)) / (h w), and the weights' total over positions is y(x) - y(b) (completeness)."""
    model = head_linear_net()
    classes = torch.tensor([0, 2, 4])
    base = torch.full_like(x, -0.5)
    with torch.no_grad():
        acts, acts_base = model[:4](x), model[:4](base)
        logits, logits_base = model(x), model(base)
    area = acts.shape[-2] * acts.shape[-1]
    weights = model[-1].weight[classes] * (acts - acts_base).mean(dim=(2, 3)) / area  # (B, C)
    completeness = (weights.sum(dim=1) * area).detach()
    gathered = (logits - logits_base).gather(1, classes[:, None])[:, 0]
    torch.testing.assert_close(completeness, gathered, rtol=1e-5, atol=1e-5)
    expected = F.interpolate(F.relu((weights[:, :, None, None] * acts).sum(dim=1, keepdim=True)), size=x.shape[-2:],
                             mode="bilinear", align_corners=False).detach()
    ours = A.RSIGradCAM(model, "3")(x, classes, steps=3, baseline=-0.5, score="logit", positive_gradients=False)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- shared
def test_defaults_are_the_authors_and_set_the_number_of_passes(x):
    assert A.IntegratedGradCAM.defaults["steps"] == 50 and A.IntegratedGradCAM.defaults["baseline"] == "zero"
    assert "score" not in A.IntegratedGradCAM.defaults  # the common default: the logit, as the notebook
    assert A.RSIGradCAM.defaults["steps"] == 50 and A.RSIGradCAM.defaults["baseline"] == "black"
    assert A.RSIGradCAM.defaults["positive_gradients"] is True and A.RSIGradCAM.defaults["score"] == "softmax"
    model = cam_cnn()
    for method, rows in ((A.IntegratedGradCAM, 50), (A.RSIGradCAM, 51)):
        counter = RowCounter(model)
        method(model, "2")(x[:2], [1, 2])
        counter.close()
        assert sum(counter.rows) == 2 * rows
    # the default score is what the explicit one gives
    rsi = A.RSIGradCAM(model, "2", steps=3)
    torch.testing.assert_close(rsi(x, [1, 4, 7]), rsi(x, [1, 4, 7], score="softmax"))


@pytest.mark.parametrize("method", [A.IntegratedGradCAM, A.RSIGradCAM])
def test_target_none_is_the_images_own_class(x, method):
    model = cam_cnn()
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    explainer = method(model, "2", steps=3)
    torch.testing.assert_close(explainer(x), explainer(x, classes))


@pytest.mark.parametrize("method", [A.IntegratedGradCAM, A.RSIGradCAM])
def test_create_graph_gives_the_maps_true_parameter_derivative(x, method):
    """With create_graph the maps (summed over points and path pairs across passes) are differentiable w.r.t. the
    weights below and above the layer, and their derivative is the finite difference of the maps (float64)."""
    model = cam_cnn().double()
    x = x.double()
    explainer = method(model, "2", steps=3, batch_size=5)
    maps = explainer(x, [1, 4, 7], create_graph=True)
    torch.testing.assert_close(maps.detach(), explainer(x, [1, 4, 7]))
    weights = (model[1][0].weight, model[3][0].weight)
    grads = torch.autograd.grad(maps.sum(), weights)
    for weight, grad in zip(weights, grads):
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        difference = central_difference(lambda: explainer(x, [1, 4, 7]).sum(), weight, direction)
        torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", [A.IntegratedGradCAM, A.RSIGradCAM])
def test_bad_options_name_what_is_wrong(x, method):
    explainer = method(cam_cnn(), "2", steps=2)
    cases = (({"steps": 0}, ValueError, "steps"), ({"steps": 2.5}, ValueError, "steps"),
             ({"steps": True}, ValueError, "steps"), ({"baseline": "grey"}, ValueError, "baseline"),
             ({"baseline": [0.0]}, TypeError, "baseline"), ({"layer_fusion": "sum"}, ValueError, "layer_fusion"))
    for options, error, match in cases:
        with pytest.raises(error, match=match):
            explainer(x, 1, **options)
    if method is A.RSIGradCAM:
        with pytest.raises(TypeError, match="positive_gradients"):
            explainer(x, 1, positive_gradients="yes")
