"""FEM, ShapleyCAM and the RandomCAM baseline against plain re-computations; the ReST score."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.base import upsample
from attribution.core.targets import apply_score
from conftest import cam_cnn, check_parameter_derivative, tiny_cnn


@pytest.fixture
def x():
    torch.manual_seed(7)
    return torch.randn(3, 3, 32, 32)


def head_and_tail(model: nn.Sequential, cut: int):
    return model[:cut + 1], model[cut + 1:]


# ---------------------------------------------------------------------------------------------------------- FEM
def test_fem_is_the_k_sigma_formula(x):
    model = cam_cnn()
    acts = model[:3](x).detach()
    flat = acts.flatten(2)
    threshold = flat.mean(2) + 2 * flat.var(2, unbiased=False).sqrt()
    weights = (flat > threshold[..., None]).float().mean(2)
    expected = upsample(F.relu((weights[..., None, None] * acts).sum(1, keepdim=True)), x.shape[-2:])
    torch.testing.assert_close(A.FEM(model, "2")(x, [0, 1, 2]), expected)
    k3 = (flat > (flat.mean(2) + 3 * flat.std(2, unbiased=False))[..., None]).float().mean(2)
    torch.testing.assert_close(A.FEM(model, "2", k=3)(x, 0),
                               upsample(F.relu((k3[..., None, None] * acts).sum(1, keepdim=True)), x.shape[-2:]))


def test_fem_ignores_the_target(x):
    model = cam_cnn()
    torch.testing.assert_close(A.FEM(model, "2")(x, 0), A.FEM(model, "2")(x, [4, 5, 6]))


# --------------------------------------------------------------------------------------------------- ShapleyCAM
def test_rest_score_is_the_logit_minus_the_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    classes = torch.arange(6).expand(4, 6)
    expected = logits - F.cross_entropy(logits.repeat_interleave(6, 0), classes.flatten(), reduction="none").view(4, 6)
    torch.testing.assert_close(apply_score(logits, "rest"), expected)


def shapley_by_hand(model, cut, x, classes, score):
    """``ReLU(sum_k mean_ij(g - H A / 2)_k A_k)`` with H A from torch.autograd.functional.hvp on the split model."""
    head, tail = head_and_tail(model, cut)
    acts = head(x).detach()
    rows = torch.arange(x.shape[0])

    def total(a):
        return apply_score(tail(a), score)[rows, classes].sum()

    grads = torch.autograd.functional.vjp(total, acts)[1]
    hvp = torch.autograd.functional.hvp(total, acts, acts)[1]
    weights = (grads - 0.5 * hvp).mean((2, 3), keepdim=True)
    return upsample(F.relu((weights * acts).sum(1, keepdim=True)), x.shape[-2:]), hvp


def test_shapley_cam_on_a_relu_head_with_logits_is_grad_cam(x):
    """Between the layer and the logits a ReLU net is piecewise linear: the Hessian term vanishes."""
    model = cam_cnn()
    torch.testing.assert_close(A.ShapleyCAM(model, "2")(x, [0, 1, 2]), A.GradCAM(model, "2")(x, [0, 1, 2]))


@pytest.mark.parametrize("activation, score", [(nn.ReLU, "rest"), (nn.SiLU, "logit"), (nn.GELU, "softmax")])
def test_shapley_cam_is_the_second_order_formula(x, activation, score):
    model = tiny_cnn(activation=activation)
    classes = torch.tensor([0, 3, 4])
    expected, hvp = shapley_by_hand(model, 3, x, classes, score)
    assert hvp.abs().amax() > 1e-3 * expected.abs().amax()  # the Hessian term is not negligible here
    mine = A.ShapleyCAM(model, "3", score=score)(x, classes)
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(mine, A.GradCAM(model, "3", score=score)(x, classes), rtol=1e-3)


def test_shapley_cam_double_backward_through_in_place_relus():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    inplace = A.ShapleyCAM(model, "layer3", score="rest")(x, [1, 2])
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    torch.testing.assert_close(A.ShapleyCAM(model, "layer3", score="rest")(x, [1, 2]), inplace)
    assert not torch.allclose(inplace, A.GradCAM(model, "layer3", score="rest")(x, [1, 2]), rtol=1e-3)


def smooth_double_cnn():
    """tiny_cnn with SiLU in float64: the Hessian term is large at every layer, finite differences are exact."""
    return tiny_cnn(activation=nn.SiLU).double()


def test_shapley_cam_create_graph_equals_finite_differences_below_and_above_the_layer():
    """``d map / d theta`` keeps ``H dA/d theta`` (the vector of the Hessian product depends on the parameters below
    the layer): central differences agree for parameters below the layer ("0", "2") and above it ("4")."""
    model = smooth_double_cnn()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def value(create_graph):
        return A.ShapleyCAM(model, "3", score="rest")(x, [1, 2], create_graph=create_graph)

    check_parameter_derivative(value, model, ["0.weight", "2.weight", "2.bias", "4.weight"], rtol=1e-6)


@pytest.mark.parametrize("score", ["rest", "logit"])
def test_shapley_cam_layers_together_equal_each_layer_alone(score):
    """Each layer's Hessian product is its own: with several layers each layer's map equals that layer explained
    alone (no cross-layer terms from one backward of the summed products)."""
    model = smooth_double_cnn()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    alone = [A.ShapleyCAM(model, layer, score=score)(x, [1, 2]) for layer in ("1", "3")]
    both = A.ShapleyCAM(model, ["1", "3"], score=score)
    torch.testing.assert_close(both(x, [1, 2]), (alone[0] + alone[1]) / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(both(x, [1, 2], layer_fusion="max"), torch.maximum(*alone), rtol=1e-10, atol=1e-12)
    expected, hvp = shapley_by_hand(model, 1, x, torch.tensor([1, 2]), score)  # layer "1" against the formula
    assert hvp.abs().amax() > 1e-2 * expected.abs().amax()
    torch.testing.assert_close(alone[0], expected, rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- RandomCAM
def test_random_cam_is_a_registered_baseline_not_a_cam():
    assert "random_cam" in A.list_methods("baseline") and "random_cam" not in A.list_methods("cam")


def test_random_cam_weights(x):
    model = cam_cnn()
    acts = model[:3](x).detach()
    draws = torch.rand(1, acts.shape[1], generator=torch.Generator().manual_seed(5))
    expected = upsample(F.relu(((2 * draws - 1)[..., None, None] * acts).sum(1, keepdim=True)), x.shape[-2:])
    torch.testing.assert_close(A.RandomCAM(model, "2", seed=5)(x, [0, 1, 2]), expected)
    torch.testing.assert_close(A.RandomCAM(model, "2", seed=5)(x, 9), expected)  # the target plays no part
    torch.manual_seed(0)
    first = A.RandomCAM(model, "2")(x)
    assert not torch.allclose(first, A.RandomCAM(model, "2")(x))  # fresh draws without a seed
    with pytest.raises(TypeError, match="seed must be an int"):
        A.RandomCAM(model, "2", seed=1.5)(x)
