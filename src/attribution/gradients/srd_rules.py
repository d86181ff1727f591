"""SRD's recording: a forward under :class:`SRDRules` records the affine blocks between layers and makes each
elementwise activation an SRD layer.

Every operation SRD decomposes (convolutions, linear layers on rows, batch norms in eval mode, max and average
pooling, padding, sums and arithmetic with constants, concatenation along the channels, reshapes that keep the PFV)
records a :class:`~attribution.gradients.srd_graph.Node` for its output; every elementwise activation of a feature
map becomes a :class:`~attribution.gradients.srd_point.Point`; anything else that reads a recorded tensor makes its
output :class:`~attribution.gradients.srd_graph.Opaque` (:func:`unsupported` says why), which raises only when it
lies in a block below the target layer.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.layers import layer_name
from ..core.rules import (ACTIVATION_FUNCTIONS, BATCH_NORM_ARGS, OUT_OF_PLACE, PassThrough, RuleState, in_place_call,
                          is_parameter)
from .srd_graph import Affine, AvgPool, BatchNorm, Cat, Conv, Dense, MaxPool, Node, Opaque, Pad, Reshape, Source, Sum
from .srd_point import Gate, Layer, Point

_NORMS = tuple(f for f in (F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize,
                           getattr(F, "rms_norm", None)) if f is not None)
_SOFTMAX = (F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax)
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)
_PRODUCTS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.mul_, Tensor.__imul__, torch.matmul,
             Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.einsum, F.bilinear)
_DIVISIONS = (torch.div, Tensor.div, Tensor.__truediv__, Tensor.div_, Tensor.__itruediv__)
_NONLINEAR = (torch.exp, Tensor.exp, torch.log, Tensor.log, torch.sqrt, Tensor.sqrt, torch.rsqrt, Tensor.rsqrt,
              torch.pow, Tensor.pow, Tensor.__pow__, torch.square, Tensor.square, F.mish, F.glu)

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_IDENTITIES = (Tensor.clone, torch.clone, Tensor.contiguous, Tensor.float, Tensor.double, Tensor.half,
               Tensor.bfloat16, Tensor.to, Tensor.type_as)
#: elementwise arithmetic: the operation and whether it works in place
_ARITHMETIC: Dict[Any, Tuple[str, bool]] = {
    **{f: ("add", False) for f in (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)},
    **{f: ("add", True) for f in (Tensor.add_, Tensor.__iadd__)},
    **{f: ("sub", False) for f in (torch.sub, Tensor.sub, Tensor.__sub__, torch.subtract, Tensor.subtract)},
    **{f: ("sub", True) for f in (Tensor.sub_, Tensor.__isub__)},
    **{f: ("rsub", False) for f in (Tensor.__rsub__, torch.rsub)},
    **{f: ("mul", False) for f in (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, torch.multiply)},
    **{f: ("mul", True) for f in (Tensor.mul_, Tensor.__imul__)},
    **{f: ("div", False) for f in (torch.div, Tensor.div, Tensor.__truediv__, torch.true_divide, torch.divide)},
    **{f: ("div", True) for f in (Tensor.div_, Tensor.__itruediv__)},
    **{f: ("neg", False) for f in (torch.neg, Tensor.neg, Tensor.__neg__, torch.negative)},
}


# ----------------------------------------------------------------------------------------------- small helpers
def _pair(value: Any) -> Tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


def _bind(args: Sequence[Any], kwargs: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _computed(t: Any) -> bool:
    """A floating tensor the forward computed (recorded by autograd), not a parameter or a view of one."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad and not is_parameter(t)


def _feature_map(args: Sequence[Any]) -> bool:
    """Whether the call's first argument is a computed map with a channel dimension (dimension 1)."""
    return bool(args) and _computed(args[0]) and args[0].dim() >= 2


def _operands(func: Any, args: Sequence[Any]) -> List[Any]:
    """The tensors a product multiplies (an einsum's may come as one list after the equation)."""
    if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
        return list(args[1])
    return [a for a in args if isinstance(a, Tensor)]


