"""Attention flow against the authors' procedure (networkx maximum flows on their attention graph), closed forms of
one- and two-block graphs, and the minimum cut's gradient."""
from __future__ import annotations

from typing import List, Sequence

import pytest
import torch

import attribution
from attribution.transformers.attention import AttentionCapture
from attribution.transformers.attention_flow import max_flows
from attribution.transformers.base import scores_to_image
from attribution.transformers.tokens import token_layout
from conftest import check_parameter_derivative, tiny_vit

nx = pytest.importorskip("networkx")
pytest.importorskip("scipy")
timm = pytest.importorskip("timm")


def vit(depth: int, class_token: bool = True, registers: int = 0) -> torch.nn.Module:
    pooled = {} if class_token else {"class_token": False, "global_pool": "avg"}
    return tiny_vit(seed=3, depth=depth, reg_tokens=registers, **pooled)


def authors_flows(attention: List[torch.Tensor], outputs: Sequence[int]) -> torch.Tensor:
    """One image's flows as the authors' ``attention_graph_util``: heads averaged, the identity added and rows
    renormalised, the layered graph with those capacities, networkx's Edmonds-Karp maximum flow from each output
    node (after the last block) to each input node, each output's flows divided by their sum."""
    mean = torch.stack([a.mean(dim=0) for a in attention]).double()  # (L, N, N)
    blocks, tokens = mean.shape[0], mean.shape[-1]
    augmented = mean + torch.eye(tokens, dtype=torch.float64)
    augmented = augmented / augmented.sum(dim=-1, keepdim=True)
    graph = nx.DiGraph()
    for layer in range(1, blocks + 1):
        for above in range(tokens):
            for below in range(tokens):
                graph.add_edge(layer * tokens + above, (layer - 1) * tokens + below,
                               capacity=float(augmented[layer - 1, above, below]))
    rows = []
    for output in outputs:
        flows = torch.tensor([nx.maximum_flow_value(graph, blocks * tokens + output, inp,
                                                    flow_func=nx.algorithms.flow.edmonds_karp)
                              for inp in range(tokens)], dtype=torch.float64)
        rows.append(flows / flows.sum())
    return torch.stack(rows)


