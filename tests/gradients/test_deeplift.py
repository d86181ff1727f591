"""DeepLIFT (Rescale) against Captum's DeepLift, summation to delta, and a linear closed form."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution as A
from conftest import LinearModel, cam_cnn

captum_attr = pytest.importorskip("captum.attr")


def pooled_net(activation: type = nn.ReLU, kernel: int = 2, stride: int = 2, adjacent: bool = False) -> nn.Module:
    """Convolutions, a nonlinearity and 2-D max pooling (right after the nonlinearity when ``adjacent``, else after
    a convolution), then a linear head (random, seeded, eval mode)."""
    torch.manual_seed(0)
    middle = [] if adjacent else [nn.Conv2d(8, 8, 3, padding=1)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), activation(), *middle,
                         nn.MaxPool2d(kernel, stride, padding=kernel // 2 if kernel % 2 else 0),
                         nn.Conv2d(8, 8, 3, padding=1), activation(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("build", [cam_cnn, lambda: pooled_net(), lambda: pooled_net(nn.Sigmoid),
                                   lambda: pooled_net(nn.Tanh), lambda: pooled_net(nn.ELU),
                                   lambda: pooled_net(nn.LeakyReLU)],
                         ids=["cam_cnn", "relu_maxpool", "sigmoid", "tanh", "elu", "leaky_relu"])
def test_deeplift_equals_captums(build):
    """Where Captum's module hooks compose (no nonlinearity next to a max pool) and pooling windows do not overlap,
    the two are the same computation."""
    model = build()
    torch.manual_seed(1)
    x, baseline = torch.randn(3, 3, 16, 16), 0.1 * torch.randn(3, 3, 16, 16)
    classes = torch.tensor([0, 2, 4])
    ours = A.DeepLift(model)(x, classes, baseline=baseline)
    theirs = captum_attr.DeepLift(model).attribute(x, baselines=baseline, target=classes).detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Sigmoid, nn.ELU])
@pytest.mark.parametrize("kernel, stride", [(2, 2), (3, 2), (3, 1)])
def test_max_pooling_keeps_summation_to_delta(activation, kernel, stride):
    """Max pooling right after a nonlinearity, overlapping windows included: the attributions still add up to the
    score difference (Captum's do not there: its maxpool fallback takes the batch's first gradient, captum#1276,
    and max_unpool2d keeps one of several overlapping windows' contributions)."""
    model = pooled_net(activation, kernel, stride, adjacent=True)
    torch.manual_seed(1)
    x, baseline = torch.randn(3, 3, 16, 16), 0.1 * torch.randn(3, 3, 16, 16)
    classes = torch.tensor([0, 2, 4])
    maps = A.DeepLift(model)(x, classes, baseline=baseline)
    with torch.no_grad():
        delta = model(x)[[0, 1, 2], classes] - model(baseline)[[0, 1, 2], classes]
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Softplus])
def test_attributions_sum_to_the_score_difference(activation):
    """Summation to delta holds for linear layers and elementwise nonlinearities, whichever they are (Captum passes
    ReLU6, GELU and SiLU modules with their plain gradient, which breaks it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), activation(), nn.Conv2d(6, 6, 3, stride=2), activation(),
                          nn.Flatten(), nn.Linear(6 * 7 * 7, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    maps = A.DeepLift(model)(x, [1, 3], baseline="black")
    reference = A.gradients.paths.make_baseline(x, "black")
    with torch.no_grad():
        delta = model(x)[[0, 1], [1, 3]] - model(reference)[[0, 1], [1, 3]]
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


def test_on_a_linear_model_it_is_the_input_difference_times_the_weights():
    model = LinearModel()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    maps = A.DeepLift(model)(x, [0, 3], baseline=0.5)
    weights = model.linear.weight[[0, 3]].view(2, 3, 8, 8)
    torch.testing.assert_close(maps, ((x - 0.5) * weights).detach(), rtol=1e-5, atol=1e-7)


def test_inplace_activations_are_left_as_they_were():
    model = pooled_net()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    inplace = A.DeepLift(model)(x, [1, 2])
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    torch.testing.assert_close(inplace, A.DeepLift(model)(x, [1, 2]))


def test_create_graph_through_max_pooling_gives_finite_parameter_gradients():
    """The max-pool rule divides by the input difference only where it is not 0, so a double backward stays finite
    where image and baseline agree (ReLU outputs that are 0 on both)."""
    model = pooled_net(adjacent=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    maps = A.DeepLift(model)(x, [0, 3], create_graph=True)
    grads = torch.autograd.grad(maps.square().sum(), list(model.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(maps.detach(), A.DeepLift(model)(x, [0, 3]))


def test_bad_eps_names_the_option():
    with pytest.raises(ValueError, match="eps"):
        A.DeepLift(cam_cnn())(torch.randn(1, 3, 16, 16), 1, eps=-1.0)


def test_deeplift_shap_equals_captums_and_sums_to_the_mean_difference():
    model = cam_cnn()
    torch.manual_seed(4)
    x, references = torch.randn(3, 3, 16, 16), 0.2 * torch.randn(4, 3, 16, 16)
    classes = torch.tensor([1, 5, 8])
    ours = A.DeepLiftShap(model)(x, classes, references=references, batch_size=5)
    theirs = captum_attr.DeepLiftShap(model).attribute(x, baselines=references, target=classes).detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()))
    with torch.no_grad():
        delta = model(x)[[0, 1, 2], classes] - model(references)[:, classes].mean(dim=0)
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), delta, rtol=1e-4, atol=1e-5)


def test_deeplift_shap_with_one_reference_per_image_is_deeplift():
    model = cam_cnn()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(A.DeepLiftShap(model)(x, [0, 1], references="black"),
                               A.DeepLift(model)(x, [0, 1], baseline="black"))
