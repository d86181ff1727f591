"""AttnLRP and CP-LRP against LXT (the authors' library: its rule functions patched into torchvision's ViT), the
fused and unfused attention paths, closed forms, and create_graph."""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from conftest import central_difference, tiny_cnn, tiny_vit

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def lxt():
    """LXT's ``efficient`` rules and patches, loaded without ``lxt/__init__`` (which imports every language model
    it supports from ``transformers``, not installed here)."""
    spec = importlib.util.find_spec("lxt")
    if spec is None:
        pytest.skip("lxt is not installed")
    root = Path(spec.submodule_search_locations[0])
    saved = {name: sys.modules.get(name) for name in ("lxt", "lxt.efficient")}
    for name, path in (("lxt", root), ("lxt.efficient", root / "efficient")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    try:
        rules = importlib.import_module("lxt.efficient.rules")
        patches = importlib.import_module("lxt.efficient.patches")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return types.SimpleNamespace(rules=rules, patches=patches)


def narrow_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=6).double()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


def lxt_relevance(lxt, model: nn.Module, x: torch.Tensor, classes, variant: str) -> torch.Tensor:
    """``x * grad`` with LXT's patches on torchvision's ViT classes (its ``vit_torch`` CP-LRP map; for AttnLRP its
    ``divide_gradient`` on the queries and keys by 4 and the values by 2, as its attention wrapper does), undone
    afterwards: they replace the forwards of torch.nn's GELU, LayerNorm and MultiheadAttention classes."""
    classes_patched = (nn.GELU, nn.LayerNorm, nn.MultiheadAttention)
    originals = {cls: cls.forward for cls in classes_patched}
    patches, divide = lxt.patches, lxt.rules.divide_gradient

    def uniform_attention(self, query, key, value, *args, **kwargs):
        return self.original_forward(divide(query, 4), divide(key, 4), divide(value, 2), *args, **kwargs)

    attention = patches.cp_multi_head_attention_forward if variant == "cp" else uniform_attention
    try:
        patches.patch_method(patches.non_linear_forward, nn.GELU, keep_original=True)
        patches.patch_method(patches.layer_norm_forward, nn.LayerNorm)
        patches.patch_method(attention, nn.MultiheadAttention, keep_original=True)
        rows = x.clone().requires_grad_(True)
        out = copy.deepcopy(model)(rows)
        out[torch.arange(len(classes)), classes].sum().backward()
        return (rows * rows.grad).detach()
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
            if "original_forward" in cls.__dict__:
                delattr(cls, "original_forward")


@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
def test_equals_lxt_on_torchvisions_vit(lxt, variant):
    model, classes = narrow_vit(), [1, 4, 0]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    theirs = lxt_relevance(lxt, model, x, classes, variant)
    ours = attribution.AttnLRP(model, variant=variant)(x, classes)
    assert float(theirs.abs().max()) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9 * float(theirs.abs().max()))
    assert nn.GELU.forward is not None and "original_forward" not in nn.GELU.__dict__


def test_the_variants_and_the_gradient_differ():
    model, classes = narrow_vit(), [1, 4]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    attn = attribution.AttnLRP(model)(x, classes)
    cp = attribution.AttnLRP(model, variant="cp")(x, classes)
    plain = attribution.InputXGradient(model)(x, classes)
    for a, b in ((attn, cp), (attn, plain), (cp, plain)):
        assert (a - b).abs().max() > 1e-3 * a.abs().max()


