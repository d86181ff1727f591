"""Shared machinery of the gradient family: input gradients of many rows, batched, and sums along paths.

Every gradient method here is a weighted sum of input gradients at points derived from each image::

    A_i = post_i * sum_k  coeff_{i,k} * grad f_{t_i}(p_{i,k})

(vanilla gradient: one point, the image; IG: points on the straight line, coeff = quadrature weight, post = x - b;
Blur IG: points on the blur path, coeff = -dsigma * dblur/dsigma).  :meth:`GradientExplainer._integrate` evaluates
the B x K rows in chunks of ``batch_size`` with one forward and one input-gradient backward each
(``torch.autograd.grad`` w.r.t. the rows only: no parameter gradients are formed or accumulated).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, ContextManager, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import COMMON_OPTIONS, Explainer, optional_generator
from ..core.registry import MethodSpec, resolve_method
from ..core.targets import Target

PointFn = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def important_direction(grads: Tensor) -> Tensor:
    """``g^2 / |g|^2`` per row of ``grads`` (n, ...): the share of each feature in the squared gradient norm, the
    unit of IDGI's step (zero for a zero gradient)."""
    square = grads.square()
    norm = square.flatten(1).sum(1).view((-1,) + (1,) * (grads.dim() - 1))
    return torch.where(norm > 0, square / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(square))


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """Sums are kept in float64 for float64 input, float32 otherwise (also for fp16/bf16 models)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class GradientExplainer(Explainer):
    """Base class of methods built from input gradients; returns (B, C, H, W) signed attributions."""

    kind = "gradient"
    #: the options that may hold one tensor per image (leading dimension B, e.g. a (B, C, H, W) baseline): a
    #: method run on copies of the images (SmoothGrad's noisy rows) gets them repeated with the images, see
    #: :func:`per_image_rows`
    per_image_options: Tuple[str, ...] = ()

    #: True when :meth:`_backward_rules` gives a rule mode (:mod:`attribution.core.rules`) whose operations should
    #: differentiate plainly once the input gradient is taken (relevance methods: a map made with ``create_graph``
    #: then has the true derivative w.r.t. the parameters)
    plain_after_rules: ClassVar[bool] = False

    def _backward_rules(self) -> ContextManager[Any]:
        """Context that changes how gradients flow through the model (guided backprop); none by default."""
        return contextlib.nullcontext()

    def _scores_and_input_gradients(
        self,
        rows: Tensor,
        owners: Tensor,
        target: Target,
        create_graph: bool = False,
        planner: Optional[RowPlanner] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Each row's target score (float32 or float64) and its gradient w.r.t. the row (the rows' dtype).  With
        :attr:`plain_after_rules`, the rules' operations differentiate plainly once the gradient is taken."""
        rows = self._model_input(rows.detach()).requires_grad_(True)
        rules = self._backward_rules()
        try:
            with planner.recording(rows) if planner is not None else contextlib.nullcontext(), rules:
                outputs = self._forward(rows)
            scores = target(outputs, owners)
            (grads,) = torch.autograd.grad(scores.sum(), rows, create_graph=create_graph, allow_unused=True)
        finally:
            if self.plain_after_rules:
                rules.state.plain = True
        return scores if create_graph else scores.detach(), torch.zeros_like(rows) if grads is None else grads

    def _integrate(
        self,
        x: Tensor,
        target: Target,
        steps: int,
        points: PointFn,
        batch_size: Optional[int],
        create_graph: bool,
        idgi: bool = False,
    ) -> Tensor:
        """``sum_k coeff * grad`` over ``steps`` points per image, evaluated ``batch_size`` rows at a time.

        ``points(owners, step)`` gets (n,) image indices and (n,) step indices and returns the points (n, C, H, W)
        and their coefficients (broadcastable to the points).  Rows are ordered image-major.  With ``idgi`` the
        points must run along a path from its start to the image, their coefficients are ignored, and the sum is
        IDGI's ``sum_k important_direction(grad_k) * (f(p_{k+1}) - f(p_k))`` (see :mod:`.idgi`); the previous
        row's direction and score carry over from one pass to the next.
        """
        batch = x.shape[0]
        total = torch.zeros(x.shape, dtype=accumulation_dtype(x), device=x.device)
        planner = RowPlanner(batch * steps, batch_size, x.device)
        before: Optional[Tuple[Tensor, Tensor]] = None  # the last row's (direction, score), for the next pass
        for start, stop in planner:
            index = torch.arange(start, stop, device=x.device)
            owners, step = index // steps, index % steps
            rows, coeff = points(owners, step)
            scores, grads = self._scores_and_input_gradients(rows, owners, target, create_graph, planner)
            if idgi:
                direction, scores = important_direction(grads.to(total.dtype)), scores.to(total.dtype)
                if before is None:
                    before = (torch.zeros_like(direction[:1]), torch.zeros_like(scores[:1]))
                previous = torch.cat([before[0], direction[:-1]]), torch.cat([before[1], scores[:-1]])
                change = torch.where(step > 0, scores - previous[1], torch.zeros_like(scores))
                contribution = previous[0] * change.view((-1,) + (1,) * (direction.dim() - 1))
                before = direction[-1:], scores[-1:]
            else:
                contribution = coeff * grads.to(total.dtype)
            # out of place only when the sum must stay differentiable
            total = total.index_add(0, owners, contribution) if create_graph else total.index_add_(0, owners, contribution)
        return total

    def _gradient_at_input(self, x: Tensor, target: Target, batch_size: Optional[int], create_graph: bool) -> Tensor:
        """Plain input gradients of the images themselves."""
        ones = torch.ones((), dtype=accumulation_dtype(x), device=x.device)
        return self._integrate(x, target, 1, lambda owners, _: (x[owners], ones), batch_size, create_graph)

    def get_smoothed_mask(
        self,
        x: Tensor,
        target: Any = None,
        samples: int = 25,
        std: float = 0.15,
        process: Optional[Callable[[Tensor], Tensor]] = torch.square,
        **options: Any,
    ) -> Tensor:
        """SmoothGrad of this method (the seed's API): mean over ``samples`` noisy copies of ``process(map)``.

        ``std`` is the noise's standard deviation as a fraction of each image's value range (max - min);
        ``process`` defaults to squaring, as in the seed and PAIR's ``GetSmoothedMask(magnitude=True)``.
        """
        from .smoothgrad import SmoothGrad

        mine = {**self.options, **options}
        common = {key: mine.pop(key) for key in list(mine) if key in COMMON_OPTIONS}
        smooth = SmoothGrad(self.model, method=type(self), samples=samples, std=std, process=process, **common)
        smooth.inner = self  # this very explainer (a wrapper keeps its own wrapped method), its options as given
        return smooth.get_mask(x, target, inner_options=mine)


