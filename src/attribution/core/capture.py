"""Layer capture: forward hooks that keep a layer's output, scoped to a ``with`` block.

::

    with LayerCapture([layer]) as capture:
        outputs = model(x)
    (activation,) = capture.activations()                  # (B, C, h, w), through reshape_transform if given
    (gradient,) = capture.gradients(score.sum())           # d score / d activation, same shape

Layer outputs reach the caller as (B, C, h, w) maps: through ``reshape_transform`` when one is given, otherwise,
when the capture knows the input's ``image_size``, through the layout that
:func:`attribution.core.spatial.spatial_layout` reads from the output's shape (token sequences of vision
transformers, channels-last Swin maps, CNN maps as they are).  Gradients go through the same transform as their
activations.  Without either, outputs stay as they are.

Gradients come from ``torch.autograd.grad(score, captured_output)``: no backward hooks (they break on in-place
operations, pytorch#61519), no parameter gradients, and autograd runs only the part of the backward between the
score and the layer.  The hook returns a copy of the layer's output to the rest of the network, so an in-place
operation after the layer (``F.relu(features, inplace=True)`` in torchvision's DenseNet, ``out += identity`` in a
ResNet block) cannot change what was captured.  A module called several times in one forward is captured at its
last call.

With ``keep_values=False`` only gradients are asked for: the hook records the output's place in the autograd graph
(``torch.autograd.graph.get_gradient_edge``) and hands the output on uncopied, so an in-place operation after the
layer cannot change which gradient is taken, and no copy is made (FullGrad captures every batch norm this way).
Such a capture keeps every call's place: :meth:`LayerCapture.call_gradients` gives one gradient per call of a
module that runs more than once.

With ``record_from_layer=True`` (the caller runs the forward under ``torch.no_grad()``), the first captured layer
to run turns gradient recording on and hands the rest of the network a leaf copy of its output: nothing below the
layer is recorded for backward (less memory, a cheaper forward).  Maps are then differentiable w.r.t. the layer's
output but not w.r.t. parameters below it, so callers use it only when ``create_graph`` is off.  A captured output
that needs no gradient although recording is on (its inputs were computed before recording started, in a branch
beside the first layer, or every parameter below it is frozen) is made a leaf in the same way, so its gradient is
there to take.  Hooks are removed on exit, also when the body raises.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .layers import layer_name
from .spatial import spatial_layout

ReshapeTransform = Optional[Callable[[Tensor], Tensor]]


class LayerCapture:
    """Context manager capturing the outputs of ``layers`` during the forwards run inside it."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform = None,
        record_from_layer: bool = False,
        model: Optional[nn.Module] = None,
        image_size: Optional[Sequence[int]] = None,
        keep_values: bool = True,
    ) -> None:
        self.layers = list(layers)
        self.reshape_transform = reshape_transform
        self.image_size = None if image_size is None else tuple(int(s) for s in image_size)
        if reshape_transform is None and image_size is not None and model is None:
            raise ValueError("laying out layer outputs from the image size needs the model")
        self.record_from_layer = record_from_layer
        self.model = model
        # without gradient edges (older torch) the outputs are copied, as when values are kept
        self.keep_values = keep_values or not hasattr(torch.autograd.graph, "get_gradient_edge")
        self._every_call = not keep_values  # gradients only: every call's place is kept (call_gradients)
        self.outputs: List[Optional[Tensor]] = [None] * len(self.layers)
        self.edges: List[Any] = [None] * len(self.layers)
        #: keep_values=False: every call's (gradient edge, or the output itself on older torch, or None when it needs
        #: no gradient; shape, dtype, device), in call order
        self.call_edges: List[List[Tuple[Any, torch.Size, torch.dtype, torch.device]]] = [[] for _ in self.layers]
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
            leaf = False
            if self.record_from_layer and not self._recording:
                torch.set_grad_enabled(True)  # undone when the caller's no_grad block exits
                self._recording = True
                output = output.detach().requires_grad_(output.is_floating_point())
                leaf = output.requires_grad
            elif torch.is_grad_enabled() and output.is_floating_point() and not output.requires_grad:
                # computed from nothing recorded (frozen parameters, a branch beside the first captured layer):
                # its gradient is still asked for, and as a leaf of the graph it has one
                output = output.detach().requires_grad_(True)
                leaf = True
            self.outputs[index] = output
            self.calls[index] += 1
            if self.keep_values:
                if self._every_call:
                    self.call_edges[index].append((output if output.requires_grad else None, output.shape,
                                                   output.dtype, output.device))
                return output.clone()
            edge = torch.autograd.graph.get_gradient_edge(output) if output.requires_grad else None
            self.edges[index] = edge
            self.call_edges[index].append((edge, output.shape, output.dtype, output.device))
            # a leaf that requires grad cannot take an in-place op (a ReLU(inplace=True) after the layer): hand on
            # a copy of it then; other outputs go on uncopied
            return output.clone() if leaf else output

        return hook

    def _check_ran(self) -> None:
        for layer, output in zip(self.layers, self.outputs):
            if output is None:
                where = layer_name(self.model, layer) if self.model is not None else type(layer).__name__
                raise RuntimeError(f"the layer {where!r} did not run in the model's forward pass")

    def transform(self, index: int) -> Callable[[Tensor], Tensor]:
        """What brings layer ``index``'s output (and its gradient) to (B, C, h, w): see :func:`layer_transform`."""
        output = self.outputs[index]
        if output is None:
            return self.reshape_transform or _identity
        return layer_transform(self.model, self.layers[index], output.shape, self.image_size, self.reshape_transform)

    def activations(self) -> List[Tensor]:
        """The captured outputs, through :meth:`transform`."""
        self._check_ran()
        if not self.keep_values:
            raise RuntimeError("this capture was made with keep_values=False: it holds gradients, not activations")
        return [self.transform(i)(output) for i, output in enumerate(self.outputs)]  # type: ignore[arg-type]

    def gradients(self, score: Tensor, create_graph: bool = False, extra: Sequence[Tensor] = ()) -> List[Tensor]:
        """``d score / d output`` for each captured layer (reshaped like the activations), then for ``extra``."""
        self._check_ran()
        # the outputs themselves, or their recorded graph positions (None for an output that needs no gradient)
        sources = self.outputs if self.keep_values else self.edges
        wanted = [i for i, source in enumerate(sources) if source is not None]
        found = torch.autograd.grad(score, [sources[i] for i in wanted] + list(extra), create_graph=create_graph,
                                    allow_unused=True)
        grads: List[Optional[Tensor]] = [None] * len(sources)
        for i, grad in zip(wanted, found):
            grads[i] = grad
        grads += found[len(wanted):]
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, list(self.outputs) + list(extra))]
        count = len(self.outputs)
        return [self.transform(i)(g) for i, g in enumerate(grads[:count])] + grads[count:]

    def call_gradients(self, score: Tensor, create_graph: bool = False, extra: Sequence[Tensor] = ()
                       ) -> Tuple[List[List[Tensor]], List[Tensor]]:
        """``d score / d output`` at *every* call of each captured layer (a module the forward runs more than once
        has one gradient per call, in call order), as the layer output them (no transform), and ``d score / d t``
        for each ``t`` of ``extra``.  Needs ``keep_values=False``."""
        self._check_ran()
        if not self._every_call:
            raise RuntimeError("call_gradients needs a capture made with keep_values=False")
        calls = [call for layer_calls in self.call_edges for call in layer_calls]
        wanted = [i for i, (edge, *_) in enumerate(calls) if edge is not None]
        found = torch.autograd.grad(score, [calls[i][0] for i in wanted] + list(extra), create_graph=create_graph,
                                    allow_unused=True)
        flat: List[Optional[Tensor]] = [None] * len(calls)
        for i, grad in zip(wanted, found):
            flat[i] = grad
        flat = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                for g, (_, shape, dtype, device) in zip(flat, calls)]
        per_layer: List[List[Tensor]] = []
        for layer_calls in self.call_edges:
            per_layer.append(flat[:len(layer_calls)])
            flat = flat[len(layer_calls):]
        rest = [torch.zeros_like(t) if g is None else g for g, t in zip(found[len(wanted):], extra)]
        return per_layer, rest


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def layer_transform(model: Optional[nn.Module], layer: nn.Module, shape: Sequence[int],
                    image_size: Optional[Sequence[int]], reshape_transform: ReshapeTransform = None
                    ) -> Callable[[Tensor], Tensor]:
    """The map from ``layer``'s output of shape ``shape`` to (B, C, h, w): the user's ``reshape_transform`` if
    given, else the :class:`~attribution.core.spatial.SpatialLayout` read from the shape when the input's
    ``image_size`` is known, else the identity."""
    if reshape_transform is not None:
        return reshape_transform
    if image_size is None or model is None:
        return _identity
    return spatial_layout(model, image_size, shape, layer_name(model, layer), layer)


def channel_positions(transform: Callable[[Tensor], Tensor], shape: Sequence[int], where: str,
                      device: Optional[torch.device] = None) -> Tensor:
    """(C, h*w) indices into one image's flattened layer output (of shape ``shape``, batch first) of the elements
    that ``transform`` places in each channel of its (1, C, h, w) result, on ``device``: found by transforming a
    tensor that holds its own flat indices, so any transform that only selects and rearranges elements can be
    inverted."""
    count = 1
    for size in shape[1:]:
        count *= int(size)
    probe = torch.arange(count, dtype=torch.float64, device=device).view(1, *shape[1:])
    mapped = transform(probe)
    whole = mapped.dim() == 4 and mapped.shape[0] == 1 and bool((mapped == mapped.round()).all()) \
        and bool(((mapped >= 0) & (mapped < count)).all())
    if whole:
        positions = mapped[0].flatten(1).long()
        if torch.unique(positions).numel() == positions.numel():
            return positions
    raise ValueError(f"the reshape_transform of layer {where!r} does not just select and rearrange the elements "
                     "of its output; channels can only be ablated through one that does")
