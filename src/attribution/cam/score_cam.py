"""Score-CAM and its smoothed (SS-CAM) and integrated (IS-CAM) variants: channel weights from masked forwards."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import non_negative_number, optional_generator, positive_int
from ..core.layers import LayerSpec
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS, channel_sum, scale_as_upsampled, upsample


def normalized_masks(activations: Tensor, size: tuple) -> Tensor:
    """(n, h, w) activation maps upsampled to ``size`` and min-max scaled to [0, 1] each (0 where constant): scaled
    at the layer's resolution by the upsampled map's range (:func:`attribution.cam.base.scale_as_upsampled`, exact
    on constant maps), then upsampled once (clamped: the upsampling's rounding leaves ~1e-9 outside [0, 1])."""
    return upsample(scale_as_upsampled(activations.unsqueeze(1), size), size).clamp(0, 1)


class _ScoreWeightedCAM(CAM):
    """Shared machinery: ``w_k = mean_s f_t(x * M_{k,s}) - f_t(baseline)``, ``map = ReLU(sum_k w_k A_k)``.

    ``M_{k,s}`` derives from channel ``k``'s activation map upsampled to the input and min-max scaled
    (:func:`normalized_masks`); subclasses say how (``_perturb``) and how many samples ``s`` per channel.
    """

    uses_gradients = False
    defaults: Dict[str, Any] = {**CAM.defaults, "score": "softmax", "baseline": True, "channel_softmax": False,
                                "progress": False}

    def _samples(self, options: Dict[str, Any]) -> int:
        return 1

    def _check_options(self, options: Dict[str, Any]) -> None:
        """Check a subclass's own options before any pass runs (ValueError/TypeError naming the option)."""
        self._samples(options)

    def _perturb(self, masks: Tensor, sample: Tensor, samples: int, options: Dict[str, Any]) -> Tensor:
        return masks

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, baseline: bool, channel_softmax: bool, progress: bool,
                 batch_size: Optional[int], create_graph: bool, **options: Any) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        for name, flag in (("baseline", baseline), ("channel_softmax", channel_softmax)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self._check_options(options)
        layers = self.target_layers(x, target_layer, reshape_transform)
        activations = self._capture_all(x, target, layers, reshape_transform, batch_size, create_graph)
        offset = self._baseline_scores(x, target, create_graph) if baseline else None
        maps: List[Tensor] = []
        for acts in activations:
            weights = self._channel_scores(x, acts, target, batch_size, create_graph, progress, options)
            if offset is not None:
                weights = weights - offset.unsqueeze(1)
            if channel_softmax:
                weights = weights.softmax(dim=1)
            maps.append(channel_sum(weights[:, :, None, None], acts))
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _baseline_scores(self, x: Tensor, target: Target, create_graph: bool) -> Tensor:
        """``f_t`` of the all-zero image (the fully masked input), for each image's target: (B,)."""
        with torch.set_grad_enabled(create_graph):
            outputs = self._forward(torch.zeros_like(x[:1]))
            owners = torch.arange(x.shape[0], device=x.device)
            return target(outputs.expand(x.shape[0], -1), owners).to(accumulation_dtype(x))

    def _channel_scores(self, x: Tensor, acts: Tensor, target: Target, batch_size: Optional[int],
                        create_graph: bool, progress: bool, options: Dict[str, Any]) -> Tensor:
        """(B, C): the mean target score of the masked copies of each image, one set of copies per channel.

        Identical images (the same image explained for several classes) share their masked forwards.
        """
        batch, channels = acts.shape[:2]
        samples = self._samples(options)
        per_image = channels * samples
        groups = duplicate_groups(x)
        total = groups.shape[0] * per_image
        scores = torch.zeros(batch * channels, dtype=acts.dtype, device=x.device)
        bar = progress_bar(progress, total, f"{type(self).__name__} masked forwards")
        try:
            for start, stop in RowPlanner(total, batch_size, x.device):
                index = torch.arange(start, stop, device=x.device)
                group, channel, sample = index // per_image, (index // samples) % channels, index % samples
                image, rows, owners = group_rows(groups, group)
                with torch.enable_grad() if create_graph else torch.inference_mode():
                    masks = self._perturb(normalized_masks(acts[image, channel], x.shape[-2:]), sample, samples,
                                          options)
                    outputs = self._forward(x[image] * masks.to(x.dtype))
                    values = target(outputs[rows], owners).to(scores.dtype) / samples
                if not create_graph:
                    values = values.clone()  # an ordinary tensor again, outside inference mode
                scores = scores.index_add(0, owners * channels + channel[rows], values)
                bar.update(stop - start)
        finally:
            bar.close()
        return scores.view(batch, channels)


def duplicate_groups(x: Tensor) -> Tensor:
    """(U, M) image indices of each distinct image of the batch, -1 padded; column 0 is the first occurrence."""
    _, inverse = torch.unique(x.flatten(1), dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    counts = torch.bincount(inverse)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(x.shape[0], device=x.device) - starts[inverse[order]]
    table = torch.full((counts.shape[0], int(counts.max())), -1, dtype=torch.long, device=x.device)
    table[inverse[order], position] = order
    return table[torch.argsort(table[:, 0])]


def group_rows(groups: Tensor, group: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """For pass rows of the groups ``group`` (indices into :func:`duplicate_groups`' table): the image each row
    runs (its group's first), and the (row, owner) pairs that hand each row's score to every member of its group."""
    members = groups[group]  # (n, M): every image identical to the row's image
    valid = members >= 0
    rows = torch.arange(group.shape[0], device=group.device).unsqueeze(1).expand_as(members)[valid]
    return groups[group, 0], rows, members[valid]


@register("score_cam")
class ScoreCAM(_ScoreWeightedCAM):
    """Score-CAM: each channel weighted by the target score of the image masked with that channel's map.

    Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu, "Score-CAM: Score-Weighted Visual Explanations for
    Convolutional Neural Networks", CVPR Workshops 2020, arXiv:1910.01279.

    With ``H_k`` channel ``k``'s activation map upsampled (bilinear) to the input and min-max scaled to [0, 1]:
    ``w_k = f_t(x * H_k) - f_t(x_b)``, the paper's channel-wise increase of confidence with the all-zero
    baseline ``x_b`` (the fully masked image); ``map = ReLU(sum_k w_k A_k)``.  ``f_t`` is the target's softmax
    probability by default (``score='softmax'``, as the authors' code); any ``score`` may be chosen.  Options:
    ``baseline`` (True: subtract ``f_t(x_b)``), ``channel_softmax`` (False; True applies a softmax over channels
    to the weights, as pytorch-grad-cam and torchcam do).  Masked copies run ``batch_size`` at a time under
    ``torch.inference_mode`` (with autograd when ``create_graph=True``); ``progress=True`` shows a bar.
    Cost: C masked forwards per distinct image (C = the layer's channels; copies of one image explained for other
    classes share them), one forward per image to capture the layer and one of the zero image for the baseline.

    Difference from pytorch-grad-cam (and the seed library): they weight by a softmax over channels of the raw
    logits of the masked copies, with no baseline, and upsample masks with ``align_corners=True``; that is
    ``ScoreCAM(score='logit', channel_softmax=True)`` up to the mask interpolation (the baseline cancels in a
    softmax over channels).
    """

    defaults = dict(_ScoreWeightedCAM.defaults)


@register("ss_cam")
class SSCAM(_ScoreWeightedCAM):
    """SS-CAM (smoothed Score-CAM): Score-CAM weights averaged over noisy copies of each mask.

    Wang, Naidu, Michael & Kundu, "SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization",
    arXiv:2006.14255, 2020.

    ``w_k = mean_s f_t(x * (H_k + e_s)) - f_t(x_b)`` with ``e_s ~ N(0, std^2)`` per pixel (noise on the mask, the
    paper's first variant), ``samples`` draws (defaults samples=35, std=2.0 as torchcam's SS-CAM), drawn from
    ``generator`` if given; otherwise as :class:`ScoreCAM` (same options).  Not in pytorch-grad-cam.
    Cost: C * samples masked forwards per distinct image.
    """

    defaults = {**_ScoreWeightedCAM.defaults, "samples": 35, "std": 2.0, "generator": None}

    def _samples(self, options: Dict[str, Any]) -> int:
        return positive_int(options["samples"], "samples")

    def _check_options(self, options: Dict[str, Any]) -> None:
        super()._check_options(options)
        non_negative_number(options["std"], "std")
        optional_generator(options["generator"])

    def _perturb(self, masks: Tensor, sample: Tensor, samples: int, options: Dict[str, Any]) -> Tensor:
        std, generator = float(options["std"]), options["generator"]  # checked by _check_options
        if not std:
            return masks
        # drawn on the generator's device (a CPU generator with CUDA masks works), then moved, as SmoothGrad
        noise = torch.randn(masks.shape, generator=generator, dtype=masks.dtype,
                            device=generator.device if generator is not None else masks.device).to(masks.device)
        return masks + std * noise


@register("is_cam")
class ISCAM(_ScoreWeightedCAM):
    """IS-CAM (integrated Score-CAM): Score-CAM weights averaged along masks scaled from 0 to 1.

    Naidu, Ghosh, Maurya, Nayak K & Kundu, "IS-CAM: Integrated Score-CAM for axiomatic-based explanations",
    arXiv:2010.03023, 2020.

    ``w_k = (1/N) sum_{i=1..N} f_t(x * (i/N) H_k) - f_t(x_b)`` with ``N = steps`` (default 10); otherwise as
    :class:`ScoreCAM` (same options).  Not in pytorch-grad-cam.  Cost: C * steps masked forwards per distinct
    image.
    """

    defaults = {**_ScoreWeightedCAM.defaults, "steps": 10}

    def _samples(self, options: Dict[str, Any]) -> int:
        return positive_int(options["steps"], "steps")

    def _perturb(self, masks: Tensor, sample: Tensor, samples: int, options: Dict[str, Any]) -> Tensor:
        return masks * ((sample + 1).to(masks.dtype) / samples).view(-1, 1, 1, 1)

