"""DecompX against the authors' algorithm written out for one image at a time: every token's representation kept as a
list of one vector per input token, carried by hand through each operation (the first block's value vectors per
head and token pair, each later block's layer norm per part, the value and output projections per head, the
attention's sum over the source tokens, each bias shared by |<part, bias>|, the MLP's linears and GELU slope per
part, the final norm, the readout and the classifier), on timm ViTs (vit_tiny at 32x32 with 8x8 patches: fused and
unfused attention, register tokens, no class token with average pooling, layer scale) and torchvision's ViT
(with and without its tanh pre-logits), in float64; completeness (the shares, and the bias token, sum to the
logit); the closed form of a model whose tokens never mix; class-discriminative maps; batch independence and the
memory slices; create_graph against finite differences; the defaults; and what is refused."""
from __future__ import annotations

from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.targets import resolve_target
from attribution.transformers import decompx as module
from attribution.transformers.decompx import BIASES, DecompX
from conftest import check_parameter_derivative, tiny_cnn, tiny_vit
from test_alti import CASES, GatedBlock, images, parts_of, with_random_affine_parts
from vit_parts import first_block_inputs

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

Parts = List[torch.Tensor]  # one (D,) vector per input token (and the bias token last for biases='token')


def model_of(case: str) -> nn.Module:
    """test_alti's models in float64, with torchvision's head (zeros at initialisation) drawn at random."""
    model = CASES[case]().double()
    if isinstance(model, torchvision.models.VisionTransformer):
        with torch.no_grad():
            model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(2))
    return model


def pre_logits_vit() -> nn.Module:
    """torchvision's ViT with its representation layer: pre_logits linear, tanh, head."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5, representation_size=16)
    model = with_random_affine_parts(model.eval()).double()
    with torch.no_grad():
        model.heads.head.weight.normal_(generator=torch.Generator().manual_seed(2))
    return model


# ------------------------------------------------------------------------------------- written out by hand
def share(vectors: Parts, bias: Optional[torch.Tensor], biases: str) -> Parts:
    """The authors' bias_decomposer, vector by vector: weight_k = |<v_k, b>| ('absdot'), ||v_k|| ('norm'), 1 for a
    non-zero v_k ('equal'); each v_k gets weight_k / sum of the weights of b (equal shares if every weight is 0);
    'token': b added to the last vector, the bias token."""
    if bias is None:
        return vectors
    if biases == "token":
        return vectors[:-1] + [vectors[-1] + bias]
    if biases == "absdot":
        weights = [abs(float(v @ bias)) for v in vectors]
    elif biases == "norm":
        weights = [float(v.norm()) for v in vectors]
    else:
        weights = [float(bool((v != 0).any())) for v in vectors]
    total = sum(weights)
    return [v + (w / total if total > 0 else 1 / len(vectors)) * bias for v, w in zip(vectors, weights)]


def layer_norm_parts(vectors: Parts, actual: torch.Tensor, norm: nn.LayerNorm, biases: str) -> Parts:
    """The authors' ln_decomposer: each part minus its own mean, divided by the actual vector's deviation
    sqrt(var + eps), times gamma; beta shared."""
    std = (actual.var(unbiased=False) + norm.eps).sqrt()
    return share([norm.weight * (v - v.mean()) / std for v in vectors], norm.bias, biases)


def slope(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """GeLU_ZO: act(h) / h per neuron (0 where h = 0)."""
    return torch.where(pre != 0, post / torch.where(pre != 0, pre, torch.ones_like(pre)), torch.zeros_like(pre))


def decompx_written_out(model: nn.Module, image: torch.Tensor, target: int, biases: str = "absdot"):
    """One image's shares of the target's logit (one per input token, then the bias token for 'token') and the
    model's logits, every decomposed vector computed by hand."""
    parts, scales, first, prefix, _ = parts_of(model)
    h = first_block_inputs(model, first, image[None])[0]  # the actual tokens (N, D)
    n, d = h.shape
    count = n + (biases == "token")
    stream: Optional[List[Parts]] = None
    for index, (p, (s1, s2)) in enumerate(zip(parts, scales)):
        s1 = torch.ones(d, dtype=h.dtype) if s1 is None else s1
        s2 = torch.ones(d, dtype=h.dtype) if s2 is None else s2
        width = d // p.heads
        a = p.norm1(h)
        (wq, wk, wv), (bq, bk, bv) = p.qkv[0].chunk(3), p.qkv[1].chunk(3)
        wo, bo = p.proj
        heads = []  # (attention (N, N), W_V^h, b_V^h, s1 * W_O^h) per head
        for head in range(p.heads):
            cols = slice(head * width, (head + 1) * width)
            q, k = a @ wq[cols].T + bq[cols], a @ wk[cols].T + bk[cols]
            heads.append(((q @ k.T * p.scale).softmax(dim=-1), wv[cols], bv[cols], s1[:, None] * wo[:, cols]))
        if stream is None:  # the first block: token k's whole value vector in its own part
            rows = []
            for i in range(n):
                row = [h[i].clone() if i == k else torch.zeros(d, dtype=h.dtype) for k in range(n)]
                for attention, w_v, b_v, w_o in heads:
                    for k in range(n):
                        row[k] = row[k] + attention[i, k] * (w_o @ (w_v @ a[k] + b_v))
                rows.append(row + [torch.zeros(d, dtype=h.dtype)] * (count - n))
            bias = s1 * bo
        else:  # later blocks: LN1 per part, W_V, the attention over the sources, W_O
            normed = [layer_norm_parts(stream[j], h[j], p.norm1, biases) for j in range(n)]
            rows = []
            for i in range(n):
                row = []
                for k in range(count):
                    vector = stream[i][k].clone()
                    for attention, w_v, _, w_o in heads:
                        mixed = sum(attention[i, j] * (w_v @ normed[j][k]) for j in range(n))
                        vector = vector + w_o @ mixed
                    row.append(vector)
                rows.append(row)
            bias = s1 * (wo @ bv + bo)
        rows = [share(row, bias, biases) for row in rows]
        y = h + sum(attention @ (a @ w_v.T + b_v) @ w_o.T for attention, w_v, b_v, w_o in heads) + s1 * bo
        pre = F.linear(p.norm2(y), *p.fc1)
        theta = slope(pre, p.act(pre))
        z = y + s2 * F.linear(p.act(pre), *p.fc2)
        stream = []
        for i in range(n):
            normed2 = layer_norm_parts(rows[i], y[i], p.norm2, biases)
            hidden = share([p.fc1[0] @ v for v in normed2], p.fc1[1], biases)
            out = share([(s2[:, None] * p.fc2[0]) @ (theta[i] * v) for v in hidden], s2 * p.fc2[1], biases)
            stream.append([r + o for r, o in zip(rows[i], out)])
        h = z
    logits, actual = head_written_out(model, stream, h, prefix, biases)
    return torch.stack([v[target] for v in logits]), actual


