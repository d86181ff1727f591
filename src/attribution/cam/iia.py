"""IIA: Iterated Integrated Attributions, over the input path and a layer's activations (CNNs) or the attention of
the last block (vision transformers); for activations also iterated a third time, over the layer's input."""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform, layer_transform
from ..core.explainer import positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from ..gradients.paths import BaselineSpec
from ..transformers.attention import AttentionCapture
from ..transformers.base import AttentionExplainer, _at_least_float32
from ..transformers.rollout import residual_rollout
from ..transformers.tokens import token_layout
from .base import CAM, FUSIONS
from .integrated_grad_cam import path_rows
from .tail import SplitModel, Unsplittable, cached_split

#: the number of intervals of each path when ``steps`` is None: the authors' scripts (``INTERPOLATION_STEPS`` of
#: ``cnn_saliency_map_generator.py``, ``ITERATION_STEPS`` of ``vit_saliency_map_generator.py``)
DEFAULT_STEPS = {"activations": 10, "attention": 5}
REPRESENTATIONS = ("activations", "attention")
#: ``integrals``: the authors' ``'iia'`` (the input path and one representation) and ``'iia-triple'`` (and the
#: representation's input too)
INTEGRALS = (2, 3)


def gradient_times_activation(activations: Tensor, gradients: Tensor) -> Tensor:
    """``sum_k dy/dA_k * max(0, A_k)`` (N, 1, h, w): the authors' CNN integrand, summed over channels."""
    return (gradients * activations.clamp(min=0)).sum(dim=1, keepdim=True)


def check_integrals(integrals: Any) -> int:
    """The ``integrals`` option, 2 or 3 (an int, not a bool); else a ValueError naming it."""
    if isinstance(integrals, bool) or not isinstance(integrals, numbers.Integral) or int(integrals) not in INTEGRALS:
        raise ValueError(f"integrals must be 2 or 3, got {integrals!r}")
    return int(integrals)


def rectified_gradient_times_activation(rows: Tensor, gradients: Tensor) -> Tensor:
    """``max(0, dy/dB * max(0, B))`` elementwise: the authors' integrand of the triple integral."""
    return F.relu(gradients * F.relu(rows))


def path_minimum(values: Tensor, per_image: int) -> Tensor:
    """The elementwise minimum over each image's ``per_image`` consecutive rows (image-major): (B, ...)."""
    return values.view(-1, per_image, *values.shape[1:]).amin(dim=1)


def between(reference: Tensor, values: Tensor, owners: Tensor, alpha: Tensor) -> Tensor:
    """``reference[owners] + alpha (values - reference[owners])`` (``alpha`` one number or one per row), formed in
    ``alpha``'s dtype and returned in ``values``'s."""
    start = reference[owners].to(alpha.dtype)
    if alpha.dim():
        alpha = alpha.view(-1, *[1] * (values.dim() - 1))
    return (start + alpha * (values.to(alpha.dtype) - start)).to(values.dtype)


class LayerRuns:
    """For the path points of one call: ``inputs`` (P, ...), the input of the layer in the forward of every point,
    ``extras`` (the other arguments of that call, none of them tensors: ``(args, kwargs)``), and
    ``outputs(layer_rows, points)``, the model's outputs when the layer's output is ``layer_rows`` in the forwards
    of the points ``points``; ``mode``: ``'tail'`` (only the modules after the layer run, on the values the points'
    forwards kept) or ``'full'`` (whole forwards whose layer output a forward hook replaces)."""

    def __init__(self, inputs: Tensor, extras: Tuple[Tuple[Any, ...], Dict[str, Any]],
                 outputs: Callable[[Tensor, Tensor], Tensor], mode: str) -> None:
        self.inputs, self.extras, self.outputs, self.mode = inputs, extras, outputs, mode


