"""Layer lookup: a dotted name, a module, or a list of them, resolved to modules of the user's model."""
from __future__ import annotations

import difflib
from typing import List, Sequence, Union

import torch
from torch import Tensor, nn

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


def _is_feature_layer(module: nn.Module) -> bool:
    if isinstance(module, _NOT_FEATURE_LAYERS):
        return False
    kind = type(module).__name__
    return "Pool" not in kind and "Dropout" not in kind  # e.g. timm's SelectAdaptivePool2d


def default_layer(model: nn.Module, x: Tensor) -> str:
    """The dotted name of the default CAM layer for ``model`` on inputs shaped like ``x``.

    The rule, for any model: run one image through the model and take the module that *finished last* among those
    whose output is a spatial feature map, a (1, C, h, w) tensor with ``h * w > 1``, leaving out pooling, dropout,
    identity and flatten modules.  Modules finish after their children, so this is the outermost block holding the
    last spatial features: ``layer4`` for torchvision and timm ResNets, ``features`` for torchvision VGG,
    DenseNet, ConvNeXt, EfficientNet and MobileNet, ``trunk_output`` for torchvision RegNet, ``bn2`` (the head's
    BatchNormAct) for timm EfficientNet.  A module called several times counts at its last call (captures keep
    the last call too): efficientnet_lite_pytorch's EfficientNet gets its shared ``_swish`` activation, whose
    last call is the head's ReLU6.  When the input is so small that the last stage is 1x1, the rule falls back to
    the last stage that still has a spatial extent.
    """
    names = {module: name for name, module in model.named_modules() if name}
    finished: List[str] = []

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            finished.append(names[module])

    handles = [module.register_forward_hook(hook) for module in names]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    candidates = [n for n in finished if _is_feature_layer(modules[n])]
    if not candidates:
        raise ValueError(
            "found no module whose output is a spatial feature map (B, C, h, w) with h * w > 1; pass target_layer "
            "(and a reshape_transform if the layer's output is not (B, C, h, w), e.g. transformer tokens)"
        )
    return candidates[-1]
