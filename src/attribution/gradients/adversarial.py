"""Shared machinery of the adversarial-path methods (MFABA, AGI): walkers that step away from the target class.

A *walker* starts at an image and takes up to ``steps`` steps; at each point ``p_k`` one forward gives the model's
prediction and the scores, and input-gradient backwards give the gradient of the target's score ``s_t`` and, when
the walker has a *guide* class ``j`` (AGI's false class), of ``s_j``.  A method supplies

* ``move(p_k, x, direction, walkers) -> p_{k+1}``: the step, from the gradient that sets the direction (the
  guide's, else the target's), e.g. a signed step ``x + eps * sign(grad)`` (:func:`signed_step`) clipped to
  ``bounds`` (``walkers``: the walkers' indices, for steps that differ between walkers);
* ``stop(predicted, walkers, k) -> mask``: the walkers that stop at ``p_k`` before stepping (at the boundary);

and the walk sums, into each walker's image, ``-grad s_t(p_k) * (p_{k+1} - r_k)`` over the steps taken, with
``r_k = p_k`` (a path sum, MFABA) or ``r_k = x`` (each step measured from the image, AGI's code).  A method that
needs the walkers' end points instead (an attack, BIG) runs :meth:`AdversarialPathExplainer._advance` itself.

All walkers of all images advance together: each iteration evaluates the walkers still moving, ``batch_size``
rows per pass (:class:`~attribution.core.batching.RowPlanner`), so a call costs at most ``steps`` passes over the
walkers whatever the number of images.  The points are constants (detached), as in the authors' code; with
``create_graph`` only the gradients in the sum carry the graph w.r.t. the model's parameters.

Methods whose step follows the gradient averaged over randomly transformed copies of each point (the transfer
attacks of AttEXplore) get that average from :meth:`AdversarialPathExplainer._mean_copy_gradients`, which runs the
copies of all points ``batch_size`` rows per pass.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype

Bounds = Optional[Tuple[float, float]]
#: ``(p_k, x, direction, walkers) -> p_{k+1}`` for a chunk of walkers (``x``: each walker's image, ``walkers``:
#: their indices)
Move = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
#: ``(predicted classes, walker indices, iteration k) -> bool mask`` of the walkers that stop at ``p_k``
Stop = Callable[[Tensor, Tensor, int], Tensor]


def check_bounds(bounds: Any) -> Bounds:
    """``None`` (no clipping) or a pair ``(low, high)`` of numbers with ``low < high``; else a ValueError."""
    if bounds is None:
        return None
    pair = tuple(bounds) if isinstance(bounds, (list, tuple)) else ()
    if (len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in pair)
            or not pair[0] < pair[1]):
        raise ValueError(f"bounds must be None or a pair (low, high) of numbers with low < high, got {bounds!r}")
    return float(pair[0]), float(pair[1])


def clip(points: Tensor, bounds: Bounds) -> Tensor:
    """``points`` clipped to ``bounds`` (unchanged for ``None``)."""
    return points if bounds is None else points.clamp(bounds[0], bounds[1])


def signed_step(origin: Tensor, direction: Tensor, size: float, bounds: Bounds) -> Tensor:
    """``clip(origin + size * sign(direction))``: the signed (L-infinity steepest) step, ``size`` < 0 descends."""
    return clip(origin + size * direction.sign(), bounds)


class AdversarialPathExplainer(GradientExplainer):
    """Base of the methods that sum gradients along paths driven towards a decision boundary (see the module)."""

    def _walk(
        self,
        x: Tensor,
        target: Target,
        owners: Tensor,
        *,
        steps: int,
        move: Move,
        stop: Optional[Stop],
        guides: Optional[Tensor] = None,
        from_image: bool = False,
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        """``sum_k -grad s_t(p_k) * (p_{k+1} - r_k)`` per image (B, C, H, W) over walkers starting at ``x[owners]``.

        ``guides`` (n,) gives each walker a class whose score's gradient sets the direction (else the target's);
        ``from_image`` measures each step from the image (``r_k = x``) instead of from ``p_k``.
        """
        total = torch.zeros(x.shape, dtype=accumulation_dtype(x), device=x.device)
        if owners.shape[0] == 0:
            return total
        points = x[owners].clone()
        for index, label, old, new in self._advance(x, target, owners, points, steps=steps, move=move, stop=stop,
                                                    guides=guides, batch_size=batch_size, create_graph=create_graph):
            step = (new - (x[owners[index]] if from_image else old)).to(total.dtype)
            contribution = -step * label.to(total.dtype)
            # out of place only when the sum must stay differentiable
            total = (total.index_add(0, owners[index], contribution) if create_graph
                     else total.index_add_(0, owners[index], contribution))
        return total

    def _other_classes_setup(self, x: Tensor, target: Target, walks_to: str) -> Tuple[Tensor, int]:
        """The target's classes and the model's class count (one forward of one image), for a method whose walks
        go to other classes (``walks_to``: its sentence subject for the error a callable target gets)."""
        if target.classes is None:
            raise ValueError(f"{walks_to} towards classes other than the target, so it needs class indices as the "
                             "target, not a callable")
        with torch.no_grad():
            return target.classes, self._forward(x[:1]).shape[-1]

    def _advance(
        self,
        x: Tensor,
        target: Target,
        owners: Tensor,
        points: Tensor,
        *,
        steps: int,
        move: Move,
        stop: Optional[Stop],
        guides: Optional[Tensor] = None,
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Moves the walkers' ``points`` (n, C, H, W; in place, starting at their images ``x[owners]``) for up to
        ``steps`` iterations; yields, for each chunk of walkers moved, ``(walkers, grad s_t(p_k), p_k, p_{k+1})``
        (the target's gradient with the graph when ``create_graph``).  On exhaustion ``points`` holds where each
        walker stopped.  ``stop=None``: every walker takes every step (no boolean selection, which would wait for
        the device)."""
        count = owners.shape[0]
        if count == 0:
            return
        guide_target = None if guides is None else Target(count, target.score, classes=guides)
        alive = torch.arange(count, device=x.device)
        planner = RowPlanner(count, batch_size, x.device)
        for k in range(steps):
            if alive.numel() == 0:
                break
            planner.total = alive.numel()  # the walkers still moving; the pass size found so far is kept
            moving = []
            for a, b in planner:
                index = alive[a:b]
                predicted, label, direction = self._path_gradients(
                    points[index], owners[index], target, index, guide_target, create_graph, planner)
                if stop is not None:
                    go = ~stop(predicted, index, k)
                    index, label, direction = index[go], label[go], direction[go]
                old = points[index]
                new = move(old, x[owners[index]], direction.detach().to(old.dtype), index).detach()
                points[index] = new
                moving.append(index)
                yield index, label, old, new
            alive = torch.cat(moving)

    def _mean_copy_gradients(
        self,
        points: Tensor,
        copies: int,
        prepare: Callable[[int, int], Tensor],
        transform: Callable[[Tensor, Tensor], Tensor],
        loss: Callable[[Tensor, Tensor], Tensor],
        planner: RowPlanner,
        create_graph: bool,
    ) -> Tensor:
        """``mean_c grad_u loss(f(transform(u, c)))`` at ``u = u_{i,c}``, per point ``i`` of ``points`` (n, C, H, W),
        in the accumulation dtype (with the graph w.r.t. the parameters when ``create_graph``).

        Rows are copy-major (row ``r``: copy ``r // n`` of point ``r % n``), ``planner`` (over ``n * copies`` rows,
        kept from call to call) sets the rows per pass.  ``prepare(start, stop)`` returns rows ``start:stop``, the
        inputs ``u`` at which the gradient is taken (made from the points however the method likes: they are
        detached here); ``transform(u, copy)`` (``copy``: each row's copy index) is the part of the transform the
        gradient goes through, and ``loss(outputs, owners)`` the per-row objective (``owners``: each row's point).
        """
        count = points.shape[0]
        total = torch.zeros(points.shape, dtype=accumulation_dtype(points), device=points.device)
        for start, stop in planner:
            index = torch.arange(start, stop, device=points.device)
            copy, owners = index // count, index % count
            rows = prepare(start, stop).detach().requires_grad_(True)
            with planner.recording(rows), self._backward_rules():
                outputs = self._forward(transform(rows, copy))
            (grads,) = torch.autograd.grad(loss(outputs, owners).sum(), rows, create_graph=create_graph,
                                           allow_unused=True)
            grads = torch.zeros_like(rows) if grads is None else grads
            # out of place only when the sum must stay differentiable
            total = (total.index_add(0, owners, grads.to(total.dtype)) if create_graph
                     else total.index_add_(0, owners, grads.to(total.dtype)))
        return total / copies

    def _path_gradients(
        self,
        points: Tensor,
        owners: Tensor,
        target: Target,
        walkers: Tensor,
        guide_target: Optional[Target],
        create_graph: bool,
        planner: RowPlanner,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """One forward of ``points``: the predicted classes, the gradient of the target's score (with the graph
        when ``create_graph``) and the gradient that sets the direction (the guide's score's, else the same)."""
        rows = self._model_input(points.detach()).requires_grad_(True)
        with planner.recording(rows), self._backward_rules():
            outputs = self._forward(rows)
        predicted = outputs.detach().argmax(dim=1)
        direction = None
        if guide_target is not None:
            guide = guide_target(outputs, walkers)
            (direction,) = torch.autograd.grad(guide.sum(), rows, retain_graph=True, allow_unused=True)
            direction = torch.zeros_like(rows) if direction is None else direction
        (label,) = torch.autograd.grad(target(outputs, owners).sum(), rows, create_graph=create_graph,
                                       allow_unused=True)
        label = torch.zeros_like(rows) if label is None else label
        return predicted, label, label if direction is None else direction
