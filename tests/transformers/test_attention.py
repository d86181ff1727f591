"""Attention capture, attention rollout and generic attention against explicit references."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution
from attribution.transformers import AttentionCapture, token_layout, tokens_to_map
from conftest import tiny_cnn, tiny_vit
from vit_parts import hooked_attention

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5).eval()


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("build", [lambda: tiny_vit(fused=True), lambda: tiny_vit(fused=False), torchvision_vit])
def test_capture_leaves_the_output_unchanged_and_sees_every_block(build):
    model = build()
    side = 32 if isinstance(model, torchvision.models.VisionTransformer) else 16
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        reference = model(x)
    with AttentionCapture(model) as capture:
        out = model(x)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    depth = len(model.blocks) if hasattr(model, "blocks") else len(model.encoder.layers)
    assert len(capture.maps) == depth
    tokens = 1 + (side // (4 if side == 16 else 8)) ** 2
    assert all(m.shape == (2, 2, tokens, tokens) for m in capture.maps)
    torch.testing.assert_close(capture.maps[0].sum(-1), torch.ones(2, 2, tokens))
    assert not any(m._forward_hooks for m in model.modules())


def test_captured_fused_attention_equals_timms_unfused_attention(x):
    fused = tiny_vit(fused=True)
    with AttentionCapture(fused) as capture:
        fused(x)
    _, unfused_maps = hooked_attention(tiny_vit(fused=False), x)
    for ours, theirs in zip(capture.maps, unfused_maps):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(blk.attn.fused_attn for blk in fused.blocks)  # the model's flag is untouched


def reference_rollout(maps, fusion="mean"):
    tokens = maps[0].shape[-1]
    result = torch.eye(tokens).expand(maps[0].shape[0], tokens, tokens)
    for m in maps:
        fused = {"mean": m.mean(1), "max": m.max(1).values, "min": m.min(1).values}[fusion]
        a = 0.5 * fused + 0.5 * torch.eye(tokens)
        a = a / a.sum(-1, keepdim=True)
        result = torch.bmm(a, result)
    return result


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_equals_explicit_matrix_products(x, fusion):
    model = tiny_vit(fused=False)
    _, maps = hooked_attention(model, x)
    expected = reference_rollout([m.detach() for m in maps], fusion)[:, 0, 1:].reshape(2, 1, 4, 4)
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    ours = attribution.AttentionRollout(tiny_vit(fused=True))(x, head_fusion=fusion)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_rollout_discard_ratio_zeroes_the_lowest_entries_but_the_class_token():
    from attribution.transformers.rollout import discard_lowest

    fused = torch.tensor([[[0.0, 0.5], [0.2, 0.3]]])
    torch.testing.assert_close(discard_lowest(fused, 0.5), torch.tensor([[[0.0, 0.5], [0.0, 0.3]]]))
    kept = discard_lowest(torch.tensor([[[0.1, 0.5], [0.2, 0.3]]]), 0.5)
    torch.testing.assert_close(kept, torch.tensor([[[0.1, 0.5], [0.0, 0.3]]]))


def test_generic_attention_equals_its_formula_on_the_unfused_model(x):
    model = tiny_vit(fused=False)
    rows = x.clone().requires_grad_(True)
    out, maps = hooked_attention(model, rows)
    grads = torch.autograd.grad(out[[0, 1], [3, 1]].sum(), maps)
    relevance = torch.eye(17).expand(2, 17, 17)
    for a, g in zip(maps, grads):
        relevance = relevance + torch.bmm((a * g).clamp(min=0).mean(1), relevance)
    expected = (relevance - torch.eye(17))[:, 0, 1:].reshape(2, 1, 4, 4).detach()
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    ours = attribution.GenericAttention(tiny_vit(fused=True))(x, [3, 1])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


def test_generic_attention_is_class_discriminative_rollout_is_not(x):
    model = tiny_vit()
    generic = attribution.GenericAttention(model)
    rollout = attribution.AttentionRollout(model)
    assert not torch.allclose(generic(x, [0, 0]), generic(x, [4, 4]))
    torch.testing.assert_close(rollout(x, [0, 0]), rollout(x, [4, 4]))


def test_grad_sam_equals_its_formula_on_the_unfused_model(x):
    """mean over blocks and heads of A * ReLU(dA), the class token's row over the patches."""
    model = tiny_vit(fused=False)
    out, maps = hooked_attention(model, x.clone().requires_grad_(True))
    grads = torch.autograd.grad(out[[0, 1], [3, 1]].sum(), maps)
    relevance = sum((a * g.clamp(min=0)).mean(1) for a, g in zip(maps, grads)) / len(maps)
    expected = relevance[:, 0, 1:].reshape(2, 1, 4, 4).detach()
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    ours = attribution.GradSAM(tiny_vit(fused=True))(x, [3, 1])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-8)
    assert (ours >= 0).all() and not torch.allclose(ours, attribution.GradSAM(model)(x, [0, 0]))


