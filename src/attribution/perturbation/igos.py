"""I-GOS and iGOS++: masks optimised along integrated gradients of the masked image's score, with a batched
backtracking line search."""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator, positive_int
from ..core.filters import gaussian_blur
from ..core.registry import register
from ..core.targets import Target

#: the authors' line search (``methods_helper.line_search``, and Eq. (8) of the I-GOS paper): Armijo constant
#: ``beta``, step decay, and the step below which the search gives up (that last, too small step is still taken)
LS_BETA, LS_DECAY, LS_MIN_STEP = 1e-4, 0.2, 1e-5
#: the bilateral total variation of iGOS++ (``bilateral_tv_norm(..., tv_beta=2, sigma=0.01)``): the image-space
#: weights ``exp(-(difference of neighbouring pixels)^2 / sigma)``, in the units of the model's input
BILATERAL_SIGMA = 0.01

#: a path term: (which upsampled mask: 0 = the product of the image's masks, 1 = the first, 2 = the second;
#: True for an insertion path (the blurred image where the mask is 1), False for a deletion path; its sign)
Term = Tuple[int, bool, float]


def authors_blur_size(height: int, width: int) -> int:
    """The Gaussian kernel of the authors' blurred baseline (``utils.ImageSet``): 51 taps for images under 500
    pixels, 151 under 800, 201 above (their images are square; here the longer side decides)."""
    side = max(height, width)
    return 51 if side < 500 else 151 if side < 800 else 201


def upsample(masks: Tensor, size: Tuple[int, int]) -> Tensor:
    """Masks (N, T, h, w) upsampled to ``size`` bilinearly with the corners aligned
    (``torch.nn.UpsamplingBilinear2d``, the authors' ``upscale``)."""
    return F.interpolate(masks, size=size, mode="bilinear", align_corners=True)


def squared_variation(masks: Tensor) -> Tensor:
    """``mean (m[i+1, j] - m[i, j])^2 + mean (m[i, j+1] - m[i, j])^2`` (N,) of (N, 1, h, w) masks: the authors'
    ``tv_norm`` with ``beta=2``."""
    rows = (masks[:, 0, :-1, :] - masks[:, 0, 1:, :]).square().flatten(1).mean(dim=1)
    cols = (masks[:, 0, :, :-1] - masks[:, 0, :, 1:]).square().flatten(1).mean(dim=1)
    return rows + cols


def bilateral_weights(images: Tensor, sigma: float = BILATERAL_SIGMA) -> Tuple[Tensor, Tensor]:
    """The image-space weights (N, H-1, W) and (N, H, W-1) of the bilateral total variation, as the authors'
    ``bilateral_tv_norm`` computes them: between vertical neighbours ``exp(-(mean_c difference)^2 / sigma)``, between
    horizontal neighbours ``mean_c exp(-difference^2 / sigma)`` (the channel mean taken before the square in one
    direction and after the exponential in the other, as their code has it)."""
    down = torch.exp(-(images[:, :, :-1, :] - images[:, :, 1:, :]).mean(dim=1) ** 2 / sigma)
    right = torch.exp(-(images[:, :, :, :-1] - images[:, :, :, 1:]) ** 2 / sigma).mean(dim=1)
    return down, right


def bilateral_variation(masks: Tensor, weights: Tuple[Tensor, Tensor]) -> Tensor:
    """iGOS++'s bilateral total variation (N,) of (N, 1, h, w) masks: half the sum of the masks'
    :func:`squared_variation` and the mean weighted squared differences of the masks upsampled to the image
    (``weights`` from :func:`bilateral_weights`)."""
    down, right = weights
    up = upsample(masks, (right.shape[1], down.shape[2]))[:, 0]
    image_rows = (down * (up[:, :-1, :] - up[:, 1:, :]).square()).flatten(1).mean(dim=1)
    image_cols = (right * (up[:, :, :-1] - up[:, :, 1:]).square()).flatten(1).mean(dim=1)
    return 0.5 * (squared_variation(masks) + image_rows + image_cols)


