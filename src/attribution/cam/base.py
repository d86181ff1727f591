"""The CAM base class: ``map = combine(weights(activations, gradients), activations)`` at one or more layers.

Every CAM here returns (B, 1, H, W) at the input's resolution: the map at the layer's resolution is upsampled
bilinearly (``F.interpolate(..., mode='bilinear', align_corners=False)``, as Captum's ``LayerAttribution.interpolate``
and OpenCV's ``resize``).  Maps are *raw*: rectified where the method's paper rectifies, never normalised per image
(``attribution.utils.normalize_saliency`` does that), so they stay comparable across images and classes and stay
differentiable with ``create_graph=True``.

Layers (option ``target_layer``, at construction or per call): a dotted name (``'layer4'``, ``'features.28'``), a
module of the model, or a list of them.  ``None`` picks the default layer (see
:func:`attribution.core.layers.default_layer`: the last spatial feature block).  With several layers, each layer's
map is upsampled to the input and the maps are fused by ``layer_fusion``: ``'mean'`` (default) or ``'max'`` of the
raw maps (pytorch-grad-cam instead min-max normalises each layer's map before averaging), or ``'product'``: each
layer's upsampled map min-max scaled to [0, 1] per image, then multiplied (RefineCAM's fusion, see
:class:`attribution.cam.refine_cam.RefineCAM`).  Layer outputs that are not (B, C, h, w) are laid out
automatically (:mod:`attribution.core.spatial`): token sequences of ViT, DeiT, BEiT and EVA on the model's patch
grid for the actual input size with class, distillation and register tokens dropped, channels-last Swin maps
permuted; a shape that cannot be laid out raises an error naming the layer and the shape.  ``reshape_transform``
(optional) replaces that rule for layers it cannot read; either is applied to the activations and to their
gradients alike (so a transform should be a reshape/permutation/slice).

Cost of the gradient CAMs: one forward and one ``torch.autograd.grad(score, activation)`` per image, i.e. a
backward only from the score down to the layer.  The forward below the (first) layer runs without autograd
recording unless ``create_graph=True``, which needs the whole graph.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture, ReshapeTransform
from ..core.explainer import Explainer
from ..core.layers import LayerSpec, default_layer, layer_name, resolve_layers
from ..core.targets import Target
from ..gradients.base import accumulation_dtype

FUSIONS = ("mean", "max", "product")


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of (N, C, h, w) maps to ``size`` (no-op when already there)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def interpolation_rows(size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(out_size, size) weights of the 1-D linear interpolation from ``size`` to ``out_size`` points
    (``align_corners=False``, as ``F.interpolate``): row ``o`` gives output ``o`` from the inputs."""
    eye = torch.eye(size, dtype=dtype, device=device).unsqueeze(1)                           # (size, 1, size)
    return F.interpolate(eye, size=int(out_size), mode="linear", align_corners=False).squeeze(1).T


