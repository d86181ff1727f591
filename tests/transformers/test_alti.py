"""ALTI against the paper's formula written out one image, block, head and token pair at a time (per-head value
vectors from the qkv weights, each transformed vector T_i(x_j) summed by hand, the Manhattan distances pair by pair,
rows normalised, rolled out) on timm ViTs (vit_tiny at 32x32 with 8x8 patches, fused and unfused attention,
register tokens, no class token, layer scale) and torchvision's ViT; the decomposition rebuilding each block's
residual stream after attention; the rows summing to 1; the closed form of identity attention; query slices;
batch independence; create_graph against finite differences; the defaults; and what is refused."""
from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.targets import resolve_target
from attribution.transformers.alti import (ALTI, CHUNK_ELEMENTS, alti_contributions, layer_scale,
                                           transformed_vectors)
from attribution.transformers.rollout import row_normalised
from conftest import check_parameter_derivative, tiny_vit
from vit_parts import first_block_inputs, timm_blocks, torchvision_blocks

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def with_random_affine_parts(model: nn.Module) -> nn.Module:
    """Both libraries start every bias at zero and every norm at the identity: drawn at random here, so that the
    value bias, the output bias and the norms' affine parts all count."""
    draws = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or (parameter.dim() == 1 and ("norm" in name or ".ln_" in name)):
                base = 1.0 if name.endswith("weight") else 0.0
                parameter.copy_(base + 0.3 * torch.randn(parameter.shape, generator=draws))
    return model


def vit_tiny(**options) -> nn.Module:
    """timm's vit_tiny_patch16_224 (width 192, 3 heads) at 32x32 with 8x8 patches (16 patches), 2 blocks."""
    torch.manual_seed(0)
    return with_random_affine_parts(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                                      patch_size=8, depth=2, num_classes=5, **options).eval())


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return with_random_affine_parts(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5).eval())


def parts_of(model: nn.Module):
    """The blocks' weights (vit_parts), their layer scales (attention, MLP; None without), the first block, the
    number of prefix tokens and the patch size."""
    if isinstance(model, torchvision.models.VisionTransformer):
        return torchvision_blocks(model), [(None, None)] * 2, model.encoder.layers[0], 1, 8
    scales = [(getattr(b.ls1, "gamma", None), getattr(b.ls2, "gamma", None)) for b in model.blocks]
    return timm_blocks(model), scales, model.blocks[0], model.num_prefix_tokens, model.patch_embed.patch_size[0]


def block_written_out(p, attention_scale, h: torch.Tensor):
    """One pre-norm block's attention sublayer on one image's tokens h (N, D), by hand: per head, the value vectors
    v_j = W_V^h LN1(x_j) + b_V^h and the attention; T[i][j] = sum_h A_h[i, j] s W_O^h v_j (+ x_i when j == i);
    y_i = sum_j T[i][j] + s b_O.  Returns T (a list of lists of (D,) vectors) and y (N, D)."""
    n, d = h.shape
    width = d // p.heads
    s = torch.ones(d, dtype=h.dtype) if attention_scale is None else attention_scale
    a = p.norm1(h)
    (wq, wk, wv), (bq, bk, bv) = p.qkv[0].chunk(3), p.qkv[1].chunk(3)
    wo, bo = p.proj
    T = [[h[i].clone() if i == j else torch.zeros(d, dtype=h.dtype) for j in range(n)] for i in range(n)]
    for head in range(p.heads):
        cols = slice(head * width, (head + 1) * width)
        q, k, v = a @ wq[cols].T + bq[cols], a @ wk[cols].T + bk[cols], a @ wv[cols].T + bv[cols]
        attention = (q @ k.T * p.scale).softmax(dim=-1)
        for j in range(n):
            f = s * (wo[:, cols] @ v[j])
            for i in range(n):
                T[i][j] = T[i][j] + attention[i, j] * f
    y = torch.stack([sum(T[i][j] for j in range(n)) + s * bo for i in range(n)])
    return T, y


def mlp_written_out(p, mlp_scale, y: torch.Tensor) -> torch.Tensor:
    out = F.linear(p.act(F.linear(p.norm2(y), *p.fc1)), *p.fc2)
    return y + (out if mlp_scale is None else mlp_scale * out)


