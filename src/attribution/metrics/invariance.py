"""Input invariance: an explanation should not change when a constant shift of the input is undone by the model.

Kindermans, Hooker, Adebayo, Alber, Schuett, Daehne, Erhan & Kim, "The (Un)reliability of Saliency Methods", in
Explainable AI: Interpreting, Explaining and Visualizing Deep Learning, LNCS 11700, Springer 2019,
arXiv:1711.00867 (2017).  Two models that compute the same function of their own inputs -- ``f2(x + m) = f1(x)`` for a
constant shift ``m``, the first layer's bias absorbing it, ``b2 = b1 - W m`` -- should get the same explanation:
``Phi(x + m; f2) = Phi(x; f1)``.  Gradients pass; input-times-gradient and reference-based methods with a fixed
reference (zero) do not.  Protocol and defaults as Quantus 0.6.0's ``InputInvariance``; differences are named in
:func:`input_invariance`.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, List, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from ..core.explainer import Explainer, model_dtype
from ..core.guard import preserve_model
from ..core.layers import layer_name, resolve_layer
from ..core.targets import TargetSpec
from .common import check_images, run_order
from .robustness import _forward, prepare_maps
from .sanity import rebind

AFFINE = (nn.Linear, _ConvNd)


class InvarianceResult(NamedTuple):
    """Per image (B,): ``invariant`` (bool), every entry of the two maps close (``|a - b| <= atol + rtol |b|``);
    ``deviation``, the largest ``|Phi(x; f1) - Phi(x + m; f2)|`` over the entries."""

    invariant: Tensor
    deviation: Tensor


def first_layer(model: nn.Module, images: Tensor) -> nn.Module:
    """The first leaf module with parameters of its own to run in a forward pass of one image (the default layer
    that absorbs the shift; a ViT's class token and position embedding, owned by the model itself, are no
    layer)."""
    candidates = [m for m in model.modules()
                  if any(True for _ in m.parameters(recurse=False)) and not any(True for _ in m.children())]
    order = run_order(model, images, candidates)
    if not order:
        raise ValueError("the model runs no module with parameters: there is no first layer to absorb the shift")
    return candidates[order[0]]


def absorb_shift(model: nn.Module, shift: float, images: Tensor,
                 layer: Union[None, str, nn.Module] = None) -> nn.Module:
    """A deep copy ``f2`` of ``model`` with ``f2(x + shift) = model(x)``: the first layer (``layer``, default
    :func:`first_layer`), a convolution or linear layer that receives the input, gets the bias ``b - shift * W 1``
    (the paper's ``b2 = b1 - W m``; a layer without a bias is given one).  Where zero padding makes the change
    ``L(x + m) - L(x)`` differ at the border from ``W m`` (any padded convolution), the copy's layer also subtracts
    that border residue, a constant of the input, so the equality holds exactly at every position.  ``model`` is
    not touched.
    """
    target_layer = first_layer(model, images) if layer is None else resolve_layer(model, layer)
    if not isinstance(target_layer, AFFINE) or getattr(target_layer, "transposed", False):
        raise TypeError(f"the first layer {layer_name(model, target_layer)!r} is a {type(target_layer).__name__}; "
                        "a constant input shift can be absorbed by the bias of a convolution or linear layer only "
                        "(name another with layer=)")
    dtype = model_dtype(model, images.dtype)
    probe = images[:1].detach().to(dtype)
    inputs: List[Tensor] = []
    handle = target_layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    try:
        with torch.no_grad(), preserve_model(model):
            model(probe)
            model(probe + shift)
    finally:
        handle.remove()
    slack = 1e-5 * max(1.0, abs(float(shift))) + 8 * torch.finfo(dtype).eps * float(probe.abs().amax())
    if len(inputs) < 2 or not torch.allclose(inputs[1] - inputs[0], torch.full_like(inputs[0], float(shift)),
                                             rtol=0, atol=slack):
        raise ValueError(f"the input of the layer {layer_name(model, target_layer)!r} does not move by the shift when "
                         "the image does (the model transforms the image before it); name the layer that receives "
                         "the image with layer=")
    names = {id(m): n for n, m in model.named_modules()}
    shifted = copy.deepcopy(model)
    target = dict(shifted.named_modules())[names[id(target_layer)]]
    with torch.no_grad():
        level = torch.full_like(inputs[0], float(shift))
        change = target(level) - target(torch.zeros_like(level))  # L(m 1) - L(0): exactly what the shift adds
        weight = target.weight
        per_channel = float(shift) * weight.sum(dim=tuple(range(1, weight.dim())))  # W m, one value per output
        if target.bias is None:
            target.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
        target.bias.sub_(per_channel)
        view = [1] * change.dim()
        view[1 if isinstance(target, _ConvNd) else -1] = -1
        residue = change - per_channel.view(view)
    if residue.abs().amax() > 1e-6 * max(1.0, float(change.abs().amax())):
        target.register_forward_hook(lambda _m, _args, output: output - residue)
    return shifted


def _follows_model(explainer) -> bool:
    if isinstance(explainer, Explainer):
        return True
    try:
        return "model" in inspect.signature(explainer).parameters
    except (TypeError, ValueError):
        return False


def input_invariance(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                     shift: float = -1.0, layer: Union[None, str, nn.Module] = None, normalise: bool = False,
                     absolute: bool = False, atol: float = 1e-4, rtol: float = 1e-5,
                     model: Optional[nn.Module] = None, batch_size: Optional[int] = None) -> InvarianceResult:
    """Input invariance of ``explainer`` at each image: ``invariant`` (B,) True when the map of the shifted image on
    the compensated model equals the map of the image on the model; higher (True) is better.

    Kindermans et al. 2019, arXiv:1711.00867 (module docstring): with ``f2`` = :func:`absorb_shift` of the model,

        invariant(x) = all_i |Phi(x; f)_i - Phi(x + m; f2)_i| <= atol + rtol |Phi(x + m; f2)_i|,

    NumPy's ``isclose``, as Quantus.  Defaults as Quantus' ``InputInvariance``: ``shift`` m = -1, ``atol`` 1e-4
    (and ``isclose``'s ``rtol`` 1e-5), maps neither normalised (``normalise``: each map by its own largest
    magnitude; Quantus: the batch's) nor made absolute.  ``deviation`` gives the largest difference too.

    ``explainer``: an :class:`attribution.Explainer` (rebuilt with the same options for ``f2``) or a callable
    ``f(x, target, model=...)``; ``target`` is fixed to class indices once (``None``: the model's arg-max on the
    clean images), so both maps explain the same class.  Differences from Quantus 0.6.0, which takes the module
    registered first as the first layer and sets each channel's bias to ``2 b - min_p (W m + b)_p`` (the smallest
    value of the channel's response to the constant image ``m``): its compensation is wrong for any zero-padded
    first convolution (the border responses differ, and the smallest is taken), so there ``f2(x + m) != f(x)`` and
    even the gradient is reported variant; and it fails on a linear first layer (it feeds the layer the unflattened
    image and reads ``out_channels``) and on one without a bias.  Here the first layer is the first to run, the
    bias takes ``W m`` and the border residue is subtracted too (:func:`absorb_shift`), so ``f2(x + m) = f(x)`` up to
    rounding; and every entry is shifted (Quantus' ``perturb_batch`` passes ``indices[1:]``, so the first entry of
    each image keeps its value).  On float32 models rounding can flip a few ReLUs between ``f(x)`` and
    ``f2(x + m)`` (on ResNet-50 at 224 x 224, one or two of 9.6 M units, moving the gradient by ~1% of its maximum):
    run a float64 copy of the model for a decisive answer.  Cost:
    two explanations of the batch, three forwards of one image (two with ``layer``), one forward of the batch
    (``batch_size`` rows a pass) when ``target`` is ``None``, a deep copy of the model.
    """
    check_images(images)
    if not callable(explainer):
        raise TypeError(f"explainer must be a callable f(images, target) -> maps, got {type(explainer).__name__}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float)):
        raise ValueError(f"shift must be a number, got {shift!r}")
    for value, name in ((atol, "atol"), (rtol, "rtol")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    base = explainer.model if isinstance(explainer, Explainer) else model
    if not isinstance(base, nn.Module):
        raise TypeError("give model= (an nn.Module) when the explainer is not an attribution.Explainer")
    if not _follows_model(explainer):
        raise TypeError("the explainer must follow the compensated model: give an attribution.Explainer or a "
                        "callable that takes a model= keyword")
    fixed = _forward(base, images, batch_size).argmax(dim=1) if target is None else target
    compensated = absorb_shift(base, shift, images, layer)
    before = rebind(explainer, base)(images, fixed).detach()
    after = rebind(explainer, compensated)(images + shift, fixed).detach()
    if not isinstance(after, Tensor) or after.shape != before.shape or before.shape[0] != images.shape[0]:
        raise ValueError("the explainer must return maps of one shape, one per image, for both models")
    a, b = prepare_maps(before, normalise, absolute), prepare_maps(after, normalise, absolute)
    gap = (a - b).abs()
    return InvarianceResult((gap <= atol + rtol * b.abs()).all(dim=1), gap.amax(dim=1))
