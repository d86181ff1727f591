"""Transition Attention Maps (Yuan et al., NeurIPS 2021 XAI4Debugging): the authors' algorithm written out one image
at a time (explicit q/k/v attention, the chain and the integrated gradients in plain loops) on timm's and
torchvision's ViTs, closed forms on uniform attention, and the call's invariants."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attribution
from attribution.transformers.tam import TAM, transition_states
from conftest import RowCounter, check_parameter_derivative, tiny_cnn, tiny_vit

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")


# ------------------------------------------------------------------------------------------------------ toy models
def timm_vit(depth: int = 4, fused: bool = True, seed: int = 0) -> nn.Module:
    """timm's ViT: class token, 4x4 patches on 16x16 inputs (17 tokens), 2 heads, ``depth`` blocks."""
    return tiny_vit(seed=seed, fused=fused, depth=depth)


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=6).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at 0: no gradient would flow
    return model


def timm_parts(model: nn.Module) -> SimpleNamespace:
    blocks = [SimpleNamespace(norm1=b.norm1, norm2=b.norm2, qkv=(b.attn.qkv.weight, b.attn.qkv.bias),
                              proj=(b.attn.proj.weight, b.attn.proj.bias), mlp=b.mlp, heads=b.attn.num_heads,
                              scale=b.attn.scale) for b in model.blocks]
    return SimpleNamespace(first=model.blocks[0], blocks=blocks, final=lambda t: model.forward_head(model.norm(t)))


def torchvision_parts(model: nn.Module) -> SimpleNamespace:
    blocks = [SimpleNamespace(norm1=b.ln_1, norm2=b.ln_2,
                              qkv=(b.self_attention.in_proj_weight, b.self_attention.in_proj_bias),
                              proj=(b.self_attention.out_proj.weight, b.self_attention.out_proj.bias), mlp=b.mlp,
                              heads=b.self_attention.num_heads, scale=b.self_attention.head_dim ** -0.5)
              for b in model.encoder.layers]
    return SimpleNamespace(first=model.encoder.layers[0], blocks=blocks,
                           final=lambda t: model.heads(model.encoder.ln(t)[:, 0]))


# ------------------------------------------------------------------------------------------ the written-out algorithm
def tokens_entering(model: nn.Module, first: nn.Module, image: Tensor) -> Tensor:
    """The (1, N, D) tokens the first block receives for one image (embedding, class token, positions)."""
    seen = []
    handle = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(image[None])
    finally:
        handle.remove()
    return seen[0]


