"""SaCo, the salience-guided faithfulness coefficient: do pixel groups with more salience change the prediction more?

Wu, Kang, Tang, Wang, Yang & Li, "On the Faithfulness of Vision Transformer Explanations", CVPR 2024,
arXiv:2404.01415 (Algorithm 1).

The pixels are ranked by the map and cut into ``groups`` (K) equal groups ``G_1`` (most salient) to ``G_K``; each
group is perturbed on its own (its pixels replaced by the substrate, each image's per-channel mean by default), not
cumulatively, and ``d_i = f(x) - f(x with G_i perturbed)`` is the score it takes away (softmax probability of the
target by default).  For every pair ``i < j`` the salience difference ``s(G_i) - s(G_j) >= 0`` (``s``: the map's
sum over the group, taken as its mean so that groups one pixel apart in size, when ``H W`` is not a multiple of
``K``, keep the salience order; the same coefficient otherwise) counts positively when ``d_i >= d_j`` and
negatively otherwise:

    SaCo = sum_{i<j} sign_ij (s(G_i) - s(G_j)) / sum_{i<j} |s(G_i) - s(G_j)|,  sign_ij = +1 if d_i >= d_j else -1

in [-1, 1]: 1 when the groups' effects are ordered as their salience, -1 when in reverse, near 0 for a random map;
scaling the map does not change it.  NaN for a map constant over the groups (no pair to weigh).  Ties between equal
attributions are broken by a fixed random permutation (``seed``).  Cost: ``groups + 1`` forwards per image.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import SubstrateSpec, check_maps, make_substrate, resolve_scorer, salience_ranks, score_rows


def saco(model: nn.Module, images: Tensor, maps: Tensor, target: TargetSpec = None, *, groups: int = 10,
         substrate: SubstrateSpec = "mean", score: str = "softmax", seed: int = 0,
         batch_size: Optional[int] = None) -> Tensor:
    """Per-image SaCo (B,) in [-1, 1] (higher is better); see the module docstring.  ``maps`` (B, C or 1, H, W)
    at the images' size (channel sum per pixel)."""
    values = check_maps(images, maps)
    pixels = values.shape[1]
    if isinstance(groups, bool) or not isinstance(groups, int) or not 2 <= groups <= pixels:
        raise ValueError(f"groups must be an int from 2 to the {pixels} pixels of an image, got {groups!r}")
    group_of = salience_ranks(values, seed) * groups // pixels  # (B, N): 0 for the most salient group
    fill = make_substrate(images, substrate)
    scorer = resolve_scorer(model, images, target, score, batch_size)
    size = images.shape[-2:]

    def rows(owners: Tensor, step: Tensor) -> Tensor:  # step 0: the image; step i: group i - 1 perturbed
        removed = (group_of[owners] == (step - 1)[:, None]).view(-1, 1, *size)
        return torch.where(removed, fill[owners], images[owners])

    measured = score_rows(model, rows, images.shape[0], groups + 1, scorer, batch_size, images.device, images.dtype)
    effect = measured[:, :1] - measured[:, 1:]  # (B, K): d_i
    # s(G_i) as the group's mean: with H W a multiple of K the sums up to one factor (which SaCo does not see),
    # otherwise the groups differ by a pixel and only the means keep the salience order
    salience = torch.zeros_like(effect).scatter_add_(1, group_of, values.to(effect.dtype))
    salience = salience / torch.bincount(group_of[0], minlength=groups).to(salience)
    first, second = torch.triu_indices(groups, groups, offset=1, device=images.device)
    gap = salience[:, first] - salience[:, second]  # >= 0: the groups are in descending order of salience
    agree = torch.where(effect[:, first] >= effect[:, second], gap, -gap)
    return agree.sum(dim=1) / gap.abs().sum(dim=1)
