"""Transformer attribution (Chefer et al., CVPR 2021): the authors' relevance propagation written out by hand, one
image at a time, with explicit matrix algebra (no autograd in the propagation), on timm's and torchvision's ViTs."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attribution
from conftest import central_difference, tiny_vit
from vit_parts import first_block_inputs, timm_blocks, torchvision_blocks  # noqa: E402

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")


def divide(a: Tensor, b: Tensor) -> Tensor:
    """The authors' guarded division: ``a / (b + 1e-9)``, 0 where ``b`` is 0."""
    return a / (b + 1e-9) * (b != 0)


def alpha1_beta0(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """LRP-alpha1-beta0 of ``x @ W.T`` (bias left out): the positive contributions ``x+ W+`` and ``x- W-``."""
    xp, xn, wp, wn = x.clamp(min=0), x.clamp(max=0), weight.clamp(min=0), weight.clamp(max=0)
    share = divide(relevance, xp @ wp.T + xn @ wn.T)
    return xp * (share @ wp) + xn * (share @ wn)


def residual(a: Tensor, b: Tensor, relevance: Tensor) -> tuple:
    """LRP-0 at ``a + b``, then each summand rescaled to its share of the total by the absolute totals."""
    share = divide(relevance, a + b)
    ra, rb = a * share, b * share
    sa, sb, total = ra.sum(), rb.sum(), relevance.sum()
    fa = divide(sa.abs(), sa.abs() + sb.abs()) * total
    fb = divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * divide(fa, sa), rb * divide(fb, sb)


def product(a: Tensor, b: Tensor, relevance: Tensor) -> tuple:
    """LRP-0 at ``a @ b``, halved for each factor."""
    share = divide(relevance, a @ b)
    return a * (share @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ share) / 2


def written_out(tokens: Tensor, blocks: List[SimpleNamespace], norm: nn.Module, head: nn.Linear, target: int,
                grid: tuple, size: tuple) -> Tensor:
    """One image's map from the first block's input tokens (1, N, D)."""
    x, saved, maps = tokens.detach(), [], []
    for blk in blocks:  # the forward, keeping what the propagation needs
        n, dim = x.shape[1:]
        s = SimpleNamespace(x_in=x, h=blk.norm1(x))
        qkv = F.linear(s.h, *blk.qkv).reshape(1, n, 3, blk.heads, dim // blk.heads).permute(2, 0, 3, 1, 4)
        s.q, s.k, s.v = qkv.unbind(0)
        s.a = ((s.q @ s.k.transpose(-2, -1)) * blk.scale).softmax(dim=-1)
        maps.append(s.a)
        s.o = (s.a @ s.v).transpose(1, 2).reshape(1, n, dim)
        s.attn_out = F.linear(s.o, *blk.proj)
        s.x_mid = s.x_in + s.attn_out
        s.h2 = blk.norm2(s.x_mid)
        s.g = blk.act(F.linear(s.h2, *blk.fc1))
        s.mlp_out = F.linear(s.g, *blk.fc2)
        x = s.x_mid + s.mlp_out
        saved.append(s)
    final = norm(x)[:, 0]
    logits = head(final)
    gradients = torch.autograd.grad(logits[0, target], maps)
    with torch.no_grad():
        r = torch.zeros_like(x)
        r[:, 0] = alpha1_beta0(final, head.weight, F.one_hot(torch.tensor([target]), logits.shape[1]).to(x))
        cams = []
        for blk, s in zip(reversed(blocks), reversed(saved)):  # the final norm, layer norms, GELU: identity
            r_skip, r_mlp = residual(s.x_mid, s.mlp_out, r)
            r_mlp = alpha1_beta0(s.h2, blk.fc1[0], alpha1_beta0(s.g, blk.fc2[0], r_mlp))
            r_skip, r_attn = residual(s.x_in, s.attn_out, r_skip + r_mlp)
            r_o = alpha1_beta0(s.o, blk.proj[0], r_attn)
            r_o = r_o.reshape(s.v.shape[0], s.v.shape[2], s.v.shape[1], s.v.shape[3]).transpose(1, 2)
            r_a, r_v = product(s.a, s.v, r_o)
            cams.insert(0, r_a)
            r_q, r_k = product(s.q, s.k.transpose(-2, -1), r_a)  # the softmax: identity
            r_qkv = torch.stack([r_q, r_k.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4).reshape(s.h.shape[0],
                                                                                                   s.h.shape[1], -1)
            r = r_skip + alpha1_beta0(s.h, blk.qkv[0], r_qkv)
        eye = torch.eye(x.shape[1])
        joint = eye
        for grad, cam in zip(gradients, cams):
            joint = ((grad * cam).clamp(min=0).mean(dim=1)[0] + eye) @ joint
    patches = joint[0, 1:].reshape(1, 1, *grid)
    return F.interpolate(patches, size=size, mode="bilinear", align_corners=False)


def check_against_written_out(model, x: torch.Tensor, targets) -> torch.Tensor:
    """Transformer attribution on the tiny timm ViT equals the authors' propagation written out image by image
    (returned)."""
    tokens = first_block_inputs(model, model.blocks[0], x)
    expected = torch.cat([written_out(tokens[i:i + 1], timm_blocks(model), model.norm, model.head, t, (4, 4),
                                      (16, 16)) for i, t in enumerate(targets)])
    ours = attribution.TransformerAttribution(model)(x, targets)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    return ours


@pytest.mark.parametrize("fused", [True, False])
def test_equals_the_authors_propagation_on_timms_vit(fused):
    model = tiny_vit(fused=fused)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = [1, 3, 0]
    ours = check_against_written_out(model, x, targets)
    generic = attribution.GenericAttention(model)(x, targets)  # the relevance, not the attention, is weighted
    assert not torch.allclose(generic / generic.amax(), ours / ours.amax(), atol=0.05)


def test_equals_the_authors_propagation_on_torchvisions_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=6).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = [2, 5]
    tokens = first_block_inputs(model, model.encoder.layers[0], x)
    expected = torch.cat([written_out(tokens[i:i + 1], torchvision_blocks(model), model.encoder.ln,
                                      model.heads.head, t, (4, 4), (32, 32)) for i, t in enumerate(targets)])
    ours = attribution.TransformerAttribution(model)(x, targets)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False, "swiglu"])
