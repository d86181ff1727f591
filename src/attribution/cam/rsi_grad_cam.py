"""RSI-Grad-CAM: Grad-CAM with the layer's integrated gradients, a Riemann-Stieltjes sum along the path."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.capture import ReshapeTransform
from ..core.explainer import positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.paths import BaselineSpec
from .base import CAM, FUSIONS, channel_sum
from .integrated_grad_cam import path_rows


@register("rsi_grad_cam")
class RSIGradCAM(CAM):
    """RSI-Grad-CAM: each channel weighted by the spatial mean of its integrated gradients at the layer.

    Lucas, Lerma, Furst & Raicu, "Visual Explanations from Deep Networks via Riemann-Stieltjes Integrated
    Gradient-based Localization" (RSI-Grad-CAM), ISVC 2022, arXiv:2205.10900.

    With the points ``x_j = b + (j/m) (x - b)``, ``j = 0..m`` (``m = steps``, both ends included), ``A_j`` the
    layer's activations and ``g_j = dy/dA`` there, the integral of the gradient against the activations along the
    path is the trapezoidal Riemann-Stieltjes sum ``IG = sum_{j<m} (g_j + g_{j+1})/2 (A_{j+1} - A_j)`` (element-wise);
    ``w_k = mean_uv IG_k``, ``map = ReLU(sum_k w_k A_k(x))``.  With ``positive_gradients=True`` (default) each
    ``g_j`` is rectified first, ``ReLU(g_j)``, as the authors' PyTorch notebooks
    (``RSI_Grad_CAM_PyTorch_w_ResNet50.ipynb``, ``RSI_Grad_CAM_pytorch.ipynb`` in mlerma54/RSIGradCAM) do; with
    ``False`` the sum is the plain one, whose total ``sum_kuv IG`` is ``y(x) - y(b)`` up to the trapezoid's error
    (exactly so when ``y`` is linear in the layer).  Defaults as those notebooks: ``steps=50`` (51 points),
    ``score='softmax'`` (their ``add_softmax=True``: the paper explains post-softmax outputs), ``baseline='black'``
    (they pass the black image through the ImageNet normalisation, i.e. each channel's own black value; ``'black'``
    here is each image's minimum over all channels, and a tensor baseline reproduces theirs exactly).  ``baseline``
    takes what :class:`~attribution.gradients.integrated.IntegratedGradients` takes.
    Cost: ``steps + 1`` forwards and gradients to the layer per image, ``batch_size`` rows per pass (one more
    forward per image when ``target=None``).

    Deliberate differences: the channels are summed, as Grad-CAM (and the authors' Keras notebook); the PyTorch
    notebooks average them, ``1/C`` times this map.  Their Keras notebook (``RSI_Grad_CAM.ipynb``) does not rectify
    the gradients but keeps only the units where ``A(x) > 0``, ``IG > 0`` and ``A(x) - A(b) > 0``: not offered.
    """

    argmax_on_rows = False  # the image is only its path's last point: None is resolved to its arg-max first
    defaults: Dict[str, Any] = {**CAM.defaults, "steps": 50, "baseline": "black", "positive_gradients": True,
                                "score": "softmax"}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, steps: int, baseline: BaselineSpec, positive_gradients: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        steps = positive_int(steps, "steps")
        if not isinstance(positive_gradients, bool):
            raise TypeError(f"positive_gradients must be a bool, got {positive_gradients!r}")
        points = path_rows(x, baseline, torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64))
        layers = self.target_layers(x, target_layer, reshape_transform)
        per_image = steps + 1
        weights: List[Optional[Tensor]] = [None] * len(layers)  # (B, C): mean_uv of the Riemann-Stieltjes sum
        finals: List[Optional[Tensor]] = [None] * len(layers)  # (B, C, h, w): the activations of the image itself
        carry: List[Optional[tuple]] = [None] * len(layers)  # the previous row's (activation, gradient)
        for start, stop in RowPlanner(x.shape[0] * per_image, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            owners, step = index // per_image, index % per_image  # rows image-major, each image's path in order
            _, acts, grads = self._capture(points(owners, step), owners, target, layers, reshape_transform,
                                           create_graph, True)
            last = step == steps
            for i, (act, grad) in enumerate(zip(acts, grads)):
                if positive_gradients:
                    grad = F.relu(grad)
                if weights[i] is None:
                    weights[i] = act.new_zeros(x.shape[:1] + act.shape[1:2])
                    finals[i] = act.new_zeros(x.shape[:1] + act.shape[1:])
                    carry[i] = (torch.zeros_like(act[:1]), torch.zeros_like(grad[:1]))
                before_act = torch.cat([carry[i][0], act[:-1]])
                before_grad = torch.cat([carry[i][1], grad[:-1]])
                carry[i] = (act[-1:], grad[-1:])
                terms = ((before_grad + grad) / 2 * (act - before_act)).mean(dim=(2, 3))  # (n, C)
                terms = torch.where((step > 0)[:, None], terms, torch.zeros_like(terms))  # a path's first point
                weights[i] = weights[i].index_add(0, owners, terms)
                # the image's own activations (its path's last point), without a boolean selection (a device sync)
                finals[i] = finals[i].index_add(0, owners, act * last.view(-1, 1, 1, 1).to(act.dtype))
        maps = [channel_sum(w[:, :, None, None], a) for w, a in zip(weights, finals)]
        return self._fuse(maps, x.shape[-2:], layer_fusion)
