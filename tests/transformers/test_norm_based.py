"""The attention norm (Kobayashi et al. 2020) and GlobEnc (Modarressi et al. 2022) against their formulas written out
one image, block, head and token pair at a time (per-head value vectors from the qkv weights, each weighted vector
summed over the heads by hand, each norm taken pair by pair, the authors' aggregations as plain matrix products) on
timm ViTs (vit_tiny at 32x32 with 8x8 patches: fused and unfused attention, register tokens, no class token, layer
scale) and torchvision's ViT, in float64; closed forms under identity attention; query slices; the rescaled GlobEnc
rollout where the authors' raw product overflows float32; batch independence; create_graph against finite
differences; the defaults; and what is refused."""
from __future__ import annotations

from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.transformers.alti import ALTI, transformed_vectors, vector_norms
from attribution.transformers.norm_based import AttentionNorm, GlobEnc, largest_row_sum_one
from conftest import check_parameter_derivative, tiny_cnn, tiny_vit
from test_alti import CASES, GatedBlock, block_written_out, images, mlp_written_out, parts_of, terms_of, vit_tiny
from vit_parts import first_block_inputs

timm = pytest.importorskip("timm")


def norms_written_out(model: nn.Module, image: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One image's per-block matrices, pair by pair: the attention norm ||sum_h A_h[i, j] f_h(x_j)||_2 (the authors'
    summed_weighted_norm) and GlobEnc's ||sum_h A_h[i, j] f_h(x_j) + [i == j] x_i||_2 (N_Res, which is N_Enc for
    pre-norm blocks: see GlobEnc's docstring); each block's input is the previous block's output, MLP included."""
    parts, scales, first, _, _ = parts_of(model)
    h = first_block_inputs(model, first, image[None])[0]
    attention_norms, encoder_norms = [], []
    for p, (s1, s2) in zip(parts, scales):
        T, y = block_written_out(p, s1, h)  # T[i][j]: the weighted vectors, plus x_i where j == i
        n = len(T)
        encoder_norms.append(torch.tensor([[float(T[i][j].norm()) for j in range(n)] for i in range(n)],
                                          dtype=torch.float64))
        attention_norms.append(torch.tensor([[float((T[i][j] - (h[i] if i == j else 0)).norm()) for j in range(n)]
                                             for i in range(n)], dtype=torch.float64))
        h = mlp_written_out(p, s2, y)
    return attention_norms, encoder_norms


def product(matrices: List[torch.Tensor]) -> torch.Tensor:
    joint = matrices[0]
    for matrix in matrices[1:]:
        joint = matrix @ joint
    return joint


def fixed_residual(norms: torch.Tensor) -> torch.Tensor:
    """GlobEnc's code's 'N-FixedRes' step: rows divided by their sums, then r = 0.5 of each row kept and 1 - r added
    on the diagonal (__add_residual), entry by entry."""
    n = norms.shape[0]
    normalised = norms / norms.sum(dim=1, keepdim=True)
    return torch.tensor([[0.5 * float(normalised[i, j]) + (0.5 if i == j else 0.0) for j in range(n)]
                         for i in range(n)], dtype=torch.float64)


