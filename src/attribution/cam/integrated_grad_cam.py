"""Integrated Grad-CAM: Grad-CAM maps of the points on the straight line from a baseline to the image, summed."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..core.capture import ReshapeTransform
from ..core.explainer import positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from ..gradients.paths import BaselineSpec, make_baseline
from .base import CAM, FUSIONS, channel_sum


def path_rows(x: Tensor, baseline: BaselineSpec, alphas: Tensor):
    """``points(owners, step)``: the rows ``b + alphas[step] (x - b)`` of the straight path of each owner's image,
    in ``x``'s dtype (the baseline and the difference are formed once, in the accumulation dtype)."""
    dtype = accumulation_dtype(x)
    start = make_baseline(x, baseline).to(dtype)
    delta = x.to(dtype) - start
    alphas = alphas.to(device=x.device, dtype=dtype)

    def points(owners: Tensor, step: Tensor) -> Tensor:
        return (start[owners] + alphas[step].view(-1, 1, 1, 1) * delta[owners]).to(x.dtype)

    return points


@register("integrated_grad_cam")
class IntegratedGradCAM(CAM):
    """Integrated Grad-CAM: the sum of the Grad-CAM maps of the images on the straight path from a baseline.

    Sattarzadeh, Sudhakar, Plataniotis, Jang, Jeong & Kim, "Integrated Grad-CAM: Sensitivity-Aware Visual
    Explanation of Deep Convolutional Networks via Integrated Gradient-Based Scoring", ICASSP 2021,
    arXiv:2102.07805.

    With ``x_i = b + (i/m) (x - b)``, ``i = 0..m-1`` (``m = steps``, the image itself not among them):
    ``map = sum_i ReLU(sum_k A_k(x_i) mean_uv dy/dA_k(x_i))``, each point's Grad-CAM map rectified, then summed
    (not averaged), as the authors' notebook (``integrated_gradcam`` in smstrzd/IntegratedGradCAM,
    ``Integrated_Grad_CAM.ipynb``).  Defaults as that notebook: ``steps=50``, ``baseline='zero'`` (the all-zero
    input; the notebook feeds images in [0, 1], where that is black: with normalised inputs ``'black'`` is
    the black image).  ``baseline`` takes what :class:`~attribution.gradients.integrated.IntegratedGradients`
    takes: ``'zero'``, ``'black'``, ``'white'``, a number or a tensor.  ``y`` is the target's logit by default
    (the notebook backpropagates a one-hot vector from the model's outputs).
    Cost: ``steps`` forwards and gradients to the layer per image, ``batch_size`` rows per pass (one more forward
    per image when ``target=None``: the points are not the image).

    Deliberate differences: none from the working notebook.  The repository's ``utils.py`` subtracts the baseline
    from the activations in each point's map (``(A(x_i) - baseline) * weight``), but passes the input-sized baseline
    image there (its ``None`` default too is replaced by the input-sized ``input[0] * 0``), which does not broadcast
    to a layer's activations, so that version does not run; with a zero baseline at the layer it would be the
    notebook's formula.  The notebook is the reference: the paper's own equation was not at hand to compare (only
    its abstract).
    """

    argmax_on_rows = False  # the path points are not the image: None is resolved to the image's arg-max first
    defaults: Dict[str, Any] = {**CAM.defaults, "steps": 50, "baseline": "zero"}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, steps: int, baseline: BaselineSpec, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        steps = positive_int(steps, "steps")
        points = path_rows(x, baseline, torch.arange(steps, dtype=torch.float64) / steps)
        layers = self.target_layers(x, target_layer, reshape_transform)
        totals = self._row_sums(x, steps, points, target, layers, reshape_transform, batch_size, create_graph,
                                lambda act, grad: channel_sum(grad.mean(dim=(2, 3), keepdim=True), act))  # rectified
        return self._fuse(totals, x.shape[-2:], layer_fusion)