def test_the_relevance_pass_conserves_the_unit_start(fused):
    """With the authors' rules (alpha1-beta0 without bias, conserving sums, identity at norms and the softmax,
    halved products), the relevance reaching the first block's input sums to the start's 1."""
    from attribution.gradients.attn_lrp import TransformerLRPRules

    if fused == "swiglu":  # a gated MLP: the product of its two branches shares the relevance (halved)
        from timm.layers import SwiGLU
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
                                  num_classes=5, mlp_layer=SwiGLU).eval()
    else:
        model = tiny_vit(fused=fused)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    inputs = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with TransformerLRPRules("chefer", eps=1e-10):
        logits = model(x.requires_grad_(True))
    handle.remove()
    score = logits[:, 2]
    (grad,) = torch.autograd.grad((score / score.detach()).sum(), inputs)
    torch.testing.assert_close((inputs[0] * grad).sum(dim=(1, 2)), torch.ones(2), rtol=1e-4, atol=1e-4)


def test_in_place_residual_sums_get_the_rule_too():
    """A block whose residual sums are in place (``h += x``, the branch's output not saved by autograd, as in
    ResNets' ``out += identity``) gives the map of the same block written ``x = x + h``."""
    from timm.models.vision_transformer import Block

    def in_place_forward(self, x):
        h = self.attn(self.norm1(x))
        h += x
        out = self.mlp(self.norm2(h))
        out += h
        return out

    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    expected = attribution.TransformerAttribution(model)(x, [0, 4])
    original = Block.forward
    Block.forward = in_place_forward
    try:
        ours = attribution.TransformerAttribution(model)(x, [0, 4])
    finally:
        Block.forward = original
    torch.testing.assert_close(ours, expected)


def test_create_graph_gives_the_maps_true_parameter_derivative():
    """The relevance starts at a constant 1 (the authors' one-hot), so the map's derivative w.r.t. the weights is
    the finite difference of the map (float64)."""
    model = tiny_vit().double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    explainer = attribution.TransformerAttribution(model)
    maps = explainer(x, [1, 3], create_graph=True)
    torch.testing.assert_close(maps.detach(), explainer(x, [1, 3]))
    weights = (model.blocks[1].mlp.fc1.weight, model.head.weight, model.pos_embed)
    grads = torch.autograd.grad(maps.sum(), weights)
    for weight, grad in zip(weights, grads):
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        difference = central_difference(lambda: explainer(x, [1, 3]).sum(), weight, direction)
        torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-3, atol=1e-10)  # an ill-conditioned map


def test_a_computed_attention_bias_is_no_residual_sum():
    """BEiT adds a relative position bias computed from a table to the attention scores: for one image its shape
    equals the scores', but it is no residual connection; an image's map is the same alone and in a batch."""
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
                 use_rel_pos_bias=True).eval()
    with torch.no_grad():  # timm scales the head down at init, and the bias tables start at 0
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.startswith("head."):
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    together = attribution.TransformerAttribution(model)(x, [1, 4])
    alone = attribution.TransformerAttribution(model)(x[:1], [1])
    assert together.abs().max() > 0
    torch.testing.assert_close(alone, together[:1], rtol=1e-5, atol=1e-6 * float(together.abs().max()))


