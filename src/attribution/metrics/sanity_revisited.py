"""The repaired model-parameter randomisation tests: Efficient MPRT and Smooth MPRT.

Hedstroem, Weber, Lapuschkin & Hoehne, "Sanity Checks Revisited: An Exploration to Repair the Model Parameter
Randomisation Test", XAI in Action workshop, NeurIPS 2023, arXiv:2401.06465 (Quantus 0.6.0's ``EfficientMPRT`` and
``SmoothMPRT``).  Both keep the protocol of :func:`attribution.metrics.model_randomisation` (Adebayo et al. 2018) --
re-initialise the layers of a copy of the model and see whether the maps change -- and repair one of its
weaknesses each:

* :func:`efficient_mprt` drops the layer-by-layer similarity (and its choice of similarity measure and of
  pre-processing): it compares the *complexity* of the maps of the original and the fully randomised model, the
  discrete entropy of each map's histogram, and asks for a rise.  Higher is better.
* :func:`smooth_mprt` keeps the layer-by-layer Spearman correlation but denoises every map first, averaging it over
  noisy copies of the image (SmoothGrad's noise, around any explainer), so that the gradient shattering noise of
  deep models does not pass for sensitivity to the parameters.  Lower is better.

Shared with :mod:`attribution.metrics.sanity`: the layers (default :func:`~attribution.metrics.randomisation_layers`,
the model's parametrised children with containers opened one level), the re-initialisation
(:func:`~attribution.metrics.reinitialise` on a deep copy: each module's own ``reset_parameters()``, a parameter
without one redrawn from a normal of its own spread), the per-layer seeds (``seed`` and the layer's name) in a
forked RNG, and the rebinding of the explainer to the copy (an :class:`attribution.Explainer` is rebuilt with the
same options; a callable follows the copy only if it takes a ``model`` keyword).  The target is fixed to class
indices once (``None``: the original model's arg-max), so every model explains the same class.

How Quantus randomises, and the deliberate differences: Quantus re-initialises every module that has a
``reset_parameters`` method (each convolution, linear and normalisation layer, however deeply nested), reseeding
the global torch RNG with ``seed + 1`` before *every* module, so two layers of the same shape get identical
weights and the caller's random state is overwritten; parameters of modules without ``reset_parameters`` (a ViT's
class token and position embedding, say) stay trained in its "fully randomised" model.  Here the draw of each
layer depends on the seed and its name, in a forked RNG, and every parameter under a listed layer is redrawn.  The
endpoint (every layer random) is the same set of layers on models built of standard modules; the steps of the
cascade are the model's children here (pass ``layers=`` with leaf names for Quantus' finer steps).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.explainer import Explainer
from ..core.targets import TargetSpec
from .common import check_images, resolve_scorer
from .complexity import discrete_entropy
from .infidelity_sensitivity import _draw, _sample_seeds
from .robustness import _result_dtype, prepare_maps
from .sanity import rebind, randomisation_layers, randomised_copies
from .similarity import spearman

ORDERS = ("bottom_up", "top_down", "independent")


class _Setup(NamedTuple):
    model: nn.Module
    target: TargetSpec
    layers: List[str]
    devices: list


def _setup(explainer, images: Tensor, target: TargetSpec, model: Optional[nn.Module],
           layers: Optional[Sequence[str]], batch_size: Optional[int]) -> _Setup:
    """The model, the fixed target, the layers (input first) and the devices whose RNG is forked."""
    check_images(images)
    if not callable(explainer):
        raise TypeError(f"explainer must be a callable f(images, target) -> maps, got {type(explainer).__name__}")
    base = explainer.model if isinstance(explainer, Explainer) else model
    if not isinstance(base, nn.Module):
        raise TypeError("give model= (an nn.Module) when the explainer is not an attribution.Explainer")
    resolved = resolve_scorer(base, images, target, "logit", batch_size).target
    fixed = resolved.classes if resolved.classes is not None else target
    names = list(layers) if layers is not None else list(reversed(randomisation_layers(base, images)))
    if not names:
        raise ValueError("no layers to randomise")
    if any(not isinstance(n, str) for n in names):
        raise TypeError("layers must be dotted module names (strings)")
    devices = [images.device] if images.device.type == "cuda" else []
    return _Setup(base, fixed, names, devices)


def _maps(explainer, model: nn.Module, images: Tensor, target: TargetSpec) -> Tensor:
    maps = rebind(explainer, model)(images, target)
    if not isinstance(maps, Tensor) or maps.dim() < 2 or maps.shape[0] != images.shape[0]:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"the explainer must return one map per image, (B, ...) with B = {images.shape[0]}, "
                         f"got {shape}")
    return maps.detach()


# ------------------------------------------------------------------------------------------------ eMPRT
def efficient_mprt(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                   model: Optional[nn.Module] = None, layers: Optional[Sequence[str]] = None, bins: int = 100,
                   absolute: bool = False, ratio: bool = False, seed: int = 42,
                   batch_size: Optional[int] = None) -> Tensor:
    """Efficient MPRT of ``explainer`` at each image (B,): the relative rise of the maps' complexity when every
    layer of the model is randomised; higher is better (a map that ignores the model scores 0).

    Hedstroem, Weber, Lapuschkin & Hoehne, NeurIPS 2023 XAI in Action workshop, arXiv:2401.06465:

        eMPRT(x) = (H(Phi(x; f_random)) - H(Phi(x; f))) / H(Phi(x; f)),

    ``H`` the :func:`~attribution.metrics.complexity.discrete_entropy` of the map's values in ``bins`` equal bins
    (over all entries, signed unless ``absolute``), ``f_random`` the model with all ``layers`` re-initialised
    (cascading, as :func:`~attribution.metrics.model_randomisation`'s last step; see the module docstring).  This is
    Quantus' score; ``ratio=True`` returns the plain ratio ``H(random) / H(original)`` (the score plus one).

    Defaults as Quantus' ``EfficientMPRT``: 100 bins, signed maps, seed 42 (the draws are this library's, see the
    module docstring).  Quantus' ``normalise`` is left out: the histogram does not change when a map is scaled.
    Quantus' optional bin-count rules (``complexity_func_kwargs={"rule": ...}``) take the *dimensions* of a map
    (``a[0].ndim``, 3 for an image) for its number of entries, so Sturges', Rice's and the square-root rule always
    give their floor of 10 bins: pass ``bins`` instead.  A map whose entries all fall in one bin has entropy 0, and
    its score is ``inf`` (or NaN when the randomised map is constant too), as in Quantus.  Cost: two explanations of
    the batch (original and fully randomised), one forward of one image to order the default layers, one forward of
    the batch (``batch_size`` rows a pass) when ``target`` is ``None``, and a deep copy of the model.
    """
    setup = _setup(explainer, images, target, model, layers, batch_size)
    original = _maps(explainer, setup.model, images, setup.target)
    randomised = None
    for step, (_, copy_model) in enumerate(randomised_copies(setup.model, setup.layers, True, seed, setup.devices)):
        if step == len(setup.layers) - 1:  # explained inside the forked RNG, as model_randomisation does
            randomised = _maps(explainer, copy_model, images, setup.target)
    before = discrete_entropy(prepare_maps(original, False, absolute), bins)
    after = discrete_entropy(prepare_maps(randomised, False, absolute), bins)
    value = after / before if ratio else (after - before) / before
    return value.to(_result_dtype(images))


# ------------------------------------------------------------------------------------------------ sMPRT
class SmoothRandomisationResult(NamedTuple):
    """Per step ``l`` of the randomisation (``layers[l]`` re-initialised, on top of the earlier steps unless the
    order is ``'independent'``) and image: ``spearman`` (L, B), the rank correlation of the denoised maps of the
    randomised and the original model.  ``last`` (B,): the fully randomised step (Quantus'
    ``return_last_correlation``); ``average`` (B,): the mean over the steps (``return_average_correlation``)."""

    layers: List[str]
    spearman: Tensor

    @property
    def last(self) -> Tensor:
        return self.spearman[-1]

    @property
    def average(self) -> Tensor:
        return self.spearman.mean(dim=0)


def _smoothed(explainer, model: nn.Module, images: Tensor, target: TargetSpec, noises: List[Tensor],
              sigma: Tensor) -> Tensor:
    """The mean of the maps over ``images + sigma * noise`` for each noise and over the clean images (last)."""
    count = len(noises) + 1
    total = None
    for noise in noises + [None]:
        x = images if noise is None else images + noise * sigma
        maps = _maps(explainer, model, x, target).to(torch.float64)
        total = maps / count if total is None else total + maps / count  # Quantus' order of the sums
    return total


def smooth_mprt(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                model: Optional[nn.Module] = None, layers: Optional[Sequence[str]] = None,
                order: str = "bottom_up", samples: int = 50, noise: float = 0.1, absolute: bool = True,
                seed: int = 42, generator: Optional[torch.Generator] = None,
                batch_size: Optional[int] = None) -> SmoothRandomisationResult:
    """Smooth MPRT of ``explainer`` at each image: the Spearman rank correlation (L, B) between the denoised map of
    the original model and that of the model with more and more layers randomised; lower is better.

    Hedstroem, Weber, Lapuschkin & Hoehne, NeurIPS 2023 XAI in Action workshop, arXiv:2401.06465:

        sMPRT_l(x) = rho_S(|Phi_bar(x; f)|, |Phi_bar(x; f_l)|),   Phi_bar(x; g) = mean_{n <= N} Phi(x + e_n; g),

    ``e_n ~ N(0, (noise * (max x - min x))^2)`` per image for ``n < N`` and ``e_N = 0`` (the clean image, so
    ``samples=1`` is the plain test), ``f_l`` the copy with ``layers[:l + 1]`` re-initialised.  ``layers`` are
    listed from the input up (default: :func:`~attribution.metrics.randomisation_layers` reversed); ``order``:
    ``'bottom_up'`` randomises them cascading from the input (Quantus' default, the paper's recommendation),
    ``'top_down'`` cascading from the output (Adebayo et al.'s order), ``'independent'`` one at a time.

    Defaults as Quantus' ``SmoothMPRT``: 50 samples, noise 0.1, bottom-up, maps made absolute, seed 42.  The noise
    is drawn per sample from ``generator`` and shared by the images (each scaled by its own range), and the same
    draws denoise every model, so an image's values do not depend on the rest of the batch and the models are
    compared on the same noisy copies (Quantus draws fresh noise, image by image, for every model).  Quantus'
    normalisation (by the batch's root mean square) is left out: a positive factor changes no rank.  A constant
    denoised map correlates 0 here (SciPy: NaN).  Quantus 0.6.0 defects avoided: it ignores the ``explain_func``
    it is given and denoises with ``quantus.explain`` (the method named in ``explain_func_kwargs``); it compares
    every model with one denoised map of the original and also reports a second, independently denoised map of the
    original, which its ``return_average_correlation`` averages in with the layers (it skips a key ``"orig"`` that
    it never writes).  Cost: ``(len(layers) + 1) * samples`` explanations of the batch, one forward of one image to
    order the default layers, one forward of the batch (``batch_size`` rows a pass) when ``target`` is ``None``, a
    deep copy of the model (one per step with ``'independent'``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise ValueError(f"noise must be a non-negative number, got {noise!r}")
    setup = _setup(explainer, images, target, model, layers, batch_size)
    names = setup.layers[::-1] if order == "top_down" else setup.layers
    seeds = _sample_seeds(samples - 1, generator) if samples > 1 else []
    noises = [_draw(s, images.shape[1:], images, False) for s in seeds]
    flat = images.detach().flatten(1)
    sigma = (noise * (flat.amax(dim=1) - flat.amin(dim=1))).view(-1, *([1] * (images.dim() - 1)))
    reference = prepare_maps(_smoothed(explainer, setup.model, images, setup.target, noises, sigma), False, absolute)
    rows = []
    for _, copy_model in randomised_copies(setup.model, names, order != "independent", seed, setup.devices):
        maps = _smoothed(explainer, copy_model, images, setup.target, noises, sigma)
        rows.append(spearman(reference, prepare_maps(maps, False, absolute)))
    return SmoothRandomisationResult(list(names), torch.stack(rows).to(_result_dtype(images)))
