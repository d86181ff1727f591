"""IG²: the target's gradients integrated along GradPath, a descent of a representation distance to references."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.capture import LayerCapture
from ..core.explainer import positive_int, positive_number
from ..core.layers import layer_name, resolve_layer
from ..core.registry import register
from ..core.targets import Target
from .adversarial import check_bounds, clip
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline

#: the authors' step, 256 in the units of [0, 255] images, in the units of [0, 1] images
STEP_SIZE = 256.0 / 255.0


@register("ig2")
class IG2(GradientExplainer):
    """IG² (Integrated Gradient on Iterative Gradient path): the target's gradients summed against the steps of
    GradPath, a normalised gradient descent of the distance between the representation of a path point and that
    of a reference image.

    Zhuo & Ge, "IG²: Integrated Gradient on Iterative Gradient Path for Feature Attribution", IEEE TPAMI 46(11),
    2024, arXiv:2406.10852 (code: github.com/JoeZhuo-ZY/IG2, ``ig2.py``).

    For each reference ``r_n`` (n = 1..N): ``g_0 = x``, ``g_{k+1} = clip(g_k - step_size * d_k / |d_k|_2)`` with
    ``d_k = grad_g |phi(g_k) - phi(r_n)|^2`` (``phi``: the representation, flattened), for ``k < steps``; then
    ``A = (1/N) sum_n sum_k (g_k - g_{k+1}) * grad f_t(g_k)``, so ``sum A ~ f_t(x) - mean_n f_t(g_steps)`` (a left
    Riemann-Stieltjes sum: exact on a linear model).

    ``references``: a (N, C, H, W) tensor of reference images shared by the images of the batch (or one (C, H, W)
    image), a (B, N, C, H, W) tensor with N references for each image, or a name or number as Integrated
    Gradients' ``baseline`` (``'black'``, the default: each image's own minimum, one reference per image).  The
    authors' code has no default: their examples pass 8 random ImageNet images of other classes, or 10 wafer maps of
    the normal class; pass such images for the method as published.  ``target_layer``: the layer whose output is
    the representation (a dotted name or a module); ``None``, the default, takes the input of the model's
    classifier, the last ``nn.Linear`` giving the model's outputs (found with one forward of one image), which is
    what the authors' ImageNet example hooks (the input of Inception-v3's ``fc``: the penultimate features); their
    wafer example takes a convolutional block's output instead.

    Defaults are the authors' (``ig2.py``'s ``GetMask`` and its README, "suggested for ImageNet samples"):
    ``steps=201`` and a step of 256 in the units of [0, 255] images, which is ``step_size=256/255`` in those of
    [0, 1] images (their example normalises inside the model and clips to [0, 255], which ``bounds=(0, 1)``
    reproduces on [0, 1] inputs; ``bounds=None``, the default here, does not clip, as this library's inputs are
    often normalised: scale ``step_size`` with them, about 4.4 for ImageNet mean/std-normalised inputs), and the
    logit explained (``score='logit'``).  Cost: ``steps`` forwards and ``2 * steps`` input-gradient backwards per
    image and reference (the target's gradient and the distance's at each path point come from one forward), one
    forward per reference, and one forward of one image to find the classifier when ``target_layer`` is None; all
    paths of all images advance together, ``batch_size`` rows per pass.  With ``create_graph`` the map is
    differentiated through the paths too (the points, the references' representations and the descent's
    gradients depend on the weights; memory grows with ``steps``); without it the points are constants.

    Deliberate differences from the code: gradients are taken w.r.t. the input this explainer is given (the
    ImageNet example steps in [0, 255] pixels but differentiates w.r.t. the normalised tensor it builds inside the
    model function, so its map is ``255 * std_c`` times the chain-rule one in channel ``c`` and its steps weigh the
    channels by ``std_c``); the distance is each path's own sum of squares instead of one mean squared error over
    all references at once (the same direction after the per-path normalisation, as each path's representation
    depends on that path alone in eval mode); a zero distance gradient leaves the point where it is (the code
    divides 0 by 0); the target's gradient at each point comes from the forward that gives the distance's (the
    code runs the path twice); sums are kept in float32 (float64 for float64 inputs).
    """

    defaults = {"references": "black", "target_layer": None, "steps": 201, "step_size": STEP_SIZE, "bounds": None}

    def _explain(
        self,
        x: Tensor,
        target: Target,
        *,
        references: Union[BaselineSpec, Tensor],
        target_layer: Union[None, str, nn.Module],
        steps: int,
        step_size: float,
        bounds: Any,
        batch_size: Optional[int],
        create_graph: bool,
    ) -> Tensor:
        steps = positive_int(steps, "steps")
        size = positive_number(step_size, "step_size")
        limits = check_bounds(bounds)
        dtype = accumulation_dtype(x)
        refs, shared = reference_images(x, references)  # (R, C, H, W), R = N or B * N
        per_image = refs.shape[0] if shared else refs.shape[0] // x.shape[0]
        layer, of_input = self._representation_layer(x, target_layer)
        walkers = x.shape[0] * per_image
        owners = torch.arange(walkers, device=x.device) // per_image  # image-major
        ref_rows = torch.arange(walkers, device=x.device) % per_image if shared else torch.arange(walkers,
                                                                                                   device=x.device)

        with torch.set_grad_enabled(create_graph):  # the references' representations
            goal = torch.cat([self._represent(refs[a:b], layer, of_input)[1].to(dtype)
                              for a, b in RowPlanner(refs.shape[0], batch_size, x.device)])

        total = torch.zeros(x.shape, dtype=dtype, device=x.device)
        points = x.to(dtype)[owners]
        planner = RowPlanner(walkers, batch_size, x.device)
        for _ in range(steps):
            for a, b in planner:
                point = points[a:b].clone()  # not a view: the rows of a kept graph must not change
                distance, label = self._gradients(point, owners[a:b], goal[ref_rows[a:b]], target, layer, of_input,
                                                  create_graph, planner)
                norm = distance.flatten(1).norm(dim=1).view((-1,) + (1,) * (x.dim() - 1))
                direction = torch.where(norm > 0, distance / torch.where(norm > 0, norm, torch.ones_like(norm)),
                                        torch.zeros_like(distance))
                new = clip(point - size * direction, limits)
                contribution = (point - new) * label.to(dtype) / per_image
                # out of place only when the sum must stay differentiable
                total = (total.index_add(0, owners[a:b], contribution) if create_graph
                         else total.index_add_(0, owners[a:b], contribution))
                points[a:b] = new
        return total

    def _representation_layer(self, x: Tensor, target_layer: Union[None, str, nn.Module]) -> Tuple[nn.Module, bool]:
        """The module whose output (or, for the default classifier, whose input: the flag) is the representation."""
        if target_layer is not None:
            return resolve_layer(self.model, target_layer), False
        return classifier(self, x), True

    def _represent(self, rows: Tensor, layer: nn.Module, of_input: bool) -> Tuple[Tensor, Tensor]:
        """The model's outputs for ``rows`` and their representations, flattened (n, D)."""
        if of_input:
            with InputCapture(layer) as capture:
                outputs = self._forward(rows)
            rep = capture.value
        else:
            with LayerCapture([layer], model=self.model) as capture:
                outputs = self._forward(rows)
            (rep,) = capture.activations()
        if rep is None:
            raise RuntimeError(f"the layer {layer_name(self.model, layer)!r} did not run in the model's forward pass")
        return outputs, rep.flatten(1)

    def _gradients(self, points: Tensor, owners: Tensor, goal: Tensor, target: Target, layer: nn.Module,
                   of_input: bool, create_graph: bool, planner: RowPlanner) -> Tuple[Tensor, Tensor]:
        """One forward of ``points``: the gradient of each row's squared representation distance to its goal (the
        accumulation dtype) and of its target score (with the graph when ``create_graph``)."""
        rows = self._model_input(points if create_graph else points.detach())
        if not rows.requires_grad:  # the path's start (or any point without create_graph)
            rows.requires_grad_(True)
        with planner.recording(rows), self._backward_rules():
            outputs, rep = self._represent(rows, layer, of_input)
        distance = (rep.to(goal.dtype) - goal).square().sum()
        (toward,) = torch.autograd.grad(distance, rows, retain_graph=True, create_graph=create_graph,
                                        allow_unused=True)
        (label,) = torch.autograd.grad(target(outputs, owners).sum(), rows, create_graph=create_graph,
                                       allow_unused=True)
        toward = torch.zeros_like(points) if toward is None else toward.to(points.dtype)
        return toward, torch.zeros_like(rows) if label is None else label


