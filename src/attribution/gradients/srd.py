"""SRD, sharing ratio decomposition: the target's relevance at a layer, decomposed pointwise feature vector by pointwise
feature vector down to the pixels.

Layers and blocks.  A *layer* is the output ``v = act(z)`` of an elementwise activation (ReLU, ...) or the network's
input; a *pointwise feature vector* (PFV) ``v_i`` is its channel vector at one position.  Between a layer and the next
activation's pre-activation ``z`` the network is affine: convolutions, batch norms in eval mode, max pooling (its
selection fixed by the forward), average pooling, padding, sums of residual branches, concatenation along the
channels.  Pooling is no layer: its output is part of the block it feeds (the authors' VGG and ResNet code propagate
from a ReLU through the max pooling and the next convolution at once).  So ``z_j`` is a sum of *contributions* ``c``,
each the image of one PFV ``v_i`` of a layer below along one path (one convolution offset, one pooling offset, ...),
plus biases (convolution biases, batch-norm shifts).

Sharing ratio.  A contribution's share of ``z_j`` is its projection on ``z_j``: ``mu = <c + beta_c, z_j> / |z_j|^2``,
where ``beta_c = b_j |c| / sum_c' |c'|`` is its part of the bias ``b_j`` of its branch, shared in proportion to the
contributions' norms (the authors' ``bias_bunbae``); a residual branch's bias is shared within the branch, an
operation's own bias among every contribution through it.  The ratios of one ``z_j`` then sum to 1 and relevance is
conserved layer by layer: ``R_i = sum mu R_j`` over every contribution of ``v_i``.  Inactive neurons count: ``z_j`` is
the pre-activation, negative channels included (the paper's APOP observation).

Start.  At ``target_layer`` each PFV gets ``R_j = <A_j, dy_t/dA_j>``, the head's plain gradient times the activation
(on a global-average-pooling + linear head, the PFV's contribution to the target's logit, as the authors' ResNet code
takes it; their VGG code takes Grad-CAM's map), and with ``contrastive`` the mean over the layer's positions is
subtracted (the authors' default ``contrastive_rule = x - x.mean()``).  The map is the relevance of the input's PFVs,
the pixels, (B, 1, H, W).

As a backward.  Each contribution is linear in its one PFV and so is its norm, so ``R_i = <v_i, g_i>`` (Euler) with
``g`` the vector-Jacobian product of the contributions with the cotangent ``s_j + t_j c / |c|``,
``s_j = R_j z_j / |z_j|^2`` and ``t_j = R_j <b_j, z_j> / (|z_j|^2 sum_c' |c'|)``.  While :class:`SRDRules` is active
around the forward it records, for every tensor between layers, how it was computed from layers (:class:`_Node`);
each activation becomes a :class:`_Point` whose backward replays its block on the contributions (one entry per path,
:func:`_offsets`), applies that cotangent and hands ``g`` straight to the layers below, and whose forward is the
activation itself (:class:`_Layer`: one output for the model's own operations, one for the blocks' replays, so that
only the replays' ``g`` counts below the start; :class:`_Gate` does the same for the network's input).  The plain
derivative takes over once the relevance pass is done (``create_graph``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core.layers import LayerSpec, default_layer, is_feature_layer, layer_name, resolve_layers
from ..core.registry import register
from ..core.rules import (ACTIVATION_FUNCTIONS, OUT_OF_PLACE, Operation, PassThrough, RuleState, differentiable,
                          in_place_call, is_parameter)
from ..core.targets import Target
from .base import GradientExplainer

#: one branch of a block's contributions: ``U`` (B, P, C, *spatial), each of its P entries one PFV's contribution along
#: one path, and the branch's bias (1 or B, C, *spatial), or None
Group = Tuple[Tensor, Optional[Tensor]]
Number = Union[float, Tensor]

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
_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
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


def _divide(a: Tensor, b: Tensor) -> Tensor:
    """``a / b``, 0 where ``b`` is 0 (and differentiable everywhere)."""
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), torch.zeros_like(a))


def _channel_norm(u: Tensor) -> Tensor:
    """``|u|`` over the channels (dimension 2 of a contribution tensor), with a derivative of 0 at 0."""
    square = u.square().sum(dim=2, keepdim=True)
    positive = square > 0
    root = torch.where(positive, square, torch.ones_like(square)).sqrt()
    return torch.where(positive, root, torch.zeros_like(square))


def _full(b: Tensor, shape: Sequence[int]) -> Tensor:
    """A bias broadcast to (its batch, ``shape[1:]``)."""
    return b.expand(b.shape[0], *shape[1:])


def _aligned(value: Number, ndim: int) -> Number:
    """A constant operand of elementwise arithmetic with ``ndim`` dimensions (numbers stay numbers)."""
    if not isinstance(value, Tensor):
        return value
    return value.reshape((1,) * (ndim - value.dim()) + tuple(value.shape)) if value.dim() < ndim else value


def _offsets(x: Tensor, kernel: Tuple[int, int], stride: Tuple[int, int], pads: Tuple[int, int, int, int],
             dilation: Tuple[int, int], out_hw: Tuple[int, int]) -> List[Tensor]:
    """The inputs of a 2-D sliding operation, one kernel offset at a time: ``x`` (N, C, H, W) zero-padded by ``pads``
    (left, right, top, bottom; more on the right and bottom where a ceil-mode pooling's last window needs it) ->
    K views (N, C, *out_hw), the k-th holding at each output position its window's k-th input."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel, stride, dilation, out_hw
    height, width = x.shape[-2:]
    bottom = max(pads[3], (oh - 1) * sh + dh * (kh - 1) + 1 - height - pads[2])
    right = max(pads[1], (ow - 1) * sw + dw * (kw - 1) + 1 - width - pads[0])
    x = F.pad(x, (pads[0], right, pads[2], bottom))
    return [x[..., ky * dh: ky * dh + sh * (oh - 1) + 1: sh, kx * dw: kx * dw + sw * (ow - 1) + 1: sw]
            for ky in range(kh) for kx in range(kw)]


def _windows(groups: List[Group], taken: List[Tensor], kernel: Tuple[int, int], stride: Tuple[int, int],
             pads: Tuple[int, int, int, int], dilation: Tuple[int, int], out_hw: Tuple[int, int]) -> List[Tensor]:
    """Each group's contributions through a pooling: every window offset a path, weighted by its entry of ``taken``
    (B or 1, C or 1, *out_hw)."""
    out = []
    for u, _ in groups:
        batch, paths = u.shape[:2]
        flat = u.reshape(batch * paths, *u.shape[2:])
        parts = [(part.view(batch, paths, *part.shape[1:]) * weight.unsqueeze(1))
                 for part, weight in zip(_offsets(flat, kernel, stride, pads, dilation, out_hw), taken)]
        out.append(torch.stack(parts, dim=2).reshape(batch, -1, *parts[0].shape[2:]))
    return out


def _merged(groups: List[Group], bias: Optional[Tensor]) -> List[Group]:
    """The groups as one with ``bias`` added: an operation's own bias is shared by every contribution through it."""
    if bias is None:
        return groups
    u = groups[0][0] if len(groups) == 1 else torch.cat([g[0] for g in groups], dim=1)
    for _, b in groups:
        if b is not None:
            bias = bias + b
    return [(u, bias)]


def _affine(groups: List[Group], scale: Optional[Number], shift: Optional[Tensor]) -> List[Group]:
    """``scale * . + shift`` (constants broadcast like the output, ``shift`` the operation's own bias)."""
    if scale is not None:
        factor = scale.unsqueeze(1) if isinstance(scale, Tensor) else scale
        groups = [(u * factor, None if b is None else b * scale) for u, b in groups]
    return _merged(groups, shift)


# ------------------------------------------------------------------------------------------------- the blocks
class _Replay:
    """One replay of a block on contributions: the layers' aliases (differentiated against), the parameters in the
    computing dtype (in the graph only under ``create_graph``), each node's groups computed once."""

    def __init__(self, dtype: torch.dtype, create_graph: bool) -> None:
        self.dtype, self.create_graph = dtype, create_graph
        self.aliases: Dict[int, Tensor] = {}
        self._done: Dict[int, List[Group]] = {}

    def alias(self, t: Tensor) -> Tensor:
        if id(t) not in self.aliases:
            self.aliases[id(t)] = differentiable(t, self.create_graph)
        return self.aliases[id(t)].to(self.dtype)

    def param(self, value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        return (value if self.create_graph else value.detach()).to(self.dtype)

    def __call__(self, node: "_Node") -> List[Group]:
        if id(node) not in self._done:
            self._done[id(node)] = node.groups(self)
        return self._done[id(node)]


class _Node:
    """How a tensor between layers was computed from layers: :meth:`groups` maps its inputs' contributions to its
    own.  ``shape`` is the tensor's."""

    inputs: Tuple["_Node", ...] = ()
    shape: Tuple[int, ...] = ()

    def groups(self, replay: _Replay) -> List[Group]:
        raise NotImplementedError


class _Source(_Node):
    """A layer (an activation's output, the network's input): each PFV is its own contribution."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def groups(self, replay: _Replay) -> List[Group]:
        return [(replay.alias(self.tensor).unsqueeze(1), None)]


class _Opaque(_Node):
    """The output of an operation SRD cannot decompose (:func:`unsupported`), and the module that ran it."""

    def __init__(self, problem: str, module: nn.Module) -> None:
        self.problem, self.module = problem, module

    def groups(self, replay: _Replay) -> List[Group]:
        raise RuntimeError(f"SRD cannot decompose {self.problem}")


class _Conv(_Node):
    """``F.conv2d``: every kernel offset a path; the bias belongs to every contribution through the convolution."""

    def __init__(self, node: _Node, out: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                 pads: Tuple[int, int, int, int], dilation: Tuple[int, int], groups: int) -> None:
        self.inputs, self.shape = (node,), tuple(out.shape)
        self.weight, self.bias, self.stride, self.pads, self.dilation, self.ngroups = \
            weight, bias, stride, pads, dilation, groups

    def groups(self, replay: _Replay) -> List[Group]:
        weight, out_hw = replay.param(self.weight), self.shape[-2:]
        kernel = tuple(weight.shape[-2:])
        taps = [weight[:, :, ky: ky + 1, kx: kx + 1] for ky in range(kernel[0]) for kx in range(kernel[1])]
        result = []
        for u, b in replay(self.inputs[0]):
            batch, paths = u.shape[:2]
            parts = _offsets(u.reshape(batch * paths, *u.shape[2:]), kernel, self.stride, self.pads, self.dilation,
                             out_hw)
            c = torch.stack([F.conv2d(part, tap, groups=self.ngroups) for part, tap in zip(parts, taps)], dim=1)
            if b is not None:
                b = F.conv2d(F.pad(_full(b, u.shape[:1] + u.shape[2:]), self.pads), weight, None, self.stride, 0,
                             self.dilation, self.ngroups)
            result.append((c.reshape(batch, -1, *c.shape[2:]), b))
        bias = None if self.bias is None else replay.param(self.bias).view(1, -1, 1, 1)
        return _merged(result, bias)


class _Dense(_Node):
    """``F.linear`` on (B, C) rows: the row is one PFV."""

    def __init__(self, node: _Node, out: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        self.inputs, self.shape, self.weight, self.bias = (node,), tuple(out.shape), weight, bias

    def groups(self, replay: _Replay) -> List[Group]:
        weight = replay.param(self.weight)
        result = [(u @ weight.T, None if b is None else b @ weight.T) for u, b in replay(self.inputs[0])]
        return _merged(result, None if self.bias is None else replay.param(self.bias).view(1, -1))


class _BatchNorm(_Node):
    """``F.batch_norm`` in eval mode: per channel ``scale * x + shift``, the shift a bias."""

    def __init__(self, node: _Node, out: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float) -> None:
        self.inputs, self.shape = (node,), tuple(out.shape)
        self.mean, self.var, self.weight, self.bias, self.eps = mean, var, weight, bias, eps

    def groups(self, replay: _Replay) -> List[Group]:
        view = (1, -1) + (1,) * (len(self.shape) - 2)
        scale = (replay.param(self.var) + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * replay.param(self.weight)
        shift = -replay.param(self.mean) * scale
        if self.bias is not None:
            shift = shift + replay.param(self.bias)
        return _affine(replay(self.inputs[0]), scale.view(view), shift.view(view))


class _Affine(_Node):
    """Elementwise arithmetic with constants: ``scale * x + shift`` (a constant added is a bias)."""

    def __init__(self, node: _Node, shape: Tuple[int, ...], scale: Optional[Number] = None,
                 shift: Optional[Number] = None) -> None:
        self.inputs, self.shape, self.scale, self.shift = (node,), shape, scale, shift

    def groups(self, replay: _Replay) -> List[Group]:
        scale = _aligned(replay.param(self.scale), len(self.shape))
        shift = _aligned(replay.param(self.shift), len(self.shape))
        if shift is not None and not isinstance(shift, Tensor):
            shift = torch.full((1,) * len(self.shape), float(shift), dtype=replay.dtype)
        groups = replay(self.inputs[0])
        if isinstance(shift, Tensor):
            shift = shift.to(groups[0][0].device)
        return _affine(groups, scale, shift)


class _Sum(_Node):
    """A sum of computed tensors (residual connections): the branches stay apart, each with its own bias."""

    def __init__(self, nodes: Sequence[_Node], shape: Tuple[int, ...]) -> None:
        self.inputs, self.shape = tuple(nodes), shape

    def groups(self, replay: _Replay) -> List[Group]:
        result = []
        for node in self.inputs:
            for u, b in replay(node):
                result.append((u.expand(*u.shape[:2], *self.shape[1:]), b))
        return result


class _Cat(_Node):
    """``torch.cat`` along the channels: each input's contributions and biases padded with zeros."""

    def __init__(self, nodes: Sequence[_Node], shape: Tuple[int, ...], sizes: Sequence[int]) -> None:
        self.inputs, self.shape, self.sizes = tuple(nodes), shape, tuple(sizes)

    def groups(self, replay: _Replay) -> List[Group]:
        result, start, total = [], 0, self.shape[1]
        for node, size in zip(self.inputs, self.sizes):
            def padded(t: Tensor, dim: int) -> Tensor:
                before = t.new_zeros(*t.shape[:dim], start, *t.shape[dim + 1:])
                after = t.new_zeros(*t.shape[:dim], total - start - size, *t.shape[dim + 1:])
                return torch.cat([before, t, after], dim=dim)
            result.extend((padded(u, 2), None if b is None else padded(_full(b, (0, size) + self.shape[2:]), 1))
                          for u, b in replay(node))
            start += size
        return result


class _MaxPool(_Node):
    """Max pooling: every window offset a path, each channel taken where the forward took its maximum."""

    def __init__(self, node: _Node, shape: Tuple[int, ...], indices: Tensor, kernel: Tuple[int, int],
                 stride: Tuple[int, int], pads: Tuple[int, int, int, int], dilation: Tuple[int, int]) -> None:
        self.inputs, self.shape, self.in_shape = (node,), shape, node.shape
        self.indices, self.kernel, self.stride, self.pads, self.dilation = indices, kernel, stride, pads, dilation

    def groups(self, replay: _Replay) -> List[Group]:
        groups, (height, width), out_hw = replay(self.inputs[0]), self.in_shape[-2:], self.shape[-2:]
        device = groups[0][0].device
        positions = torch.arange(1, height * width + 1, device=device, dtype=torch.float64).view(1, 1, height, width)
        index = (self.indices + 1).to(torch.float64)
        taken = [(where == index).to(replay.dtype)
                 for where in _offsets(positions, self.kernel, self.stride, self.pads, self.dilation, out_hw)]
        flat = self.indices.flatten(2)
        biases = [None if b is None else _full(b, self.indices.shape[:1] + self.in_shape[1:]).expand(
            flat.shape[0], -1, -1, -1).flatten(2).gather(2, flat).view(self.shape) for _, b in groups]
        return list(zip(_windows(groups, taken, self.kernel, self.stride, self.pads, self.dilation, out_hw), biases))


class _AvgPool(_Node):
    """Average pooling (plain, adaptive with equal windows, a mean over the positions): every window offset a path
    weighted by its window's divisor."""

    def __init__(self, node: _Node, shape: Tuple[int, ...], pool: Callable[[Tensor], Tensor],
                 kernel: Tuple[int, int], stride: Tuple[int, int], pads: Tuple[int, int, int, int]) -> None:
        self.inputs, self.shape, self.in_shape = (node,), shape, node.shape
        self.pool, self.kernel, self.stride, self.pads = pool, kernel, stride, pads

    def groups(self, replay: _Replay) -> List[Group]:
        groups, out_hw = replay(self.inputs[0]), self.shape[-2:]
        ones = torch.ones(1, 1, *self.in_shape[-2:], device=groups[0][0].device, dtype=replay.dtype)
        inside = _offsets(ones, self.kernel, self.stride, self.pads, (1, 1), out_hw)
        weight = self.pool(ones) / torch.stack(inside).sum(dim=0).clamp_min(1)
        contributions = _windows(groups, [part * weight for part in inside], self.kernel, self.stride, self.pads,
                                 (1, 1), out_hw)
        biases = [None if b is None else self.pool(_full(b, (0,) + self.in_shape[1:])) for _, b in groups]
        return list(zip(contributions, biases))


class _Pad(_Node):
    """``F.pad``: positions copied (or zero); a non-zero constant fill is a bias."""

    def __init__(self, node: _Node, out: Tensor, pad: Sequence[int], mode: str, value: Optional[float]) -> None:
        self.inputs, self.shape, self.pad, self.mode, self.value = (node,), tuple(out.shape), tuple(pad), mode, value

    def groups(self, replay: _Replay) -> List[Group]:
        fill = 0.0 if self.mode == "constant" else None
        result = []
        for u, b in replay(self.inputs[0]):
            padded = F.pad(u.reshape(-1, *u.shape[2:]), self.pad, self.mode, fill)
            b = None if b is None else F.pad(_full(b, (0,) + self.inputs[0].shape[1:]), self.pad, self.mode, fill)
            result.append((padded.view(*u.shape[:2], *self.shape[1:]), b))
        bias = None
        if self.mode == "constant" and self.value:
            zeros = torch.zeros(1, *self.inputs[0].shape[1:], device=result[0][0].device, dtype=replay.dtype)
            bias = F.pad(zeros, self.pad, "constant", float(self.value))
        return _merged(result, bias)


class _Reshape(_Node):
    """(B, C, 1, ..., 1) <-> (B, C): the PFV is unchanged."""

    def __init__(self, node: _Node, shape: Tuple[int, ...]) -> None:
        self.inputs, self.shape = (node,), shape

    def groups(self, replay: _Replay) -> List[Group]:
        shape = self.shape[1:]
        return [(u.reshape(*u.shape[:2], *shape), None if b is None else b.reshape(b.shape[0], *shape))
                for u, b in replay(self.inputs[0])]


def _walk(node: _Node) -> Tuple[List[Tensor], Optional[_Opaque]]:
    """The layers a block reads (each once) and the first operation in it that SRD cannot decompose, if any."""
    sources: Dict[int, Tensor] = {}
    opaque: List[_Opaque] = []
    seen = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, _Source):
            sources.setdefault(id(current.tensor), current.tensor)
        elif isinstance(current, _Opaque):
            opaque.append(current)
        stack.extend(current.inputs)
    return list(sources.values()), (opaque[0] if opaque else None)


# ------------------------------------------------------------------------------------------------- the layers
class _Point(Operation):
    """An SRD layer: an elementwise activation ``v = act(z)`` (``call``), or, at a target layer whose output is no
    activation's, that output itself (``z = v``).  Its backward takes ``R_j = <v_j, g_j>`` for the vector ``g``
    reaching ``v`` and hands the layers its block reads (``sources``) their ``g`` (see the module docstring); above
    the start, or once the relevance pass is done, the plain derivative."""

    keeps_output = True

    def __init__(self, call: Optional[PassThrough], node: _Node, z: Tensor) -> None:
        self.call, self.node = call, node
        self.sources, self.opaque = _walk(node)
        self.head = call.tensors() if call is not None else [z]
        self.above = False  # after the start: the plain gradient
        self.start = False  # the target layer: R from the head's plain gradient
        self.contrastive = False

    def tensors(self) -> List[Tensor]:
        return self.head + self.sources

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        if self.call is None:
            return tensors[0].clone()
        return self.call.compute(*tensors[: len(self.head)])

    def plain(self, tensors: Sequence[Optional[Tensor]], grad: Tensor, needs: Sequence[bool],
              create_graph: bool) -> Tuple[Optional[Tensor], ...]:
        """The activation's true vector-Jacobian product (nothing for the layers below: they are reached through
        the model's own operations)."""
        width = len(self.head)
        inputs = [differentiable(t, create_graph) if t is not None and need else t
                  for t, need in zip(tensors[:width], needs[:width])]
        wanted = [t for t, need in zip(inputs, needs[:width]) if t is not None and need]
        found = iter(())
        if wanted:
            out = self.compute(*inputs)
            found = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype), create_graph=create_graph,
                                             allow_unused=True))
        return tuple(next(found) if t is not None and need else None for t, need in zip(inputs, needs[:width])) \
            + (None,) * (len(tensors) - width)

    def shared(self, tensors: Sequence[Optional[Tensor]], grad: Tensor, create_graph: bool) -> Tuple[Tensor, ...]:
        """``g`` of the layers below: the contributions' vector-Jacobian product with ``s + t c / |c|``."""
        z = tensors[0]
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        out = None if create_graph else self.kept_output()
        if out is None:
            out = self.compute(*tensors[: len(self.head)])
        z = (z if create_graph else z.detach()).to(dtype)
        relevance = (out.to(dtype) * grad.to(dtype)).sum(dim=1, keepdim=True)
        if self.start and self.contrastive and relevance[0, 0].numel() > 1:
            relevance = relevance - relevance.mean(dim=tuple(range(2, relevance.dim())), keepdim=True)
        replay = _Replay(dtype, create_graph)
        norm = z.square().sum(dim=1, keepdim=True)
        along = _divide(relevance * z, norm).unsqueeze(1)
        contributions, cotangents = [], []
        for u, b in replay(self.node):
            cotangent = along
            if b is not None:
                size = _channel_norm(u)
                share = _divide(relevance * (b * z).sum(dim=1, keepdim=True), size.sum(dim=1) * norm)
                cotangent = cotangent + share.unsqueeze(1) * _divide(u, size)
            contributions.append(u)
            cotangents.append(cotangent.expand_as(u))
        aliases = [replay.aliases[id(t)] for t in self.sources]
        grads = torch.autograd.grad(contributions, aliases, cotangents, create_graph=create_graph, allow_unused=True)
        return (None,) * len(self.head) + tuple(None if g is None else g.to(t.dtype)
                                                for g, t in zip(grads, self.sources))


