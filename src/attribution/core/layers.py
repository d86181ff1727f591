"""Layer lookup: a dotted name, a module, or a list of them, resolved to modules of the user's model."""
from __future__ import annotations

import difflib
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .spatial import SpatialLayout, spatial_layout

LayerSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> nn.Module:
    """Return the module ``layer`` names in ``model``; a wrong name raises with the closest existing names."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"the layer {type(layer).__name__} given as a module is not part of the model")
        return layer
    if not isinstance(layer, str):
        raise TypeError(f"a layer must be a dotted name or an nn.Module, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    names = [n for n in modules if n]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if layer.split(".")[-1] in n][:5] or names[:5]
    raise ValueError(f"the model has no layer named {layer!r}; closest names: {', '.join(close)}")


def resolve_layers(model: nn.Module, layers: LayerSpec) -> List[nn.Module]:
    """Resolve one layer or a list of layers to a list of modules."""
    if isinstance(layers, (str, nn.Module)):
        return [resolve_layer(model, layers)]
    if not isinstance(layers, (list, tuple)):
        raise TypeError("target_layer must be a dotted name, a module or a list of them, got "
                        f"{type(layers).__name__}")
    resolved = [resolve_layer(model, layer) for layer in layers]
    if not resolved:
        raise ValueError("an empty list of layers was given")
    return resolved


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model`` (for messages)."""
    for name, module in model.named_modules():
        if module is layer:
            return name or "<model>"
    return type(layer).__name__


# ------------------------------------------------------------------------------------------ the default layer
#: module types that never make a good CAM layer even when their output is a spatial map
_NOT_FEATURE_LAYERS = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Flatten,
)


def is_feature_layer(module: nn.Module) -> bool:
    if isinstance(module, _NOT_FEATURE_LAYERS):
        return False
    kind = type(module).__name__
    return "Pool" not in kind and "Dropout" not in kind  # e.g. timm's SelectAdaptivePool2d


def default_layer(model: nn.Module, x: Tensor) -> str:
    """The dotted name of the default CAM layer for ``model`` on inputs shaped like ``x``.

    The rule, for any model: run one image through the model and take the module that *finished last* among those
    whose output is a spatial feature map with more than one position, leaving out pooling, dropout, identity and
    flatten modules.  Spatial feature maps are (B, C, h, w) maps, channels-last (B, h, w, C) maps and token
    sequences (B, N, C) that :func:`attribution.core.spatial.spatial_layout` can lay out on the input's grid.
    Modules finish after their children, so this is the outermost block holding the last spatial features:
    ``layer4`` for torchvision and timm ResNets, ``features`` for torchvision VGG, DenseNet, ConvNeXt, EfficientNet
    and MobileNet, ``trunk_output`` for torchvision RegNet, ``bn2`` (the head's BatchNormAct) for timm EfficientNet,
    the final ``norm`` for timm's Swin and ``permute`` (the final norm's output, channels first) for torchvision's.
    A module called several times counts at its last call (captures keep the last call too):
    efficientnet_lite_pytorch's EfficientNet gets its shared ``_swish`` activation, whose last call is the head's
    ReLU6.  When the input is so small that the last stage is 1x1, the rule falls back to the last stage that
    still has a spatial extent.

    Vision transformers that classify from their class token (timm ViT and DeiT with ``global_pool='token'``,
    register-token models, torchvision's ``VisionTransformer``) are detected by one backward from that last layer:
    its patch tokens do not reach the output (only the class token does; asked of the head's input when the head is
    all zeros, as torchvision builds it), so no CAM can be read there.  They get
    :func:`class_token_layer` instead (see docs/transformers.md for the evidence behind it).  Transformers that
    pool their patch tokens (BEiT, EVA, ``global_pool='avg'``) keep the general rule, like CNNs.
    """
    names = {module: name for name, module in model.named_modules() if name}
    finished: List[Tuple[str, Tuple[int, ...]]] = []

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() in (3, 4):
            finished.append((names[module], tuple(output.shape)))

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    candidates: List[Tuple[str, SpatialLayout]] = []
    for name, shape in finished:
        if not is_feature_layer(modules[name]):
            continue
        try:
            layout = spatial_layout(model, x.shape[-2:], shape, name, modules[name])
        except ValueError:
            continue
        if layout.height * layout.width > 1:
            candidates.append((name, layout))
    if not candidates:
        raise ValueError(
            "found no module whose output is a spatial feature map (B, C, h, w) with h * w > 1; pass target_layer "
            "(and a reshape_transform if the layer's output is not (B, C, h, w), e.g. transformer tokens)"
        )
    name, layout = candidates[-1]
    if layout.kind == "tokens" and layout.prefix > 0 and not _patches_reach_output(model, modules[name], x, layout):
        return class_token_layer(model, [n for n, lay in candidates if lay.kind == "tokens"]) or name
    return name


