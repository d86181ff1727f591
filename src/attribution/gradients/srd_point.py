"""SRD's rule at each layer: the sharing ratios of a pre-activation's contributions, applied as a backward.

Sharing ratio.  A contribution's share of ``z_j`` is its projection on ``z_j``: ``mu = <c + beta_c, z_j> / |z_j|^2``,
where ``beta_c = b_j |c| / sum_c' |c'|`` is its part of the bias ``b_j`` of its branch, shared in proportion to the
contributions' norms (the authors' ``bias_bunbae``); a residual branch's bias is shared within the branch, an
operation's own bias among every contribution through it, and a branch's bias where all its contributions are 0 (a zero
batch-norm weight) among every contribution of ``z_j`` (the authors divide 0 by 0 there).  The ratios of one ``z_j``
then sum to 1 and relevance is conserved layer by layer: ``R_i = sum mu R_j`` over every contribution of ``v_i``.
Inactive neurons count: ``z_j`` is the pre-activation, negative channels included (the paper's APOP observation).

As a backward.  Each contribution is linear in its one PFV and so is its norm, so ``R_i = <v_i, g_i>`` (Euler) with
``g`` the vector-Jacobian product of the contributions with the cotangent ``s_j + t_j c / |c|``,
``s_j = R_j z_j / |z_j|^2`` and ``t_j = R_j <b_j, z_j> / (|z_j|^2 sum_c' |c'|)``.  While
:class:`~attribution.gradients.srd_rules.SRDRules` is active around the forward it records, for every tensor between
layers, how it was computed from layers (:class:`~attribution.gradients.srd_graph.Node`); each activation becomes a
:class:`Point` whose backward replays its block on the contributions (one entry per path), applies that cotangent and
hands ``g`` straight to the layers below, and whose forward is the activation itself (:class:`Layer`: one output for
the model's own operations, one for the blocks' replays, so that only the replays' ``g`` counts below the start;
:class:`Gate` does the same for the network's input).  The plain derivative takes over once the relevance pass is
done (``create_graph``).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..cam.base import safe_divide
from ..core.rules import Operation, PassThrough, RuleState, differentiable
from .srd_graph import Node, Replay, walk


def _channel_norm(u: Tensor) -> Tensor:
    """``|u|`` over the channels (dimension 2 of a contribution tensor), with a derivative of 0 at 0."""
    square = u.square().sum(dim=2, keepdim=True)
    positive = square > 0
    root = torch.where(positive, square, torch.ones_like(square)).sqrt()
    return torch.where(positive, root, torch.zeros_like(square))


def _bias_shares(groups: Sequence[Tuple[Tensor, Optional[Tensor]]], sizes: Sequence[Tensor], z: Tensor,
                 relevance: Tensor, norm: Tensor) -> List[Optional[Tensor]]:
    """Each branch's ``t_j = R_j <b, z_j> / (|z_j|^2 sum_c' |c'|)`` (B, 1, *spatial), the sum over the branch's own
    contributions; None for a branch with no bias.  Where every contribution of a branch is 0 (a residual branch
    whose last batch norm has a zero weight, pruned channels) its bias is shared by every contribution of ``z_j``
    instead, in proportion to their norms, so that no relevance is lost."""
    totals = [size.sum(dim=1) for size in sizes]
    projections = [None if b is None else (b * z).sum(dim=1, keepdim=True) for _, b in groups]
    orphans = [torch.where(total > 0, torch.zeros_like(p), p) for p, total in zip(projections, totals) if p is not None]
    extra = safe_divide(relevance * sum(orphans), sum(totals) * norm) if orphans else None
    shares: List[Optional[Tensor]] = []
    for projection, total in zip(projections, totals):
        share = None if projection is None else safe_divide(relevance * projection, total * norm)
        shares.append(extra if share is None else share if extra is None else share + extra)
    return shares


# ------------------------------------------------------------------------------------------------- the layers
class Point(Operation):
    """An SRD layer: an elementwise activation ``v = act(z)`` (``call``), or, at a target layer whose output is no
    activation's, that output itself (``z = v``).  Its backward takes ``R_j = <v_j, g_j>`` for the vector ``g``
    reaching ``v`` and hands the layers its block reads (``sources``) their ``g`` (see the module docstring); above
    the start, or once the relevance pass is done, the plain derivative."""

    keeps_output = True

    def __init__(self, call: Optional[PassThrough], node: Node, z: Tensor) -> None:
        self.call, self.node = call, node
        self.sources, self.opaque = walk(node)
        self.head = call.tensors() if call is not None else [z]
        self.above = False  # after the start: the plain gradient
        self.start = False  # the target layer: R from the head's plain gradient
        self.contrastive = False

    def tensors(self) -> List[Tensor]:
        """What :class:`Layer` is called on: the activation's tensors (``z`` first), then the layers its block reads."""
        return self.head + self.sources

    def compute(self, *tensors: Optional[Tensor]) -> Tensor:
        """The activation ``v`` (a copy of ``z`` for a point added at a target layer)."""
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
        replay = Replay(dtype, create_graph)
        norm = z.square().sum(dim=1, keepdim=True)
        along = safe_divide(relevance * z, norm).unsqueeze(1)
        groups = replay(self.node)
        sizes = [_channel_norm(u) for u, _ in groups]
        contributions, cotangents = [], []
        for (u, _), size, share in zip(groups, sizes, _bias_shares(groups, sizes, z, relevance, norm)):
            cotangent = along if share is None else along + share.unsqueeze(1) * safe_divide(u, size)
            contributions.append(u)
            cotangents.append(cotangent.expand_as(u))
        aliases = [replay.aliases[id(t)] for t in self.sources]
        grads = torch.autograd.grad(contributions, aliases, cotangents, create_graph=create_graph, allow_unused=True)
        return (None,) * len(self.head) + tuple(None if g is None else g.to(t.dtype)
                                                for g, t in zip(grads, self.sources))


class Layer(torch.autograd.Function):
    """A point's forward, with two outputs sharing the activation: the one the model goes on with and the one the
    blocks above read as their layer.  Below the start a point's ``g`` is what the blocks above hand it (the model's
    own operations reach it only along paths around the target layer); the start's is the head's plain gradient."""

    @staticmethod
    def forward(ctx: Any, point: Point, *tensors: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
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


class Gate(torch.autograd.Function):
    """The network's input as the model's own operations read it: during the relevance pass their gradient (paths
    around the target layer) does not reach it, only the blocks' replays' do; plain once the pass is done."""

    @staticmethod
    def forward(ctx: Any, state: RuleState, t: Tensor) -> Tensor:
        ctx.state = state
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[None, Optional[Tensor]]:
        return None, (grad if ctx.state.plain else None)