def extreme_taps(size: int, out_size: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """For the outputs of the 1-D linear interpolation from ``size`` to ``out_size`` points that come first or
    last among the outputs lying between the same two inputs (at most two per input): their inputs ``i0 <= i1``
    and weights ``t`` (output ``= lerp(a[i0], a[i1], t)``, exact for constants)."""
    rows = interpolation_rows(size, out_size, device, dtype)
    first = (rows > 0).to(rows.dtype).argmax(dim=1)                     # the first input an output depends on
    before = torch.cat([first.new_full((1,), -1), first[:-1]])
    after = torch.cat([first[1:], first.new_full((1,), -1)])
    keep = ((first != before) | (first != after)).nonzero().squeeze(1)
    i0 = first[keep]
    i1 = (i0 + 1).clamp_max(size - 1)
    weight = torch.where(i1 > i0, rows[keep, i1], torch.zeros_like(rows[keep, i1]))
    return i0, i1, weight


def scale_as_upsampled(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(..., h, w) maps shifted and scaled so that their bilinear upsampling to ``size`` spans [0, 1] (0 where
    constant), still at (h, w): upsampling keeps constants, so scaling the small map by the upsampled map's range
    equals scaling the upsampled map.  The range is found without upsampling: between four neighbouring inputs a
    bilinear map is linear in each coordinate, so its extremes over the output samples there lie on the first or
    last of those samples' rows and columns; only those (at most 2h x 2w samples) are computed, as ``lerp``, which
    is exact on constants (``F.interpolate``'s weighted sums leave a constant map a false range of a few ulps, which
    min-max scaling would blow up to [0, 1])."""
    height, width = maps.shape[-2:]
    weights = torch.float64 if maps.dtype == torch.float64 else torch.float32
    r0, r1, rw = extreme_taps(height, size[0], maps.device, weights)
    c0, c1, cw = extreme_taps(width, size[1], maps.device, weights)
    rows = torch.lerp(maps.index_select(-2, r0), maps.index_select(-2, r1), rw.to(maps.dtype).unsqueeze(1))
    samples = torch.lerp(rows.index_select(-1, c0), rows.index_select(-1, c1), cw.to(maps.dtype))
    low, high = torch.aminmax(samples.flatten(-2), dim=-1)
    low, high = low[..., None, None], high[..., None, None]
    return safe_divide(maps - low, (high - low).expand_as(maps))


def channel_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """``ReLU(sum_k w_k * A_k)``: the usual CAM combination, (N, 1, h, w)."""
    return F.relu((weights * activations).sum(dim=1, keepdim=True))


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is non-zero, 0 elsewhere (with finite gradients)."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


def min_max_scale(maps: Tensor) -> Tensor:
    """Each (1, H, W) map of (N, 1, H, W) scaled to [0, 1] over its pixels (0 where it is constant)."""
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    return safe_divide(flat - low, flat.amax(dim=1, keepdim=True) - low).view_as(maps)


class CAM(Explainer):
    """Base class of class activation maps; see the module docstring for layers, output and cost.

    A subclass sets ``uses_gradients`` and overrides :meth:`_weights` (channel or element-wise weights) and, if
    needed, :meth:`_combine` or :meth:`_layer_map`; methods with extra passes override :meth:`_explain`.
    """

    kind = "cam"
    argmax_on_rows = True
    defaults: ClassVar[Dict[str, Any]] = {"target_layer": None, "reshape_transform": None, "layer_fusion": "mean"}
    #: whether the map needs d score / d activation (one backward to the layer); False: a forward is enough
    uses_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        if target_layer is not None:
            options["target_layer"] = target_layer
        super().__init__(model, **options)

    # ------------------------------------------------------------------------------------------------- layers
    def target_layers(self, x: Tensor, target_layer: LayerSpec = None,
                      reshape_transform: ReshapeTransform = None) -> List[nn.Module]:
        """The modules a call on ``x`` captures (``target_layer=None``: the default layer for x's shape)."""
        if target_layer is not None:
            return resolve_layers(self.model, target_layer)
        if reshape_transform is not None:
            raise ValueError("with a reshape_transform, name the layer to capture: pass target_layer")
        return [self._default_module(x, default_layer)]

    # ---------------------------------------------------------------------------------------------- capture
    def _capture(self, rows: Tensor, owners: Tensor, target: Target, layers: Sequence[nn.Module],
                 reshape_transform: ReshapeTransform, create_graph: bool,
                 gradients: bool) -> Tuple[Tensor, List[Tensor], List[Optional[Tensor]]]:
        """One forward of ``rows``: (model outputs, activations, gradients of the target score or None)."""
        record_from_layer = gradients and not create_graph
        with LayerCapture(layers, reshape_transform, record_from_layer, self.model, rows.shape[-2:]) as capture:
            with torch.set_grad_enabled(create_graph):
                outputs = self._forward(rows)
            scores = target(outputs, owners)
            activations = capture.activations()
            grads: List[Optional[Tensor]] = [None] * len(layers)
            if gradients:
                grads = list(self._layer_gradients(capture, scores.sum(), create_graph))
        dtype = accumulation_dtype(rows)
        for layer, act in zip(layers, activations):
            if act.dim() != 4:
                raise ValueError(
                    f"the output of layer {self._name(layer)!r} has shape {tuple(act.shape)}; CAMs need (B, C, h, w): "
                    "pass a reshape_transform that brings it to that shape"
                )
        if not create_graph:
            activations = [a.detach() for a in activations]
            grads = [None if g is None else g.detach() for g in grads]
        activations = [a.to(dtype) for a in activations]
        grads = [None if g is None else g.to(dtype) for g in grads]
        return outputs, activations, grads

    def _capture_all(self, x: Tensor, target: Target, layers: Sequence[nn.Module],
                     reshape_transform: ReshapeTransform, batch_size: Optional[int],
                     create_graph: bool) -> List[Tensor]:
        """Activations of every image at every layer (forwards only), resolving ``target=None`` to classes."""
        return self._capture_with_scores(x, target, layers, reshape_transform, batch_size, create_graph)[0]

    def _row_sums(self, x: Tensor, per_image: int, points: Callable[[Tensor, Tensor], Tensor], target: Target,
                  layers: Sequence[nn.Module], reshape_transform: ReshapeTransform, batch_size: Optional[int],
                  create_graph: bool, term: Callable[[Tensor, Tensor], Tensor]) -> List[Tensor]:
        """Per layer, the sum over each image's ``per_image`` rows ``points(owners, step)`` (image-major, in passes of
        ``batch_size`` rows) of ``term(activation, gradient)`` at the layer: (B, ...) each."""
        totals: List[Optional[Tensor]] = [None] * len(layers)
        for start, stop in RowPlanner(x.shape[0] * per_image, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            owners, step = index // per_image, index % per_image
            _, acts, grads = self._capture(points(owners, step), owners, target, layers, reshape_transform,
                                           create_graph, True)
            for i, (act, grad) in enumerate(zip(acts, grads)):
                value = term(act, grad)
                if totals[i] is None:
                    totals[i] = value.new_zeros((x.shape[0],) + tuple(value.shape[1:]))
                totals[i] = totals[i].index_add(0, owners, value)
        return totals  # type: ignore[return-value]

    def _capture_with_scores(self, x: Tensor, target: Target, layers: Sequence[nn.Module],
                             reshape_transform: ReshapeTransform, batch_size: Optional[int],
                             create_graph: bool) -> Tuple[List[Tensor], Tensor]:
        """Every image's activations at every layer and its target score (B,), from the same forwards;
        resolves ``target=None`` to classes."""
        per_layer: List[List[Tensor]] = [[] for _ in layers]
        scores, classes = [], []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            outputs, acts, _ = self._capture(x[start:stop], owners, target, layers, reshape_transform,
                                             create_graph, gradients=False)
            with torch.set_grad_enabled(create_graph):
                scores.append(target(outputs, owners))
            classes.append(outputs.argmax(dim=1))
            for store, act in zip(per_layer, acts):
                store.append(act)
        if target.pending:
            target.classes = torch.cat(classes)
        activations = [torch.cat(chunks) for chunks in per_layer]
        return activations, torch.cat(scores).to(activations[0].dtype)

    def _layer_gradients(self, capture: LayerCapture, score: Tensor, create_graph: bool) -> List[Tensor]:
        """What reaches :meth:`_weights` as ``gradients``: ``d score / d activation`` at each captured layer."""
        return capture.gradients(score, create_graph)

    def _name(self, layer: nn.Module) -> str:
        return layer_name(self.model, layer)

    # -------------------------------------------------------------------------------------------------- maps
    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        """Weights broadcastable to the activations: (N, C, 1, 1) per channel or (N, C, h, w) per element."""
        raise NotImplementedError

    def _combine(self, weights: Tensor, activations: Tensor) -> Tensor:
        """The layer's map from weights and activations; default ``ReLU(sum_k w_k A_k)``."""
        return channel_sum(weights, activations)

    def _layer_map(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        """(N, 1, h, w) map of one layer."""
        return self._combine(self._weights(activations, gradients, **options), activations)

    @staticmethod
    def _fuse(maps: Sequence[Tensor], size: Sequence[int], fusion: str) -> Tensor:
        """Upsample each layer's map to ``size`` and fuse them (mean or max)."""
        if fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {fusion!r}")
        maps = [upsample(m, size) for m in maps]
        if fusion == "product":
            maps = [min_max_scale(m) for m in maps]
        if len(maps) == 1:
            return maps[0]
        stacked = torch.stack(maps)
        if fusion == "product":
            return stacked.prod(dim=0)
        return stacked.mean(dim=0) if fusion == "mean" else stacked.amax(dim=0)

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, batch_size: Optional[int], create_graph: bool, **options: Any) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            _, acts, grads = self._capture(x[start:stop], owners, target, layers, reshape_transform, create_graph,
                                           self.uses_gradients)
            maps = [self._layer_map(a, g, **options) for a, g in zip(acts, grads)]
            chunks.append(self._fuse(maps, x.shape[-2:], layer_fusion))
        return torch.cat(chunks)