def test_sequence_first_blocks_keep_images_apart():
    """nn.TransformerEncoder (batch_first=False) sums its residuals on (L, B, E) tokens: the totals are per image
    along the second dimension, so an image's map is the same alone and in a batch."""

    class Tokens(nn.Module):
        patch_size = 2  # read by the token layout

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(12, 16)
            self.cls = nn.Parameter(torch.randn(1, 1, 16))
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(2, 3, 0, 1, 4, 5).flatten(3).flatten(0, 1)
            tokens = torch.cat([self.cls.expand(1, x.shape[0], 16), self.embed(patches)])  # (1 + 16, B, 16)
            return self.head(self.encoder(tokens)[0])

    model = Tokens().eval()
    # 3 images of 8x8 (17 tokens); then 5 images of 4x4: 5 tokens, as many as the rows (the model's
    # nn.MultiheadAttention is sequence-first, so the tie goes to the second dimension)
    for x in (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
              torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))):
        labels = [i % 3 for i in range(x.shape[0])]
        together = attribution.TransformerAttribution(model)(x, labels)
        alone = torch.cat([attribution.TransformerAttribution(model)(x[i:i + 1], [labels[i]])
                           for i in range(x.shape[0])])
        assert together.abs().sum() > 0
        torch.testing.assert_close(together, alone)


def test_a_linear_output_changed_in_place_is_recomputed_for_its_rule():
    """The rule reads the linear layer's own output, kept from the forward: a hook that doubles it in place (the
    model downstream sees the doubled values) must give the maps of the same hook doubling it out of place."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    maps = []
    for in_place in (True, False):
        model = tiny_vit(seed=2)
        double = (lambda m, args, out: out.mul_(2)) if in_place else (lambda m, args, out: out * 2)
        model.blocks[0].mlp.fc2.register_forward_hook(double)
        maps.append(attribution.TransformerAttribution(model)(x, [1, 3]))
    torch.testing.assert_close(maps[0], maps[1])


def cancelling_residual(model: nn.Module, x: Tensor, token: int, channel: int) -> nn.Module:
    """Block 0's attention projection made to output the constant ``-v`` in ``channel`` (its weights' row zeroed,
    its bias ``-v``), ``v`` the first image's block input at (``token``, ``channel``): the residual stream after the
    attention, ``v + (-v)``, is exactly 0 there."""
    tokens = first_block_inputs(model, model.blocks[0], x.to(model.head.weight.dtype))
    with torch.no_grad():
        proj = model.blocks[0].attn.proj
        proj.weight[channel] = 0
        proj.bias[channel] = -tokens[0, token, channel]
    middle = []
    handle = model.blocks[0].norm2.register_forward_pre_hook(lambda m, args: middle.append(args[0]))
    with torch.no_grad():
        model(x.to(model.head.weight.dtype))
    handle.remove()
    assert middle[0][0, token, channel] == 0 and middle[0][0, token].abs().amin() < middle[0][0, token].abs().amax()
    return model


def test_a_residual_sum_of_exactly_zero_passes_no_relevance():
    """The authors divide by the sum's output guarded (0 where it is 0): nothing passes there, neither through the
    sum nor through the layer norm after it (whose identity rule gave ``f(0) / 1e-10``, a gradient of about 1e9
    that the sum's rule then spread as relevance)."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = cancelling_residual(tiny_vit(), x, token=5, channel=7)
    targets = [1, 3]
    check_against_written_out(model, x, targets)


def test_float16_models_give_finite_maps():
    """float16 rounds some residual sums to exactly 0 (here one entry entering block 1's first layer norm); their
    layer norms' ``f(0) / 1e-10`` overflowed float16's gradients (inf, then NaN in the sums before: half the map)."""
    model = tiny_vit(depth=3).half()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    entering = []
    handle = model.blocks[1].norm1.register_forward_pre_hook(lambda m, args: entering.append(args[0]))
    with torch.no_grad():
        model(x.half())
    handle.remove()
    assert (entering[0] == 0).any()  # the case in point
    maps = attribution.TransformerAttribution(model)(x, [1, 3])
    assert torch.isfinite(maps).all() and maps.abs().amax() > 0
    reference = attribution.TransformerAttribution(tiny_vit(depth=3))(x, [1, 3])
    # the rules divide relevance by activations, so float16's rounding of near-cancelling sums shows (a float32
    # model under amp, whose residual sums stay float32, keeps more of the float32 map)
    assert torch.corrcoef(torch.stack([maps.flatten(), reference.flatten()]))[0, 1] > 0.7
