"""Token sequences to spatial maps: how many prefix tokens a model has and the patch grid its input makes.

Read from the model, never assumed: timm models say ``num_prefix_tokens`` (class, distillation and register
tokens) and their patch embedding's ``patch_size``; torchvision's ``VisionTransformer`` has one class token and
``patch_size``; any other model's patch size is taken from its first convolution whose stride equals its kernel.
The grid is ``(H // patch, W // patch)`` for the actual input, so non-square inputs work.  A token count that does
not fit raises an error naming the layer and the shape.  The rules live in :mod:`attribution.core.spatial`, next to
the one that lays out any layer's output for the CAMs.
"""
from ..core.spatial import TokenLayout, patch_size, prefix_tokens, token_layout, tokens_to_map

__all__ = ["TokenLayout", "patch_size", "prefix_tokens", "token_layout", "tokens_to_map"]
