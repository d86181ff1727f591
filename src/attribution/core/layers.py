"""Layer lookup: a dotted name, a module, or a list of them, resolved to modules of the user's model."""
from __future__ import annotations

import difflib
from typing import List, Sequence, Union

from torch import nn

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
