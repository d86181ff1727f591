"""SRD's recorded blocks: how a pre-activation decomposes into contributions, path by path.

Layers and blocks.  A *layer* is the output ``v = act(z)`` of an elementwise activation (ReLU, ...) or the network's
input; a *pointwise feature vector* (PFV) ``v_i`` is its channel vector at one position.  Between a layer and the next
activation's pre-activation ``z`` the network is affine: convolutions, batch norms in eval mode, max pooling (its
selection fixed by the forward), average pooling, padding, sums of residual branches, concatenation along the
channels.  Pooling is no layer: its output is part of the block it feeds (the authors' VGG and ResNet code propagate
from a ReLU through the max pooling and the next convolution at once).  So ``z_j`` is a sum of *contributions* ``c``,
each the image of one PFV ``v_i`` of a layer below along one path (one convolution offset, one pooling offset, ...),
plus biases (convolution biases, batch-norm shifts).

Here a :class:`Node` records how a tensor between layers was computed from layers (:class:`Source`), or that it was
computed by an operation SRD cannot decompose (:class:`Opaque`); its :meth:`~Node.groups` replays the operation on its
inputs' contributions, the branches kept apart (:data:`Group`: one entry per path, :func:`_offsets` for the
sliding operations), each with the bias of its branch.  :class:`Replay` holds one replay's state and :func:`walk`
lists the layers a block reads.  The nodes are recorded by :class:`~attribution.gradients.srd_rules.SRDRules` and
replayed by :class:`~attribution.gradients.srd_point.Point`, which turns the contributions into sharing ratios.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.rules import differentiable

#: one branch of a block's contributions: ``U`` (B, P, C, *spatial), each of its P entries one PFV's contribution along
#: one path, and the branch's bias (1 or B, C, *spatial), or None
Group = Tuple[Tensor, Optional[Tensor]]
Number = Union[float, Tensor]


# ------------------------------------------------------------------------------------------- path helpers
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
class Replay:
    """One replay of a block on contributions: the layers' aliases (differentiated against), the parameters in the
    computing dtype (in the graph only under ``create_graph``), each node's groups computed once."""

    def __init__(self, dtype: torch.dtype, create_graph: bool) -> None:
        self.dtype, self.create_graph = dtype, create_graph
        self.aliases: Dict[int, Tensor] = {}
        self._done: Dict[int, List[Group]] = {}

    def alias(self, t: Tensor) -> Tensor:
        """The layer ``t`` as this replay differentiates against it (one alias per layer), in the computing dtype."""
        if id(t) not in self.aliases:
            self.aliases[id(t)] = differentiable(t, self.create_graph)
        return self.aliases[id(t)].to(self.dtype)

    def param(self, value: Any) -> Any:
        """A parameter or constant in the computing dtype, detached unless ``create_graph`` (numbers unchanged)."""
        if not isinstance(value, Tensor):
            return value
        return (value if self.create_graph else value.detach()).to(self.dtype)

    def __call__(self, node: "Node") -> List[Group]:
        """``node``'s groups, computed once per replay."""
        if id(node) not in self._done:
            self._done[id(node)] = node.groups(self)
        return self._done[id(node)]


class Node:
    """How a tensor between layers was computed from layers: :meth:`groups` maps its inputs' contributions to its
    own.  ``shape`` is the tensor's."""

    inputs: Tuple["Node", ...] = ()
    shape: Tuple[int, ...] = ()

    def groups(self, replay: Replay) -> List[Group]:
        """This tensor's contributions, one group per branch, from its inputs' (read through ``replay``)."""
        raise NotImplementedError