def head_written_out(model: nn.Module, stream: List[Parts], h: torch.Tensor, prefix: int, biases: str):
    """The head on the parts: the final norm on every token, the class token (or the mean of the patch tokens),
    fc_norm, the linears (the classifier's bias shared over the class dimension) and tanh's slope."""
    if isinstance(model, torchvision.models.VisionTransformer):
        final, pool, fc_norm = model.encoder.ln, "token", None
        layers = list(model.heads)
    else:
        final = model.norm if isinstance(model.norm, nn.LayerNorm) else None
        pool = model.global_pool
        fc_norm = model.fc_norm if isinstance(model.fc_norm, nn.LayerNorm) else None
        layers = [model.head]
    if final is not None:
        stream = [layer_norm_parts(stream[i], h[i], final, biases) for i in range(len(stream))]
        h = final(h)
    if pool == "token":
        pooled, actual = stream[0], h[0]
    else:
        patches = stream[prefix:]
        pooled = [sum(row[k] for row in patches) / len(patches) for k in range(len(stream[0]))]
        actual = h[prefix:].mean(dim=0)
    if fc_norm is not None:
        pooled, actual = layer_norm_parts(pooled, actual, fc_norm, biases), fc_norm(actual)
    for layer in layers:
        if isinstance(layer, nn.Linear):
            pooled, actual = share([layer.weight @ v for v in pooled], layer.bias, biases), layer(actual)
        else:
            theta = slope(actual, layer(actual))
            pooled, actual = [theta * v for v in pooled], layer(actual)
    return pooled, actual


