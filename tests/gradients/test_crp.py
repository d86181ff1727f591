"""CRP against zennit (its LRP with the layer's other channels zeroed, one image at a time: a hook on the layer's
output in one pass, and zennit-crp's two-step pass where a shortcut goes around the layer), completeness over the
channels, the ranking against an explicit sort of the layer's relevances, conservation, batch independence, bad
options and exact derivatives under create_graph."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from attribution.core.layers import default_layer
from attribution.gradients.crp import CRP
from attribution.gradients.lrp import LRP
from conftest import check_parameter_derivative, lrp_resnet18, tiny_vit

zennit = pytest.importorskip("zennit")
torchvision = pytest.importorskip("torchvision")
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402

ZENNIT = {
    "epsilon_plus_flat": lambda canonizers, low, high: EpsilonPlusFlat(canonizers=canonizers),
    "epsilon_gamma_box": lambda canonizers, low, high: EpsilonGammaBox(low=low, high=high, canonizers=canonizers),
}


def small_net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """Convolutions, ReLU, max and average pooling, two dense layers; float64 (only the methods differ)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 10, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(10, 12, 3, padding=1, bias=bias), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(48, 16, bias=bias), nn.ReLU(), nn.Linear(16, 5, bias=bias),
    ).double().eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    """torchvision's ResNet-18 (5 classes), random weights and batch-norm statistics (see
    :func:`conftest.lrp_resnet18`)."""
    return lrp_resnet18(5)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16, dtype=torch.float64)


def keep_mask(channels, count: int) -> torch.Tensor:
    """(count,) 0/1: the channels kept."""
    mask = torch.zeros(count, dtype=torch.float64)
    mask[list(channels)] = 1.0
    return mask


def zennit_hooked(model, image, cls, layer: str, channels, composite="epsilon_plus_flat", canonizers=None):
    """zennit's LRP of one image (its Gradient attributor, one-hot start) with a hook on the layer's output that
    zeroes the gradient (the relevance) of every channel not in ``channels``; on a copy of the model."""
    model = copy.deepcopy(model)
    onehot = torch.eye(model(image).shape[1], dtype=image.dtype)[[cls]]
    low, high = image.min(), image.max()

    def mask_output(module, inputs, output):  # registered after zennit's hooks: on the output the rest uses
        output.register_hook(lambda grad: grad * keep_mask(channels, grad.shape[1]).view(1, -1, 1, 1))

    with Gradient(model, ZENNIT[composite](canonizers, low, high)) as attributor:
        handle = dict(model.named_modules())[layer].register_forward_hook(mask_output)
        _, relevance = attributor(image.clone(), onehot)
        handle.remove()
    return relevance


def zennit_two_step(model, image, cls, layer: str, channels=None, canonizers=None):
    """zennit-crp's default pass (exclude_parallel=True), one image: zennit's relevance down to the layer's output,
    masked to ``channels`` (None: kept whole), then on from the layer's output to the input.  Returns (map, the
    relevance at the layer)."""
    model = copy.deepcopy(model)
    composite = ZENNIT["epsilon_plus_flat"](canonizers, None, None)
    captured = []
    with composite.context(model) as modified:
        handle = dict(modified.named_modules())[layer].register_forward_hook(
            lambda module, inputs, output: captured.append(output))
        image = image.clone().requires_grad_(True)
        out = modified(image)
        handle.remove()
        onehot = torch.eye(out.shape[1], dtype=image.dtype)[[cls]]
        (relevance,) = torch.autograd.grad(out, captured[-1], onehot, retain_graph=True)
        mask = torch.ones(relevance.shape[1], dtype=image.dtype) if channels is None \
            else keep_mask(channels, relevance.shape[1])
        (heatmap,) = torch.autograd.grad(captured[-1], image, relevance * mask.view(1, -1, 1, 1))
    return heatmap, relevance