class _Layer(torch.autograd.Function):
    """A point's forward, with two outputs sharing the activation: the one the model goes on with and the one the
    blocks above read as their layer.  Below the start a point's ``g`` is what the blocks above hand it (the model's
    own operations reach it only along paths around the target layer); the start's is the head's plain gradient."""

    @staticmethod
    def forward(ctx: Any, point: _Point, *tensors: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        ctx.save_for_backward(*tensors)
        ctx.point = point
        out = point.compute(*tensors)
        out = out.clone() if out._is_view() else out
        point.keep_output(out)
        return out, out.view_as(out)

    @staticmethod
    def backward(ctx: Any, model_grad: Tensor, layer_grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        tensors, point = ctx.saved_tensors, ctx.point
        create_graph = torch.is_grad_enabled()  # True in a backward with create_graph=True
        with torch.enable_grad():
            if point.state.plain:
                grads = point.plain(tensors, model_grad + layer_grad, ctx.needs_input_grad[1:], create_graph)
            elif point.above:
                grads = point.plain(tensors, model_grad, ctx.needs_input_grad[1:], create_graph)
            else:
                grads = point.shared(tensors, model_grad if point.start else layer_grad, create_graph)
        if not create_graph:
            grads = tuple(None if g is None else g.detach() for g in grads)
        return (None,) + grads


class _Gate(torch.autograd.Function):
    """The network's input as the model's own operations read it: during the relevance pass their gradient (paths
    around the target layer) does not reach it, only the blocks' replays' do; plain once the pass is done."""

    @staticmethod
    def forward(ctx: Any, state: RuleState, t: Tensor) -> Tensor:
        ctx.state = state
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[None, Optional[Tensor]]:
        return None, (grad if ctx.state.plain else None)


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
    (:class:`_Node`) and makes every elementwise activation a :class:`_Point` (see the module docstring), up to the
    target ``layer``: the activation whose output its last call returns starts the relevance, or, when the output is
    no activation's, a point added there.  The points after it (the head) keep their plain gradient.  A block below
    the start that holds an operation SRD cannot decompose raises, from :meth:`finish` at the end of the forward,
    with the module that ran it."""

    def __init__(self, model: nn.Module, layer: nn.Module, contrastive: bool = True) -> None:
        super().__init__()
        self.model, self.layer, self.contrastive = model, layer, contrastive
        self.state = RuleState()
        self.points: List[_Point] = []
        self.start: Optional[_Point] = None
        self._nodes: Dict[int, Tuple[Tensor, _Node]] = {}  # id -> (tensor, how it was computed)
        self._made: Dict[int, Tuple[Tensor, _Point]] = {}  # a point's output -> the point
        self._inputs: Dict[int, Tuple[Tensor, Tensor]] = {}  # the network's input -> (it, as the model reads it)
        self._running: List[nn.Module] = []
        self._handles: List[Any] = []

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
        node = self._node(output, register=False) or _Source(output)
        out = self._point(None, node, output)
        self.start = self.points[-1]
        return out

    # ------------------------------------------------------------------------------------------ bookkeeping
    def _node(self, t: Any, register: bool = True) -> Optional[_Node]:
        """How ``t`` was computed; a computed tensor not recorded is a layer of its own (the network's input)."""
        if not isinstance(t, Tensor):
            return None
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[1]
        if not register or not _computed(t):
            return None
        node = _Source(t)  # the network's input (or what an operation SRD does not record made of it)
        self._nodes[id(t)] = (t, node)
        gated = _Gate.apply(self.state, t)
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

    def _keep(self, t: Tensor, node: _Node) -> Tensor:
        self._nodes[id(t)] = (t, node)
        return t

    def _where(self) -> nn.Module:
        return self._running[-1] if self._running else self.model

    def _point(self, call: Optional[PassThrough], node: _Node, z: Tensor) -> Tensor:
        point = _Point(call, node, z)
        point.state = self.state
        out, layer = _Layer.apply(point, *point.tensors())
        self.points.append(point)
        self._made[id(out)] = (out, point)
        return self._keep(out, _Source(layer))

    # ------------------------------------------------------------------------------------------- dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = dict(kwargs or {})
        activation = func in ACTIVATION_FUNCTIONS and _feature_map(args)
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
            if isinstance(node, _Opaque):  # what is computed from an opaque tensor is opaque for the same reason
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
        return self._opaque(result, _Opaque(problem, self._where()), func, args)

    def _opaque(self, result: Any, opaque: _Opaque, func: Any, args: Sequence[Any]) -> Any:
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
        return self._keep(out, _Conv(node, out, weight, bound.get("bias"), _pair(bound.get("stride", 1)), pads,
                                     dilation, int(bound.get("groups", 1))))

    def _linear(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("input", "weight", "bias"))
        node = self._node(bound["input"])
        if node is None or bound["input"].dim() != 2:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, _Dense(node, out, bound["weight"], bound.get("bias")))

    def _batch_norm(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, _BATCH_NORM_ARGS)
        node = self._node(bound["input"])
        mean, var = bound.get("running_mean"), bound.get("running_var")
        if node is None or bound.get("training", False) or mean is None or var is None:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, _BatchNorm(node, out, mean, var, bound.get("weight"), bound.get("bias"),
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
        self._keep(out, _MaxPool(node, tuple(out.shape), indices, kernel, stride, (pw, pw, ph, ph), dilation))
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
            self._keep(out, _MaxPool(node, tuple(out.shape), indices, kernel, kernel, (0, 0, 0, 0), (1, 1)))
            wants_indices = kwargs.get("return_indices", len(args) > 2 and args[2])
            return (out, indices) if wants_indices else out
        out = func(x, wanted)
        pool = _AvgPool(node, tuple(out.shape), lambda t: F.adaptive_avg_pool2d(t, wanted), kernel, kernel,
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
        pool = _AvgPool(node, tuple(out.shape), lambda t: F.avg_pool2d(t, kernel, stride, (ph, pw), *rest), kernel,
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
        pool = _AvgPool(node, tuple(x.shape[:2]) + (1, 1), lambda t: F.adaptive_avg_pool2d(t, 1), tuple(x.shape[-2:]),
                        tuple(x.shape[-2:]), (0, 0, 0, 0))
        return self._keep(out, pool if out.dim() == 4 else _Reshape(pool, tuple(out.shape)))

    def _pad(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("input", "pad", "mode", "value"))
        x = bound["input"]
        node = self._node(x)
        if node is None or x.dim() < 3:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, _Pad(node, out, bound["pad"], bound.get("mode", "constant") or "constant",
                                    bound.get("value")))

    def _cat(self, func: Any, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        bound = _bind(args, kwargs, ("tensors", "dim"))
        tensors, dim = list(bound["tensors"]), bound.get("dim", 0)
        nodes = [self._node(t) for t in tensors]
        if not tensors or any(n is None for n in nodes) or tensors[0].dim() < 2 or dim % tensors[0].dim() != 1:
            return NotImplemented
        out = func(*args, **kwargs)
        return self._keep(out, _Cat(nodes, tuple(out.shape), [t.shape[1] for t in tensors]))

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
            return self._keep(result, node if same else _Reshape(node, tuple(result.shape)))
        return self._keep(result, _Opaque(f"a reshape to {tuple(result.shape)} ({func.__name__})", self._where()))

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
            node: _Node = _Affine(na, shape, scale=-1.0)
        elif kind == "mul":
            node = _Affine(na, shape, scale=b) if na is not None else _Affine(nb, shape, scale=a)
        elif kind == "div":
            node = _Affine(na, shape, scale=1.0 / b)
        else:  # result = ca * a + cb * b
            ca, cb = {"add": (1.0, alpha), "sub": (1.0, -alpha), "rsub": (-alpha, 1.0)}[kind]
            terms = [(n, c) for n, c in ((na, ca), (nb, cb)) if n is not None]
            parts = [n if c == 1 else _Affine(n, shape, scale=c) for n, c in terms]
            if len(parts) == 2:
                node = _Sum(parts, shape)
            else:
                constant = b if nb is None else a
                scale = terms[0][1]
                node = _Affine(terms[0][0], shape, scale=None if scale == 1 else scale,
                               shift=(cb if nb is None else ca) * constant)
        if in_place and isinstance(na, _Source) and (a is na.tensor or a._base is na.tensor or na.tensor._base is a):
            node = _Opaque(f"an in-place change of a layer's output ({func.__name__})", self._where())
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
    ICLR 2024, arXiv:2402.03348; checked against the authors' code (github.com/Sangyu-Han/SharingRatioDecomposition,
    ``util.py``'s ``cal_simmap_*`` and ``modules/``).

    A pointwise feature vector (PFV) is a feature map's channel vector at one position; the layers are the outputs of
    elementwise activations and the input.  A PFV ``z_j`` of the pre-activation of a layer is the sum of contributions
    ``c`` of PFVs ``v_i`` of the layers below, one per path through the affine block between (convolution offsets,
    max- or average-pooling offsets, residual branches), plus biases; the *sharing ratio* of a contribution is
    ``mu = <c + b_j |c| / sum_c' |c'|, z_j> / |z_j|^2`` (the bias of its branch shared in proportion to the
    contributions' norms, so the ratios of ``z_j`` sum to 1), and ``R_i = sum mu R_j`` over ``v_i``'s contributions.
    Inactive neurons count: ``z_j`` is the pre-activation.  Pooling is part of the block it feeds, not a layer.  At
    ``target_layer`` each PFV starts with ``R_j = <A_j, dy/dA_j>`` (the head's plain gradient; the PFV's contribution
    to the logit on a global-average-pooling + linear head), minus its mean over the layer's positions with
    ``contrastive`` (the authors' default ``contrastive_rule``).  The map is the relevance of the input's PFVs, the
    pixels, (B, 1, H, W); it sums to the start's total (0 when contrastive; the logit less the head's bias on such a
    head otherwise) wherever no branch of a block reads only zero PFVs at a position.

    ``target_layer`` (a dotted name or module; ``None``: the library's default CAM layer, stepping back over a
    trailing pooling, see :func:`srd_default_layer`): the paper's experiments use conv5_3 for VGG16 and the average
    pooling's input for ResNet-50, which this default picks on torchvision's models.  A module called several times
    starts at its last call.  Only the target layer's relevance is decomposed: paths around it (a branch beside it)
    add nothing.  ``contrastive`` (default True, the authors' code): the map is signed and sums to 0, positive on
    what speaks for the target more than the layer's average position, negative elsewhere (another object's region);
    measures of ``|map|`` count both, use ``contrastive=False`` for them.  Operations SRD cannot decompose in a block
    below ``target_layer`` (layer or group norms, attention, softmax, products of feature maps such as
    squeeze-and-excitation gates, reshapes) raise a ValueError naming the module; token models are refused so.

    Cost: one forward and one backward in which every block below ``target_layer`` is replayed on its contributions,
    one entry per path (9 per 3x3 convolution, 36 for a 2x2 max pooling and a 3x3 convolution, 81 for ResNet's stem
    pooling and a 3x3 convolution): about 6-7 times a forward and input gradient on ResNet-50 and VGG16 (CPU,
    128x128, one thread), and that many times a block's activations in memory while it is replayed.

    Deliberate differences from the authors' code: any architecture made of the operations above, batched (theirs:
    VGG16 and ResNet-50, one image at a time); max pooling takes the forward's arg-max (theirs compares values,
    counting ties twice); the batch-norm shift is the exact ``beta - gamma mean / sqrt(var + eps)`` (theirs drops
    ``eps`` there); guarded divisions give 0 where a norm is 0 (theirs add 1e-12, or divide 0 by 0 for a branch
    whose PFVs are all 0); the start is ``<A_j, dy/dA_j>`` on every head (theirs: the same on ResNet-50, the clamped
    Grad-CAM map at conv5_3 on VGG16); a block's own bias after a sum of branches is shared by all of them and a
    concatenation keeps its inputs' branches (the authors' models have neither).  The paper's method section could
    not be read offline: the formulas follow the authors' released code.
    """

    kind = "cam"
    argmax_on_rows = True
    plain_after_rules = True
    defaults = {"target_layer": None, "contrastive": True}

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

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, contrastive: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be a bool, got {contrastive!r}")
        self._layer, self._contrastive = self._target_layer(x, target_layer), contrastive
        try:
            total = self._integrate(x, target, 1, lambda owners, _: (x[owners], x[owners]), batch_size, create_graph)
            return total.sum(dim=1, keepdim=True)  # R_i = <x_i, g_i>: the relevance of each pixel's PFV
        finally:
            for name in ("_layer", "_contrastive", "_mode"):
                self.__dict__.pop(name, None)

    def _backward_rules(self) -> SRDRules:
        self._mode = SRDRules(self.model, self._layer, self._contrastive)
        return self._mode
