"""Value Zeroing against the authors' procedure written out one image, block and token at a time (each block
re-implemented by hand with the zeroed token's value vectors set to zero, the cosine distances pair by pair, rows
normalised, rolled out) on timm ViTs (fused and unfused attention, register tokens, no class token) and torchvision's
ViT; closed forms (a block whose attention is the identity mixes nothing; a block whose attention adds nothing falls
back to the identity); the stable cosine distance; batch independence; create_graph against finite differences;
the defaults and bad options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.targets import resolve_target
from attribution.transformers.attention import AttentionCapture
from attribution.transformers.rollout import row_normalised
from attribution.transformers.value_zeroing import ValueZeroing, cosine_distance
from conftest import check_parameter_derivative, tiny_cnn, tiny_vit
from vit_parts import first_block_inputs, timm_blocks, torchvision_blocks

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def block_by_hand(p, h: torch.Tensor, zero=None) -> torch.Tensor:
    """One pre-norm ViT block on one image's tokens (N, D); ``zero``: the token whose value vectors are set to zero
    in every head after the softmax (the authors' ``value_layer[:, :, zero_value_index] = 0``)."""
    n, d = h.shape
    q, k, v = F.linear(p.norm1(h), *p.qkv).view(n, 3, p.heads, d // p.heads).permute(1, 2, 0, 3)
    if zero is not None:
        v = v.clone()
        v[:, zero] = 0
    attention = ((q * p.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    h = h + F.linear((attention @ v).transpose(0, 1).reshape(n, d), *p.proj)
    return h + F.linear(p.act(F.linear(p.norm2(h), *p.fc1)), *p.fc2)


def sklearn_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """sklearn's cosine_distances of two vectors: 1 - cos (a zero vector has cosine 0), clipped to [0, 2]."""
    norms = float(a.norm()) * float(b.norm())
    cos = float(a @ b) / norms if norms > 0 else 0.0
    return min(2.0, max(0.0, 1.0 - cos))


def value_zeroing_written_out(model: nn.Module, parts, first: nn.Module, x: torch.Tensor, prefix: int, patch: int,
                              rollout: bool = True) -> torch.Tensor:
    """The authors' scoring/value_zeroing.py per image: the clean hidden states; for each block l and token t, the
    block on the clean h_l with t's values zeroed, score[l, i, t] = cosine distance to the clean output of token i;
    each row divided by its sum; joint = M_L ... M_1 (compute_joint_attention, res=False).  The map: the class
    token's row over the patches (the mean row without prefix tokens), upsampled bilinearly."""
    maps = []
    with torch.no_grad():
        for image in x:
            hidden = [first_block_inputs(model, first, image[None])[0]]
            for p in parts:
                hidden.append(block_by_hand(p, hidden[-1]))
            n = hidden[0].shape[0]
            matrices = []
            for layer, p in enumerate(parts):
                score = [[0.0] * n for _ in range(n)]
                for t in range(n):
                    changed = block_by_hand(p, hidden[layer], zero=t)
                    for i in range(n):
                        score[i][t] = sklearn_cosine_distance(changed[i].double(), hidden[layer + 1][i].double())
                matrices.append(torch.tensor([[s / sum(row) for s in row] for row in score], dtype=torch.float64))
            joint = matrices[0]
            for matrix in matrices[1:]:
                joint = matrix @ joint
            chosen = joint if rollout else matrices[-1]
            row = chosen[0] if prefix else chosen.mean(dim=0)
            maps.append(row[prefix:].view(1, x.shape[-2] // patch, x.shape[-1] // patch))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5).eval()


CASES = {
    "timm_fused": (lambda: tiny_vit(fused=True), 16),
    "timm_unfused": (lambda: tiny_vit(fused=False), 16),
    "timm_registers": (lambda: tiny_vit(reg_tokens=2), 16),
    "timm_no_class_token": (lambda: tiny_vit(fused=False, class_token=False, global_pool="avg"), 16),
    "torchvision": (torchvision_vit, 32),
}


def _parts(model: nn.Module):
    if isinstance(model, torchvision.models.VisionTransformer):
        return torchvision_blocks(model), model.encoder.layers[0], 1, 8
    return timm_blocks(model), model.blocks[0], model.num_prefix_tokens, 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_zeroing_equals_the_authors_procedure_written_out(case):
    """float64; batch_size 5 makes passes straddle images (17 to 19 zeroed copies per image and block)."""
    build, side = CASES[case]
    model = build().double()
    torch.manual_seed(3)
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    parts, first, prefix, patch = _parts(model)
    expected = value_zeroing_written_out(model, parts, first, x, prefix, patch)
    explainer = ValueZeroing(model)
    for batch_size in (None, 5):
        torch.testing.assert_close(explainer(x, batch_size=batch_size), expected, rtol=1e-9, atol=1e-12)
    assert expected.std() > 1e-3 * expected.abs().mean()  # a map that varies over the image
    if case == "timm_unfused":
        last = value_zeroing_written_out(model, parts, first, x, prefix, patch, rollout=False)
        torch.testing.assert_close(explainer(x, rollout=False), last, rtol=1e-9, atol=1e-12)
        assert not torch.allclose(last, expected)


def test_float32_maps_match_the_float64_procedure():
    model = tiny_vit(fused=True)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    parts, first, prefix, patch = _parts(model.double())
    expected = value_zeroing_written_out(model, parts, first, x.double(), prefix, patch)
    ours = ValueZeroing(model.float())(x)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-6)


def test_torchvision_vit_b_16_at_a_small_size():
    """The full-size torchvision ViT-B/16 (12 blocks, 12 heads) at 32x32: 4 patches and the class token, float32."""
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = value_zeroing_written_out(model, torchvision_blocks(model), model.encoder.layers[0], x, 1, 16)
    torch.testing.assert_close(ValueZeroing(model)(x), expected.float(), rtol=1e-4, atol=1e-6)


def _mixing(explainer: ValueZeroing, x: torch.Tensor):
    with torch.no_grad():
        return explainer._mixing(x, resolve_target(0, x.shape[0], x.device), None, False)


@pytest.mark.parametrize("fused", [True, False])
def test_a_block_whose_attention_is_the_identity_mixes_nothing(fused):
    """One head, W_q = c I and W_k = I without biases, c = 1e4: each token's score with itself, c |a_i|^2 / sqrt(D),
    exceeds every other by so much that the softmax is exactly the identity.  Zeroing token j's values then moves
    token j's output alone: the mixing matrix is the identity, the rollout too, and the class token's row over the
    patches is 0 (the mean row, without a class token, 1/N everywhere)."""
    for class_token in (True, False):
        model = tiny_vit(fused=fused, depth=1, num_heads=1, class_token=class_token,
                         global_pool="token" if class_token else "avg").double()
        with torch.no_grad():
            qkv = model.blocks[0].attn.qkv
            qkv.weight[:48] = torch.cat([1e4 * torch.eye(24), torch.eye(24)]).double()
            qkv.bias[:48] = 0
        torch.manual_seed(3)
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        with torch.no_grad(), AttentionCapture(model) as capture:
            model(x)
        tokens = 16 + int(class_token)
        eye = torch.eye(tokens, dtype=torch.float64)
        assert torch.equal(capture.maps[0][:, 0], eye.expand(2, -1, -1))
        (mixing,) = _mixing(ValueZeroing(model), x)
        torch.testing.assert_close(mixing, eye.expand(2, -1, -1), rtol=0, atol=1e-12)
        expected = torch.zeros(2, 1, 16, 16) if class_token else torch.full((2, 1, 16, 16), 1 / 16)
        torch.testing.assert_close(ValueZeroing(model)(x), expected.double(), rtol=0, atol=1e-12)


def test_rows_are_normalised_and_a_row_of_zeros_is_the_identitys():
    """Each row divided by its sum; a row whose distances are all exactly 0 (the authors' code: 0 / 0) becomes the
    identity's row, the graph kept."""
    distances = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 3.0, 0.0], [0.5, 0.0, 0.5]]], requires_grad=True)
    normalised = row_normalised(distances)
    assert torch.equal(normalised, torch.tensor([[[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.5, 0.0, 0.5]]]))
    (grad,) = torch.autograd.grad(normalised[0, 1, 0], distances)
    assert torch.isfinite(grad).all() and grad[0, 1].tolist() == pytest.approx([3 / 16, -1 / 16, -1 / 16])


def test_the_cosine_distance_is_sklearns_without_its_cancellation():
    """1 - cos with sklearn's conventions (a zero vector: cosine 0, so distance 1), and for float32 vectors that
    barely differ the float64 answer to 1e-3 (float32's 1 - cos would be rounding noise there)."""
    torch.manual_seed(0)
    a, b = torch.randn(2, 6, 24, dtype=torch.float64).unbind(0)
    a[2] = 0
    a[3], b[3] = 0, 0
    b[4] = -2 * a[4]
    expected = torch.tensor([sklearn_cosine_distance(p, q) for p, q in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(cosine_distance(a, b), expected, rtol=1e-12, atol=1e-15)
    assert cosine_distance(a, b)[2:5].tolist() == pytest.approx([1.0, 1.0, 2.0])
    near = a[0] + 1e-4 * torch.randn(24, dtype=torch.float64)
    exact = cosine_distance(a[0], near)
    assert 0 < float(exact) < 1e-7
    torch.testing.assert_close(cosine_distance(a[0].float(), near.float()).double(), exact, rtol=1e-2, atol=0)


def test_batch_independence_and_the_target_is_ignored():
    model = tiny_vit()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 16, 16)
    explainer = ValueZeroing(model)
    together = explainer(x, batch_size=7)
    alone = torch.cat([explainer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explainer(x, [4, 0, 2]), explainer(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        explainer(x, 9)


def test_create_graph_equals_finite_differences():
    """float64: the map's derivative in the position embedding (through the clean block inputs), the first block's
    qkv weight and the second block's MLP equals central differences."""
    model = tiny_vit().double()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    explainer = ValueZeroing(model)
    check_parameter_derivative(lambda graph: explainer(x, create_graph=graph), model,
                               ["pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight"],
                               rtol=1e-5, atol=1e-10)


def test_defaults_are_the_authors():
    """hmohebbi/ValueZeroing demo.py and scoring/value_zeroing.py: the rollout (compute_joint_attention(res=False))
    of the row-normalised cosine-distance matrices; class-agnostic."""
    assert ValueZeroing.defaults == {"rollout": True}
    assert A.get_method("value_zeroing") is ValueZeroing and ValueZeroing.kind == "attention"


def test_bad_options_and_models_name_what_is_wrong():
    explainer, x = ValueZeroing(tiny_vit()), torch.randn(1, 3, 16, 16)
    for value in ("yes", 1, None):
        with pytest.raises(TypeError, match="rollout"):
            explainer(x, rollout=value)
    with pytest.raises(TypeError, match="rollout"):
        ValueZeroing(tiny_vit(), rolout=False)
    with pytest.raises(ValueError, match="batch_size"):
        explainer(x, batch_size=0)
    with pytest.raises(ValueError, match="found no attention"):
        ValueZeroing(tiny_cnn())(x)
