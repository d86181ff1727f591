"""Meaningful perturbations: the smallest smooth region whose blurring deletes the target's score."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator
from ..core.filters import gaussian_blur
from ..core.optim import Adam
from ..core.registry import register
from ..core.targets import Target

INITS = ("circle", "ones")
#: the circle initialisation at 224 x 224 (scaled with the image's shorter side): disks of radius 0, 5, ..., 170
#: pixels, blurred with sigma 10, deleted from the image; the first whose deletion leaves less than 1 % of the score
#: (measured between the image's and the largest disk's) is the start
RADIUS_STEP, RADII, DISK_SIGMA, INIT_THRESHOLD = 5.0, 35, 10.0, 1e-2


def blur(images: Tensor, sigma: float) -> Tensor:
    """A Gaussian blur of (N, C, H, W) ``images`` out to 4 sigma with mirrored borders (``sigma=0``: unchanged)."""
    if sigma == 0:
        return images
    return gaussian_blur(images, 2 * math.ceil(4 * sigma) + 1, sigma, padding="reflect")


def total_variation(masks: Tensor, beta: float) -> Tensor:
    """``sum_u |grad m(u)|^beta`` (N,) of (N, 1, h, w) masks: forward differences along both axes (zero past the last
    row and column, as the authors' ``tv``), the norm of the two taken at each cell, raised to ``beta``.  A cell
    whose two differences are zero has a zero gradient (the authors clamp the norm to 1e-5 there)."""
    down = F.pad(masks[..., 1:, :] - masks[..., :-1, :], (0, 0, 0, 1))
    right = F.pad(masks[..., :, 1:] - masks[..., :, :-1], (0, 1, 0, 0))
    squared = down ** 2 + right ** 2
    positive = squared > 0
    values = torch.where(positive, squared, torch.ones_like(squared)) ** (beta / 2)
    return torch.where(positive, values, torch.zeros_like(values)).flatten(1).sum(dim=1)


@register("meaningful_perturbation")
class MeaningfulPerturbation(Explainer):
    """Meaningful perturbations: the smallest, smoothest region whose blurring deletes the target's probability.

    Fong & Vedaldi, "Interpretable Explanations of Black Boxes by Meaningful Perturbation", ICCV 2017,
    arXiv:1704.03296.

    ``m* = argmin_m f_t(Phi(x; m)) + l1_coeff ||1 - m||_1 + tv_coeff sum_u |grad m(u)|^tv_beta`` over masks ``m`` in
    [0, 1] on a grid ``mask_scale`` pixels apart (28 x 28 for 224 x 224 inputs), with ``Phi(x; m) = M x + (1 - M)
    blur(x)``: ``M`` the mask repeated over ``mask_scale`` x ``mask_scale`` blocks and blurred (sigma ``mask_blur``),
    ``blur(x)`` the image blurred with sigma ``blur_sigma`` (the "blur" perturbation of the paper).  ``f_t`` is the
    target's softmax probability (``score``).  Each iteration shifts the image and its blur together by a random
    offset below ``jitter`` pixels (the same offset for every image of the call, drawn from ``generator``), runs one
    forward and one gradient to the mask, and takes one Adam step (learning rate ``learning_rate``, moments 0.9 and
    0.999, epsilon 1e-8), after which the mask is clamped to [0, 1].  Returns the deleted region ``1 - M*`` (B, 1, H,
    W) in [0, 1].

    Defaults from the authors' code (``ruthcfong/perturb_explanations``, ``defaults.py`` and ``optimize_mask.py``,
    the Caffe version the paper's results come from): 300 iterations, learning rate 0.1, ``l1_coeff=1e-4``,
    ``tv_coeff=1e-2``, ``tv_beta=3``, ``mask_scale=8``, ``mask_blur=5``, ``blur_sigma=10``, ``jitter=4``, the
    probability as the score, and ``init='circle'``: the mask starts as the smallest centred blurred disk whose
    deletion removes 99 % of the score (disk radii 0, 5, ..., 170 and their blur 10 pixels at 224 x 224, scaled
    with the image's shorter side; 36 extra forwards per image), min-max scaled to multiples of 1/255 and sampled
    at the cells' centres, as the code's ``scipy.misc.imresize`` does (which also keeps float32 and float64 runs
    alike: Adam's first steps are the signs of the gradients, so a start 1e-10 below 1 would move by a full step).
    ``init='ones'`` starts from the whole image kept.  The pixel sizes (``mask_blur``, ``blur_sigma``, ``jitter``)
    are the authors' for 224 x 224 inputs: scale them with the image.

    Deliberate differences from the authors' code: the mask's gradient is the exact one through the blur of the
    upsampled mask (the code skips the blur's Jacobian and sums the gradient of the blurred mask over each block)
    and through the total variation (the code's derivative clamps ``|grad m|^beta`` to 1e-5); the blurs are
    Gaussians out to 4 sigma with mirrored borders on the input tensor (the code uses PIL's ``GaussianBlur`` on
    the 8-bit photo and on the 8-bit mask); jitter shifts the given image, its bottom and right edges repeated (the
    code crops the photo resized to 4 pixels more).  Masks of a call are optimised ``batch_size`` at a time; Adam
    works element-wise, so each image's mask is independent of the others.  ``create_graph=True`` differentiates
    through the whole optimisation (memory grows with ``iterations``).

    Cost: ``iterations`` forwards and input-gradient backwards per image, plus 36 forwards per image for
    ``init='circle'``.
    """

    kind = "perturbation"
    defaults = {"score": "softmax", "iterations": 300, "learning_rate": 0.1, "l1_coeff": 1e-4, "tv_coeff": 1e-2,
                "tv_beta": 3.0, "mask_scale": 8, "mask_blur": 5.0, "blur_sigma": 10.0, "jitter": 4,
                "init": "circle", "generator": None}

    def _explain(self, x: Tensor, target: Target, *, iterations: int, learning_rate: float, l1_coeff: float,
                 tv_coeff: float, tv_beta: float, mask_scale: int, mask_blur: float, blur_sigma: float, jitter: int,
                 init: str, generator: Optional[torch.Generator], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        for name, value, low in (("iterations", iterations, 1), ("mask_scale", mask_scale, 1), ("jitter", jitter, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int of at least {low}, got {value!r}")
        for name, value, strict in (("learning_rate", learning_rate, True), ("tv_beta", tv_beta, True),
                                    ("blur_sigma", blur_sigma, True), ("l1_coeff", l1_coeff, False),
                                    ("tv_coeff", tv_coeff, False), ("mask_blur", mask_blur, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value > 0 if strict else value >= 0) or not math.isfinite(value):
                kind = "positive" if strict else "non-negative"
                raise ValueError(f"{name} must be a {kind} number, got {value!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        optional_generator(generator)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        images = (x if create_graph else x.detach()).to(dtype)
        with torch.set_grad_enabled(create_graph):
            blurred = blur(images, float(blur_sigma))
        grid = tuple(-(-s // mask_scale) for s in x.shape[-2:])
        gen_device = generator.device if generator is not None else torch.device("cpu")
        offsets = torch.randint(0, max(jitter, 1), (iterations, 2), generator=generator, device=gen_device).tolist()
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            owners = torch.arange(start, stop, device=x.device)
            if init == "circle":
                masks = self._circle_start(images[start:stop], blurred[start:stop], owners, target, grid,
                                           mask_scale, batch_size)
            else:
                masks = torch.ones(stop - start, 1, *grid, dtype=dtype, device=x.device)
            kept = self._optimise(images[start:stop], blurred[start:stop], owners, target, masks, offsets,
                                  float(learning_rate), float(l1_coeff), float(tv_coeff), float(tv_beta),
                                  mask_scale, float(mask_blur), jitter, create_graph)
            maps.append(1 - kept)
        return torch.cat(maps)

    def _upsample(self, masks: Tensor, mask_scale: int, mask_blur: float, size) -> Tensor:
        """The (N, 1, H, W) mask ``M`` of grid masks (N, 1, h, w): each cell repeated over a block of ``mask_scale``
        pixels (cropped to the image) and blurred."""
        full = masks.repeat_interleave(mask_scale, dim=2).repeat_interleave(mask_scale, dim=3)
        return blur(full[..., :size[0], :size[1]], mask_blur)

    def _circle_start(self, images: Tensor, blurred: Tensor, owners: Tensor, target: Target, grid,
                      mask_scale: int, batch_size: Optional[int]) -> Tensor:
        """The authors' start (N, 1, h, w): the mask deleting the smallest blurred centred disk that leaves less than
        1 % of the score between the image's (1.0) and the largest disk's (0.0), scaled to bytes as their
        ``scipy.misc.imresize`` does and sampled at the cells' centres (its nearest-neighbour rule)."""
        count, (height, width) = images.shape[0], images.shape[-2:]
        scale = min(height, width) / 224
        radii = RADIUS_STEP * scale * torch.arange(RADII, dtype=images.dtype, device=images.device)
        y = torch.arange(height, dtype=images.dtype, device=images.device) - height // 2
        x = torch.arange(width, dtype=images.dtype, device=images.device) - width // 2
        inside = (y[:, None] ** 2 + x[None, :] ** 2)[None] <= radii[:, None, None] ** 2
        disks = blur(inside.to(images.dtype)[:, None], DISK_SIGMA * scale)  # (R, 1, H, W)
        kept = 1 - disks
        with torch.no_grad():
            scores = []
            for start, stop in RowPlanner(count * (RADII + 1), batch_size, images.device):
                rows = torch.arange(start, stop, device=images.device)
                image, level = rows // (RADII + 1), rows % (RADII + 1)
                # level R is the image itself; level k < R the image with disk k deleted
                keep = torch.where((level == RADII)[:, None, None, None], torch.ones_like(kept[:1]),
                                   kept[level.clamp(max=RADII - 1)])
                perturbed = images[image] * keep + blurred[image] * (1 - keep)
                scores.append(target(self._forward(perturbed), owners[image]).to(images.dtype))
            scores = torch.cat(scores).view(count, RADII + 1)
            disk_scores, original = scores[:, :RADII], scores[:, RADII:]
            last = disk_scores[:, -1:]
            below = (disk_scores - last) / (original - last) < INIT_THRESHOLD
            first = torch.where(below.any(dim=1), below.int().argmax(dim=1), RADII - 1)  # the code's [-1]
        # scipy.misc.imresize's byte scaling: each start min-max scaled to [0, 255] and rounded (a constant one to 0)
        start = kept[first]
        low = start.amin(dim=(1, 2, 3), keepdim=True)
        spread = start.amax(dim=(1, 2, 3), keepdim=True) - low
        start = torch.floor((start - low) * 255 / torch.where(spread > 0, spread, torch.ones_like(spread)) + 0.5) / 255
        rows = torch.clamp(torch.arange(grid[0], device=images.device) * mask_scale + mask_scale // 2, max=height - 1)
        cols = torch.clamp(torch.arange(grid[1], device=images.device) * mask_scale + mask_scale // 2, max=width - 1)
        return start[:, :, rows][:, :, :, cols]

    def _optimise(self, images: Tensor, blurred: Tensor, owners: Tensor, target: Target, masks: Tensor,
                  offsets, learning_rate: float, l1_coeff: float, tv_coeff: float, tv_beta: float, mask_scale: int,
                  mask_blur: float, jitter: int, create_graph: bool) -> Tensor:
        """The final kept masks ``M*`` (N, 1, H, W) of the images' rows, Adam written out so that ``create_graph``
        can differentiate through every step."""
        size = images.shape[-2:]
        if jitter:
            pad = (0, jitter, 0, jitter)
            images, blurred = F.pad(images, pad, mode="replicate"), F.pad(blurred, pad, mode="replicate")
        masks = masks.requires_grad_(True)
        adam = Adam(learning_rate)  # the authors' Adam: moments 0.9 and 0.999, epsilon 1e-8
        for dy, dx in offsets:
            keep = self._upsample(masks, mask_scale, mask_blur, size)
            window = (..., slice(dy, dy + size[0]), slice(dx, dx + size[1]))
            perturbed = images[window] * keep + blurred[window] * (1 - keep)
            score = target(self._forward(perturbed), owners).to(masks.dtype)
            loss = score + l1_coeff * (masks - 1).abs().flatten(1).sum(dim=1) + tv_coeff * total_variation(masks,
                                                                                                            tv_beta)
            (grad,) = torch.autograd.grad(loss.sum(), masks, create_graph=create_graph)
            masks = adam.step(masks, grad).clamp(0, 1)
            if not create_graph:
                masks = masks.detach().requires_grad_(True)
                adam.detach_()
        with torch.set_grad_enabled(create_graph):
            keep = self._upsample(masks, mask_scale, mask_blur, size)
        return keep if create_graph else keep.detach()
