"""LRP against zennit (the reference implementation: every composite, a VGG-like net with and without batch norm, a
torchvision ResNet-18), conservation, the sign of z+, Captum's scaling, the model left as found, and exact second
derivatives under create_graph."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.gradients.input_x_gradient import InputXGradient
from attribution.gradients.lrp import COMPOSITES, LRP
from conftest import central_difference, lrp_resnet18

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")
from zennit.attribution import Gradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonAlpha2Beta1Flat, EpsilonGammaBox, EpsilonPlus,  # noqa: E402
                               EpsilonPlusFlat, LayerMapComposite, SpecialFirstLayerMapComposite, layer_map_base)
from zennit.rules import AlphaBeta, Epsilon, Gamma, WSquare  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402
from zennit.types import Convolution, Linear  # noqa: E402

ZENNIT = {
    "epsilon_plus_flat": lambda canonizers, low, high: EpsilonPlusFlat(canonizers=canonizers),
    "epsilon_gamma_box": lambda canonizers, low, high: EpsilonGammaBox(low=low, high=high, canonizers=canonizers),
    "epsilon_plus": lambda canonizers, low, high: EpsilonPlus(canonizers=canonizers),
    "epsilon_alpha2_beta1": lambda canonizers, low, high: EpsilonAlpha2Beta1(canonizers=canonizers),
    "epsilon_alpha2_beta1_flat": lambda canonizers, low, high: EpsilonAlpha2Beta1Flat(canonizers=canonizers),
    # zennit has no named composite for epsilon everywhere: its rule on every convolution and dense layer
    "epsilon": lambda canonizers, low, high: LayerMapComposite(layer_map_base() + [(Linear, Epsilon())],
                                                               canonizers=canonizers),
    # nor for z+ everywhere (Relevance-CAM's): alpha1-beta0 on every convolution and dense layer
    "zplus": lambda canonizers, low, high: LayerMapComposite(layer_map_base() + [(Linear, AlphaBeta(1.0, 0.0))],
                                                             canonizers=canonizers),
}


def vgg_like(batch_norm: bool = False, seed: int = 0) -> nn.Sequential:
    """Convolutions, ReLU and ReLU6 (which clips here: the pass rule matters), max, average and adaptive average
    pooling, two dense layers; optionally a batch norm after each convolution, merged by zennit's canonizer, and one
    after a ReLU, which it is not.  Float64, so that only the methods differ.

    The merged batch norms have ``eps = 0``: zennit folds them into the convolution and leaves them computing
    ``x / sqrt(1 + eps)``, not quite the identity (an ``eps / 2`` relative shift per layer that its maps carry);
    folding with a non-zero ``eps`` is checked against a hand-folded model below."""
    torch.manual_seed(seed)

    def norm(channels: int, merged: bool = True) -> list:
        return [nn.BatchNorm2d(channels, eps=0.0 if merged else 1e-5)] if batch_norm else []

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), *norm(8), nn.ReLU(), *norm(8, merged=False), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), *norm(12), nn.ReLU6(), nn.AvgPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1), *norm(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 6),
    ).double()
    with torch.no_grad():
        model[3 if not batch_norm else 5].weight.mul_(12.0)  # the second convolution: ReLU6 clips
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def zennit_lrp(model: nn.Module, x: torch.Tensor, classes, composite: str, canonizers=None, low=None, high=None):
    """zennit's relevance: its Gradient attributor with the composite and a one-hot output relevance (on a copy:
    zennit's canonizers edit the model while they run)."""
    model = copy.deepcopy(model)
    make = ZENNIT[composite] if isinstance(composite, str) else composite
    onehot = torch.eye(model(x).shape[1], dtype=x.dtype)[classes]
    with Gradient(model, make(canonizers, low, high)) as attributor:
        _, relevance = attributor(x.clone(), onehot)
    return relevance


def extremes(x: torch.Tensor):
    """Our default z^B box: each image's minimum and maximum."""
    return x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)


