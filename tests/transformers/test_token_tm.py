"""TokenTM (Wu et al., CVPR 2024): the algorithm written out one image at a time (explicit attention, explicit U
matrices, the token transformation effects in plain loops) on timm's and torchvision's ViTs, its NECC and length
terms against hand formulas, and the call's invariants."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Callable, List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attribution
from attribution.transformers.token_tm import TokenTM, token_transformation_rollout, transformation_weights
from conftest import check_parameter_derivative, tiny_cnn, tiny_vit
from vit_parts import first_block_inputs, timm_blocks, torchvision_blocks  # noqa: E402

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")


# ------------------------------------------------------------------------------------------ the written-out algorithm
def effects(before: Tensor, after: Tensor) -> Tensor:
    """(N,) transformation effects of one image's (N, D) tokens, token by token: length ratio (LibraGrad's 1e-8 on
    the denominator) times NECC."""
    n = before.shape[0]
    cosines = [float(before[i] @ after[i]) / (float(before[i].norm()) * float(after[i].norm())) for i in range(n)]
    total = sum(math.exp(c) for c in cosines)
    return torch.tensor([float(after[i].norm()) / (float(before[i].norm()) + 1e-8) * math.exp(cosines[i]) / total
                         for i in range(n)], dtype=before.dtype)


def written_out(tokens: Tensor, blocks: List[SimpleNamespace], final: Callable[[Tensor], Tensor], target: int,
                grid: tuple, size: tuple) -> Tensor:
    """One image's map from the tokens entering the first block (1, N, D)."""
    x, states, maps = tokens.detach(), [], []
    for blk in blocks:  # the forward, attention explicit
        n, dim = x.shape[1:]
        qkv = F.linear(blk.norm1(x), *blk.qkv).reshape(1, n, 3, blk.heads, dim // blk.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q @ k.transpose(-2, -1)) * blk.scale).softmax(dim=-1)
        maps.append(a)
        middle = x + F.linear((a @ v).transpose(1, 2).reshape(1, n, dim), *blk.proj)
        leaving = middle + F.linear(blk.act(F.linear(blk.norm2(middle), *blk.fc1)), *blk.fc2)
        states.append((x[0].detach(), middle[0].detach(), leaving[0].detach()))
        x = leaving
    gradients = torch.autograd.grad(final(x)[0, target], maps)
    with torch.no_grad():
        n = x.shape[1]
        eye = torch.eye(n, dtype=x.dtype)
        contribution = torch.diag(torch.stack([states[0][0][i].norm() for i in range(n)]))  # initialisation rule
        for a, grad, (entering, middle, leaving) in zip(maps, gradients, states):  # aggregation rule
            u_attn = eye + (a[0].mean(dim=0) @ torch.diag(effects(entering, middle))) * grad[0].clamp(min=0).mean(0)
            u_mlp = eye + torch.diag(effects(middle, leaving))
            contribution = u_mlp @ u_attn @ contribution
    patches = contribution[0, 1:].reshape(1, 1, *grid)  # the [CLS] row over the patches
    return F.interpolate(patches, size=size, mode="bilinear", align_corners=False)


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=6).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at 0
    return model


@pytest.mark.parametrize("fused", [True, False])
def test_equals_the_written_out_algorithm_on_timms_vit(fused):
    model = tiny_vit(fused=fused).double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = [1, 3, 0]
    tokens = first_block_inputs(model, model.blocks[0], x)
    final = lambda t: model.forward_head(model.norm(t))  # noqa: E731
    expected = torch.cat([written_out(tokens[i:i + 1], timm_blocks(model), final, t, (4, 4), (16, 16))
                          for i, t in enumerate(targets)])
    ours = TokenTM(model)(x, targets)
    assert ours.dtype == torch.float64 and float(expected.amax()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-14)


def test_equals_the_written_out_algorithm_on_torchvisions_vit():
    model = torchvision_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = [2, 5]
    tokens = first_block_inputs(model, model.encoder.layers[0], x)
    final = lambda t: model.heads(model.encoder.ln(t)[:, 0])  # noqa: E731
    expected = torch.cat([written_out(tokens[i:i + 1], torchvision_blocks(model), final, t, (4, 4), (32, 32))
                          for i, t in enumerate(targets)])
    ours = TokenTM(model)(x, targets)
    assert float(expected.amax()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------------------ the terms, by hand
def test_transformation_weights_equal_the_hand_formula():
    before = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    after = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([effects(before[b], after[b]) for b in range(2)])
    torch.testing.assert_close(transformation_weights(before, after), expected, rtol=1e-12, atol=0)


def test_a_zero_length_token_stays_finite():
    """A token of length 0 before a transformation (a zero class token, float32): LibraGrad's 1e-8, not inf."""
    before = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    after = torch.tensor([[[5.0, 0.0], [1.0, 1.0]]])
    weights = transformation_weights(before, after)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights[0, 0], torch.tensor(5.0 / 1e-8 * math.exp(0) / (1 + math.exp(2 ** -0.5))))


