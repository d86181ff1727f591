"""LibraGrad against the authors' modified backward written out by hand (their timm fork's LayerNorm with the
variance detached, queries and keys detached, GELU's gate detached, gated products halved), FullGrad-completeness,
its composition with other gradient methods, create_graph, and what it leaves alone."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import attribution
from attribution.gradients.libragrad import LibraGrad, LibraGradRules
from conftest import central_difference, tiny_cnn, tiny_vit

torchvision = pytest.importorskip("torchvision")


def double_vit(**options) -> nn.Module:
    return tiny_vit(**options).double()


def images(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------- the authors' rules, one image at a time
def authors_layer_norm(t: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``LayerNormDecomposed`` with gradient mode ``LineX_1``: the variance detached."""
    centred = t - t.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1, keepdim=True).detach()
    return centred / (var + norm.eps) ** 0.5 * norm.weight + norm.bias


def authors_gelu(t: torch.Tensor) -> torch.Tensor:
    """``GELUDecomposed`` with gradient mode ``LineX_ZO``: ``x * Phi(x)`` with the gate detached."""
    return t * (0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))).detach()


def authors_silu(t: torch.Tensor) -> torch.Tensor:
    """``FairSiLU`` with gradient mode ``LineX_ZO``: ``x * sigmoid(x)`` with the gate detached."""
    return t * torch.sigmoid(t).detach()


def authors_halved(y: torch.Tensor) -> torch.Tensor:
    """``fair_gated_mlp`` in mode ``DU``: their ``swap_backward(y, y / 2)``, the value of ``y`` with half its
    gradient."""
    return y.detach() + (y / 2 - (y / 2).detach())


def authors_mlp(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    from timm.layers import GluMlp

    if hasattr(mlp, "fc1_g"):  # their FairSwiGLU: act(fc1_g(h)) * fc1_x(h), halved
        return mlp.fc2(authors_halved(authors_silu(mlp.fc1_g(h)) * mlp.fc1_x(h)))
    if isinstance(mlp, GluMlp):  # their FairGluMlp: the halves of one linear layer, gate_last: x1 * act(x2)
        x1, x2 = mlp.fc1(h).chunk(2, dim=-1)
        value, gate = (x1, x2) if mlp.gate_last else (x2, x1)
        return mlp.fc2(authors_halved(value * authors_silu(gate)))
    return mlp.fc2(authors_gelu(mlp.fc1(h)))


def authors_logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """timm's ViT forward (class token, blocks, final norm, class-token head) written out with the authors' rules
    (``fair_qkv`` in mode ``LineX_1``: queries and keys detached)."""
    tokens = model.patch_embed.proj(image[None]).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token, tokens], dim=1) + model.pos_embed
    for block in model.blocks:
        attn = block.attn
        h = authors_layer_norm(tokens, block.norm1)
        n, c = h.shape[1], h.shape[2]
        q, k, v = attn.qkv(h).reshape(1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = q.detach(), k.detach()
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        tokens = tokens + attn.proj((weights @ v).transpose(1, 2).reshape(1, n, c))
        tokens = tokens + authors_mlp(block.mlp, authors_layer_norm(tokens, block.norm2))
    return model.head(authors_layer_norm(tokens, model.norm)[:, 0])[0]


def authors_gradient(model: nn.Module, image: torch.Tensor, cls: int, score: str = "logit") -> torch.Tensor:
    image = image.clone().requires_grad_(True)
    logits = authors_logits(model, image)
    value = logits[cls] if score == "logit" else logits.softmax(dim=0)[cls]  # their S1: the head's plain softmax
    (grad,) = torch.autograd.grad(value, image)
    return grad


def additive_parameters(model: nn.Module):
    return [p for name, p in model.named_parameters()
            if name.endswith("bias") or name.split(".")[-1] in ("cls_token", "pos_embed", "class_token",
                                                                 "pos_embedding")]


# ----------------------------------------------------------------------------------------------------- the tests
def test_defaults_are_the_authors_preset():
    """``LibraGrad`` preset of decompv's gbrand.py: input x gradient of the softmax probability (``S1``)."""
    assert LibraGrad.defaults == {"method": attribution.InputXGradient, "score": "softmax"}
    assert attribution.get_method("libragrad") is LibraGrad


@pytest.mark.parametrize("score", ["softmax", "logit"])
@pytest.mark.parametrize("fused", [True, False])
def test_equals_the_authors_backward_written_out(score, fused):
    model, x, classes = double_vit(fused=fused), images(), [1, 3]
    expected = torch.stack([x[i] * authors_gradient(model, x[i], c, score) for i, c in enumerate(classes)])
    options = {} if score == "softmax" else {"score": score}
    ours = LibraGrad(model, **options)(x, classes)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))  # eps 1e-10
    with torch.no_grad():  # the hand-written forward is the model's
        torch.testing.assert_close(authors_logits(model, x[0]), model(x[:1])[0])
    plain = attribution.InputXGradient(model, score=score)(x, classes)
    assert (ours - plain).abs().max() > 0.1 * ours.abs().max()  # the rules do change the map