def assert_equal_to(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to 1e-5, relative to each element and to the map's largest relevance."""
    scale = float(theirs.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16, dtype=torch.float64)


def test_the_toy_exercises_every_rule(x):
    """The second convolution's outputs exceed 6, so ReLU6 clips (where the pass rule and the gradient differ)."""
    model = vgg_like()
    assert model[3].weight.shape[0] == 12 and isinstance(model[4], nn.ReLU6)
    before = model[:4](x)
    assert (before > 6).float().mean() > 0.05 and ((before > 0) & (before < 6)).float().mean() > 0.05


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_equals_zennit_on_a_vgg_like_net(composite, x):
    model, classes = vgg_like(), [1, 4, 0]
    ours = LRP(model, composite=composite)(x, classes)
    assert_equal_to(ours, zennit_lrp(model, x, classes, composite, None, *extremes(x)))


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_batch_norm_is_folded_as_zennits_sequential_merge(composite, x):
    """Batch norms after convolutions are merged into them (and the one after a ReLU passes the relevance), as
    zennit's SequentialMergeBatchNorm canonizer makes it, without touching the model."""
    model, classes = vgg_like(batch_norm=True), [2, 5, 3]
    ours = LRP(model, composite=composite)(x, classes)
    assert_equal_to(ours, zennit_lrp(model, x, classes, composite, [SequentialMergeBatchNorm()], *extremes(x)))


def test_folding_uses_the_batch_norms_eps_and_affine_parameters(x):
    """With ``eps = 1e-2``, the maps equal those of the same net with each batch norm folded by hand into the
    convolution before it (``W gamma / sqrt(var + eps)``, ``(b - mean) gamma / sqrt(var + eps) + beta``)."""
    model = vgg_like(batch_norm=True)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv, norm in ((folded[0], folded[1]), (folded[5], folded[6]), (folded[9], folded[10])):
            norm.eps = 1e-2
            scale = norm.weight / (norm.running_var + norm.eps).sqrt()
            conv.bias.copy_((conv.bias - norm.running_mean) * scale + norm.bias)
            conv.weight.mul_(scale[:, None, None, None])
    for i in (1, 6, 10):
        model[i].eps = 1e-2
        folded[i] = nn.Identity()
    assert_equal_to(model(x), folded(x))
    for composite in ("epsilon_gamma_box", "epsilon"):
        assert_equal_to(LRP(model, composite=composite)(x, [0, 1, 2]), LRP(folded, composite=composite)(x, [0, 1, 2]))


def test_custom_composites_and_options_equal_zennits(x):
    """A mapping of rules (w^2 on the first layer, gamma on convolutions, alpha-beta on dense layers) with
    non-default gamma, alpha and beta; and z^B with per-pixel bounds given as a (B, C, H, W) tensor, one image per
    pass (each pass takes its images' bounds)."""
    model, classes = vgg_like(), [3, 0, 5]
    ours = LRP(model, composite={"first": "wsquare", "conv": "gamma", "linear": "alpha_beta"}, gamma=0.5, alpha=3.0,
               beta=2.0)(x, classes)
    theirs = zennit_lrp(model, x, classes, lambda canonizers, low, high: SpecialFirstLayerMapComposite(
        layer_map_base() + [(Convolution, Gamma(gamma=0.5)), (nn.Linear, AlphaBeta(alpha=3.0, beta=2.0))],
        first_map=[(Linear, WSquare())]))
    assert_equal_to(ours, theirs)
    torch.manual_seed(2)
    low, high = x - torch.rand_like(x), x + torch.rand_like(x)
    ours = LRP(model, composite="epsilon_gamma_box", low=low, high=high)(x, classes, batch_size=1)
    assert_equal_to(ours, zennit_lrp(model, x, classes, "epsilon_gamma_box", None, low, high))
    channel = torch.tensor([-2.0, -1.5, -2.5], dtype=torch.float64).view(1, 3, 1, 1)
    ours = LRP(model, composite="epsilon_gamma_box", low=channel, high=3.0)(x, classes)
    assert_equal_to(ours, zennit_lrp(model, x, classes, "epsilon_gamma_box", None, channel, 3.0))


@pytest.fixture(scope="module")
def resnet():
    """torchvision's ResNet-18, random weights and batch-norm statistics (``eps = 0``, see :func:`vgg_like`)."""
    return lrp_resnet18(7)


@pytest.mark.parametrize("composite", sorted(COMPOSITES))
def test_equals_zennit_with_its_resnet_canonizer(composite, resnet):
    """Residual sums (torchvision's ``out += identity``) share the relevance in proportion to the summands, batch
    norms are merged into their convolutions (the stem's and the downsampling paths' too): zennit's
    ResNetCanonizer, here without changing the blocks' forward."""
    torch.manual_seed(3)
    x, classes = torch.randn(2, 3, 32, 32, dtype=torch.float64), [3, 5]
    ours = LRP(resnet, composite=composite)(x, classes)
    assert_equal_to(ours, zennit_lrp(resnet, x, classes, composite, [ResNetCanonizer()], *extremes(x)))


def bias_free_relu_net() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(12, 16, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 5, bias=False)).double().eval()


