"""Shap-CAM."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.capture import ReshapeTransform
from ..core.explainer import optional_generator, positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from ..perturbation.shapley_sampling import orderings, shapley_from_prefixes
from .base import FUSIONS, channel_sum
from .edited_layer import EditedLayerCAM


def coalition_rows(activations: Tensor, owners: Tensor, keep: Tensor, positions: Optional[Tensor] = None) -> Tensor:
    """Copies of ``activations[owners]`` in which row ``r`` keeps only the channels where ``keep[r]`` (N, C) is True,
    every other channel set to 0.  ``positions`` (C, h*w), for a layer output that is not (B, C, h, w), says where
    each channel's elements lie in one image's flattened output; elements outside the map (class and register
    tokens) are kept as they are."""
    rows = activations[owners]  # a copy, so the in-place products below leave the layer's output alone
    factor = keep.to(rows.dtype)
    if positions is None:
        return rows.mul_(factor[:, :, None, None])
    rows = rows.contiguous()  # positions index the row-major layout
    flat = rows.view(rows.shape[0], -1)
    spread = torch.ones_like(flat).scatter_(1, positions.flatten().expand(rows.shape[0], -1),
                                            factor.repeat_interleave(positions.shape[1], dim=1))
    return flat.mul_(spread).view(rows.shape)


@register("shap_cam")
class ShapCAM(EditedLayerCAM):
    """Shap-CAM: each channel of the layer weighted by its Shapley value for the target's score.

    Zheng, Wang, Zhou & Lu, "Shap-CAM: Visual Explanations for Convolutional Neural Networks based on Shapley
    Value", ECCV 2022, arXiv:2208.03608.

    The players are the layer's C channels; a coalition ``S`` is scored by running the model on from the layer with
    the channels outside ``S`` set to 0: ``v(S) = f_t(g(A * 1_S))`` (``g`` the modules after the layer).
    ``phi_k = mean_p [v(P_p(k) + {k}) - v(P_p(k))]`` over ``samples`` random orderings ``p`` of the channels, with
    ``P_p(k)`` the channels before ``k`` in ordering ``p`` (Monte Carlo sampling of the Shapley value), and
    ``map = ReLU(sum_k phi_k A_k)``, upsampled bilinearly (raw: not normalised).  The estimate is unbiased, exact
    when all ``C!`` orderings are used (they are, in lexicographic order and with nothing drawn, when
    ``samples >= C!``), and efficient for every sample count: ``sum_k phi_k = v(all) - v(none)``.  Where the
    score is additive over the channels (global average pooling and a linear layer after the layer,
    ``score='logit'``), ``phi_k = w_tk mean(A_k)``, every ordering giving the same.
    ``self.last_shapley_values`` holds the (B, C) values of the last call, one tensor per layer.

    Defaults: ``samples=200`` orderings, ``score='logit'``, channels removed by zeroing them (the coalition game as
    stated above).  The paper's method section could not be read offline: the players follow its abstract (Shapley
    values in place of CAM's unfounded weights of the activation maps; LIFT-CAM's analytic approximation, Jung & Oh
    2021, targets the same channel values), and the three defaults are not confirmed from it: 200 is the sample
    count of the one public student implementation (liuktc/ML4CV_XAI, ``my_shap.py``), which also scores logits.
    ``generator`` (a ``torch.Generator`` on any device, default ``None``: torch's global CPU one) draws the orderings
    on its device, per layer in the order of the layers, as ``samples`` successive ``torch.randperm(C)``
    (the draws of :class:`~attribution.perturbation.shapley_sampling.ShapleyValueSampling`); they are shared by the
    images of the call, so that a seeded generator gives an image the same map alone or in a batch.

    Cost: one forward per image, then ``samples x (C - 1) + 1`` *tail* passes per image (each ordering has C + 1
    prefixes; the empty coalition is shared by the orderings and the full one is the forward itself), e.g.
    409,401 for ResNet-50's ``layer4`` (C = 2048) at the default; ``C! x (C - 1) + 1`` with all orderings.  Only
    the modules after the layer run on the edited copies (see :class:`attribution.cam.edited_layer.EditedLayerCAM`
    for the full-forward fallback, ``use_tail``, ``batch_size`` and ``progress``); no backward.  Token outputs of
    vision transformers are edited on their patch tokens, channel ``k`` being feature ``k`` of every patch token,
    as Ablation-CAM.

    Differences from the student implementation: it takes the layer's *spatial positions* as the players (the
    paper's abstract speaks of "the importance of each pixel"), removes a position by the channel mean and returns
    the values per position with no channel weighting; here the players are the channels, as the CAM combination
    ``sum_k phi_k A_k`` needs, removed by zeroing.
    """

    defaults = {**EditedLayerCAM.defaults, "samples": 200, "generator": None}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(model, target_layer, **options)
        self.last_shapley_values: List[Tensor] = []

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, samples: int, generator: Optional[torch.Generator], use_tail: bool,
                 progress: bool, batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        positive_int(samples, "samples")
        optional_generator(generator)
        layers = self.target_layers(x, target_layer, reshape_transform)
        results = [self._layer_shapley(x, target, layer, reshape_transform, samples, generator, use_tail, progress,
                                       batch_size, create_graph) for layer in layers]
        self.last_shapley_values = [phi.detach() for phi, _ in results]
        return self._fuse([cam for _, cam in results], x.shape[-2:], layer_fusion)

    def _layer_shapley(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                       samples: int, generator: Optional[torch.Generator], use_tail: bool, progress: bool,
                       batch_size: Optional[int], create_graph: bool) -> Tuple[Tensor, Tensor]:
        """((B, C) Shapley values, (B, 1, h, w) map) of one layer."""
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = self._layer_runner(layer, x, batch_size, use_tail)
            maps, positions = self._layer_maps(run, layer, x, reshape_transform)
            acts = run.activations
            channels = maps.shape[1]
            order = orderings(channels, samples, generator).to(acts.device)  # (P, C)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(channels, device=acts.device)
                                                    .expand_as(order))  # rank[p, k]: where channel k comes in p
            steps = max(channels - 1, 1)

            def prefix_rows(image: Tensor, copy: Tensor) -> Tensor:
                """Copy 0: no channel; copy 1 + p (C - 1) + j - 1: the first j channels of ordering p."""
                inner = (copy - 1).clamp(min=0)
                size = torch.where(copy > 0, inner % steps + 1, torch.zeros_like(copy))
                return coalition_rows(acts, image, rank[inner // steps] < size[:, None], positions)

            values = self._edited_scores(run, target, 1 + order.shape[0] * (channels - 1), prefix_rows, batch_size,
                                         progress)
            full = target(run.clean_outputs, torch.arange(x.shape[0], device=x.device))
        dtype = accumulation_dtype(x)
        phi = shapley_from_prefixes(values.to(dtype), full.to(dtype), order)
        return phi, channel_sum(phi[:, :, None, None], maps.to(dtype))