def layer_call(name: str, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """The arguments of a call of the layer ``name`` other than its first, which must be the one tensor among them
    (the layer then runs on points between such inputs); else a ValueError."""
    extras = list(args[1:]) + list(kwargs.values())
    if not args or not isinstance(args[0], Tensor) or any(isinstance(e, Tensor) for e in extras):
        raise ValueError(f"integrals=3 runs target_layer {name!r} on points between its inputs, so its forward must "
                         f"take one tensor (other arguments may be constants); it was called with {len(args)} "
                         f"positional and {len(kwargs)} keyword arguments, not so")
    return tuple(args[1:]), dict(kwargs)


class _Gate:
    """Whether a held attention map passes gradients on to the probabilities it was computed from (see _Held)."""

    def __init__(self) -> None:
        self.open = False


class _Held(torch.autograd.Function):
    """``probs * scale``.  Backward: nothing reaches ``probs`` while the gate is closed, so the gradients taken then
    (the target's w.r.t. every block's attention) treat the held map as a given, as the authors' code, which feeds
    the model a detached copy; once the gate opens (after those gradients), ``scale`` times the incoming gradient,
    so that a map built with ``create_graph`` is differentiable w.r.t. the parameters the held map depends on."""

    @staticmethod
    def forward(ctx: Any, probs: Tensor, scale: Tensor, gate: _Gate) -> Tensor:  # type: ignore[override]
        ctx.gate = gate
        ctx.save_for_backward(scale)
        return probs * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None]:  # type: ignore[override]
        if not ctx.gate.open:
            return None, None, None
        (scale,) = ctx.saved_tensors
        return grad * scale, None, None


class HeldLastAttention(AttentionCapture):
    """An :class:`~attribution.transformers.attention.AttentionCapture` in whose forward the last of ``calls``
    attention calls uses ``scale[r]`` times the probabilities it computed, for each row ``r`` (``scale`` (R,)),
    through :class:`_Held` (gated by ``gate``); the maps recorded are the ones the model used."""

    def __init__(self, model: torch.nn.Module, scale: Tensor, calls: int, gate: _Gate) -> None:
        super().__init__(model)
        self.scale, self.calls, self.gate = scale, calls, gate
        self._seen = 0

    def __enter__(self) -> "HeldLastAttention":
        self._seen = 0
        return super().__enter__()  # type: ignore[return-value]

    def _used(self, probs: Tensor) -> Tensor:
        self._seen += 1
        if self._seen != self.calls:
            return probs
        return _Held.apply(probs, self.scale.to(probs.dtype).view(-1, 1, 1, 1), self.gate)