def test_epsilon_conserves_the_unit_start_relevance_and_is_input_times_gradient(x):
    """LRP-epsilon on a bias-free ReLU net: the one-hot start relevance is conserved (the map sums to 1, up to eps),
    and the map times the target's logit is gradient x input (LRP-0 = gradient x input on such nets)."""
    model, classes = bias_free_relu_net(), [0, 3, 4]
    maps = LRP(model, composite="epsilon", eps=1e-12, stabilizer=1e-12)(x, classes)
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(3, dtype=torch.float64), rtol=1e-7, atol=1e-7)
    logits = model(x)[torch.arange(3), classes].detach()
    product = InputXGradient(model)(x, classes)
    torch.testing.assert_close(maps * logits.view(-1, 1, 1, 1), product, rtol=1e-6,
                               atol=1e-6 * float(product.abs().max()))


def test_zplus_relevance_is_non_negative_and_conserved_on_relu_nets(x):
    """z+ everywhere: each layer hands on only positive shares of a positive start relevance, so the map is
    non-negative; without biases (nothing absorbs relevance) it sums to 1 (up to the stabiliser)."""
    zplus = {"conv": "zplus", "linear": "zplus"}
    maps = LRP(vgg_like(), composite=zplus)(x, [1, 4, 0])
    assert (maps >= 0).all() and (maps > 0).float().mean() > 0.3
    maps = LRP(bias_free_relu_net(), composite=zplus, stabilizer=1e-12)(x, [0, 3, 4])
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=1e-5)