def per_image_rows(explainer: GradientExplainer, options: Dict[str, Any], batch: int, copies: int) -> Dict[str, Any]:
    """``options`` for a run of ``explainer`` on ``copies`` consecutive copies of each of ``batch`` images (rows
    image-major, ``batch * copies`` in all): each of its :attr:`~GradientExplainer.per_image_options` that holds a
    tensor with one entry per image (leading dimension ``batch`` > 1) is repeated the same way."""
    if copies == 1 or batch == 1:
        return options
    return {key: value.repeat_interleave(copies, dim=0)
            if key in explainer.per_image_options and isinstance(value, Tensor) and value.dim() == 4
            and value.shape[0] == batch else value
            for key, value in options.items()}


class WrappingExplainer(GradientExplainer):
    """A gradient method that runs another one (``method``: a gradient explainer class or registry name; the class's
    ``defaults['method']`` when None) on changed inputs or a changed model (:meth:`_inner_model`).

    The wrapped method's options pass through, and it keeps its own default ``score`` (AGI's softmax) unless the
    call or the construction names one.  An option both own (``samples`` of Guided AbsoluteGrad around Expected
    Gradients) goes to the wrapper; ``inner_options={...}`` gives the wrapped method its own values of any of its
    options.  The wrapper's ``generator``, where it has one, also drives a wrapped method that draws.
    """

    def __init__(self, model: nn.Module, method: MethodSpec = None, **options: Any) -> None:
        spec = self.defaults["method"] if method is None else method
        self.inner_class = resolve_method(spec, GradientExplainer, f"{type(self).__name__}'s method")
        self.inner = self.inner_class(self._inner_model(model))
        self.per_image_options = self.inner.per_image_options  # its options pass through
        super().__init__(model, **options)

    def _inner_model(self, model: nn.Module) -> nn.Module:
        """The model the wrapped method is built on (the model itself by default)."""
        return model

    def option_names(self) -> set:
        return (set(COMMON_OPTIONS) | set(self.defaults) | self.inner.option_names() | {"inner_options"}) - {"method"}

    def resolved_options(self, **options: Any) -> Dict[str, Any]:
        merged = super().resolved_options(**options)
        built, called = self.options.get("inner_options"), options.get("inner_options")
        for given in (built, called):
            if given is not None and not isinstance(given, Mapping):
                raise TypeError(f"inner_options must be a dict of the wrapped method's options, "
                                f"got {type(given).__name__}")
        merged["inner_options"] = {**(built or {}), **(called or {})}  # the call's add to the construction's
        if "score" in self.inner.defaults and "score" not in options and "score" not in self.options:
            merged["score"] = self.inner.defaults["score"]
        return merged

    def _inner_options(self, inner: Dict[str, Any], generator: Optional[torch.Generator] = None) -> Dict[str, Any]:
        """The options of one run of the wrapped method, from what reached the wrapper's ``_explain`` beyond its own
        options: the wrapped method's defaults (less the common options, which the wrapper resolved), the call's
        options, the wrapper's ``generator`` where the wrapped method takes one, then ``inner_options``."""
        extra = inner.pop("inner_options", None) or {}
        common = sorted(set(extra) & set(COMMON_OPTIONS))
        if common:
            raise TypeError(f"inner_options: {common} are common options, shared by {type(self).__name__} and the "
                            f"method it wraps; pass them to the call itself")
        allowed = self.inner.option_names() - set(COMMON_OPTIONS)
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise TypeError(f"inner_options: {type(self.inner).__name__} has no option(s) {unknown}; "
                            f"its options are {sorted(allowed)}")
        generator = optional_generator(generator)
        options = {key: value for key, value in self.inner.defaults.items() if key not in COMMON_OPTIONS}
        options.update(inner)
        if generator is not None and "generator" in self.inner.defaults:
            options["generator"] = generator
        options.update(extra)
        return options