def shares_of(model: nn.Module, x: torch.Tensor, target, biases: str = "absdot") -> torch.Tensor:
    """The explainer's (B, K) shares, from one call of its per-chunk method."""
    explainer = DecompX(model)
    names = explainer._block_names(x)
    modules = dict(model.named_modules())
    resolved = resolve_target(target, x.shape[0], x.device)
    scores, _ = explainer._shares(x, resolved, torch.arange(x.shape[0]), [modules[n] for n in names], names, biases,
                                  False)
    return scores


def to_map(model: nn.Module, shares: torch.Tensor, size) -> torch.Tensor:
    """(B, K) shares to (B, 1, H, W): the patch tokens on their grid, upsampled bilinearly."""
    _, _, _, prefix, patch = parts_of(model)
    patches = shares[:, prefix:prefix + (size[0] // patch) * (size[1] // patch)]
    return F.interpolate(patches.reshape(-1, 1, size[0] // patch, size[1] // patch), size=size, mode="bilinear",
                         align_corners=False)


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", sorted(CASES) + ["torchvision_pre_logits"])
def test_decompx_equals_the_authors_algorithm_written_out(case):
    """float64, one image, the default absdot shares: the shares of every input token, and the map (batch_size 1
    and the whole batch)."""
    model = pre_logits_vit() if case == "torchvision_pre_logits" else model_of(case)
    x = images(1)
    with torch.no_grad():
        expected, logits = decompx_written_out(model, x[0], target=2)
        torch.testing.assert_close(logits, model(x)[0], rtol=1e-10, atol=1e-12)  # the hand-written forward
    ours = shares_of(model, x, 2)
    torch.testing.assert_close(ours[0], expected, rtol=1e-9, atol=1e-12)
    wanted = to_map(model, expected[None], (32, 32))
    torch.testing.assert_close(DecompX(model)(x, 2), wanted, rtol=1e-9, atol=1e-12)
    assert wanted.std() > 1e-3 * wanted.abs().mean()  # a map that varies over the image


@pytest.mark.parametrize("biases", ["norm", "equal", "token"])
def test_the_other_bias_shares_equal_the_authors_written_out(biases):
    model = model_of("timm_layer_scale")
    x = images(1)
    with torch.no_grad():
        expected, _ = decompx_written_out(model, x[0], target=4, biases=biases)
    ours = shares_of(model, x, 4, biases)
    assert ours.shape == (1, 17 + (biases == "token"))
    torch.testing.assert_close(ours[0], expected, rtol=1e-9, atol=1e-12)
    shares = DecompX(model, biases=biases)(x, 4)
    torch.testing.assert_close(shares, to_map(model, expected[None], (32, 32)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["timm_fused", "timm_no_class_token", "timm_registers", "torchvision"])
def test_the_shares_sum_to_the_logit(case):
    """Completeness, float64 to 1e-6: every absdot/norm/equal bias is inside the tokens' shares, so they sum to the
    target's logit; with biases='token' the tokens' shares plus the bias token's do (and the bias token's is not 0)."""
    model = model_of(case)
    x = images(2)
    with torch.no_grad():
        logits = model(x)
    for target in ([0, 3], [4, 1]):
        wanted = logits[torch.arange(2), torch.tensor(target)]
        tokens = parts_of(model)[3] + 16
        for biases in BIASES:
            shares = shares_of(model, x, target, biases)
            assert shares.shape == (2, tokens + (biases == "token"))
            torch.testing.assert_close(shares.sum(dim=1), wanted, rtol=0, atol=1e-6)
            if biases == "token":
                assert float(shares[:, -1].abs().min()) > 1e-6


def test_float32_matches_float64_and_sums_to_its_logit():
    model = model_of("timm_fused")
    x = images(2)
    expected = shares_of(model, x, [1, 2])
    model32, x32 = model.float(), x.float()
    ours = shares_of(model32, x32, [1, 2])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    with torch.no_grad():
        logits = model32(x32)[torch.arange(2), torch.tensor([1, 2])]
    torch.testing.assert_close(ours.sum(dim=1), logits, rtol=1e-5, atol=1e-5)


def unmixed_vit(class_token: bool) -> nn.Module:
    """Tokens that never mix: one head whose attention is exactly the identity (W_q = 1e4 I, W_k = I, no biases)
    and MLPs that output 0 (fc2's weight and bias 0); the head's fc_norm and classifier without biases."""
    pool = {"global_pool": "token"} if class_token else {"class_token": False, "global_pool": "avg"}
    model = with_random_affine_parts(tiny_vit(num_heads=1, **pool)).double()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:48] = torch.cat([1e4 * torch.eye(24), torch.eye(24)]).double()
            block.attn.qkv.bias[:48] = 0
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
        model.head.bias.zero_()
        if isinstance(model.fc_norm, nn.LayerNorm):
            model.fc_norm.bias.zero_()
    return model


@pytest.mark.parametrize("class_token", [False, True])
def test_tokens_that_never_mix_have_the_closed_form(class_token):
    """Every bias a token's stream receives is shared by |<part, bias>| among its parts, and only its own part is
    non-zero, so each token's final vector z_k is its own part alone.  With average pooling, fc_norm (gamma, no
    beta) and a classifier without bias the logit is linear in the parts: share_k = w_t . (gamma * (z_k - mean(z_k)))
    / (16 sigma), sigma the deviation of the pooled vector (z_k: the last block's output); the map is those shares
    on the 4 x 4 grid.  With a class token only its own part reaches the head: it holds the whole logit and the
    map is 0."""
    model = unmixed_vit(class_token)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaving: List[torch.Tensor] = []
    handle = model.blocks[-1].register_forward_hook(lambda m, i, o: leaving.append(o))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    shares = shares_of(model, x, [1, 3])
    wanted = logits[torch.arange(2), torch.tensor([1, 3])]
    if class_token:
        torch.testing.assert_close(shares[:, 0], wanted, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(shares[:, 1:], torch.zeros(2, 16, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(DecompX(model)(x, [1, 3]), torch.zeros(2, 1, 16, 16, dtype=torch.float64),
                                   rtol=0, atol=1e-12)
        return
    z = leaving[0]
    pooled = z.mean(dim=1)
    sigma = (pooled.var(dim=-1, unbiased=False) + model.fc_norm.eps).sqrt()
    rows = model.head.weight[torch.tensor([1, 3])]  # (2, D)
    centred = model.fc_norm.weight * (z - z.mean(dim=-1, keepdim=True))
    closed = (centred * rows[:, None]).sum(dim=-1) / (16 * sigma[:, None])
    torch.testing.assert_close(shares, closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shares.sum(dim=1), wanted, rtol=1e-10, atol=1e-12)
    grid = F.interpolate(closed.reshape(2, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(DecompX(model)(x, [1, 3]), grid, rtol=1e-10, atol=1e-12)


def test_maps_are_class_discriminative_and_none_is_the_arg_max():
    """Two classes' maps differ, their shares differing by the classifier rows' difference; target None explains
    each image's arg-max class."""
    model = model_of("timm_fused")
    x = images(2)
    explainer = DecompX(model)
    first, second = explainer(x, 0), explainer(x, 3)
    assert not torch.allclose(first, second, rtol=1e-3, atol=1e-6)
    with torch.no_grad():
        logits = model(x)
    difference = shares_of(model, x, 0).sum(dim=1) - shares_of(model, x, 3).sum(dim=1)
    torch.testing.assert_close(difference, logits[:, 0] - logits[:, 3], rtol=0, atol=1e-9)
    torch.testing.assert_close(explainer(x), explainer(x, logits.argmax(dim=1)), rtol=0, atol=0)


def test_batch_independence_and_the_memory_slices(monkeypatch):
    """Three images together (one pass, or passes of 2), alone, and with the stream taken one image at a time and
    the MLP's hidden vectors 3 query tokens at a time: the same maps."""
    model = tiny_vit(depth=3)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    explainer = DecompX(model)
    together = explainer(x, [4, 0, 2])
    alone = torch.cat([explainer(x[i:i + 1], t) for i, t in enumerate([4, 0, 2])])
    tolerance = {"rtol": 1e-5, "atol": 1e-6 * float(alone.abs().max())}
    torch.testing.assert_close(together, alone, **tolerance)
    torch.testing.assert_close(explainer(x, [4, 0, 2], batch_size=2), alone, **tolerance)
    monkeypatch.setattr(module, "STREAM_ELEMENTS", 17 * 17 * 24)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 3 * 17 * 48)
    torch.testing.assert_close(explainer(x, [4, 0, 2]), together, **tolerance)


def test_create_graph_equals_finite_differences():
    """float64: the map's derivative in the position embedding, the first block's qkv weight, the second block's
    fc1 weight, the final norm's weight and the classifier's weight equals central differences."""
    model = with_random_affine_parts(tiny_vit()).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    explainer = DecompX(model)
    check_parameter_derivative(lambda graph: explainer(x, 1, create_graph=graph), model,
                               ["pos_embed", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "norm.weight",
                                "head.weight"], rtol=1e-5, atol=1e-10)


def test_defaults_are_the_authors():
    """mohsenfayyaz/DecompX's DecompXConfig and demo: include_biases=True with bias_decomp_type='absdot'."""
    assert DecompX.defaults == {"biases": "absdot"}
    assert BIASES == ("absdot", "norm", "equal", "token")
    assert A.get_method("decompx") is DecompX
    assert DecompX.kind == "attention" and DecompX.argmax_on_rows and DecompX.needs_class_indices
    assert module.STREAM_ELEMENTS == 2 ** 25 and module.CHUNK_ELEMENTS == 2 ** 24


def test_bad_options_and_targets_name_what_is_wrong():
    explainer, x = DecompX(tiny_vit()), torch.randn(1, 3, 16, 16)
    for value in ("dot", None, 1):
        with pytest.raises(ValueError, match="biases must be one of"):
            explainer(x, 0, biases=value)
    with pytest.raises(TypeError, match="unknown option 'bias'"):
        DecompX(tiny_vit(), bias="absdot")
    with pytest.raises(ValueError, match="class indices"):
        explainer(x, lambda s: s[:, 0])
    with pytest.raises(ValueError, match="score must be 'logit', got 'softmax'"):
        explainer(x, 0, score="softmax")
    with pytest.raises(ValueError, match="batch_size"):
        explainer(x, 0, batch_size=0)


def distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    return VisionTransformerDistilled(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
                                      num_classes=5).eval()


def test_models_it_cannot_follow_are_refused():
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ResPostBlock

    x = torch.randn(1, 3, 16, 16)
    cases = [
        (tiny_cnn(), "found no attention"),
        (tiny_vit(scale_attn_norm=True), "normalised .* first"),  # timm's scale_norm before proj
        (tiny_vit(block_fn=ResPostBlock), "pre-norm blocks"),  # post-norm: x + norm(attention(x))
        (tiny_vit(scale_mlp_norm=True), "MLP to be two linears .* runs LayerNorm between them"),
        (tiny_vit(mlp_layer=SwiGLUPacked), r"MLP to be two linears .* maps \(1, 17, 48\) to \(1, 17, 24\)"),
        (tiny_vit(class_token=False, global_pool="map"), "could not follow the head.*attention-pooling heads"),
        (distilled(), "could not follow the head"),  # (head(x[:, 0]) + head_dist(x[:, 1])) / 2
    ]
    for model, message in cases:
        with pytest.raises(ValueError, match=message):
            DecompX(model)(x, 0)
    model = tiny_vit()
    model.blocks = nn.Sequential(*[GatedBlock(b) for b in model.blocks])
    with pytest.raises(ValueError, match="DecompX's decomposition of block .* does not rebuild"):
        DecompX(model)(x, 0)


def test_a_callers_autocast_runs_the_forward_alone_in_bfloat16():
    """Under a caller's autocast the propagation stays float32, as with amp=True (it ran in bfloat16 once: 0.0087
    against amp's 0.0065 on a 3-block ViT-S, 0.008 apart)."""
    from test_alti import relative_errors

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                              num_classes=5).eval()
    with_amp, under_autocast, apart = relative_errors(DecompX, model, images(2, torch.float32))
    assert under_autocast < 1e-2 and apart < 1e-4, (with_amp, under_autocast, apart)


def test_only_the_first_blocks_head_vectors_are_formed(monkeypatch):
    """The other blocks' attention is read from the recorded pieces, with no (B, H, N, D) head vectors."""
    from attribution.transformers import alti

    model, x = model_of("timm_fused").float(), images(2, torch.float32)
    expected = DecompX(model)(x, 1)
    calls = []
    original = alti.head_vectors
    monkeypatch.setattr(alti, "head_vectors", lambda *args: calls.append(1) or original(*args))
    assert torch.equal(DecompX(model)(x, 1), expected) and len(calls) == 1