def assert_equal_to(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to 1e-5, relative to each element and to the largest value."""
    scale = float(theirs.detach().abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def test_defaults_are_lrps_and_the_authors():
    """LRP's options and defaults (zennit's), the default layer rule, the most relevant channel, and k=6 (the six
    concepts of the authors' tutorial)."""
    assert CRP.defaults == {**LRP.defaults, "layer": None, "channels": None}
    assert CRP.defaults["composite"] == "epsilon_plus_flat"
    assert inspect.signature(CRP.concepts).parameters["k"].default == 6
    assert CRP.name == "crp" and CRP.kind == "gradient"


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_equals_zennit_with_the_layers_other_channels_masked(composite, x):
    """An int, a list (their union) and a (B, k) tensor of channels, at a convolution and a ReLU's output, equal
    zennit's LRP with the other channels' relevance zeroed at the layer's output, image by image."""
    model, classes = small_net(), [1, 4, 0]
    per_image = torch.tensor([[2, 7], [0, 9], [5, 5]])
    for layer, channels in (("3", 4), ("3", [1, 6, 8]), ("4", per_image)):
        ours = CRP(model, layer=layer, composite=composite)(x, classes, channels=channels)
        rows = per_image.tolist() if isinstance(channels, torch.Tensor) else \
            [[channels] if isinstance(channels, int) else channels] * 3
        theirs = torch.cat([zennit_hooked(model, x[i:i + 1], c, layer, rows[i], composite)
                            for i, c in enumerate(classes)])
        assert_equal_to(ours, theirs)


def test_equals_zennit_on_a_resnet_stage(resnet):
    """At a ResNet stage (every path passes it): zennit's LRP with its ResNet canonizer and the mask hook."""
    torch.manual_seed(3)
    x, classes = torch.randn(2, 3, 32, 32, dtype=torch.float64), [3, 1]
    ours = CRP(resnet, layer="layer3")(x, classes, channels=[5, 100, 201])
    theirs = torch.cat([zennit_hooked(resnet, x[i:i + 1], c, "layer3", [5, 100, 201], canonizers=[ResNetCanonizer()])
                        for i, c in enumerate(classes)])
    assert_equal_to(ours, theirs)


def test_a_shortcut_around_the_layer_carries_no_relevance(resnet):
    """At a convolution inside a residual block, only the relevance through the layer reaches the input, as in
    zennit-crp's default two-step pass (the mask hook in one pass lets the shortcut's relevance through too): equal
    to it, per image, channels given and each image's most relevant channel; all channels together give less than
    the LRP map."""
    torch.manual_seed(4)
    x, classes, layer = torch.randn(2, 3, 32, 32, dtype=torch.float64), [0, 2], "layer1.0.conv1"
    explainer = CRP(resnet, layer=layer)
    ours = explainer(x, classes, channels=[3, 17])
    theirs = torch.cat([zennit_two_step(resnet, x[i:i + 1], c, layer, [3, 17], [ResNetCanonizer()])[0]
                        for i, c in enumerate(classes)])
    assert_equal_to(ours, theirs)
    hooked = zennit_hooked(resnet, x[:1], classes[0], layer, [3, 17], canonizers=[ResNetCanonizer()])
    assert float((hooked - theirs[:1]).abs().max()) > 0.1 * float(theirs.abs().max())
    top = [int(zennit_two_step(resnet, x[i:i + 1], c, layer, None, [ResNetCanonizer()])[1].sum((2, 3)).argmax())
           for i, c in enumerate(classes)]
    theirs = torch.cat([zennit_two_step(resnet, x[i:i + 1], c, layer, [top[i]], [ResNetCanonizer()])[0]
                        for i, c in enumerate(classes)])
    assert_equal_to(explainer(x, classes), theirs)
    through = explainer(x, classes, channels=list(range(64)))
    assert float((through - LRP(resnet)(x, classes)).abs().max()) > 0.1 * float(through.abs().max())


def test_the_heatmaps_of_all_channels_sum_to_the_lrp_map(x, resnet):
    """Relevance is linear in the masked layer relevance: the conditional heatmaps of every channel, each alone
    (one batched call), sum to the unconditioned LRP map where every path passes the layer."""
    model = small_net()
    for layer, count in (("3", 10), ("7", 12)):
        maps = CRP(model, layer=layer).concepts(x, [1, 4, 0], k=count).heatmaps
        assert_equal_to(maps.sum(dim=1), LRP(model)(x, [1, 4, 0]))
    torch.manual_seed(5)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    maps = CRP(resnet, layer="layer1").concepts(image, 2, k=64).heatmaps
    assert_equal_to(maps.sum(dim=1), LRP(resnet)(image, 2))


def test_on_token_layers_a_concept_is_one_feature_of_every_token():
    """A ViT block's (B, N, D) output: the concepts are its D features (not its N tokens); each feature's heatmap
    alone sums, over the features, to the LRP map, and the ranking sums each feature over the tokens."""
    model = tiny_vit().double()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    explainer = CRP(model, layer="blocks.1", composite="epsilon")
    found = explainer.concepts(x, [1, 3], k=24)
    assert found.heatmaps.shape == (2, 24, 3, 16, 16) and int(found.channels.max()) < 24
    torch.testing.assert_close(found.heatmaps.sum(dim=1), LRP(model, composite="epsilon")(x, [1, 3]))
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, [1, 3], channels=24)


def test_the_ranking_is_an_explicit_sort_of_the_layers_relevance(x):
    """Top-k: each image's channels sorted by their relevance at the layer (zennit's, summed over the positions,
    signed, largest first), with those sums; each concept's heatmap is get_mask's for that channel alone, and
    channels=None gives the first."""
    model, classes, layer = small_net(), [1, 4, 0], "3"
    explainer = CRP(model, layer=layer)
    found = explainer.concepts(x, classes, k=4)
    assert found.heatmaps.shape == (3, 4, 3, 16, 16) and found.channels.dtype == torch.long
    for i, c in enumerate(classes):
        _, relevance = zennit_two_step(model, x[i:i + 1], c, layer)
        totals = relevance.sum(dim=(2, 3))[0]
        order = sorted(range(totals.numel()), key=lambda j: -float(totals[j]))[:4]
        assert found.channels[i].tolist() == order
        torch.testing.assert_close(found.relevances[i], totals[order], rtol=1e-6, atol=1e-12)
    for j in range(4):
        torch.testing.assert_close(found.heatmaps[:, j], explainer(x, classes, channels=found.channels[:, j:j + 1]))
    torch.testing.assert_close(explainer(x, classes), found.heatmaps[:, 0])