def captured(model: torch.nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    with torch.no_grad(), AttentionCapture(model) as capture:
        model(x)
    return capture.maps


@pytest.mark.parametrize("depth, registers", [(2, 0), (3, 0), (2, 2)])
def test_equals_the_authors_networkx_flows(depth, registers):
    model = vit(depth, registers=registers)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(depth))
    maps = captured(model, x)
    layout = token_layout(model, (16, 16), maps[0].shape[-1], "the attention maps")
    expected = torch.stack([authors_flows([m[b] for m in maps], [0])[0] for b in range(2)])
    expected = scores_to_image(expected.float(), layout, (16, 16))
    ours = attribution.AttentionFlow(model)(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("registers", [0, 3])
def test_without_a_class_token_every_patch_tokens_flows_are_averaged(registers):
    """A model that pools its patch tokens: the mean of the patch tokens' flows (register tokens are not read)."""
    model = vit(2, class_token=False, registers=registers)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    maps = captured(model, x)
    layout = token_layout(model, (16, 16), maps[0].shape[-1], "the attention maps")
    assert (layout.prefix, layout.class_token) == (registers, False)
    tokens = maps[0].shape[-1]
    expected = authors_flows([m[0] for m in maps], range(registers, tokens)).mean(dim=0, keepdim=True)
    expected = scores_to_image(expected.float(), layout, (16, 16))
    torch.testing.assert_close(attribution.AttentionFlow(model)(x), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_one_block_equals_rollout(fusion):
    """With one block every path is one edge: the flow to token j is A'[cls, j], rollout's row."""
    model = vit(1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    flow = attribution.AttentionFlow(model, head_fusion=fusion)(x)
    rollout = attribution.AttentionRollout(model, head_fusion=fusion)(x)
    torch.testing.assert_close(flow, rollout, rtol=1e-6, atol=1e-8)


def test_two_blocks_closed_form_and_its_minimum_cut_gradient():
    """Two blocks: the paths s -> k -> t share no edge, so the flow is sum_k min(C2[s, k], C1[k, t]), and its
    derivative is 1 on each path's narrower edge."""
    tokens = 6
    generator = torch.Generator().manual_seed(1)
    capacities = torch.softmax(3 * torch.randn(2, tokens, tokens, generator=generator, dtype=torch.float64), -1)
    capacities.requires_grad_(True)
    flows = max_flows(capacities, [0, 4])
    lower, upper = capacities[0], capacities[1]
    for row, source in enumerate([0, 4]):
        expected = torch.minimum(upper[source].unsqueeze(1), lower).sum(dim=0)  # (t,)
        torch.testing.assert_close(flows[row], expected, rtol=0, atol=1e-7)
    sink = 2
    (gradient,) = torch.autograd.grad(flows[1, sink], capacities)
    narrower_upper = upper[4] < lower[:, sink]
    expected_gradient = torch.zeros_like(capacities)
    expected_gradient[1, 4] = narrower_upper.double()
    expected_gradient[0, :, sink] = (~narrower_upper).double()
    torch.testing.assert_close(gradient, expected_gradient)


def test_flow_lies_between_the_widest_path_and_the_source_capacity():
    """Each flow is at most the source's outgoing capacity (1) and at least the widest single path's narrowest
    edge."""
    tokens, blocks = 5, 3
    capacities = torch.softmax(torch.randn(blocks, tokens, tokens, generator=torch.Generator().manual_seed(2),
                                           dtype=torch.float64), -1)
    flows = max_flows(capacities, [0])[0]
    assert (flows <= 1 + 1e-9).all()
    widest = torch.zeros(tokens, dtype=torch.float64)  # the best single path's bottleneck, by brute force
    for k in range(tokens):
        for m in range(tokens):
            narrowest = torch.minimum(torch.minimum(capacities[2, 0, k], capacities[1, k, m]), capacities[0, m])
            widest = torch.maximum(widest, narrowest)
    assert (flows >= widest - 1e-9).all()


def test_class_agnostic_and_bad_fusion():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    method = attribution.AttentionFlow(model)
    torch.testing.assert_close(method(x, [0, 1]), method(x, [4, 3]))
    with pytest.raises(ValueError, match="head_fusion"):
        method(x, head_fusion="median")


def test_create_graph_differentiates_the_cut_values():
    """create_graph=True: the map's derivative w.r.t. the weights equals central differences (the minimum cuts do not
    change under the small step)."""
    model = vit(2).double()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    method = attribution.AttentionFlow(model)
    check_parameter_derivative(lambda create_graph: method(x, create_graph=create_graph), model,
                               ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"], rtol=1e-4, atol=1e-9)


def test_a_vit_pooling_its_patch_tokens_has_no_class_token_to_read():
    """timm's global_pool='avg' (BEiT's default) pools the patch tokens: the attention maps read their mean row,
    not the class token's (which the head never reads); 'token' pooling and torchvision's ViT read the class token."""
    import torchvision

    for options, reads_class_token in (({}, True), ({"global_pool": "avg"}, False)):
        model = tiny_vit(**options)
        assert token_layout(model, (16, 16), 17, "the attention maps").class_token is reads_class_token
    vit_tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                  hidden_dim=16, mlp_dim=16)
    assert token_layout(vit_tv, (32, 32), 17, "the attention maps").class_token
    model = tiny_vit(global_pool="avg")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = captured(model, x)
    layout = token_layout(model, (16, 16), 17, "the attention maps")
    expected = authors_flows([m[0] for m in maps], range(1, 17)).mean(dim=0, keepdim=True)
    torch.testing.assert_close(attribution.AttentionFlow(model)(x), scores_to_image(expected.float(), layout,
                                                                                     (16, 16)), rtol=1e-5, atol=1e-7)
