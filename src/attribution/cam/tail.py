"""Running only the part of a model's forward that comes after one layer (used by AblationCAM).

The model is traced with ``torch.fx`` (the layer kept as one opaque call) and its graph cut after the layer's
(last) call.  The *head*, everything up to the cut, runs once on the images; the *tail* is a new ``GraphModule``
whose inputs are the head's values the tail still needs: the layer's output and, for instance, a skip connection
from earlier.  Values that depend on the images are indexed per row (``value[owners]``) so the tail can run on any
number of modified copies; values that do not (constants, parameters) are passed as they are; non-tensor values
computed from the images (``x.size(0)`` and the like) are recomputed in the tail from their tensor inputs.

:class:`SplitModel` raises :class:`Unsplittable` when the model cannot be cut there (fx cannot trace it, the layer
is not called in the traced graph, or an image-dependent value is not a per-image tensor); callers then fall
back to full forwards.  That includes models with forward hooks on modules the tracer goes *through* (containers,
custom blocks): fx would call them on proxies while tracing.  Hooks of leaf modules (``nn.Conv2d``,
``nn.ReLU``...) and of the layer are fine: they run, on real tensors, in the head and the tail.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor, fx, nn

from ..core.layers import layer_name


_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")


class Unsplittable(Exception):
    """The model cannot be cut after the layer; run full forwards instead."""


class _Tracer(fx.Tracer):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return module is self.layer or super().is_leaf_module(module, qualified_name)


class _Stop(Exception):
    pass


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


class _Head(fx.Interpreter):
    """Runs the graph's nodes in order and stops right after ``stop``, keeping every value."""

    def __init__(self, module: fx.GraphModule, stop: fx.Node) -> None:
        super().__init__(module, garbage_collect_values=False)
        self.stop = stop

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if node is self.stop:
            self.env[node] = value
            raise _Stop
        return value


