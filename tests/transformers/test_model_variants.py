"""The transformer methods on model variants and call paths beyond the plain timm ViT, each against the plain
model's map or the formula written out: timm's gradient checkpointing, sequence-first ``nn.TransformerEncoder``
layers (against a batch-first twin with the same weights), attention-pooled (``global_pool='map'``), padded
(``dynamic_img_pad``) and hybrid ViTs, distilled DeiT (class and distillation rows averaged); and what each call
costs: forwards counted with a forward hook (``target=None`` reads its arg-max from the images' own rows; bad
options fail before any forward) and gradient rows reaching each block counted with tensor hooks (Beyond
Intuition's backward reaches every block at the images only)."""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.spatial import spatial_layout
from attribution.transformers.attcat import attention_blocks
from attribution.transformers.attention_flow import max_flows
from attribution.transformers.rollout import with_residual
from attribution.transformers.tokens import TokenLayout, token_layout
from conftest import tiny_vit
from vit_parts import hooked_attention

timm = pytest.importorskip("timm")
pytest.importorskip("scipy")

#: every method whose backward runs through the blocks (registry names), with cheap options
GRADIENT_METHODS: Dict[str, dict] = {
    "generic_attention": {}, "transformer_attribution": {}, "beyond_intuition": {"steps": 3, "start_block": 0},
    "tam": {"steps": 3, "start_block": 0}, "attcat": {}, "ag_cam": {}, "legrad": {}, "token_tm": {}, "grad_sam": {},
}


def timm_vit(cls=None, fused: bool = True, **options) -> nn.Module:
    """``tiny_vit``'s model (4x4 patches, 2 blocks of 2 heads, width 24, 5 classes), of another timm class."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = (cls or VisionTransformer)(**{"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2,
                                          "num_heads": 2, "mlp_ratio": 2.0, "num_classes": 5, **options})
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model.eval()


def rollout_written_out(maps: List[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout, heads averaged: ``prod_l ((A_l + I) / 2, rows renormalised)``, (B, N, N)."""
    tokens = maps[0].shape[-1]
    rollout = torch.eye(tokens).expand(maps[0].shape[0], tokens, tokens)
    for a in maps:
        step = (a.mean(dim=1) + torch.eye(tokens)) / 2
        rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def upsampled(rows: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
    return F.interpolate(rows.reshape(-1, 1, *grid), size=size, mode="bilinear", align_corners=False)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))


# ------------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("name", sorted(GRADIENT_METHODS))
def test_timm_gradient_checkpointing_gives_the_plain_models_map_and_stays_on(x, name):
    """timm checkpoints its blocks in eval mode too; the backward then recomputed them outside the attention capture
    (torch.utils.checkpoint's CheckpointError).  The call turns it off and back on."""
    expected = A.create(name, tiny_vit(depth=3), **GRADIENT_METHODS[name])(x, [0, 2])
    model = tiny_vit(depth=3)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(A.create(name, model, **GRADIENT_METHODS[name])(x, [0, 2]), expected, rtol=0, atol=0)
    assert model.grad_checkpointing is True


# ------------------------------------------------------------------------------------------ sequence-first
class SequenceViT(nn.Module):
    """Conv patches (4x4 on 16x16: 16 tokens), a class token and position embeddings, torch's encoder (2 pre-norm
    layers of 2 heads, width 24) read at the class token; ``batch_first=False`` is torch's default layout,
    (N, B, D) tokens through the layers."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 24) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17, 24) * 0.5)
        layer = nn.TransformerEncoderLayer(24, 2, 48, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(24, 5)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        if self.batch_first:
            return self.head(self.encoder(tokens)[:, 0])
        return self.head(self.encoder(tokens.transpose(0, 1))[0])


def sequence_twins() -> Tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    first = SequenceViT(batch_first=False).eval()
    twin = SequenceViT(batch_first=True).eval()
    twin.load_state_dict(first.state_dict())
    return first, twin


def seeded(name: str) -> dict:
    """TIS's k-means draws, fixed."""
    return {"generator": torch.Generator().manual_seed(1)} if name == "tis" else {}