class InputCapture:
    """Context manager keeping the input of ``layer`` at its last call in the forwards run inside it (a forward
    pre-hook, removed on exit)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.value: Optional[Tensor] = None
        self._handle: Any = None

    def __enter__(self) -> "InputCapture":
        self._handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, args: Any) -> None:
        self.value = args[0] if args and isinstance(args[0], Tensor) else None

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def classifier(explainer: IG2, x: Tensor) -> nn.Module:
    """The model's classifier: the last ``nn.Linear`` to run whose output has the model's output's shape (one
    forward of one image); a ValueError naming ``target_layer`` when there is none."""
    model = explainer.model
    finished: List[Tuple[nn.Module, Tuple[int, ...]]] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            finished.append((module, tuple(output.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            outputs = explainer._forward(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    found = [m for m, shape in finished if shape == tuple(outputs.shape)]
    if not found:
        raise ValueError("IG2 takes the input of the model's classifier as the representation by default, but no "
                         "nn.Linear layer gives the model's outputs; pass target_layer (the layer whose output is "
                         "the representation)")
    return found[-1]


def reference_images(x: Tensor, references: Union[BaselineSpec, Tensor]) -> Tuple[Tensor, bool]:
    """The reference images in the accumulation dtype and whether they are shared by the images: (N, C, H, W)
    shared, or (B * N, C, H, W) image-major (a (B, N, C, H, W) tensor, or one reference per image from a name or
    number as :func:`attribution.gradients.paths.make_baseline` takes)."""
    dtype = accumulation_dtype(x)
    if not isinstance(references, Tensor):
        if isinstance(references, bool) or not isinstance(references, (str, int, float)):
            raise TypeError(f"references must be a tensor of images, 'black', 'white', 'zero' or a number, got "
                            f"{type(references).__name__}")
        try:
            return make_baseline(x, references).to(dtype), False
        except ValueError:
            raise ValueError(f"references must be a tensor of images, 'black', 'white', 'zero' or a number, got "
                             f"{references!r}") from None
    image = tuple(x.shape[1:])
    refs = references.unsqueeze(0) if references.dim() == 3 else references
    ok = refs.dim() in (4, 5) and tuple(refs.shape[-3:]) == image and refs.shape[-4] > 0 and \
        (refs.dim() == 4 or refs.shape[0] == x.shape[0]) and refs.is_floating_point()
    if not ok:
        raise ValueError(f"references must be a (N, C, H, W) tensor of images shaped like x's {image} (or one "
                         f"(C, H, W) image), or a (B, N, C, H, W) tensor with B = {x.shape[0]}, got "
                         f"{'a non-float tensor of ' if not refs.is_floating_point() else ''}shape "
                         f"{tuple(references.shape)}")
    return refs.reshape((-1,) + image).to(device=x.device, dtype=dtype), refs.dim() == 4
