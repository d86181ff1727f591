"""Fusion-CAM: a denoised gradient-based CAM and a region-based CAM, combined by their contributions to the score
and then fused pixel by pixel according to how much they agree."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec
from ..core.registry import MethodSpec, register, resolve_method
from ..core.targets import Target
from ..gradients.guided_absolute_grad import linear_quantile
from .base import CAM, min_max_scale
from .grad_cam import GradCAM
from .score_cam import ScoreCAM

#: the authors' Score-CAM (their ``scorecam.py``): a softmax over channels of the masked copies' raw logits, with no
#: baseline (a constant per image, which a softmax over channels cancels)
AUTHORS_SCORE_CAM: Dict[str, Any] = {"score": "logit", "channel_softmax": True, "baseline": False}
#: the options Fusion-CAM hands to both component CAMs itself
SHARED_OPTIONS = ("target_layer", "reshape_transform", "layer_fusion", "batch_size", "create_graph", "amp",
                  "channels_last")
#: the authors' epsilon in the normalisation of two contribution weights to a sum of 1
EPS = 1e-8


def denoise(maps: Tensor, theta: float) -> Tensor:
    """(N, 1, H, W) maps with every pixel below the map's own ``theta``-th percentile (linear interpolation, as
    NumPy's ``percentile``) set to 0; pixels at or above it kept."""
    flat = maps.flatten(1)
    threshold = linear_quantile(flat, theta / 100.0)
    return torch.where(flat >= threshold, flat, torch.zeros_like(flat)).view_as(maps)


def normalized_pair(first: Tensor, second: Tensor) -> Tuple[Tensor, Tensor]:
    """Two (N,) contribution weights divided by their sum (plus the authors' 1e-8)."""
    total = first + second + EPS
    return first / total, second / total


def similarity_fusion(first: Tensor, second: Tensor) -> Tensor:
    """Pixel-wise ``s * max(L1, L2) + (1 - s) * (L1 + L2) / 2`` with the agreement ``s = clip(1 - |L1 - L2|, 0, 1)``:
    the larger value where the maps agree, their mean where they differ by 1 or more."""
    agreement = (1 - (first - second).abs()).clamp(0, 1)
    return agreement * torch.maximum(first, second) + (1 - agreement) * 0.5 * (first + second)


