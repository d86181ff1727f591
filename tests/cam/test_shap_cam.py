"""Shap-CAM against its procedure written out one image, one ordering and one prefix at a time, and closed forms:
exact Shapley values by brute force over subsets, the additive game of a linear head, efficiency."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.cam.shap_cam import ShapCAM
from attribution.core.registry import get_method
from conftest import RowCounter, cam_cnn, check_parameter_derivative, tiny_cnn, tiny_vit


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(2, 3, 32, 32)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scored(outputs: torch.Tensor, cls: int, score: str) -> torch.Tensor:
    return (outputs.softmax(1) if score == "softmax" else outputs)[:, cls]


def upsampled(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def shap_cam_written_out(head, tail, x, classes, samples: int, seed: int, score: str = "logit"):
    """The procedure one image at a time: ``samples`` orderings drawn as successive ``torch.randperm(C)`` from a
    generator seeded with ``seed`` (the same for every image); along each ordering the channels are added one by one
    to the empty coalition (channels outside it zeroed at the layer) and each channel's score change is its marginal
    contribution; phi_k is the mean over orderings; map = ReLU(sum_k phi_k A_k), upsampled."""
    maps, values = [], []
    with torch.no_grad():
        for image, cls in zip(x, classes):
            feature = head(image[None])[0]  # (C, h, w)
            channels = feature.shape[0]
            generator = seeded(seed)
            orders = [torch.randperm(channels, generator=generator) for _ in range(samples)]
            phi = torch.zeros(channels, dtype=feature.dtype)
            for order in orders:
                kept = torch.zeros(channels, dtype=torch.bool)
                before = scored(tail((feature * kept[:, None, None])[None]), cls, score)[0]
                for channel in order.tolist():
                    kept[channel] = True
                    after = scored(tail((feature * kept[:, None, None])[None]), cls, score)[0]
                    phi[channel] += after - before
                    before = after
            phi /= samples
            values.append(phi)
            maps.append(torch.relu((phi[:, None, None] * feature).sum(0))[None])
    return upsampled(torch.stack(maps), x.shape[-2:]), torch.stack(values)


def coalition_value(tail, feature, coalition, cls: int, score: str) -> torch.Tensor:
    """v(S): the score with the channels outside S zeroed at the layer."""
    kept = torch.zeros(feature.shape[0], dtype=feature.dtype)
    kept[list(coalition)] = 1
    return scored(tail((feature * kept[:, None, None])[None]), cls, score)[0]


def exact_shapley(tail, feature, cls: int, score: str) -> torch.Tensor:
    """phi_k = sum over coalitions S without k of |S|! (C - |S| - 1)! / C! [v(S + k) - v(S)], every subset scored."""
    channels = feature.shape[0]

    def value(coalition) -> torch.Tensor:
        return coalition_value(tail, feature, coalition, cls, score)

    phi = torch.zeros(channels, dtype=feature.dtype)
    for k in range(channels):
        others = [c for c in range(channels) if c != k]
        for size in range(channels):
            weight = math.factorial(size) * math.factorial(channels - size - 1) / math.factorial(channels)
            for coalition in itertools.combinations(others, size):
                phi[k] += weight * (value(coalition + (k,)) - value(coalition))
    return phi


def four_channel_net() -> nn.Module:
    """A 4-channel layer ("1") followed by a saturating head (tanh of large sums): a game that is far from additive
    over the channels."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()
    with torch.no_grad():
        model[2].weight.mul_(10)
    return model


# ------------------------------------------------------------------------------------------------------ defaults
def test_registered_with_its_defaults():
    assert get_method("shap_cam") is ShapCAM
    assert ShapCAM.defaults["samples"] == 200 and ShapCAM.defaults["generator"] is None
    assert ShapCAM.defaults["use_tail"] is True and "score" not in ShapCAM.defaults  # the library's 'logit'
    assert ShapCAM.kind == "cam" and not ShapCAM.uses_gradients


