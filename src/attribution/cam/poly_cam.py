"""Poly-CAM: score-weighted CAMs of every resolution stage, multiplied from the coarsest to the finest."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.layers import LayerSpec, resolve_layers
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.targets import Target
from .base import CAM, channel_sum, upsample
from .score_cam import duplicate_groups, group_rows

#: the paper's three ways of weighting a channel from masked forwards: PCAM+ ("p"), PCAM- ("m"), PCAM+/- ("pm")
VARIANTS = ("pm", "p", "m")
#: the percentiles (in %) that :func:`percentile_scale` maps to 0 and reads the scale from, as the authors' code
OUTLIER_PERCENT = 0.1
#: the floor of the divisors of :func:`percentile_scale` and :func:`local_normalization`, as the authors' code
EPS = 1e-12


def percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile (``q`` in [0, 100]) over the last dim, linear interpolation (NumPy's default)."""
    count = values.shape[-1]
    position = q / 100 * (count - 1)
    low = int(math.floor(position))
    high = min(low + 1, count - 1)
    ordered = values.sort(dim=-1).values
    return ordered[..., low] + (ordered[..., high] - ordered[..., low]) * (position - low)


def percentile_scale(maps: Tensor) -> Tensor:
    """Each (h, w) map of (..., h, w) brought to [0, 1] as the authors' ``normalize``: minus its 0.1st percentile,
    divided by its 99.9th percentile (floored at 1e-12, not the range), clipped to [0, 1]."""
    flat = maps.flatten(-2)
    low = percentile(flat, OUTLIER_PERCENT).unsqueeze(-1)
    high = percentile(flat, 100 - OUTLIER_PERCENT).unsqueeze(-1)
    return ((flat - low) / high.clamp_min(EPS)).clamp(0, 1).view_as(maps)


def local_normalization(cam: Tensor, coarse_size: Sequence[int]) -> Tensor:
    """``cam`` (N, 1, h, w) divided by itself resized (bilinear) to ``coarse_size`` and back, floored at 1e-12:
    the paper's LNorm, which keeps only the detail that the finer layer adds inside each coarse cell."""
    factor = upsample(upsample(cam, coarse_size), cam.shape[-2:])
    return cam / factor.clamp_min(EPS)


def _spatial(value: Any) -> Optional[Tuple[int, int]]:
    return (int(value.shape[-2]), int(value.shape[-1])) if isinstance(value, Tensor) and value.dim() == 4 else None


def stage_ends(model: nn.Module, x: Tensor) -> List[str]:
    """Poly-CAM's default layers for ``model`` on inputs shaped like ``x``: the end of every resolution stage.

    One forward of ``x[:1]`` with hooks on every module records each call's start, end, input size (the first
    tensor argument's (h, w) when it is (B, C, h, w)) and output size.  A *downsampling call* takes a (B, C, h, w)
    map and returns a smaller one, that size for good (no call that ends later returns a map of its input's size:
    squeeze-excitation poolings and channels-last permutations are not stages), and holds no downsampling call of
    other sizes (so a container of several stages, e.g. VGG's ``features``, is not one).  Walking them in order,
    from the input's resolution: each one that starts from the current resolution closes its stage, whose end is the
    call that finished last before it started with an output at that resolution (the outermost module ending the
    stage); the current resolution becomes its output's.  A module called several times counts at its last call
    (what the capture keeps), so a shared activation qualifies only there.  A stage that opens with its first
    module (a strided stem) has no end, and the last stage counts only when a downsampling call (a global pooling
    module) follows it: flattening right after the last map ends nothing, as the authors' rule.

    torchvision ResNet-18/50: ``relu, layer1, layer2, layer3, layer4``; VGG-16: ``features.3, 8, 15, 22, 29``
    (the authors' lists); EfficientNet-B0: ``features.1, .2, .3, .5, features``; DenseNet: ``features.relu0`` and
    ``denseblock1..3``; efficientnet_lite_pytorch's Lite0: ``_blocks.0, 2, 4, 10`` and ``_swish`` (the head).
    """
    names = {module: name for name, module in model.named_modules() if name}
    calls: List[Dict[str, Any]] = []
    open_calls: List[int] = []
    clock = [0]

    def before(module: nn.Module, inputs: Tuple[Any, ...]) -> None:
        first = next((value for value in inputs if isinstance(value, Tensor)), None)
        calls.append({"name": names[module], "start": clock[0], "end": None, "in": _spatial(first), "out": None})
        open_calls.append(len(calls) - 1)
        clock[0] += 1

    def after(module: nn.Module, inputs: Tuple[Any, ...], output: Any) -> None:
        call = calls[open_calls.pop()]
        call["end"], call["out"] = clock[0], _spatial(output)
        clock[0] += 1

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        with torch.no_grad():
            model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    done = [c for c in calls if c["end"] is not None]
    last_call = {c["name"]: c for c in done}

    def shrinks(c: Dict[str, Any]) -> bool:
        size_in, size_out = c["in"], c["out"]
        return (size_in is not None and size_out is not None and size_in != size_out
                and size_out[0] <= size_in[0] and size_out[1] <= size_in[1])

    downsampling = [c for c in done if shrinks(c)
                    and not any(o["end"] > c["end"] and o["out"] == c["in"] for o in done)]
    stages = [c for c in downsampling
              if all((o["in"], o["out"]) == (c["in"], c["out"]) for o in downsampling
                     if c["start"] < o["start"] and o["end"] < c["end"])]
    current = (int(x.shape[-2]), int(x.shape[-1]))
    chosen: List[str] = []
    for stage in sorted(stages, key=lambda c: c["start"]):
        if stage["in"] != current:
            continue
        ends = [c for c in done if c["end"] < stage["start"] and c["out"] == current and last_call[c["name"]] is c]
        if ends:
            name = max(ends, key=lambda c: c["end"])["name"]
            if name not in chosen:
                chosen.append(name)
        current = stage["out"]
    return chosen


