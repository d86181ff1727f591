"""Attention flow: the maximum flow from an output token to each input token through the graph of the blocks'
attention."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..core.registry import register
from .base import AttentionExplainer, check_head_fusion, fuse_heads
from .rollout import with_residual
from .tokens import TokenLayout

#: capacities are solved as integers ``round(capacity * FLOW_SCALE)`` (scipy's solver needs integers): 2^28 keeps
#: every node's outgoing total (about 1 x the scale) and the flows below int32's limit, and each edge within 2e-9
FLOW_SCALE = 2 ** 28


def max_flows(capacities: Tensor, sources: Sequence[int]) -> Tensor:
    """(len(sources), N) maximum flows through a layered graph, differentiable w.r.t. ``capacities``.

    ``capacities`` (L, N, N): block ``l`` (first to last) joins token ``i`` above it to token ``j`` below it with
    capacity ``capacities[l, i, j]``.  Row ``s`` of the result holds, for each input token ``j``, the maximum flow
    from token ``sources[s]`` after the last block to token ``j`` before the first.

    Each flow is solved by Dinic's algorithm (scipy) on integer capacities; its value is then read as the sum of the
    float capacities across the minimum cut the solver found (the edges from the nodes still reachable from the
    source in the residual graph to the rest), so it is a sum of ``capacities``' entries: exact up to the integer
    rounding's effect on which cut is minimal (at most half a unit of ``1 / FLOW_SCALE`` per cut edge), and its
    gradient is 1 on the cut's edges and 0 elsewhere (the flow's derivative wherever the minimum cut is unique).
    """
    try:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import breadth_first_order, maximum_flow
    except ImportError as error:  # pragma: no cover - scipy is a test dependency
        raise ImportError("attention flow solves maximum flows with scipy: pip install scipy") from error
    blocks, tokens = capacities.shape[0], capacities.shape[-1]
    host = capacities.detach().to("cpu", torch.float64).numpy()
    layer, above, below = np.nonzero(host > 0)
    uppers = (layer + 1) * tokens + above  # node (l, i): token i after l blocks
    lowers = layer * tokens + below
    units = np.rint(host[layer, above, below] * FLOW_SCALE).astype(np.int32)
    nodes = (blocks + 1) * tokens
    kept = units > 0
    graph = csr_array((units[kept], (uppers[kept], lowers[kept])), shape=(nodes, nodes))
    edges = torch.from_numpy((layer * tokens + above) * tokens + below).to(capacities.device)
    rows, cut_edges = [], []
    for row, source in enumerate(sources):
        start = blocks * tokens + source
        for sink in range(tokens):
            flow = maximum_flow(graph, start, sink, method="dinic").flow
            residual = (graph - flow).tocsr()
            residual.data[residual.data < 0] = 0
            residual.eliminate_zeros()
            reached = np.zeros(nodes, dtype=bool)
            reached[breadth_first_order(residual, start, directed=True, return_predecessors=False)] = True
            cut = np.flatnonzero(reached[uppers] & ~reached[lowers])
            cut_edges.append(cut)
            rows.append(np.full(cut.shape[0], row * tokens + sink))
    flat = capacities.flatten()[edges[torch.from_numpy(np.concatenate(cut_edges)).to(capacities.device)]]
    owner = torch.from_numpy(np.concatenate(rows)).to(capacities.device)
    return flat.new_zeros(len(sources) * tokens).index_add(0, owner, flat).view(len(sources), tokens)


@register("attention_flow")
class AttentionFlow(AttentionExplainer):
    """Attention flow: the maximum flow from the class token to each input token through the attention graph.

    Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020, arXiv:2005.00928; the authors' code is
    github.com/samiraabnar/attention_flow (``attention_graph_util.py``).

    The graph has a node per token before the first block and after each block; block ``l`` joins token ``i`` after
    it to token ``j`` before it with capacity ``A'_l[i, j]``, ``A'_l = (A_l + I) / 2`` renormalised (the attention
    with the residual's identity, as rollout, ``A_l = fuse_heads(attn_l)``, the mean over heads by default as the
    authors).  The relevance of input token ``j`` is the maximum flow from the class token after the last block to
    token ``j`` before the first, divided by the sum of those flows over ``j`` (the authors' normalisation); the map
    is its patch tokens, upsampled bilinearly.  Where rollout multiplies the blocks' matrices (a sum over paths of
    the products of their weights), flow lets each path carry up to its narrowest edge, all paths sharing the
    capacities: with one block the two are equal.  Models without a class token (their head pools the patch
    tokens; register tokens are not read): the mean of every patch token's flows.  Class-agnostic: the target is accepted and ignored.

    Cost: one forward per image, then ``N`` maximum-flow problems per image on the host (N tokens, each a graph of
    ``(L + 1) N`` nodes and ``L N^2`` edges solved by scipy's Dinic algorithm: about 15 ms on ViT-B/16's 197 tokens
    and 12 blocks, 3 s an image on one CPU core), ``N^2`` without a class token.  The value of each flow is read
    from its minimum cut as a sum of the attention's entries, so ``create_graph=True`` differentiates it (the flow's
    derivative: 1 on the cut's edges).  Needs scipy.
    """

    needs_layout = True
    defaults = {"head_fusion": "mean"}

    def _check_options(self, *, head_fusion: str) -> None:
        check_head_fusion(head_fusion)

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], *, head_fusion: str,
                   layout: TokenLayout) -> Tensor:
        capacities = torch.stack([with_residual(fuse_heads(block, head_fusion)) for block in attention], dim=1)
        tokens = capacities.shape[-1]
        # the rows that the map reads: the class token's (and a distilled DeiT's distillation token's), or the patches'
        sources = list(range(layout.readout)) if layout.class_token else list(range(layout.prefix, tokens))
        relevance = capacities.new_zeros(capacities.shape[0], tokens, tokens)
        for image, blocks in enumerate(capacities):
            flows = max_flows(blocks, sources)
            relevance[image, sources] = flows / flows.sum(dim=-1, keepdim=True)
        return relevance