@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
def test_fused_and_unfused_attention_agree(variant):
    """timm's fused kernel (rules on q, k, v) and its explicit q @ k^T, softmax, A @ v (rules on the products and
    the softmax) are the same propagation."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    fused = attribution.AttnLRP(tiny_vit(fused=True), variant=variant)(x, [1, 3])
    unfused = attribution.AttnLRP(tiny_vit(fused=False), variant=variant)(x, [1, 3])
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6 * float(fused.abs().max()))


def test_on_a_relu_network_without_norms_it_is_input_times_gradient():
    model = tiny_cnn().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(attribution.AttnLRP(model)(x, [0, 1, 2]),
                               attribution.InputXGradient(model)(x, [0, 1, 2]))


@pytest.mark.parametrize("variant", ["attnlrp", "cp"])
def test_conservation_on_a_bias_free_transformer_block(variant):
    """Without biases, CP-LRP conserves: the relevance sums to the explained logit (the layer norm's centring is
    linear, the identity rule passes the GELU's relevance, constant attention makes A v linear in v).  AttnLRP's
    softmax rule is not conservative (the paper's bias term absorbs the rest): its sum differs."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(3, 16, bias=False)
            self.norm = nn.LayerNorm(16, elementwise_affine=False)
            self.qkv = nn.Linear(16, 48, bias=False)
            self.mlp = nn.Sequential(nn.Linear(16, 32, bias=False), nn.GELU(), nn.Linear(32, 16, bias=False))
            self.head = nn.Linear(16, 4, bias=False)

        def forward(self, x):
            tokens = self.embed(x.flatten(2).transpose(1, 2))  # pixels as tokens
            q, k, v = self.qkv(self.norm(tokens)).chunk(3, dim=-1)
            tokens = tokens + torch.nn.functional.scaled_dot_product_attention(q, k, v)
            tokens = tokens + self.mlp(tokens)
            return self.head(tokens.mean(dim=1))

    model = Block().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    relevance = attribution.AttnLRP(model, variant=variant)(x, [0, 3]).sum(dim=(1, 2, 3))
    logits = model(x)[[0, 1], [0, 3]].detach()
    if variant == "cp":  # the GELU's eps is the only leak, far below 1e-6 of the logit here
        torch.testing.assert_close(relevance, logits, rtol=1e-6, atol=1e-9)
    else:
        assert (relevance - logits).abs().max() > 1e-3 * logits.abs().max()


def test_create_graph_differentiates_the_rules():
    """The map made with create_graph equals the plain one, and its derivative w.r.t. a parameter matches finite
    differences of the map (the rules' backward is differentiated, not frozen)."""
    model = narrow_vit()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    explainer = attribution.AttnLRP(model)
    out = explainer(x, 2, create_graph=True)
    torch.testing.assert_close(out.detach(), explainer(x, 2))
    weight = model.encoder.layers[0].mlp[0].weight
    (grad,) = torch.autograd.grad(out.sum(), weight)
    direction = torch.randn_like(weight)
    difference = central_difference(lambda: explainer(x, 2).sum(), weight, direction, step=1e-5)
    torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-4, atol=1e-8)


def test_bad_options():
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="variant must be one of"):
        attribution.AttnLRP(model)(x, 0, variant="chefer")
    with pytest.raises(ValueError, match="eps must be"):
        attribution.AttnLRP(model)(x, 0, eps=-1.0)


def test_sigmoid_gates_keep_their_gradient():
    """A squeeze-and-excitation gate x * sigmoid(s): the identity rule's f(s) / s is no derivative for a function
    with f(0) != 0 (and unbounded near s = 0), so the gate keeps its plain gradient: on this ReLU network with a
    gate the map is input x gradient."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.squeeze = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            gate = torch.sigmoid(self.squeeze(h.mean(dim=(2, 3))))
            return self.head((h * gate[:, :, None, None]).mean(dim=(2, 3)))

    model = Gated().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(attribution.AttnLRP(model)(x, [0, 2]), attribution.InputXGradient(model)(x, [0, 2]))


@pytest.mark.parametrize("activation", [nn.ReLU6, nn.SiLU, nn.Hardswish, nn.ELU, nn.ReLU])
def test_in_place_activations_get_the_identity_rule_too(activation):
    """torchvision's EfficientNets and MobileNets build their activations with inplace=True: the same map as the
    out-of-place network's, and the forward's values unchanged."""

    def net(inplace: bool) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), activation(inplace=inplace), nn.Conv2d(6, 6, 3),
                             activation(inplace=inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(6, 4)).double().eval()

    x = 20 * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))  # ReLU6 clips
    out_of_place = attribution.AttnLRP(net(False))(x, [0, 3])
    torch.testing.assert_close(attribution.AttnLRP(net(True))(x, [0, 3]), out_of_place)
    if activation is not nn.ReLU:  # the identity rule is not the gradient there
        assert (out_of_place - attribution.InputXGradient(net(False))(x, [0, 3])).abs().max() > 1e-6


def test_half_models_and_exact_zeros_stay_finite():
    """A zero activation input: f(0) / (0 + eps) with eps = 1e-10, which float16 cannot hold, so the rule is
    computed in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    x[..., :4, :] = 0.0
    half = attribution.AttnLRP(model.half())(x, 1)
    assert torch.isfinite(half).all() and half.abs().sum() > 0


