"""Layer capture: forward hooks that keep a layer's output, scoped to a ``with`` block.

::

    with LayerCapture([layer]) as capture:
        outputs = model(x)
    (activation,) = capture.activations()                  # (B, C, h, w), through reshape_transform if given
    (gradient,) = capture.gradients(score.sum())           # d score / d activation, same shape

Gradients come from ``torch.autograd.grad(score, captured_output)``: no backward hooks (they break on in-place
operations, pytorch#61519), no parameter gradients, and autograd runs only the part of the backward between the
score and the layer.  The hook returns a copy of the layer's output to the rest of the network, so an in-place
operation after the layer (``F.relu(features, inplace=True)`` in torchvision's DenseNet, ``out += identity`` in a
ResNet block) cannot change what was captured.  A module called several times in one forward is captured at its
last call.

With ``record_from_layer=True`` (the caller runs the forward under ``torch.no_grad()``), the first captured layer
to run turns gradient recording on and hands the rest of the network a leaf copy of its output: nothing below the
layer is recorded for backward (less memory, a cheaper forward).  Maps are then differentiable w.r.t. the layer's
output but not w.r.t. parameters below it, so callers use it only when ``create_graph`` is off.  Hooks are removed
on exit, also when the body raises.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .layers import layer_name

ReshapeTransform = Optional[Callable[[Tensor], Tensor]]


class LayerCapture:
    """Context manager capturing the outputs of ``layers`` during the forwards run inside it."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform = None,
        record_from_layer: bool = False,
        model: Optional[nn.Module] = None,
    ) -> None:
        self.layers = list(layers)
        self.reshape_transform = reshape_transform
        self.record_from_layer = record_from_layer
        self.model = model
        self.outputs: List[Optional[Tensor]] = [None] * len(self.layers)
        self.calls: List[int] = [0] * len(self.layers)
        self._handles: List[Any] = []
        self._recording = False

    def __enter__(self) -> "LayerCapture":
        try:
            for index, layer in enumerate(self.layers):
                self._handles.append(layer.register_forward_hook(self._hook(index)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int) -> Callable[..., Tensor]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                where = layer_name(self.model, module) if self.model is not None else type(module).__name__
                raise TypeError(
                    f"the layer {where!r} returns {type(output).__name__}, not a tensor; pick a layer whose "
                    "output is a tensor (e.g. a submodule of it)"
                )
            if self.record_from_layer and not self._recording:
                torch.set_grad_enabled(True)  # undone when the caller's no_grad block exits
                self._recording = True
                output = output.detach().requires_grad_(output.is_floating_point())
            self.outputs[index] = output
            self.calls[index] += 1
            return output.clone()

        return hook

    def _check_ran(self) -> None:
        for layer, output in zip(self.layers, self.outputs):
            if output is None:
                where = layer_name(self.model, layer) if self.model is not None else type(layer).__name__
                raise RuntimeError(f"the layer {where!r} did not run in the model's forward pass")

    def _reshape(self, tensor: Tensor) -> Tensor:
        return tensor if self.reshape_transform is None else self.reshape_transform(tensor)

    def activations(self) -> List[Tensor]:
        """The captured outputs, through ``reshape_transform``."""
        self._check_ran()
        return [self._reshape(output) for output in self.outputs]  # type: ignore[arg-type]

    def gradients(self, score: Tensor, create_graph: bool = False, extra: Sequence[Tensor] = ()) -> List[Tensor]:
        """``d score / d output`` for each captured layer (reshaped like the activations), then for ``extra``."""
        self._check_ran()
        inputs = list(self.outputs) + list(extra)
        grads = torch.autograd.grad(score, inputs, create_graph=create_graph, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        count = len(self.outputs)
        return [self._reshape(g) for g in grads[:count]] + grads[count:]
