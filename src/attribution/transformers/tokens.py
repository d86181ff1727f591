"""Token sequences to spatial maps: how many prefix tokens a model has and the patch grid its input makes.

Read from the model, never assumed: timm models say ``num_prefix_tokens`` (class, distillation and register
tokens) and their patch embedding's ``patch_size``; torchvision's ``VisionTransformer`` has one class token and
``patch_size``; any other model's patch size is taken from its first convolution whose stride equals its kernel.
The grid is ``(H // patch, W // patch)`` for the actual input, so non-square inputs work.  A token count that does
not fit raises an error naming the layer and the shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor, nn


@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` leading non-patch tokens, then ``height * width`` patch tokens in row-major order."""

    prefix: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.height * self.width


def patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The model's patch size, from timm's or torchvision's attributes or its patch-embedding convolution."""
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None) or getattr(model, "patch_size", None)
    if size is not None:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.stride == module.kernel_size and module.kernel_size[0] > 1:
            return int(module.kernel_size[0]), int(module.kernel_size[1])
    return None


def prefix_tokens(model: nn.Module) -> Optional[int]:
    """Class/distillation/register tokens before the patches, as the model declares them (None if it does not)."""
    count = getattr(model, "num_prefix_tokens", None)
    if count is not None:
        return int(count)
    if hasattr(model, "class_token") and hasattr(model, "conv_proj"):  # torchvision VisionTransformer
        return 1
    return None


def token_layout(model: nn.Module, image_hw: Tuple[int, int], tokens: int, where: str = "the model") -> TokenLayout:
    """The layout of a sequence of ``tokens`` tokens that ``model`` makes from an image of size ``image_hw``."""
    size = patch_size(model)
    declared = prefix_tokens(model)
    if size is not None:
        grid = (image_hw[0] // size[0], image_hw[1] // size[1])
        prefix = tokens - grid[0] * grid[1]
        if prefix >= 0 and (declared is None or prefix == declared):
            return TokenLayout(prefix, *grid)
    raise ValueError(
        f"cannot lay out the {tokens} tokens of {where} on a patch grid: patch size {size}, input "
        f"{tuple(image_hw)}, {declared if declared is not None else 'unknown'} prefix tokens; pass a "
        "reshape_transform"
    )


def tokens_to_map(tokens: Tensor, layout: TokenLayout) -> Tensor:
    """(B, N, C) token features to (B, C, h, w) patch maps, dropping the prefix tokens."""
    if tokens.dim() != 3 or tokens.shape[1] != layout.tokens:
        raise ValueError(f"expected tokens of shape (B, {layout.tokens}, C), got {tuple(tokens.shape)}")
    patches = tokens[:, layout.prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], layout.height, layout.width)
