"""Layer outputs as spatial maps: one rule that lays out CNN feature maps, channels-last maps and token sequences.

CAMs need a layer's output as a (B, C, h, w) map.  CNN layers give that directly; Swin stages and blocks (timm
and torchvision) give channels-last (B, h, w, C) maps; ViT, DeiT, BEiT and EVA blocks give token sequences
(B, N, C) whose first tokens are class, distillation or register tokens.  :func:`spatial_layout` decides which
from the output's shape, the input image's size and what the model declares, and returns a
:class:`SpatialLayout` that turns the output (and, alike, its gradient) into (B, C, h, w):

- (B, N, C): tokens.  The prefix comes from the model (timm's ``num_prefix_tokens``, torchvision's class token)
  and the patch grid from timm's patch embedding (``dynamic_feat_size``: padded inputs, hybrid backbones) or its
  patch size and the *actual* input size (``(H // p, W // p)``, non-square inputs included); models that declare
  neither get the grid ``(H // s, W // s)`` of the one stride ``s`` whose grid holds all N tokens (hierarchical
  token models, token stages of hybrid nets).
- (B, a, b, c): ``(B, C, h, w)`` or ``(B, h, w, C)``, whichever puts a grid of the input's proportions at the
  spatial positions (``h = H / s`` and ``w = W / s`` for one stride ``s``, up to rounding).  When both do (the
  channel count equals a spatial size), the layer decides: convolutions and batch norms are channels-first,
  ``LayerNorm`` and ``Linear`` layers channels-last, and other layers follow the model (timm models with
  ``output_fmt == 'NHWC'`` such as Swin, torchvision's Swin): channels-last there, channels-first elsewhere.
  A 4-D output neither reading explains is taken as (B, C, h, w), as any CNN layer always was.
- anything else raises a ``ValueError`` naming the layer and the shape: a wrong guess cannot pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class TokenLayout:
    """``prefix`` leading non-patch tokens, then ``height * width`` patch tokens in row-major order;
    ``class_token``: the first prefix token is a class token (the head reads it), not a register token of a model
    that pools its patch tokens; ``readout``: how many leading prefix tokens the head reads and averages (2 for
    timm's distilled DeiT, whose prediction is the mean of its class and distillation tokens' heads);
    ``extent``: the (height, width) in pixels the patch grid covers when the model pads the image to whole patches
    (timm's ``dynamic_img_pad``, at the bottom and right), None when the grid spans the input."""

    prefix: int
    height: int
    width: int
    class_token: bool = False
    readout: int = 1
    extent: Optional[Tuple[int, int]] = None

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


def has_class_token(model: nn.Module) -> bool:
    """Whether the model's head reads its first prefix token as a class token: not for timm models built with
    ``class_token=False`` (``has_class_token`` False or ``cls_token`` None: their prefix, if any, is register
    tokens), nor for those whose ``global_pool`` is not ``'token'`` (``'avg'``, BEiT's default, and ``'map'``: the
    head pools the patch tokens).  torchvision's ViT reads its class token."""
    if getattr(model, "has_class_token", True) is False or (hasattr(model, "cls_token") and model.cls_token is None):
        return False
    pool = getattr(model, "global_pool", "token")
    return not isinstance(pool, str) or pool == "token"


def _stride_grids(image_hw: Tuple[int, int], positions: int) -> set:
    """Grids ``(H // s, W // s)`` or ``(ceil(H / s), ceil(W / s))`` of ``positions`` cells, for integer strides s."""
    height, width = image_hw
    grids = set()
    for stride in range(1, max(height, width) + 1):
        for grid in ((height // stride, width // stride), (-(-height // stride), -(-width // stride))):
            if grid[0] * grid[1] == positions:
                grids.add(grid)
    return grids


def readout_tokens(model: nn.Module) -> int:
    """How many leading prefix tokens a class-token model's head reads (and averages): 2 for timm's distilled DeiT
    (``dist_token`` and ``head_dist``: the eval-mode prediction is ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``),
    else 1."""
    return 2 if getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist") else 1


#: a patch grid (height, width) and the extent in pixels it covers (None: the input's size)
_Grid = Tuple[Tuple[int, int], Optional[Tuple[int, int]]]


def _embedding_grid(model: nn.Module, image_hw: Tuple[int, int]) -> Optional[_Grid]:
    """The patch grid timm's patch embedding reports for the input (``dynamic_feat_size``: padding to whole
    patches, hybrid embeddings' backbone strides) and, when it pads, the extent in pixels the grid covers."""
    embed = getattr(model, "patch_embed", None)
    feat_size = getattr(embed, "dynamic_feat_size", None)
    if not callable(feat_size):
        return None
    grid = tuple(int(g) for g in feat_size(tuple(image_hw)))
    extent = None
    if getattr(embed, "dynamic_img_pad", False) and getattr(embed, "patch_size", None) is not None:
        ratio = getattr(embed, "feature_ratio", (1, 1))
        ratio = (ratio, ratio) if isinstance(ratio, int) else ratio
        size = embed.patch_size if not isinstance(embed.patch_size, int) else (embed.patch_size,) * 2
        extent = tuple(max(g * int(p) * int(r), i) for g, p, r, i in zip(grid, size, ratio, image_hw))
        extent = None if extent == tuple(image_hw) else extent
    return grid, extent  # type: ignore[return-value]


def token_layout(model: nn.Module, image_hw: Tuple[int, int], tokens: int, where: str = "the model",
                 hint: str = "") -> TokenLayout:
    """The layout of a sequence of ``tokens`` tokens that ``model`` makes from an image of size ``image_hw``.

    The grid timm's patch embedding reports for the input comes first (``dynamic_feat_size``: images padded to
    whole patches, hybrid backbones), then the patch grid of the model's patch size, after the declared prefix
    tokens or with none (the patch embedding's output, before they are prepended); a model that declares no prefix
    tokens (or none) may also have its tokens on a coarser grid of the input's proportions (a later stage of a
    hierarchical model).  ``hint`` ends the error message (what the caller can do instead).
    """
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    size = patch_size(model)
    declared = prefix_tokens(model)
    candidates: List[_Grid] = []
    reported = _embedding_grid(model, image_hw)
    if reported is not None:
        candidates.append(reported)
    if size is not None:
        candidates.append(((image_hw[0] // size[0], image_hw[1] // size[1]), None))
    for grid, extent in candidates:
        prefix = tokens - grid[0] * grid[1]
        if prefix >= 0 and (declared is None or prefix in (0, declared)):  # 0: before the prefix is prepended
            class_token = prefix > 0 and has_class_token(model)
            readout = min(readout_tokens(model), prefix) if class_token else 1
            return TokenLayout(prefix, *grid, class_token=class_token, readout=readout, extent=extent)
    if not declared:
        grids = _stride_grids(image_hw, tokens)
        if len(grids) == 1:
            return TokenLayout(0, *grids.pop())
    raise ValueError(
        f"cannot lay out the {tokens} tokens of {where} on a patch grid: patch size {size}, input "
        f"{image_hw}, {declared if declared is not None else 'unknown'} prefix tokens" + (f"; {hint}" if hint else "")
    )


def tokens_to_map(tokens: Tensor, layout: TokenLayout) -> Tensor:
    """(B, N, C) token features to (B, C, h, w) patch maps, dropping the prefix tokens."""
    if tokens.dim() != 3 or tokens.shape[1] != layout.tokens:
        raise ValueError(f"expected tokens of shape (B, {layout.tokens}, C), got {tuple(tokens.shape)}")
    patches = tokens[:, layout.prefix:]
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], layout.height, layout.width)


# ---------------------------------------------------------------------------------------------- any output
@dataclass(frozen=True)
class SpatialLayout:
    """How a layer output becomes (B, C, h, w): ``kind`` is ``'nchw'`` (as it is), ``'nhwc'`` (permuted) or
    ``'tokens'`` (``prefix`` tokens dropped, the rest laid out row-major on the ``height x width`` grid)."""

    kind: str
    height: int
    width: int
    prefix: int = 0

    def __call__(self, output: Tensor) -> Tensor:
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        return tokens_to_map(output, TokenLayout(self.prefix, self.height, self.width))


def _fits(image_hw: Tuple[int, int], height: int, width: int) -> bool:
    """Whether an ``height x width`` grid is the input downsampled by one integer stride (floor or ceil)."""
    if height < 1 or width < 1 or height > image_hw[0] or width > image_hw[1]:
        return False
    for stride in {max(1, round(image_hw[0] / height)), max(1, round(image_hw[1] / width))}:
        for extent, size in ((height, image_hw[0]), (width, image_hw[1])):
            if extent not in (size // stride, -(-size // stride)):
                break
        else:
            return True
    return False


def _channels_last(model: nn.Module, layer: Optional[nn.Module], channels: int) -> bool:
    """Tie-break when a (B, a, b, c) output reads both ways: the layer's own type, else the model's format."""
    if isinstance(layer, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return False
    if isinstance(layer, nn.LayerNorm) and tuple(layer.normalized_shape) == (channels,):
        return True
    if isinstance(layer, nn.Linear) and layer.out_features == channels:
        return True
    if str(getattr(model, "output_fmt", "")).upper() == "NHWC":  # timm's Swin and other channels-last models
        return True
    return type(model).__name__ == "SwinTransformer" and type(model).__module__.startswith("torchvision.")


def spatial_layout(model: nn.Module, image_hw: Sequence[int], shape: Sequence[int], where: str = "the layer",
                   layer: Optional[nn.Module] = None) -> SpatialLayout:
    """How the output of shape ``shape`` of ``layer`` (named ``where``) becomes (B, C, h, w); see the module
    docstring for the rule.  Raises ``ValueError`` naming the layer and the shape when no reading fits."""
    image_hw = (int(image_hw[0]), int(image_hw[1]))
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        first, last = _fits(image_hw, shape[2], shape[3]), _fits(image_hw, shape[1], shape[2])
        if last and (not first or _channels_last(model, layer, shape[3])):
            return SpatialLayout("nhwc", shape[1], shape[2])
        return SpatialLayout("nchw", shape[2], shape[3])
    if len(shape) == 3:
        tokens = token_layout(model, image_hw, shape[1], f"layer {where!r} (output shape {shape})",
                              hint="pass a reshape_transform")
        return SpatialLayout("tokens", tokens.height, tokens.width, tokens.prefix)
    raise ValueError(
        f"the output of layer {where!r} has shape {shape}; CAMs need (B, C, h, w) feature maps, (B, h, w, C) "
        "channels-last maps or (B, N, C) token sequences: pick another layer or pass a reshape_transform that "
        "brings it to (B, C, h, w)"
    )