class _Problem:
    """One call's optimisation: the images, their blurred baselines, the target and the options, and the two things
    the optimiser asks for: the loss of candidate masks and the descent direction of the current ones."""

    def __init__(self, explainer: "_IntegratedGradientOptimizedSaliency", images: Tensor, blurred: Tensor,
                 target: Target, steps: int, l1_coeff: float, tv_coeff: float, noise: float,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> None:
        self.explainer, self.images, self.blurred, self.target = explainer, images, blurred, target
        self.size = tuple(images.shape[-2:])
        self.steps, self.l1_coeff, self.tv_coeff, self.noise = steps, l1_coeff, tv_coeff, noise
        self.generator, self.create_graph = generator, create_graph
        dtype, device = images.dtype, images.device
        terms = explainer.terms
        self.choice = torch.tensor([t[0] for t in terms], device=device)
        self.insertion = torch.tensor([t[1] for t in terms], device=device)
        self.sign = torch.tensor([t[2] for t in terms], dtype=dtype, device=device)
        # the path's points a = 1/steps, ..., 1 (torch.linspace, as the authors' interval_score)
        self.fractions = torch.linspace(1 / steps, 1, steps, dtype=dtype, device=device)
        self.weights = bilateral_weights(images) if explainer.bilateral else None
        self.rows_per_pass: Optional[int] = batch_size  # the memory-aware size, once the first pass has found it

    # ------------------------------------------------------------------------------------------- the losses
    def regulariser(self, masks: Tensor, images: Tensor) -> Tensor:
        """``l1_coeff mean|1 - M| + tv_coeff TV(M)`` (K,) of the product ``M`` of each image's masks (K, T, h, w)."""
        product = masks.prod(dim=1, keepdim=True)
        if self.weights is None:
            variation = squared_variation(product)
        else:
            variation = bilateral_variation(product, tuple(w[images] for w in self.weights))
        return self.l1_coeff * (1 - product).abs().flatten(1).mean(dim=1) + self.tv_coeff * variation

    def loss(self, masks: Tensor, images: Tensor) -> Tensor:
        """The line search's objective (K,) of masks (K, T, h, w) of the images ``images`` (K,): the path terms'
        mean scores, signed, plus the regulariser."""
        with torch.no_grad():
            return self.paths(masks, images, 1.0, gradient=False) + self.regulariser(masks, images)

    def direction(self, masks: Tensor) -> Tensor:
        """The descent direction (B, T, h, w): the gradient of the regulariser plus the integrated gradients of the
        path terms (each term's gradient scaled by the class's ``gradient_scale``)."""
        images = torch.arange(masks.shape[0], device=masks.device)
        (regular,) = torch.autograd.grad(self.regulariser(masks, images).sum(), masks,
                                         create_graph=self.create_graph)
        return regular + self.paths(masks, images, self.explainer.gradient_scale, gradient=True)

    # --------------------------------------------------------------------------------------------- the paths
    def _planner(self, total: int) -> RowPlanner:
        return RowPlanner(total, self.rows_per_pass, self.images.device)

    def _noise(self, shape) -> Tensor:
        dtype, device = self.images.dtype, self.images.device
        if self.generator is None:
            return torch.randn(shape, dtype=dtype, device=device)
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device).to(device)

    def paths(self, masks: Tensor, images: Tensor, scale: float, gradient: bool) -> Tensor:
        """``sum_terms sign scale sum_k f_t(p_k) / steps`` for masks (K, T, h, w) of the images ``images`` (K,): per
        image (K,) without ``gradient``; with it, its gradient to the masks (K, T, h, w).  The points of a term are
        ``p_k = first a_k M + second (1 - a_k M)`` (+ noise), ``a_k = k / steps``, ``M`` the term's upsampled mask,
        (first, second) = (image, blurred image) on a deletion path and (blurred image, image) on an insertion
        path.  Rows (image, term, step), image-major, go through the model ``batch_size`` at a time."""
        count, terms, steps = masks.shape[0], self.choice.shape[0], self.steps
        up = upsample(masks, self.size)
        choices = torch.cat([up.prod(dim=1, keepdim=True), up], dim=1)  # (K, 1 + T, H, W)
        leaf = choices.detach().requires_grad_(True) if gradient and not self.create_graph else choices
        total = torch.zeros_like(leaf) if gradient else torch.zeros(count, dtype=masks.dtype, device=masks.device)
        planner = self._planner(count * terms * steps)
        for start, stop in planner:
            row = torch.arange(start, stop, device=masks.device)
            local, term, step = row // (terms * steps), (row // steps) % terms, row % steps
            owners = images[local]
            mask = (leaf[local, self.choice[term]] * self.fractions[step].view(-1, 1, 1)).unsqueeze(1)
            insertion = self.insertion[term].view(-1, 1, 1, 1)
            kept, blurred = self.images[owners], self.blurred[owners]
            first = torch.where(insertion, blurred, kept)
            second = torch.where(insertion, kept, blurred)
            points = first * mask + second * (1 - mask)
            if self.noise:
                points = points + self.noise * self._noise(points.shape)
            if gradient:
                with planner.recording(points):
                    outputs = self.explainer._forward(points)
            else:
                outputs = self.explainer._forward(points)
            scores = self.target(outputs, owners).to(masks.dtype) / steps * self.sign[term] * scale
            if not gradient:
                total.index_add_(0, local, scores)
            elif scores.requires_grad:
                (grad,) = torch.autograd.grad(scores.sum(), leaf, create_graph=self.create_graph, allow_unused=True)
                if grad is not None:
                    total = total + grad if self.create_graph else total.add_(grad)
        if self.rows_per_pass is None and planner.size is not None:
            self.rows_per_pass = planner.size
        if not gradient:
            return total
        (grad,) = torch.autograd.grad(choices, masks, grad_outputs=total, create_graph=self.create_graph)
        return grad

    # ------------------------------------------------------------------------------------------ line search
    def line_search(self, masks: Tensor, direction: Tensor, alpha: float) -> Tensor:
        """Each image's step (B,): backtracking from ``alpha`` by ``LS_DECAY`` until the loss of the clamped step
        ``clamp(m - step d, 0, 1)`` is at most the current loss minus ``LS_BETA step |d|^2`` (Armijo), or the step
        falls below ``LS_MIN_STEP``.  Only the images still searching are evaluated at each trial."""
        with torch.no_grad():
            count = masks.shape[0]
            every = torch.arange(count, device=masks.device)
            base = self.loss(masks, every)
            slope = -LS_BETA * direction.square().flatten(1).sum(dim=1)
            sizes = torch.full((count,), alpha, dtype=masks.dtype, device=masks.device)
            searching = torch.ones(count, dtype=torch.bool, device=masks.device)
            while True:
                images = searching.nonzero().squeeze(1)
                size = sizes[images]
                losses = self.loss((masks[images] - size.view(-1, 1, 1, 1) * direction[images]).clamp(0, 1), images)
                searching[images] = (losses > base[images] + size * slope[images]) & (size >= LS_MIN_STEP)
                if not bool(searching.any()):  # one synchronisation per trial: the search's length is data's
                    return sizes
                sizes = torch.where(searching, sizes * LS_DECAY, sizes)