class Source(Node):
    """A layer (an activation's output, the network's input): each PFV is its own contribution."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor, self.shape = tensor, tuple(tensor.shape)

    def groups(self, replay: Replay) -> List[Group]:
        return [(replay.alias(self.tensor).unsqueeze(1), None)]


class Opaque(Node):
    """The output of an operation SRD cannot decompose (:func:`~attribution.gradients.srd_rules.unsupported` says
    why), and the module that ran it."""

    def __init__(self, problem: str, module: nn.Module) -> None:
        self.problem, self.module = problem, module

    def groups(self, replay: Replay) -> List[Group]:
        raise RuntimeError(f"SRD cannot decompose {self.problem}")


class Conv(Node):
    """``F.conv2d``: every kernel offset a path; the bias belongs to every contribution through the convolution."""

    def __init__(self, node: Node, out: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Tuple[int, int],
                 pads: Tuple[int, int, int, int], dilation: Tuple[int, int], groups: int) -> None:
        self.inputs, self.shape = (node,), tuple(out.shape)
        self.weight, self.bias, self.stride, self.pads, self.dilation, self.ngroups = \
            weight, bias, stride, pads, dilation, groups

    def groups(self, replay: Replay) -> List[Group]:
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


class Dense(Node):
    """``F.linear`` on (B, C) rows: the row is one PFV."""

    def __init__(self, node: Node, out: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
        self.inputs, self.shape, self.weight, self.bias = (node,), tuple(out.shape), weight, bias

    def groups(self, replay: Replay) -> List[Group]:
        weight = replay.param(self.weight)
        result = [(u @ weight.T, None if b is None else b @ weight.T) for u, b in replay(self.inputs[0])]
        return _merged(result, None if self.bias is None else replay.param(self.bias).view(1, -1))


class BatchNorm(Node):
    """``F.batch_norm`` in eval mode: per channel ``scale * x + shift``, the shift a bias."""

    def __init__(self, node: Node, out: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float) -> None:
        self.inputs, self.shape = (node,), tuple(out.shape)
        self.mean, self.var, self.weight, self.bias, self.eps = mean, var, weight, bias, eps

    def groups(self, replay: Replay) -> List[Group]:
        view = (1, -1) + (1,) * (len(self.shape) - 2)
        scale = (replay.param(self.var) + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * replay.param(self.weight)
        shift = -replay.param(self.mean) * scale
        if self.bias is not None:
            shift = shift + replay.param(self.bias)
        return _affine(replay(self.inputs[0]), scale.view(view), shift.view(view))


class Affine(Node):
    """Elementwise arithmetic with constants: ``scale * x + shift`` (a constant added is a bias)."""

    def __init__(self, node: Node, shape: Tuple[int, ...], scale: Optional[Number] = None,
                 shift: Optional[Number] = None) -> None:
        self.inputs, self.shape, self.scale, self.shift = (node,), shape, scale, shift

    def groups(self, replay: Replay) -> List[Group]:
        scale = _aligned(replay.param(self.scale), len(self.shape))
        shift = _aligned(replay.param(self.shift), len(self.shape))
        if shift is not None and not isinstance(shift, Tensor):
            shift = torch.full((1,) * len(self.shape), float(shift), dtype=replay.dtype)
        groups = replay(self.inputs[0])
        if isinstance(shift, Tensor):
            shift = shift.to(groups[0][0].device)
        return _affine(groups, scale, shift)


class Sum(Node):
    """A sum of computed tensors (residual connections): the branches stay apart, each with its own bias."""

    def __init__(self, nodes: Sequence[Node], shape: Tuple[int, ...]) -> None:
        self.inputs, self.shape = tuple(nodes), shape

    def groups(self, replay: Replay) -> List[Group]:
        result = []
        for node in self.inputs:
            for u, b in replay(node):
                result.append((u.expand(*u.shape[:2], *self.shape[1:]), b))
        return result


class Cat(Node):
    """``torch.cat`` along the channels: each input's contributions and biases padded with zeros."""

    def __init__(self, nodes: Sequence[Node], shape: Tuple[int, ...], sizes: Sequence[int]) -> None:
        self.inputs, self.shape, self.sizes = tuple(nodes), shape, tuple(sizes)

    def groups(self, replay: Replay) -> List[Group]:
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


