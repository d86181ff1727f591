"""AtMan against its algorithm written out one token at a time on a hand-written ViT whose attention applies the
authors' manipulation explicitly (the same weights run through F.scaled_dot_product_attention and through a
sequence-first nn.MultiheadAttention for AtMan), timm's fused and unfused attention giving one map, closed forms
(factor 1 changes nothing; a model where only one token's key can be suppressed), the cosine similarity and the
factors of conceptual suppression written out, the authors' defaults and bad options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.transformers.atman import KeySuppression, cosine_similarity, key_factors, suppress_keys
from conftest import central_difference, tiny_cnn, tiny_vit

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


class HandAttention(nn.Module):
    """Self-attention with the weights of an ``nn.MultiheadAttention``, computed as ``kind`` says: 'explicit' (by
    hand; with ``factors`` (N,) set, the authors' manipulation: scores shifted by each query's minimum, key j's
    column times ``factors[j]``), 'sdpa' (F.scaled_dot_product_attention) or 'mha' (the module, sequence-first)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=False)
        self.heads = heads
        self.kind = "explicit"
        self.factors = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mha":
            seq = x.transpose(0, 1)
            return self.mha(seq, seq, seq, need_weights=False)[0].transpose(0, 1)
        batch, tokens, dim = x.shape
        qkv = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if self.kind == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5
            if self.factors is not None:
                scores = (scores - scores.min(dim=-1, keepdim=True).values) * self.factors
            out = scores.softmax(dim=-1) @ v
        return self.mha.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """A small ViT written out: patch embedding, optional class token (the head reads it; else the mean token),
    position embedding, pre-norm blocks."""

    def __init__(self, patch: int = 4, side: int = 16, dim: int = 16, heads: int = 2, depth: int = 2,
                 cls: bool = True, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.patch_size = patch
        self.num_prefix_tokens = int(cls)
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, (side // patch) ** 2 + int(cls), dim) * 0.1)
        self.blocks = nn.ModuleList(HandBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, classes)
        self.eval()

    def set_kind(self, kind: str) -> "HandViT":
        for block in self.blocks:
            block.attn.kind = kind
        return self

    def set_factors(self, factors) -> None:
        for block in self.blocks:
            block.attn.factors = factors

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens entering the first block."""
        t = self.embed(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], dim=1)
        return t + self.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.head(t[:, 0] if self.cls_token is not None else t.mean(dim=1))


def written_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The authors' cosine: each vector divided by max(norm, 1e-8), the dot product clipped to [-1, 1]."""
    dot = sum(float(p) * float(q) for p, q in zip(a / max(float(a.norm()), 1e-8), b / max(float(b.norm()), 1e-8)))
    return min(1.0, max(-1.0, dot))


def written_factors(similarity, token: int, factor: float, threshold):
    """The authors' config for suppressing ``token``: its factor, then every other token at least ``threshold``
    similar gets ``(1 - f)(1 - cos) + f`` (cos in [0, 1]; 1 outside), 1 elsewhere."""
    factors = [1.0] * len(similarity)
    factors[token] = factor
    if threshold is not None:
        for other, cos in enumerate(similarity[token]):
            if other != token and cos >= threshold:
                factors[other] = (1 - factor) * (1 - cos) + factor if 0 <= cos <= 1 else 1.0
    return factors


def atman_written_out(model: HandViT, x: torch.Tensor, classes, factor: float, threshold):
    """Per image: the cosine similarity of the tokens entering the first block, pair by pair; the clean forward
    and one forward per patch token with every block's attention manipulated by that token's factors; the map is
    clean minus suppressed log-probability of the class on the patch grid, upsampled bilinearly."""
    model.set_kind("explicit")
    prefix, grid = model.num_prefix_tokens, x.shape[-1] // model.patch_size
    maps = []
    with torch.no_grad():
        for image, cls in zip(x, classes):
            tokens = model.tokens(image[None])[0]
            count = tokens.shape[0]
            similarity = [[written_cosine(tokens[a], tokens[b]) for b in range(count)] for a in range(count)]

            def log_prob(factors):
                model.set_factors(torch.tensor(factors))
                try:
                    return float(model(image[None]).log_softmax(dim=1)[0, cls])
                finally:
                    model.set_factors(None)

            clean = log_prob([1.0] * count)
            relevance = [clean - log_prob(written_factors(similarity, i, factor, threshold))
                         for i in range(prefix, count)]
            maps.append(torch.tensor(relevance).view(1, grid, grid))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


def images_with_repeats(count: int = 2) -> torch.Tensor:
    """Random 16x16 images in which two patches repeat others: their tokens are similar (conceptual suppression
    has neighbours to find)."""
    torch.manual_seed(4)
    x = torch.randn(count, 3, 16, 16)
    x[:, :, 8:12, 12:16] = x[:, :, 0:4, 0:4]
    x[:, :, 12:16, 0:4] = x[:, :, 4:8, 4:8]
    return x


@pytest.mark.parametrize("factor, threshold", [(0.1, 0.6), (0.1, None), (0.5, 0.3), (1.5, 0.6)])
@pytest.mark.parametrize("kind", ["sdpa", "mha"])
def test_atman_equals_the_algorithm_written_out(kind, factor, threshold):
    model, x, classes = HandViT(), images_with_repeats(), [1, 3]
    if threshold is not None:  # conceptual suppression is exercised: some other token is similar enough
        similarity = cosine_similarity(model.tokens(x).detach())
        off_diagonal = similarity - 2 * torch.eye(similarity.shape[1])
        assert (off_diagonal >= threshold).any()
    expected = atman_written_out(model, x, classes, factor, threshold)
    explainer = A.AtMan(model.set_kind(kind), suppression_factor=factor, conceptual_threshold=threshold)
    for batch_size in (None, 5):  # 5 rows per pass: passes straddle the two images
        torch.testing.assert_close(explainer(x, classes, batch_size=batch_size), expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().amax() > 1e-3
    assert all(block.attn.factors is None and block.attn.kind == kind for block in model.blocks)


def test_fused_and_unfused_timm_attention_give_one_map():
    """In float64 (the maps are differences of log-probabilities, about 1e-4 on this random ViT: float32 rounding of
    the two paths' different operation orders would be 1e-3 of them)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    fused, unfused = tiny_vit(fused=True).double(), tiny_vit(fused=False).double()
    for options in ({}, {"conceptual_threshold": None}, {"suppression_factor": 0.0, "conceptual_threshold": 0.2}):
        ours = A.AtMan(fused, **options)(x, [0, 4])
        torch.testing.assert_close(ours, A.AtMan(unfused, **options)(x, [0, 4]), rtol=1e-9, atol=1e-13)
        assert ours.abs().amax() > 1e-5
    assert all(block.attn.fused_attn for block in fused.blocks)
    assert not any(block.attn.fused_attn for block in unfused.blocks)
    assert not any(m._forward_hooks or m._forward_pre_hooks for model in (fused, unfused) for m in model.modules())


@pytest.mark.parametrize("threshold", [0.3, None])
def test_create_graph_equals_finite_differences(threshold):
    """The map's derivative in the position embedding (float64): conceptual suppression's factors depend on it
    through the tokens' similarities, which must carry the graph (78 similar pairs at 0.3 on this ViT)."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    model = tiny_vit().double()
    explainer = A.AtMan(model, conceptual_threshold=threshold)
    direction = torch.randn(model.pos_embed.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(explainer(x, [0, 4], create_graph=True).sum(), model.pos_embed)
    numeric = central_difference(lambda: explainer(x, [0, 4]).sum(), model.pos_embed, direction, step=1e-7)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-4, atol=1e-9)


def _torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    return model


@pytest.mark.parametrize("build, side", [(tiny_vit, 16), (lambda: tiny_vit(fused=False), 16),
                                         (_torchvision_vit, 32), (lambda: HandViT().set_kind("mha"), 16)])
def test_a_factor_of_one_changes_nothing(build, side):
    """m = 1 for every key (the similar tokens' factor is then 1 + 0 (1 - cos) = 1 too): every forward equals the
    clean one, and the map is exactly 0; any other factor moves it."""
    model = build()
    torch.manual_seed(1)
    x = torch.randn(2, 3, side, side)
    zero = A.AtMan(model, suppression_factor=1.0, conceptual_threshold=0.0)(x, [0, 2])
    assert torch.equal(zero, torch.zeros_like(zero))
    assert A.AtMan(model)(x, [0, 2]).abs().amax() > 0


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_only_the_token_whose_key_scores_above_the_minimum_matters(threshold):
    """One block, no class token, 1x1 patches without bias, W_q = W_k without bias, the image zero but at pixel
    (1, 2): every token but that one is zero, so every score is 0 except q_j.k_j = |k_j|^2 / sqrt(d) >= 0.  Each
    query's minimum is 0 and a suppressed zero score stays 0: suppressing any other token changes nothing (exact
    zeros), suppressing token j changes its own row (the mean pooling reads it)."""
    model = HandViT(patch=1, side=4, dim=8, depth=1, cls=False)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.embed.bias.zero_()
        attn = model.blocks[0].attn.mha
        attn.in_proj_bias.zero_()
        attn.in_proj_weight[:8] = attn.in_proj_weight[8:16]  # W_q = W_k
    x = torch.zeros(1, 3, 4, 4)
    x[0, :, 1, 2] = torch.tensor([3.0, -6.0, 1.5])
    out = A.AtMan(model.set_kind("sdpa"), conceptual_threshold=threshold)(x, 3)[0, 0]
    others = torch.ones(4, 4, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(out[others], torch.zeros(15))  # 4x4 patches on a 4x4 image: the grid is the map
    assert out[1, 2].abs() > 1e-5
    expected = atman_written_out(model, x, [3], 0.1, threshold)[0, 0]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-7)


def test_masked_scores_stay_masked_and_out_of_the_minimum():
    """The shift is each query's smallest finite score; -inf (masked) scores stay -inf, whatever their factor; a
    boolean mask given to F.scaled_dot_product_attention inside the mode is applied so."""
    inf = float("inf")
    scores = torch.tensor([[[[1.0, -inf, 3.0, -2.0], [0.5, -inf, -inf, 1.5]]]])
    factors = torch.tensor([[0.5, 0.1, 1.0, 2.0]])
    expected = torch.tensor([[[[1.5, -inf, 5.0, 0.0], [0.0, -inf, -inf, 2.0]]]])
    assert torch.equal(suppress_keys(scores, factors), expected)
    finite = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(suppress_keys(finite, factors.expand(2, 4), masked=False),
                               suppress_keys(finite, factors.expand(2, 4)))
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 4, 5).unbind(0)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[:, 1] = False
    with KeySuppression(nn.Identity(), factors) as mode:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    written = (q @ k.transpose(-2, -1) / 5 ** 0.5).masked_fill(~keep, -inf)
    low = written.masked_fill(~keep, inf).min(dim=-1, keepdim=True).values
    written = torch.where(keep, (written - low) * factors[0], written)
    torch.testing.assert_close(out, written.softmax(dim=-1) @ v)
    assert mode.calls == 1


def test_cosine_similarity_equals_the_authors_written_out():
    """Pairwise cosines of each image's tokens, a zero token (norm floored at 1e-8: cosine 0) and a repeated
    token (cosine 1) included."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 6, 5)
    tokens[0, 2] = 0
    tokens[1, 4] = tokens[1, 1] * 3
    ours = cosine_similarity(tokens)
    expected = torch.tensor([[[written_cosine(t[a], t[b]) for b in range(6)] for a in range(6)] for t in tokens])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert ours[0, 2].abs().amax() == 0 and ours[1, 1, 4] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("factor, threshold", [(0.1, 0.6), (0.1, None), (0.3, 0.0), (2.0, 0.5)])
def test_key_factors_equal_the_authors_configs(factor, threshold):
    """Each row's factors as the authors' ConceptualSuppression builds its config (token -1: the clean row)."""
    torch.manual_seed(1)
    similarity = cosine_similarity(torch.randn(2, 7, 3))
    owners = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    token = torch.tensor([-1, 1, 6, 0, 2, 3, -1])
    ours = key_factors(similarity, owners, token, factor, threshold, 7)
    for row, (image, index) in enumerate(zip(owners.tolist(), token.tolist())):
        if index < 0:
            expected = [1.0] * 7
        else:
            expected = written_factors(similarity[image].tolist(), index, factor, threshold)
        torch.testing.assert_close(ours[row], torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_conceptual_suppression_changes_the_map():
    model, x = HandViT(), images_with_repeats()
    with_neighbours = A.AtMan(model.set_kind("sdpa"))(x, [1, 3])
    alone = A.AtMan(model, conceptual_threshold=None)(x, [1, 3])
    assert not torch.allclose(with_neighbours, alone)


def test_defaults_are_the_authors():
    """Aleph-Alpha/AtMan: atman-magma/atman_magma/explainer.py's Explainer(suppression_factor=0.1,
    conceptual_suppression_threshold=0.6) and atman-magma/config.yml (suppression_factor_values 0.1, conc_sup_values
    0.6); the cross-entropy of the target (logit_parsing.get_delta_cross_entropies), i.e. its log-probability."""
    assert A.AtMan.defaults == {"suppression_factor": 0.1, "conceptual_threshold": 0.6, "score": "log_softmax"}
    assert A.get_method("atman") is A.AtMan and A.AtMan.kind == "attention"


def test_bad_options_and_models_name_what_is_wrong():
    explainer, x = A.AtMan(tiny_vit()), torch.randn(1, 3, 16, 16)
    for options, match in (({"suppression_factor": -0.1}, "suppression_factor"),
                           ({"suppression_factor": float("inf")}, "suppression_factor"),
                           ({"suppression_factor": "0.1"}, "suppression_factor"),
                           ({"suppression_factor": True}, "suppression_factor"),
                           ({"conceptual_threshold": 1.5}, "conceptual_threshold"),
                           ({"conceptual_threshold": -0.2}, "conceptual_threshold"),
                           ({"conceptual_threshold": "high"}, "conceptual_threshold")):
        with pytest.raises(ValueError, match=match):
            explainer(x, 1, **options)
    with pytest.raises(TypeError, match="suppression_factor"):
        A.AtMan(tiny_vit(), supression_factor=0.5)
    with pytest.raises(ValueError, match="found no attention"):
        A.AtMan(tiny_cnn())(torch.randn(1, 3, 16, 16), 0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=5).eval()
    with pytest.raises(ValueError, match="AtMan needs"):
        A.AtMan(swin)(torch.randn(1, 3, 56, 56), 0)