def to_map(model: nn.Module, rows: List[torch.Tensor], size) -> torch.Tensor:
    """Each image's (N, N) relevance to its (1, 1, H, W) map: the class token's row over the patches (the mean row
    without prefix tokens), upsampled bilinearly."""
    _, _, _, prefix, patch = parts_of(model)
    maps = []
    for matrix in rows:
        row = matrix[0] if prefix else matrix.mean(dim=0)
        maps.append(row[prefix:].view(1, size[0] // patch, size[1] // patch))
    return F.interpolate(torch.stack(maps), size=size, mode="bilinear", align_corners=False)


def expected_maps(model: nn.Module, x: torch.Tensor):
    """The written-out maps: the attention norm's last block (the authors' per-layer matrix) and its N-FixedRes
    rollout; GlobEnc's raw rollout (the authors' compute_joint_attention: no identity, no normalisation) and its last
    block, with the positive factor per image that the implementation's rescaling divides the raw rollout by (the
    product of each block's largest row sum)."""
    attention_last, attention_rollout, globenc_rollout, globenc_last, factors = [], [], [], [], []
    with torch.no_grad():
        for image in x:
            attention_norms, encoder_norms = norms_written_out(model, image)
            attention_last.append(attention_norms[-1])
            attention_rollout.append(product([fixed_residual(m) for m in attention_norms]))
            globenc_rollout.append(product(encoder_norms))
            globenc_last.append(encoder_norms[-1])
            factors.append(torch.stack([m.sum(dim=1).max() for m in encoder_norms]).prod())
    size = tuple(x.shape[-2:])
    factor = torch.stack(factors).view(-1, 1, 1, 1)
    return {("attention_norm", False): to_map(model, attention_last, size),
            ("attention_norm", True): to_map(model, attention_rollout, size),
            ("globenc", True): to_map(model, globenc_rollout, size) / factor,
            ("globenc", False): to_map(model, globenc_last, size)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_methods_equal_their_formulas_written_out(case):
    """float64, both values of ``rollout``; batch_size 1 runs the images in separate passes."""
    model = CASES[case]().double()
    x = images()
    expected = expected_maps(model, x)
    for (name, rollout), wanted in expected.items():
        explainer = A.get_method(name)(model, rollout=rollout)
        for batch_size in (None, 1) if rollout == A.get_method(name).defaults["rollout"] else (None,):
            torch.testing.assert_close(explainer(x, batch_size=batch_size), wanted, rtol=1e-9, atol=1e-12)
        assert wanted.std() > 1e-3 * wanted.abs().mean()  # a map that varies over the image
    assert not torch.allclose(expected[("globenc", True)], expected[("globenc", False)])
    assert not torch.allclose(expected[("attention_norm", True)], expected[("attention_norm", False)])


def test_float32_maps_match_the_float64_formulas():
    model = vit_tiny()
    expected = expected_maps(model.double(), images())
    x = images(dtype=torch.float32)
    for method, name in ((AttentionNorm, "attention_norm"), (GlobEnc, "globenc")):
        ours = method(model.float())(x)
        assert ours.dtype == torch.float32
        wanted = expected[(name, method.defaults["rollout"])]
        torch.testing.assert_close(ours.double(), wanted, rtol=1e-4, atol=1e-6 * float(wanted.abs().max()))


def test_the_norms_are_those_of_the_decompositions_vectors_in_any_query_slices():
    """vector_norms equals the norms of transformed_vectors with and without the residual, whole or in slices of
    1, 2 and 5 query tokens (offsets into the diagonal that holds the residual); the residual changes only the
    diagonal's vectors."""
    (terms, _) = terms_of(vit_tiny().double(), images())
    for residual in (True, False):
        whole = vector_norms(terms, residual)
        assert whole.shape == (2, 17, 17)
        torch.testing.assert_close(whole, transformed_vectors(terms, residual=residual).norm(dim=-1), rtol=0,
                                   atol=1e-12)
        for rows in (1, 2, 5):
            torch.testing.assert_close(vector_norms(terms, residual, chunk_elements=rows * 2 * 17 * 192), whole,
                                       rtol=0, atol=1e-12)
    apart = transformed_vectors(terms) - transformed_vectors(terms, residual=False)
    torch.testing.assert_close(apart, torch.diag_embed(terms.tokens.transpose(1, 2)).permute(0, 2, 3, 1), rtol=0,
                               atol=1e-12)


def identity_attention_vit(class_token: bool) -> nn.Module:
    """One head, W_q = c I, W_k = I, no biases, c = 1e4: the softmax is exactly the identity."""
    model = tiny_vit(num_heads=1, class_token=class_token, global_pool="token" if class_token else "avg").double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:48] = torch.cat([1e4 * torch.eye(24), torch.eye(24)]).double()
            block.attn.qkv.bias[:48] = 0
    return model


@pytest.mark.parametrize("class_token", [True, False])
def test_identity_attention_has_its_closed_forms(class_token):
    """Under identity attention every weighted vector off the diagonal is 0: the attention norm is diag(||f(x_i)||),
    GlobEnc's diag(||f(x_i) + x_i||).  With a class token its row over the patches is 0 (both options of both
    methods).  Without one the map reads the mean of the patch rows: patch j gets the last block's diagonal entry /
    16 (rollout=False), 1/16 for the attention norm's rollout (each block's (I + I) / 2), and GlobEnc's product of
    the diagonals, each block divided by its largest entry, / 16."""
    model = identity_attention_vit(class_token)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens = 16 + int(class_token)
    eye = torch.eye(tokens, dtype=torch.float64).expand(2, -1, -1)
    diagonals = []
    for terms in terms_of(model, x):
        assert torch.equal(terms.attention[:, 0], eye)
        lengths = terms.heads[:, 0].norm(dim=-1)  # ||f(x_i)||
        torch.testing.assert_close(vector_norms(terms, False), torch.diag_embed(lengths), rtol=1e-12, atol=0)
        encoder = (terms.heads[:, 0] + terms.tokens).norm(dim=-1)  # ||f(x_i) + x_i||
        torch.testing.assert_close(vector_norms(terms, True), torch.diag_embed(encoder), rtol=1e-12, atol=0)
        diagonals.append((lengths, encoder))
    grid = lambda row: F.interpolate(row[:, -16:].reshape(2, 1, 4, 4), size=(16, 16), mode="bilinear",  # noqa: E731
                                     align_corners=False)
    if class_token:
        expected = {key: torch.zeros(2, 1, 16, 16, dtype=torch.float64) for key in
                    [(AttentionNorm, False), (AttentionNorm, True), (GlobEnc, False), (GlobEnc, True)]}
    else:
        scaled = [encoder / encoder.amax(dim=1, keepdim=True) for _, encoder in diagonals]
        expected = {(AttentionNorm, False): grid(diagonals[-1][0] / 16),
                    (AttentionNorm, True): torch.full((2, 1, 16, 16), 1 / 16, dtype=torch.float64),
                    (GlobEnc, False): grid(diagonals[-1][1] / 16),
                    (GlobEnc, True): grid(scaled[0] * scaled[1] / 16)}
    for (method, rollout), wanted in expected.items():
        torch.testing.assert_close(method(model, rollout=rollout)(x), wanted, rtol=1e-10, atol=1e-12)


def test_globenc_rescaling_keeps_deep_rollouts_finite_where_the_raw_product_overflows():
    """Twelve blocks fed tokens of length 1e4 (a large position embedding): the authors' raw product of the norm
    matrices exceeds float32's range; each block divided by its largest row sum, the product's rows sum to at most
    1, and the float32 map equals the float64 rescaled product's (the raw one's up to its positive factor)."""
    model = tiny_vit(depth=12)
    with torch.no_grad():
        model.pos_embed.mul_(1e4 / model.pos_embed.norm(dim=-1, keepdim=True))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    norms = [vector_norms(t, True) for t in terms_of(model.double(), x.double())]
    raw = product(norms)
    assert float(raw.amax()) > torch.finfo(torch.float32).max
    rescaled = product([largest_row_sum_one(m) for m in norms])
    assert float(rescaled.sum(dim=-1).amax()) <= 1 + 1e-12
    factor = torch.stack([m.sum(dim=-1).amax(dim=-1) for m in norms]).prod(dim=0)
    torch.testing.assert_close(rescaled * factor[:, None, None], raw, rtol=1e-10, atol=0)
    wanted = F.interpolate(rescaled[:, 0, 1:].reshape(2, 1, 4, 4), size=(16, 16), mode="bilinear",
                           align_corners=False)
    ours = GlobEnc(model.float())(x)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), wanted, rtol=1e-3, atol=1e-6 * float(wanted.abs().max()))