class StageEndCAM(CAM):
    """A CAM over several layers whose default (``target_layer=None``) is the end of every resolution stage,
    :func:`stage_ends` for each input shape (found once per shape by one forward with hooks); on models whose
    (B, C, h, w) maps never shrink (vision transformers) the library's default CAM layer alone.  A list given must run
    shallow to deep."""

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(model, target_layer, **options)
        self._stage_names: Dict[Tuple[int, ...], List[str]] = {}

    def target_layers(self, x: Tensor, target_layer: LayerSpec = None,
                      reshape_transform: ReshapeTransform = None) -> List[nn.Module]:
        """The layers a call on ``x`` combines, shallow to deep (``None``: :func:`stage_ends` for x's shape)."""
        if target_layer is not None:
            return resolve_layers(self.model, target_layer)
        if reshape_transform is not None:
            raise ValueError("with a reshape_transform, name the layers to combine: pass target_layer=[...]")
        modules = dict(self.model.named_modules())
        key = tuple(x.shape[1:])
        names = self._stage_names.get(key)
        if names is None or any(name not in modules for name in names):
            with self._autocast():
                names = stage_ends(self.model, self._model_input(x[:1]))
            if not names:  # no (B, C, h, w) map shrinks (vision transformers): the default CAM layer alone
                names = [self._name(layer) for layer in super().target_layers(x)]
            self._stage_names[key] = names
        return [modules[name] for name in names]


