"""SRD, sharing ratio decomposition: the target's relevance at a layer, decomposed pointwise feature vector by pointwise
feature vector down to the pixels.

A *pointwise feature vector* (PFV) is the vector of a feature map's channels at one position.  Between two layers'
outputs ``v^(l-1)`` and ``v^l = act(z^l)`` the forward is affine, so the pre-activation PFV ``z^l_j`` is a sum of
contributions ``c_(i->j)`` of the PFVs ``v^(l-1)_i`` of its receptive field (and a bias).  The *sharing ratio* of
``v^(l-1)_i`` in ``v^l_j`` is the share of ``z^l_j`` that ``c_(i->j)`` makes, measured along ``z^l_j`` itself:
``mu_(i->j) = <c_(i->j), z_j> / |z_j|^2``, and the relevances go down as ``R_i = sum_j mu_(i->j) R_j``.

Written as a backward pass: with ``g`` the vector passed down, ``<c_(i->j), z_j> = <v_i, J_(ij)^T z_j>`` for the
Jacobian ``J`` of the affine block, so ``R_i = <v_i, g_i>`` where ``g = J^T s`` is the plain gradient of the block
applied to ``s_j = R_j z_j / |z_j|^2``.  Hence SRD is one forward and one backward in which every operation keeps its
plain gradient except the *points* where a layer's PFVs are read: there the gradient ``g`` reaching the output
``v`` is replaced by ``s = <v_j, g_j> z_j / |z_j|^2`` on the pre-activation ``z`` (:func:`sharing`).  The points are
elementwise activations (``z`` their input), pooling (``z`` their own output, the pooled PFV) and the target layer's
output (``z`` the output itself).  While :class:`SRDRules` (a :class:`torch.overrides.TorchFunctionMode`) is active
around the forward, those calls are routed through :mod:`attribution.core.rules`' operations (whose backward is
the rule, and the plain derivative once the relevance pass is done); nothing in the model is changed.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.layers import LayerSpec, default_layer, is_feature_layer, layer_name, resolve_layers
from ..core.registry import register
from ..core.rules import (ACTIVATION_FUNCTIONS, OUT_OF_PLACE, POOL_FUNCTIONS, Operation, PassThrough, RuleState,
                          differentiable, in_place_call, is_parameter, route, widened)
from ..core.targets import Target
from .base import GradientExplainer

#: max pooling and the position of its ``return_indices`` argument (routed only when it returns the pooled map)
MAX_POOL_FUNCTIONS: Dict[Any, int] = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, F.adaptive_max_pool1d: 2,
                                      F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2}
_NORMS = tuple(f for f in (F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm, F.normalize,
                           getattr(F, "rms_norm", None)) if f is not None)
_SOFTMAX = (F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax)
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)
_PRODUCTS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.mul_, Tensor.__imul__, torch.matmul,
             Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__, torch.bmm, Tensor.bmm, torch.einsum, F.bilinear)
_DIVISIONS = (torch.div, Tensor.div, Tensor.__truediv__, Tensor.div_, Tensor.__itruediv__)
#: elementwise nonlinearities that are not activations SRD reads PFVs after (their gradient would mix in unseen)
_NONLINEAR = (torch.exp, Tensor.exp, torch.log, Tensor.log, torch.sqrt, Tensor.sqrt, torch.rsqrt, Tensor.rsqrt,
              torch.pow, Tensor.pow, Tensor.__pow__, torch.square, Tensor.square, F.mish, F.glu)


def sharing(values: Tensor, pre_activation: Tensor, grad: Tensor) -> Tensor:
    """What SRD passes to a layer's pre-activation ``z`` for the gradient ``g`` reaching its output ``v``: each PFV's
    relevance ``R_j = <v_j, g_j>`` (channels are dimension 1) spread along ``z_j``, ``R_j z_j / |z_j|^2`` (0 where
    ``z_j = 0``); in float32 for half-precision tensors, returned in ``z``'s dtype."""
    v, z, g = widened(values), widened(pre_activation), widened(grad)
    relevance = (v * g).sum(dim=1, keepdim=True)
    norm = z.square().sum(dim=1, keepdim=True)
    nonzero = norm > 0
    spread = relevance * z / torch.where(nonzero, norm, torch.ones_like(norm))
    return torch.where(nonzero, spread, torch.zeros_like(spread)).to(pre_activation.dtype)


