"""Norm-based token attribution on ALTI's decomposition of each block's attention sublayer: the attention norm
(Kobayashi et al.) and GlobEnc (Modarressi et al.)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..core.registry import register
from .alti import BlockDecompositionExplainer, BlockTerms, vector_norms
from .rollout import rollout_product, row_normalised, with_residual


@register("attention_norm")
class AttentionNorm(BlockDecompositionExplainer):
    """Attention norm: how far token ``j`` moves output ``i`` through the attention heads, measured as the Euclidean
    length of its weighted value vectors summed over the heads (rather than by the attention weight alone).

    Kobayashi, Kuribayashi, Yokoi & Inui, "Attention is Not Only a Weight: Analyzing Transformers with Vector
    Norms", EMNLP 2020, arXiv:2004.10102 (code: gorokoba560/norm-analysis-of-transformer).

    With each pre-norm block's attention sublayer decomposed as in :class:`~attribution.transformers.alti.ALTI`
    (``f_h(x_j) = s W_O^h (W_V^h LN_1(x_j) + b_V^h)``, ``s`` the layer scale or 1): ``N_ij = ||sum_h A_h[i, j]
    f_h(x_j)||_2``, the residual and the output bias ``b_O`` left out.  The map is the class token's row of the last
    block's ``N`` over the patch tokens (the class and distillation rows averaged for a distilled DeiT, the mean of
    the patch rows without a class token), on the patch grid, upsampled bilinearly; the norms are not normalised
    (a positive scale per image).  Class-agnostic: the target is accepted (and validated) and ignored.

    As the authors' ``BertNormOutput`` (EMNLP 2020 code): the value vectors with their bias through each head's
    slice of the output projection's weight (no ``b_O``), weighted by the attention, summed over the heads, the L2
    norm (their ``summed_weighted_norm``, the paper's ``||sum alpha f(x)||``); one matrix per layer, no
    aggregation over layers (``rollout=False``, the default; the follow-up, Kobayashi et al., EMNLP 2021,
    arXiv:2109.07152, and its code also show one matrix per layer).  ``rollout=True`` aggregates the blocks as GlobEnc's
    code (mohsenfayyaz/GlobEnc, ``build_ratio_residual_attentions``, "N-FixedRes") does for this norm: each block's
    rows divided by their sums, half the identity added, ``R = prod_l (N_l / rowsum + I) / 2``, the class token's
    row of ``R``.  The layer scale multiplies every head's vector as it multiplies the sublayer's output.  Prefix
    (class, register) tokens are sources and outputs like patch tokens.  The per-head norms ``||A_h[i, j]
    f_h(x_j)||`` of the paper's head analysis are not offered.

    Cost: one forward per image, then ``N^2 D H`` multiply-adds and ``N^2 D`` entries for the weighted vectors of
    the last block (every block with ``rollout=True``), held in query slices as ALTI's.  Every block's
    decomposition is checked against the model's residual stream after attention (a ValueError for blocks it does
    not rebuild, as ALTI).  ``create_graph=True`` keeps the map differentiable in the model's parameters (the norm
    has a kink only at a zero vector).

    Deliberate differences: a row of zero norms becomes the identity's row in the rollout (GlobEnc's code divides
    0 by 0); the map reads the class token's row, as the library's other attention methods (the authors analyse
    whole matrices, per layer).
    """

    defaults = {"rollout": False}
    label = "AttentionNorm"

    def _contributions(self, terms: BlockTerms) -> Tensor:
        return vector_norms(terms, residual=False)

    def _aggregate(self, shares: List[Tensor], rollout: bool) -> Tensor:
        if not rollout:
            return shares[-1]
        return rollout_product([with_residual(row_normalised(block)) for block in shares])


@register("globenc")
class GlobEnc(BlockDecompositionExplainer):
    """GlobEnc: the attention sublayer of every block, residual included, split into one vector per source token;
    token ``j``'s attribution to output ``i`` is the Euclidean length of its vector; the blocks' attributions
    multiplied through the model (rollout).

    Modarressi, Fayyaz, Yaghoobzadeh & Pilehvar, "GlobEnc: Quantifying Global Token Attribution by Incorporating
    the Whole Encoder Layer in Transformers", NAACL 2022, arXiv:2205.03286 (code: mohsenfayyaz/GlobEnc).

    With each pre-norm block's attention sublayer decomposed as in :class:`~attribution.transformers.alti.ALTI`:
    ``T_i(x_j) = sum_h A_h[i, j] f_h(x_j) + [i == j] x_i``, ``f_h(x_j) = s W_O^h (W_V^h LN_1(x_j) + b_V^h)``;
    ``N_l[i, j] = ||T_i(x_j)||_2``; ``R = N'_L ... N'_1`` with ``N'_l = N_l / max_i sum_j N_l[i, j]`` (no identity
    added: the residual is in ``T_i(x_i)``).  The map is the class token's row of ``R`` over the patch tokens (the
    class and distillation rows averaged for a distilled DeiT, the mean of the patch rows without a class token),
    on the patch grid, upsampled bilinearly; ``rollout=False`` reads the last block's ``N_L`` (their single-layer
    ``N_Enc``) instead.  Class-agnostic: the target is accepted (and validated) and ignored.

    As the authors' code (``src/modeling/modeling_bert.py``, ``GlobEnc_Demo.ipynb``, ``src/attention_rollout.py``):
    the value bias inside each token's vector, no ``b_O`` (nor the layer norms' biases), the residual ``x_i`` in
    ``T_i(x_i)`` alone, the L2 norm; the rollout of the raw norms, with no identity added and no row normalisation
    (their ``pre_process`` returns the matrices as they are).  Their ``N_Enc`` is for post-norm BERT, whose two
    layer norms sit on the residual stream: each is decomposed over the token's vectors (each vector centred,
    divided by the standard deviation of the token's actual sum, times ``gamma``), the feed-forward network's
    output left out (only its residual path through the second norm kept).  In a pre-norm ViT no normalisation sits
    on the residual stream between blocks: the first norm acts on each source token before its values (inside its
    vector, not linearised, as ALTI), the second only on the MLP's input, and the stream after the block is
    ``y + MLP(LN_2(y))``; with the MLP left out as GlobEnc leaves out the feed-forward network, the second step is
    the identity, and ``N_Enc`` is ``||T_i(x_j)||_2`` (their ``N_Res``).  The layer scale multiplies every head's
    vector.  Prefix (class, register) tokens are sources and outputs like patch tokens.

    Cost: one forward per image, then per block ``N^2 D H`` multiply-adds and ``N^2 D`` entries for the
    transformed vectors (the last block's alone with ``rollout=False``), held in query slices as ALTI's.  Every
    block's decomposition is checked against the model's residual stream after attention (a ValueError for blocks
    it does not rebuild).  ``create_graph=True`` keeps the map differentiable in the model's parameters (kinks only
    at a zero vector and where two rows tie for the largest sum).

    Deliberate differences: each block's matrix is divided by its largest row sum before the product, a positive
    number per image and block, so the map is the authors' times one positive factor per image, and the product's
    rows sum to at most 1 (the raw product of ``L`` blocks of norms, each row summing to about ``N`` times a token's
    length, overflows float32 in deep models); the final norm after the last block (timm's ``norm``,
    torchvision's ``encoder.ln``), outside the blocks, is left out; the map reads the class token's row, as the
    library's other attention methods (the authors plot every layer's class row).
    """

    defaults = {"rollout": True}
    label = "GlobEnc"

    def _contributions(self, terms: BlockTerms) -> Tensor:
        return vector_norms(terms, residual=True)

    def _aggregate(self, shares: List[Tensor], rollout: bool) -> Tensor:
        if not rollout:
            return shares[-1]
        return rollout_product([largest_row_sum_one(block) for block in shares])


def largest_row_sum_one(matrices: Tensor) -> Tensor:
    """(B, N, N) non-negative matrices each divided by its largest row sum (a matrix of zeros is left as it is)."""
    largest = matrices.sum(dim=-1).amax(dim=-1)[:, None, None]
    return matrices / torch.where(largest > 0, largest, torch.ones_like(largest))