@register("iia")
class IIA(CAM, AttentionExplainer):
    """IIA: integrals over the straight path from a baseline to the image, iterated with an integral over an internal
    representation on each point: a layer's activations (CNNs) or the last block's attention (vision transformers);
    with ``integrals=3``, over a layer's input and then its output.

    Barkan, Elisha, Asher, Eshel & Koenigstein, "Visual Explanations via Iterated Integrated Attributions",
    ICCV 2023, pp. 2073-2084 (project page yonisgit.github.io/iterated-integrated-attributions; code
    github.com/iia-iccv23/iia).

    What could be read: the project page (an iterated integral over the input image, internal representations and
    their gradients; activations and their Hadamard product with the gradients for CNNs; attention matrices
    aggregated by gradient rollout for ViTs) and the authors' code; the paper's own equations could not be read
    here (only a third-party summary of them).  The formulas below are the authors' code's, as released: its
    default ``'iia'`` (``integrals=2``, the default: the input and one representation) and its ``'iia-triple'``
    (``integrals=3``, activations only), with ``x_j = b + (j/n)(x - b)``, ``j = 0..n`` (``n = steps``, both ends
    included, as the code's ``get_interpolated_values``; every path below has ``n + 1`` points likewise):

    * ``representation='activations'`` (CNNs; at ``target_layer``, default the last spatial block, the code's
      ``layer4`` of ResNet-101): ``map = sum_j sum_k dy/dA_k(x_j) * max(0, A_k(x_j))``, not rectified (the
      code min-max normalises it), upsampled bilinearly (the code: bicubic).  The code also interpolates the
      activations from a reference, the minimum of the activations taken over an axis of length 1, i.e. the
      activations themselves: every inner point equals ``A(x_j)`` and the code then zeroes every inner term but the
      first, so the inner integral is that one term; it is computed once here.  Default ``steps=10`` (11 points).
    * ``representation='attention'`` (ViTs): on each ``x_j``, the last block's attention probabilities ``P`` are
      replaced by ``(k/n) P`` (``k = 0..n``, the zero map as reference), a given for the gradients (the code feeds
      a detached copy); every block's ``G_l = mean_heads max(0, A_l * dA_l)`` (``A_L`` the scaled map), averaged over
      the ``(n+1)^2`` pairs ``(j, k)``; then rolled out: ``(G_l + I) / 2`` renormalised to rows summing to 1,
      multiplied from the first block; the map is the class token's row over the patches (the mean of the patch
      rows for models without one), upsampled bilinearly.  Default ``steps=5`` (6 points on each path), the code's
      ``ITERATION_STEPS``.  With ``create_graph`` the map is also differentiable through the scaled map's value.
    * ``integrals=3`` (``representation='activations'``; the code's ``heatmap_of_triple_layers``, run with the layer
      before its ``layer4``, so that ``layer4`` maps ``layer3``'s output ``A`` to ``B``): here ``A_j`` is the input
      of ``target_layer`` ``L`` in the forward of ``x_j`` and ``B = L(A)``.  ``a = min_j A_j`` (elementwise, over the
      image's path), ``A_jk = a + (k/n)(A_j - a)``, ``B_jk = L(A_jk)``, ``b_k = min_j B_jk``,
      ``B_jkm = b_k + (m/n)(B_jk - b_k)``; ``map = sum_{j,k,m} sum_c max(0, dy/dB_c(B_jkm) * max(0, B_jkm,c))``, the
      gradient taken with ``B_jkm`` as ``L``'s output in the forward of ``x_j`` (the code: its head, ReLU, pooling
      and classifier, on ``B_jkm``).  Unlike the code's two-integral variant, its references (minima over the
      path's points) are not degenerate, and it rectifies each product once more (its ``relu`` of the stacked
      gradient x activation terms).  For the code's DenseNet-201 setting nothing lies between the two layers
      (``B = A``, its ``norm5`` skipped); its default ResNet-101 has ``layer4``.  Default ``steps=10`` on all three
      paths, the code's ``INTERPOLATION_STEPS``.  ``L`` must be a module called with one tensor (other arguments
      may be constants).  With ``create_graph`` the map is differentiable w.r.t. the parameters through ``A``, the
      minima (a subgradient at ties), ``L`` and the gradient.

    ``representation=None`` (default) picks ``'attention'`` when the model's forward runs global self-attention
    (and no ``target_layer`` is given), else ``'activations'``.  ``baseline`` as for
    :class:`~attribution.cam.integrated_grad_cam.IntegratedGradCAM`; ``'zero'`` as the code.  ``y`` is the target's
    logit by default (the code backpropagates a one-hot vector from the logits).  Class-discriminative.
    Cost: activations ``steps + 1`` forwards and gradients to the layer per image; attention ``(steps + 1)^2``
    forwards and backwards (to the first block's attention) per image; ``integrals=3``, per image, ``steps + 1``
    forwards up to ``L``, ``(steps + 1)^2`` forwards of ``L`` alone and ``(steps + 1)^3`` forwards and gradients of
    the modules after ``L`` (11, 121 and 1331 by default), where torch.fx can cut the model after ``L`` (see
    :mod:`attribution.cam.tail`; for a ResNet's last block those are its pooling and classifier); where it cannot
    (data-dependent control flow, forward hooks on containers), the first and last are full forwards, the last
    with a gradient to ``L``.  One more forward per image when ``target=None`` (the path points are computed
    before the image's own), and one forward of one image per input shape to find the attention blocks.

    Deliberate differences, and what is not verified: the two-integral CNN integral over the activations is the
    code's degenerate one (a reference other than the activations, e.g. the per-channel minimum that a summary of
    the paper names, is not implemented); the default step counts are the code's (the summary names n = 10); the
    code has no three-integral variant for ViTs' attention (``integrals=3`` with it raises); maps are raw (not
    min-max normalised).  The summary calls the three-integral variant (IIA3) the best; here it is the code's.
    """

    argmax_on_rows = False  # the path points come first: None is resolved to the image's arg-max beforehand
    kind = "cam"
    defaults: Dict[str, Any] = {**CAM.defaults, "steps": None, "baseline": "zero", "representation": None,
                                "integrals": 2}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, steps: Optional[int], baseline: BaselineSpec, representation: Optional[str],
                 integrals: int, batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if steps is not None:
            positive_int(steps, "steps")
        integrals = check_integrals(integrals)
        kind, calls = self._representation(x, representation, target_layer, reshape_transform)
        if integrals == 3 and kind == "attention":
            raise ValueError("integrals=3 (the authors' 'iia-triple') integrates a layer's activations and its input; "
                             "their code has no such variant over attention: pass target_layer or "
                             "representation='activations'")
        steps = DEFAULT_STEPS[kind] if steps is None else steps
        points = path_rows(x, baseline, torch.arange(steps + 1, dtype=torch.float64) / steps)
        if kind == "attention":
            return self._attention_map(x, target, points, steps, calls, batch_size, create_graph)
        layers = self.target_layers(x, target_layer, reshape_transform)
        if integrals == 3:
            totals = [self._triple_sum(x, target, points, steps, layer, reshape_transform, batch_size, create_graph)
                      for layer in layers]
        else:
            totals = self._row_sums(x, steps + 1, points, target, layers, reshape_transform, batch_size,
                                    create_graph, gradient_times_activation)
        return self._fuse(totals, x.shape[-2:], layer_fusion)

    # ------------------------------------------------------------------------------------------ triple integral
    def _triple_sum(self, x: Tensor, target: Target, points: Callable[[Tensor, Tensor], Tensor], steps: int,
                    layer: nn.Module, reshape_transform: ReshapeTransform, batch_size: Optional[int],
                    create_graph: bool) -> Tensor:
        """``sum_{j,k,m} sum_c max(0, dy/dB_c * max(0, B_c))`` at ``B = B_jkm`` (see the class docstring), (B, 1, h, w):
        a pass over the path points for the layer's inputs, then for each step ``k`` of the middle path a pass of
        the layer over every point and a pass of the rest of the model over every (point, inner step)."""
        per_image = steps + 1
        count = x.shape[0] * per_image  # path points, image-major
        dtype = accumulation_dtype(x)
        alphas = torch.arange(per_image, dtype=dtype, device=x.device) / steps
        with torch.set_grad_enabled(create_graph):
            runs = self._layer_runs(layer, lambda p: points(p // per_image, p % per_image), count, batch_size,
                                    x.device)
        low = path_minimum(runs.inputs, per_image)  # the reference of the middle path: the minimum over the points
        layer_plan = RowPlanner(count, batch_size, x.device)
        inner_plan = RowPlanner(count * per_image, batch_size, x.device)
        total: Optional[Tensor] = None
        layout: Optional[Callable[[Tensor], Tensor]] = None
        for k in range(per_image):  # one step of the middle path: every image's points at once
            chunks = []
            for start, stop in layer_plan:
                index = torch.arange(start, stop, device=x.device)
                chunks.append(self._run_layer(layer, between(low, runs.inputs[start:stop], index // per_image,
                                                             alphas[k]), runs.extras, create_graph))
            middle = torch.cat(chunks)  # B_jk, (P, ...)
            inner_low = path_minimum(middle, per_image)
            if layout is None:
                layout = self._term_layout(layer, middle.shape, x, reshape_transform)
            for start, stop in inner_plan:
                index = torch.arange(start, stop, device=x.device)
                point, owners = index // per_image, index // (per_image * per_image)
                rows = between(inner_low, middle[point], owners, alphas[index % per_image])
                rows, grads = self._gradient_after(runs, rows, point, owners, target, create_graph)
                with torch.set_grad_enabled(create_graph):
                    term = layout(rectified_gradient_times_activation(rows, grads).to(dtype)).sum(dim=1, keepdim=True)
                total = (term.new_zeros((x.shape[0],) + tuple(term.shape[1:])) if total is None else total) \
                    .index_add(0, owners, term)
        return total  # type: ignore[return-value]

    def _run_layer(self, layer: nn.Module, rows: Tensor, extras: Tuple[Tuple[Any, ...], Dict[str, Any]],
                   create_graph: bool) -> Tensor:
        """The layer's output for the inputs ``rows`` (its other arguments ``extras``, as the model gave them)."""
        with torch.set_grad_enabled(create_graph), self._autocast():
            output = layer(rows, *extras[0], **extras[1])
        if not isinstance(output, Tensor):
            raise TypeError(f"the layer {self._name(layer)!r} returns {type(output).__name__}, not a tensor; pick a "
                            "layer whose output is a tensor")
        return output

    def _gradient_after(self, runs: LayerRuns, rows: Tensor, points: Tensor, owners: Tensor, target: Target,
                        create_graph: bool) -> Tuple[Tensor, Tensor]:
        """``rows`` (as a leaf unless ``create_graph``) and ``d score / d rows`` with the rows as the layer's output
        in the forwards of ``points``."""
        if not create_graph:
            rows = rows.detach()
        if not rows.requires_grad:
            rows = rows.requires_grad_(True)
        with torch.set_grad_enabled(create_graph):
            outputs = runs.outputs(rows, points)
        with torch.enable_grad():
            score = target(outputs, owners).sum()
        (grads,) = torch.autograd.grad(score, rows, create_graph=create_graph)
        return rows, grads

    def _term_layout(self, layer: nn.Module, shape: Tuple[int, ...], x: Tensor,
                     reshape_transform: ReshapeTransform) -> Callable[[Tensor], Tensor]:
        """What brings the layer's output (and terms shaped like it) to (N, C, h, w)."""
        transform = layer_transform(self.model, layer, shape, x.shape[-2:], reshape_transform)
        laid_out = transform(torch.zeros((1,) + tuple(shape[1:]), device=x.device))
        if laid_out.dim() != 4:
            raise ValueError(f"the output of layer {self._name(layer)!r} has shape {tuple(shape)}; CAMs need "
                             "(B, C, h, w): pass a reshape_transform that brings it to that shape")
        return transform

    def _layer_runs(self, layer: nn.Module, point_rows: Callable[[Tensor], Tensor], count: int,
                    batch_size: Optional[int], device: torch.device) -> LayerRuns:
        """The :class:`LayerRuns` of the ``count`` path points ``point_rows(indices)``: the model cut after the
        layer by torch.fx where it can be (see :mod:`attribution.cam.tail`), else full forwards."""
        split = self._split(layer)
        if split is not None:
            try:
                return self._tail_runs(split, layer, point_rows, count, batch_size, device)
            except Unsplittable:
                pass
        return self._full_runs(layer, point_rows, count, batch_size, device)

    def _split(self, layer: nn.Module) -> Optional[SplitModel]:
        """The model traced and cut after ``layer`` (cached while the model's modules stay the same), or None."""
        return cached_split(self.__dict__.setdefault("_splits", {}), self.model, layer)

    def _tail_runs(self, split: SplitModel, layer: nn.Module, point_rows: Callable[[Tensor], Tensor], count: int,
                   batch_size: Optional[int], device: torch.device) -> LayerRuns:
        cut = split.cut
        inputs, kept, plan, extras = [], [], None, None
        for start, stop in RowPlanner(count, batch_size, device):
            with self._autocast():
                values = split.head(self._model_input(point_rows(torch.arange(start, stop, device=device))))
            plan = plan or split.plan(values)
            args, kwargs = fx.node.map_arg((cut.args, cut.kwargs), values.__getitem__)
            extras = extras or layer_call(self._name(layer), args, kwargs)
            inputs.append(args[0])
            kept.append({node: values[node] for node in plan[1]})  # what the tail takes
        tail = split.tail(split.merged(kept, plan), count, plan)  # type: ignore[arg-type]

        def outputs(layer_rows: Tensor, points: Tensor) -> Tensor:
            with torch.enable_grad(), self._autocast():  # the tail may change its input in place: it gets a copy
                return tail(layer_rows.clone(), points)

        return LayerRuns(torch.cat(inputs), extras, outputs, "tail")  # type: ignore[arg-type]

    def _full_runs(self, layer: nn.Module, point_rows: Callable[[Tensor], Tensor], count: int,
                   batch_size: Optional[int], device: torch.device) -> LayerRuns:
        seen: Dict[str, Any] = {}

        def keep(module: nn.Module, args: Any, kwargs: Any) -> None:
            seen.update(args=args, kwargs=kwargs, calls=seen.get("calls", 0) + 1)

        inputs = []
        for start, stop in RowPlanner(count, batch_size, device):
            seen.clear()
            handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
            try:
                self._forward(point_rows(torch.arange(start, stop, device=device)))
            finally:
                handle.remove()
            if not seen:
                raise RuntimeError(f"the layer {self._name(layer)!r} did not run in the model's forward pass")
            extras = layer_call(self._name(layer), seen["args"], seen["kwargs"])
            inputs.append(seen["args"][0])
        calls, forward = seen["calls"], self._forward

        def outputs(layer_rows: Tensor, points: Tensor) -> Tensor:
            state = {"calls": 0}

            def replace(module: nn.Module, args: Any, output: Any) -> Any:
                state["calls"] += 1
                if state["calls"] != calls:
                    return output
                torch.set_grad_enabled(True)  # from the layer on; undone when the caller's grad mode block exits
                return layer_rows.clone()

            handle = layer.register_forward_hook(replace)
            try:
                return forward(point_rows(points))
            finally:
                handle.remove()

        return LayerRuns(torch.cat(inputs), extras, outputs, "full")

    # ------------------------------------------------------------------------------------------ representation
    def _representation(self, x: Tensor, representation: Optional[str], target_layer: LayerSpec,
                        reshape_transform: ReshapeTransform) -> Tuple[str, int]:
        """``('attention', number of attention calls)`` or ``('activations', 0)`` for this call."""
        if representation is not None and representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be None, 'activations' or 'attention', got {representation!r}")
        if representation == "activations":
            return "activations", 0
        if target_layer is not None or reshape_transform is not None:
            if representation == "attention":
                raise ValueError("target_layer and reshape_transform choose the layer of representation="
                                 "'activations'; representation='attention' reads every block's attention")
            return "activations", 0
        probe = self._attention_probe(x)
        if isinstance(probe, str):
            if representation == "attention":
                raise ValueError(probe)
            return "activations", 0
        return "attention", probe

    def _attention_probe(self, x: Tensor) -> Any:
        """The number of attention calls of a forward of one image shaped like ``x`` (global self-attention in
        every block), or the reason there is none; found once per input shape."""
        cache: Dict[Tuple[int, ...], Any] = self.__dict__.setdefault("_probes", {})
        key = tuple(x.shape[1:])
        if key not in cache:
            with torch.no_grad(), AttentionCapture(self.model) as capture:
                self._forward(x[:1])
            try:
                cache[key] = len(self._checked(capture.maps, 1))
            except ValueError as error:
                cache[key] = str(error)
        return cache[key]

    # ----------------------------------------------------------------------------------------------- attention
    def _attention_map(self, x: Tensor, target: Target, points: Callable[[Tensor, Tensor], Tensor], steps: int,
                       calls: int, batch_size: Optional[int], create_graph: bool) -> Tensor:
        """The rollout of each block's ``G_l`` averaged over the ``(steps + 1)^2`` rows (input point, scale) of each
        image, rows image-major in passes of ``batch_size``, as a (B, 1, H, W) map."""
        per_image = (steps + 1) ** 2
        scales = torch.arange(steps + 1, dtype=accumulation_dtype(x), device=x.device) / steps
        totals: List[Tensor] = []
        for start, stop in RowPlanner(x.shape[0] * per_image, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            owners, pair = index // per_image, index % per_image
            terms = self._gradient_attention(points(owners, pair // (steps + 1)), owners,
                                             scales[pair % (steps + 1)], target, calls, create_graph)
            if not totals:
                totals = [term.new_zeros((x.shape[0],) + tuple(term.shape[1:])) for term in terms]
            totals = [total.index_add(0, owners, term) for total, term in zip(totals, terms)]
        relevance = residual_rollout([total / per_image for total in totals])
        layout = token_layout(self.model, tuple(x.shape[-2:]), relevance.shape[-1], "the attention maps")
        return self._to_image(relevance, layout, tuple(x.shape[-2:]))

    def _gradient_attention(self, rows: Tensor, owners: Tensor, scale: Tensor, target: Target, calls: int,
                            create_graph: bool) -> List[Tensor]:
        """Per block, ``mean_heads max(0, A * dA)`` (R, N, N) of ``rows``, the last block's attention held at
        ``scale[r]`` times its own value."""
        gate = _Gate()
        with torch.enable_grad(), HeldLastAttention(self.model, scale, calls, gate) as capture:
            outputs = self._forward(self._model_input(rows).requires_grad_(True))
        attention = self._checked(capture.maps, rows.shape[0])
        if len(attention) != calls:
            raise ValueError(f"{type(self.model).__name__} ran {len(attention)} attention calls on a batch of "
                             f"{rows.shape[0]} rows but {calls} on one image; IIA holds the last one")
        grads = torch.autograd.grad(target(outputs, owners).sum(), attention, create_graph=create_graph)
        gate.open = True  # from here on the held map's value is differentiable w.r.t. what it was computed from
        with torch.set_grad_enabled(create_graph):
            return [(_at_least_float32(a) * _at_least_float32(g)).clamp(min=0).mean(dim=1)
                    for a, g in zip(attention, grads)]