def test_transformation_weights_closed_forms():
    before = torch.randn(1, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    # same directions: every cosine is 1, NECC is 1/N, the effect the length ratio over N
    torch.testing.assert_close(transformation_weights(before, before * scale[:, None]), scale[None] / 4)
    # reversed directions: cosine -1 everywhere, NECC still 1/N (a softmax of equal numbers)
    torch.testing.assert_close(transformation_weights(before, -before), torch.full((1, 4), 0.25, dtype=torch.float64))
    # one token kept, three turned orthogonal (same length): NECC e / (e + 3) against 1 / (e + 3)
    basis = torch.eye(4, dtype=torch.float64)[None]
    turned = torch.stack([basis[0, 0], basis[0, 2], basis[0, 3], basis[0, 0]])[None]
    e = math.e
    torch.testing.assert_close(transformation_weights(basis, turned),
                               torch.tensor([[e, 1.0, 1.0, 1.0]], dtype=torch.float64) / (e + 3))


def test_rollout_equals_the_u_matrices():
    """C_0 = diag |E_0|, C <- (I + diag w_mlp)(I + (mean_h A diag w_attn) * mean_h ReLU(dA)) C, as matrices."""
    g = torch.Generator().manual_seed(3)
    batch, heads, n, dim = 2, 3, 4, 5
    attention = [torch.rand(batch, heads, n, n, generator=g, dtype=torch.float64).softmax(-1) for _ in range(2)]
    gradients = [torch.randn(batch, heads, n, n, generator=g, dtype=torch.float64) for _ in range(2)]
    states = [torch.randn(batch, n, dim, generator=g, dtype=torch.float64) for _ in range(5)]
    tokens = [(states[0], states[1], states[2]), (states[2], states[3], states[4])]
    ours = token_transformation_rollout(attention, gradients, tokens)
    eye = torch.eye(n, dtype=torch.float64)
    for b in range(batch):
        c = torch.diag(states[0][b].norm(dim=-1))
        for a, grad, (e, m, o) in zip(attention, gradients, tokens):
            u_attn = eye + a[b].mean(0) @ torch.diag(effects(e[b], m[b])) * grad[b].clamp(min=0).mean(0)
            c = (eye + torch.diag(effects(m[b], o[b]))) @ u_attn @ c
        torch.testing.assert_close(ours[b], c, rtol=1e-12, atol=1e-15)


def test_without_gradients_the_attention_drops_out():
    """A score that ignores the image has zero attention gradients: every U is diagonal, so C stays diagonal
    and the class token's row over the patches is exactly 0."""
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    maps = TokenTM(model)(x, lambda scores: scores[:, 0] * 0)
    assert torch.equal(maps, torch.zeros_like(maps))


# ------------------------------------------------------------------------------------------ the call's invariants
def test_images_are_independent_and_batch_size_is_honoured():
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    together = TokenTM(model)(x, [0, 2, 4])
    alone = torch.cat([TokenTM(model)(x[i:i + 1], [t]) for i, t in enumerate([0, 2, 4])])
    chunked = TokenTM(model, batch_size=2)(x, [0, 2, 4])
    assert float(together.amax()) > 0 and bool((together >= 0).all())
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(chunked, together)


def test_fused_equals_unfused_attention():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(TokenTM(tiny_vit(fused=True))(x, [1, 2]), TokenTM(tiny_vit(fused=False))(x, [1, 2]))


def test_targets_change_the_map():
    model = tiny_vit()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    first, second = TokenTM(model)(x, 0), TokenTM(model)(x, 3)
    assert not torch.allclose(first / first.amax(), second / second.amax(), atol=1e-3)


def test_create_graph_gives_the_maps_true_parameter_derivative():
    model = tiny_vit().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    explainer = TokenTM(model)
    maps = explainer(x, [1, 3], create_graph=True)
    torch.testing.assert_close(maps.detach(), explainer(x, [1, 3]))
    check_parameter_derivative(lambda create_graph: explainer(x, [1, 3], create_graph=create_graph), model,
                               ("blocks.1.mlp.fc1.weight", "head.weight", "pos_embed"))


def test_pre_norm_torch_encoder_layers_work():
    """nn.TransformerEncoderLayer(norm_first=True) is a pre-norm block (its second norm's input is the residual
    stream after the attention); an image's map is the same alone and in a batch."""
    model = TorchEncoderViT(norm_first=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    together = TokenTM(model)(x, [1, 4])
    assert float(together.amax()) > 0
    torch.testing.assert_close(TokenTM(model)(x[1:], [4]), together[1:])


# ------------------------------------------------------------------------------------------ defaults and bad input
def test_defaults_and_registration():
    assert TokenTM.defaults == {}  # the paper's method has no hyperparameters
    assert TokenTM.kind == "attention" and TokenTM.name == "token_tm"
    assert type(attribution.create("token_tm", tiny_vit())) is TokenTM
    with pytest.raises(TypeError, match="unknown option 'start_block'"):
        TokenTM(tiny_vit(), start_block=1)


def test_a_cnn_is_refused():
    with pytest.raises(ValueError, match="found no attention"):
        TokenTM(tiny_cnn())(torch.randn(1, 3, 16, 16), 0)


def test_post_norm_blocks_are_refused():
    with pytest.raises(ValueError, match="TokenTM needs pre-norm blocks.*'encoder.layers.0' of TorchEncoderViT"):
        TokenTM(TorchEncoderViT(norm_first=False))(torch.randn(1, 3, 16, 16), 0)


class TorchEncoderViT(nn.Module):
    """4x4 patches, a class token and torch's own transformer encoder (2 layers, batch first)."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.encoder(tokens)[:, 0])