@register("fusion_cam")
class FusionCAM(CAM):
    """Fusion-CAM: a denoised Grad-CAM and Score-CAM weighted by how much of the target's probability each keeps,
    then fused pixel-wise by their agreement.

    Dekdegue, Garouani, Mothe & Bernigaud, "Fusion-CAM: Integrating Gradient and Region-Based Class Activation Maps
    for Robust Visual Explanations", arXiv:2603.05386, 2026.

    With ``N`` per-image min-max scaling to [0, 1], ``G`` the gradient-based map, ``R`` the region-based one (both
    upsampled to the input) and ``b(L) = f_t(x * L) - f_t(0)`` (the score of the image masked by ``L`` above the
    all-zero image's): ``L_d = N(G zeroed below its theta-th percentile)``, ``L_r = N(R)``;
    ``(a_d, a_r) = (b(L_d), b(L_r)) / (b(L_d) + b(L_r) + 1e-8)``, ``L_c = N(a_d L_d + a_r L_r)``;
    ``(c, r) = (b(L_c), a_r) / (b(L_c) + a_r + 1e-8)``, ``L1 = c L_c``, ``L2 = r L_r``; and
    ``map = s * max(L1, L2) + (1 - s) * (L1 + L2) / 2`` with ``s = clip(1 - |L1 - L2|, 0, 1)``.

    Defaults as the authors' code (the official repository ``codeforpaper64/Fusion-CAM``, ``fusioncam.py``):
    ``theta=10`` (the paper reports 10-20 as best), ``f_t`` the target's softmax probability (``score='softmax'``; any
    ``score`` may be chosen), Grad-CAM (weights from the target's logit) and the authors' Score-CAM (a softmax over
    channels of the masked copies' raw logits: :data:`AUTHORS_SCORE_CAM`).  Other components may be chosen, as
    the first author's Xplain-CAM library allows: ``gradient_method`` and ``region_method`` (a :class:`CAM` class
    or registry name, at construction) with their own options in ``gradient_options`` / ``region_options`` (dicts,
    at construction and per call, the call's added to the construction's; laid over the method's defaults, and for
    Score-CAM over :data:`AUTHORS_SCORE_CAM`).
    ``target_layer``, ``reshape_transform``, ``layer_fusion``, ``batch_size`` and ``create_graph`` go to both.

    Cost, per image: the two components' (Grad-CAM: one forward and the gradient to the layer; Score-CAM: one
    forward and one masked forward per channel of the layer, shared by copies of one image) plus three masked
    forwards (``L_d``, ``L_r``, then ``L_c``), and one forward of the all-zero image per call; ``target=None``
    adds one forward per image for the arg-max.  Differentiable with ``create_graph=True``.

    Deliberate differences from the authors' code: the map is raw (the code min-max scales it at the end:
    :func:`attribution.cam.base.min_max_scale` gives that); Score-CAM applies its ReLU at the layer's resolution
    before upsampling (the authors' after; the same where the weighted sum is non-negative, e.g. after a ReLU);
    batched, with ``linear_quantile`` in place of ``np.percentile`` (the same interpolation).  The first author's
    Xplain-CAM ``FusionCAM`` differs from the official code: it does not normalise the contribution weights and
    uses a Score-CAM weighted by softmax probabilities; this class follows the official code.
    """

    argmax_on_rows = False  # the components and the masked forwards need the class before they start
    defaults: Dict[str, Any] = {**CAM.defaults, "score": "softmax", "theta": 10.0, "gradient_options": None,
                                "region_options": None}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, gradient_method: MethodSpec = GradCAM,
                 region_method: MethodSpec = ScoreCAM, **options: Any) -> None:
        self.gradient = resolve_method(gradient_method, CAM, "gradient_method")(model)
        self.region = resolve_method(region_method, CAM, "region_method")(model)
        super().__init__(model, target_layer, **options)

    def resolved_options(self, **options: Any) -> Dict[str, Any]:
        merged = super().resolved_options(**options)
        for key in ("gradient_options", "region_options"):
            built, called = self.options.get(key), options.get(key)
            for given in (built, called):
                if given is not None and not isinstance(given, Mapping):
                    cam = self.gradient if key == "gradient_options" else self.region
                    raise TypeError(f"{key} must be a dict of {type(cam).__name__}'s options or None, got {given!r}")
            merged[key] = {**(built or {}), **(called or {})}  # a call's add to the construction's
        return merged

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", gradient_method={type(self.gradient).__name__}, "
                f"region_method={type(self.region).__name__})")

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, theta: float, gradient_options: Optional[Mapping[str, Any]],
                 region_options: Optional[Mapping[str, Any]], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 <= theta <= 100:
            raise ValueError(f"theta must be a percentile in [0, 100], got {theta!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        shared = {"target_layer": layers, "reshape_transform": reshape_transform, "layer_fusion": layer_fusion,
                  "batch_size": batch_size, "create_graph": create_graph}
        authors = AUTHORS_SCORE_CAM if type(self.region) is ScoreCAM else {}
        g_target, g_options = self._component(self.gradient, gradient_options, {}, "gradient_options", target, shared)
        r_target, r_options = self._component(self.region, region_options, authors, "region_options", target, shared)
        denoised = min_max_scale(denoise(min_max_scale(self.gradient._explain(x, g_target, **g_options)),
                                         float(theta)))
        region = min_max_scale(self.region._explain(x, r_target, **r_options)).to(denoised.dtype)
        with torch.set_grad_enabled(create_graph):
            black = self._black_scores(x, target).to(denoised.dtype)
            both = self._contributions(x, torch.cat([denoised, region], dim=1), target, black, batch_size)
            weight_d, weight_r = normalized_pair(both[:, 0], both[:, 1])
            combined = min_max_scale(_scaled(weight_d, denoised) + _scaled(weight_r, region))
            weight_c = self._contributions(x, combined, target, black, batch_size)[:, 0]
            weight_c, weight_r = normalized_pair(weight_c, weight_r)
            return similarity_fusion(_scaled(weight_c, combined), _scaled(weight_r, region))

    def _component(self, cam: CAM, given: Optional[Mapping[str, Any]], fallback: Mapping[str, Any], what: str,
                   target: Target, shared: Dict[str, Any]) -> Tuple[Target, Dict[str, Any]]:
        """A component's target and resolved options: ``given`` (or ``fallback``) over its defaults, plus the
        options Fusion-CAM shares with both components."""
        options = {**fallback, **(given or {})}
        clash = sorted(set(options) & set(SHARED_OPTIONS))
        if clash:
            raise ValueError(f"{what} may not set {clash}: give them to FusionCAM, which passes them to both maps")
        allowed = cam.option_names() - set(SHARED_OPTIONS)
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(f"{what}: {type(cam).__name__} has no option(s) {unknown}; its options are {sorted(allowed)}")
        try:
            merged = cam.resolved_options(**options, **shared)
            component_target = target.with_score(merged.pop("score"))
        except (TypeError, ValueError) as error:
            raise type(error)(f"{what}: {error}") from error
        merged.pop("amp")  # the outer call's autocast and memory format cover the components' passes
        merged.pop("channels_last")
        return component_target, merged

    def _black_scores(self, x: Tensor, target: Target) -> Tensor:
        """``f_t`` of the all-zero image for each image's target: (B,), from one forward."""
        outputs = self._forward(torch.zeros_like(x[:1]))
        return target(outputs.expand(x.shape[0], -1), torch.arange(x.shape[0], device=x.device))

    def _contributions(self, x: Tensor, maps: Tensor, target: Target, black: Tensor,
                       batch_size: Optional[int]) -> Tensor:
        """(B, M): ``f_t(x * L) - f_t(0)`` for each image's M maps ``maps`` (B, M, H, W), ``batch_size`` rows a pass."""
        count = maps.shape[1]
        scores = []
        for start, stop in RowPlanner(x.shape[0] * count, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            image, which = index // count, index % count
            masked = x[image] * maps[image, which].unsqueeze(1).to(x.dtype)
            scores.append(target(self._forward(masked), image).to(black.dtype) - black[image])
        return torch.cat(scores).view(x.shape[0], count)


def _scaled(weights: Tensor, maps: Tensor) -> Tensor:
    """(N,) weights times (N, 1, H, W) maps."""
    return weights.view(-1, 1, 1, 1) * maps
