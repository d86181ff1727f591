"""AttEXplore: gradients summed along a transferable-attack path towards the target, each step averaged over noisy,
spectrum-scaled and resized copies of the point."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import optional_generator, positive_int, positive_number
from ..core.filters import gaussian_blur
from ..core.registry import register
from ..core.targets import Target, apply_score
from .adversarial import AdversarialPathExplainer, check_bounds, clip, signed_step
from .base import accumulation_dtype

#: the half-width, in standard deviations, of the smoothing kernel (the code's ``gkern(7, 3)``)
KERNEL_SIGMAS = 3.0


@register("attexplore")
class AttEXplore(AdversarialPathExplainer):
    """AttEXplore: a transferable adversarial attack walks the image towards its target class, and the attack's
    gradients are summed against its steps.

    Zhu, Chen, Zhang, Wang, Jin, Xue & Salim, "AttEXplore: Attribution for Explanation with model parameters
    eXploration", ICLR 2024, openreview.net/forum?id=FsVxd9CIlb (code: github.com/LMBTough/ATTEXPLORE).

    From ``p_0 = x``, for ``k < steps``: ``g_k`` is the gradient of the cross-entropy of the scores,
    ``L = -log softmax(s)_t`` (``s``: the ``score`` of the outputs), averaged over ``samples`` copies
    ``u = IDCT(m * DCT(p_k + e))`` (Gaussian noise ``e`` of std ``sigma``, a spectrum mask ``m`` uniform in
    ``[1 - rho, 1 + rho)``) and taken w.r.t. ``u`` through a random resize-and-pad ``D`` the model sees ``D(u)``;
    ``G_k = G_{k-1} + K * g_k / mean|K * g_k|`` (``K``: a ``kernel_size`` Gaussian, momentum 1);
    ``p_{k+1} = clip(x + clamp(p_k - (epsilon / steps) sign(G_k) - x, -epsilon, epsilon))``, and
    ``A = -sum_k (p_{k+1} - p_k) * G_k``.  The steps descend the cross-entropy, so they raise the target's score.

    ``D`` (input diversity): with probability ``diversity_prob`` a copy is resized bilinearly by ``grow`` pixels
    (``0 <= grow < room``, ``room = int(W * resize_rate) - W``), placed at offsets ``0 <= top, left < room - grow``
    on a zero canvas ``room`` pixels larger, and the canvas resized back to the image's size; otherwise ``D`` is the
    identity.  These are linear maps applied as matrices along H and W (exactly torch's ``F.interpolate`` with
    ``align_corners=False`` and ``F.pad``).  Non-square images grow by the same number of pixels along both sides
    (the code's square resize of a square image).  The DCT is the orthonormal DCT-II along H and W (as matrices;
    the code's unnormalised DCT gives the same ``u``, its scale cancelling between DCT and inverse).

    Random draws, from ``generator`` (on its device; else the global generator of the input's device), in this
    order at each step: ``torch.rand(samples, 4)``, each copy's coin (resized when below ``diversity_prob``) and
    the fractions ``grow = floor(u_1 room)``, ``top = floor(u_2 (room - grow))``, ``left = floor(u_3 (room -
    grow))`` (drawn when ``diversity_prob > 0`` and ``room > 0``); then for each copy in turn the noise
    ``torch.randn(B, C, H, W)`` (when ``sigma > 0``) and the mask's ``torch.rand(B, C, H, W)`` (when ``rho > 0``;
    ``rho = 0`` skips the DCT).  Draws are float32 and, as in the code, one resize per copy serves every image of
    the call (the noise and masks are per image), so a batch's maps equal the images' maps alone only with the
    noise, masks and resizes off.

    Defaults are the authors' (``saliency_zoo.attexplore`` in github.com/LMBTough/LA, ``saliency_zoo.ampe`` in
    github.com/LMBTough/ATTEXPLORE): ``epsilon = 16/255``, ``steps=10`` (``num_steps``), ``samples=20`` (``N``),
    signed steps (``use_sign=True``) and the cross-entropy of the softmax probabilities (``use_softmax=True``:
    ``score='softmax'``); hard-coded there: ``sigma = 16/255``, ``rho = 0.5``, ``resize_rate = 1.15``,
    ``diversity_prob = 0.5``, a 7 x 7 kernel over 3 standard deviations, momentum 1.  Step sizes are in the
    input's units: the code works on [0, 1] images (normalisation inside the model) and clips to [0, 1], which
    ``bounds=(0, 1)`` reproduces; ``bounds=None`` (the default here) does not clip, as this library's inputs are
    often normalised.  The target needs class indices (the cross-entropy reads every score).  Cost:
    ``steps * samples`` forwards and input-gradient backwards per image (200 by default), all copies of all images
    ``batch_size`` rows per pass.

    Deliberate differences from the code: the copies are resized back to the image's size after padding, as in
    LA's ``attexplore.py`` (``DIResize``; ATTEXPLORE's ``ampe.py`` feeds the model the larger padded canvas, which
    models of a fixed input size refuse); the gradient the code computes after the last step, and drops, is not
    computed, nor its extra forward; sizes come from the input (the code fixes 224 x 224 images and 3 channels);
    the softmax is taken once (the authors' scripts append a softmax layer to the model and ``use_softmax`` takes
    another); a zero smoothed gradient adds zero (the code divides by its mean: NaN); the L2-normalised steps of
    ``use_sign=False`` are not offered; the draws come from ``generator`` in the order above (the code draws from
    the global generator, each copy's noise and mask and then its resize with ``randint``s and a coin); with no
    room to grow (``room = 0``, e.g. images under 7 pixels wide at 1.15) no copy is resized (the code's ``randint``
    fails).  The code's batch mean of the cross-entropy and its mean over copies cancel in the normalisation.
    """

    needs_class_indices = True
    defaults = {"score": "softmax", "epsilon": 16 / 255, "steps": 10, "samples": 20, "sigma": 16 / 255, "rho": 0.5,
                "resize_rate": 1.15, "diversity_prob": 0.5, "kernel_size": 7, "bounds": None, "generator": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        epsilon: float,
        steps: int,
        samples: int,
        sigma: float,
        rho: float,
        resize_rate: float,
        diversity_prob: float,
        kernel_size: int,
        bounds: Any,
        generator: Optional[torch.Generator],
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        radius = positive_number(epsilon, "epsilon")
        steps = positive_int(steps, "steps")
        samples = positive_int(samples, "samples")
        sigma = _number_in(sigma, "sigma", 0.0, float("inf"), "a non-negative number")
        rho = _number_in(rho, "rho", 0.0, 1.0, "a number in [0, 1]")
        resize_rate = _number_in(resize_rate, "resize_rate", 1.0, float("inf"), "a number >= 1")
        diversity_prob = _number_in(diversity_prob, "diversity_prob", 0.0, 1.0, "a probability in [0, 1]")
        if (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
                or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
        limits = check_bounds(bounds)
        optional_generator(generator)
        if target.classes is None:
            raise ValueError("AttEXplore's attack descends the cross-entropy of the target class, which reads every "
                             "class's score, so it needs class indices as the target, not a callable")

        batch, channels, height, width = x.shape
        dtype, device = accumulation_dtype(x), x.device
        draw_device = generator.device if generator is not None else device
        alpha = radius / steps
        room = int(width * resize_rate) - width
        resizes = diversity_prob > 0 and room > 0
        dct_h, dct_w = (dct_matrix(n).to(device=device, dtype=x.dtype) for n in (height, width))

        def loss(outputs: Tensor, owners: Tensor) -> Tensor:  # -log softmax(s)_t
            return torch.logsumexp(apply_score(outputs, target.score), dim=1) - target(outputs, owners)

        planner = RowPlanner(batch * samples, batch_size, device)
        point = x.clone()
        momentum = torch.zeros(x.shape, dtype=dtype, device=device)
        total = torch.zeros(x.shape, dtype=dtype, device=device)
        for _ in range(steps):
            mats: Optional[tuple] = None
            if resizes:
                u = torch.rand(samples, 4, generator=generator, device=draw_device).to(device, torch.float64)
                resized = u[:, 0] < diversity_prob
                grow = (u[:, 1] * room).floor()
                top, left = ((u[:, i] * (room - grow)).floor() for i in (2, 3))
                mats = (diversity_matrices(height, room, grow, top, resized).to(x.dtype),
                        diversity_matrices(width, room, grow, left, resized).to(x.dtype))
            current: list = [-1, None]  # the copy made last (copies are drawn in order, each once)

            def prepare(start: int, stop: int) -> Tensor:
                pieces = []
                for c in range(start // batch, (stop - 1) // batch + 1):
                    if current[0] != c:
                        copy = point
                        if sigma > 0:
                            noise = torch.randn(x.shape, generator=generator, device=draw_device)
                            copy = copy + sigma * noise.to(device=device, dtype=x.dtype)
                        if rho > 0:
                            mask = torch.rand(x.shape, generator=generator, device=draw_device)
                            mask = (mask.to(device=device, dtype=x.dtype) * (2 * rho) + (1 - rho))
                            copy = spectrum_filter(copy, mask, dct_h, dct_w)
                        current[:] = [c, copy]
                    pieces.append(current[1][max(start - c * batch, 0):min(stop - c * batch, batch)])
                return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

            def transform(rows: Tensor, copy: Tensor) -> Tensor:
                if mats is None:
                    return rows
                return mats[0][copy].unsqueeze(1) @ rows @ mats[1][copy].transpose(1, 2).unsqueeze(1)

            mean = self._mean_copy_gradients(point, samples, prepare, transform, loss, planner, create_graph)
            smooth = smoothed(mean, kernel_size)
            scale = smooth.abs().mean(dim=(1, 2, 3), keepdim=True)
            momentum = momentum + torch.where(scale > 0, smooth / torch.where(scale > 0, scale, torch.ones_like(scale)),
                                              torch.zeros_like(smooth))
            moved = signed_step(point.to(dtype), momentum.detach(), -alpha, None)
            new = clip(x + (moved - x).clamp(-radius, radius), limits).to(x.dtype)
            total = total - (new - point).to(dtype) * momentum
            point = new
        return total


def _number_in(value: Any, name: str, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def dct_matrix(size: int) -> Tensor:
    """(size, size) float64 orthonormal DCT-II: ``D[k, i] = sqrt(2 / n) cos(pi (2 i + 1) k / (2 n))``, row 0 divided
    by ``sqrt(2)`` (``scipy.fft.dct(norm='ortho')``); its transpose is the inverse."""
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(torch.pi * (2 * i + 1) * k / (2 * size)) * (2.0 / size) ** 0.5
    matrix[0] /= 2.0 ** 0.5
    return matrix


def spectrum_filter(images: Tensor, mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``IDCT(mask * DCT(images))`` over the last two axes, ``rows`` (H, H) and ``cols`` (W, W) orthonormal DCTs."""
    return rows.T @ (mask * (rows @ images @ cols.T)) @ cols


def smoothed(gradients: Tensor, size: int) -> Tensor:
    """``gradients`` (B, C, H, W) convolved per channel, zero-padded, with the code's ``gkern(size, 3)``: a
    ``size`` x ``size`` Gaussian summing to 1 sampled at ``size`` points over +-3 standard deviations, i.e. of
    sigma ``(size - 1) / 6`` pixels (size 1: unchanged)."""
    if size == 1:
        return gradients
    return gaussian_blur(gradients, size, (size - 1) / (2 * KERNEL_SIGMAS), padding="zeros")


def _linear_rows(position: Tensor, size_in: int, weight: Tensor) -> Tensor:
    """(..., size_in) rows reading the source ``position`` (...) from its two nearest taps, linearly, as torch's
    bilinear (negative positions read the first pixel, the last pixel has no right neighbour), times ``weight``."""
    position = position.clamp(min=0)
    low = position.floor()
    frac = position - low
    low_index = low.long().clamp(max=size_in - 1)
    high_index = (low_index + 1).clamp(max=size_in - 1)
    rows = torch.zeros(position.shape + (size_in,), dtype=torch.float64, device=position.device)
    rows.scatter_add_(-1, low_index.unsqueeze(-1), ((1 - frac) * weight).unsqueeze(-1))
    return rows.scatter_add_(-1, high_index.unsqueeze(-1), (frac * weight).unsqueeze(-1))


def diversity_matrices(size: int, room: int, grow: Tensor, offset: Tensor, resized: Tensor) -> Tensor:
    """(copies, size, size) float64 matrices of the resize-and-pad along one axis of ``size`` pixels: resize to
    ``size + grow``, put at ``offset`` on a zero canvas of ``size + room``, resize back to ``size`` (bilinear,
    ``align_corners=False``, as ``F.interpolate``); the identity where ``resized`` is False."""
    device = grow.device
    grow, offset = grow.to(torch.float64), offset.to(torch.float64)
    canvas = size + room
    places = torch.arange(canvas, dtype=torch.float64, device=device)
    scaled = size + grow  # (copies,)
    inner = places[None, :] - offset[:, None]  # canvas position -> position in the resized copy
    inside = ((inner >= 0) & (inner < scaled[:, None])).to(torch.float64)
    up = _linear_rows((size / scaled)[:, None] * (inner + 0.5) - 0.5, size, inside)  # (copies, canvas, size)
    back = _linear_rows((canvas / size) * (torch.arange(size, dtype=torch.float64, device=device) + 0.5) - 0.5,
                        canvas, torch.ones(size, dtype=torch.float64, device=device))  # (size, canvas)
    eye = torch.eye(size, dtype=torch.float64, device=device)
    return torch.where(resized[:, None, None], back @ up, eye)