class SplitModel:
    """``model`` traced and cut after ``layer``: :meth:`head` runs up to the layer, :meth:`tail` after it."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        self.model = model
        self.layer = layer
        tracer = _Tracer(layer)
        for name, module in model.named_modules():
            hooked = any(getattr(module, kind, None) for kind in _FORWARD_HOOKS)
            if hooked and not tracer.is_leaf_module(module, name):
                raise Unsplittable(f"the module {name or '<model>'!r} has forward hooks, which fx would run on "
                                   "proxies while tracing through it")
        try:
            graph = tracer.trace(model)
        except Exception as error:  # fx cannot trace data-dependent control flow and the like
            raise Unsplittable(f"torch.fx cannot trace the model: {error}") from error
        self.module = fx.GraphModule(tracer.root, graph)
        name = layer_name(model, layer)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
        if not calls:
            raise Unsplittable(f"the layer {name!r} is not called as a module in the traced graph")
        self.cut = calls[-1]
        self.nodes: List[fx.Node] = list(graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.on_images = self._image_dependent()

    def _image_dependent(self) -> set:
        """Nodes computed from the images: the first input and what depends on it (further inputs, such as
        timm's ``attn_mask=None``, keep their defaults and are constants)."""
        placeholders = [node for node in self.nodes if node.op == "placeholder"]
        dependent: set = set(placeholders[:1])
        for node in self.nodes:
            if any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
        return dependent

    def still_valid(self) -> bool:
        """True while every module and attribute the trace refers to is still the model's own."""
        for node in self.nodes:
            if node.op in ("call_module", "get_attr"):
                try:
                    if _fetch(self.module, node.target) is not _fetch(self.model, node.target):
                        return False
                except AttributeError:
                    return False
        return True

    def head(self, x: Tensor) -> Dict[fx.Node, Any]:
        """Every value the graph computes up to and including the layer's output, for the images ``x``."""
        runner = _Head(self.module, self.cut)
        try:
            runner.run(x)
        except _Stop:
            return runner.env
        raise Unsplittable("the traced graph ended before the layer")  # pragma: no cover

    def plan(self, values: Dict[fx.Node, Any]) -> Tuple[Set[fx.Node], List[fx.Node]]:
        """(nodes the tail runs, head nodes whose values it takes), given one head run's ``values``: their types
        decide which image-dependent non-tensor values are recomputed in the tail rather than passed in."""
        inside = {node for node in self.nodes if self.position[node] > self.position[self.cut]}
        while True:
            frontier = sorted({a for n in inside for a in n.all_input_nodes if a not in inside},
                              key=self.position.__getitem__)
            recompute = [f for f in frontier
                         if f is not self.cut and f in self.on_images and f.op != "placeholder"
                         and not isinstance(values[f], Tensor)]
            if not recompute:
                return inside, frontier
            inside.update(recompute)

    def merged(self, chunks: Sequence[Dict[fx.Node, Any]], plan: Tuple[Set[fx.Node], List[fx.Node]]
               ) -> Dict[fx.Node, Any]:
        """The values the tail of ``plan`` takes, from the head runs of consecutive chunks of rows: per-image
        tensors concatenated, the rest (the same for every chunk) taken from the first."""
        return {node: torch.cat([chunk[node] for chunk in chunks])
                if len(chunks) > 1 and node in self.on_images and isinstance(chunks[0][node], Tensor)
                and chunks[0][node].dim() > 0 else chunks[0][node] for node in plan[1]}

    def tail(self, values: Dict[fx.Node, Any], batch: int, plan: Tuple[Set[fx.Node], List[fx.Node]]) -> "Tail":
        """The tail of :meth:`plan` for the head ``values`` (at least the plan's inputs) of ``batch`` images."""
        inside, frontier = plan
        graph = fx.Graph()
        mapping: Dict[fx.Node, fx.Node] = {}
        for node in frontier:
            mapping[node] = graph.placeholder(node.name)
        for node in self.nodes:
            if node in inside:
                mapping[node] = graph.node_copy(node, lambda a: mapping[a])
        layer_value = values[self.cut]
        if not isinstance(layer_value, Tensor) or layer_value.shape[:1] != (batch,):
            raise Unsplittable("the layer's output is not a per-image tensor")
        inputs = []
        for node in frontier:
            value = values[node]
            per_image = node in self.on_images
            if per_image and not (isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch):
                raise Unsplittable(f"the tail needs {node.name!r}, which is not a per-image tensor")
            inputs.append((node is self.cut, per_image, value))
        return Tail(fx.GraphModule(self.module, graph), inputs)


def cached_split(cache: Dict[int, Tuple[nn.Module, SplitModel]], model: nn.Module,
                 layer: nn.Module) -> Optional[SplitModel]:
    """``model`` traced and cut after ``layer``, kept in ``cache`` while the model's modules stay the same; None
    when it cannot be cut (not cached: the reason, a hook say, may be gone next time)."""
    cached = cache.get(id(layer))
    if cached is not None and cached[0] is layer and cached[1].still_valid():
        return cached[1]
    try:
        split = SplitModel(model, layer)
    except Unsplittable:
        return None
    cache[id(layer)] = (layer, split)
    return split


class Tail:
    """The tail of a :class:`SplitModel` with the head's values of a batch of images."""

    def __init__(self, module: fx.GraphModule, inputs: Sequence[tuple]) -> None:
        self.module = module
        self.inputs = list(inputs)

    def __call__(self, layer_rows: Tensor, owners: Tensor) -> Any:
        """Model outputs for rows whose layer output is ``layer_rows`` and which belong to images ``owners``."""
        args = []
        for is_layer, per_image, value in self.inputs:
            if is_layer:
                args.append(layer_rows)
            elif per_image:
                args.append(value[owners])
            else:
                args.append(value)
        return self.module(*args)


def ablation_rows(activations: Tensor, owners: Tensor, channels: Tensor, value: float,
                  positions: Optional[Tensor] = None) -> Tensor:
    """Copies ``activations[owners]`` with channel ``channels[r]`` of row ``r`` set to ``value`` (one gather and
    one small in-place write: building the copies is most of the cost of a short tail).  For a layer output that
    is not (B, C, h, w) (tokens, channels-last maps), ``positions`` (C, h*w) says where each channel's elements lie
    in an image's flattened output (:func:`attribution.core.capture.channel_positions`)."""
    rows = activations[owners]
    if positions is None:
        rows[torch.arange(rows.shape[0], device=rows.device), channels] = value
        return rows
    rows = rows.contiguous()  # positions index the row-major layout
    flat = rows.view(rows.shape[0], -1)
    flat.scatter_(1, positions[channels], value)
    return rows
