"""Gradient attention rollout against vit-explain's ``grad_rollout`` written out one image at a time (with the three
fixes its issues report), its defaults, batch independence, its parameter derivative and its argument checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution
from attribution.transformers.grad_rollout import GradientRollout
from attribution.transformers.rollout import residual_rollout
from conftest import RowCounter, check_parameter_derivative, tiny_cnn, tiny_vit

pytest.importorskip("timm")


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 16, 16)


def vit(fused=True):
    """The tiny ViT with its head scaled up: attention x gradient then weighs against the identity the rollout adds
    (with the random head it is about 1e-4 of it, and discarding entries would change maps by 1e-8 only)."""
    model = tiny_vit(fused=fused)
    with torch.no_grad():
        model.head.weight.mul_(1000)
    return model


def attention_and_gradients(model, image, cls):
    """vit-explain's capture for one image on timm's unfused attention: every block's attn_drop output (forward
    hooks) and the gradient of the class's logit w.r.t. it (the loss ``(output * one_hot).sum()``)."""
    maps = []
    handles = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o)) for blk in model.blocks]
    try:
        out = model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(out[0, cls], maps)
    return [m.detach() for m in maps], grads


def grad_rollout_written_out(model, image, cls, discard_ratio, fusion="mean", as_released=False):
    """vit-explain's ``grad_rollout`` for one image, step by step, with the fixes of its issues #6 (each block's
    attention meets its own gradient, not the reversed list's), #16 (rows renormalised: ``keepdim=True``) and its
    own comment (the class token's entry is not discarded: the commented-out line restored); ``as_released``: as the
    code is, without them."""
    attentions, gradients = attention_and_gradients(model, image, cls)
    if as_released:
        gradients = gradients[::-1]  # its backward hooks append the last block's gradient first
    tokens = attentions[0].size(-1)
    result = torch.eye(tokens)
    with torch.no_grad():
        for attention, grad in zip(attentions, gradients):
            product = attention * grad
            fused = {"mean": product.mean(axis=1), "max": product.max(axis=1)[0], "min": product.min(axis=1)[0]}[fusion]
            fused[fused < 0] = 0
            flat = fused.view(fused.size(0), -1)
            _, indices = flat.topk(int(flat.size(-1) * discard_ratio), -1, False)
            if not as_released:
                indices = indices[indices != 0]
            flat[0, indices] = 0
            identity = torch.eye(fused.size(-1))
            a = (fused + 1.0 * identity) / 2
            a = a / (a.sum(dim=-1) if as_released else a.sum(dim=-1, keepdim=True))
            result = torch.matmul(a, result)
    mask = result[0, 0, 1:]
    width = int(mask.size(-1) ** 0.5)
    return mask.reshape(1, width, width)


def expected_maps(x, classes, discard_ratio, fusion="mean", as_released=False):
    model = vit(fused=False)
    masks = torch.stack([grad_rollout_written_out(model, image, cls, discard_ratio, fusion, as_released)
                         for image, cls in zip(x, classes)])
    return nn.functional.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("discard_ratio", [0.9, 0.75, 0.0])
def test_equals_vit_explains_procedure(x, discard_ratio):
    expected = expected_maps(x, [3, 1, 4], discard_ratio)
    explainer = GradientRollout(vit(fused=True), discard_ratio=discard_ratio)
    torch.testing.assert_close(explainer(x, [3, 1, 4]), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(explainer(x, [3, 1, 4], batch_size=2), expected, rtol=1e-4, atol=1e-7)
    unfused = GradientRollout(vit(fused=False), discard_ratio=discard_ratio)
    torch.testing.assert_close(unfused(x, [3, 1, 4]), expected, rtol=1e-4, atol=1e-7)
    if discard_ratio > 0:  # the discarded entries matter at this scale
        other = GradientRollout(vit(), discard_ratio=0.0)(x, [3, 1, 4])
        assert (other - expected).abs().max() > 1e-3 * expected.abs().max()


def test_the_fixed_bugs_change_the_maps(x):
    """The code as released (reversed gradients, column-broadcast normalisation, the class token's entry
    discardable) gives other maps: the fixes are not a rounding matter."""
    released = expected_maps(x, [3, 1, 4], 0.9, as_released=True)
    ours = GradientRollout(vit())(x, [3, 1, 4])
    assert (released - ours).abs().max() > 0.1 * ours.abs().max()


@pytest.mark.parametrize("fusion", ["max", "min"])
def test_other_head_fusions_fuse_the_products_before_the_clamp(x, fusion):
    expected = expected_maps(x, [0, 2, 4], 0.9, fusion)
    ours = GradientRollout(vit())(x, [0, 2, 4], head_fusion=fusion)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


def test_defaults_are_vit_explains(x):
    assert GradientRollout.defaults == {"head_fusion": "mean", "discard_ratio": 0.9}
    assert attribution.create("grad_rollout", vit()).__class__ is GradientRollout
    explainer = GradientRollout(vit())
    torch.testing.assert_close(explainer(x, [3, 1, 4]), expected_maps(x, [3, 1, 4], 0.9), rtol=1e-4, atol=1e-7)


def test_class_discriminative_unlike_attention_rollout(x):
    explainer = GradientRollout(vit())
    assert not torch.allclose(explainer(x, [0, 0, 0]), explainer(x, [4, 4, 4]))
    plain = attribution.AttentionRollout(vit())(x, 0)
    assert not torch.allclose(explainer(x, [0, 0, 0]), plain)


def test_batch_independence(x):
    explainer = GradientRollout(vit())
    together = explainer(x[:2], [3, 1])
    for i, cls in enumerate([3, 1]):
        torch.testing.assert_close(together[i:i + 1], explainer(x[i:i + 1], cls), rtol=1e-5, atol=1e-7)


def test_residual_rollout_is_the_product_of_renormalised_blocks():
    torch.manual_seed(0)
    fused = [torch.rand(2, 5, 5) for _ in range(3)]
    expected = torch.eye(5).expand(2, 5, 5)
    for block in fused:
        step = (block + torch.eye(5)) / 2
        expected = (step / step.sum(-1, keepdim=True)) @ expected
    torch.testing.assert_close(residual_rollout(fused), expected)
    torch.testing.assert_close(residual_rollout(fused).sum(-1), torch.ones(2, 5))


def test_create_graph_gives_the_maps_true_parameter_derivative(x):
    model = vit().double()
    images = x[:2].double()
    explainer = GradientRollout(model)

    def value(create_graph):
        return explainer(images, [3, 1], create_graph=create_graph)

    torch.testing.assert_close(value(True).detach(), value(False))
    check_parameter_derivative(value, model, ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight"],
                               rtol=1e-5, atol=1e-10)


def test_bad_options_name_what_is_wrong(x):
    model = tiny_vit()
    explainer = GradientRollout(model)
    counter = RowCounter(model)
    for ratio in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="discard_ratio must lie in \\[0, 1\\)"):
            explainer(x, 0, discard_ratio=ratio)
    with pytest.raises(ValueError, match="head_fusion must be 'mean', 'max' or 'min'"):
        explainer(x, 0, head_fusion="median")
    counter.close()
    assert counter.rows == []  # checked before any forward
    with pytest.raises(TypeError, match="unknown option 'discard'"):
        explainer(x, 0, discard=0.5)
    with pytest.raises(ValueError, match="found no attention"):
        GradientRollout(tiny_cnn())(x, 0)