@pytest.mark.parametrize("function", ["layer_norm", "softmax"])
def test_chefer_identity_rule_passes_nothing_through_an_exact_zero(function):
    """Chefer et al.'s layer norms and softmaxes pass the relevance unchanged: ``d out / d x := f(x) / (x + eps)``,
    and 0 where ``x`` is exactly 0 (their guarded division; ``f(0) / eps`` is about 1e9 here, which overflowed
    float16 models' gradients into NaN maps)."""
    from attribution.gradients.attn_lrp import TransformerLRPRules

    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    x[0, 1, 2] = x[1, 2, 0] = 0.0
    x.requires_grad_(True)
    g = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    f = (lambda t: F.layer_norm(t, (8,))) if function == "layer_norm" else (lambda t: t.softmax(dim=-1))
    with TransformerLRPRules("chefer", eps=1e-10):
        out = f(x)
    (grad,) = torch.autograd.grad(out, x, g)
    with torch.no_grad():
        expected = torch.where(x == 0, 0.0, g * f(x) / (x + 1e-10))
    torch.testing.assert_close(grad, expected)
    assert grad[0, 1, 2] == 0 and grad[1, 2, 0] == 0


def test_products_with_weights_and_output_softmaxes_are_not_attention():
    """x @ W.T (a view of a parameter) keeps its gradient; a softmax over the classes is no attention map, even for
    CP-LRP: on this ReLU network the map is input x gradient.  And a model may change a rule's output in place."""

    class MatMul(nn.Module):
        def __init__(self, gelu: bool = False) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.gelu = gelu
            self.first, self.second = nn.Parameter(torch.randn(5, 12)), nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            h = x.flatten(1) @ self.first.T
            if self.gelu:
                h = F.gelu(h)
                h.mul_(2.0)  # in place on the identity rule's output
            else:
                h = torch.relu(h)
            return (h @ self.second.T).softmax(dim=1)

    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    model = MatMul().double()
    plain = attribution.InputXGradient(model)(x, [0, 2])
    for variant in ("attnlrp", "cp"):
        torch.testing.assert_close(attribution.AttnLRP(model, variant=variant)(x, [0, 2]), plain)
        changed = attribution.AttnLRP(MatMul(gelu=True).double(), variant=variant)(x, [0, 2])
        assert torch.isfinite(changed).all() and changed.abs().sum() > 0


@pytest.mark.parametrize("split", [False, True])
def test_gated_products_share_the_relevance(split):
    """A bias-free gated MLP, ``silu(W_g t) * (W_u t)`` (SwiGLU): the uniform rule halves the gradient to both
    factors, so the relevance sums to the logit (each factor taking all of it would double it).  ``split``: the two
    factors are the halves of one linear layer's output (timm's ``GluMlp``, EVA-02's SwiGLU: ``chunk(2)``), which
    were taken for one tensor's entries."""

    class GatedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.embed = nn.Linear(3, 8, bias=False)
            self.gate, self.up = nn.Linear(8, 16, bias=False), nn.Linear(8, 16, bias=False)
            self.down, self.head = nn.Linear(16, 8, bias=False), nn.Linear(8, 3, bias=False)

        def forward(self, x):
            tokens = self.embed(x.flatten(2).transpose(1, 2))
            if split:
                gate, up = torch.cat([self.gate(tokens), self.up(tokens)], dim=-1).chunk(2, dim=-1)
            else:
                gate, up = self.gate(tokens), self.up(tokens)
            tokens = tokens + self.down(torch.nn.functional.silu(gate) * up)
            return self.head(tokens.mean(dim=1))

    model = GatedNet().double().eval()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    relevance = attribution.AttnLRP(model)(x, [0, 2]).sum(dim=(1, 2, 3))
    torch.testing.assert_close(relevance, model(x)[[0, 1], [0, 2]].detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("activation", ["quick_gelu", "silu", "expanded_gate"])
def test_products_of_a_tensor_with_itself_and_expanded_gates_are_no_gated_products(activation):
    """An activation written as a product (QuickGELU: x * sigmoid(1.702 x), SiLU: x * sigmoid(x)) and a gate
    expanded to the value's shape (timm's ECA: x * s.expand_as(x)) keep their gradient: on a net without norms or
    attention the map is input x gradient."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.conv, self.fc, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.conv(x)
            if activation == "quick_gelu":
                h = h * torch.sigmoid(1.702 * h)
            elif activation == "silu":
                h = h * torch.sigmoid(h)
            else:
                gate = torch.sigmoid(self.fc(h.mean(dim=(2, 3))))[:, :, None, None]
                h = torch.relu(h) * gate.expand_as(h)
            return self.head(h.mean(dim=(2, 3)))

    model = Net().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(attribution.AttnLRP(model)(x, [0, 2]), attribution.InputXGradient(model)(x, [0, 2]))
