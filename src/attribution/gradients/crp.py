"""Concept Relevance Propagation: LRP whose relevance is kept, at one layer, only in chosen channels ("concepts")."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture
from ..core.explainer import positive_int
from ..core.layers import default_layer, layer_name, resolve_layer
from ..core.registry import register
from ..core.spatial import spatial_layout
from ..core.targets import Target, TargetSpec
from .base import accumulation_dtype
from .lrp import LRP

ChannelSpec = Union[None, int, Sequence[int], Tensor]


class Concepts(NamedTuple):
    """What :meth:`CRP.concepts` returns, for ``B`` images and their ``k`` most relevant channels."""

    #: (B, k, C, H, W): the conditional heatmap of each image's ``j``-th most relevant channel
    heatmaps: Tensor
    #: (B, k) LongTensor: those channels, the most relevant first
    channels: Tensor
    #: (B, k): their relevance at the layer (summed over its positions, signed, not normalised)
    relevances: Tensor


@dataclass
class _Condition:
    """The state of one relevance pass: the layer, the channels each row keeps (``chosen``, (rows, k), or None:
    each row's own most relevant channel), or ``ranking``: record each row's channel relevances and stop at the
    layer."""

    layer: nn.Module
    where: str
    chosen: Optional[Tensor] = None
    ranking: bool = False
    batch: int = 0
    totals: Optional[Tensor] = None
    checked: bool = False


@dataclass
class _ConceptRequest:
    """A :meth:`CRP.concepts` call in progress: its ``k``, and the ranking it found."""

    k: int
    channels: Optional[Tensor] = None
    relevances: Optional[Tensor] = None


_CONCEPTS: contextvars.ContextVar[Optional[_ConceptRequest]] = contextvars.ContextVar("crp_concepts", default=None)


def channel_spec(channels: ChannelSpec, batch: int, device: torch.device) -> Optional[Tensor]:
    """The ``channels`` option as a (B, k) LongTensor (None stays None); else a clear error naming it."""
    if channels is None:
        return None
    if isinstance(channels, Tensor):
        if channels.is_floating_point() or channels.is_complex() or channels.dtype == torch.bool:
            raise TypeError(f"a channels tensor must hold integer channel indices, got dtype {channels.dtype}")
        if channels.dim() != 2 or channels.shape[0] != batch or channels.shape[1] == 0:
            raise ValueError(f"a channels tensor must have shape (B, k) = ({batch}, k) with k >= 1 (one row of "
                             f"channels per image), got shape {tuple(channels.shape)}")
        return channels.to(device=device, dtype=torch.long)
    single = isinstance(channels, int) and not isinstance(channels, bool)
    values = [channels] if single else list(channels) if isinstance(channels, (list, tuple)) else []
    if not values or any(isinstance(c, bool) or not isinstance(c, int) for c in values):
        raise ValueError(f"channels must be None, an int, a non-empty list of ints or a (B, k) LongTensor, "
                         f"got {channels!r}")
    return torch.tensor(values, dtype=torch.long, device=device).expand(batch, -1)


def channel_relevance(relevance: Tensor, dim: int = 1) -> Tensor:
    """(n, C): each channel's relevance at a layer output whose channels lie along ``dim`` (1: (n, C, ...)),
    summed over the positions (signed)."""
    relevance = relevance.movedim(dim, 1)
    return relevance.flatten(2).sum(dim=2) if relevance.dim() > 2 else relevance


def channel_dim(model: nn.Module, image_hw: Tuple[int, int], output: Tensor, where: str, layer: nn.Module) -> int:
    """Where a layer output's channels lie: the features (last dimension) of (B, N, D) tokens, a concept being one
    feature of every token; the last of a channels-last (B, h, w, C) map (the library's spatial layout rule);
    otherwise the second, as zennit-crp's ``ChannelConcept``."""
    if output.dim() == 3:
        return 2
    if output.dim() == 4 and spatial_layout(model, image_hw, output.shape, where, layer).kind == "nhwc":
        return 3
    return 1


def _repeat_bound(bound: Any, batch: int, copies: int, dims: int) -> Any:
    """A z^B bound given per image (B, C, H, W) repeated for ``copies`` rows per image; other bounds as they are."""
    if isinstance(bound, Tensor) and bound.dim() == dims and bound.shape[0] == batch and batch > 1:
        return bound.repeat_interleave(copies, dim=0)
    return bound


@register("crp")
class CRP(LRP):
    """Concept Relevance Propagation: the LRP heatmap of the relevance that flows through chosen channels of a
    layer, (B, C, H, W).

    Achtibat, Dreyer, Eisenbraun, Bosse, Wiegand, Samek & Lapuschkin, "From attribution maps to human-understandable
    explanations through Concept Relevance Propagation", Nature Machine Intelligence 5, 2023, arXiv:2206.03208
    (reference implementation: zennit-crp, github.com/rachtibat/zennit-crp).

    ``R(x | theta) = sum_c in theta  R^{layer -> x}(mask_c * R^{out -> layer})``: the target's relevance is passed
    from the output down to the layer by :class:`~attribution.gradients.lrp.LRP`'s rules, every channel of the
    layer's output not in ``theta`` is zeroed, and what is left is passed on to the input by the same rules.
    Relevance is linear in the masked layer relevance, so the heatmaps of all channels, each alone, sum to the
    relevance that reaches the input through the layer (the LRP map itself when every path goes through it).

    Options: LRP's (``composite='epsilon_plus_flat'``, ``eps``, ``stabilizer``, ``gamma``, ``alpha``, ``beta``,
    ``low``, ``high``, with LRP's defaults, zennit's), and

    * ``layer``: the condition layer, a dotted name or a module (``None``, the default: the last spatial feature
      block, :func:`attribution.core.layers.default_layer`, e.g. ``layer4`` of a ResNet at 224 x 224); its channels
      are the second dimension of a (B, C, ...) output (zennit-crp's ``ChannelConcept``: CNN channels, dense-layer
      neurons), the last of a channels-last (B, h, w, C) map, and the features of (B, N, D) tokens (a concept is one
      feature of every token);
    * ``channels``: the concept ``theta``, an int, a list of ints (the same channels for every image) or a (B, k)
      LongTensor (k channels per image); several channels are joined (their union: each keeps its relevance, as
      zennit-crp's mask of a list of ids); ``None``, the default: each image's most relevant channel at the layer.

    The relevance of channel ``c`` at the layer is ``R_c = sum_p R_{c,p}``, the unconditioned LRP relevance of its
    output summed over the positions ``p``, signed; channels rank by it, the largest first, as zennit-crp's
    ``ChannelConcept.attribute`` of the relevance ``record_layer`` keeps, then ``torch.topk`` (its ``abs_norm``
    divides by ``sum_c |R_c|``, which leaves the order as it is).  :meth:`concepts` gives each image's top-``k``
    channels (``k=6``, the six concepts of the authors' tutorial), their ``R_c``, and their conditional heatmaps.

    As zennit-crp's default (``exclude_parallel=True``), only the relevance that flows through the layer reaches
    the input: the relevance pass stops at the layer, is masked there and continues from the layer's output
    (paths around the layer, such as a ResNet block's shortcut around a convolution inside the block, carry none;
    where every path passes the layer, this equals zeroing the other channels' gradient at the layer in one pass).

    Cost (:meth:`get_mask`): one forward and one relevance backward per image (split at the layer), as LRP; with
    ``channels=None`` the ranking comes from the same pass.  :meth:`concepts`: one forward (recorded for backward
    only from the layer on) and one relevance backward down to the layer per image (the ranking), then one forward
    and one relevance backward per (image, concept) row, the image repeated ``k`` times (as zennit-crp batches
    conditions), ``batch_size`` rows per pass.  With ``create_graph`` the heatmaps (and the concepts' relevances)
    are differentiable w.r.t. the parameters with their true derivative, as LRP's; the choice of channels is not.

    Deliberate differences from zennit-crp: the start relevance is the gradient of the explained score (the one-hot
    of the target, as this library's LRP), not the logit's value (zennit-crp's maps are these times ``f_t(x)``); the
    heatmap keeps the input's channels (zennit-crp sums them); the rules are LRP's (no canonizer changes the model,
    see :class:`~attribution.gradients.lrp.LRP`); one condition layer per call (zennit-crp chains several).
    """

    defaults = {**LRP.defaults, "layer": None, "channels": None}

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self._default_layers: Dict[Tuple[int, ...], str] = {}

    # ------------------------------------------------------------------------------------------------ the API
    def concepts(self, x: Tensor, target: TargetSpec = None, k: int = 6, **options: Any) -> Concepts:
        """Each image's ``k`` most relevant channels at the layer and their conditional heatmaps (see the class
        docstring); ``options`` as :meth:`get_mask`'s, less ``channels``."""
        k = positive_int(k, "k")
        if options.get("channels", self.options.get("channels")) is not None:
            raise ValueError("concepts() ranks the channels itself; leave channels=None (use get_mask to condition "
                             "on given channels)")
        request = _ConceptRequest(k)
        token = _CONCEPTS.set(request)
        try:
            maps = self.get_mask(x, target, **options)
        finally:
            _CONCEPTS.reset(token)
        return Concepts(maps.view(x.shape[0], k, *maps.shape[1:]), request.channels,
                        request.relevances.to(maps.dtype))

    # ---------------------------------------------------------------------------------------------- the call
    def _explain(self, x: Tensor, target: Target, *, layer: Any, channels: ChannelSpec, low: Any, high: Any,
                 **options: Any) -> Tensor:
        module = self._layer(x, layer)
        where = layer_name(self.model, module)
        request = _CONCEPTS.get()
        try:
            if request is None:
                self._condition = _Condition(module, where, chosen=channel_spec(channels, x.shape[0], x.device))
                return super()._explain(x, target, low=low, high=high, **options)
            return self._concepts(x, target, request, module, where, low, high, options)
        finally:
            self.__dict__.pop("_condition", None)

    def _concepts(self, x: Tensor, target: Target, request: _ConceptRequest, module: nn.Module, where: str,
                  low: Any, high: Any, options: Dict[str, Any]) -> Tensor:
        """The ranking pass, then the (image, concept) rows' conditional pass; (B * k, C, H, W), image-major."""
        batch, k = x.shape[0], request.k
        self._condition = _Condition(module, where, ranking=True, batch=batch)
        super()._explain(x, target, low=low, high=high, **options)
        totals = self._condition.totals
        if k > totals.shape[1]:
            raise ValueError(f"k={k} exceeds the {totals.shape[1]} channels of layer {where!r}")
        request.relevances, request.channels = totals.topk(k, dim=1)
        self._condition = _Condition(module, where, chosen=request.channels.reshape(batch * k, 1), checked=True)
        rows = x.repeat_interleave(k, dim=0)
        low, high = (_repeat_bound(bound, batch, k, x.dim()) for bound in (low, high))
        return super()._explain(rows, target.repeat(k), low=low, high=high, **options)

    def _layer(self, x: Tensor, layer: Any) -> nn.Module:
        """The condition layer's module (``None``: the default layer for inputs shaped like ``x``)."""
        if layer is not None:
            return resolve_layer(self.model, layer)
        modules = dict(self.model.named_modules())
        key = tuple(x.shape[1:])
        name = self._default_layers.get(key)
        if name not in modules:
            try:
                with self._autocast():
                    name = default_layer(self.model, self._model_input(x[:1]))
            except ValueError as error:
                raise ValueError(f"CRP found no default layer ({error}); pass layer=<dotted name or module>") \
                    from None
            self._default_layers[key] = name
        return modules[name]

    # ------------------------------------------------------------------------------------- the relevance pass
    def _scores_and_input_gradients(self, rows: Tensor, owners: Tensor, target: Target, create_graph: bool = False,
                                    planner: Optional[RowPlanner] = None) -> Tuple[Tensor, Tensor]:
        """The rows' scores and their relevance at the input through the condition's channels (zeros while
        ranking); afterwards the recorded operations differentiate plainly (create_graph: true derivatives)."""
        condition = self._condition
        above = condition.ranking and not create_graph  # the ranking needs no graph below the layer
        rows = self._model_input(rows.detach()).requires_grad_(not above)
        recording = planner.recording(rows) if planner is not None else contextlib.nullcontext()
        try:
            with torch.no_grad() if above else contextlib.nullcontext(), recording, self._backward_rules(), \
                    LayerCapture([condition.layer], model=self.model, keep_values=False,
                                 record_from_layer=above) as capture:
                outputs = self._forward(rows)
            scores = target(outputs, owners)
            edge = self._layer_edge(capture, condition)
            keep = create_graph or not condition.ranking  # the graph below the layer is needed again
            (relevance,) = torch.autograd.grad(scores.sum(), edge, retain_graph=keep, create_graph=create_graph)
            dim = channel_dim(self.model, tuple(rows.shape[-2:]), relevance, condition.where, condition.layer)
            totals = channel_relevance(relevance, dim)
            if condition.ranking:
                self._record(condition, owners, totals)
                return scores if create_graph else scores.detach(), torch.zeros_like(rows)
            mask = self._mask(condition, owners, totals)
            shape = [1] * relevance.dim()
            shape[0], shape[dim] = mask.shape
            masked = relevance * mask.view(shape)
            (grads,) = torch.autograd.grad(edge, rows, masked, create_graph=create_graph, allow_unused=True)
        finally:
            if self.__dict__.get("_mode") is not None:
                self._mode.state.plain = True
        return scores if create_graph else scores.detach(), torch.zeros_like(rows) if grads is None else grads

    def _layer_edge(self, capture: LayerCapture, condition: _Condition) -> Any:
        """Where the layer's output sits in the recorded graph (its relevance is taken, and sent on, there)."""
        output = capture.outputs[0]
        if output is None:
            raise RuntimeError(f"the layer {condition.where!r} did not run in the model's forward pass")
        if output.dim() < 2 or capture.edges[0] is None:
            raise ValueError(f"the layer {condition.where!r} must return a (B, C, ...) tensor that depends on the "
                             f"input, got shape {tuple(output.shape)}")
        return capture.edges[0]

    def _record(self, condition: _Condition, owners: Tensor, totals: Tensor) -> None:
        """Keep the ranking pass's channel relevances of its rows' images."""
        if condition.totals is None:
            condition.totals = totals.new_zeros((condition.batch, totals.shape[1]), dtype=accumulation_dtype(totals))
        condition.totals = condition.totals.index_copy(0, owners, totals.to(condition.totals.dtype))

    def _mask(self, condition: _Condition, owners: Tensor, totals: Tensor) -> Tensor:
        """(rows, C): 1 on the channels each row keeps, 0 elsewhere, in the relevance's dtype."""
        count = totals.shape[1]
        if condition.chosen is None:
            chosen = totals.detach().argmax(dim=1, keepdim=True)
        else:
            if not condition.checked:
                self._check_channels(condition.chosen, count, condition.where)
                condition.checked = True
            chosen = condition.chosen[owners]
        mask = torch.zeros_like(totals.detach())
        return mask.scatter_(1, chosen, torch.ones_like(chosen, dtype=mask.dtype))

    @staticmethod
    def _check_channels(chosen: Tensor, count: int, where: str) -> None:
        bad: List[int] = chosen[(chosen < 0) | (chosen >= count)].unique().tolist()
        if bad:
            raise ValueError(f"channels {bad} are out of range for layer {where!r}, whose output has {count} "
                             f"channels (0 to {count - 1})")
