"""Prediction Difference Analysis: the weight of evidence a window of pixels gives the target class."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator, positive_int
from ..core.registry import register
from ..core.targets import Target
from .occlusion import Size, pair_option, window_bands, window_masks, window_mean

#: N of the Laplace correction ``(p * N + 1) / (N + K)``: the authors' code hard-codes 100,000 "training images"
TRAIN_SIZE = 100_000
#: patches the conditional sampler's Gaussian is fitted on: ``FIT_PATCHES // N + 1`` random positions per channel,
#: each taken from all ``N`` references (``cond_sampler_imagenet``'s ``num_samples_fit=20000``)
FIT_PATCHES = 20_000
SAMPLERS = ("marginal", "conditional")
SINGULAR = ("prediction_difference's conditional sampler needs a positive-definite Gaussian of the references' "
            "patches: the fitted covariance is singular (constant images, or fewer distinct patches than a patch "
            "has values); pass other references= or sampler='marginal'")


def weight_of_evidence(p: Tensor, p_without: Tensor, train_size: int, classes: int) -> Tensor:
    """``log2 odds(q) - log2 odds(q_without)`` of the Laplace-corrected probabilities ``q = (p * N + 1) / (N + K)``.

    Each log-ratio, ``log2(q / q_without)`` and ``log2((1 - q_without) / (1 - q))``, is taken as ``log2(1 + d / .)``
    with ``d = q - q_without = (p - p_without) * N / (N + K)`` where the ratio is near 1: the same number without the
    cancellation of two nearly equal logarithms (in float32 that alone costs about 1e-7 times the log-odds, more
    than most windows' evidence on a model whose probabilities barely move), directly elsewhere."""
    q = (p * train_size + 1) / (train_size + classes)
    q_without = (p_without * train_size + 1) / (train_size + classes)
    one_minus = ((1 - p) * train_size + classes - 1) / (train_size + classes)  # exact near p = 1, unlike 1 - q
    one_minus_without = ((1 - p_without) * train_size + classes - 1) / (train_size + classes)
    d = (p - p_without) * (train_size / (train_size + classes))

    def log_ratio(num: Tensor, den: Tensor) -> Tensor:  # log(num / den), num - den = d; both positive
        near = d.abs() < 0.5 * den
        return torch.where(near, torch.log1p(d / den), torch.log(num) - torch.log(den))

    return (log_ratio(q, q_without) + log_ratio(one_minus_without, one_minus)) / math.log(2)


def patch_gaussian(refs: Tensor, patch: Tuple[int, int], positions: Tensor,
                   dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """Mean (C, D) and covariance (C, D, D) of the ``patch`` = (ph, pw) patches (``D = ph * pw``, row-major) of
    each channel separately, over every reference at the patch top-left corners ``positions`` (C, M) (indices into
    the (H - ph + 1) x (W - pw + 1) corners, row-major; channel c uses row c), unbiased (``np.cov``), in ``dtype``
    (only the gathered patches are converted)."""
    channels, width = refs.shape[1], refs.shape[3]
    (ph, pw), across = patch, width - patch[1] + 1
    rows = (positions // across)[:, :, None] + torch.arange(ph, device=refs.device)  # (C, M, ph)
    cols = (positions % across)[:, :, None] + torch.arange(pw, device=refs.device)  # (C, M, pw)
    chan = torch.arange(channels, device=refs.device)[:, None, None, None]
    patches = refs[:, chan, rows[:, :, :, None], cols[:, :, None, :]]  # (N, C, M, ph, pw), in the refs' dtype
    patches = patches.transpose(0, 1).reshape(channels, -1, ph * pw).to(dtype)
    mean = patches.mean(1)
    centred = patches - mean[:, None]
    return mean, centred.transpose(1, 2) @ centred / (patches.shape[1] - 1)


def conditional_gaussian(mean: Tensor, cov: Tensor, window: Tensor) -> Tuple[Tensor, Tensor]:
    """The Gaussian of the ``window`` entries given the others (the frame), for Gaussians (..., D) / (..., D, D) and
    boolean windows (..., D) (leading dimensions broadcast): ``G`` (..., D, D) and ``L`` (..., D, D) such that the
    window's conditional mean is ``(mean + G @ (f - mean))[window]`` for any patch ``f`` (G is zero outside the
    window's rows and the frame's columns: ``S_wf S_ff^-1``) and ``L[window][:, window]`` is the Cholesky factor of
    ``S_ww - S_wf S_ff^-1 S_fw`` (L is the identity elsewhere, so ``(L @ z)[window]`` only reads ``z[window]``).

    The frame block is inverted as ``[[S_ff, 0], [0, I]]`` (the window's rows and columns set to the identity's),
    so windows of any size and place share one shape.  Raises a ValueError naming ``references`` where the
    Gaussian is singular (constant or too few references)."""
    frame = ~window
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    both_frame = frame[..., :, None] & frame[..., None, :]
    chol_ff, info = torch.linalg.cholesky_ex(torch.where(both_frame, cov, eye))
    if not bool((info == 0).all()):
        raise ValueError(SINGULAR)
    gain = cov @ (torch.cholesky_inverse(chol_ff) * both_frame)  # columns outside the frame are zero
    gain = gain * window[..., :, None]  # rows outside the window are not asked for
    cond = cov - gain @ cov
    cond = torch.where(window[..., :, None] & window[..., None, :], (cond + cond.transpose(-1, -2)) / 2, eye)
    chol, info = torch.linalg.cholesky_ex(cond)
    if not bool((info == 0).all()):
        raise ValueError(SINGULAR)
    return gain, chol


@register("prediction_difference")
class PredictionDifference(Explainer):
    """Prediction Difference Analysis: how much evidence for the target a window of pixels carries, measured by
    how the target's probability changes when the window is replaced by values drawn from other images.

    Zintgraf, Cohen, Adel & Welling, "Visualizing Deep Neural Network Decisions: Prediction Difference Analysis",
    ICLR 2017, arXiv:1702.04595 (after Robnik-Sikonja & Kononenko, IEEE TKDE 2008).

    For each ``window`` x ``window`` position ``w`` (all channels at once, moved by ``stride``):
    ``WE_w = log2 odds(p_t(x)) - log2 odds(mean_s p_t(x with w replaced by sample s))``, with probabilities
    Laplace-corrected as ``(p * N + 1) / (N + K)`` (``N = train_size``, ``K`` the model's number of classes) and
    ``A(p) = mean of WE_w over the windows covering pixel p`` (0 where ``stride > window`` leaves a pixel
    uncovered).  Positive: the window's actual values speak for the target.

    ``sampler='conditional'`` (the default, as the authors' ImageNet script), their ``cond_sampler_imagenet``: each
    channel's ``(window + 2 * padding)``-square patches are a Gaussian (mean and unbiased covariance of the patches
    at ``FIT_PATCHES // N + 1`` top-left corners drawn with ``generator`` for each channel, each taken from all
    ``N`` references: about 20,000 patches, no regularisation), the same at every place of the image.  A window's
    values are drawn from it conditioned on the image's own pixels in the patch around it:
    ``mu_w + S_wf S_ff^-1 (f - mu_f) + chol(S_ww - S_wf S_ff^-1 S_fw) z``, then clipped to the references'
    per-pixel range.  At the border the patch stops at the image's edge and the window sits off its centre (the
    authors' nine cases); the conditional matrices (:func:`conditional_gaussian`) are computed once per call for
    each distinct place of a window in its patch, so a window costs one matrix-vector product per channel.  The
    noise ``z`` (num_samples, C, patch values) is drawn once per call after the corners and serves every window and
    image (sample ``s`` of a window reads ``z[s]`` at the window's places in the patch).  The fit needs more
    distinct patches than a patch has values; a singular Gaussian (constant references, images barely larger
    than the patch) is refused with an error naming ``references``.  ``sampler='marginal'``, their
    ``marg_sampler_imagenet``: sample ``s`` replaces the window with the same pixels of reference image ``r_s``;
    the ``num_samples`` references (all of them if there are fewer) are drawn once per call with ``generator``,
    without replacement, and serve every window and image, as the authors' code takes the same first
    ``num_samples`` images of its data for every window.

    ``references``: an (N, C, H, W) tensor of images like the model's inputs (e.g. a batch of training images).
    ``None`` (the default, what the authors' ImageNet script does: its sampler's data, its Gaussian's patches and
    its clipping range all come from the folder of images it explains) uses the explained images themselves: a
    map then depends on the other images of the batch, and one image alone is refused with an error naming
    ``references`` (the marginal map would be zero, the conditional samples clipped to the image itself).

    Defaults from the authors' code (``experiments_imagenet.py``, ``prediction_difference_analysis.py``,
    ``utils_sampling.py``): ``window=10``, ``stride=1`` (overlapping windows), ``num_samples=10``,
    ``sampler='conditional'``, ``padding=2``, ``train_size=100000``, 20,000 fitted patches, the softmax probability
    (``score='softmax'``; the weight of evidence needs probabilities, other scores are refused).
    Cost: ``1 + P * S`` forwards per image for ``P`` window positions, ``S = num_samples`` (marginal:
    ``min(num_samples, N)``): at 224x224 and the defaults ``P = 215 ** 2 = 46,225``, about 462,000 forwards per
    image; a larger ``stride`` divides it by about ``stride ** 2`` (windows placed as Occlusion's, the last one cut
    at the image's edge).  The conditional sampler adds, once per call, ``K * C`` matrices of ``D x D``
    (``D = (window + 2 * padding) ** 2``, ``K <= (2 * padding + 1) ** 2`` places, more with cut windows): small at
    the default (D = 196), gigabytes for windows of 50 pixels.  Copies run ``batch_size`` at a time, without
    autograd unless ``create_graph=True``.  Returns (B, 1, H, W).

    Deliberate differences: one noise ``z`` for every window and image (the authors draw a fresh one per window;
    shared draws keep a map independent of the batch and of ``batch_size``, as the marginal sampler's shared
    references do); the fit's corners range over all ``(H - P + 1) x (W - P + 1)`` places (the authors'
    ``range((H - P) * (W - P))`` never reaches the last row and column of places); the Gaussians are fitted per
    call on ``references`` (the authors cache them on disk per network, and their cache's file names omit the
    channel, so channels 1 and 2 load channel 0's regression and conditional covariance: each channel's own here,
    as their code intends); the conditioning is done in float64
    (float32 on MPS) with Cholesky factors where the authors invert ``S_ff``; with ``stride > 1`` windows are
    placed as Occlusion's (the last one cut at the edge, its patch placed by the same border rule with its own
    size) where the authors' non-overlapping mode leaves the remainder of the image uncovered; the map is kept in
    the working precision (the authors store float16); the difference of log-odds is taken as log-ratios
    (:func:`weight_of_evidence`): the same number, kept exact in float32 when the window barely moves the
    probability.
    """

    kind = "perturbation"
    argmax_on_rows = False
    defaults = {"score": "softmax", "window": 10, "stride": 1, "num_samples": 10, "train_size": TRAIN_SIZE,
                "sampler": "conditional", "padding": 2, "references": None, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, window: Size, stride: Size, num_samples: int, train_size: int,
                 sampler: str, padding: int, references: Optional[Tensor], generator: Optional[torch.Generator],
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if target.score != "softmax":
            raise ValueError(f"prediction_difference weighs evidence in probabilities: score must be 'softmax', "
                             f"got {target.score!r}")
        num_samples = positive_int(num_samples, "num_samples")
        train_size = positive_int(train_size, "train_size")
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        window_hw, stride_hw = pair_option(window, "window"), pair_option(stride, "stride")
        if window_hw is None or stride_hw is None:
            raise ValueError(f"window and stride must be positive ints or pairs of them, got {window!r}, {stride!r}")
        optional_generator(generator)
        batch, _, height, width = x.shape
        refs = self._references(x, references)
        in_rows, in_cols = (band.to(x.device) for band in window_bands(height, width, window_hw, stride_hw))
        positions = in_rows.shape[0] * in_cols.shape[0]
        across = in_cols.shape[0]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if sampler == "marginal":
            chosen = torch.randperm(refs.shape[0], generator=generator, device=gen_device)[:num_samples]
            picked = refs[chosen.to(refs.device)].to(device=x.device, dtype=x.dtype)  # only these reach the device
            samples = chosen.shape[0]
        else:
            cond = self._conditional_setup(x, refs, in_rows, in_cols, window_hw, padding, num_samples, generator)
            samples = num_samples
        per_image = positions * samples
        owners = torch.arange(batch, device=x.device)
        with torch.set_grad_enabled(create_graph):
            clean_out = torch.cat([self._forward(x[a:b]) for a, b in RowPlanner(batch, batch_size, x.device)])
            classes = clean_out.shape[1]
            clean = target(clean_out, owners)
            dtype = clean.dtype
            total = torch.zeros(batch * positions, dtype=dtype, device=x.device)
            # rows are image-major, then window, then sample: row r is sample r % S of window (r // S) % P
            for start, stop in RowPlanner(batch * per_image, batch_size, x.device):
                index = torch.arange(start, stop, device=x.device)
                image, position, sample = index // per_image, (index // samples) % positions, index % samples
                if sampler == "marginal":
                    mask = window_masks(in_rows, in_cols, position)
                    copies = torch.where(mask.unsqueeze(1), picked[sample], x[image])
                else:
                    copies = self._conditional_copies(x, image, position // across, position % across, sample,
                                                      **cond)
                probs = target(self._forward(copies), image).to(dtype)
                slot = image * positions + position
                total = total.index_add(0, slot, probs) if create_graph else total.index_add_(0, slot, probs)
            mean = (total / samples).view(batch, in_rows.shape[0], in_cols.shape[0])
            evidence = weight_of_evidence(clean[:, None, None], mean, train_size, classes)
        return window_mean(evidence, in_rows, in_cols).unsqueeze(1)  # 0 where stride > window skips pixels

    @staticmethod
    def _conditional_setup(x: Tensor, refs: Tensor, in_rows: Tensor, in_cols: Tensor, window: Tuple[int, int],
                           padding: int, num_samples: int, generator: Optional[torch.Generator]) -> dict:
        """The patch Gaussian, its conditionals for every distinct place of a window in its patch, the noise."""
        _, channels, height, width = x.shape
        patch = (window[0] + 2 * padding, window[1] + 2 * padding)
        if patch[0] > height or patch[1] > width:
            raise ValueError(f"the conditional sampler's patch, window + 2 * padding = {patch}, is larger than the "
                             f"image ({height}, {width}): lower padding (got {padding!r}) or the window")
        stat = torch.float32 if x.device.type == "mps" else torch.float64  # small matrices, conditioned in float64
        gen_device = generator.device if generator is not None else torch.device("cpu")
        corners = (height - patch[0] + 1) * (width - patch[1] + 1)
        draws = FIT_PATCHES // refs.shape[0] + 1
        fit_at = torch.randint(corners, (channels, draws), generator=generator, device=gen_device).to(x.device)
        noise = torch.randn(num_samples, channels, patch[0] * patch[1], generator=generator, device=gen_device,
                            dtype=torch.float64).to(device=x.device, dtype=stat)
        mean, cov = patch_gaussian(refs, patch, fit_at.to(refs.device), stat)
        mean, cov = mean.to(x.device), cov.to(x.device)

        def places(band: Tensor, size: int, extent: int):  # each window's patch start, and its place in the patch
            first = band.to(torch.uint8).argmax(1)
            length = band.sum(1)
            start = (first - padding).clamp(0, extent - size)  # at the border the patch stops at the image's edge
            keys, which = torch.unique(torch.stack([first - start, length], 1), dim=0, return_inverse=True)
            inside = torch.arange(size, device=band.device)
            return start, which, (inside >= keys[:, :1]) & (inside < keys[:, :1] + keys[:, 1:])

        top, row_kind, row_in = places(in_rows, patch[0], height)
        left, col_kind, col_in = places(in_cols, patch[1], width)
        in_patch = (row_in[:, None, :, None] & col_in[None, :, None, :]).reshape(-1, patch[0] * patch[1])  # (K, D)
        gain, chol = conditional_gaussian(mean, cov, in_patch[:, None, :])  # (K, C, D, D)
        shift = torch.einsum("kcij,scj->ksci", chol, noise)  # (K, S, C, D): L z, the same z everywhere
        # samples are clipped to the references' range at each pixel (taken where the references are)
        low, high = (bound.to(device=x.device, dtype=x.dtype) for bound in (refs.amin(0), refs.amax(0)))
        return {"top": top, "left": left, "kind": row_kind[:, None] * col_in.shape[0] + col_kind[None, :],
                "in_patch": in_patch, "mean": mean.to(x.dtype), "gain": gain.to(x.dtype),
                "shift": shift.to(x.dtype), "low": low, "high": high, "patch": patch}

    @staticmethod
    def _conditional_copies(x: Tensor, image: Tensor, row: Tensor, col: Tensor, sample: Tensor, *, top: Tensor,
                            left: Tensor, kind: Tensor, in_patch: Tensor, mean: Tensor, gain: Tensor, shift: Tensor,
                            low: Tensor, high: Tensor, patch: Tuple[int, int]) -> Tensor:
        """Copies of the images ``image`` with window (``row``, ``col``) drawn from the patch Gaussian conditioned
        on the image's own frame around it: ``mean + G (f - mean) + L z``, clipped to the references' range."""
        rows = top[row][:, None] + torch.arange(patch[0], device=x.device)  # (n, ph)
        cols = left[col][:, None] + torch.arange(patch[1], device=x.device)  # (n, pw)
        n, channels = image.shape[0], x.shape[1]
        chan = torch.arange(channels, device=x.device)[None, :, None, None]
        where = (image[:, None, None, None], chan, rows[:, None, :, None], cols[:, None, None, :])
        frame = x[where].reshape(n, channels, -1)  # (n, C, D): the image's patch around the window
        config = kind[row, col]
        centred = (frame - mean).permute(1, 2, 0)  # (C, D, n): one product per channel serves every row
        drawn = frame
        # every place of a window in its patch (25 at the defaults) for every row, selected per row: no host
        # synchronisation (a selection by index would wait for the device), a few M multiply-adds per row
        for k in range(gain.shape[0]):
            candidate = mean + (gain[k] @ centred).permute(2, 0, 1) + shift[k][sample]
            drawn = torch.where((config == k)[:, None, None], candidate, drawn)
        low_f, high_f = (bound[where[1:]].reshape(n, channels, -1) for bound in (low, high))
        drawn = torch.maximum(torch.minimum(drawn, high_f), low_f)
        fill = torch.where(in_patch[config][:, None, :], drawn, frame).view(n, channels, *patch)
        copies = x[image].clone()
        copies[(torch.arange(n, device=x.device)[:, None, None, None],) + where[1:]] = fill
        return copies

    @staticmethod
    def _references(x: Tensor, references: Optional[Tensor]) -> Tensor:
        if references is None:
            if x.shape[0] < 2:
                raise ValueError("prediction_difference samples windows from references: with references=None it "
                                 "draws from the explained images, and one image alone only has its own pixels (the "
                                 "map would be zero); pass references= (an (N, C, H, W) tensor of images such as a "
                                 "batch of training data)")
            return x
        if not isinstance(references, Tensor):
            raise TypeError(f"references must be None or an (N, C, H, W) tensor, got {type(references).__name__}")
        if references.dim() != 4 or tuple(references.shape[1:]) != tuple(x.shape[1:]) or references.shape[0] == 0:
            raise ValueError(f"references must be an (N, C, H, W) tensor of images shaped like x's "
                             f"{tuple(x.shape[1:])}, got shape {tuple(references.shape)}")
        return references.detach()  # left where it is: only the samples and patches drawn from it move