def unsupported(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """What in this call SRD cannot decompose, in words (None: no particular reason known; the caller then names
    the operation)."""
    name = getattr(func, "__name__", repr(func))
    if func in _NORMS:
        return f"a normalisation over features ({name})"
    if func in _SOFTMAX and _feature_map(args):
        return f"a softmax ({name})"
    if func in _ATTENTION:
        return f"attention ({name})"
    if func in _PRODUCTS and sum(_computed(t) for t in _operands(func, args)) >= 2:
        return f"a product of two feature maps ({name}: a gate, squeeze-and-excitation or attention)"
    if func in _DIVISIONS and len(args) > 1 and _computed(args[1]):
        return f"a division by a feature map ({name})"
    if func is Tensor.__rtruediv__ and _computed(args[0]):
        return f"a division by a feature map ({name})"
    if func in _NONLINEAR and _feature_map(args):
        return f"an elementwise nonlinearity that is not an activation SRD reads PFVs after ({name})"
    if func is F.batch_norm and bool(kwargs.get("training", len(args) > 5 and args[5])):
        return "a batch norm with batch statistics (training mode)"
    return None


def _tensors_in(args: Sequence[Any], kwargs: Dict[str, Any]) -> List[Tensor]:
    found: List[Tensor] = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, Tensor))
    return found


def _mutates(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.startswith("__")) or name.startswith("__i")


