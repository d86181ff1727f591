"""The parts of timm's and torchvision's ViT blocks that the tests' written-out algorithms run by hand."""
from __future__ import annotations

from types import SimpleNamespace
from typing import List, Tuple

import torch
from torch import Tensor, nn


def hooked_attention(model: nn.Module, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """Reference capture on timm's unfused blocks: the model's output and the probabilities leaving each block's
    ``attn_drop``."""
    maps: List[Tensor] = []
    handles = [block.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o)) for block in model.blocks]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, maps


def first_block_inputs(model: nn.Module, first: nn.Module, x: Tensor) -> Tensor:
    inputs = []
    handle = first.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return inputs[0]


def timm_blocks(model: nn.Module) -> List[SimpleNamespace]:
    return [SimpleNamespace(norm1=b.norm1, norm2=b.norm2, qkv=(b.attn.qkv.weight, b.attn.qkv.bias),
                            proj=(b.attn.proj.weight, b.attn.proj.bias), fc1=(b.mlp.fc1.weight, b.mlp.fc1.bias),
                            fc2=(b.mlp.fc2.weight, b.mlp.fc2.bias), act=b.mlp.act, heads=b.attn.num_heads,
                            scale=b.attn.scale) for b in model.blocks]


def torchvision_blocks(model: nn.Module) -> List[SimpleNamespace]:
    blocks = []
    for b in model.encoder.layers:
        attn = b.self_attention
        blocks.append(SimpleNamespace(norm1=b.ln_1, norm2=b.ln_2, qkv=(attn.in_proj_weight, attn.in_proj_bias),
                                      proj=(attn.out_proj.weight, attn.out_proj.bias),
                                      fc1=(b.mlp[0].weight, b.mlp[0].bias), fc2=(b.mlp[3].weight, b.mlp[3].bias),
                                      act=b.mlp[1], heads=attn.num_heads, scale=(attn.head_dim) ** -0.5))
    return blocks