class MaxPool(Node):
    """Max pooling: every window offset a path, each channel taken where the forward took its maximum."""

    def __init__(self, node: Node, shape: Tuple[int, ...], indices: Tensor, kernel: Tuple[int, int],
                 stride: Tuple[int, int], pads: Tuple[int, int, int, int], dilation: Tuple[int, int]) -> None:
        self.inputs, self.shape, self.in_shape = (node,), shape, node.shape
        self.indices, self.kernel, self.stride, self.pads, self.dilation = indices, kernel, stride, pads, dilation

    def groups(self, replay: Replay) -> List[Group]:
        groups, (height, width), out_hw = replay(self.inputs[0]), self.in_shape[-2:], self.shape[-2:]
        device = groups[0][0].device
        # flat positions counted from 1 (0 is the padding), in int64 like the indices: exact, and on every device
        positions = torch.arange(1, height * width + 1, device=device, dtype=torch.int64).view(1, 1, height, width)
        index = self.indices + 1
        taken = [(where == index).to(replay.dtype)
                 for where in _offsets(positions, self.kernel, self.stride, self.pads, self.dilation, out_hw)]
        flat = self.indices.flatten(2)
        biases = [None if b is None else _full(b, self.indices.shape[:1] + self.in_shape[1:]).expand(
            flat.shape[0], -1, -1, -1).flatten(2).gather(2, flat).view(self.shape) for _, b in groups]
        return list(zip(_windows(groups, taken, self.kernel, self.stride, self.pads, self.dilation, out_hw), biases))


class AvgPool(Node):
    """Average pooling (plain, adaptive with equal windows, a mean over the positions): every window offset a path
    weighted by its window's divisor."""

    def __init__(self, node: Node, shape: Tuple[int, ...], pool: Callable[[Tensor], Tensor],
                 kernel: Tuple[int, int], stride: Tuple[int, int], pads: Tuple[int, int, int, int]) -> None:
        self.inputs, self.shape, self.in_shape = (node,), shape, node.shape
        self.pool, self.kernel, self.stride, self.pads = pool, kernel, stride, pads

    def groups(self, replay: Replay) -> List[Group]:
        groups, out_hw = replay(self.inputs[0]), self.shape[-2:]
        ones = torch.ones(1, 1, *self.in_shape[-2:], device=groups[0][0].device, dtype=replay.dtype)
        inside = _offsets(ones, self.kernel, self.stride, self.pads, (1, 1), out_hw)
        weight = self.pool(ones) / torch.stack(inside).sum(dim=0).clamp_min(1)
        contributions = _windows(groups, [part * weight for part in inside], self.kernel, self.stride, self.pads,
                                 (1, 1), out_hw)
        biases = [None if b is None else self.pool(_full(b, (0,) + self.in_shape[1:])) for _, b in groups]
        return list(zip(contributions, biases))


class Pad(Node):
    """``F.pad``: positions copied (or zero); a non-zero constant fill is a bias."""

    def __init__(self, node: Node, out: Tensor, pad: Sequence[int], mode: str, value: Optional[float]) -> None:
        self.inputs, self.shape, self.pad, self.mode, self.value = (node,), tuple(out.shape), tuple(pad), mode, value

    def groups(self, replay: Replay) -> List[Group]:
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


class Reshape(Node):
    """(B, C, 1, ..., 1) <-> (B, C): the PFV is unchanged."""

    def __init__(self, node: Node, shape: Tuple[int, ...]) -> None:
        self.inputs, self.shape = (node,), shape

    def groups(self, replay: Replay) -> List[Group]:
        shape = self.shape[1:]
        return [(u.reshape(*u.shape[:2], *shape), None if b is None else b.reshape(b.shape[0], *shape))
                for u, b in replay(self.inputs[0])]


def walk(node: Node) -> Tuple[List[Tensor], Optional[Opaque]]:
    """The layers a block reads (each once) and the first operation in it that SRD cannot decompose, if any."""
    sources: Dict[int, Tensor] = {}
    opaque: List[Opaque] = []
    seen = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, Source):
            sources.setdefault(id(current.tensor), current.tensor)
        elif isinstance(current, Opaque):
            opaque.append(current)
        stack.extend(current.inputs)
    return list(sources.values()), (opaque[0] if opaque else None)