class SRDRules(TorchFunctionMode):
    """While active (with its hooks), a forward records how every tensor between layers is computed from layers
    (:class:`~attribution.gradients.srd_graph.Node`) and makes every elementwise activation a
    :class:`~attribution.gradients.srd_point.Point` (see :mod:`~attribution.gradients.srd_point`), up to the
    target ``layer``: the activation whose output its last call returns starts the relevance, or, when the output is
    no activation's, a point added there.  The points after it (the head) keep their plain gradient.  A block below
    the start that holds an operation SRD cannot decompose raises, from :meth:`finish` at the end of the forward,
    with the module that ran it."""

    def __init__(self, model: nn.Module, layer: nn.Module, contrastive: bool = True) -> None:
        super().__init__()
        self.model, self.layer, self.contrastive = model, layer, contrastive
        self.state = RuleState()
        self.points: List[Point] = []
        self.start: Optional[Point] = None
        self._nodes: Dict[int, Tuple[Tensor, Node]] = {}  # id -> (tensor, how it was computed)
        self._made: Dict[int, Tuple[Tensor, Point]] = {}  # a point's output -> the point
        self._inputs: Dict[int, Tuple[Tensor, Tensor]] = {}  # the network's input -> (it, as the model reads it)
        self._running: List[nn.Module] = []
        self._handles: List[Any] = []
        self._reaches: Dict[int, Tuple[Any, bool]] = {}  # grad_fn id -> (it, whether it reaches a non-parameter leaf)

    # --------------------------------------------------------------------------------------- context, hooks
    def __enter__(self) -> "SRDRules":
        try:
            for module in self.model.modules():
                self._handles.append(module.register_forward_pre_hook(self._enter_module))
                self._handles.append(module.register_forward_hook(self._leave_module))
            self._handles.append(self.layer.register_forward_hook(self._layer_done))
        except BaseException:
            self._remove()
            raise
        return super().__enter__()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._remove()
        super().__exit__(exc_type, *rest)
        try:
            if exc_type is None:
                self.finish()
        finally:
            self._nodes.clear()
            self._made.clear()
            self._inputs.clear()
            self._reaches.clear()

    def finish(self) -> None:
        """After the forward: the points after the start keep their plain gradient; a block below it that SRD
        cannot decompose raises."""
        if self.start is None:
            raise ValueError(f"SRD's target layer {layer_name(self.model, self.layer)!r} did not run in the model's "
                             "forward")
        at = next(i for i, point in enumerate(self.points) if point is self.start)
        for point in self.points[at + 1:]:
            point.above = True
        for point in self.points[: at + 1]:
            if point.opaque is not None:
                where = point.opaque.module
                raise ValueError(
                    f"SRD cannot decompose {point.opaque.problem} in layer {layer_name(self.model, where)!r} "
                    f"({type(where).__name__}), which runs below the target layer "
                    f"{layer_name(self.model, self.layer)!r}: SRD decomposes affine blocks (convolutions, linear "
                    "layers on rows, batch norms in eval mode, pooling, padding, sums, concatenation along the "
                    "channels) between elementwise activations only; choose a target_layer that runs before it")
        self.start.start, self.start.contrastive = True, self.contrastive

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running.clear()

    def _enter_module(self, module: nn.Module, args: Any) -> None:
        self._running.append(module)

    def _leave_module(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._running and self._running[-1] is module:
            self._running.pop()

    def _layer_done(self, module: nn.Module, args: Any, output: Any) -> Optional[Tensor]:
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 2:
            raise ValueError(f"SRD's target layer {layer_name(self.model, module)!r} must output a feature map "
                             f"(B, C, ...), got {type(output).__name__}"
                             f"{' of shape ' + str(tuple(output.shape)) if isinstance(output, Tensor) else ''}")
        made = self._made.get(id(output))
        if made is not None and made[0] is output:
            self.start = made[1]
            return None
        node = self._node(output, register=False) or Source(output)
        out = self._point(None, node, output)
        self.start = self.points[-1]
        return out

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _from_input(self, t: Tensor) -> bool:
        """Whether ``t`` depends on the network's input: its autograd graph reaches a leaf that is no parameter.  A
        tensor computed from parameters alone (a weight-standardised kernel, ``gain * scale``) is a constant of the
        block, not a layer.  Memoised over the forward's graph."""
        if t.grad_fn is None:
            return not is_parameter(t)
        stack = [t.grad_fn]
        while stack:
            fn = stack.pop()
            if id(fn) in self._reaches:
                continue
            leaf = getattr(fn, "variable", None)
            if leaf is not None:
                self._reaches[id(fn)] = (fn, not is_parameter(leaf))
                continue
            children = [f for f, _ in fn.next_functions if f is not None]
            pending = [f for f in children if id(f) not in self._reaches]
            if pending:
                stack += [fn] + pending
                continue
            self._reaches[id(fn)] = (fn, any(self._reaches[id(f)][1] for f in children))
        return self._reaches[id(t.grad_fn)][1]

    def _node(self, t: Any, register: bool = True) -> Optional[Node]:
        """How ``t`` was computed; a computed tensor not recorded is a layer of its own (the network's input)."""
        if not isinstance(t, Tensor):
            return None
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        if not register or not _computed(t) or not self._from_input(t):
            return None
        node = Source(t)  # the network's input (or what an operation SRD does not record made of it)
        self._nodes[id(t)] = (t, node)
        gated = Gate.apply(self.state, t)
        self._inputs[id(t)] = (t, gated)
        self._nodes[id(gated)] = (gated, node)
        return node

    def _gated(self, value: Any) -> Any:
        """``value`` with the network's input replaced by the gated tensor the model's operations read."""
        if isinstance(value, Tensor):
            entry = self._inputs.get(id(value))
            return entry[1] if entry is not None and entry[0] is value else value
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(self._gated(v) for v in value)
        return value

    def _keep(self, t: Tensor, node: Node) -> Tensor:
        self._nodes[id(t)] = (t, node)
        return t

    def _where(self) -> nn.Module:
        return self._running[-1] if self._running else self.model

    def _point(self, call: Optional[PassThrough], node: Node, z: Tensor) -> Tensor:
        point = Point(call, node, z)
        point.state = self.state
        out, layer = Layer.apply(point, *point.tensors())
        self.points.append(point)
        self._made[id(out)] = (out, point)
        return self._keep(out, Source(layer))

    # ------------------------------------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        activation = func in ACTIVATION_FUNCTIONS and _feature_map(args) and (
            self._node(args[0], register=False) is not None or self._from_input(args[0]))
        if activation or func in _DECOMPOSED:
            for t in _tensors_in(args, kwargs):
                self._node(t)  # the first reading of the network's input records it
        args = tuple(self._gated(a) for a in args)
        kwargs = {key: self._gated(value) for key, value in kwargs.items()}
        if activation:
            plain, copy = OUT_OF_PLACE.get(func, func), in_place_call(func, args, kwargs)
            return self._point(PassThrough(plain, args, kwargs, copy=copy), self._node(args[0]), args[0])
        tensors = _tensors_in(args, kwargs)
        for t in tensors:
            node = self._node(t, register=False)
            if isinstance(node, Opaque):  # what is computed from an opaque tensor is opaque for the same reason
                return self._opaque(func(*args, **kwargs), node, func, args)
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(self, func, args, kwargs)
            if result is not NotImplemented:
                return result
        return self._other(func, args, kwargs)

    def _other(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """An operation SRD does not decompose: its outputs are opaque when it reads a recorded tensor."""
        known = [t for t in _tensors_in(args, kwargs) if self._node(t, register=False) is not None]
        result = func(*args, **kwargs)
        if not known:
            return result
        problem = unsupported(func, args, kwargs) or getattr(func, "__name__", repr(func))
        return self._opaque(result, Opaque(problem, self._where()), func, args)

    def _opaque(self, result: Any, opaque: Opaque, func: Any, args: Sequence[Any]) -> Any:
        """``result`` (and the tensor an in-place call changed) recorded as ``opaque``."""
        outputs = list(result) if isinstance(result, (tuple, list)) else [result]
        if _mutates(func) and args and isinstance(args[0], Tensor):
            outputs.append(args[0])
        for out in outputs:
            if isinstance(out, Tensor) and out.is_floating_point():
                self._keep(out, opaque)
        return result

    def _conv(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, _CONV_ARGS)
        x, weight = bound["input"], bound["weight"]
        node = self._node(x)
        if node is None or x.dim() != 4:
            return NotImplemented
        out = func(*args, **kwargs)
        kernel, dilation = tuple(weight.shape[-2:]), _pair(bound.get("dilation", 1))
        padding = bound.get("padding", 0)
        if isinstance(padding, str):
            total = [0, 0] if padding == "valid" else [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)
        else:
            ph, pw = _pair(padding)
            pads = (pw, pw, ph, ph)
        return self._keep(out, Conv(node, out, weight, bound.get("bias"), _pair(bound.get("stride", 1)), pads,
                                    dilation, int(bound.get("groups", 1))))

    def _linear(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("input", "weight", "bias"))
        node = self._node(bound["input"])
        if node is None or bound["input"].dim() != 2:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, Dense(node, out, bound["weight"], bound.get("bias")))

    def _batch_norm(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, BATCH_NORM_ARGS)
        node = self._node(bound["input"])
        mean, var = bound.get("running_mean"), bound.get("running_var")
        if node is None or bound.get("training", False) or mean is None or var is None:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, BatchNorm(node, out, mean, var, bound.get("weight"), bound.get("bias"),
                                         float(bound.get("eps", 1e-5))))

    def _max_pool(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, _MAX_POOL_ARGS)
        x = bound["input"]
        node = self._node(x)
        if node is None or x.dim() != 4:
            return NotImplemented
        kernel = _pair(bound["kernel_size"])
        stride = _pair(bound.get("stride") or kernel)
        (ph, pw), dilation = _pair(bound.get("padding", 0)), _pair(bound.get("dilation", 1))
        out, indices = F.max_pool2d(x, kernel, stride, (ph, pw), dilation, ceil_mode=bool(bound.get("ceil_mode")),
                                    return_indices=True)
        self._keep(out, MaxPool(node, tuple(out.shape), indices, kernel, stride, (pw, pw, ph, ph), dilation))
        return (out, indices) if bound.get("return_indices") else out

    def _adaptive(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """Adaptive pooling whose windows are all alike (the output size divides the input's)."""
        x, size = args[0], kwargs.get("output_size", args[1] if len(args) > 1 else None)
        node = self._node(x)
        if node is None or x.dim() != 4:
            return NotImplemented
        wanted = _pair(size) if not isinstance(size, (tuple, list)) else tuple(
            x.shape[2 + i] if s is None else int(s) for i, s in enumerate(size))
        if any(n % s for n, s in zip(x.shape[-2:], wanted)):
            return NotImplemented
        kernel = (x.shape[-2] // wanted[0], x.shape[-1] // wanted[1])
        if func is F.adaptive_max_pool2d:
            out, indices = F.adaptive_max_pool2d(x, wanted, return_indices=True)
            self._keep(out, MaxPool(node, tuple(out.shape), indices, kernel, kernel, (0, 0, 0, 0), (1, 1)))
            wants_indices = kwargs.get("return_indices", len(args) > 2 and args[2])
            return (out, indices) if wants_indices else out
        out = func(x, wanted)
        pool = AvgPool(node, tuple(out.shape), lambda t: F.adaptive_avg_pool2d(t, wanted), kernel, kernel,
                       (0, 0, 0, 0))
        return self._keep(out, pool)

    def _avg_pool(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, _AVG_POOL_ARGS)
        x = bound["input"]
        node = self._node(x)
        if node is None or x.dim() != 4:
            return NotImplemented
        kernel = _pair(bound["kernel_size"])
        stride = _pair(bound.get("stride") or kernel)
        ph, pw = _pair(bound.get("padding", 0))
        rest = (bool(bound.get("ceil_mode", False)), bool(bound.get("count_include_pad", True)),
                bound.get("divisor_override"))
        out = func(*args, **kwargs)
        pool = AvgPool(node, tuple(out.shape), lambda t: F.avg_pool2d(t, kernel, stride, (ph, pw), *rest), kernel,
                       stride, (pw, pw, ph, ph))
        return self._keep(out, pool)

    def _mean(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """A mean over every position of a (B, C, H, W) map: global average pooling."""
        bound = _bind(args, kwargs, ("input", "dim", "keepdim"))
        x, dims = bound["input"], bound.get("dim")
        node = self._node(x)
        if node is None or x.dim() != 4 or dims is None or bound.get("dtype") is not None:
            return NotImplemented
        dims = {d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        if dims != {2, 3}:
            return NotImplemented
        out = func(*args, **kwargs)
        pool = AvgPool(node, tuple(x.shape[:2]) + (1, 1), lambda t: F.adaptive_avg_pool2d(t, 1), tuple(x.shape[-2:]),
                       tuple(x.shape[-2:]), (0, 0, 0, 0))
        return self._keep(out, pool if out.dim() == 4 else Reshape(pool, tuple(out.shape)))

    def _pad(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("input", "pad", "mode", "value"))
        x = bound["input"]
        node = self._node(x)
        if node is None or x.dim() < 3:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, Pad(node, out, bound["pad"], bound.get("mode", "constant") or "constant",
                                   bound.get("value")))

    def _cat(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("tensors", "dim"))
        tensors, dim = list(bound["tensors"]), bound.get("dim", 0)
        nodes = [self._node(t) for t in tensors]
        if not tensors or any(n is None for n in nodes) or tensors[0].dim() < 2 or dim % tensors[0].dim() != 1:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, Cat(nodes, tuple(out.shape), [t.shape[1] for t in tensors]))

    def _identity(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        if func in _DROPOUTS:
            bound = _bind(args, kwargs, ("input", "p", "training", "inplace"))
            if bound.get("training", True) and bound.get("p", 0.5) > 0:
                return NotImplemented
        node = self._node(args[0], register=False)
        result = func(*args, **kwargs)
        if node is not None and isinstance(result, Tensor) and result.is_floating_point():
            self._keep(result, node)
        return result

    def _reshape(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """Flattening a (B, C, 1, 1) map to (B, C) rows, or back; no other reshaping."""
        x = args[0]
        node = self._node(x, register=False)
        if node is None:
            return NotImplemented
        result = func(*args, **kwargs)
        if not isinstance(result, Tensor):
            return result
        same = result.shape == x.shape
        pfv = result.shape[:2] == x.shape[:2] and all(s == 1 for s in (result.shape[2:] + x.shape[2:]))
        if same or pfv:
            return self._keep(result, node if same else Reshape(node, tuple(result.shape)))
        return self._keep(result, Opaque(f"a reshape to {tuple(result.shape)} ({func.__name__})", self._where()))

    def _arithmetic(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        """Sums of computed tensors, and arithmetic with constants (numbers, buffers, parameters)."""
        kind, in_place = _ARITHMETIC[func]
        a = args[0]
        b = args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        na, nb = self._node(a), (None if kind == "neg" else self._node(b))
        if (na is None and nb is None) or (kind in ("mul", "div") and na is not None and nb is not None) \
                or (kind == "div" and na is None):
            return NotImplemented  # a product or a quotient of feature maps: opaque
        result = func(*args, **kwargs)
        shape = tuple(result.shape)
        if kind == "neg":
            node: Node = Affine(na, shape, scale=-1.0)
        elif kind == "mul":
            node = Affine(na, shape, scale=b) if na is not None else Affine(nb, shape, scale=a)
        elif kind == "div":
            node = Affine(na, shape, scale=1.0 / b)
        else:  # result = ca * a + cb * b
            ca, cb = {"add": (1.0, alpha), "sub": (1.0, -alpha), "rsub": (-alpha, 1.0)}[kind]
            terms = [(n, c) for n, c in ((na, ca), (nb, cb)) if n is not None]
            parts = [n if c == 1 else Affine(n, shape, scale=c) for n, c in terms]
            if len(parts) == 2:
                node = Sum(parts, shape)
            else:
                constant = b if nb is None else a
                scale = terms[0][1]
                node = Affine(terms[0][0], shape, scale=None if scale == 1 else scale,
                              shift=(cb if nb is None else ca) * constant)
        if in_place and isinstance(na, Source) and (a is na.tensor or a._base is na.tensor or na.tensor._base is a):
            node = Opaque(f"an in-place change of a layer's output ({func.__name__})", self._where())
        return self._keep(result, node)


_HANDLERS: Dict[Any, Callable[..., Any]] = {
    F.conv2d: SRDRules._conv,
    F.linear: SRDRules._linear,
    F.batch_norm: SRDRules._batch_norm,
    F.max_pool2d: SRDRules._max_pool,
    F.max_pool2d_with_indices: SRDRules._max_pool,
    F.avg_pool2d: SRDRules._avg_pool,
    F.adaptive_avg_pool2d: SRDRules._adaptive,
    F.adaptive_max_pool2d: SRDRules._adaptive,
    torch.mean: SRDRules._mean,
    Tensor.mean: SRDRules._mean,
    F.pad: SRDRules._pad,
    torch.cat: SRDRules._cat,
    torch.concat: SRDRules._cat,
    **{f: SRDRules._identity for f in _IDENTITIES + _DROPOUTS},
    **{f: SRDRules._reshape for f in (torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape)},
    **{f: SRDRules._arithmetic for f in _ARITHMETIC},
}


#: the operations whose first reading of a tensor that nothing recorded makes it a layer (the network's input)
_DECOMPOSED = frozenset(set(_HANDLERS) - set(_IDENTITIES) - set(_DROPOUTS)
                        - {torch.flatten, Tensor.flatten, Tensor.view, Tensor.reshape, torch.reshape})