# ------------------------------------------------------------------------------------------- the written-out form
@pytest.mark.parametrize("use_tail, score", [(True, "logit"), (False, "logit"), (True, "softmax")])
def test_equals_the_procedure_written_out(x, use_tail, score):
    """Block "2" of a Conv-BN-ReLU net (32 channels at 16x16), convolutions after it; same orderings."""
    model = cam_cnn()
    explainer = ShapCAM(model, "2", samples=3, use_tail=use_tail, score=score)
    ours = explainer(x, [2, 5], generator=seeded(7), batch_size=64)
    expected, phi = shap_cam_written_out(model[:3], model[3:], x, [2, 5], 3, 7, score)
    torch.testing.assert_close(explainer.last_shapley_values[0], phi, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert explainer.last_mode == ("tail" if use_tail else "full")
    assert float(ours.amax()) > 0


def test_token_layers_zero_a_feature_of_every_patch_token():
    """ViT (class token + 16 patch tokens of 24 features): channel k is feature k of the patch tokens, the class
    token is kept; the coalition's copy runs on through the second block, the norm and the head."""
    model = tiny_vit()
    torch.manual_seed(1)
    x, classes = torch.randn(2, 3, 16, 16), [0, 3]
    explainer = ShapCAM(model, "blocks.0", samples=2)
    ours = explainer(x, classes, generator=seeded(2))

    def head(image):  # (1, 3, 16, 16) -> the 24 maps of the patch tokens, (1, 24, 4, 4), and the class token
        tokens = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(image))))
        return tokens[:, 1:].transpose(1, 2).reshape(1, 24, 4, 4), tokens[:, :1]

    maps, values = [], []
    with torch.no_grad():
        for image, cls in zip(x, classes):
            feature, cls_token = head(image[None])

            def tail(edited, cls_token=cls_token):
                tokens = torch.cat([cls_token, edited.flatten(2).transpose(1, 2)], dim=1)
                return model.forward_head(model.norm(model.blocks[1](tokens)))

            _, phi = shap_cam_written_out(lambda _: feature, tail, image[None], [cls], 2, 2)
            values.append(phi[0])
            maps.append(torch.relu((phi[0][:, None, None] * feature[0]).sum(0))[None])
    torch.testing.assert_close(explainer.last_shapley_values[0], torch.stack(values), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, upsampled(torch.stack(maps), x.shape[-2:]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("score", ["logit", "softmax"])
@pytest.mark.parametrize("samples", [24, 50])
def test_all_orderings_give_the_exact_shapley_values(score, samples):
    """4 channels: samples >= 4! = 24 enumerates every ordering, and the estimate is the Shapley value computed by
    brute force over the 16 coalitions (no generator needed: nothing is drawn)."""
    model = four_channel_net()
    torch.manual_seed(0)
    x, classes = torch.randn(2, 3, 8, 8), [1, 3]
    explainer = ShapCAM(model, "1", samples=samples, score=score)
    ours = explainer(x, classes)
    with torch.no_grad():
        features = model[:2](x)
        exact = torch.stack([exact_shapley(model[2:], f, c, score) for f, c in zip(features, classes)])
        alone = torch.stack([torch.stack([coalition_value(model[2:], f, (k,), c, score) for k in range(4)])
                             - coalition_value(model[2:], f, (), c, score) for f, c in zip(features, classes)])
    phi = explainer.last_shapley_values[0]
    torch.testing.assert_close(phi, exact, rtol=1e-5, atol=1e-6)
    assert float((exact - alone).abs().max()) > 0.2 * float(exact.abs().max())  # v({k}) - v({}): not additive
    torch.testing.assert_close(ours, torch.relu((phi[:, :, None, None] * features).sum(1, keepdim=True)))


def test_too_few_orderings_are_not_exact_but_are_efficient():
    """2 of the 24 orderings: not the Shapley values of the non-additive game, yet they add up to v(all) - v(none)."""
    model = four_channel_net()
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    explainer = ShapCAM(model, "1", samples=2, generator=seeded(0))
    explainer(x, 1)
    with torch.no_grad():
        exact = exact_shapley(model[2:], model[:2](x)[0], 1, "logit")
        gap = model(x)[0, 1] - model[2:](torch.zeros(1, 4, 8, 8))[0, 1]
    phi = explainer.last_shapley_values[0][0]
    assert float((phi - exact).abs().max()) > 0.01
    torch.testing.assert_close(phi.sum(), gap, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("samples", [1, 4])
def test_on_a_linear_head_each_channel_gets_its_additive_contribution(samples):
    """GAP + linear after the layer, logits: v(S) = b_t + sum_{k in S} w_tk mean(A_k) is additive, so every
    marginal contribution of channel k, in any ordering, is w_tk mean(A_k): phi_k equals it for any sample count,
    and the map is ReLU(sum_k w_tk mean(A_k) A_k)."""
    model = tiny_cnn()
    torch.manual_seed(0)
    x, classes = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    explainer = ShapCAM(model, "5", samples=samples, generator=seeded(3))
    ours = explainer(x, classes)
    with torch.no_grad():
        features = model[:6](x)  # (2, 16, 8, 8)
        additive = model[8].weight[classes] * features.mean((2, 3))
    torch.testing.assert_close(explainer.last_shapley_values[0], additive, rtol=1e-4, atol=1e-6)
    expected = upsampled(torch.relu((additive[:, :, None, None] * features).sum(1, keepdim=True)), (16, 16))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("score", ["logit", "softmax"])
def test_efficiency_for_every_sample_count(x, score):
    """sum_k phi_k = v(all) - v(none) (the layer zeroed), whatever the number of orderings."""
    model = cam_cnn()
    with torch.no_grad():
        full = scored(model(x), 0, score)
        none = scored(model[3:](torch.zeros_like(model[:3](x))), 0, score)
    for samples in (1, 2, 5):
        explainer = ShapCAM(model, "2", samples=samples, score=score, generator=seeded(samples))
        explainer(x, 0)
        torch.testing.assert_close(explainer.last_shapley_values[0].sum(1), full - none, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- batching and options
def test_batch_independence_with_a_seeded_generator(x):
    model = cam_cnn()
    explainer = ShapCAM(model, "2", samples=2)
    both = explainer(x, [2, 5], generator=seeded(1), batch_size=40)
    alone = torch.cat([explainer(x[i:i + 1], [c], generator=seeded(1)) for i, c in enumerate([2, 5])])
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(both, explainer(x, [2, 5], generator=seeded(2)))  # other orderings, other estimate


def test_cost_and_the_arg_max_target(x):
    """One forward of the images, then samples x (C - 1) + 1 tail rows per image (32 channels at block "2")."""
    model = cam_cnn()
    counter = RowCounter(model[-1])
    try:
        ours = ShapCAM(model, "2", samples=3)(x, None, generator=seeded(0))
    finally:
        counter.close()
    assert sum(counter.rows) == 2 + 2 * (3 * 31 + 1)
    with torch.no_grad():
        classes = model(x).argmax(1)
    torch.testing.assert_close(ours, ShapCAM(model, "2", samples=3)(x, classes, generator=seeded(0)))


def test_several_layers_draw_their_orderings_in_turn(x):
    """Layers "1" and "2": the orderings of "1" are drawn first, then those of "2"; the maps are averaged."""
    model = cam_cnn()
    fused = ShapCAM(model, ["1", "2"], samples=2)
    ours = fused(x, [2, 5], generator=seeded(4))
    generator = seeded(4)
    first = ShapCAM(model, "1", samples=2)(x, [2, 5], generator=generator)
    second = ShapCAM(model, "2", samples=2)(x, [2, 5], generator=generator)
    torch.testing.assert_close(ours, (first + second) / 2)
    assert [tuple(v.shape) for v in fused.last_shapley_values] == [(2, 32), (2, 32)]


def test_float64_and_create_graph_against_finite_differences():
    model = tiny_cnn(activation=nn.Softplus).double()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = ShapCAM(model, "3", samples=1)
    out = explainer(x, [3, 3], generator=seeded(0))
    assert out.dtype == torch.float64
    single = ShapCAM(tiny_cnn(activation=nn.Softplus), "3", samples=1)(x.float(), [3, 3], generator=seeded(0))
    torch.testing.assert_close(out.float(), single, rtol=1e-4, atol=1e-6)

    def value(create_graph: bool) -> torch.Tensor:
        return explainer(x, [3, 3], generator=seeded(0), create_graph=create_graph)

    check_parameter_derivative(value, model, ["2.weight", "4.weight", "8.weight"])


@pytest.mark.parametrize("option, value, error", [
    ("samples", 0, ValueError), ("samples", -3, ValueError), ("samples", 2.5, ValueError),
    ("samples", True, ValueError),
    ("generator", 7, TypeError), ("use_tail", "yes", TypeError), ("layer_fusion", "sum", ValueError),
])
def test_bad_options_name_themselves(option, value, error):
    with pytest.raises(error, match=option):
        ShapCAM(tiny_cnn(), "5", samples=1)(torch.randn(1, 3, 16, 16), 0, **{option: value})