def test_each_concepts_heatmap_conserves_its_relevance(x):
    """LRP-epsilon (tiny eps) on a bias-free ReLU net conserves relevance: each conditional heatmap sums to its
    channel's relevance at the layer."""
    model = small_net(bias=False)
    found = CRP(model, layer="6", composite="epsilon", eps=1e-12, stabilizer=1e-12).concepts(x, [0, 3, 2], k=5)
    torch.testing.assert_close(found.heatmaps.sum(dim=(2, 3, 4)), found.relevances, rtol=1e-7, atol=1e-12)


def test_batch_independence_and_batch_size(x):
    """Image i's heatmaps (given per image, or ranked) in a batch equal its own alone; batch_size changes nothing."""
    model, classes = small_net(), [2, 0, 3]
    per_image = torch.tensor([[1, 4], [7, 7], [0, 9]])
    explainer = CRP(model, layer="3")
    batch = explainer(x, classes, channels=per_image)
    found = explainer.concepts(x, classes, k=3)
    for i, c in enumerate(classes):
        torch.testing.assert_close(batch[i:i + 1], explainer(x[i:i + 1], c, channels=per_image[i:i + 1]))
        alone = explainer.concepts(x[i:i + 1], c, k=3)
        torch.testing.assert_close(found.heatmaps[i:i + 1], alone.heatmaps)
        assert torch.equal(found.channels[i:i + 1], alone.channels)
    torch.testing.assert_close(explainer(x, classes, channels=per_image, batch_size=2), batch)
    chunked = explainer.concepts(x, classes, k=3, batch_size=2)
    torch.testing.assert_close(chunked.heatmaps, found.heatmaps)
    torch.testing.assert_close(chunked.relevances, found.relevances)


def test_default_layer_and_float32(x):
    """layer=None is the library's default layer (the last spatial feature block); float32 inputs give float32."""
    model = small_net()
    name = default_layer(model, x[:1])
    torch.testing.assert_close(CRP(model)(x, 1, channels=2), CRP(model, layer=name)(x, 1, channels=2))
    found = CRP(model.float()).concepts(x.float(), 1, k=2)
    assert found.heatmaps.dtype == torch.float32 and found.relevances.dtype == torch.float32


def test_bad_options_are_named(x):
    model = small_net()
    explainer = CRP(model, layer="3")
    with pytest.raises(ValueError, match=r"channels \[10\] are out of range for layer '3'.* 10 channels"):
        explainer(x, 0, channels=[2, 10])
    with pytest.raises(ValueError, match=r"channels \[-1\] are out of range"):
        explainer(x, 0, channels=-1)
    for bad in (1.5, True, [], [1, "2"], "3"):
        with pytest.raises(ValueError, match="channels must be None, an int"):
            explainer(x, 0, channels=bad)
    with pytest.raises(ValueError, match=r"shape \(B, k\) = \(3, k\).* got shape \(3,\)"):
        explainer(x, 0, channels=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer channel indices"):
        explainer(x, 0, channels=torch.ones(3, 1))
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        CRP(model, layer="conv9")(x, 0)
    with pytest.raises(TypeError, match="a layer must be a dotted name or an nn.Module"):
        CRP(model, layer=3)(x, 0)
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        explainer.concepts(x, 0, k=0)
    with pytest.raises(ValueError, match="k=11 exceeds the 10 channels of layer '3'"):
        explainer.concepts(x, 0, k=11)
    with pytest.raises(ValueError, match="concepts\\(\\) ranks the channels itself"):
        explainer.concepts(x, 0, channels=2)
    with pytest.raises(ValueError, match="unknown composite"):
        explainer(x, 0, composite="epsilon_flat")


def test_create_graph_gives_the_true_derivative(x):
    """With create_graph the heatmap (given channels, and the ranked ones) is differentiable w.r.t. the parameters,
    and its derivative equals a central finite difference (float64)."""
    model = small_net()
    explainer = CRP(model, layer="3", composite="epsilon", eps=0.25, stabilizer=0.25)  # no near-zero denominators
    for channels in ([1, 6], None):
        check_parameter_derivative(lambda graph: explainer(x, [1, 4, 0], channels=channels, create_graph=graph),
                                   model, ["0.weight", "6.weight", "10.weight"])
    found = explainer.concepts(x, [1, 4, 0], k=2, create_graph=True)
    assert found.heatmaps.requires_grad and found.relevances.requires_grad
    torch.testing.assert_close(found.heatmaps.detach(), explainer.concepts(x, [1, 4, 0], k=2).heatmaps)


def test_the_model_is_left_as_found(x):
    model = small_net()
    CRP(model, layer="3").concepts(x, 0, k=2)
    CRP(model, layer="3")(x, 0, create_graph=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0