def test_batch_independence_and_the_target_is_ignored():
    model = vit_tiny()
    x = images(3, torch.float32)
    for method in (AttentionNorm, GlobEnc):
        for rollout in (False, True):
            explainer = method(model, rollout=rollout)
            together = explainer(x, batch_size=2)
            alone = torch.cat([explainer(x[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6 * float(alone.abs().max()))
        explainer = method(model)
        torch.testing.assert_close(explainer(x, [4, 0, 2]), explainer(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="out of range"):
            explainer(x, 9)


@pytest.mark.parametrize("method", [AttentionNorm, GlobEnc])
def test_create_graph_equals_finite_differences(method):
    """float64, both options: the map's derivative in the position embedding, the first block's qkv weight and the
    second block's output projection equals central differences."""
    model = tiny_vit().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for rollout in (False, True):
        explainer = method(model, rollout=rollout)
        check_parameter_derivative(lambda graph: explainer(x, create_graph=graph), model,
                                   ["pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight"],
                                   rtol=1e-5, atol=1e-10)


def test_defaults_are_the_papers():
    """The attention norm: one matrix per layer, no aggregation (Kobayashi et al.'s analyses and code); GlobEnc:
    the rollout of N_Enc (the authors' demo and compute_joint_attention).  Both class-agnostic attention methods."""
    assert AttentionNorm.defaults == {"rollout": False}
    assert GlobEnc.defaults == {"rollout": True}
    for name, method in (("attention_norm", AttentionNorm), ("globenc", GlobEnc)):
        assert A.get_method(name) is method and method.kind == "attention" and method.argmax_on_rows


@pytest.mark.parametrize("method", [ALTI, AttentionNorm, GlobEnc])
def test_bad_options_and_models_name_what_is_wrong(method):
    explainer, x = method(tiny_vit()), torch.randn(1, 3, 16, 16)
    for value in ("yes", 1, None):
        with pytest.raises(TypeError, match="rollout must be a bool"):
            explainer(x, rollout=value)
    with pytest.raises(TypeError, match="unknown option 'rolout'"):
        method(tiny_vit(), rolout=False)
    with pytest.raises(ValueError, match="batch_size"):
        explainer(x, batch_size=0)
    with pytest.raises(ValueError, match="found no attention"):
        method(tiny_cnn())(x)
    with pytest.raises(ValueError, match=f"{method.label} needs .* normalised .* first"):  # timm's scale_norm
        method(tiny_vit(scale_attn_norm=True))(x)
    from timm.models.vision_transformer import ResPostBlock
    with pytest.raises(ValueError, match="pre-norm blocks"):  # post-norm: x + norm(attention(x))
        method(tiny_vit(block_fn=ResPostBlock))(x)
    model = tiny_vit()
    model.blocks = nn.Sequential(*[GatedBlock(b) for b in model.blocks])
    with pytest.raises(ValueError, match=f"{method.label}'s decomposition of block .* does not rebuild"):
        method(model)(x)


@pytest.mark.parametrize("method", [AttentionNorm, GlobEnc])
def test_a_callers_autocast_runs_the_forward_alone_in_bfloat16(method):
    """Under a caller's autocast the norms and the rollout stay float32, as with amp=True (they ran in bfloat16
    once: 0.0062 against amp's 0.0022 for the attention norm, 0.0091 against 0.0015 for GlobEnc, 3-block ViT-S)."""
    from test_alti import relative_errors

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=5).eval()
    with_amp, under_autocast, apart = relative_errors(method, model, images(2, torch.float32))
    assert under_autocast < 5e-3 and apart < 1e-4, (with_amp, under_autocast, apart)


@pytest.mark.parametrize("method,rollout,formed", [(AttentionNorm, False, 1), (AttentionNorm, True, 2),
                                                    (GlobEnc, True, 2), (GlobEnc, False, 1)])
def test_head_vectors_are_formed_for_the_blocks_read_one_at_a_time(monkeypatch, method, rollout, formed):
    """Without the rollout only the last block's head vectors are formed (the attention norm's default), with it
    one block's at a time (each dropped before the next are formed); the maps are the same."""
    import gc
    import weakref
    from attribution.transformers import alti as module

    model, x = vit_tiny(), images(2, torch.float32)
    expected = method(model)(x, rollout=rollout)
    live: List[weakref.ref] = []
    most: List[int] = []
    original = module.head_vectors

    def counted(*args, **kwargs):
        gc.collect()
        most.append(sum(ref() is not None for ref in live))
        out = original(*args, **kwargs)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module, "head_vectors", counted)
    assert torch.equal(method(model)(x, rollout=rollout), expected)
    assert len(most) == formed and max(most) == 0, most