def alti_written_out(model: nn.Module, x: torch.Tensor, rollout: bool = True) -> torch.Tensor:
    """The paper's ALTI per image: per block c_ij = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1) pair by pair, each row
    divided by its sum (the authors' normalize_contributions 'min_sum' with the resultant's L1 norm), the joint
    matrix C_L ... C_1 (compute_joint_attention); the map is the class token's row over the patches (the mean row
    without prefix tokens), upsampled bilinearly."""
    parts, scales, first, prefix, patch = parts_of(model)
    maps = []
    with torch.no_grad():
        for image in x:
            h = first_block_inputs(model, first, image[None])[0]
            matrices = []
            for p, (s1, s2) in zip(parts, scales):
                T, y = block_written_out(p, s1, h)
                n = len(T)
                c = [[max(0.0, float(y[i].abs().sum()) - float((y[i] - T[i][j]).abs().sum())) for j in range(n)]
                     for i in range(n)]
                matrices.append(torch.tensor([[v / sum(row) for v in row] for row in c], dtype=torch.float64))
                h = mlp_written_out(p, s2, y)
            joint = matrices[0]
            for matrix in matrices[1:]:
                joint = matrix @ joint
            chosen = joint if rollout else matrices[-1]
            row = chosen[0] if prefix else chosen.mean(dim=0)
            maps.append(row[prefix:].view(1, x.shape[-2] // patch, x.shape[-1] // patch))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


def terms_of(model: nn.Module, x: torch.Tensor):
    """The explainer's per-block terms for ``x`` (one forward)."""
    explainer = ALTI(model)
    modules = dict(model.named_modules())
    names = explainer._block_names(x)
    with torch.no_grad():
        return explainer._block_terms(x, resolve_target(0, x.shape[0], x.device), torch.arange(x.shape[0]),
                                      [modules[n] for n in names], names, False)


def second_norm_inputs(model: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """The residual stream after each block's attention sublayer, as the model computes it: its second norm's input."""
    if isinstance(model, torchvision.models.VisionTransformer):
        norms = [b.ln_2 for b in model.encoder.layers]
    else:
        norms = [b.norm2 for b in model.blocks]
    seen: List[torch.Tensor] = []
    handles = [n.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for n in norms]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


CASES = {
    "timm_fused": lambda: vit_tiny(),
    "timm_unfused": lambda: unfused(vit_tiny()),
    "timm_registers": lambda: vit_tiny(reg_tokens=2),
    "timm_no_class_token": lambda: vit_tiny(class_token=False, global_pool="avg"),
    "timm_layer_scale": lambda: vit_tiny(init_values=0.5),
    "torchvision": torchvision_vit,
}


def unfused(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def images(count: int = 2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_alti_equals_the_papers_formula_written_out(case):
    """float64; batch_size 1 runs the images in separate passes."""
    model = CASES[case]().double()
    x = images()
    expected = alti_written_out(model, x)
    explainer = ALTI(model)
    for batch_size in (None, 1):
        torch.testing.assert_close(explainer(x, batch_size=batch_size), expected, rtol=1e-9, atol=1e-12)
    assert expected.std() > 1e-3 * expected.abs().mean()  # a map that varies over the image
    if case == "timm_fused":
        last = alti_written_out(model, x, rollout=False)
        torch.testing.assert_close(explainer(x, rollout=False), last, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(last, expected)


def test_float32_maps_match_the_float64_formula():
    model = vit_tiny()
    expected = alti_written_out(model.double(), images())
    ours = ALTI(model.float())(images(dtype=torch.float32))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["timm_fused", "timm_layer_scale", "torchvision"])
def test_the_decomposition_rebuilds_the_residual_stream_after_attention(case):
    """float32: sum_j T_i(x_j) + s b_O equals the input of each block's second norm to 1e-5; and the transformed
    vectors are the ones written out by hand (float64, the first image, every pair)."""
    model = CASES[case]()
    x = images(dtype=torch.float32)
    for terms, actual in zip(terms_of(model, x), second_norm_inputs(model, x)):
        rebuilt = transformed_vectors(terms).sum(dim=2) + terms.bias
        torch.testing.assert_close(rebuilt, actual, rtol=0, atol=1e-5)
    model = model.double()
    x = images(1)
    parts, scales, first, _, _ = parts_of(model)
    (terms, _) = terms_of(model, x)
    with torch.no_grad():
        T, y = block_written_out(parts[0], scales[0][0], first_block_inputs(model, first, x)[0])
    ours = transformed_vectors(terms)[0]
    torch.testing.assert_close(ours, torch.stack([torch.stack(row) for row in T]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["timm_fused", "timm_registers", "torchvision"])
def test_each_blocks_contributions_are_non_negative_rows_summing_to_one(case):
    model = CASES[case]()
    for terms in terms_of(model, images(dtype=torch.float32)):
        matrix = row_normalised(alti_contributions(terms))
        assert (matrix >= 0).all()
        torch.testing.assert_close(matrix.sum(dim=-1), torch.ones(matrix.shape[:2]), rtol=0, atol=1e-6)


def test_query_slices_give_the_whole_matrix():
    """Slices of 1, 2 and 5 query tokens (offsets into the diagonal that holds the residual) equal one slice."""
    (terms, _) = terms_of(vit_tiny().double(), images())
    whole = alti_contributions(terms)
    assert whole.shape == (2, 17, 17)
    for rows in (1, 2, 5):
        sliced = alti_contributions(terms, chunk_elements=rows * 2 * 17 * 192)
        torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-12)
    assert CHUNK_ELEMENTS == 2 ** 24


@pytest.mark.parametrize("class_token", [True, False])
def test_identity_attention_has_its_closed_form(class_token):
    """One head, W_q = c I, W_k = I, no biases, c = 1e4: the softmax is exactly the identity.  Then T_i(x_j) = 0
    for j != i and T_i(x_i) = y_i - b_O, so c_ij = 0 off the diagonal and c_ii = max(0, ||y_i||_1 - ||b_O||_1): every
    block's matrix is the identity (a row clipped to zeros, ||y_i||_1 <= ||b_O||_1 with the large output bias set
    here, is the identity's row too), and so is the rollout.  The map is 0 (the class token's row over the patches),
    without a class token 1/16 everywhere (the mean of the patch rows)."""
    model = tiny_vit(num_heads=1, class_token=class_token, global_pool="token" if class_token else "avg").double()
    draws = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:48] = torch.cat([1e4 * torch.eye(24), torch.eye(24)]).double()
            block.attn.qkv.bias[:48] = 0
            block.attn.proj.bias.copy_(0.8 * torch.randn(24, generator=draws, dtype=torch.float64))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens = 16 + int(class_token)
    eye = torch.eye(tokens, dtype=torch.float64).expand(2, -1, -1)
    clipped = []
    for terms in terms_of(model, x):
        assert torch.equal(terms.attention[:, 0], eye)
        output = transformed_vectors(terms).sum(dim=2) + terms.bias
        closed = torch.diag_embed((output.abs().sum(-1) - terms.bias.abs().sum()).clamp(min=0))
        torch.testing.assert_close(alti_contributions(terms), closed, rtol=1e-12, atol=1e-12)
        clipped.append(closed.diagonal(dim1=1, dim2=2) == 0)
        torch.testing.assert_close(row_normalised(alti_contributions(terms)), eye, rtol=0, atol=1e-12)
    clipped = torch.cat(clipped)
    assert clipped.any() and not clipped.all()  # both branches: the clip (a zero row: the identity's) and c_ii > 0
    expected = torch.zeros(2, 1, 16, 16) if class_token else torch.full((2, 1, 16, 16), 1 / 16)
    torch.testing.assert_close(ALTI(model)(x), expected.double(), rtol=0, atol=1e-12)


def test_batch_independence_and_the_target_is_ignored():
    model = vit_tiny()
    x = images(3, torch.float32)
    explainer = ALTI(model)
    together = explainer(x, batch_size=2)
    alone = torch.cat([explainer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explainer(x, [4, 0, 2]), explainer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, 9)


def test_create_graph_equals_finite_differences():
    """float64: the map's derivative in the position embedding, the first block's qkv weight and the second
    block's output projection equals central differences."""
    model = tiny_vit().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    explainer = ALTI(model)
    check_parameter_derivative(lambda graph: explainer(x, create_graph=graph), model,
                               ["pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight"],
                               rtol=1e-5, atol=1e-10)


def test_layer_scales_are_read_from_timm_and_beit_blocks():
    with_scale, plain = vit_tiny(init_values=0.5), vit_tiny()
    assert layer_scale(with_scale.blocks[0]) is with_scale.blocks[0].ls1.gamma
    assert layer_scale(plain.blocks[0]) is None
    assert layer_scale(torchvision_vit().encoder.layers[0]) is None
    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=5, init_values=0.5).eval()
    assert layer_scale(beit.blocks[0]) is beit.blocks[0].gamma_1
    out = ALTI(beit)(images(1, torch.float32))  # the decomposition is checked inside: relative position bias, gamma_1
    assert out.shape == (1, 1, 32, 32) and torch.isfinite(out).all()


def test_defaults_are_the_papers():
    """mt-upc/transformer-contributions: the rollout (compute_joint_attention) of the 'min_sum' normalised
    contributions; class-agnostic."""
    assert ALTI.defaults == {"rollout": True}
    assert A.get_method("alti") is ALTI and ALTI.kind == "attention" and ALTI.argmax_on_rows



class GatedBlock(nn.Module):
    """A pre-norm block whose attention output is scaled by a token-wise gate outside any layer scale: the
    decomposition cannot rebuild it."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.norm1(x))
        x = x + out * torch.sigmoid(out.sum(dim=-1, keepdim=True))
        return x + self.mlp(self.norm2(x))


def test_a_block_the_decomposition_cannot_rebuild_is_refused():
    model = tiny_vit()
    model.blocks = nn.Sequential(*[GatedBlock(b) for b in model.blocks])
    with pytest.raises(ValueError, match="does not rebuild the residual stream after its attention sublayer"):
        ALTI(model)(torch.randn(1, 3, 16, 16))


def relative_errors(method, model: nn.Module, x: torch.Tensor, **options):
    """The float32 map's largest difference from the float64 map, relative to its largest entry, with ``amp=True``
    and under the caller's own ``torch.autocast`` (bfloat16 on the CPU); and the two maps' largest difference."""
    expected = method(model.double())(x.double(), 1, **options)
    model.float()
    with_amp = method(model)(x, 1, amp=True, **options).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = method(model)(x, 1, **options).double()
    largest = float(expected.abs().max())
    return (float((with_amp - expected).abs().max()) / largest, float((under_autocast - expected).abs().max()) / largest,
            float((under_autocast - with_amp).abs().max()) / largest)


def test_a_callers_autocast_runs_the_forward_alone_in_bfloat16():
    """Under a caller's autocast only the model's forward is in bfloat16, as with amp=True: the method's own sums
    (the head vectors, ||y||_1 - ||y - T||_1, which cancels) stay float32 (they ran in bfloat16 once, 10x amp's
    error: 0.045 against 0.0046 on a 3-block ViT-S)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=5).eval()
    with_amp, under_autocast, apart = relative_errors(ALTI, model, images(2, torch.float32))
    assert with_amp < 1e-2 and under_autocast < 1e-2 and apart < 1e-4, (with_amp, under_autocast, apart)


def test_head_vectors_are_formed_one_block_at_a_time(monkeypatch):
    """Peak memory of about one block's terms: each block's (B, H, N, D) head vectors are dropped once its shares
    are computed, before the next block's are formed (every block's were held at once before); the map is the
    same."""
    import gc
    import weakref
    from attribution.transformers import alti as module

    model, x = vit_tiny(), images(2, torch.float32)
    expected = ALTI(model)(x)
    live: List[weakref.ref] = []
    most = []
    formed = module.head_vectors

    def counted(*args, **kwargs):
        gc.collect()
        most.append(sum(ref() is not None for ref in live))  # head vectors still alive when the next are formed
        out = formed(*args, **kwargs)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module, "head_vectors", counted)
    assert torch.equal(ALTI(model)(x), expected)
    assert len(most) == 2 and max(most) == 0, most
