"""Ground-truth localisation in the protocols of Quantus 0.6.0: relevance rank accuracy, top-k intersection, the ROC
AUC of a map against a mask, and Focus on 2 x 2 mosaics.

Maps are (B, C, H, W), (B, 1, H, W) or (B, H, W) at the regions' resolution; the per-pixel map is the signed
channel sum (:func:`attribution.metrics.common.pixel_map`); pass ``maps.abs()`` to rank by magnitude.  Regions are
boxes or masks (:mod:`attribution.metrics.regions`).  Every metric returns one value per image, (B,), in float64
where the map is float64 and float32 otherwise; an image whose region is empty scores NaN, as in Quantus (the
library's :attr:`EvaluationTable.means <attribution.metrics.evaluation.EvaluationTable.means>` skips NaNs).

Quantus divides every map by the largest magnitude in the whole batch first (``normalise_by_max``); none of these
metrics changes under a positive rescaling of a map, so that step is left out here.

Relevance mass accuracy (Arras et al., Quantus ``RelevanceMassAccuracy``) is
:func:`attribution.metrics.localisation.attribution_localisation`: on the non-negative heatmaps of the paper both
are ``R_in / R_tot``; see that function and ``tests/metrics/test_quantus_localisation.py`` for the signed case.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

from .common import check_finite, pixel_map
from .localisation import attribution_localisation
from .regions import Regions, region_mask
from .similarity import rank_data

#: Quantus' default ``k`` of ``TopKIntersection`` (pixels)
TOP_K = 1000


def _pixels(maps: Tensor, regions: Regions) -> Tuple[Tensor, Tensor]:
    """The per-pixel map (B, N) and the region mask (B, N)."""
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise ValueError("maps must be a tensor of shape (B, C, H, W), (B, 1, H, W) or (B, H, W)")
    check_finite(maps)
    m = pixel_map(maps.detach())
    batch, height, width = m.shape
    mask = region_mask(regions, (height, width), batch, m.device)
    return m.flatten(1), mask.flatten(1)


def _top_k_hits(values: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """Expected number of region pixels among the ``k`` (B,) highest values of each row, (B,).

    Pixels strictly above the k-th highest value are all taken; the remaining slots go to the pixels tied with it,
    each equally likely, so a tie straddling the cut contributes ``slots * (tied in region) / tied``.  Rows with
    ``k = 0`` give 0.
    """
    n = values.shape[1]
    cut = values.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(0, n - 1).unsqueeze(1))
    above, tied = values > cut, values == cut
    slots = (k - above.sum(dim=1)).to(values.dtype)
    tied_in = (tied & mask).sum(dim=1).to(values.dtype)
    hits = (above & mask).sum(dim=1).to(values.dtype) + slots * tied_in / tied.sum(dim=1).clamp(min=1)
    return torch.where(k > 0, hits, torch.zeros_like(hits))


def relevance_rank_accuracy(maps: Tensor, regions: Regions) -> Tensor:
    """Relevance rank accuracy, (B,): the share of the ``K`` highest-ranked pixels that lie in the region, with
    ``K`` the region's size (higher is better; 1 when the region holds the ``K`` largest values).

    Arras, Osman & Samek, "CLEVR-XAI: A Benchmark Dataset for the Ground Truth Evaluation of Neural Network
    Explanations", Information Fusion 81, 2022, arXiv:2003.07258 (Quantus ``RelevanceRankAccuracy``):
    ``RRA = |top_K(R) & GT| / |GT|``, ``K = |GT|``.  Defaults as Quantus: the signed map is ranked (its
    ``abs=False``).  An empty region gives NaN.  One deliberate difference: pixels tied with the K-th value share the
    remaining slots in expectation (the mean over every order of the ties), where Quantus takes whichever tied pixels
    ``np.argsort`` happens to put first; the two agree whenever no tie straddles the cut.
    """
    values, mask = _pixels(maps, regions)
    size = mask.sum(dim=1)
    score = _top_k_hits(values, mask, size) / size.clamp(min=1).to(values.dtype)
    return torch.where(size > 0, score, torch.full_like(score, float("nan")))


def top_k_intersection(maps: Tensor, regions: Regions, k: int = TOP_K, concept_influence: bool = False) -> Tensor:
    """Top-k intersection, (B,): the share of the ``k`` highest-ranked pixels that lie in the region (higher is
    better).

    Theiner, Müller-Budack & Ewerth, "Interpretable Semantic Photo Geolocation", WACV 2022, arXiv:2104.14995
    (Quantus ``TopKIntersection``): ``TKI = |top_k(R) & GT| / k``; ``concept_influence=True`` divides by the
    region's share of the image, ``TKI * N / |GT|`` (1 for a uniform map).  Defaults as Quantus: ``k = 1000`` pixels,
    the signed map ranked, no concept influence.  An empty region gives NaN.  Ties at the cut are shared in
    expectation, as in :func:`relevance_rank_accuracy`.  Quantus asks for ``k`` below the pixel count; here
    ``1 <= k <= H * W``.
    """
    values, mask = _pixels(maps, regions)
    batch, n = values.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (the number of pixels), got {k!r}")
    size = mask.sum(dim=1)
    score = _top_k_hits(values, mask, torch.full((batch,), k, device=values.device)) / k
    if concept_influence:
        score = score * n / size.clamp(min=1).to(score.dtype)
    return torch.where(size > 0, score, torch.full_like(score, float("nan")))


def localisation_auc(maps: Tensor, regions: Regions) -> Tensor:
    """Area under the ROC curve of the map as a pixel classifier of the region, (B,) (higher is better; 0.5 for a
    constant or random map, 1 when every region pixel outscores every other pixel).

    Fawcett, "An Introduction to ROC Analysis", Pattern Recognition Letters 27(8), 2006 (Quantus ``AUC``, which
    calls scikit-learn's ``roc_curve`` and ``auc`` per image).  Computed in closed form as the Mann-Whitney
    statistic, ``AUC = P(r_in > r_out) + P(r_in = r_out) / 2`` over region/background pixel pairs, from average
    ranks of the sorted map: the same number as scikit-learn's trapezoid over its tie-grouped thresholds, batched.
    Defaults as Quantus: the signed map.  NaN when the region is empty or covers the whole image (no negatives; the
    ROC curve is undefined, scikit-learn's fpr is NaN too).
    """
    values, mask = _pixels(maps, regions)
    dtype, n = values.dtype, values.shape[1]
    rank = rank_data(values.to(torch.float64)) + 1  # 1-based, ties sharing their average rank
    positives = mask.sum(dim=1).to(torch.float64)
    negatives = n - positives
    u = (rank * mask).sum(dim=1) - positives * (positives + 1) / 2
    auc = u / (positives * negatives).clamp(min=1)
    auc = torch.where((positives > 0) & (negatives > 0), auc, torch.full_like(auc, float("nan")))
    return auc.to(dtype)


def focus(maps: Tensor, positions: Union[Tensor, Sequence[Sequence[int]]]) -> Tensor:
    """Focus, (B,): the share of a mosaic's positive relevance that falls on the quadrants holding the target class
    (higher is better; about 0.5 for a map blind to class on a mosaic of two target and two other images).

    Arias-Duart, Parés, Garcia-Gasulla & Giménez-Ábalos, "Focus! Rating XAI Methods and Finding Biases", FUZZ-IEEE
    2022, arXiv:2109.15035 (Quantus ``Focus``): ``F = sum_{target quadrants} R+ / sum R+`` with ``R+`` the positive
    part of the map.  ``maps`` are the explanations of 2 x 2 mosaics (each made of four images; Arias-Duart et al. put
    two of the target class among two of other classes) for the target class; ``positions`` (B, 4) marks with 0/1
    (or bools) which quadrants hold the target class, in Quantus' order ``(top-left, top-right, bottom-left,
    bottom-right)``; quadrants split at ``H // 2`` and ``W // 2`` as in Quantus.  A map without positive relevance
    scores 0 (Quantus divides by ``total + 1e-9``).  Equal to
    :func:`attribution_localisation` with the target quadrants as the region.
    """
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4):
        raise ValueError("maps must be a tensor of shape (B, C, H, W), (B, 1, H, W) or (B, H, W)")
    check_finite(maps)
    m = pixel_map(maps.detach())
    batch, height, width = m.shape
    p = torch.as_tensor(positions, device=m.device)
    if p.shape != (batch, 4):
        raise ValueError(f"positions must have shape ({batch}, 4) (top-left, top-right, bottom-left, bottom-right), "
                         f"got {tuple(p.shape)}")
    if not ((p == 0) | (p == 1)).all():
        raise ValueError("positions must hold 0/1 (or bool) flags, one per quadrant")
    if height < 2 or width < 2:
        raise ValueError(f"maps of a 2 x 2 mosaic need at least 2 x 2 pixels, got {height} x {width}")
    bottom = (torch.arange(height, device=m.device) >= height // 2).long().view(height, 1)
    right = (torch.arange(width, device=m.device) >= width // 2).long().view(1, width)
    quadrant = (2 * bottom + right).flatten()  # (H*W,) in 0..3, Quantus' order
    mask = p.bool()[:, quadrant].view(batch, height, width)
    return attribution_localisation(m.unsqueeze(1), mask)
