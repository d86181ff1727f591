"""Finer-CAM: a CAM of the target's score against the classes nearest to it."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import finite_number
from ..core.registry import register
from ..core.targets import Target, apply_score
from .base import safe_divide
from .grad_cam import GradCAM
from .meta import MetaCAM, rows_are_images


def comparison_ranks(ranks: Any) -> Tuple[int, ...]:
    """``comparisons`` checked: a non-empty sequence of positive ints."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks,)
    if not isinstance(ranks, Sequence) or not ranks or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
        raise ValueError(f"comparisons must be a non-empty sequence of positive ints (ranks), got {ranks!r}")
    return tuple(ranks)


def nearest_classes(scores: Tensor, target_scores: Tensor, ranks: Tuple[int, ...]) -> Tensor:
    """(N, m) classes at the given ranks when each row's classes are ordered by ``|score - target score|``
    (rank 0 is the target class itself); ranks beyond the number of classes are dropped."""
    usable = [r for r in ranks if r < scores.shape[1]]
    if not usable:
        raise ValueError(f"FinerCAM compares the target with other classes; the model has {scores.shape[1]} "
                         f"output(s), too few for the comparison ranks {ranks}")
    order = (scores - target_scores.unsqueeze(1)).abs().argsort(dim=1, stable=True)
    return order[:, usable]


def finer_target(target: Target, alpha: float, ranks: Tuple[int, ...], fixed: Optional[Tensor]) -> Target:
    """The score Finer-CAM explains, as a target on raw model outputs.

    ``s = sum_j p_j (y_t - alpha y_j) / sum_j p_j`` over the comparison classes ``j``: ``y`` the call's ``score``
    of the outputs, ``y_t`` the target's score (a class's, or a callable objective's value), ``p`` the softmax of
    the outputs.  The comparison classes are ``fixed`` (N, m) per image, or, with ``fixed=None``, read from the
    outputs of the rows themselves (right when the rows are the images).
    """

    def objective(outputs: Tensor, owners: Tensor) -> Tensor:
        chosen = target(outputs, owners)
        scores = apply_score(outputs, target.score)
        classes = fixed[owners] if fixed is not None else nearest_classes(scores.detach(), chosen.detach(), ranks)
        weights = outputs.softmax(dim=1).gather(1, classes)
        differences = chosen.unsqueeze(1) - alpha * scores.gather(1, classes)
        return safe_divide((weights * differences).sum(dim=1), weights.sum(dim=1))

    return Target(target.batch, "logit", objective=objective)


@register("finer_cam")
class FinerCAM(MetaCAM):
    """Finer-CAM: the base CAM (Grad-CAM by default) of the target's score minus the scores of the most similar
    classes, so that evidence the target shares with them cancels.

    Zhang, Gu, Chowdhury, Mai, Carlyn, Berger-Wolf, Su & Chao, "Finer-CAM: Spotting the Difference Reveals Finer
    Details for Visual Explanation", CVPR 2025, arXiv:2501.11309.

    The explained score is ``s = sum_j p_j (y_t - alpha y_j) / sum_j p_j`` where the comparison classes ``j`` are
    those at ranks ``comparisons`` (default (1, 2, 3)) when all classes are ordered by ``|y_k - y_t|`` on the
    clean image (rank 0 is the target itself), ``p`` the softmax probabilities and ``alpha`` (default 1) the
    comparison strength (0 gives the base CAM of ``y_t``).  The map is ``base_method``'s (any CAM class or
    registry name; its options are FinerCAM's) of ``s``.  Targets: class indices or ``None`` (the arg-max); a
    callable objective also works: its value plays ``y_t`` and the comparison classes are those whose scores are
    nearest to it.  Cost: the base method's; a base that evaluates rows other than the images (Score-CAM,
    Ablation-CAM, ...) first needs one forward of the images to fix the comparison classes.

    Same score as pytorch-grad-cam's ``FinerCAM`` (its ``FinerWeightedTarget``, softmax weights included in the
    gradient) for ``targets=None``, where it compares with the arg-max class; pytorch-grad-cam ignores ``alpha``
    and the comparison when given explicit targets, which here select ``y_t`` instead.  Comparison ranks beyond the
    number of classes are dropped (as pytorch-grad-cam); an all-zero weight sum gives 0 instead of dividing by 1e-9.
    """

    base_default = GradCAM
    own_defaults = {"alpha": 1.0, "comparisons": (1, 2, 3)}

    def _explain(self, x: Tensor, target: Target, *, alpha: float, comparisons: Sequence[int],
                 batch_size: Optional[int], **options: Any) -> Tensor:
        alpha = finite_number(alpha, "alpha")
        ranks = comparison_ranks(comparisons)
        fixed = None if rows_are_images(self.base) else self._comparisons(x, target, ranks, batch_size)
        finer = finer_target(target, alpha, ranks, fixed)
        return self.base._explain(x, finer, batch_size=batch_size, **options)

    def _comparisons(self, x: Tensor, target: Target, ranks: Tuple[int, ...], batch_size: Optional[int]) -> Tensor:
        """(B, m) comparison classes of each image, from forwards of the images (``None`` targets resolved)."""
        chunks, classes = [], []
        with torch.no_grad():
            for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
                outputs = self._forward(x[start:stop]).float()
                owners = torch.arange(start, stop, device=x.device)
                classes.append(outputs.argmax(dim=1))
                chosen = target(outputs, owners)
                chunks.append(nearest_classes(apply_score(outputs, target.score), chosen, ranks))
        if target.pending:
            target.classes = torch.cat(classes)
        return torch.cat(chunks)
