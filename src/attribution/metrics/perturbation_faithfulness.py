"""Perturbation faithfulness metrics with Quantus' protocols: IROF, monotonicity (Arya et al.), monotonicity
correlation, faithfulness estimate, region perturbation (AOPC) and selectivity.

Each metric perturbs the pixels the map ranks (singly, in groups of ``features_in_step``, in square patches or in
superpixels), scores every perturbed copy with one batched forward pass per ``batch_size`` rows (see
:mod:`attribution.metrics.common`) and summarises the scores per image.  The reference is Quantus 0.6.0
(Hedstroem et al., "Quantus: An Explainable AI Toolkit for Responsible Evaluation of Neural Network Explanations
and Beyond", JMLR 2023, arXiv:2202.06861): defaults are Quantus', and the tests compare with it number for number.

Conventions shared with the rest of :mod:`attribution.metrics`, and how they map to Quantus:

* A *feature* is a pixel (all channels together), ranked by the map's channel sum.  Quantus counts the elements of
  the (C, H, W) input with the map broadcast over channels: for a one-channel map its ``features_in_step = C k``
  moves ``k`` whole pixels, which is ``features_in_step=k`` here.  Multi-channel maps are summed over channels here
  (Quantus would rank each channel's element on its own).
* ``absolute`` is Quantus' ``abs`` (rank ``|map|``), with its default per metric.  Quantus' ``normalise`` (division
  of the whole batch of maps by their largest magnitude) is left out: a positive factor changes no ranking, no
  segment or patch order and no rank or Pearson correlation, so none of these metrics sees it.
* ``substrate`` is what replaces removed pixels, any substrate of :func:`attribution.metrics.common.make_substrate`:
  ``'black'`` / ``'white'`` (each image's minimum / maximum over all channels, Quantus' ``perturb_baseline`` of the
  same names; replacing pixels by the minimum never changes the minimum, so the cumulative protocols keep one value
  throughout, as in Quantus), ``'zeros'``, ``'mean'`` (each image's per-channel mean), ``'blur'``, a number, a
  tensor, a callable.  Quantus' ``'mean'`` is the mean over all channels of the array it is
  given; ``substrate=lambda x: x.mean(dim=(1, 2, 3), keepdim=True)`` reproduces it for the one-shot metrics.
* Ties between equal attributions are broken by one fixed random permutation of the pixels (``seed``); Quantus
  leaves them to NumPy's unstable ``argsort``.  Maps without ties rank identically.
* Correlations are 0, not NaN, where one side is constant (as :func:`attribution.metrics.faithfulness_correlation`).

Pixel flipping (Bach et al., PLOS ONE 2015; Quantus' ``PixelFlipping``) is not repeated here: its curve is the
deletion curve of :func:`attribution.metrics.deletion` with ``step=features_in_step`` and the minimum as the
substrate, without the first (unperturbed) point; Quantus' area is the trapezoid with unit spacing over the
remaining points (``tests/metrics/test_quantus_faithfulness.py`` shows it).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import (Curve, SubstrateSpec, check_maps, make_substrate, resolve_scorer, salience_ranks, score_rows,
                     trapezoid)
from .similarity import pearson, spearman


class MonotonicityCurve(NamedTuple):
    """Arya et al.'s monotonicity per image.

    ``monotonic`` (B,) bool: whether ``y`` never decreases; ``x`` (S,): the fraction of pixels inserted after each
    step; ``y`` (B, S): the target's score after each step.
    """

    monotonic: Tensor
    x: Tensor
    y: Tensor


class AopcCurve(NamedTuple):
    """Region perturbation per image.

    ``aopc`` (B,): the area over the perturbation curve of Samek et al., ``sum_k y_k / (L + 1)``; ``auc`` (B,): the
    trapezoid with unit spacing over ``y`` (Quantus' ``get_auc_score`` per image); ``x`` (L,): the number of
    patches removed, 1 to L; ``y`` (B, L): the score lost, ``f(x) - f(x with k patches removed)``.
    """

    aopc: Tensor
    auc: Tensor
    x: Tensor
    y: Tensor


class IrofCurve(NamedTuple):
    """IROF per image.

    ``aoc`` (B,): Quantus' value ``n - trapz(y_1, ..., y_n)`` (unit spacing, ``n`` the image's segment count);
    ``aoc_unit`` (B,): the area over the whole curve ``y_0 = 1, ..., y_n`` on ``x = l / n``, in [0, 1] for scores
    that only fall, comparable between images with different segment counts; ``y`` (B, M + 1): the score after
    removing ``l`` segments divided by the unperturbed score (``y[:, 0] = 1``), NaN after each image's last segment;
    ``segments`` (B,): the segment counts ``n``.
    """

    aoc: Tensor
    aoc_unit: Tensor
    y: Tensor
    segments: Tensor


# ------------------------------------------------------------------------------------------------------ helpers
def _positive_int(name: str, value, upper: Optional[int] = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" from 1 to {upper}{what}" if upper is not None else ""
        raise ValueError(f"{name} must be a positive int{bound}, got {value!r}")
    return value


def _values(images: Tensor, maps: Tensor, absolute: bool) -> Tensor:
    values = check_maps(images, maps)
    return values.abs() if absolute else values


def _group_sums(values: Tensor, group_of: Tensor, groups: int) -> Tensor:
    """(B, groups): the map's sum over each group; ``group_of`` (B, N) holds each pixel's group."""
    return torch.zeros(values.shape[0], groups, dtype=values.dtype, device=values.device).scatter_add_(
        1, group_of, values)


# ------------------------------------------------------------------------------------------ faithfulness estimate
def faithfulness_estimate(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                          features_in_step: int = 1, substrate: SubstrateSpec = "black", absolute: bool = False,
                          score: str = "logit", seed: int = 0, batch_size: Optional[int] = None) -> Tensor:
    """Faithfulness estimate (B,) in [-1, 1], higher is better.

    Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with Self-Explaining Neural Networks", NeurIPS 2018,
    arXiv:1806.07538 (Quantus' ``FaithfulnessEstimate``).  The pixels, in descending order of the map, are cut
    into groups of ``features_in_step``; each group is set to the substrate on its own (not cumulatively) and

        estimate = Pearson_g( sum_{i in G_g} a_i ,  f(x) - f(x with G_g removed) ).

    Defaults as Quantus': one pixel per group, the image's minimum (``'black'``) as the substrate, the signed map,
    the raw score (``score='logit'``, Quantus' ``softmax=False``).  Cost: ``ceil(H W / features_in_step) + 1``
    forwards per image.
    """
    values = _values(images, maps, absolute)
    batch, pixels = values.shape
    step = _positive_int("features_in_step", features_in_step, pixels, " (the pixels of an image)")
    groups = math.ceil(pixels / step)
    group_of = salience_ranks(values, seed) // step  # (B, N): group 0 holds the most salient pixels
    fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    grid = group_of.view(batch, 1, *images.shape[-2:])

    def rows(owners: Tensor, k: Tensor) -> Tensor:  # k = 0: the image; k = g + 1: group g removed
        removed = grid[owners] == (k - 1).view(-1, 1, 1, 1)
        return torch.where(removed, fill[owners], images[owners])

    measured = score_rows(model, rows, batch, groups + 1, scorer, batch_size, images.device, images.dtype)
    drops = measured[:, :1] - measured[:, 1:]
    sums = _group_sums(values.to(drops.dtype), group_of, groups)
    return pearson(sums, drops).to(drops.dtype)


# --------------------------------------------------------------------------------------------- monotonicity (Arya)
def monotonicity(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                 features_in_step: int = 1, substrate: SubstrateSpec = "black", absolute: bool = True,
                 score: str = "softmax", seed: int = 0, batch_size: Optional[int] = None) -> MonotonicityCurve:
    """Monotonicity of Arya et al.: does the score only grow as pixels are inserted, least salient first?

    Arya et al., "One Explanation Does Not Fit All: A Toolkit and Taxonomy of AI Explainability Techniques",
    arXiv:1909.03012, 2019 (AIX360; Quantus' ``Monotonicity``).  Starting from the substrate, the image's pixels are
    put back ``features_in_step`` at a time in ascending order of the map; with ``y_k`` the score after step ``k``,

        monotonic = all_k ( y_{k+1} >= y_k ).

    Returns a :class:`MonotonicityCurve` (``monotonic`` (B,) bool, higher, i.e. True, is better).  Defaults as
    Quantus': one pixel per step, the image's minimum (``'black'``) as the substrate, ``|map|`` (``absolute``), the
    softmax probability.  Deliberate difference: Quantus 0.6.0 writes the baseline value again where it should
    insert the image's pixels, so every forward sees the bare baseline and every map is reported monotonic; this
    follows the paper and inserts the pixels (the test shows both).  Cost: ``ceil(H W / features_in_step)``
    forwards per image.
    """
    values = _values(images, maps, absolute)
    batch, pixels = values.shape
    step = _positive_int("features_in_step", features_in_step, pixels, " (the pixels of an image)")
    steps = math.ceil(pixels / step)
    order = salience_ranks(-values, seed).view(batch, 1, *images.shape[-2:])  # 0: the least salient pixel
    fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    counts = (torch.arange(1, steps + 1, device=images.device) * step).clamp(max=pixels)

    def rows(owners: Tensor, k: Tensor) -> Tensor:  # k: after inserting counts[k] pixels
        inserted = order[owners] < counts[k].view(-1, 1, 1, 1)
        return torch.where(inserted, images[owners], fill[owners])

    y = score_rows(model, rows, batch, steps, scorer, batch_size, images.device, images.dtype)
    return MonotonicityCurve((y.diff(dim=1) >= 0).all(dim=1), counts.to(y.dtype) / pixels, y)


# ------------------------------------------------------------------------------------- monotonicity correlation
def monotonicity_correlation(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                             samples: int = 100, features_in_step: int = 1, substrate: SubstrateSpec = "uniform",
                             uniform_range: Tuple[float, float] = (0.0, 1.0), absolute: bool = True,
                             score: str = "softmax", generator: Optional[torch.Generator] = None, seed: int = 0,
                             batch_size: Optional[int] = None) -> Tensor:
    """Monotonicity correlation (B,) in [-1, 1], higher is better.

    Nguyen & Martinez, "On quantitative aspects of model interpretability", arXiv:2007.07584, 2020 (Quantus'
    ``MonotonicityCorrelation``).  The pixels, in ascending order of the map, are cut into groups of
    ``features_in_step``; each group is replaced on its own, ``samples`` times, and

        monotonicity = Spearman_g( sum_{i in G_g} a_i ,  mean_s (f(x with G_g replaced, draw s) - f(x))^2 ).

    Defaults as Quantus': 100 samples, one pixel per group, ``'uniform'`` as the substrate (one value drawn from
    U(``uniform_range``) per image, group and sample, written into every channel of the group's pixels, as Quantus'
    batched ``'uniform'`` baseline does), ``|map|`` (``absolute``), the softmax probability.  Quantus divides the
    mean squared change by ``f(x)^2``; one factor per image changes no rank and is left out.  Draws come from
    ``generator`` in the order (group, sample) and are shared by the images (group ``g`` is each image's ``g``-th
    least salient), so an image's value does not depend on the rest of the batch (Quantus draws per image).  With a
    deterministic substrate (anything but ``'uniform'``) the samples are equal and one forward per group is made.
    Cost: ``groups * samples + 1`` forwards per image (``groups + 1`` when deterministic), ``groups =
    ceil(H W / features_in_step)``.
    """
    values = _values(images, maps, absolute)
    batch, pixels = values.shape
    step = _positive_int("features_in_step", features_in_step, pixels, " (the pixels of an image)")
    _positive_int("samples", samples)
    groups = math.ceil(pixels / step)
    group_of = salience_ranks(-values, seed) // step  # (B, N): group 0 holds the least salient pixels
    grid = group_of.view(batch, 1, *images.shape[-2:])
    random = isinstance(substrate, str) and substrate == "uniform"
    draws = samples if random else 1
    if random:
        low, high = _range(uniform_range)
        device = generator.device if generator is not None else torch.device("cpu")
        uniform = torch.rand(groups, draws, generator=generator, dtype=torch.float64, device=device)
        uniform = (low + (high - low) * uniform).to(device=images.device, dtype=images.dtype)
    else:
        fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)

    def rows(owners: Tensor, k: Tensor) -> Tensor:  # k = 0: the image; k = 1 + g * draws + s: group g, draw s
        index = (k - 1).clamp(min=0)
        group, draw = index // draws, index % draws
        removed = (grid[owners] == group.view(-1, 1, 1, 1)) & (k > 0).view(-1, 1, 1, 1)
        value = uniform[group, draw].view(-1, 1, 1, 1) if random else fill[owners]
        return torch.where(removed, value, images[owners])

    measured = score_rows(model, rows, batch, groups * draws + 1, scorer, batch_size, images.device, images.dtype)
    change = (measured[:, 1:].view(batch, groups, draws) - measured[:, :1, None]).pow(2).mean(dim=2)
    sums = _group_sums(values.to(change.dtype), group_of, groups)
    return spearman(sums, change).to(change.dtype)


def _range(uniform_range) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in uniform_range)
    except (TypeError, ValueError):
        raise ValueError(f"uniform_range must be two numbers (low, high), got {uniform_range!r}") from None
    if not low <= high:
        raise ValueError(f"uniform_range must have low <= high, got {uniform_range!r}")
    return low, high


# ------------------------------------------------------------------------------- region perturbation, selectivity
def _patch_ids(height: int, width: int, patch: int, device: torch.device) -> Tensor:
    """(H * W,) the patch of each pixel: a grid of ``patch`` x ``patch`` squares over the image padded to a multiple
    of ``patch`` (the smaller half of the padding above and to the left, as Quantus pads), row-major."""
    top, left = ((-height) % patch) // 2, ((-width) % patch) // 2
    rows = (torch.arange(height, device=device) + top) // patch
    cols = (torch.arange(width, device=device) + left) // patch
    return (rows[:, None] * math.ceil(width / patch) + cols[None, :]).flatten()


def _patch_scores(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec, *, patch_size: int,
                  regions: Optional[int], order: str, substrate: SubstrateSpec, absolute: bool, score: str,
                  generator: Optional[torch.Generator], seed: int, batch_size: Optional[int]) -> Tensor:
    """(B, L + 1): the score with the first 0..L patches of ``order`` removed, cumulatively."""
    values = _values(images, maps, absolute)
    batch, _, height, width = images.shape
    _positive_int("patch_size", patch_size)
    ids = _patch_ids(height, width, patch_size, images.device)
    patches = int(ids.max()) + 1
    steps = patches if regions is None else min(_positive_int("regions", regions), patches)
    sums = torch.zeros(batch, patches, dtype=values.dtype, device=values.device).index_add_(1, ids, values)
    if order == "morf":
        rank = salience_ranks(sums, seed)
    elif order == "lerf":
        rank = salience_ranks(-sums, seed)
    elif order == "random":  # one random order of the patches, shared by the images (batch-independent)
        device = generator.device if generator is not None else torch.device("cpu")
        rank = torch.rand(patches, generator=generator, device=device).argsort().argsort()
        rank = rank.to(images.device).expand(batch, patches)
    else:
        raise ValueError(f"order must be 'morf', 'lerf' or 'random', got {order!r}")
    removal = rank[:, ids].view(batch, 1, height, width)  # the step at which each pixel goes, from 0
    fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)

    def rows(owners: Tensor, k: Tensor) -> Tensor:  # k patches removed
        removed = removal[owners] < k.view(-1, 1, 1, 1)
        return torch.where(removed, fill[owners], images[owners])

    return score_rows(model, rows, batch, steps + 1, scorer, batch_size, images.device, images.dtype)


def region_perturbation(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
                        patch_size: int = 8, regions: int = 100, order: str = "morf",
                        substrate: SubstrateSpec = "black", absolute: bool = False, score: str = "softmax",
                        generator: Optional[torch.Generator] = None, seed: int = 0,
                        batch_size: Optional[int] = None) -> AopcCurve:
    """Region perturbation: the score lost as square patches are removed, most relevant first (MoRF).

    Samek, Binder, Montavon, Lapuschkin & Mueller, "Evaluating the Visualization of What a Deep Neural Network Has
    Learned", IEEE TNNLS 2017, arXiv:1509.06321 (Quantus' ``RegionPerturbation``).  The image is tiled into
    ``patch_size`` squares (padded to a multiple of it as Quantus pads), ranked by the map's sum over each; the first
    ``k`` patches of the order are set to the substrate, cumulatively, for ``k = 1..L`` (``L = min(regions,
    patches)``), and

        AOPC = 1 / (L + 1) sum_{k=0}^{L} ( f(x) - f(x with k patches removed) ).

    ``order``: ``'morf'`` (most relevant first; higher AOPC is better), ``'lerf'`` (least relevant first; lower is
    better) or ``'random'`` (from ``generator``).  Returns an :class:`AopcCurve`: ``aopc`` (the paper's), ``auc``
    (Quantus' unit-spacing trapezoid over the drops, the per-image number its ``get_auc_score`` averages) and the
    curve ``y`` (B, L) of drops, which is what Quantus returns.  Defaults as Quantus': 8-pixel patches, 100
    regions, MoRF, the image's minimum (``'black'``), the signed map, the softmax probability.  Cost: ``L + 1``
    forwards per image.
    """
    measured = _patch_scores(model, images, maps, target, patch_size=patch_size, regions=regions, order=order,
                             substrate=substrate, absolute=absolute, score=score, generator=generator, seed=seed,
                             batch_size=batch_size)
    drops = measured[:, :1] - measured[:, 1:]
    x = torch.arange(1, drops.shape[1] + 1, dtype=drops.dtype, device=drops.device)
    return AopcCurve(drops.sum(dim=1) / (drops.shape[1] + 1), trapezoid(drops, x), x, drops)


def selectivity(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *, patch_size: int = 8,
                substrate: SubstrateSpec = "black", absolute: bool = False, score: str = "softmax", seed: int = 0,
                batch_size: Optional[int] = None) -> Curve:
    """Selectivity: how fast the score falls as patches are removed, most relevant first; lower area is better.

    Montavon, Samek & Mueller, "Methods for Interpreting and Understanding Deep Neural Networks", Digital Signal
    Processing 2018, arXiv:1706.07979 (Quantus' ``Selectivity``).  Patches as in :func:`region_perturbation`, all of
    them removed one after another in descending order of the map's sum; ``y_k = f(x with k patches removed)`` for
    ``k = 1..P`` and the area is the trapezoid with unit spacing, ``sum_{k=1}^{P-1} (y_k + y_{k+1}) / 2`` (Quantus'
    ``get_auc_score`` per image).  Returns a :class:`Curve` whose ``x`` is the number of patches removed (1..P),
    not a fraction.  Defaults as Quantus': 8-pixel patches, the image's minimum (``'black'``), the signed map, the
    softmax probability.  Cost: ``P`` forwards per image (``P = ceil(H / 8) ceil(W / 8)``).
    """
    measured = _patch_scores(model, images, maps, target, patch_size=patch_size, regions=None, order="morf",
                             substrate=substrate, absolute=absolute, score=score, generator=None, seed=seed,
                             batch_size=batch_size)[:, 1:]  # the unperturbed image is not on Quantus' curve
    x = torch.arange(1, measured.shape[1] + 1, dtype=measured.dtype, device=measured.device)
    return Curve(trapezoid(measured, x), x, measured)


# ---------------------------------------------------------------------------------------------------------- IROF
def _segment_labels(images: Tensor, segments: Union[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """(B, H * W) segment ids 0..n_b - 1 per image and the counts n_b (B,)."""
    from ..perturbation.segments import SEGMENTERS, superpixels

    batch, _, height, width = images.shape
    if isinstance(segments, str):
        if segments not in SEGMENTERS:
            raise ValueError(f"segments must be one of {SEGMENTERS}, an (H, W) or (B, H, W) integer label map, "
                             f"got {segments!r}")
        labels = superpixels(images, segments)
    elif isinstance(segments, Tensor) and not segments.is_floating_point() and not segments.is_complex() \
            and segments.dim() in (2, 3) and tuple(segments.shape[-2:]) == (height, width) \
            and (segments.dim() == 2 or segments.shape[0] in (1, batch)):
        labels = segments.to(images.device).expand(batch, height, width)
    else:
        shape = tuple(segments.shape) if isinstance(segments, Tensor) else type(segments).__name__
        raise ValueError(f"segments must be one of ('quickshift', 'slic'), an integer label map of shape "
                         f"({height}, {width}) or ({batch}, {height}, {width}), got {shape}")
    flat = labels.reshape(batch, -1).long()
    flat = flat - flat.amin(dim=1, keepdim=True)
    span = int(flat.max()) + 1
    key = flat + torch.arange(batch, device=flat.device)[:, None] * span
    unique, inverse = torch.unique(key, return_inverse=True)
    counts = torch.bincount(unique // span, minlength=batch)
    return inverse - (counts.cumsum(0) - counts)[:, None], counts


def irof(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *,
         segments: Union[str, Tensor] = "slic", substrate: SubstrateSpec = "mean", absolute: bool = False,
         score: str = "softmax", seed: int = 0, batch_size: Optional[int] = None) -> IrofCurve:
    """IROF, iterative removal of features: the area over the score curve as superpixels are removed, most relevant
    (highest mean attribution) first; higher is better.

    Rieger & Hansen, "IROF: a low resource evaluation metric for explanation methods", ICLR 2020 workshop,
    arXiv:2003.08747 (Quantus' ``IROF``).  With ``y_l = f(x with the first l segments removed) / f(x)``,
    cumulatively, for ``l = 0..n``:

        aoc = n - sum_{l=1}^{n-1} (y_l + y_{l+1}) / 2        (Quantus' number)
        aoc_unit = 1 - (1 / n) sum_{l=0}^{n-1} (y_l + y_{l+1}) / 2   (the same curve from y_0 = 1, on [0, 1])

    ``segments``: ``'slic'`` (default, Quantus' segmentation: scikit-image SLIC with 100 segments, compactness 10,
    run through :func:`attribution.perturbation.segments.superpixels`), ``'quickshift'``, or integer label maps
    (H, W) or (B, H, W), any label values.  Returns an :class:`IrofCurve`.  Defaults as Quantus': SLIC, the mean as
    the substrate, the signed map, the softmax probability.

    Deliberate differences from Quantus 0.6.0, each shown by the tests: (1) the library's SLIC scales each image to
    [0, 1] first (what scikit-image's Lab conversion expects), Quantus segments the raw input (identical for images
    already spanning [0, 1]; pass Quantus' labels as ``segments`` to match it on other inputs); (2) ``'mean'`` is
    each image's per-channel mean, while Quantus fills with the mean of the whole batch as it stands at each step
    (so an image's value depends on the other images and on the segments already filled); (3) Quantus pads the
    curves of a batch to the largest segment count and its trapezoid then adds ``y_n / 2`` for every image with
    fewer segments; here each image's value is its own (Quantus with ``batch_size=1``); (4) Quantus 0.6.0 fails on
    images with more than one channel (its mask is not broadcast over channels); all channels of a segment are
    removed here.  Cost: ``n + 1`` forwards per image (``n`` is at most about 100 with SLIC), plus SLIC on the CPU.
    """
    values = _values(images, maps, absolute)
    batch, _, height, width = images.shape
    labels, counts = _segment_labels(images, segments)
    most = int(counts.max())
    sizes = torch.zeros(batch, most, dtype=values.dtype, device=values.device).scatter_add_(
        1, labels, torch.ones_like(values))
    means = _group_sums(values, labels, most) / sizes.clamp(min=1)
    means = means.masked_fill(sizes == 0, float("-inf"))  # the padding of images with fewer segments goes last
    # ties in an order of each image's own segments (not of the batch's padded count)
    removal = salience_ranks(means, seed, prefix_stable=True).gather(1, labels).view(batch, 1, height, width)
    fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    # one row per (image, l) with l = 0..n_b: the rows of all images are laid end to end, none wasted on padding
    per_image = counts + 1
    owner = torch.repeat_interleave(torch.arange(batch, device=images.device), per_image)
    removed_count = torch.arange(owner.numel(), device=images.device) - (per_image.cumsum(0) - per_image)[owner]

    def rows(index: Tensor, _: Tensor) -> Tensor:
        image = owner[index]
        removed = removal[image] < removed_count[index].view(-1, 1, 1, 1)
        return torch.where(removed, fill[image], images[image])

    def measure(outputs: Tensor, index: Tensor) -> Tensor:
        return scorer(outputs, owner[index])

    flat = score_rows(model, rows, owner.numel(), 1, measure, batch_size, images.device, images.dtype)[:, 0]
    y = torch.full((batch, most + 1), float("nan"), dtype=flat.dtype, device=flat.device)
    y[owner, removed_count] = flat
    y = y / y[:, :1]
    n = counts.to(y.dtype)
    last = y.gather(1, counts[:, None])[:, 0]
    inner = torch.nan_to_num(y[:, 1:], nan=0.0).sum(dim=1)  # y_1 + ... + y_n
    aoc = n - (inner - (y[:, 1] + last) / 2)
    aoc_unit = 1 - (inner + 1 - (1 + last) / 2) / n
    return IrofCurve(aoc, aoc_unit, y, counts)
