"""IIA: Iterated Integrated Attributions, over the input path and a layer's activations (CNNs) or the attention of
the last block (vision transformers)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
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

#: the number of intervals of each path when ``steps`` is None: the authors' scripts (``INTERPOLATION_STEPS`` of
#: ``cnn_saliency_map_generator.py``, ``ITERATION_STEPS`` of ``vit_saliency_map_generator.py``)
DEFAULT_STEPS = {"activations": 10, "attention": 5}
REPRESENTATIONS = ("activations", "attention")


def gradient_times_activation(activations: Tensor, gradients: Tensor) -> Tensor:
    """``sum_k dy/dA_k * max(0, A_k)`` (N, 1, h, w): the authors' CNN integrand, summed over channels."""
    return (gradients * activations.clamp(min=0)).sum(dim=1, keepdim=True)


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
    representation on each point: a layer's activations (CNNs) or the last block's attention (vision transformers).

    Barkan, Elisha, Asher, Eshel & Koenigstein, "Visual Explanations via Iterated Integrated Attributions",
    ICCV 2023, pp. 2073-2084 (project page yonisgit.github.io/iterated-integrated-attributions; code
    github.com/iia-iccv23/iia).

    What could be read: the project page (an iterated integral over the input image, internal representations and
    their gradients; activations and their Hadamard product with the gradients for CNNs; attention matrices
    aggregated by gradient rollout for ViTs) and the authors' code; the paper's own equations could not be read
    here (only a third-party summary of them).  The formulas below are the authors' code's, as released (its
    default ``'iia'``, two integrals: the input and one representation), with ``x_j = b + (j/n)(x - b)``,
    ``j = 0..n`` (``n = steps``, both ends included, as the code's ``get_interpolated_values``):

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

    ``representation=None`` (default) picks ``'attention'`` when the model's forward runs global self-attention
    (and no ``target_layer`` is given), else ``'activations'``.  ``baseline`` as for
    :class:`~attribution.cam.integrated_grad_cam.IntegratedGradCAM`; ``'zero'`` as the code.  ``y`` is the target's
    logit by default (the code backpropagates a one-hot vector from the logits).  Class-discriminative.
    Cost: activations ``steps + 1`` forwards and gradients to the layer per image; attention ``(steps + 1)^2``
    forwards and backwards (to the first block's attention) per image; one more forward per image when
    ``target=None`` (the path points are computed before the image's own), and one forward of one image per input
    shape to find the attention blocks.

    Deliberate differences, and what is not verified: IIA3 (a third integral, over the previous layer's activations,
    the code's ``'iia-triple'``; the best variant by the summary of the paper) is not implemented; the CNN integral over the activations is the code's
    degenerate one (a reference other than the activations, e.g. the per-channel minimum that a summary of the paper
    names, is not implemented); the two default step counts are the code's (the summary names n = 10); maps are raw
    (not min-max normalised).
    """

    argmax_on_rows = False  # the path points come first: None is resolved to the image's arg-max beforehand
    kind = "cam"
    defaults: Dict[str, Any] = {**CAM.defaults, "steps": None, "baseline": "zero", "representation": None}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, steps: Optional[int], baseline: BaselineSpec, representation: Optional[str],
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        if steps is not None:
            positive_int(steps, "steps")
        kind, calls = self._representation(x, representation, target_layer, reshape_transform)
        steps = DEFAULT_STEPS[kind] if steps is None else steps
        points = path_rows(x, baseline, torch.arange(steps + 1, dtype=torch.float64) / steps)
        if kind == "attention":
            return self._attention_map(x, target, points, steps, calls, batch_size, create_graph)
        layers = self.target_layers(x, target_layer, reshape_transform)
        totals = self._row_sums(x, steps + 1, points, target, layers, reshape_transform, batch_size, create_graph,
                                gradient_times_activation)
        return self._fuse(totals, x.shape[-2:], layer_fusion)

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
