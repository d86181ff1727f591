"""Adversarial Gradient Integration: the target's gradients integrated along signed ascents towards false classes."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.explainer import positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target
from .adversarial import AdversarialPathExplainer, check_bounds, signed_step

SAMPLINGS = ("spaced", "random")
SamplingSpec = Union[str, Sequence[int], Tensor]


@register("agi")
class AGI(AdversarialPathExplainer):
    """Adversarial Gradient Integration: for each of ``topk`` false classes ``j``, a signed gradient ascent of
    ``s_j`` runs until ``j`` is predicted, and the target's gradients along it are summed against the steps.

    Pan, Li & Zhu, "Explaining Deep Neural Network Models with Adversarial Gradient Integration", IJCAI 2021,
    pp. 2876-2883, doi:10.24963/ijcai.2021/396 (no arXiv version).

    Per false class ``j``, from ``p_0 = x``: ``p_{k+1} = clip(x + epsilon * sign(grad s_j(p_k)))`` and
    ``AGI_j = -sum_k grad s_t(p_k) * (p_{k+1} - x)``, over the ``k < max_iter`` with ``arg max f(p_k) != j``;
    ``A = sum_j AGI_j``.  ``walk=True`` chains the steps instead, ``p_{k+1} = clip(p_k + epsilon * sign(...))``
    with terms ``-grad s_t(p_k) * (p_{k+1} - p_k)``: the steepest-ascent path from ``x`` to an adversarial example
    that the paper integrates along.

    Defaults are the authors' (github.com/pd90506/AGI) and the paper's setting: softmax probabilities for both
    scores (``score='softmax'``), ``epsilon=0.05`` in the units of [0, 1] images (the code normalises inside the
    model and clips to [0, 1], which ``bounds=(0, 1)`` reproduces; ``bounds=None``, the default here, does not
    clip, as this library's inputs are often normalised: scale ``epsilon`` with them), ``topk=20`` classes (all of them on models with fewer) and
    ``max_iter=20`` (the paper's setting; the demo script ``AGI_main.py`` allows 50).  ``sampling='spaced'`` is
    the code's choice of classes, ``0, K/topk, 2K/topk, ...`` (``range(0, 999, 1000 // topk)`` for ImageNet),
    skipping the target (so ``topk - 1`` paths when it is among them); ``'random'``: ``topk`` classes other than
    the target drawn uniformly with ``generator``, one draw per call shared by the images (the target replaced by
    the next in the draw); a sequence of class indices: those classes (``topk`` unused).  The target needs class
    indices (the paths go to other classes).  Cost: at most ``topk * max_iter`` forwards and twice as many
    input-gradient backwards per image, plus one forward of one image to count the classes; all paths of all
    images advance together.

    Deliberate differences from the code: ``'spaced'`` takes exactly ``topk`` classes ``i * (K // topk)`` (the
    code's ``range(0, K - 1, K // topk)`` is the same when ``topk`` divides ``K``, as with its defaults, and can
    hold more classes otherwise); ``'random'`` draws from all ``K`` classes (the authors' random-class script draws from
    ``range(0, 999)`` and moves a drawn target to the next class); no clipping unless ``bounds`` is given.  The
    default ``walk=False`` keeps the code's steps from the image (every point lies within ``epsilon`` of ``x``),
    which is not the chained path the paper describes; ``walk=True`` is that path.
    """

    needs_class_indices = True
    defaults = {"score": "softmax", "epsilon": 0.05, "max_iter": 20, "topk": 20, "sampling": "spaced",
                "walk": False, "bounds": None, "generator": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        epsilon: float,
        max_iter: int,
        topk: int,
        sampling: SamplingSpec,
        walk: bool,
        bounds: Any,
        generator: Optional[torch.Generator],
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        size = positive_number(epsilon, "epsilon")
        max_iter = positive_int(max_iter, "max_iter")
        topk = positive_int(topk, "topk")
        if not isinstance(walk, bool):
            raise TypeError(f"walk must be a bool, got {walk!r}")
        limits = check_bounds(bounds)
        classes, num_classes = self._other_classes_setup(x, target, "AGI integrates")
        candidates = false_classes(classes, num_classes, topk, sampling, generator)
        valid = candidates != classes[:, None]
        owners = valid.nonzero()[:, 0]  # image-major
        guides = candidates[valid]

        def move(point: Tensor, image: Tensor, grad: Tensor, walkers: Tensor) -> Tensor:
            return signed_step(point if walk else image, grad, size, limits)

        def stop(predicted: Tensor, walkers: Tensor, k: int) -> Tensor:
            return predicted == guides[walkers]

        return self._walk(x, target, owners, steps=max_iter, move=move, stop=stop, guides=guides,
                          from_image=not walk, batch_size=batch_size, create_graph=create_graph)


def false_classes(classes: Tensor, num_classes: int, topk: int, sampling: SamplingSpec,
                  generator: Optional[torch.Generator]) -> Tensor:
    """The candidate false classes of each image, (B, m) on ``classes``' device; entries equal to the image's
    target are skipped by the caller (see :class:`AGI` for ``sampling``)."""
    batch, device = classes.shape[0], classes.device
    if isinstance(sampling, str):
        if sampling == "spaced":
            topk = min(topk, num_classes)  # every class, on models with fewer than topk
            ids = torch.arange(topk, device=device) * (num_classes // topk)
            return ids.expand(batch, topk)
        if sampling == "random":
            topk = min(topk, num_classes - 1)  # every other class, on models with fewer
            draw_device = generator.device if generator is not None else torch.device("cpu")
            keys = torch.rand(num_classes, generator=generator, device=draw_device).to(device)
            keys = keys.expand(batch, num_classes).clone()
            keys[torch.arange(batch, device=device), classes] = 2.0  # after every draw: never among the topk
            return keys.argsort(dim=1)[:, :topk]
        raise ValueError(f"sampling must be one of {SAMPLINGS} or a sequence of class indices, got {sampling!r}")
    if isinstance(sampling, Tensor) and not (sampling.is_floating_point() or sampling.is_complex()
                                             or sampling.dtype == torch.bool):
        ids = sampling.to(device=device, dtype=torch.long).reshape(-1)
    elif isinstance(sampling, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in sampling):
        ids = torch.tensor(list(sampling), dtype=torch.long, device=device)
    else:
        ids = None
    if ids is None or ids.numel() == 0 or bool(((ids < 0) | (ids >= num_classes)).any()):
        raise ValueError(f"sampling must be one of {SAMPLINGS} or a non-empty sequence of class indices in "
                         f"[0, {num_classes}), got {sampling!r}")
    return ids.expand(batch, ids.numel())