class _IntegratedGradientOptimizedSaliency(Explainer):
    """The shared implementation of :class:`IGOS` and :class:`IGOSPlusPlus` (see their docstrings)."""

    kind = "perturbation"
    defaults = {"score": "softmax", "iterations": 20, "steps": 15, "mask_size": 28, "l1_coeff": 1.0,
                "tv_coeff": 20.0, "alpha": 1000.0, "noise": 0.2, "blur_size": None, "blur_sigma": None,
                "generator": None}
    #: masks per image (one for I-GOS; a deletion and an insertion mask for iGOS++)
    masks_per_image: ClassVar[int] = 1
    #: the path terms of the objective (see :data:`Term`)
    terms: ClassVar[Tuple[Term, ...]] = ()
    #: the factor on the path terms' integrated gradients in the descent direction (not in the line search's loss)
    gradient_scale: ClassVar[float] = 1.0
    #: the bilateral total variation (iGOS++) instead of the plain one (I-GOS)
    bilateral: ClassVar[bool] = False

    def _explain(self, x: Tensor, target: Target, *, iterations: int, steps: int, mask_size: int, l1_coeff: float,
                 tv_coeff: float, alpha: float, noise: float, blur_size: Optional[int], blur_sigma: Optional[float],
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        positive_int(iterations, "iterations")
        positive_int(steps, "steps")
        if isinstance(mask_size, bool) or not isinstance(mask_size, int) or mask_size < 2:
            raise ValueError(f"mask_size must be an int of at least 2, got {mask_size!r}")
        for name, value, strict in (("alpha", alpha, True), ("l1_coeff", l1_coeff, False),
                                    ("tv_coeff", tv_coeff, False), ("noise", noise, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not (
                    value > 0 if strict else value >= 0):
                raise ValueError(f"{name} must be a {'positive' if strict else 'non-negative'} finite number, "
                                 f"got {value!r}")
        if blur_size is not None and (isinstance(blur_size, bool) or not isinstance(blur_size, int)
                                      or blur_size < 1 or blur_size % 2 == 0):
            raise ValueError(f"blur_size must be None or a positive odd int, got {blur_size!r}")
        if blur_sigma is not None and (isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float))
                                       or not math.isfinite(blur_sigma) or not blur_sigma > 0):
            raise ValueError(f"blur_sigma must be None or a positive finite number, got {blur_sigma!r}")
        optional_generator(generator)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        images = (x if create_graph else x.detach()).to(dtype)
        size = authors_blur_size(*x.shape[-2:]) if blur_size is None else blur_size
        sigma = float(size - 1 if blur_sigma is None else blur_sigma)
        with torch.set_grad_enabled(create_graph):
            blurred = gaussian_blur(images, size, sigma, padding="reflect")
        problem = _Problem(self, images, blurred, target, steps, float(l1_coeff), float(tv_coeff), float(noise),
                           generator, batch_size, create_graph)
        masks = torch.ones(x.shape[0], self.masks_per_image, mask_size, mask_size, dtype=dtype, device=x.device)
        for _ in range(iterations):
            masks = masks if create_graph else masks.detach()
            if not masks.requires_grad:
                masks.requires_grad_(True)
            direction = problem.direction(masks)
            step = problem.line_search(masks.detach(), direction.detach(), float(alpha))
            masks = (masks - direction * step.view(-1, 1, 1, 1)).clamp(0, 1)
        with torch.set_grad_enabled(create_graph):
            saliency = 1 - upsample(masks.prod(dim=1, keepdim=True), tuple(x.shape[-2:]))
        return saliency if create_graph else saliency.detach()


@register("igos")
class IGOS(_IntegratedGradientOptimizedSaliency):
    """I-GOS: the smallest smooth deletion mask, optimised along integrated gradients with a line search.

    Qi, Khorram & Li Fuxin, "Visualizing Deep Networks by Optimizing with Integrated Gradients", AAAI 2020,
    arXiv:1905.00954.

    ``min_m  (1/S) sum_k f_t(x a_k M + x~ (1 - a_k M)) + l1_coeff mean|1 - m| + tv_coeff TV(m)``, ``a_k = k/S``
    (``S = steps``), over a ``mask_size`` x ``mask_size`` mask ``m`` in [0, 1] started at 1 (the whole image
    kept), ``M`` its bilinear upsampling (corners aligned) to the image, ``x~`` the image blurred (a Gaussian of
    ``blur_size`` taps and sigma ``blur_sigma``), ``TV(m)`` the mean squared difference of vertical plus of
    horizontal neighbours, ``f_t`` the target's softmax probability (``score``).  Each of ``iterations`` steps
    takes as direction ``d`` the gradient of the objective, whose score term is the integrated gradient of the
    mask along the path from the blurred image (``a = 0``) to the masked image (``a = 1``), and moves to
    ``clamp(m - s d, 0, 1)``, the step ``s`` found per image by backtracking from ``alpha`` by 0.2 until
    ``loss(new) <= loss(m) - 1e-4 s |d|^2`` or ``s < 1e-5``.  Gaussian noise of standard deviation ``noise`` is
    added to every path point, in the direction and in the line search's losses (drawn from ``generator``).
    Returns ``1 - M*`` (B, 1, H, W) in [0, 1]: the authors' masks are low where the image matters (their metrics
    delete the lowest cells first), so the map is high where it matters.

    Defaults from the authors' code (``khorrams/IGOS_pp``: ``main.py`` with ``args.py``'s defaults, which call
    ``methods.IGOS``): 20 iterations, 15 integration steps (``main.py`` passes ``--ig_iter`` (20) as the
    iterations and ``--iterations`` (15) as the steps; ``methods.IGOS``'s own defaults agree), ``mask_size=28``
    (for 224 x 224 inputs), ``l1_coeff=1``, ``tv_coeff=20``, ``alpha=1000`` (``args.py``; ``methods.IGOS``'s
    signature says 8, which ``main.py`` overrides), the line search's constants 1e-4 (the paper's beta, Eq. (8)),
    0.2 and 1e-5, noise 0.2, the softmax score, and the blurred baseline of ``utils.ImageSet``:
    ``cv2.GaussianBlur`` with 51 taps and sigma 50 (151/150 from 500 pixels, 201/200 from 800: ``blur_size=None``
    and ``blur_sigma=None`` follow that rule, sigma = taps - 1).

    Deliberate differences from the authors' code: the blur runs on the input tensor with mirrored borders
    (OpenCV's default) instead of on the 8-bit resized photo before normalisation (the same up to the 8-bit
    rounding, a blur being linear and the normalisation affine per channel); non-square images get a square grid
    upsampled to H x W and the kernel rule reads the longer side; all images of a call share passes through the
    model (``batch_size`` rows of (image, step) each) where the authors backpropagate image by image, which gives
    the same gradients; the noise is drawn per pass, so with ``noise > 0`` an image's map depends on its
    batch-mates and on ``batch_size`` (the same distribution; ``noise=0`` makes images independent); only the
    line-search optimiser (``opt='LS'``, the one ``main.py`` runs) is implemented, not ``'NAG'``.
    ``create_graph=True`` differentiates through every step (the line search's step sizes taken as constants).

    Cost per image and iteration: ``steps`` forwards and backwards for the direction, then ``steps`` forwards per
    loss of the line search: one for the current mask and one per trial step, at most 13 trials from
    ``alpha=1000`` (at least 2 losses).
    """

    masks_per_image = 1
    terms = ((0, False, 1.0),)
    gradient_scale = 1.0
    bilateral = False


@register("igos_pp")
class IGOSPlusPlus(_IntegratedGradientOptimizedSaliency):
    """iGOS++: a deletion and an insertion mask optimised together along integrated gradients, with a bilateral
    total variation.

    Khorram, Lawson & Li Fuxin, "iGOS++: Integrated Gradient Optimized Saliency by Bilateral Perturbations",
    ACM CHIL 2021, arXiv:2012.15783.

    Two masks per image, ``m_d`` (deletion) and ``m_i`` (insertion), started at 1, with ``M_d``, ``M_i`` their
    upsamplings and ``D(M) = (1/S) sum_k f_t(x a_k M + x~ (1 - a_k M))`` the deletion path's mean score,
    ``I(M) = (1/S) sum_k f_t(x~ a_k M + x (1 - a_k M))`` the insertion path's (the blurred image enters where the
    mask is 1): the loss ``D(M_d) - I(M_i) + D(M_d M_i) - I(M_d M_i) + l1_coeff mean|1 - m_d m_i| + tv_coeff
    BTV(m_d m_i)``, ``BTV`` half the sum of the mask's squared variation and the image-weighted squared variation of
    its upsampling (weights ``exp(-(pixel difference)^2 / 0.01)``, see :func:`bilateral_weights`).  The direction is
    half the four path terms' integrated gradients plus the regulariser's gradient (the authors halve the path
    terms "to balance them with the regularisation terms", in the direction only, not in the line search's loss);
    one step size per image, shared by its two masks, from the same line search as :class:`IGOS` (the squared
    norm of both masks' directions in the Armijo condition).  Returns ``1 - upsample(m_d m_i)`` (B, 1, H, W), as
    the authors return ``m_d m_i``, low where the image matters.

    Defaults from the authors' code (``khorrams/IGOS_pp``: ``main.py`` with ``args.py``'s defaults, which call
    ``methods.iGOS_pp``): 20 iterations and 15 integration steps (``main.py`` swaps ``--ig_iter`` (20) and
    ``--iterations`` (15); ``methods.iGOS_pp``'s own signature says 15 iterations and 20 steps), ``mask_size=28``,
    ``l1_coeff=1``, ``tv_coeff=20``, ``alpha=1000``, bilateral sigma 0.01 and power 2, noise 0.2, the softmax
    score, the blurred baseline and the line search's constants as :class:`IGOS`.  The same deliberate
    differences as :class:`IGOS`; also, the bilateral weights are computed as the authors' code has them, the
    channel mean taken before the square between vertical neighbours and after the exponential between
    horizontal ones.

    Cost per image and iteration: ``4 steps`` forwards and backwards for the direction, then ``4 steps`` forwards
    per loss of the line search (one for the current masks, at most 13 trials from ``alpha=1000``).
    """

    masks_per_image = 2
    #: the four path terms, in the order of the authors' direction: both masks on the deletion path, both on the
    #: insertion path, the deletion mask alone on the deletion path, the insertion mask alone on the insertion path
    terms = ((0, False, 1.0), (0, True, -1.0), (1, False, 1.0), (2, True, -1.0))
    gradient_scale = 0.5
    bilateral = True