@pytest.mark.parametrize("name, options", [
    ("attcat", {}), ("legrad", {}), ("token_tm", {}), ("value_zeroing", {}), ("alti", {}), ("attention_norm", {}), ("globenc", {}), ("decompx", {}), ("atman", {}), ("tis", {"n_masks": 6}),
    ("attention_rollout", {}), ("transformer_attribution", {})])
def test_sequence_first_encoders_give_their_batch_first_twins_maps(name, options):
    """17 images of 17 tokens: the batch and the token dimensions of the layers' (N, B, D) tokens have one size,
    so only the layers' layout tells them apart (AttCAT returned 17 maps for 1 image and wrong ones here; TIS and
    LeGrad failed)."""
    first, twin = sequence_twins()
    x = torch.randn(17, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(17) % 5
    with torch.no_grad():
        torch.testing.assert_close(first(x), twin(x))
    expected = A.create(name, twin, **options)(x, labels, **seeded(name))
    tolerance = {"rtol": 1e-4, "atol": 1e-6 * float(expected.abs().amax())}
    assert float(expected.abs().amax()) > 0
    torch.testing.assert_close(A.create(name, first, **options)(x, labels, **seeded(name)), expected, **tolerance)
    alone = A.create(name, first, **options)(x[:1], labels[:1], **seeded(name))
    if name != "tis":  # TIS's k-means draws are shared by the images of a call
        torch.testing.assert_close(alone, expected[:1], **tolerance)


# ------------------------------------------------------------------------------------ attention-pooled ViTs
def test_block_attention_leaves_out_only_a_trailing_pooling_head():
    from attribution.transformers.attention import block_attention

    square, pooled = torch.rand(2, 2, 17, 17), torch.rand(2, 2, 1, 17)
    kept = block_attention([square, square, pooled])
    assert len(kept) == 2 and all(k is square for k in kept)
    assert len(block_attention([square, pooled, square])) == 3  # cross-attention inside the blocks: kept (refused)
    assert len(block_attention([pooled])) == 1


def test_attention_pooled_vits_are_explained_through_their_blocks(x):
    """timm's ``global_pool='map'`` adds a (B, heads, 1, N) attention call after the blocks (its latent query),
    which every method refused ("windowed attention", "cannot find the blocks"): it belongs to the head."""
    model = timm_vit(class_token=False, global_pool="map")  # the pool's attention runs through F.sdpa: captured
    unfused = timm_vit(class_token=False, global_pool="map", fused=False)  # same weights: blocks hooked by hand
    assert attention_blocks(model, x[:1]) == ["blocks.0", "blocks.1"]
    out, maps = hooked_attention(unfused, x)
    rollout = rollout_written_out([m.detach() for m in maps])
    torch.testing.assert_close(A.AttentionRollout(model)(x), upsampled(rollout.mean(dim=1), (4, 4), (16, 16)))
    targets = torch.tensor([1, 3])
    grads = torch.autograd.grad(out[torch.arange(2), targets].sum(), maps)
    relevance = torch.eye(16).expand(2, 16, 16)
    for a, g in zip(maps, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(dim=1) @ relevance
    expected = upsampled((relevance - torch.eye(16)).mean(dim=1).detach(), (4, 4), (16, 16))
    ours = A.GenericAttention(model)(x, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().amax()))
    tokens: List[torch.Tensor] = []  # AttCAT written out: the tokens entering each block and their gradients
    handles = [b.register_forward_pre_hook(lambda m, args: tokens.append(args[0])) for b in unfused.blocks]
    out, maps = hooked_attention(unfused, x)
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(out[torch.arange(2), targets].sum(), tokens)
    scores = sum(a.detach().mean(dim=(1, 2)) * (g * h.detach()).sum(dim=-1) for a, g, h in zip(maps, grads, tokens))
    expected = upsampled(scores, (4, 4), (16, 16))
    ours = A.AttCAT(model)(x, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().amax()))


