"""Expected Grad-CAM: Grad-CAM whose gradient is the smoothed expectation of the layer's gradients over Expected
Gradients' paths (references drawn from a distribution, a random point on each path, noise on the image)."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..core.capture import ReshapeTransform
from ..core.explainer import non_negative_number, optional_generator, positive_int
from ..core.layers import LayerSpec
from ..core.registry import register
from ..core.targets import Target
from ..gradients.expected import expected_paths
from ..gradients.smoothgrad import range_sigma
from ..gradients.paths import BaselineSpec
from .base import CAM, FUSIONS, channel_sum

PathRows = Callable[[Tensor, Tensor], Tensor]


def expected_path_rows(x: Tensor, references: BaselineSpec, samples: int, std: float,
                       generator: Optional[torch.Generator]) -> PathRows:
    """``points(owners, step)``: Expected Gradients' sample ``step`` of each owner's image, in ``x``'s dtype,
    ``r_s + a_s (x + sigma n_s - r_s)``, from :func:`~attribution.gradients.expected.expected_paths` (its draws,
    in its order, shared by the images) with the noise scaled per image by ``sigma = std (max x - min x)``
    (SmoothGrad's relative noise level).  A same-seeded ``generator`` gives ExpectedGradients the same references,
    points and (unscaled) noise."""
    scale = range_sigma(x, std).view(-1) if std > 0 else None
    paths = expected_paths(x, references, samples, scale, generator)

    def points(owners: Tensor, step: Tensor) -> Tensor:
        return paths(owners, step)[0].to(x.dtype)

    return points


@register("expected_grad_cam")
class ExpectedGradCAM(CAM):
    """Expected Grad-CAM: Grad-CAM with the layer's gradient replaced by its smoothed expectation over Expected
    Gradients' paths.

    Buono, Sheikholharam Mashhadi, Rahat, Tiwari & Byttner, "Expected Grad-CAM: Towards gradient faithfulness",
    arXiv:2406.01274 (2024).

    With references ``r ~ D`` (uniform over ``references``), points ``a ~ U(0, 1)`` and kernel-smoothing noise
    ``e ~ N(0, sigma^2)`` on the image (``sigma = std (max x - min x)``, per image), the points
    ``z = r + a (x + e - r)`` and ``g(z) = dy/dA`` at the layer there:
    ``w_k = mean_uv E_{r, a, e}[g_k(z)]`` (a Monte Carlo mean over ``samples`` draws), ``map = ReLU(sum_k w_k A_k(x))``
    with ``A`` the activations of the image itself.  So only Grad-CAM's gradient changes; with ``std=0`` and the
    image as its own reference it is Grad-CAM, and where the score is linear in the layer (a constant gradient) it is
    Grad-CAM whatever is drawn.  The draws are Expected Gradients' (see :func:`expected_path_rows`; the noise is
    added to the image before interpolating, as GradientSHAP's kernel smoothing of Expected Gradients), once per
    call and shared by the images, so an image's map does not depend on the other images or on ``batch_size``;
    ``generator`` makes them reproducible.  ``references`` takes what ExpectedGradients takes: a (N, C, H, W) set
    such as a batch of training images (Expected Gradients' data distribution), or a name or number
    (``'black'``, ``'white'``, ``'zero'``: each image its one reference).
    Defaults: ``references='black'`` (ExpectedGradients' default here), ``samples=50``, ``std=0.15`` (SmoothGrad's
    noise level, as this library's SmoothGrad); the paper's own values could not be checked (see below).
    Cost: one forward of the images (it also resolves ``target=None``), then ``samples`` forwards and gradients to
    the layer per image, ``batch_size`` rows per pass.

    Deliberate differences and caveats: the authors' repository (espressoshock/pytorch-expected-gradcam) published
    no code, and only the paper's abstract could be read here, so the formula above is this library's reading of
    "the smoothed expectation of the perturbed integrated gradients" replacing Grad-CAM's gradient "exclusively":
    the weights hold no ``A(x) - A(r)`` factor (the activations of the image already multiply them, as in Grad-CAM;
    RSI-Grad-CAM is the variant whose weights integrate the gradient against the activations), and the defaults are
    not the paper's.
    """

    defaults: Dict[str, Any] = {**CAM.defaults, "references": "black", "samples": 50, "std": 0.15,
                                "generator": None}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, references: BaselineSpec, samples: int, std: float,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        samples = positive_int(samples, "samples")
        points = expected_path_rows(x, references, samples, non_negative_number(std, "std"), optional_generator(generator))
        layers = self.target_layers(x, target_layer, reshape_transform)
        clean = self._capture_all(x, target, layers, reshape_transform, batch_size, create_graph)  # resolves None
        weights = self._expected_weights(x, points, samples, target, layers, reshape_transform, batch_size,
                                         create_graph)
        maps = [channel_sum(w[:, :, None, None], a) for w, a in zip(weights, clean)]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _expected_weights(self, x: Tensor, points: PathRows, samples: int, target: Target, layers: List[Any],
                          reshape_transform: ReshapeTransform, batch_size: Optional[int],
                          create_graph: bool) -> List[Tensor]:
        """(B, C) per layer: the mean over the samples of the spatially averaged gradient at the layer."""
        totals = self._row_sums(x, samples, points, target, layers, reshape_transform, batch_size, create_graph,
                                lambda act, grad: grad.mean(dim=(2, 3)))
        return [total / samples for total in totals]