def _patches_reach_output(model: nn.Module, layer: nn.Module, x: Tensor, layout: SpatialLayout) -> bool:
    """Whether the outputs depend on the patch tokens of ``layer``'s output (one forward and backward, 1 image).

    A head that is all zeros (an untrained model initialised that way) makes every gradient of the outputs zero;
    then the question is asked of the head's input instead: the input of the last module to finish with an output
    shaped like the model's and an input shaped otherwise (the classifier, fed the pooled features)."""
    captured: List[Tensor] = []
    head_inputs: List[Tuple[Tensor, torch.Size]] = []  # (input, output shape) of modules that change the shape
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))

    def head_hook(module: nn.Module, inputs: Tuple[object, ...], output: object) -> None:
        if inputs and isinstance(inputs[0], Tensor) and isinstance(output, Tensor) and inputs[0].shape != output.shape:
            head_inputs.append((inputs[0], output.shape))

    heads = [module.register_forward_hook(head_hook) for module in model.modules() if module is not model]
    try:
        with torch.enable_grad():
            outputs = model(x[:1].detach().clone().requires_grad_(x.is_floating_point()))
            tokens = captured[-1]
            if not tokens.requires_grad:
                return False
            (grad,) = torch.autograd.grad(outputs.float().pow(2).sum(), tokens, allow_unused=True, retain_graph=True)
            if grad is None or not bool(grad.abs().sum() > 0):
                features = [f for f, shape in head_inputs if shape == outputs.shape]
                if features and features[-1].requires_grad:
                    (grad,) = torch.autograd.grad(features[-1].float().pow(2).sum(), tokens, allow_unused=True)
    finally:
        handle.remove()
        for head in heads:
            head.remove()
    return grad is not None and bool(grad[:, layout.prefix:].abs().sum() > 0)


def class_token_layer(model: nn.Module, token_layers: Sequence[str]) -> Optional[str]:
    """The default CAM layer of a vision transformer that classifies from its class token: the input of the
    attention of the middle block (``norm1`` of block ``depth // 2`` in timm, ``ln_1`` in torchvision), i.e. the
    first module with a token output inside that block.  ``token_layers``: modules with token outputs, in the
    order they finished.  The blocks are the largest group of same-typed children of a ``Sequential`` or
    ``ModuleList`` whose outputs are tokens (among equal groups, the one holding most token layers).  None when
    there is no such group of at least two."""
    modules = dict(model.named_modules())
    stacks: dict = {}
    for name in token_layers:
        parent, _, _ = name.rpartition(".")
        if not isinstance(modules.get(parent, model), (nn.Sequential, nn.ModuleList)):
            continue
        siblings = stacks.setdefault((parent, type(modules[name])), [])
        if name not in siblings:
            siblings.append(name)

    def size(stack: List[str]) -> Tuple[int, int]:  # most blocks; among equals, those holding most token layers
        return len(stack), sum(n.startswith(block + ".") for block in stack for n in token_layers)

    blocks = max(stacks.values(), key=size, default=[])
    if len(blocks) < 2:
        return None
    middle = blocks[len(blocks) // 2]
    inside = [n for n in token_layers if n.startswith(middle + ".")]
    return inside[0] if inside else middle