# ------------------------------------------------------------------------------- padded and hybrid layouts
def test_padded_inputs_are_laid_out_on_the_padded_grid_and_cropped():
    """``dynamic_img_pad``: an 18x22 input is padded to 20x24 (5x6 patches of 4), at the bottom and right; the map
    is the patch grid upsampled to the padded size, cropped to the input."""
    options = {"dynamic_img_size": True, "dynamic_img_pad": True}
    model, unfused = timm_vit(**options), timm_vit(fused=False, **options)
    x = torch.randn(2, 3, 18, 22, generator=torch.Generator().manual_seed(6))
    layout = token_layout(model, (18, 22), 31)
    assert (layout.prefix, layout.height, layout.width, layout.extent) == (1, 5, 6, (20, 24))
    _, maps = hooked_attention(unfused, x)
    rows = rollout_written_out([m.detach() for m in maps])[:, 0, 1:]
    expected = upsampled(rows, (5, 6), (20, 24))[..., :18, :22]
    torch.testing.assert_close(A.AttentionRollout(model)(x), expected)
    assert A.AtMan(model)(x, 0).shape == (2, 1, 18, 22)


def test_hybrid_embeddings_give_the_backbones_grid():
    """A hybrid ViT's patches come after a strided CNN: 16x16 images, stride 4, then 2x2 patches: a 2x2 grid."""
    from functools import partial

    from timm.layers import HybridEmbed

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1))
    model = timm_vit(fused=False, patch_size=2, embed_layer=partial(HybridEmbed, backbone=backbone))
    assert token_layout(model, (16, 16), 5) == TokenLayout(1, 2, 2, class_token=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    _, maps = hooked_attention(model, x)
    expected = upsampled(rollout_written_out([m.detach() for m in maps])[:, 0, 1:], (2, 2), (16, 16))
    torch.testing.assert_close(A.AttentionRollout(model)(x), expected)


def test_token_layout_errors_name_a_reshape_transform_only_where_one_is_taken():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"cannot lay out the 18 tokens of the attention maps .* prefix tokens$"):
        token_layout(model, (16, 16), 18, "the attention maps")
    with pytest.raises(ValueError, match="prefix tokens; pass a reshape_transform"):
        spatial_layout(model, (16, 16), (2, 18, 24), "blocks.0")


# ------------------------------------------------------------------------------------------ distilled DeiT
def test_distilled_deit_maps_average_the_class_and_distillation_rows(x):
    """timm's distilled DeiT predicts ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``; with ``head`` zeroed only the
    distillation token carries the prediction, and the maps read the mean of the two tokens' rows."""
    from timm.models.deit import VisionTransformerDistilled

    model, unfused = timm_vit(VisionTransformerDistilled), timm_vit(VisionTransformerDistilled, fused=False)
    for m in (model, unfused):
        nn.init.zeros_(m.head.weight)
    layout = token_layout(model, (16, 16), 18)
    assert (layout.prefix, layout.class_token, layout.readout) == (2, True, 2)
    targets = torch.tensor([1, 3])
    out, maps = hooked_attention(unfused, x)
    rollout = rollout_written_out([m.detach() for m in maps])
    torch.testing.assert_close(A.AttentionRollout(model)(x), upsampled(rollout[:, :2, 2:].mean(dim=1), (4, 4),
                                                                       (16, 16)))
    grads = torch.autograd.grad(out[torch.arange(2), targets].sum(), maps)
    relevance = torch.eye(18).expand(2, 18, 18)
    for a, g in zip(maps, grads):
        relevance = relevance + (g * a).clamp(min=0).mean(dim=1) @ relevance
    expected = upsampled(relevance[:, :2, 2:].mean(dim=1).detach(), (4, 4), (16, 16))
    ours = A.GenericAttention(model)(x, targets)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().amax()))
    flows = []
    for image in range(2):
        capacities = torch.stack([with_residual(m[image].detach().mean(dim=0)) for m in maps])
        rows = [max_flows(capacities, [source])[0] for source in (0, 1)]
        flows.append(sum(r / r.sum() for r in rows)[2:] / 2)
    torch.testing.assert_close(A.AttentionFlow(model)(x), upsampled(torch.stack(flows), (4, 4), (16, 16)))


# ---------------------------------------------------------------------------------------- forwards counted
def counting(model: nn.Module) -> Tuple[List[int], List[int], Callable[[], None]]:
    """Rows of each model forward, and of each gradient reaching the model's output; and the hooks' remover."""
    forwards: List[int] = []
    backwards: List[int] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        forwards.append(args[0].shape[0])
        if out.requires_grad:
            out.register_hook(lambda g: backwards.append(g.shape[0]))

    return forwards, backwards, model.register_forward_hook(hook).remove


