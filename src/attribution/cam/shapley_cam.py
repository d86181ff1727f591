"""ShapleyCAM."""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import Tensor

from ..core.capture import LayerCapture
from ..core.registry import register
from .base import CAM


@register("shapley_cam")
class ShapleyCAM(CAM):
    """ShapleyCAM: Grad-CAM with the gradient corrected by half the Hessian-vector product with the activations.

    Cai, "CAMs as Shapley Value-based Explainers", arXiv:2501.06261, 2025.

    A second-order Taylor expansion of the score around the activations gives each channel's Shapley value in
    closed form: ``w_k = mean_ij (g - H A / 2)_k`` with ``g = dy/dA`` and ``H = d^2 y / dA^2``,
    ``map = ReLU(sum_k w_k A_k)``.  Between a ReLU network's layer and its logits the score is piecewise linear, so
    ``H A = 0`` and the map is Grad-CAM's; the term matters for smooth activations (SiLU, GELU) and for scores
    through a softmax: ``score='rest'`` is the paper's residual-softmax target-class utility ``y_c + log p_c``
    (``score='logit'`` by default, as pytorch-grad-cam's ShapleyCAM).
    Cost: one forward, one gradient to the layer that keeps its graph, and one more backward of that gradient per
    layer (the Hessian-vector product: ``H A = d (g . A) / dA`` with ``A`` held fixed), all from the score down to
    the layer only.  With several layers each layer's product is its own (as pytorch-grad-cam's and the paper's),
    so each layer's map equals that layer explained alone.  Works with in-place ReLUs (autograd differentiates ``threshold_backward`` a second time; no
    backward hooks).  Same formula as pytorch-grad-cam's ``ShapleyCAM``; with a ``reshape_transform`` the product
    ``g . A`` is taken over the reshaped elements (pytorch-grad-cam takes it over the raw layer output, which
    differs only for transforms that drop elements, such as a class token).  The passes run
    ``F.scaled_dot_product_attention`` with its math kernel (``needs_second_derivative``): the fused kernels
    (vision transformers) have no second derivative.
    """

    needs_second_derivative = True

    def _layer_gradients(self, capture: LayerCapture, score: Tensor, create_graph: bool) -> List[Tensor]:
        grads = capture.gradients(score, create_graph=True)
        return [g - 0.5 * self._hessian_product(capture, i, g, a, create_graph)
                for i, (g, a) in enumerate(zip(grads, capture.activations()))]

    @staticmethod
    def _hessian_product(capture: LayerCapture, index: int, gradient: Tensor, activation: Tensor,
                         create_graph: bool) -> Tensor:
        """``H A`` at layer ``index`` alone: the derivative of ``g . A`` w.r.t. that layer's output with ``A`` held
        fixed (one backward per layer, so no other layer's product leaks in).  With ``create_graph`` the product
        keeps ``A``'s own dependence on the parameters: ``d (H A) / d theta`` includes ``H dA / d theta``."""
        if not gradient.requires_grad:  # the gradient does not depend on the layer: H = 0
            return torch.zeros_like(gradient)
        vector = activation if create_graph else activation.detach()
        (product,) = torch.autograd.grad(gradient, capture.outputs[index], grad_outputs=vector,
                                         retain_graph=True, create_graph=create_graph, allow_unused=True)
        if product is None:
            return torch.zeros_like(gradient)
        return capture.transform(index)(product)

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return gradients.mean(dim=(2, 3), keepdim=True)