@pytest.mark.parametrize("mlp", ["SwiGLU", "GluMlp"])
def test_gated_mlps_are_halved_as_the_authors_du(mlp):
    """timm's SwiGLU (two linear layers) and GluMlp (the halves of one, as EVA-02's): the gate's SiLU detached and
    the product's gradient halved."""
    import timm.layers

    model = double_vit(mlp_layer=getattr(timm.layers, mlp), act_layer=nn.SiLU)
    x, classes = images(seed=1), [0, 4]
    expected = torch.stack([x[i] * authors_gradient(model, x[i], c) for i, c in enumerate(classes)])
    ours = LibraGrad(model, score="logit")(x, classes)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))  # eps 1e-10


@pytest.mark.parametrize("kind", ["timm", "SwiGLU", "GluMlp", "torchvision"])
def test_fullgrad_completeness(kind):
    """The paper's property: logit = sum x * g + sum_b b * g_b over the additive parameters (biases, class token,
    position embedding), g the LibraGrad gradients; the explainer's map is the first sum."""
    if kind == "torchvision":
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                     hidden_dim=16, mlp_dim=32, num_classes=5).double().eval()
        nn.init.normal_(model.heads.head.weight, std=0.5)
    else:
        import timm.layers

        model = double_vit(**({} if kind == "timm" else {"mlp_layer": getattr(timm.layers, kind),
                                                          "act_layer": nn.SiLU}))
    x, classes = images(seed=2), [2, 0]
    maps = LibraGrad(model, score="logit")(x, classes)
    biases = additive_parameters(model)
    for i, c in enumerate(classes):
        rows = x[i:i + 1].clone().requires_grad_(True)
        with LibraGradRules():
            logit = model(rows)[0, c]
        grads = torch.autograd.grad(logit, [rows] + biases)
        torch.testing.assert_close(maps[i:i + 1], rows.detach() * grads[0])
        total = (rows * grads[0]).sum() + sum((b * g).sum() for b, g in zip(biases, grads[1:]))
        torch.testing.assert_close(total, logit, rtol=1e-8, atol=1e-9)
        plain = torch.autograd.grad(model(rows)[0, c], [rows] + biases)
        plain_total = (rows * plain[0]).sum() + sum((b * g).sum() for b, g in zip(biases, plain[1:]))
        assert (plain_total - logit).abs() > 1e-3 * logit.abs()  # plain gradients are not complete


def test_a_bias_free_vit_map_sums_to_the_logit():
    model = double_vit()
    with torch.no_grad():
        for p in additive_parameters(model):
            p.zero_()
    x, classes = images(seed=3), [4, 1]
    sums = LibraGrad(model, score="logit")(x, classes).sum(dim=(1, 2, 3))
    torch.testing.assert_close(sums, model(x)[[0, 1], classes].detach(), rtol=1e-8, atol=1e-12)