def explicit_forward(tokens: Tensor, parts: SimpleNamespace):
    """Logits and each block's (1, heads, N, N) attention, the attention computed from q, k and v by hand."""
    x, maps = tokens, []
    for blk in parts.blocks:
        n, dim = x.shape[1:]
        qkv = F.linear(blk.norm1(x), *blk.qkv)
        q, k, v = (qkv[..., i * dim:(i + 1) * dim].reshape(1, n, blk.heads, dim // blk.heads).transpose(1, 2)
                   for i in range(3))
        a = ((q @ k.transpose(-2, -1)) * blk.scale).softmax(dim=-1)
        maps.append(a)
        x = x + F.linear((a @ v).transpose(1, 2).reshape(1, n, dim), *blk.proj)
        x = x + blk.mlp(blk.norm2(x))
    return parts.final(x), maps


def tam_written_out(model: nn.Module, parts: SimpleNamespace, image: Tensor, cls: int, steps: int, start: int,
                    grid: tuple) -> Tensor:
    """The authors' TAM for one image: the class token's state from the last block's attention, stepped back
    through blocks L-2 .. start by s <- s A + s (A the mean over heads), times the class token's row of the mean
    over heads of ReLU(the last block's attention gradient averaged over the inputs image * k / (steps - 1))."""
    _, maps = explicit_forward(tokens_entering(model, parts.first, image), parts)
    maps = [m[0].detach() for m in maps]
    heads, n = maps[0].shape[0], maps[0].shape[-1]
    mean = [[[sum(float(m[h, i, j]) for h in range(heads)) / heads for j in range(n)] for i in range(n)]
            for m in maps]
    state = list(mean[-1][0])
    for block in reversed(range(start, len(maps) - 1)):
        state = [sum(state[j] * mean[block][j][i] for j in range(n)) + state[i] for i in range(n)]
    total = torch.zeros(heads, n, n, dtype=image.dtype)
    for k in range(steps):
        logits, maps = explicit_forward(tokens_entering(model, parts.first, image * (k / (steps - 1))), parts)
        total = total + torch.autograd.grad(logits[0, cls], maps[-1])[0][0]
    weights = [sum(max(float(total[h, 0, j]) / steps, 0.0) for h in range(heads)) / heads for j in range(n)]
    patches = torch.tensor([state[j] * weights[j] for j in range(1, n)], dtype=image.dtype)
    return patches.reshape(1, 1, *grid)


def written_out_maps(model: nn.Module, parts: SimpleNamespace, x: Tensor, targets: List[int], steps: int,
                     start: int, grid: tuple) -> Tensor:
    maps = torch.cat([tam_written_out(model, parts, image, cls, steps, start, grid) for image, cls in zip(x, targets)])
    return F.interpolate(maps, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("start", [0, 2, -1])
@pytest.mark.parametrize("fused", [True, False])
def test_equals_the_authors_algorithm_on_timms_vit(fused, start):
    model = timm_vit(fused=fused).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = written_out_maps(model, timm_parts(model), x, [3, 1], 5, start % 4, (4, 4))
    explainer = TAM(model, steps=5, start_block=start)
    ours = explainer(x, [3, 1])
    assert ours.dtype == torch.float64 and float(expected.amax()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-14)
    # 10 path rows in chunks of 3: paths and their end points split across chunks
    torch.testing.assert_close(explainer(x, [3, 1], batch_size=3), expected, rtol=1e-9, atol=1e-14)


def test_equals_the_authors_algorithm_on_torchvisions_vit():
    model = torchvision_vit().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = written_out_maps(model, torchvision_parts(model), x, [2, 5], 4, 1, (4, 4))
    ours = TAM(model, steps=4, start_block=1)(x, [2, 5])
    assert float(expected.amax()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-14)


def test_defaults_are_the_authors_and_equal_their_algorithm():
    """steps=20 and start_layer=4 (counted from 0) as the authors' evaluation code and InterpretDL; zero baseline."""
    assert TAM.defaults == {"steps": 20, "start_block": 4, "baseline": "zero"}
    assert TAM.kind == "attention" and TAM.name == "tam"
    assert type(attribution.create("tam", tiny_vit())) is TAM
    model = timm_vit(depth=6).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = written_out_maps(model, timm_parts(model), x, [4], 20, 4, (4, 4))
    torch.testing.assert_close(TAM(model)(x, 4), expected, rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------------------------------------------ closed forms
def test_transition_states_are_the_product_and_each_step_doubles_the_rows_total():
    g = torch.Generator().manual_seed(3)
    attention = [torch.randn(2, 3, 5, 5, generator=g, dtype=torch.float64).softmax(-1) for _ in range(4)]
    ours = transition_states(attention)
    eye = torch.eye(5, dtype=torch.float64)
    for b in range(2):
        a = [m[b].mean(0) for m in attention]
        torch.testing.assert_close(ours[b], a[3] @ (a[2] + eye) @ (a[1] + eye) @ (a[0] + eye), rtol=1e-12, atol=0)
    torch.testing.assert_close(ours.sum(-1), torch.full((2, 5), 8.0, dtype=torch.float64))
    torch.testing.assert_close(transition_states(attention[-1:]), attention[-1].mean(1))  # one block: its attention


def uniform_attention(model: nn.Module) -> nn.Module:
    """Zero queries and keys in every block: each attention map is uniform, 1/N everywhere."""
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[:2 * dim] = 0
            block.attn.qkv.bias[:2 * dim] = 0
    return model


def test_uniform_attention_gives_the_weights_times_powers_of_two_as_beyond_intuition():
    """Uniform attention U: the state is 2^(L-1-s) / N on every token, so TAM(s) = 2^(L-1-s) TAM(-1); Beyond
    Intuition's perception row from block b is e_cls + (2^(L-b) - 1) / N with the same integrated weights W, so on
    the patches TAM(s) (2^(L-b) - 1) = BI(b) 2^(L-1-s)."""
    model = uniform_attention(timm_vit().double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    one = TAM(model, steps=4, start_block=-1)(x, [0, 2])
    assert float(one.amax()) > 0
    for start in range(3):
        torch.testing.assert_close(TAM(model, steps=4, start_block=start)(x, [0, 2]), 2 ** (3 - start) * one,
                                   rtol=1e-10, atol=1e-15)
    beyond = attribution.BeyondIntuition(model, steps=4, start_block=1)(x, [0, 2])
    torch.testing.assert_close(one * (2 ** 3 - 1), beyond, rtol=1e-10, atol=1e-15)


def test_a_score_without_gradient_gives_a_zero_map():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    maps = TAM(model, steps=3, start_block=0)(x, lambda scores: scores[:, 0] * 0)
    assert torch.equal(maps, torch.zeros_like(maps))


# ------------------------------------------------------------------------------------------------ the call's invariants
def test_images_are_independent_and_batch_size_is_honoured():
    model = tiny_vit()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    explainer = TAM(model, steps=4, start_block=0)
    together = explainer(x, [0, 2, 4])
    alone = torch.cat([explainer(x[i:i + 1], [t]) for i, t in enumerate([0, 2, 4])])
    assert float(together.amax()) > 0 and bool((together >= 0).all())
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(explainer(x, [0, 2, 4], batch_size=5), together)


def test_targets_change_the_map():
    model = tiny_vit()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    explainer = TAM(model, steps=4, start_block=0)
    first, second = explainer(x, 0), explainer(x, 3)
    assert not torch.allclose(first / first.amax(), second / second.amax(), atol=1e-3)


def test_cost_is_steps_forwards_and_backwards_that_stop_at_the_last_block():
    model = timm_vit(depth=3)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    reached = []

    def mark(module: nn.Module, args, output: Tensor) -> None:
        if output.requires_grad:
            output.register_hook(lambda grad: reached.append(module))

    counter = RowCounter(model)
    handles = [model.blocks[i].register_forward_hook(mark) for i in (0, 1)]
    try:
        TAM(model, steps=5, start_block=0)(x, [1, 2])
    finally:
        counter.close()
        for handle in handles:
            handle.remove()
    assert sum(counter.rows) == 2 * 5
    assert reached == []  # no gradient flowed below the last block


def test_create_graph_gives_the_maps_true_parameter_derivative():
    model = timm_vit(depth=3).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    explainer = TAM(model, steps=3, start_block=0)
    maps = explainer(x, [1, 3], create_graph=True)
    torch.testing.assert_close(maps.detach(), explainer(x, [1, 3]))
    check_parameter_derivative(lambda create_graph: explainer(x, [1, 3], create_graph=create_graph), model,
                               ("blocks.0.attn.qkv.weight", "blocks.2.mlp.fc1.weight", "head.weight"))


# --------------------------------------------------------------------------------------------------------- bad input
def test_a_cnn_is_refused():
    with pytest.raises(ValueError, match="found no attention"):
        TAM(tiny_cnn(), steps=3, start_block=0)(torch.randn(1, 3, 16, 16), 0)


@pytest.mark.parametrize("options, message", [
    ({}, r"start_block must be an int from -2 to 1 \(the model has 2 attention blocks\), got 4"),
    ({"start_block": -3}, "start_block must be an int from -2 to 1.*got -3"),
    ({"start_block": 1.0}, "start_block must be an int, got 1.0"),
    ({"start_block": True}, "start_block must be an int, got True"),
    ({"start_block": 0, "steps": 1}, "steps must be an int >= 2.*got 1"),
    ({"start_block": 0, "steps": 2.5}, "steps must be an int >= 2.*got 2.5"),
    ({"start_block": 0, "baseline": "grey"}, "baseline must be 'black', 'white', 'zero'.*'grey'"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        TAM(tiny_vit())(torch.randn(1, 3, 16, 16), 0, **options)
    with pytest.raises(TypeError, match="unknown option 'start_layer'"):
        TAM(tiny_vit(), start_layer=4)

