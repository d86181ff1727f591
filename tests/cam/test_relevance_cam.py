"""Relevance-CAM against zennit's relevance at the layer (its rules on the same model, CLRP's contrast as the
output relevance), conservation, and its errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from attribution.cam.relevance_cam import contrastive_target
from attribution.core.targets import Target

zennit = pytest.importorskip("zennit")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonPlus, LayerMapComposite, layer_map_base  # noqa: E402
from zennit.rules import AlphaBeta  # noqa: E402
from zennit.types import Linear  # noqa: E402


def vgg_like(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 6),
    ).double().eval()


def zennit_relevance_cam(model: nn.Module, x: torch.Tensor, classes, layer: int, composite, contrastive: bool):
    """The map from zennit's relevance at ``model[layer]``'s output (kept by a hook; zennit's rules make the
    backward carry relevance), the output relevance being the one-hot minus 1/K elsewhere (CLRP) or the one-hot."""
    model = copy.deepcopy(model)
    kept = {}

    def keep(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    handle = model[layer].register_forward_hook(keep)
    k = model(x).shape[1]
    onehot = torch.eye(k, dtype=x.dtype)[classes]
    start = onehot - (1 - onehot) / k if contrastive else onehot
    with Gradient(model, composite) as attributor:
        attributor(x.clone().requires_grad_(True), start)
    handle.remove()
    activation, relevance = kept["a"].detach(), kept["a"].grad
    weights = relevance.sum(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


ZPLUS = LayerMapComposite(layer_map_base() + [(Linear, AlphaBeta(1.0, 0.0))])


@pytest.mark.parametrize("layer", [4, 7])
@pytest.mark.parametrize("contrastive", [True, False])
def test_equals_the_map_from_zennits_relevance(layer, contrastive):
    model, classes = vgg_like(), [1, 4, 0]
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    theirs = zennit_relevance_cam(model, x, classes, layer, ZPLUS, contrastive)
    ours = attribution.RelevanceCAM(model, target_layer=model[layer])(x, classes, contrastive=contrastive)
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_other_composites_equal_zennits():
    model, classes = vgg_like(seed=2), [2, 3]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theirs = zennit_relevance_cam(model, x, classes, 4, EpsilonPlus(), True)
    ours = attribution.RelevanceCAM(model, target_layer="4", composite="epsilon_plus")(x, classes)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_weights_are_conserved_relevance_on_a_bias_free_relu_net():
    """z+ on a bias-free ReLU net conserves relevance: the channel weights sum to the start relevance, 1 for the
    one-hot and 1 - (K - 1)/K = 1/K for the contrast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4, bias=False)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cam = attribution.RelevanceCAM(model, target_layer="3", stabilizer=1e-12)
    seen = {}
    original = cam._weights

    def spy(activations, gradients, **options):
        seen["w"] = original(activations, gradients, **options)
        return seen["w"]

    cam._weights = spy
    cam(x, [1, 2], contrastive=False)
    torch.testing.assert_close(seen["w"].sum(dim=(1, 2, 3)), torch.ones(2, dtype=torch.float64))
    cam(x, [1, 2])
    torch.testing.assert_close(seen["w"].sum(dim=(1, 2, 3)), torch.full((2,), 0.25, dtype=torch.float64))


def test_contrast_is_the_score_against_the_mean_of_the_others():
    scores = torch.tensor([[1.0, 4.0, -2.0, 0.5], [3.0, 0.0, 1.0, 1.0]])
    owners = torch.arange(2)
    by_class = contrastive_target(Target(2, classes=torch.tensor([1, 0])))(scores, owners)
    torch.testing.assert_close(by_class, torch.tensor([4.0 - (1.0 - 2.0 + 0.5) / 4, 3.0 - 2.0 / 4]))
    torch.testing.assert_close(contrastive_target(Target(2))(scores, owners), by_class)  # None: the arg-max


def test_callable_targets_need_contrastive_off():
    model = vgg_like()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="class indices"):
        attribution.RelevanceCAM(model)(x, lambda s: s[:, 0])
    plain = attribution.RelevanceCAM(model)(x, lambda s: s[:, 2], contrastive=False)
    torch.testing.assert_close(plain, attribution.RelevanceCAM(model)(x, 2, contrastive=False))
    with pytest.raises(TypeError, match="contrastive must be a bool"):
        attribution.RelevanceCAM(model)(x, 0, contrastive="yes")
    with pytest.raises(ValueError, match="unknown composite"):
        attribution.RelevanceCAM(model)(x, 0, composite="plus")