class CaptumNet(nn.Module):
    """Convolutions, ReLU, average pooling and a dense layer, flattened in the forward (Captum's LRP has no rule
    for ``nn.Flatten``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                                      nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_captums_lrp_is_ours_times_the_logit(x):
    """Captum's LRP (epsilon rule, eps=1e-9, everywhere) starts from the logit's value, we from the one-hot."""
    captum_attr = pytest.importorskip("captum.attr")
    model, classes = CaptumNet().double().eval(), [1, 4, 0]
    theirs = captum_attr.LRP(model).attribute(x, target=torch.tensor(classes))
    ours = LRP(model, composite="epsilon", eps=1e-9, stabilizer=1e-9)(x, classes)
    logits = model(x)[torch.arange(3), classes].detach()
    assert_equal_to(ours * logits.view(-1, 1, 1, 1), theirs)


def snapshot(model: nn.Module) -> dict:
    return {"training": [m.training for m in model.modules()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "grad": [p.grad for p in model.parameters()],
            "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
                      for m in model.modules()],
            "modules": [(name, m, type(m).forward) for name, m in model.named_modules()],
            "forwards": [m.__dict__.get("forward") for m in model.modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_the_model_is_left_as_found(composite, x):
    """No canonizer, no hook: parameters, buffers, flags, hooks and forwards are untouched (a model in train mode,
    with a hook, a frozen layer and a stale .grad), and no function mode stays active."""
    model = vgg_like(batch_norm=True).train()
    model[0].weight.requires_grad_(False)
    model[-1].weight.grad = torch.ones_like(model[-1].weight)
    model[2].register_forward_hook(lambda *args: None)
    before = snapshot(model)
    LRP(model, composite=composite)(x, [0, 1, 2])
    LRP(model, composite=composite)(x, [0, 1, 2], create_graph=True)
    after = snapshot(model)
    assert after["training"] == before["training"] and after["requires_grad"] == before["requires_grad"]
    assert all(a is b for a, b in zip(after["grad"], before["grad"]))
    assert after["hooks"] == before["hooks"] and after["modules"] == before["modules"]
    assert after["forwards"] == before["forwards"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_create_graph_gives_the_maps_true_derivative_wrt_the_parameters(composite, x):
    """With create_graph the map is differentiable w.r.t. every parameter (batch norms' included), and its
    derivative is the true one: the directional derivative equals a central finite difference (float64)."""
    model = vgg_like(batch_norm=True)
    params = [p for p in model.parameters()]
    torch.manual_seed(6)
    directions = [torch.randn_like(p) for p in params]
    weights = torch.randn_like(x)
    explainer = LRP(model, composite=composite)
    maps = explainer(x, [0, 1, 2], create_graph=True)
    assert maps.requires_grad
    torch.testing.assert_close(maps.detach(), explainer(x, [0, 1, 2]))
    grads = torch.autograd.grad((maps * weights).sum(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    derivative = sum((g * d).sum() for g, d in zip(grads, directions))

    def shifted(step: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(step * d)
            value = (explainer(x, [0, 1, 2]) * weights).sum()
            for p, d in zip(params, directions):
                p.sub_(step * d)
        return value

    difference = (shifted(1e-6) - shifted(-1e-6)) / 2e-6
    torch.testing.assert_close(derivative, difference, rtol=1e-5, atol=1e-8)


def test_bad_options_are_named(x):
    model = vgg_like()
    explainer = LRP(model)
    with pytest.raises(ValueError, match="unknown composite 'epsilon_flat'"):
        explainer(x, 0, composite="epsilon_flat")
    with pytest.raises(ValueError, match="unknown rule 'zminus' for 'conv'"):
        explainer(x, 0, composite={"conv": "zminus"})
    with pytest.raises(ValueError, match="keys 'first', 'conv' and 'linear'"):
        explainer(x, 0, composite={"dense": "epsilon"})
    with pytest.raises(ValueError, match="eps must be a positive number"):
        explainer(x, 0, eps=0.0)
    with pytest.raises(ValueError, match="stabilizer must be a positive number"):
        explainer(x, 0, stabilizer=-1e-6)
    with pytest.raises(ValueError, match="gamma must be a non-negative number"):
        explainer(x, 0, gamma=-0.25)
    with pytest.raises(ValueError, match="alpha - beta must equal 1"):
        explainer(x, 0, composite="epsilon_alpha2_beta1", alpha=2.0, beta=2.0)
    with pytest.raises(ValueError, match="low must not exceed high"):
        explainer(x, 0, composite="epsilon_gamma_box", low=1.0, high=-1.0)
    with pytest.raises(ValueError, match="does not broadcast to the first layer's input"):
        explainer(x, 0, composite="epsilon_gamma_box", low=torch.zeros(4, 1, 1, dtype=torch.float64))


class SkipNet(nn.Module):
    """A residual sum whose second summand is computed from the first (``h + conv(h)``), then ``+=``, as ResNets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem, self.branch, self.other = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.branch(h)
        out = self.other(h)
        out += h
        return self.head(torch.relu(out).mean(dim=(2, 3)))


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon"])
def test_create_graph_derivative_through_residual_sums(composite):
    """A residual sum's plain derivative (used once the relevance pass is done) is its own, not the total one
    through the summand computed from the other."""
    model = SkipNet().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    explainer = LRP(model, composite=composite, eps=0.25, stabilizer=0.25)  # no near-zero denominators
    maps = explainer(x, [0, 2], create_graph=True)
    torch.testing.assert_close(maps.detach(), explainer(x, [0, 2]))
    weight = model.stem.weight
    (grad,) = torch.autograd.grad(maps.sum(), weight)
    direction = torch.randn_like(weight)
    difference = central_difference(lambda: explainer(x, [0, 2]).sum(), weight, direction)
    torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-5, atol=1e-8)


def test_layer_and_group_norms_pass_relevance_unchanged():
    """LRP through ConvNeXt-style layer norms (and group norms): the norm passes relevance unchanged, as an unfolded
    batch norm does, so LRP-epsilon on a bias-free net with norms conserves the unit start relevance (before, the
    norms kept their plain gradient and the maps summed to 1e-6..1e-9 on torchvision's ConvNeXt)."""
    generator = torch.Generator().manual_seed(0)

    class NormNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.norm1 = nn.GroupNorm(2, 8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.norm2 = nn.LayerNorm(8)
            self.head = nn.Linear(8, 5, bias=False)
            for module in (self.norm1, self.norm2):
                module.weight.data = torch.rand(8, generator=generator) + 0.5
                module.bias.data.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.norm1(self.conv1(x)))
            x = self.norm2(self.conv2(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last LayerNorm
            return self.head(F.relu(x).mean((2, 3)))

    model = NormNet().double().eval()
    images = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    maps = LRP(model, composite="epsilon", eps=1e-12, stabilizer=1e-12)(images, [1, 4])
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64), rtol=1e-7, atol=1e-7)
