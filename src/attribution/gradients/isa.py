"""ISA: features ranked group by group, least important first, by gradients summed along an ascent and a descent of
the target's cross-entropy from the image with the features ranked so far removed."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import non_negative_number, optional_generator, positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target, apply_score
from .base import GradientExplainer, accumulation_dtype

#: added to the largest shifted value of a group before dividing by it (the code's ``a.max() + 1e-6``)
GROUP_EPS = 1e-6


@register("isa")
class ISA(GradientExplainer):
    """Iterative Search Attribution: the features are ranked in groups of ``group_size``, least important first;
    each group is the kept features with the smallest score of a search that ascends and descends the target's
    cross-entropy from the image with the features already ranked set to 0, and later groups rank higher.

    Zhu, Chen, Wang, Zhang, Jin, Xue & Shen, "Iterative Search Attribution for Deep Neural Networks", ICML 2024,
    PMLR 235:62332-62348, openreview.net/forum?id=5ToHnqYxjB (no arXiv version; code: github.com/LMBTough/ISA).

    Group ``i = 0, 1, ...`` (``ceil(N / group_size)`` groups of the ``N = C H W`` features, the last one smaller),
    with ``m`` the features not yet ranked and ``L(p) = -log softmax(s(f(p + sigma e)))_t`` (``s``: the ``score`` of
    the outputs, ``e`` fresh standard normal noise at every evaluation): both searches start at ``m * x``; the
    ascent steps ``p <- p + alpha sign(g)``, ``g = grad (L(p) - lambda |p|_2)``, ``ascent_steps`` times, the descent
    ``q <- q - alpha sign(h)``, ``h = m * grad (L(q) + lambda |q|_2)``, ``descent_steps`` times; ``U = alpha sum
    |g|``, ``D = alpha sum |h|``, each divided by its objective's gain from its first to its last evaluation (the
    ascent's rise, the descent's fall); ``T = U / w_U + D / w_D`` and ``c = |(T + min T) * x|``.  The ``n_i`` kept
    features of smallest ``c`` get ``A = i + scale * (c - min) / (max - min + 1e-6)`` (over those ``n_i``) and are
    removed.  So ``A`` lies in ``[0, groups - 1 + scale]``, larger for more important features.  With one search
    switched off (0 steps) ``T`` is the other's sum, undivided, as in the code.

    Defaults are the authors' code (``saliency_zoo.ISA`` and ``core/isa.py`` in github.com/LMBTough/ISA):
    ``group_size=5000`` (the code's ``step_size``), ``ascent_steps=8``, ``descent_steps=8`` (``add_steps``,
    ``minus_steps``), ``step_size=0.004`` (``alpha``), ``scale=1.3`` (``factor``), ``norm_coeff=0.01``
    (``lambda_r``), noise of std ``sigma=0.05`` and the cross-entropy of the softmax probabilities
    (``score='softmax'``: the authors' scripts append a softmax layer to the model, whose outputs the
    cross-entropy reads).  The paper's experiments state a learning rate of 0.002 and a scale of 1.1 instead.
    Step sizes and the noise are in the input's units: the code works on [0, 1] images (normalisation inside the
    model), where a removed feature (0) is black; it never clips.  The target needs class indices (the
    cross-entropy reads every class).  Cost: ``groups * (ascent_steps + descent_steps)`` forwards and
    input-gradient backwards per image (496 for 3 x 224 x 224 images), both searches of all images ``batch_size``
    rows per pass.

    Random draws, from ``generator`` (on its device; else the global generator of the input's device), when
    ``sigma > 0``: for each group, at each step ``k``, ``torch.randn(B, C, H, W)`` for the ascent (``k <
    ascent_steps``) then one for the descent (``k < descent_steps``), float32.  The draws are per batch, so a
    batch's maps equal the images' maps alone only with ``sigma=0``.

    Deliberate differences from the code: the last, smaller group is ranked (the code sizes it from the number of
    images instead of features, ranks nothing and leaves the most important ``N mod group_size`` features at 0); each
    image's search is its own: the code's cross-entropy is summed over the batch, its norm is the batch's, and the
    weights, ``min T`` and the group's normalisation are taken over the batch (one image at a time it is this
    method); a weight of exactly 0 drops its search (the code divides by it), and with both searches on each needs
    at least 2 steps (with 1 its weight is 0); draws come from ``generator`` (the code: NumPy's global generator);
    ties in ``c`` go to the earlier feature (NumPy's quicksort leaves them unspecified).
    """

    needs_class_indices = True
    defaults = {"score": "softmax", "group_size": 5000, "ascent_steps": 8, "descent_steps": 8, "step_size": 0.004,
                "scale": 1.3, "norm_coeff": 0.01, "sigma": 0.05, "generator": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        group_size: int,
        ascent_steps: int,
        descent_steps: int,
        step_size: float,
        scale: float,
        norm_coeff: float,
        sigma: float,
        generator: Optional[torch.Generator],
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        group_size = positive_int(group_size, "group_size")
        steps = _search_steps(ascent_steps, descent_steps)
        alpha = positive_number(step_size, "step_size")
        scale = non_negative_number(scale, "scale")
        norm_coeff = non_negative_number(norm_coeff, "norm_coeff")
        sigma = non_negative_number(sigma, "sigma")
        optional_generator(generator)
        if target.classes is None:
            raise ValueError("ISA's searches ascend and descend the cross-entropy of the target class, which reads "
                             "every class's score, so it needs class indices as the target, not a callable")

        batch, features = x.shape[0], x[0].numel()
        dtype = accumulation_dtype(x)
        keep = torch.ones(batch, features, dtype=torch.bool, device=x.device)
        importance = torch.zeros(batch, features, dtype=dtype, device=x.device)
        planner = RowPlanner(2 * batch, batch_size, x.device)
        for group, start in enumerate(range(0, features, group_size)):
            count = min(group_size, features - start)
            totals = self._search_totals(x, target, keep.view(x.shape), steps, alpha, norm_coeff, sigma, generator,
                                         planner, create_graph)
            combine = ((totals + totals.flatten(1).amin(1).view(-1, 1, 1, 1)) * x.to(dtype)).abs().flatten(1)
            chosen = combine.detach().masked_fill(~keep, float("inf")).argsort(dim=1, stable=True)[:, :count]
            values = combine.gather(1, chosen)
            low = values.amin(1, keepdim=True)
            high = (values - low).amax(1, keepdim=True)
            ranked = group + scale * (values - low) / (high + GROUP_EPS)
            importance = importance.scatter(1, chosen, ranked)
            keep = keep.scatter(1, chosen, False)
        return importance.view(x.shape)

    def _search_totals(
        self,
        x: Tensor,
        target: Target,
        keep: Tensor,
        steps: Tuple[int, int],
        alpha: float,
        norm_coeff: float,
        sigma: float,
        generator: Optional[torch.Generator],
        planner: RowPlanner,
        create_graph: bool,
    ) -> Tensor:
        """``T = U / w_U + D / w_D`` (B, C, H, W) for the searches from ``keep * x`` (rows ``0:B`` ascend, rows
        ``B:2B`` descend; a search with 0 steps has no rows and ``T`` is the other's sum, undivided)."""
        batch = x.shape[0]
        dtype = accumulation_dtype(x)
        draw_device = generator.device if generator is not None else x.device
        rows = 2 * batch
        signs = torch.ones(rows, dtype=x.dtype, device=x.device)
        signs[batch:] = -1
        owners = torch.arange(rows, device=x.device) % batch
        gate = torch.cat([torch.ones_like(keep), keep]).to(x.dtype)  # the descent's gradient is masked
        points = (keep * x).repeat(2, 1, 1, 1)
        sums = torch.zeros(points.shape, dtype=dtype, device=x.device)
        first = torch.zeros(rows, dtype=dtype, device=x.device)
        last = torch.zeros(rows, dtype=dtype, device=x.device)
        for k in range(max(steps)):
            blocks = [b for b in (0, 1) if k < steps[b]]  # the searches still moving, each a block of B rows
            lo, hi = blocks[0] * batch, (blocks[-1] + 1) * batch
            noise = None
            if sigma > 0:
                noise = torch.cat([torch.randn(x.shape, generator=generator, device=draw_device) for _ in blocks])
                noise = sigma * noise.to(device=x.device, dtype=x.dtype)
            planner.total = hi - lo
            for a, b in planner:
                index = torch.arange(lo + a, lo + b, device=x.device)
                point = points[index].detach().requires_grad_(True)
                moved = point if noise is None else point + noise[a:b]
                with planner.recording(point), self._backward_rules():
                    outputs = self._forward(moved)
                scores = apply_score(outputs, target.score)
                norm = torch.linalg.vector_norm(point.flatten(1), dim=1)
                loss = (torch.logsumexp(scores, dim=1) - target(outputs, owners[index])
                        - signs[index].to(scores.dtype) * norm_coeff * norm.to(scores.dtype))
                (grad,) = torch.autograd.grad(loss.sum(), point, create_graph=create_graph)
                grad = grad * gate[index]
                points[index] = point.detach() + (signs[index] * alpha).view(-1, 1, 1, 1) * grad.detach().sign()
                loss = loss.to(dtype)
                gain = alpha * grad.abs().to(dtype)
                if create_graph:  # out of place: the sums stay differentiable
                    sums = sums.index_add(0, index, gain)
                    last = last.index_copy(0, index, loss)
                    first = first.index_copy(0, index, loss) if k == 0 else first
                else:
                    sums.index_add_(0, index, gain)
                    last.index_copy_(0, index, loss.detach())
                    if k == 0:
                        first.index_copy_(0, index, loss.detach())
        if min(steps) == 0:  # one search: its sum, undivided
            return sums[:batch] if steps[0] else sums[batch:]
        weight = (signs.to(dtype) * (last - first)).view(-1, 1, 1, 1)
        weighted = torch.where(weight != 0, sums / torch.where(weight != 0, weight, torch.ones_like(weight)),
                               torch.zeros_like(sums))
        return weighted[:batch] + weighted[batch:]


def _search_steps(ascent_steps: Any, descent_steps: Any) -> Tuple[int, int]:
    """The two searches' step counts: non-negative ints, not both 0, each 0 or at least 2 when the other is on (its
    sum is divided by its objective's change from its first to its last step); else a ValueError naming them."""
    steps = []
    for name, value in (("ascent_steps", ascent_steps), ("descent_steps", descent_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        steps.append(value)
    if steps == [0, 0]:
        raise ValueError("ascent_steps and descent_steps are both 0; at least one search must take steps")
    if min(steps) > 0:
        for name, value in (("ascent_steps", steps[0]), ("descent_steps", steps[1])):
            if value == 1:
                raise ValueError(f"{name} must be 0 or at least 2 when both searches run (its sum is divided by the "
                                 f"change of its objective from its first to its last step, 0 after one step), "
                                 f"got {value!r}")
    return steps[0], steps[1]