def test_on_torchvisions_vit_it_is_cp_lrp():
    """Without gated MLPs the rules are CP-LRP's (AttnLRP's ``'cp'`` variant, checked against LXT there)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5).double().eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)
    x = images(seed=4)
    torch.testing.assert_close(LibraGrad(model)(x, [0, 3]),
                               attribution.AttnLRP(model, variant="cp", score="softmax")(x, [0, 3]))


@pytest.mark.parametrize("method", ["vanilla_gradient", "integrated_gradients"])
def test_runs_other_gradient_methods_under_its_backward(method):
    model, x, classes = double_vit(), images(seed=5), [3, 2]
    alphas, weights = attribution.gradients.paths.quadrature("linspace", 4)
    expected = []
    for i, c in enumerate(classes):
        if method == "vanilla_gradient":
            expected.append(authors_gradient(model, x[i], c))
        else:  # IG from each image's minimum (the 'black' baseline), steps=4, linspace
            start = torch.full_like(x[i], float(x[i].min()))
            total = sum(w * authors_gradient(model, start + a * (x[i] - start), c) for a, w in zip(alphas, weights))
            expected.append((x[i] - start) * total)
    ours = LibraGrad(model, method=method, score="logit")(x, classes, **({"steps": 4} if method != "vanilla_gradient"
                                                                          else {}))
    expected = torch.stack(expected)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-8 * float(expected.abs().max()))  # eps 1e-10


def test_batch_independence_and_batch_size():
    model, x, classes = double_vit(), images(3, seed=6), [0, 4, 2]
    explainer = LibraGrad(model)
    together = explainer(x, classes)
    alone = torch.cat([explainer(x[i:i + 1], classes[i]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(explainer(x, classes, batch_size=1), together, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(explainer(x), explainer(x, model(x).argmax(dim=1)))


def test_the_forward_and_the_model_are_unchanged():
    model, x = double_vit(), images(seed=7)
    model.train()  # the guard's eval mode is undone afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    LibraGrad(model)(x, [1, 2])
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with LibraGradRules():
            ruled = model(x)
    torch.testing.assert_close(ruled, plain, rtol=0, atol=0)


def test_create_graph_differentiates_the_map():
    """The map made with create_graph equals the plain one, and its derivative w.r.t. a parameter matches finite
    differences of the map (the recorded operations differentiate plainly after the rules' pass)."""
    model, x = double_vit(), images(1, seed=8)
    explainer = LibraGrad(model, score="logit")
    out = explainer(x, 2, create_graph=True)
    torch.testing.assert_close(out.detach(), explainer(x, 2))
    weights = (model.blocks[0].mlp.fc1.weight, model.blocks[1].attn.qkv.weight)
    grads = torch.autograd.grad(out.sum(), weights)
    for weight, grad in zip(weights, grads):
        direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(9))
        difference = central_difference(lambda: explainer(x, 2).sum(), weight, direction, step=1e-5)
        torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-5, atol=1e-10)


def test_a_relu_cnn_is_left_alone_with_a_warning():
    model, x = tiny_cnn().double(), images(seed=10)
    with pytest.warns(UserWarning, match="found no layer norm, attention"):
        ours = LibraGrad(model)(x, [0, 1])
    torch.testing.assert_close(ours, attribution.InputXGradient(model, score="softmax")(x, [0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ViT raises no warning
        LibraGrad(double_vit())(x, [0, 1])


def test_bad_input():
    model = double_vit()
    with pytest.raises(TypeError, match="changes the backward itself"):
        LibraGrad(model, method="guided_backprop")
    with pytest.raises(TypeError, match="changes the backward itself"):
        LibraGrad(model, method=attribution.AttnLRP)
    with pytest.raises(TypeError, match="LibraGrad itself"):
        LibraGrad(model, method="libragrad")
    with pytest.raises(TypeError, match="method must be a GradientExplainer"):
        LibraGrad(model, method="grad_cam")
    with pytest.raises(KeyError, match="no attribution method named"):
        LibraGrad(model, method="no_such_method")
    with pytest.raises(TypeError, match="unknown option 'step'"):
        LibraGrad(model, method="integrated_gradients")(images(), 0, step=3)
