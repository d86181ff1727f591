"""Prediction Difference Analysis: the weight of evidence a window of pixels gives the target class."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, positive_int
from ..core.registry import register
from ..core.targets import Target
from .occlusion import Size, pair_option, window_bands

#: N of the Laplace correction ``(p * N + 1) / (N + K)``: the authors' code hard-codes 100,000 "training images"
TRAIN_SIZE = 100_000


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


@register("prediction_difference")
class PredictionDifference(Explainer):
    """Prediction Difference Analysis: how much evidence for the target a window of pixels carries, measured by
    how the target's probability changes when the window is replaced by values drawn from other images.

    Zintgraf, Cohen, Adel & Welling, "Visualizing Deep Neural Network Decisions: Prediction Difference Analysis",
    ICLR 2017, arXiv:1702.04595 (after Robnik-Sikonja & Kononenko, IEEE TKDE 2008).

    For each ``window`` x ``window`` position ``w`` (all channels at once, moved by ``stride``):
    ``WE_w = log2 odds(p_t(x)) - log2 odds(mean_s p_t(x with w taken from reference r_s))``, with probabilities
    Laplace-corrected as ``(p * N + 1) / (N + K)`` (``N = train_size``, ``K`` the model's number of classes) and
    ``A(p) = mean of WE_w over the windows covering pixel p``.  Positive: the window's actual values speak for the
    target.  Marginal sampling, as the authors' ``marg_sampler_imagenet``: sample ``s`` replaces the window with the
    same pixels of reference image ``r_s``; the ``num_samples`` references (all of them if there are fewer) are
    drawn once per call with ``generator``, without replacement, and serve every window and image, as the authors'
    code takes the same first ``num_samples`` images of its data for every window.

    ``references``: an (N, C, H, W) tensor of images like the model's inputs (e.g. a batch of training images).
    ``None`` (the default, what the authors' ImageNet script does) samples from the explained images themselves
    (the image's own pixels among them): a map then depends on the other images of the batch, and one image alone
    is refused with an error naming ``references``.

    Defaults from the authors' code (``experiments_imagenet.py``, ``prediction_difference_analysis.py``):
    ``window=10``, ``stride=1`` (overlapping windows), ``num_samples=10``, ``train_size=100000``, the softmax
    probability (``score='softmax'``; the weight of evidence needs probabilities, other scores are refused).
    Cost: ``1 + P * min(num_samples, N)`` forwards per image for ``P`` window positions: at 224x224 and the
    defaults ``P = 215 ** 2 = 46,225``, about 462,000 forwards per image; a larger ``stride`` divides it by about
    ``stride ** 2`` (windows placed as Occlusion's, the last one cut at the image's edge).  Copies run
    ``batch_size`` at a time, without autograd unless ``create_graph=True``.  Returns (B, 1, H, W).

    Deliberate differences: only the marginal sampler (the authors' script defaults to their conditional one, a
    Gaussian over ``window + 2 * padding`` patches conditioned on the window's frame); with ``stride > 1`` windows
    are placed as Occlusion's (the last one cut at the edge) where the authors' non-overlapping mode leaves the
    remainder of the image uncovered; the map is kept in the working precision (the authors store float16); the
    difference of log-odds is taken as log-ratios (:func:`weight_of_evidence`): the same number, kept exact in float32
    when the window barely moves the probability.
    """

    kind = "perturbation"
    argmax_on_rows = False
    defaults = {"score": "softmax", "window": 10, "stride": 1, "num_samples": 10, "train_size": TRAIN_SIZE,
                "references": None, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, window: Size, stride: Size, num_samples: int, train_size: int,
                 references: Optional[Tensor], generator: Optional[torch.Generator], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if target.score != "softmax":
            raise ValueError(f"prediction_difference weighs evidence in probabilities: score must be 'softmax', "
                             f"got {target.score!r}")
        num_samples = positive_int(num_samples, "num_samples")
        train_size = positive_int(train_size, "train_size")
        window_hw, stride_hw = pair_option(window, "window"), pair_option(stride, "stride")
        if window_hw is None or stride_hw is None:
            raise ValueError(f"window and stride must be positive ints or pairs of them, got {window!r}, {stride!r}")
        batch, _, height, width = x.shape
        refs = self._references(x, references)
        in_rows, in_cols = (band.to(x.device) for band in window_bands(height, width, window_hw, stride_hw))
        positions = in_rows.shape[0] * in_cols.shape[0]
        gen_device = generator.device if generator is not None else torch.device("cpu")
        chosen = torch.randperm(refs.shape[0], generator=generator, device=gen_device)[:num_samples].to(x.device)
        samples = chosen.shape[0]
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
                across = in_cols.shape[0]
                mask = in_rows[position // across][:, :, None] & in_cols[position % across][:, None, :]
                copies = torch.where(mask.unsqueeze(1), refs[chosen[sample]], x[image])
                probs = target(self._forward(copies), image).to(dtype)
                slot = image * positions + position
                total = total.index_add(0, slot, probs) if create_graph else total.index_add_(0, slot, probs)
            mean = (total / samples).view(batch, in_rows.shape[0], in_cols.shape[0])
            evidence = weight_of_evidence(clean[:, None, None], mean, train_size, classes)
            rows_f, cols_f = in_rows.to(dtype), in_cols.to(dtype)
            summed = rows_f.T @ evidence @ cols_f  # (B, H, W): each pixel's sum over the windows covering it
            count = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]
        return (summed / count).unsqueeze(1)

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
        return references.detach().to(device=x.device, dtype=x.dtype)
