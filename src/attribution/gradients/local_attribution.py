"""Local Attribution (LA): the target's gradients summed against signed steps, proportional to the pixels, taken
from the image towards random classes and away from the target."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..core.explainer import positive_int, positive_number
from ..core.registry import register
from ..core.targets import Target
from .adversarial import AdversarialPathExplainer, check_bounds, clip

Reference = Union[None, float, Tensor]


@register("local_attribution")
class LocalAttribution(AdversarialPathExplainer):
    """Local Attribution: walks that stay in a neighbourhood of the image, each step measured from the image and
    proportional to the pixel values, towards ``select_num - 1`` random classes and one away from the target; the
    target's gradients along them are summed against the steps.

    Zhu, Jin, Zhang & Chen, "Enhancing Model Interpretability with Local Attribution over Global Exploration",
    ACM MM 2024, pp. 5347-5355, doi:10.1145/3664647.3681385 (no arXiv version).

    With the per-pixel step ``delta = |x - reference| / epsilon``: for each drawn class ``j``,
    ``p_0 = x``, ``p_{k+1} = clip(x + delta * sign(grad s_j(p_k)))``; for the untargeted walk
    ``p_{k+1} = clip(x - delta * sign(grad s_t(p_k)))``; ``A = -sum_walks sum_{k < max_iter} grad s_t(p_k) *
    (p_{k+1} - x)``.  No walk stops early.

    Defaults are the authors' (github.com/LMBTough/LA, ``saliency/la.py`` and ``generate_attributions.py``):
    softmax probabilities for both scores (``score='softmax'``), ``epsilon=10`` (the code's default, and the
    script's ``--spatial_range``), ``max_iter=20`` (what the script passes, ``--samples_number``; the function's
    own default is 30) and ``select_num=20``: 20 classes drawn without replacement, all but the last used
    (``selected[:-1]``), a drawn class equal to the target replaced by the next one (the previous one for the last
    class).  The draw is ``torch.randperm(K, generator=generator)[:min(select_num, K)]`` (on ``generator``'s
    device, the CPU without one), one draw per call shared by the images, as the code's one NumPy draw per batch.

    The step: the code works on [0, 1] images (the normalisation is inside its model) and steps each pixel by
    ``x / epsilon``, clipping to [0, 1]; ``bounds=(0, 1)`` with the default ``reference`` reproduces it exactly.
    In general the step is the pixel's distance from ``reference`` divided by ``epsilon``; ``reference=None``
    means ``bounds[0]`` when ``bounds`` is given (black, for [0, 1] images), else 0.  For normalised inputs give
    ``reference`` as black in the model's units (a number or a tensor broadcastable to the input, e.g.
    ``attribution.data.normalize(torch.zeros(1, 3, 1, 1))``): the steps are then the authors' steps in those
    units.  ``bounds`` clips with one pair of numbers for all channels (per-channel bounds of normalised images
    are not available: leave ``bounds=None`` there).  The target needs class indices (the walks go to other
    classes).  Cost: ``min(select_num, K) * max_iter`` forwards and twice as many input-gradient backwards per
    image (``K`` classes), plus one forward of one image to count the classes; all walks of all images advance
    together.

    Deliberate differences from the code: the explained score is the target's (the code always uses the predicted
    class, ``init_pred``, for the summed gradients, the untargeted walk and the replacement of a drawn class; with
    ``target=None`` the target is the prediction, so the default call is the code's); each image's gradients are
    its own (the code's ``prob[:, targeted].sum()`` and ``prob[:, init_pred].sum()`` add, for every image of a
    batch, the probabilities of the other images' classes: its batches of 64 mix the images; one image at a time
    it is this method); the draw uses ``generator`` and all ``K`` classes (the code: NumPy's global RNG over
    1000 classes); the clipping is optional (``bounds``) and the step's origin is ``reference``.
    """

    needs_class_indices = True
    defaults = {"score": "softmax", "epsilon": 10, "max_iter": 20, "select_num": 20, "bounds": None,
                "reference": None, "generator": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        epsilon: float,
        max_iter: int,
        select_num: int,
        bounds: Any,
        reference: Reference,
        generator: Optional[torch.Generator],
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        divisor = positive_number(epsilon, "epsilon")
        max_iter = positive_int(max_iter, "max_iter")
        select_num = positive_int(select_num, "select_num")
        limits = check_bounds(bounds)
        origin = step_reference(reference, limits, x)
        classes, num_classes = self._other_classes_setup(x, target, "LocalAttribution walks")
        drawn = local_classes(classes, num_classes, select_num, generator)
        # the last walk of each image is the untargeted one: its guide is the target (its gradient sets the sign)
        guides = torch.cat([drawn, classes[:, None]], dim=1)
        walks = guides.shape[1]
        owners = torch.arange(x.shape[0], device=x.device).repeat_interleave(walks)
        guides = guides.reshape(-1)
        signs = torch.ones(guides.shape[0], dtype=x.dtype, device=x.device)
        signs[walks - 1::walks] = -1
        delta = (x - origin).abs() / divisor
        ones = (1,) * (x.dim() - 1)

        def move(point: Tensor, image: Tensor, grad: Tensor, walkers: Tensor) -> Tensor:
            size = signs[walkers].view(-1, *ones) * delta[owners[walkers]]
            return clip(image + size * grad.sign(), limits)

        return self._walk(x, target, owners, steps=max_iter, move=move, stop=None, guides=guides, from_image=True,
                          batch_size=batch_size, create_graph=create_graph)


def step_reference(reference: Reference, limits: Optional[tuple], x: Tensor) -> Union[float, Tensor]:
    """The origin of the proportional step: ``reference`` (a number, or a real tensor broadcastable to ``x``),
    else ``bounds[0]``, else 0; a ValueError for anything else."""
    if reference is None:
        return 0.0 if limits is None else limits[0]
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        return float(reference)
    if isinstance(reference, Tensor) and reference.is_floating_point():
        try:
            fits = torch.broadcast_shapes(reference.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if fits:
            return reference.detach().to(device=x.device, dtype=x.dtype)
    got = (f"a tensor of shape {tuple(reference.shape)} and dtype {reference.dtype}"
           if isinstance(reference, Tensor) else repr(reference))
    raise ValueError(f"reference must be None, a number or a floating tensor broadcastable to the input "
                     f"{tuple(x.shape)}, got {got}")


def local_classes(classes: Tensor, num_classes: int, select_num: int,
                  generator: Optional[torch.Generator]) -> Tensor:
    """The drawn classes of each image, (B, min(select_num, K) - 1) on ``classes``' device: ``select_num``
    distinct classes drawn (one draw shared by the images), the last dropped, and a class equal to the image's
    target replaced by the next one (the previous one for the last class), as the authors' code."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    drawn = torch.randperm(num_classes, generator=generator, device=draw_device)[:min(select_num, num_classes)]
    drawn = drawn[:-1].to(classes.device).expand(classes.shape[0], -1)
    neighbour = torch.where(drawn < num_classes - 1, drawn + 1, drawn - 1)
    return torch.where(drawn == classes[:, None], neighbour, drawn)
