"""Per-Sample Information Bottleneck Attribution (IBA)."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture, ReshapeTransform, layer_transform
from ..core.explainer import finite_number, optional_generator
from ..core.filters import gaussian_blur
from ..core.layers import LayerSpec
from ..core.optim import Adam
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.resize import linear_reflect_matrix
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import FUSIONS
from .edited_layer import EditedLayerCAM, LayerRunner


def bottleneck_capacity(normalised: Tensor, lamb: Tensor) -> Tensor:
    """Per-unit ``KL(P(Z|R) || Q(Z))`` in nats of the bottleneck ``Z = lamb R + (1 - lamb) eps``, with ``R``
    standardised (``normalised = (R - mu_R) / sigma_R``): ``P(Z|R) = N(lamb R', (1 - lamb)^2)``, ``Q = N(0, 1)``, so
    ``KL = (mu^2 + var - 1 - log var) / 2`` with ``mu = lamb R'``, ``var = (1 - lamb)^2``."""
    var = ((1 - lamb) ** 2).clamp(min=torch.finfo(lamb.dtype).tiny)  # lamb rounded to 1 (alpha >~ 17 in float32)
    return 0.5 * ((normalised * lamb) ** 2 + var - 1 - torch.log(var))


def smoothing_size(sigma: float) -> int:
    """The taps of the authors' Gaussian smoothing of lambda: ``2 round(2 sigma) + 1``."""
    return int(round(2 * sigma)) * 2 + 1


@register("iba")
class IBA(EditedLayerCAM):
    """Per-Sample Information Bottleneck Attribution: the information (in bits) that a layer must let through for
    the model to still predict the target, found by replacing the layer's output with noise where it can.

    Schulz, Sixt, Tombari & Landgraf, "Restricting the Flow: Information Bottlenecks for Attribution", ICLR 2020,
    arXiv:2001.00396 (the per-sample bottleneck; the readout bottleneck needs training and is not here).

    At the layer, ``Z = lambda R + (1 - lambda) eps`` with ``eps ~ N(mu_R, sigma_R)`` per unit and ``lambda =
    G_sigma * sigmoid(alpha)`` (a Gaussian smoothing over space); per image, ``alpha`` (one per unit, from
    ``initial_alpha``) takes Adam steps (learning rate ``lr``) on ``mean_k CE_t(f(Z_k)) + beta mean_units
    KL(P(Z|R) || N(mu_R, sigma_R))`` over ``samples`` noise draws ``k``.  The map is that KL (the capacity, per unit
    in nats: :func:`bottleneck_capacity`) summed over the channels, in bits, scaled by ``h w / (H W)`` (bits per
    input pixel) and resized to the image as the authors' (scikit-image's ``resize(order=1, mode='reflect')``,
    exactly: :func:`attribution.core.resize.linear_reflect_matrix`; torch's bilinear differs at the border):
    (B, 1, H, W), non-negative.  The cross-entropy is ``-`` the target's score, whose default here is
    ``score='log_softmax'``; a callable target is minimised as ``-objective``.  With several layers each has its
    own bottleneck and optimisation, and the maps are fused by ``layer_fusion``.

    Defaults as the authors' code (BioroboticsLab/IBA, ``IBA/pytorch.py``): ``beta=10``, ``iterations=10``
    (``optimization_steps``), ``lr=1``, ``samples=10`` (their ``batch_size`` of noisy copies per step),
    ``initial_alpha=5``, ``sigma=1`` (a ``2 round(2 sigma) + 1``-tap Gaussian, reflected borders; ``sigma=0``: no
    smoothing; maps too small to reflect repeat their edge, where the authors' padding fails), ``min_std=0.01``
    (``sigma_R`` is at least this), ``active_threshold=0.01`` (units nonzero in at most this fraction of the
    reference activations are switched off: their output and capacity are 0), ``relu=False`` (``True`` clamps
    ``Z`` at 0, for layers after a ReLU).  As in their code the map is the capacity of the last forward of the
    optimisation, i.e. at ``alpha`` after ``iterations - 1`` updates (their final update is never seen), so
    ``iterations=0`` (which their code cannot run) and ``1`` both give the capacity at ``initial_alpha``.

    Statistics: ``mu_R``, ``sigma_R`` (unbiased, as their Welford estimator) and the active units come from the
    layer's outputs on ``references``, an (N, C, H, W) tensor of images such as a few batches of training data
    (the authors use about 10,000 training images), merged chunk by chunk (the references reach the device one
    pass at a time; they are recomputed on every call).  ``references=None`` (the default) falls back to the
    images being explained, which differs from the authors' data set and makes an image's map depend on the other
    images of the batch; fewer than two images raise an error (one image alone is its own mean: its map would only
    count its active units).  With ``create_graph`` the statistics carry the graph too.  Layer: the default
    CAM layer (the last spatial block) unless ``target_layer`` names another; the authors use earlier layers
    (conv4_1 of VGG-16), which give finer maps.  Layers whose output is not (B, C, h, w) (tokens, channels-last
    maps) are bottlenecked in the CAM layout (patch tokens only; class and register tokens pass unchanged), as
    Ablation-CAM edits them.

    Noise: drawn once per step, (samples, C, h, w) standard normal from ``generator`` (without one, the global
    generator of the input's device) and shared by the images of the batch, so that an image's map does not depend on the other images (the authors draw per image).  Adam is
    written out (``torch.optim.Adam``'s update), so ``create_graph=True`` differentiates the map through every
    step; ``progress=True`` shows a bar over the steps.  Cost: one forward (plus one per reference image), then
    ``(iterations - 1) x samples`` passes of the modules after the layer (*tail* passes, see
    :class:`attribution.cam.edited_layer.EditedLayerCAM`) with a backward to the layer, per image: 90 by default.
    """

    defaults: Dict[str, Any] = {**EditedLayerCAM.defaults, "score": "log_softmax", "beta": 10.0, "iterations": 10,
                                "lr": 1.0, "samples": 10, "initial_alpha": 5.0, "sigma": 1.0, "min_std": 0.01,
                                "active_threshold": 0.01, "relu": False, "references": None, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, use_tail: bool, progress: bool, beta: float, iterations: int, lr: float,
                 samples: int, initial_alpha: float, sigma: float, min_std: float, active_threshold: float,
                 relu: bool, references: Optional[Tensor], generator: Optional[torch.Generator],
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        for name, value, low in (("beta", beta, 0), ("min_std", min_std, 0), ("sigma", sigma, 0),
                                 ("active_threshold", active_threshold, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not min_std > 0:
            raise ValueError(f"min_std must be positive, got {min_std!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        finite_number(initial_alpha, "initial_alpha")
        for name, value, low in (("iterations", iterations, 0), ("samples", samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {relu!r}")
        if references is not None:
            if not isinstance(references, Tensor):
                raise TypeError(f"references must be None or a (N, C, H, W) tensor, got {type(references).__name__}")
            if references.dim() != 4 or tuple(references.shape[1:]) != tuple(x.shape[1:]) \
                    or references.shape[0] == 0:
                raise ValueError(f"references must be a (N, C, H, W) tensor of images shaped like x's "
                                 f"{tuple(x.shape[1:])}, got shape {tuple(references.shape)}")
        optional_generator(generator)
        layers = self.target_layers(x, target_layer, reshape_transform)
        options = dict(beta=float(beta), iterations=iterations, lr=float(lr), samples=samples,
                       initial_alpha=float(initial_alpha), sigma=float(sigma), min_std=float(min_std),
                       active_threshold=float(active_threshold), relu=relu)
        maps = [self._layer_iba(x, target, layer, reshape_transform, use_tail, progress, references, generator,
                                batch_size, create_graph, **options) for layer in layers]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    def _statistics(self, layer: nn.Module, x: Tensor, maps: Tensor, references: Optional[Tensor],
                    reshape_transform: ReshapeTransform, batch_size: Optional[int], min_std: float,
                    active_threshold: float, create_graph: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """``mu_R``, ``max(sigma_R, min_std)`` and the active-unit mask (C, h, w) from the references' maps, merged
        chunk by chunk (Chan et al.'s pairwise update of the mean and the squared deviations: no chunk's maps are
        kept, no reference is on the device before its chunk), with the graph when ``create_graph``."""
        if references is None:
            chunks = iter([maps])
        else:
            chunks = self._reference_maps(layer, x, references, reshape_transform, batch_size, create_graph)
        count, mean, squares, nonzero = 0, None, None, None
        for part in chunks:
            if part.shape[1:] != maps.shape[1:]:
                raise ValueError(f"the references' maps at layer {self._name(layer)!r} have shape "
                                 f"{tuple(part.shape[1:])}, the images' {tuple(maps.shape[1:])}")
            n = part.shape[0]
            part_mean = part.mean(dim=0)
            part_squares = ((part - part_mean) ** 2).sum(dim=0)
            part_nonzero = (part != 0).to(maps.dtype).sum(dim=0)
            if mean is None:
                mean, squares, nonzero = part_mean, part_squares, part_nonzero
            else:
                delta = part_mean - mean
                mean = mean + delta * (n / (count + n))
                squares = squares + part_squares + delta ** 2 * (count * n / (count + n))
                nonzero = nonzero + part_nonzero
            count += n
        if count < 2:
            raise ValueError("IBA estimates the layer's mean and spread over several images: one image alone is its "
                             "own mean; pass references= (a few batches of images like the training data, the "
                             "authors use thousands)")
        std = (squares / (count - 1)).clamp(min=min_std ** 2).sqrt()  # max(sigma_R, min_std), finite derivative
        active = (nonzero / count > active_threshold).to(maps.dtype)
        return mean, std, active

    def _reference_maps(self, layer: nn.Module, x: Tensor, references: Tensor, reshape_transform: ReshapeTransform,
                        batch_size: Optional[int], create_graph: bool) -> Iterator[Tensor]:
        """The layer's outputs on ``references`` in the CAM layout, one chunk at a time (moved to the device per
        chunk), in the accumulation dtype."""
        dtype = accumulation_dtype(x)
        for a, b in RowPlanner(references.shape[0], batch_size, x.device):
            with torch.set_grad_enabled(create_graph), self._autocast():
                with LayerCapture([layer], model=self.model) as capture:
                    self._forward(references[a:b].to(device=x.device, dtype=x.dtype))
                capture._check_ran()
                raw = capture.outputs[0]
                transform = layer_transform(self.model, layer, raw.shape, x.shape[-2:], reshape_transform)
                yield transform(raw).to(dtype)

    def _layer_iba(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                   use_tail: bool, progress: bool, references: Optional[Tensor], generator: Optional[torch.Generator],
                   batch_size: Optional[int], create_graph: bool, *, beta: float, iterations: int, lr: float,
                   samples: int, initial_alpha: float, sigma: float, min_std: float, active_threshold: float,
                   relu: bool) -> Tensor:
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = self._layer_runner(layer, x, batch_size, use_tail)
            maps, positions = self._layer_maps(run, layer, x, reshape_transform)
        if target.pending:
            target.classes = run.clean_outputs.argmax(dim=1)
        dtype = accumulation_dtype(x)
        maps = maps.to(dtype)
        if not create_graph:
            maps = maps.detach()
        mean, std, active = self._statistics(layer, x, maps, references, reshape_transform, batch_size, min_std,
                                             active_threshold, create_graph)
        normalised = (maps - mean) / std
        size = smoothing_size(sigma) if sigma > 0 else 0

        def lambdas(alpha: Tensor) -> Tensor:
            lamb = torch.sigmoid(alpha)
            return gaussian_blur(lamb, size, sigma, padding="reflect") if size > 1 else lamb

        def capacity(alpha: Tensor) -> Tensor:
            return bottleneck_capacity(normalised, lambdas(alpha)) * active

        alpha = torch.full(maps.shape, initial_alpha, dtype=dtype, device=x.device)
        adam = Adam(lr)
        draw_device = generator.device if generator is not None else x.device
        batch = x.shape[0]
        planner = RowPlanner(batch * samples, batch_size, x.device)
        updates = max(iterations - 1, 0)
        bar = progress_bar(progress, updates, "IBA steps")
        with torch.enable_grad():
            for _ in range(updates):
                noise = torch.randn((samples,) + tuple(maps.shape[1:]), generator=generator, device=draw_device,
                                    dtype=dtype).to(x.device)
                if not alpha.requires_grad:
                    alpha = alpha.requires_grad_(True)
                # the loss's gradient w.r.t. lambda, gathered over the row chunks, then one backward to alpha
                lamb = lambdas(alpha)
                info = beta * (bottleneck_capacity(normalised, lamb) * active).flatten(1).mean(dim=1).sum()
                (grad,) = torch.autograd.grad(info, lamb, retain_graph=True, create_graph=create_graph)
                for start, stop in planner:
                    index = torch.arange(start, stop, device=x.device)
                    image, k = index // samples, index % samples
                    rows = lamb[image]
                    z = (rows * maps[image] + (1 - rows) * (std * noise[k] + mean)) * active
                    if relu:
                        z = z.clamp(min=0)
                    with planner.recording(z), self._autocast():
                        outputs = run(self._place(run, z, image, positions), image)
                    loss = -target(outputs, image).sum() / samples
                    (part,) = torch.autograd.grad(loss, lamb, retain_graph=True, create_graph=create_graph)
                    grad = grad + part
                (grad,) = torch.autograd.grad(lamb, alpha, grad_outputs=grad, create_graph=create_graph)
                alpha = adam.step(alpha, grad)
                if not create_graph:
                    alpha = alpha.detach()
                    adam.detach_()
                bar.update(1)
            bar.close()
            bits = capacity(alpha).sum(dim=1, keepdim=True) / math.log(2)
        scale = maps.shape[-2] * maps.shape[-1] / (x.shape[-2] * x.shape[-1])
        rows = linear_reflect_matrix(x.shape[-2], maps.shape[-2]).to(device=x.device, dtype=dtype)
        cols = linear_reflect_matrix(x.shape[-1], maps.shape[-1]).to(device=x.device, dtype=dtype)
        out = rows @ (bits * scale) @ cols.T
        return out if create_graph else out.detach()

    @staticmethod
    def _place(run: LayerRunner, z: Tensor, image: Tensor, positions: Optional[Tensor]) -> Tensor:
        """The layer rows with the bottleneck's output ``z`` (n, C, h, w) written where the CAM layout reads them."""
        acts = run.activations
        if positions is None:
            return z.to(acts.dtype)
        rows = acts[image].contiguous()
        flat = rows.reshape(rows.shape[0], -1).to(z.dtype)
        index = positions.reshape(1, -1).expand(rows.shape[0], -1)
        return flat.scatter(1, index, z.reshape(rows.shape[0], -1)).view(rows.shape).to(acts.dtype)