def _plain_gradient(operation: Operation, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                    create_graph: bool) -> Tuple[Optional[Tensor], ...]:
    """The operation's plain gradient w.r.t. its first tensor (a point above the target layer)."""
    with torch.enable_grad():
        local = differentiable(tensors[0], create_graph)
        out = operation.compute(local, *tensors[1:])
        (spread,) = torch.autograd.grad(out, local, grad.to(out.dtype), create_graph=create_graph)
    return (spread,) + (None,) * (len(tensors) - 1)


class _ActivationPoint(PassThrough):
    """An elementwise activation ``v = act(z)``: SRD's :func:`sharing` onto its input (the plain gradient when it
    runs above the target layer, ``above``).  In-place calls run on a copy (:class:`~attribution.core.rules.PassThrough`)."""

    keeps_output = True
    above = False

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        if self.above:
            return _plain_gradient(self, tensors, grad, create_graph)
        with torch.set_grad_enabled(create_graph):
            out = None if create_graph else self.kept_output()
            if out is None:
                out = self.compute(*tensors)
            return (sharing(out, tensors[0], grad),) + (None,) * (len(tensors) - 1)


class _PoolPoint(Operation):
    """Pooling (average, adaptive average, max): its output PFVs are a layer (their own pre-activation), so the
    gradient goes back through the pooling from :func:`sharing` on the output."""

    above = False

    def __init__(self, fn: Any, rest: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        self.fn, self.rest, self.kwargs = fn, rest, kwargs

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return self.fn(tensors[0], *self.rest, **self.kwargs)

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        if self.above:
            return _plain_gradient(self, tensors, grad, create_graph)
        with torch.enable_grad():
            local = differentiable(tensors[0], create_graph)
            out = self.compute(local)
            pooled = out if create_graph else out.detach()
            (spread,) = torch.autograd.grad(out, local, sharing(pooled, pooled, grad).to(out.dtype),
                                            create_graph=create_graph)
        return (spread,)


class _LayerPoint(Operation):
    """The target layer's output ``A`` (a copy of it): the relevance starts there, ``R_j = <A_j, dy/dA_j>``, and
    :func:`sharing` takes ``A`` as its own pre-activation."""

    above = False

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        return tensors[0].clone()

    def relevance(self, tensors: Sequence[Optional[Tensor]], grad: Tensor,
                  create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        if self.above:
            return (grad,)
        with torch.set_grad_enabled(create_graph):
            return (sharing(tensors[0], tensors[0], grad),)


def _computed(t: Any) -> bool:
    """A floating tensor the forward computed (recorded by autograd), not a parameter or a view of one."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad and not is_parameter(t)


def _feature_map(args: Sequence[Any]) -> bool:
    """Whether the call's first argument is a computed map with a channel dimension (dimension 1)."""
    return bool(args) and _computed(args[0]) and args[0].dim() >= 2


def _returns_indices(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    position = MAX_POOL_FUNCTIONS.get(func)
    return bool(kwargs.get("return_indices", False)) or (position is not None and len(args) > position
                                                         and bool(args[position]))


def _operands(func: Any, args: Sequence[Any]) -> List[Any]:
    """The tensors a product multiplies (an einsum's may come as one list after the equation)."""
    if func is torch.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
        return list(args[1])
    return [a for a in args if isinstance(a, Tensor)]


def unsupported(func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[str]:
    """What in this call SRD cannot decompose (its PFVs would not be affine in the layer below), or None."""
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


class SRDRules(TorchFunctionMode):
    """While active (with its hooks), a forward records SRD's points (see the module docstring) up to the last call of
    ``layer``; the points made after it (the head) keep their plain gradient.  Operations below the layer that SRD
    cannot decompose (normalisations over features, softmax, attention, products of feature maps, ...) are
    reported, by :meth:`finish` at the end of the forward, with the module that ran them."""

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__()
        self.model, self.layer = model, layer
        self.state = RuleState()
        self.points: List[Any] = []
        #: the number of points made up to the end of the target layer's last call (None: it has not run)
        self.start: Optional[int] = None
        self.problems: List[Tuple[int, str]] = []
        self._running: List[nn.Module] = []
        self._handles: List[Any] = []

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
        if exc_type is None:
            self.finish()

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

    def _layer_done(self, module: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 2:
            raise ValueError(f"SRD's target layer {layer_name(self.model, module)!r} must output a feature map "
                             f"(B, C, ...), got {type(output).__name__}"
                             f"{' of shape ' + str(tuple(output.shape)) if isinstance(output, Tensor) else ''}")
        point = _LayerPoint()
        out = route(point, self.state, output)
        self.points.append(point)
        self.start = len(self.points)
        return out

    def _point(self, operation: Any, *tensors: Optional[Tensor]) -> Tensor:
        self.points.append(operation)
        return route(operation, self.state, *tensors)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        if func in ACTIVATION_FUNCTIONS and _feature_map(args):
            plain, copy = OUT_OF_PLACE.get(func, func), in_place_call(func, args, kwargs)
            operation = _ActivationPoint(plain, args, kwargs, copy=copy)
            return self._point(operation, *operation.tensors())
        if (func in POOL_FUNCTIONS or func in MAX_POOL_FUNCTIONS) and _feature_map(args) \
                and not _returns_indices(func, args, kwargs):
            return self._point(_PoolPoint(func, tuple(args[1:]), kwargs), args[0])
        problem = unsupported(func, args, kwargs)
        if problem is not None:
            self._report(problem)
        return func(*args, **kwargs)

    def _report(self, problem: str) -> None:
        """Record a problem with the module running it; :meth:`finish` raises it if it ran below the target layer."""
        where = self._running[-1] if self._running else self.model
        self.problems.append((len(self.points), (
            f"SRD cannot decompose {problem} in layer {layer_name(self.model, where)!r} ({type(where).__name__}), "
            f"which runs below the target layer {layer_name(self.model, self.layer)!r}: SRD decomposes affine layers "
            "(convolutions, linear layers, batch norms in eval mode, pooling, sums) between elementwise activations "
            "only; choose a target_layer that runs before it")))

    def finish(self) -> None:
        """After the forward: the points above the target layer's last call keep their plain gradient; a problem
        below it raises."""
        if self.start is None:
            raise ValueError(f"SRD's target layer {layer_name(self.model, self.layer)!r} did not run in the model's "
                             "forward")
        for made_at, message in self.problems:
            if made_at < self.start:
                raise ValueError(message)
        for point in self.points[self.start:]:
            point.above = True


def srd_default_layer(model: nn.Module, x: Tensor) -> str:
    """The library's default CAM layer (:func:`~attribution.core.layers.default_layer`), stepping back over the
    pooling and dropout a ``Sequential`` ends with: torchvision's VGG gets ``features.29`` (conv5_3's ReLU, the
    paper's VGG16 layer) instead of ``features`` (pool5), its ResNets ``layer4`` (the avgpool's input, the paper's
    ResNet-50 layer)."""
    name = default_layer(model, x)
    module = dict(model.named_modules())[name]
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        kept = len(children)
        while kept > 0 and not is_feature_layer(children[kept - 1][1]):
            kept -= 1
        if 0 < kept < len(children):
            name = f"{name}.{children[kept - 1][0]}"
    return name


@register("srd")
class SRD(GradientExplainer):
    """SRD (sharing ratio decomposition): the target's relevance at a layer, decomposed PFV by PFV to the pixels.

    Han, Kim & Kwak, "Respect the model: Fine-grained and Robust Explanation with Sharing Ratio Decomposition",
    ICLR 2024, arXiv:2402.03348.

    A pointwise feature vector (PFV) is a feature map's channel vector at one position.  At ``target_layer`` each PFV
    ``A_j`` gets the relevance ``R_j = <A_j, d y_t / d A_j>`` (its contribution to the target's score, exact for a
    global-average-pooling and linear head); below it, every layer's PFV relevance is shared among the PFVs of the
    layer beneath in proportion to their *sharing ratios*, ``R_i = sum_j mu_(i->j) R_j`` with ``mu_(i->j) =
    <c_(i->j), z_j> / |z_j|^2``: ``c_(i->j)`` is what PFV ``i`` adds to the *pre-activation* PFV ``z_j`` through the
    affine block between them (convolutions, batch norm, sums of residual connections), so inactive neurons (the
    negative channels of ``z_j``, the paper's APOP observation) count, and the ratios do not sum to 1 where a bias
    adds to ``z_j``.  Layers are the outputs of elementwise activations and of pooling (a pooled PFV is its own
    pre-activation); the map is the pixels' relevance, (B, 1, H, W) at the input's resolution.  On a network without
    biases (and a head without one) the map sums to the target's logit.

    ``target_layer`` (a dotted name or module; ``None``: the library's default CAM layer, stepping back over a
    trailing pooling, see :func:`srd_default_layer`): the paper's experiments use conv5_3 for VGG16 and the average
    pooling's input for ResNet-50, which this default picks on torchvision's models.  A module called several times
    starts at its last call.  Layers SRD cannot decompose below ``target_layer`` (layer or group norms, attention,
    softmax, products of feature maps such as squeeze-and-excitation gates) raise a ValueError naming the module.

    Computed as a modified backward (derivation in :mod:`attribution.gradients.srd`): the plain gradient everywhere
    except at the points where PFVs are read, where the gradient ``g`` reaching a layer's output ``v`` becomes ``<v_j,
    g_j> z_j / |z_j|^2`` on its pre-activation; the pixels' relevance is ``sum_c x_c g_c``.  Cost: one forward and one
    backward (plus a few elementwise products and channel sums per activation).  No option besides the layer: the
    paper sets none (no epsilon, no threshold).

    Not checked against the authors' code (none was found): the start relevance ``<A_j, dy/dA_j>`` (the plain
    gradient through the head; the paper's relevance of the target layer's PFVs, exact for its ResNet head), pooling
    outputs counted as layers of their own (max pooling contributes each window's maximum channels), biases and
    batch-norm shifts taking no share (the relevance they would take is dropped), and a PFV whose pre-activation is
    all zero passing nothing on (a guarded division).
    """

    kind = "cam"
    argmax_on_rows = True
    plain_after_rules = True
    defaults = {"target_layer": None}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        if target_layer is not None:
            options["target_layer"] = target_layer
        super().__init__(model, **options)

    def _target_layer(self, x: Tensor, target_layer: LayerSpec) -> nn.Module:
        if target_layer is not None:
            layers = resolve_layers(self.model, target_layer)
            if len(layers) != 1:
                raise ValueError(f"SRD decomposes from one target_layer, got {len(layers)} layers")
            return layers[0]
        return self._default_module(x, srd_default_layer)

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        self._layer = self._target_layer(x, target_layer)
        try:
            total = self._integrate(x, target, 1, lambda owners, _: (x[owners], x[owners]), batch_size, create_graph)
            return total.sum(dim=1, keepdim=True)  # sum_c x_c g_c: the relevance of each pixel's PFV
        finally:
            for name in ("_layer", "_mode"):
                self.__dict__.pop(name, None)

    def _backward_rules(self) -> SRDRules:
        self._mode = SRDRules(self.model, self._layer)
        return self._mode
