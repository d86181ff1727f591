"""DeepLIFT (Rescale) against Captum's DeepLift, summation to delta, and a linear closed form."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

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


# ------------------------------------------------------------------------------------------------ review fixes
def score_difference(model, x, baseline, classes):
    with torch.no_grad():
        rows = torch.arange(x.shape[0])
        return model(x)[rows, classes] - model(baseline)[rows, classes]


def test_float16_model_and_amp_give_finite_maps_where_image_and_baseline_tie():
    """Exact ties between image and baseline (a zero patch against the zero baseline: there every activation is
    the bias' response on both) take the plain derivative; eps=1e-10 is 0 in float16, so it is compared in float32
    (the map was NaN there)."""
    model = cam_cnn()
    torch.manual_seed(6)
    x = torch.rand(2, 3, 16, 16)
    x[:, :, 4:12, 4:12] = 0.0
    reference = A.DeepLift(model)(x, [0, 3])
    for maps in (A.DeepLift(copy.deepcopy(model).half())(x, [0, 3]),
                 A.DeepLift(model)(x, [0, 3], amp=torch.float16)):
        assert torch.isfinite(maps).all()
        torch.testing.assert_close(maps, reference, rtol=0, atol=1e-2 * float(reference.abs().max()))


def softplus_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(6 * 2 * 2, 3)).double().eval()


@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_create_graph_parameter_gradients_match_finite_differences(score):
    """With create_graph the map's derivative w.r.t. the parameters is the true one: the multipliers (and the
    softmax's saved outputs) are differentiated through the true forward, not through the rules' own backward
    (which had the wrong sign here)."""
    model = softplus_net()
    torch.manual_seed(7)
    x, baseline = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    weights = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    explainer = A.DeepLift(model, baseline=baseline, score=score)
    params = [model[0].weight, model[0].bias, model[3].weight, model[6].weight]
    grads = torch.autograd.grad((explainer(x, [0, 2], create_graph=True) * weights).sum(), params)
    step = 1e-6
    for param, grad in zip(params, grads):
        for index in [(0,) * param.dim(), tuple(s - 1 for s in param.shape)]:
            with torch.no_grad():
                param[index] += step
                up = (explainer(x, [0, 2]) * weights).sum()
                param[index] -= 2 * step
                down = (explainer(x, [0, 2]) * weights).sum()
                param[index] += step
            torch.testing.assert_close(grad[index], (up - down) / (2 * step), rtol=1e-5, atol=1e-9)


class SequenceFirst(nn.Module):
    """Image -> (L, N, D) sequence-first tokens -> ReLU MLP -> mean over tokens -> classes."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = tokens
        self.embed = nn.Linear(3 * 12 * 12 // tokens, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], self.tokens, -1).transpose(0, 1)
        return self.head(self.mlp(torch.relu(self.embed(tokens))).mean(0))


@pytest.mark.parametrize("tokens", [3, 6, 9])
def test_sequence_first_tokens_keep_summation_to_delta(tokens):
    """(L, 2n, D) tensors are split into images and baselines along their second dimension (the first split the
    tokens when L was even, and odd L skipped the rule)."""
    model = SequenceFirst(tokens).double().eval()
    torch.manual_seed(8)
    x, baseline = torch.rand(2, 3, 12, 12, dtype=torch.float64), torch.rand(2, 3, 12, 12, dtype=torch.float64)
    maps = A.DeepLift(model)(x, [0, 2], baseline=baseline)
    torch.testing.assert_close(maps.sum((1, 2, 3)), score_difference(model, x, baseline, torch.tensor([0, 2])),
                               rtol=1e-10, atol=1e-12)


def test_a_nonlinearity_without_the_batch_in_its_first_two_dimensions_is_named():
    class BatchLast(nn.Module):
        def forward(self, x):
            return torch.relu(x.permute(1, 2, 3, 0) - 0.5).sum((0, 1, 2))[:, None].repeat(1, 2)

    with pytest.warns(UserWarning, match="1 nonlinearity call"):
        A.DeepLift(BatchLast())(torch.rand(2, 3, 5, 5), 0)


class InPlaceStatements(nn.Module):
    """In-place rectifiers whose return value is dropped (``h.relu_()``, ``F.relu_``) and modules whose in-place
    flag is positional (``nn.ReLU6`` and ``nn.LeakyReLU`` pass it to ``F.hardtanh``/``F.leaky_relu`` by position)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 8))
        self.relu6, self.leaky = nn.ReLU6(inplace=True), nn.LeakyReLU(0.1, inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.convs[0](x)
        h.relu_()
        h = self.convs[1](h)
        torch.nn.functional.relu_(h)
        h = self.relu6(self.convs[2](h) * 4)
        h = self.leaky(self.convs[3](h))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("create_graph", [False, True])
def test_in_place_statements_keep_summation_to_delta(create_graph):
    """The explained function is the model itself: in-place calls write their result back into their argument."""
    model = InPlaceStatements().double().eval()
    torch.manual_seed(9)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    maps = A.DeepLift(model)(x, [0, 2], create_graph=create_graph)
    torch.testing.assert_close(maps.sum((1, 2, 3)).detach(),
                               score_difference(model, x, torch.zeros_like(x), torch.tensor([0, 2])),
                               rtol=1e-10, atol=1e-12)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operation returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_deeplift_shap_builds_its_pairs_pass_by_pass():
    """The B x N (image, reference) pairs are made batch_size // 2 at a time (all B x N copies were made first, and
    several more of them), and the map is the mean of DeepLIFT against each reference."""
    model = cam_cnn()
    torch.manual_seed(10)
    x, references = torch.randn(3, 3, 16, 16), torch.randn(24, 3, 16, 16)
    explainer = A.DeepLiftShap(model, references=references)
    with LargestTensor() as small:
        maps = explainer(x, [1, 5, 8], batch_size=4)
    with LargestTensor() as large:
        explainer(x, [1, 5, 8], batch_size=64)
    assert small.largest <= references.numel() < 3 * references.numel() <= large.largest
    one_by_one = sum(A.DeepLift(model)(x, [1, 5, 8], baseline=references[j:j + 1]) for j in range(24)) / 24
    torch.testing.assert_close(maps, one_by_one, rtol=1e-5, atol=1e-6 * float(one_by_one.abs().max()))


def test_bad_references_name_the_option():
    with pytest.raises(ValueError, match="references must be 'black'"):
        A.DeepLiftShap(cam_cnn())(torch.randn(1, 3, 16, 16), 1, references="blak")