@pytest.mark.parametrize("name", ["attention_rollout", "raw_attention", "attention_flow", "generic_attention",
                                  "grad_sam", "ag_cam", "transformer_attribution", "attcat", "token_tm",
                                  "decompx"])
def test_target_none_reads_the_arg_max_from_the_images_own_forward(x, name):
    model = tiny_vit()
    explainer = A.create(name, model)
    explainer(x, 0)  # AttCAT and TokenTM find the blocks once per input size (a forward of one image)
    forwards, _, remove = counting(model)
    try:
        ours = explainer(x)
    finally:
        remove()
    assert forwards == [2]
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    torch.testing.assert_close(ours, explainer(x, classes), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tam", "beyond_intuition", "legrad"])
def test_target_none_of_path_and_per_block_rows_is_the_images_arg_max(x, name):
    """Their rows are path points or every block's prediction, not the images: None is resolved first."""
    model = tiny_vit()
    explainer = A.create(name, model, **GRADIENT_METHODS[name])
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    torch.testing.assert_close(explainer(x), explainer(x, classes), rtol=0, atol=0)


@pytest.mark.parametrize("name, options, message", [
    ("attention_rollout", {"discard_ratio": 1.5}, "discard_ratio must lie in"),
    ("attention_rollout", {"head_fusion": "median"}, "head_fusion must be"),
    ("raw_attention", {"head_fusion": "median"}, "head_fusion must be"),
    ("raw_attention", {"block": 1.0}, "block must be an int"),
    ("attention_flow", {"head_fusion": "median"}, "head_fusion must be"),
    ("ag_cam", {"head_fusion": "median"}, "head_fusion must be one of"),
    ("ag_cam", {"layer_fusion": "median"}, "layer_fusion must be one of"),
])
def test_bad_options_fail_before_any_forward(x, name, options, message):
    model = tiny_vit()
    forwards, _, remove = counting(model)
    try:
        with pytest.raises(ValueError, match=message):
            A.create(name, model, **options)(x, 0)
    finally:
        remove()
    assert forwards == []


@pytest.mark.parametrize("name, options, message", [
    ("beyond_intuition", {"start_block": 3}, "start_block=3 but the model has 2 attention blocks"),
    ("tam", {"start_block": 2}, r"start_block must be an int from -2 to 1 \(the model has 2"),
])
def test_block_options_out_of_range_fail_after_the_images_forward_before_any_backward(name, options, message):
    """The number of blocks is known from the first forward: the images' own (the default 20 path points of 4
    images ran as 2 chunks of 16 rows, forwards and backwards, before the error)."""
    model = tiny_vit()
    forwards, backwards, remove = counting(model)
    try:
        with pytest.raises(ValueError, match=message):
            A.create(name, model, **options)(torch.randn(4, 3, 16, 16), 0)
    finally:
        remove()
    assert forwards == [4] and backwards == []


# ------------------------------------------------------------------------------ gradient rows per block
def test_beyond_intuitions_backward_reaches_every_block_at_the_images_only(x):
    """The perception needs every block's gradient at the image; the integrated weights only the last block's at
    every path point.  Rows of gradient reaching each block's output, counted: the images' 2 at every block, and
    the 2 x (steps - 1) interior points' at the last only (all 2 x steps rows reached every block before); TAM's
    reach the last block only."""
    model, steps = tiny_vit(depth=3), 4
    reached = [0, 0, 0]

    def track(index: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: reached.__setitem__(index, reached[index] + g.shape[0]))
        return hook

    handles = [block.register_forward_hook(track(i)) for i, block in enumerate(model.blocks)]
    try:
        whole = A.BeyondIntuition(model, steps=steps, start_block=0)(x, [0, 2])
        assert reached == [2, 2, 2 * steps]
        reached[:] = [0, 0, 0]
        A.TAM(model, steps=steps, start_block=0)(x, [0, 2])
        assert reached == [0, 0, 2 * steps]
    finally:
        for handle in handles:
            handle.remove()
    one_row_a_pass = A.BeyondIntuition(model, steps=steps, start_block=0)(x, [0, 2], batch_size=1)
    torch.testing.assert_close(one_row_a_pass, whole)