@register("poly_cam")
class PolyCAM(StageEndCAM):
    """Poly-CAM: the CAMs of the last layer of every resolution stage, multiplied from the coarsest to the finest.

    Englebert, Cornu & De Vleeschouwer, "Poly-CAM: High resolution class activation map for convolutional neural
    networks", Machine Vision and Applications 2024 (doi:10.1007/s00138-024-01567-7), arXiv:2204.13359.

    Each layer's map is Score-CAM-like, ``L_l = ReLU(sum_k w_k A_k)``, with masks ``M_k`` = channel ``k``'s
    activation map scaled to [0, 1] at the layer's resolution (:func:`percentile_scale`: 0.1st percentile to 0,
    divided by the 99.9th, clipped), then upsampled bilinearly to the input, and ``f`` the target's softmax
    probability (option ``score``): ``variant='pm'`` (PCAM+/-, the default of the authors' scripts)
    ``w_k = ReLU(f(x M_k) + f(x) - f(x (1 - M_k)))``, ``'p'`` (PCAM+) ``w_k = f(x M_k)``, ``'m'`` (PCAM-)
    ``w_k = ReLU(f(x) - f(x (1 - M_k)))``.  From the deepest layer ``P = L_deepest``, then for each shallower layer
    ``P = ReLU(LNorm(L_l) * U(P))`` with ``U`` bilinear resizing to layer ``l``'s grid and ``LNorm`` (option
    ``local_norm``, default True) :func:`local_normalization`; the output is ``U(percentile_scale(P))`` at the
    input's size, so maps are in [0, 1] by the method's own final normalisation.  With one layer, the map is that
    layer's ``L`` scaled so.

    ``target_layer=None`` (default) takes the end of every resolution stage, found by one forward with hooks per
    input shape (:func:`stage_ends`; ``relu, layer1..layer4`` on a torchvision ResNet, the authors' lists for
    ResNet-50 and VGG-16; on models whose (B, C, h, w) maps never shrink, vision transformers, the library's
    default CAM layer alone); a list given must be in forward order (shallow to deep; finer grids first).
    Cost: one forward per image to capture the layers (and, once per input shape, one to find the default
    layers); per distinct image (copies of an image explained for other classes share them) ``sum_l C_l`` masked
    forwards for ``'p'`` and ``'m'``, twice that for ``'pm'``, with ``C_l`` the channels of layer ``l`` (ResNet-18:
    64 + 64 + 128 + 256 + 512 = 1024 channels, so 2048 forwards per image by default), ``batch_size`` at a time
    under ``torch.inference_mode`` (with autograd when ``create_graph=True``); ``progress=True`` shows a bar.

    Differences from the authors' code (``polycam/core.py``, ``polycam/polycam.py``, ``polycam/utils.py``): the
    scores are the model's outputs (they hook the last module in registration order) and a single-output model
    gets a softmax over one class (they take a sigmoid: pass ``score='logit'`` or a callable target); their layer
    rule takes the module that finished last before each change of output size, which on a ResNet-50 names
    ``layer2.0.relu`` (a module called three times), stops at the first squeeze-excitation pooling of a
    torchvision EfficientNet and takes every same-padding module of efficientnet_lite_pytorch's, where
    :func:`stage_ends` gives their own lists on ResNets and VGG-16 and one layer per stage elsewhere; the
    percentiles stay differentiable (NumPy constants for them).  Only the final map is returned, not their list of
    the intermediate maps.
    """

    uses_gradients = False
    defaults: Dict[str, Any] = {"target_layer": None, "reshape_transform": None, "variant": "pm", "local_norm": True,
                                "score": "softmax", "progress": False}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 variant: str, local_norm: bool, progress: bool, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS} (PCAM+/-, PCAM+, PCAM-), got {variant!r}")
        if not isinstance(local_norm, bool):
            raise TypeError(f"local_norm must be a bool, got {local_norm!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        activations, base = self._capture_with_scores(x, target, layers, reshape_transform, batch_size, create_graph)
        areas = [a.shape[-2] * a.shape[-1] for a in activations]
        if any(deeper > shallower for shallower, deeper in zip(areas, areas[1:])):
            names = [self._name(layer) for layer in layers]
            raise ValueError(f"target_layer must list the layers shallow to deep (grids never growing); got {names} "
                             f"with grids {[tuple(a.shape[-2:]) for a in activations]}")
        sides = {"pm": (0, 1), "p": (0,), "m": (1,)}[variant]
        groups = duplicate_groups(x)
        total = groups.shape[0] * len(sides) * sum(a.shape[1] for a in activations)
        bar = progress_bar(progress, total, f"{type(self).__name__} masked forwards")
        maps = []
        try:
            for acts in activations:
                scores = self._masked_scores(x, acts, target, groups, sides, batch_size, create_graph, bar)
                if variant == "p":
                    weights = scores[0]
                elif variant == "m":
                    weights = F.relu(base[:, None] - scores[1])
                else:
                    weights = F.relu(scores[0] + base[:, None] - scores[1])
                maps.append(channel_sum(weights[:, :, None, None], acts))
        finally:
            bar.close()
        fused = maps[-1]
        for cam in reversed(maps[:-1]):
            if local_norm:
                cam = local_normalization(cam, fused.shape[-2:])
            fused = F.relu(cam * upsample(fused, cam.shape[-2:]))
        return upsample(percentile_scale(fused), x.shape[-2:])

    def _masked_scores(self, x: Tensor, acts: Tensor, target: Target, groups: Tensor, sides: Tuple[int, ...],
                       batch_size: Optional[int], create_graph: bool, bar: Any) -> Tensor:
        """(2, B, C): the target scores of each image times each channel's mask (side 0) and times one minus it
        (side 1); the sides not asked for stay 0.  Identical images share their masked forwards."""
        batch, channels = acts.shape[:2]
        masks = percentile_scale(acts)  # (B, C, h, w) at the layer's grid, upsampled per chunk
        per_image = channels * len(sides)
        side_of = torch.tensor(sides, device=x.device)
        scores = torch.zeros(2 * batch * channels, dtype=acts.dtype, device=x.device)
        for start, stop in RowPlanner(groups.shape[0] * per_image, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            group, channel, side = index // per_image, (index // len(sides)) % channels, side_of[index % len(sides)]
            image, rows, owners = group_rows(groups, group)
            with torch.enable_grad() if create_graph else torch.inference_mode():
                mask = upsample(masks[image, channel].unsqueeze(1), x.shape[-2:])
                mask = torch.where(side.view(-1, 1, 1, 1) == 1, 1 - mask, mask)
                outputs = self._forward(x[image] * mask.to(x.dtype))
                values = target(outputs[rows], owners).to(scores.dtype)
            if not create_graph:
                values = values.clone()  # an ordinary tensor again, outside inference mode
            slot = (side[rows] * batch + owners) * channels + channel[rows]
            scores = scores.index_add(0, slot, values)
            bar.update(stop - start)
        return scores.view(2, batch, channels)