def test_ag_cam_equals_the_authors_formula_with_scores_read_from_qkv(x):
    """sum over blocks and heads of sigmoid(q k^T * scale) * ReLU(dA) on the class token's row, the scores rebuilt
    from each block's qkv projection (timm's unfused path), for the fused and the unfused model."""
    model = tiny_vit(fused=False)
    qkv = []
    handles = [blk.attn.qkv.register_forward_hook(lambda m, i, o: qkv.append(o)) for blk in model.blocks]
    try:
        out, maps = hooked_attention(model, x)
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(out[[0, 1], [3, 1]].sum(), maps)
    total = 0
    for block, output, grad in zip(model.blocks, qkv, grads):
        heads = block.attn.num_heads
        q, k, _ = output.reshape(2, 17, 3, heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q * block.attn.scale) @ k.transpose(-2, -1)
        total = total + (torch.sigmoid(scores) * grad.clamp(min=0)).sum(1)
    expected = total[:, 0, 1:].reshape(2, 1, 4, 4).detach()
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    for fused in (True, False):
        torch.testing.assert_close(attribution.AGCAM(tiny_vit(fused=fused))(x, [3, 1]), expected, rtol=1e-4,
                                   atol=1e-8)
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        attribution.AGCAM(model)(x, 0, head_fusion="median")


@pytest.mark.parametrize("block, fusion", [(-1, "mean"), (0, "max"), (1, "min")])
def test_raw_attention_is_one_blocks_class_token_row(x, block, fusion):
    _, maps = hooked_attention(tiny_vit(fused=False), x)
    fused = {"mean": maps[block].mean(1), "max": maps[block].amax(1), "min": maps[block].amin(1)}[fusion]
    expected = fused[:, 0, 1:].reshape(2, 1, 4, 4).detach()
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    explainer = attribution.RawAttention(tiny_vit(fused=True), block=block, head_fusion=fusion)
    torch.testing.assert_close(explainer(x, 0), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explainer(x, 0), explainer(x, 4))  # class-agnostic


def test_raw_attention_names_a_bad_block(x):
    with pytest.raises(ValueError, match="block must be an int index into the model's 2 attention blocks"):
        attribution.RawAttention(tiny_vit())(x, 0, block=2)


def beyond_intuition_written_out(model, image, cls, steps, start):
    """The authors' head-wise algorithm for one image on timm's unfused attention: head importances from the
    image's attention and gradients, R <- R + (sum_h I_h A_h) R from block ``start`` on, then the class token's row
    of mean_heads ReLU(mean gradient of the last attention over input * alpha, alpha = linspace(0, 1, steps)) * R."""
    out, maps = hooked_attention(model, image[None])
    grads = torch.autograd.grad(out[0, cls], maps)
    tokens = maps[0].shape[-1]
    relevance = torch.eye(tokens)
    for a, g in list(zip(maps, grads))[start:]:
        a, g = a[0].detach(), g[0]
        importance = torch.stack([(a[h].T @ g[h]).abs().mean() for h in range(a.shape[0])])
        importance = importance / importance.sum()
        relevance = relevance + sum(importance[h] * a[h] for h in range(a.shape[0])) @ relevance
    total = torch.zeros_like(maps[-1][0])
    for alpha in torch.linspace(0, 1, steps):
        out, maps = hooked_attention(model, image[None] * alpha)
        total = total + torch.autograd.grad(out[0, cls], maps[-1])[0][0]
    weights = (total / steps).clamp(min=0).mean(0)
    return (weights * relevance)[0, 1:].reshape(1, 4, 4)


@pytest.mark.parametrize("start", [0, 1])
def test_beyond_intuition_equals_the_authors_algorithm(x, start):
    model = tiny_vit(fused=False)
    expected = torch.stack([beyond_intuition_written_out(model, image, cls, 5, start)
                            for image, cls in zip(x, [3, 1])])
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    explainer = attribution.BeyondIntuition(tiny_vit(fused=True), steps=5, start_block=start)
    torch.testing.assert_close(explainer(x, [3, 1]), expected, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(explainer(x, [3, 1], batch_size=3), expected, rtol=1e-4, atol=1e-8)


def test_beyond_intuition_names_bad_options(x):
    explainer = attribution.BeyondIntuition(tiny_vit())
    with pytest.raises(ValueError, match="start_block=3 but the model has 2 attention blocks"):
        explainer(x, 0)
    with pytest.raises(ValueError, match="steps must be an int >= 2"):
        explainer(x, 0, steps=1, start_block=0)


def test_models_without_global_attention_get_a_clear_error(x):
    with pytest.raises(ValueError, match="found no attention"):
        attribution.AttentionRollout(tiny_cnn())(x, 0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=5).eval()
    with pytest.raises(ValueError, match="windowed attention"):
        attribution.GenericAttention(swin)(torch.randn(1, 3, 56, 56), 0)


@pytest.mark.parametrize("registers", [0, 4])
def test_token_layout_reads_prefix_tokens_and_non_square_grids(registers):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=(24, 40), patch_size=8, embed_dim=16, depth=1, num_heads=2,
                              reg_tokens=registers, num_classes=3)
    layout = token_layout(model, (24, 40), 1 + registers + 15)
    assert (layout.prefix, layout.height, layout.width) == (1 + registers, 3, 5)
    tokens = torch.arange(2 * layout.tokens * 2, dtype=torch.float32).view(2, layout.tokens, 2)
    grid = tokens_to_map(tokens, layout)
    assert grid.shape == (2, 2, 3, 5)
    assert torch.equal(grid[0, 0, 1, 2], tokens[0, layout.prefix + 1 * 5 + 2, 0])  # row-major patch order
    with pytest.raises(ValueError, match="cannot lay out the 17 tokens"):
        token_layout(model, (24, 40), 17)


def test_rollout_on_a_non_square_input_uses_the_right_grid():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=(16, 32), patch_size=8, embed_dim=16, depth=2, num_heads=2,
                              num_classes=3).eval()
    out = attribution.AttentionRollout(model)(torch.randn(1, 3, 16, 32))
    assert out.shape == (1, 1, 16, 32)


# ---------------------------------------------------------------------------------------------------- AttCAT
def test_attention_blocks_are_the_children_holding_one_attention_call_each():
    from attribution.transformers.attcat import attention_blocks

    assert attention_blocks(tiny_vit(), torch.randn(1, 3, 16, 16)) == ["blocks.0", "blocks.1"]
    assert attention_blocks(torchvision_vit(), torch.randn(1, 3, 32, 32)) == [
        f"encoder.layers.encoder_layer_{i}" for i in range(3)]
    with pytest.raises(ValueError, match="found no attention"):
        attention_blocks(tiny_cnn(), torch.randn(1, 3, 16, 16))


def test_attcat_equals_its_formula_on_the_unfused_model(x):
    """R_i = sum over blocks of mean_{heads, queries} A[:, i] * sum_d (grad h * h)_i, h the block's input tokens."""
    model = tiny_vit(fused=False)
    inputs = []
    handles = [blk.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for blk in model.blocks]
    try:
        out, maps = hooked_attention(model, x)
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(out[[0, 1], [2, 4]].sum(), inputs)
    relevance = sum(a.mean((1, 2)) * (g * h).sum(-1) for a, g, h in zip(maps, grads, inputs))
    expected = relevance[:, 1:].reshape(2, 1, 4, 4).detach()
    expected = nn.functional.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    ours = attribution.AttCAT(tiny_vit(fused=True))(x, [2, 4])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


def test_attcat_runs_on_torchvisions_vit_and_is_class_discriminative():
    model = torchvision_vit()
    torch.manual_seed(5)
    nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zero: no gradient would flow
    images = torch.randn(2, 3, 32, 32)
    attcat = attribution.AttCAT(model)
    first, other = attcat(images, [0, 0]), attcat(images, [3, 3])
    assert first.shape == (2, 1, 32, 32) and torch.isfinite(first).all()
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name, cls", [("atman", "AtMan"), ("tis", "TIS"), ("legrad", "LeGrad"), ("alti", "ALTI")])
def test_a_model_without_attention_is_refused_by_the_method_by_name(name, cls):
    from conftest import tiny_cnn

    with pytest.raises(ValueError, match=rf"^{cls} found no attention in Sequential's forward pass; it needs a "):
        attribution.create(name, tiny_cnn())(torch.randn(1, 3, 16, 16), 0)
