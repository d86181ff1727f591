"""Robustness of explanations: how much a map moves when the input moves, and whether like maps mean like
predictions.  Protocols and defaults as Quantus 0.6.0 (Hedstroem et al., JMLR 2023) has them, differences named.

* :func:`local_lipschitz_estimate` -- Alvarez-Melis & Jaakkola 2018: the largest ``|Phi(x) - Phi(x')|_2 /
  |x - x'|_2`` over Gaussian neighbours ``x'``.
* :func:`relative_input_stability`, :func:`relative_output_stability`,
  :func:`relative_representation_stability` -- Agarwal et al. 2022: the largest relative change of the map over
  the relative change of the input, of the model's logits, or of its internal representations.
* :func:`continuity` -- Montavon et al. 2018: the largest ``|Phi(x) - Phi(x')|_1 / |x - x'|_2`` over horizontal
  translations ``x'`` of the image.
* :func:`consistency` -- Dasgupta et al. 2022: the share of the images with the same (discretised) explanation that
  also get the same prediction.

(Max- and average sensitivity, Yeh et al. 2019, live in :mod:`attribution.metrics.infidelity_sensitivity`.)

Shared conventions.  ``explainer(images, target) -> maps`` is any attribution method; ``target`` is fixed to class
indices once (``None``: the model's arg-max on the clean images; the model is ``model=`` or the explainer's
``.model``), so every perturbed copy explains the same class.  Random perturbations are drawn per *sample* and
shared by the images of the batch, from ``generator`` (as :func:`~attribution.metrics.max_sensitivity` does), so an
image's value does not depend on the rest of the batch; ``perturbation(images) -> perturbed`` (one call per sample)
replaces the draw.  Maps are compared as float64, flattened over channels and pixels.  ``normalise`` divides each
map by its own largest magnitude (Quantus' ``normalise_by_max`` divides the whole batch by one maximum, so its
values depend on the batch: this library's per-image choice is deliberate and equal to Quantus for one image or
with ``normalise_func_kwargs={"normalise_axes": (1, 2, 3)}``); ``absolute`` then takes ``|map|``.
``same_prediction`` keeps only the perturbed copies on which the model's arg-max is that of the clean image (the
relative-stability paper's constraint): the maximum is over the kept copies, and an image none of whose copies is
kept gets NaN.  (Quantus' ``return_nan_when_prediction_changes`` instead makes the whole image NaN as soon as one
copy changes the prediction.)  Forward passes run ``batch_size`` rows at a time under ``torch.no_grad`` and the
model state guard.  Every metric here is lower-is-better except :func:`consistency`.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import model_dtype
from ..core.guard import preserve_model
from ..core.layers import layer_name, resolve_layers
from ..core.targets import TargetSpec
from .common import SubstrateSpec, check_finite, check_images, make_substrate
from .infidelity_sensitivity import _draw, _sample_seeds

Perturbation = Callable[[Tensor], Tensor]
LayerList = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]
EPS_MIN = 1e-6  # Agarwal et al.'s (and Quantus') floor of the denominators
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ------------------------------------------------------------------------------------------------- helpers
def check_model_and_maps(model: nn.Module, images: Tensor, maps: Tensor) -> None:
    """Raise a clear error unless ``model`` is a module, ``images`` (B, C, H, W) and ``maps`` one map per image."""
    check_images(images)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4) or maps.shape[0] != images.shape[0]:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (B, C, H, W) or (B, H, W) tensor with B = {images.shape[0]}, got {shape}")
    check_finite(maps)


def _check_positive(value: float, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _result_dtype(images: Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def prepare_maps(maps: Tensor, normalise: bool, absolute: bool) -> Tensor:
    """(B, ...) maps -> (B, N) float64: each map divided by its largest magnitude (``normalise``; an all-zero map
    stays zero), then ``|map|`` (``absolute``), in Quantus' order."""
    flat = maps.detach().flatten(1).to(torch.float64)
    if normalise:
        peak = flat.abs().amax(dim=1, keepdim=True)
        flat = torch.where(peak > 0, flat / peak.clamp(min=1e-300), flat)
    return flat.abs() if absolute else flat


def _forward(model: nn.Module, x: Tensor, batch_size: Optional[int]) -> Tensor:
    """The model's outputs (B, K) on ``x``, ``batch_size`` rows a pass."""
    dtype = model_dtype(model, x.dtype)
    with torch.no_grad(), preserve_model(model):
        return torch.cat([model(x[start:stop].to(dtype)) for start, stop in RowPlanner(x.shape[0], batch_size,
                                                                                         x.device)])


def _layer_change(model: nn.Module, clean: Tensor, shifted: Tensor, layers: List[nn.Module],
                  batch_size: Optional[int], eps: float, strict: bool,
                  probe: Optional[Dict[int, List[torch.Size]]] = None) -> Tuple[Tensor, Tensor]:
    """The model's outputs on ``shifted`` (B, K) and ``|(L(x) - L(x')) / L(x)|_2`` per image (B,), ``L`` the
    concatenated, flattened outputs of ``layers`` in the order they run (a layer that runs twice counts twice; a
    zero entry of ``L(x)`` replaced by ``eps``).  Each chunk of images runs together with its perturbed copies, and
    each layer adds its share of the squared norm in its hook: no representation is stored (on ResNet-50 they are
    37.6 M values per image).  The batch dimension of each output is found from ``probe`` (:func:`_probe_shapes`,
    computed here when not given), so sequence-first layers ((T, B, D), e.g. ``nn.TransformerEncoderLayer``
    without ``batch_first``) are split by image too.  A layer whose output is not a tensor, or has no batch
    dimension, raises when ``strict``, else it is left out."""
    dtype = model_dtype(model, clean.dtype)
    probe = _probe_shapes(model, clean[:1], layers) if probe is None else probe
    outputs: List[Tensor] = []
    total = torch.zeros(clean.shape[0], dtype=torch.float64, device=clean.device)
    chunk: List[Tensor] = []
    calls: Dict[int, int] = {}

    def hook(module: nn.Module, _inputs, output) -> None:
        call = calls[id(module)] = calls.get(id(module), -1) + 1
        if not isinstance(output, Tensor):
            if not strict:
                return
            raise TypeError(f"the layer {layer_name(model, module)!r} returns {type(output).__name__}, not a "
                            "tensor; name the layers= to compare")
        rows = chunk[0].shape[0]
        shapes = probe.get(id(module), [])
        dim = _batch_dim(shapes[call] if call < len(shapes) else None, output.shape, 2 * rows)
        if dim is None:
            if not strict:
                return
            raise ValueError(f"the output of layer {layer_name(model, module)!r}, of shape {tuple(output.shape)}, "
                             f"has no dimension of the batch's size {2 * rows}; name other layers= to compare")
        split = output.detach().movedim(dim, 0).to(torch.float64)
        before, after = split[:rows].reshape(rows, -1), split[rows:].reshape(rows, -1)
        chunk[0] += ((before - after) / torch.where(before == 0, torch.full_like(before, eps), before)).square().sum(1)

    handles = []
    half = None if batch_size is None else max(1, batch_size // 2)  # each pass holds the images and their copies
    try:
        with torch.no_grad(), preserve_model(model):
            handles = [layer.register_forward_hook(hook) for layer in layers]
            for start, stop in RowPlanner(clean.shape[0], half, clean.device):
                chunk[:] = [torch.zeros(stop - start, dtype=torch.float64, device=clean.device)]
                calls.clear()
                out = model(torch.cat([clean[start:stop], shifted[start:stop]]).to(dtype))
                outputs.append(out[stop - start:])
                total[start:stop] = chunk[0]
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(outputs), total.sqrt()


def _probe_shapes(model: nn.Module, image: Tensor, layers: List[nn.Module]) -> Dict[int, List[torch.Size]]:
    """The output shape of each of ``layers`` (by id) at each of its calls in a forward of one ``image`` (1, C, H, W)
    (non-tensor outputs left out); one forward, without autograd, the model guarded."""
    shapes: Dict[int, List[torch.Size]] = {}

    def record(module: nn.Module, _inputs, output) -> None:
        shapes.setdefault(id(module), []).append(output.shape if isinstance(output, Tensor) else None)

    handles = []
    try:
        with torch.no_grad(), preserve_model(model):
            handles = [layer.register_forward_hook(record) for layer in layers]  # as _layer_change hooks them
            model(image.to(model_dtype(model, image.dtype)))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _batch_dim(one: Optional[torch.Size], shape: torch.Size, rows: int) -> Optional[int]:
    """The dimension of an output of ``shape`` in a forward of ``rows`` images that holds them: of size 1 in the
    forward of one image (shape ``one``) and ``rows`` here (dim 0 of batch-first layers, dim 1 of sequence-first
    ones); without a probe, dim 0 if it has that size; None if no dimension does."""
    if one is None or len(one) != len(shape):
        return 0 if len(shape) > 0 and shape[0] == rows else None
    found = [d for d in range(len(shape)) if one[d] == 1 and shape[d] == rows]
    return found[0] if found else None


def _default_layers(model: nn.Module) -> List[nn.Module]:
    """Quantus' default representation: every submodule except the model itself and containers."""
    return [m for m in model.modules() if m is not model and not isinstance(m, CONTAINERS + (type(model),))]


class _Neighbours:
    """The reference map of each image and, per sample, a perturbed copy, its map and whether it is kept.

    ``shift(draw, images) -> perturbed`` makes the copy of each of ``draws`` (a seed, or a translation);
    ``perturbation`` overrides it.  A forward on each copy is run only when something needs it:
    ``same_prediction``, ``outputs`` (the logits of the copies) or ``layers`` (their representations).
    """

    def __init__(self, explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec, draws: list,
                 shift: Callable[[int, Tensor], Tensor], perturbation: Optional[Perturbation],
                 model: Optional[nn.Module], same_prediction: bool,
                 batch_size: Optional[int], outputs: bool = False, layers: Optional[List[nn.Module]] = None,
                 strict: bool = True, eps: float = 0.0) -> None:
        check_images(images)
        if not callable(explainer):
            raise TypeError(f"explainer must be a callable f(images, target) -> maps, got {type(explainer).__name__}")
        if perturbation is not None and not callable(perturbation):
            raise TypeError("perturbation must be a callable f(images) -> perturbed images")
        self.draws = draws
        self.model = model if model is not None else getattr(explainer, "model", None)
        wants_model = outputs or bool(layers) or same_prediction or target is None
        if wants_model and not isinstance(self.model, nn.Module):
            raise TypeError("give model= (an nn.Module), or an explainer with a .model: it is needed to pick the "
                            "target classes, check predictions or read the outputs")
        self.explainer, self.images, self.shift, self.perturbation = explainer, images, shift, perturbation
        self.same_prediction, self.batch_size = same_prediction, batch_size
        self.want_outputs, self.layers, self.strict, self.eps = outputs, layers, strict, eps
        self.probe = _probe_shapes(self.model, images[:1], layers) if layers else None
        self.clean_outputs = _forward(self.model, images, batch_size) if wants_model else None
        self.clean_class = self.clean_outputs.argmax(dim=1) if self.clean_outputs is not None else None
        self.target = self.clean_class if target is None else target
        self.reference = explainer(images, self.target).detach()
        if self.reference.shape[0] != images.shape[0]:
            raise ValueError(f"the explainer returned {self.reference.shape[0]} maps for {images.shape[0]} images")

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]]:
        """Per sample: ``(perturbed, maps, kept (B,) bool, outputs or None, the relative change of the layers'
        representation (B,) or None)``."""
        for draw in self.draws:
            shifted = self.shift(draw, self.images) if self.perturbation is None else self.perturbation(self.images)
            if not isinstance(shifted, Tensor) or shifted.shape != self.images.shape:
                raise ValueError("the perturbation must return a tensor of the images' shape")
            maps = self.explainer(shifted, self.target).detach()
            if maps.shape != self.reference.shape:
                raise ValueError(f"the explainer returned maps of shape {tuple(maps.shape)} for a perturbed copy, "
                                 f"{tuple(self.reference.shape)} for the images")
            outputs = change = None
            kept = torch.ones(self.images.shape[0], dtype=torch.bool, device=self.images.device)
            if self.layers:
                outputs, change = _layer_change(self.model, self.images, shifted, self.layers, self.batch_size,
                                                self.eps, self.strict, self.probe)
            elif self.same_prediction or self.want_outputs:
                outputs = _forward(self.model, shifted, self.batch_size)
            if self.same_prediction:
                kept = outputs.argmax(dim=1) == self.clean_class
            yield shifted, maps, kept, outputs, change


def _gaussian(mean: float, std: float) -> Callable[[int, Tensor], Tensor]:
    return lambda seed, images: images + (mean + std * _draw(seed, images.shape[1:], images, False))


def _uniform(low: float, high: float) -> Callable[[int, Tensor], Tensor]:
    def shift(seed: int, images: Tensor) -> Tensor:
        unit = (_draw(seed, images.shape[1:], images, True) + 1) / 2  # U[0, 1]
        return images + (low + (high - low) * unit)
    return shift


def _max_kept(values: Tensor, kept: Tensor, dtype: torch.dtype) -> Tensor:
    """Per row, the largest of ``values`` (B, S) where ``kept``; NaN where nothing is kept (or a value is NaN)."""
    worst = torch.where(kept, values, torch.full_like(values, float("-inf"))).amax(dim=1)
    return torch.where(kept.any(dim=1), worst, torch.full_like(worst, float("nan"))).to(dtype)


def _relative_change(before: Tensor, after: Tensor, eps: float) -> Tensor:
    """``|(before - after) / before|_2`` per row of (B, N) tensors, a zero ``before`` entry replaced by ``eps``."""
    before, after = before.to(torch.float64), after.to(torch.float64)
    return ((before - after) / torch.where(before == 0, torch.full_like(before, eps), before)).norm(dim=1)


def _check_noise(low: float, high: float) -> None:
    for value, name in ((low, "lower_bound"), (high, "upper_bound")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not high > low:
        raise ValueError(f"upper_bound must exceed lower_bound, got [{low!r}, {high!r}]")


# ------------------------------------------------------------------------------- local Lipschitz estimate
def local_lipschitz_estimate(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                             samples: int = 200, std: float = 0.1, mean: float = 0.0, normalise: bool = True,
                             absolute: bool = False, same_prediction: bool = False,
                             perturbation: Optional[Perturbation] = None, model: Optional[nn.Module] = None,
                             generator: Optional[torch.Generator] = None,
                             batch_size: Optional[int] = None) -> Tensor:
    """Local Lipschitz estimate of ``explainer`` at each image (B,); lower is better.

    Alvarez-Melis & Jaakkola, "On the Robustness of Interpretability Methods", ICML 2018 Workshop on Human
    Interpretability, arXiv:1806.08049 (and "Towards Robust Interpretability with Self-Explaining Neural Networks",
    NeurIPS 2018, arXiv:1806.07538):

        L(x) = max_s |Phi(x) - Phi(x + n_s)|_2 / (|n_s|_2 + 1e-10),   n_s ~ N(mean, std^2) per input element.

    The paper maximises over an epsilon-ball with an optimiser; here, as in Quantus' ``LocalLipschitzEstimate``,
    over ``samples`` Gaussian draws.  Defaults as Quantus: 200 samples, ``std`` 0.1,
    ``mean`` 0, maps normalised by their largest magnitude (per image here, see the module docstring), signed,
    every copy counted (``same_prediction=False``).  Cost: ``samples + 1`` explanations of the batch (and one
    forward per sample with ``same_prediction``).
    """
    _check_positive(std, "std")
    seeds = _sample_seeds(samples, generator)
    runs = _Neighbours(explainer, images, target, seeds, _gaussian(mean, std), perturbation, model, same_prediction,
                       batch_size)
    reference = prepare_maps(runs.reference, normalise, absolute)
    flat_images = images.detach().flatten(1).to(torch.float64)
    values, kept = [], []
    for shifted, maps, keep, _, _ in runs:
        moved = (prepare_maps(maps, normalise, absolute) - reference).norm(dim=1)
        values.append(moved / ((shifted.detach().flatten(1).to(torch.float64) - flat_images).norm(dim=1) + 1e-10))
        kept.append(keep)
    return _max_kept(torch.stack(values, 1), torch.stack(kept, 1), _result_dtype(images))


# ---------------------------------------------------------------------------------------- relative stability
_RELATIVE_DOC = """

    Agarwal, Johnson, Pawelczyk, Krishna, Saxena, Zitnik & Lakkaraju, "Rethinking Stability for Attribution-based
    Explanations", ICLR 2022 Workshop PAIR^2Struct, arXiv:2203.06877.  The relative change of the map,
    ``|(Phi(x) - Phi(x')) / Phi(x)|_2`` (element-wise division, a zero entry of ``Phi(x)`` replaced by ``eps``),
    is divided by the relative change of {what}, floored at ``eps`` (the paper's ``max(., eps_min)``; Quantus adds
    ``eps`` only to a denominator that is exactly zero, which differs only below 1e-6), and maximised over the
    perturbed copies ``x'`` that keep the clean prediction (see the module docstring: Quantus returns NaN for the
    image as soon as one copy changes the prediction).

    Defaults as Quantus: 200 samples of element-wise uniform noise in ``[lower_bound, upper_bound] = [0.02, 0.2]``
    (Quantus' neighbourhood: every element moves up, by 0.11 on average), ``eps`` 1e-6, maps neither normalised
    nor made absolute, ``same_prediction=True``.  Lower is better.  Cost: ``samples + 1`` explanations of the
    batch and ``samples + 1`` forwards (for RIS only with ``same_prediction`` or ``target=None``).
    """


def relative_input_stability(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                             samples: int = 200, lower_bound: float = 0.02, upper_bound: float = 0.2,
                             eps: float = EPS_MIN, normalise: bool = False, absolute: bool = False,
                             same_prediction: bool = True, perturbation: Optional[Perturbation] = None,
                             model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None,
                             batch_size: Optional[int] = None) -> Tensor:
    """Relative input stability (RIS) of ``explainer`` at each image (B,):

        RIS(x) = max_x' |(Phi(x) - Phi(x')) / Phi(x)|_2 / max(|(x - x') / x|_2, eps)."""
    _check_noise(lower_bound, upper_bound)
    _check_positive(eps, "eps")
    seeds = _sample_seeds(samples, generator)
    runs = _Neighbours(explainer, images, target, seeds, _uniform(lower_bound, upper_bound), perturbation,
                       model, same_prediction, batch_size)
    reference = prepare_maps(runs.reference, normalise, absolute)
    flat_images = images.detach().flatten(1)
    values, kept = [], []
    for shifted, maps, keep, _, _ in runs:
        numerator = _relative_change(reference, prepare_maps(maps, normalise, absolute), eps)
        denominator = _relative_change(flat_images, shifted.detach().flatten(1), eps).clamp(min=eps)
        values.append(numerator / denominator)
        kept.append(keep)
    return _max_kept(torch.stack(values, 1), torch.stack(kept, 1), _result_dtype(images))


def relative_output_stability(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                              samples: int = 200, lower_bound: float = 0.02, upper_bound: float = 0.2,
                              eps: float = EPS_MIN, normalise: bool = False, absolute: bool = False,
                              same_prediction: bool = True, perturbation: Optional[Perturbation] = None,
                              model: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None,
                              batch_size: Optional[int] = None) -> Tensor:
    """Relative output stability (ROS) of ``explainer`` at each image (B,), ``h`` the model's raw outputs (logits):

        ROS(x) = max_x' |(Phi(x) - Phi(x')) / Phi(x)|_2 / max(|h(x) - h(x')|_2, eps)."""
    _check_noise(lower_bound, upper_bound)
    _check_positive(eps, "eps")
    seeds = _sample_seeds(samples, generator)
    runs = _Neighbours(explainer, images, target, seeds, _uniform(lower_bound, upper_bound), perturbation,
                       model, same_prediction, batch_size, outputs=True)
    reference = prepare_maps(runs.reference, normalise, absolute)
    clean = runs.clean_outputs.to(torch.float64)
    values, kept = [], []
    for _, maps, keep, outputs, _ in runs:
        numerator = _relative_change(reference, prepare_maps(maps, normalise, absolute), eps)
        values.append(numerator / (clean - outputs.to(torch.float64)).norm(dim=1).clamp(min=eps))
        kept.append(keep)
    return _max_kept(torch.stack(values, 1), torch.stack(kept, 1), _result_dtype(images))


def relative_representation_stability(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None,
                                      *, layers: Optional[LayerList] = None, samples: int = 200,
                                      lower_bound: float = 0.02, upper_bound: float = 0.2, eps: float = EPS_MIN,
                                      normalise: bool = False, absolute: bool = False, same_prediction: bool = True,
                                      perturbation: Optional[Perturbation] = None, model: Optional[nn.Module] = None,
                                      generator: Optional[torch.Generator] = None,
                                      batch_size: Optional[int] = None) -> Tensor:
    """Relative representation stability (RRS) of ``explainer`` at each image (B,), ``L`` the concatenated,
    flattened outputs of ``layers``:

        RRS(x) = max_x' |(Phi(x) - Phi(x')) / Phi(x)|_2 / max(|(L(x) - L(x')) / L(x)|_2, eps).

    ``layers``: dotted names or modules; ``None`` (Quantus' default) takes every submodule of the model except
    containers (``nn.Sequential``, ``ModuleList``, ``ModuleDict``) and modules of the model's own class, each
    layer's output at each of its calls (outputs that are not tensors are left out by default, where Quantus
    fails; a named layer must return a tensor).  The paper leaves the representation open (e.g. one hidden
    layer).  With the default, zeros after ReLUs enter through ``eps`` as in Quantus.  No representation is
    stored: each chunk of images runs with its perturbed copies (``batch_size`` rows hold half of each) and every
    layer adds its part of the norm in its hook, so the clean images run once per sample (``2 (samples + 1)``
    forwards per image in all)."""
    _check_noise(lower_bound, upper_bound)
    _check_positive(eps, "eps")
    base = model if model is not None else getattr(explainer, "model", None)
    if not isinstance(base, nn.Module):
        raise TypeError("relative_representation_stability needs the model (model=, or an explainer with a .model)")
    modules = _default_layers(base) if layers is None else resolve_layers(base, layers)
    if not modules:
        raise ValueError("layers: the model has no layer whose output could be compared")
    seeds = _sample_seeds(samples, generator)
    runs = _Neighbours(explainer, images, target, seeds, _uniform(lower_bound, upper_bound), perturbation,
                       base, same_prediction, batch_size, layers=modules, strict=layers is not None, eps=eps)
    reference = prepare_maps(runs.reference, normalise, absolute)
    values, kept = [], []
    for _, maps, keep, _, change in runs:
        numerator = _relative_change(reference, prepare_maps(maps, normalise, absolute), eps)
        values.append(numerator / change.clamp(min=eps))
        kept.append(keep)
    return _max_kept(torch.stack(values, 1), torch.stack(kept, 1), _result_dtype(images))


relative_input_stability.__doc__ += _RELATIVE_DOC.format(what="the input, ``|(x - x') / x|_2``")
relative_output_stability.__doc__ += _RELATIVE_DOC.format(what="the logits, ``|h(x) - h(x')|_2`` (not relative)")
relative_representation_stability.__doc__ += _RELATIVE_DOC.format(
    what="the representation, ``|(L(x) - L(x')) / L(x)|_2``")


# ------------------------------------------------------------------------------------------------ continuity
def translations(width: int, steps: int) -> Tensor:
    """Quantus' horizontal shifts for ``Continuity``: ``-W + k dx`` for ``k = 1..steps``, ``dx = (2W + 1) // steps``
    (positive moves the content right)."""
    dx = (2 * width + 1) // steps
    if dx < 1:
        raise ValueError(f"steps must be at most 2 W + 1 = {2 * width + 1} for images {width} pixels wide, "
                         f"got {steps}")
    return -width + dx * torch.arange(1, steps + 1)


def translate(images: Tensor, shift: int, fill: Tensor) -> Tensor:
    """``images`` moved ``shift`` columns right (left when negative), the uncovered columns taken from ``fill`` (a
    substrate broadcastable to the images)."""
    width = images.shape[-1]
    source = torch.arange(width, device=images.device) - shift
    inside = (source >= 0) & (source < width)
    moved = images[..., source.clamp(0, width - 1)]
    return torch.where(inside, moved, fill.to(images.dtype))


def continuity(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *, steps: int = 28,
               baseline: SubstrateSpec = "black", normalise: bool = True, absolute: bool = True,
               same_prediction: bool = False, model: Optional[nn.Module] = None,
               batch_size: Optional[int] = None) -> Tensor:
    """Continuity of ``explainer`` at each image (B,): the strongest variation of the map under horizontal
    translations of the image; lower is better.

    Montavon, Samek & Mueller, "Methods for Interpreting and Understanding Deep Neural Networks", Digital Signal
    Processing 73:1-15, 2018, arXiv:1706.07979 (explanation continuity):

        C(x) = max_t |Phi(x) - Phi(x_t)|_1 / (|x - x_t|_2 + 1e-9),

    ``x_t`` the image shifted ``t`` columns (:func:`translations`: ``steps`` shifts from ``-W + dx`` to
    ``-W + steps dx``, ``dx = (2W + 1) // steps``), the uncovered columns filled with ``baseline``: ``'black'``
    (each image's minimum, Quantus' fill) or any other substrate of :func:`attribution.metrics.common.make_substrate`.  Defaults as
    Quantus' ``Continuity``: 28 steps, black fill, maps normalised by their largest magnitude (per image here) and
    made absolute.  Quantus 0.6 always translates along x with the black fill, whatever ``perturb_func`` and
    ``perturb_baseline`` say, and fails when ``steps`` divides ``2W + 1`` (its last shift, ``W + 1``, overruns the
    image); here such a copy is all fill.  ``same_prediction`` drops the shifts that change the model's arg-max on
    the clean image (Quantus compares with the target class, and returns NaN as soon as one step changes it).
    Cost: ``steps + 1`` explanations of the batch (and ``steps`` forwards with ``same_prediction``).
    """
    check_images(images)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    shifts = translations(images.shape[-1], steps).tolist()
    flat = images.detach().flatten(1)
    fill = make_substrate(images.detach(), baseline)
    runs = _Neighbours(explainer, images, target, shifts, lambda shift, x: translate(x, shift, fill), None,
                       model, same_prediction, batch_size)
    reference = prepare_maps(runs.reference, normalise, absolute)
    flat64 = flat.to(torch.float64)
    values, kept = [], []
    for shifted, maps, keep, _, _ in runs:
        moved = (prepare_maps(maps, normalise, absolute) - reference).abs().sum(dim=1)
        values.append(moved / ((shifted.detach().flatten(1).to(torch.float64) - flat64).norm(dim=1) + 1e-9))
        kept.append(keep)
    return _max_kept(torch.stack(values, 1), torch.stack(kept, 1), _result_dtype(images))


# ----------------------------------------------------------------------------------------------- consistency
def _discretise(flat: Tensor, discretise: Union[str, Callable[[Tensor], Tensor]], n: int) -> Tensor:
    if callable(discretise):
        keys = discretise(flat)
        if not isinstance(keys, Tensor) or keys.shape[0] != flat.shape[0]:
            raise ValueError("a discretise callable must return a tensor with one row per map")
        return keys.reshape(flat.shape[0], -1)
    if discretise == "top_n_sign":
        return torch.sign(flat[:, :n])
    if discretise == "sign":
        return torch.sign(flat)
    if discretise == "rank":
        return flat.argsort(dim=1, stable=True).flip(1)
    raise ValueError(f"discretise must be 'top_n_sign', 'sign', 'rank' or a callable, got {discretise!r}")


def consistency(model: nn.Module, images: Tensor, maps: Tensor, *,
                discretise: Union[str, Callable[[Tensor], Tensor]] = "top_n_sign", n: int = 5,
                normalise: bool = True, absolute: bool = True, batch_size: Optional[int] = None) -> Tensor:
    """Local consistency of the maps (B,): among the *other* images of the call whose discretised map equals this
    image's, the share the model gives the same predicted class; higher is better.

    Dasgupta, Frost & Moshkovitz, "Framework for Evaluating Faithfulness of Local Explanations", ICML 2022,
    arXiv:2202.00734:  ``consistency(x) = P[f(x') = f(x) | e(x') = e(x)]`` over the data, estimated on the batch.

    ``discretise`` turns each flattened (B, C*H*W) map into a key: ``'top_n_sign'`` (Quantus' default) the signs of
    the *first* ``n`` = 5 entries in memory order (Quantus' ``top_n_sign`` takes the first entries, not the largest;
    after the default ``absolute=True`` nearly every map gets the same key, so the score degenerates to the share
    of other images with the same prediction: kept for parity, choose a key that fits your maps), ``'sign'`` the
    signs of all entries, ``'rank'`` the order of the entries, largest first (stable for ties; NumPy's default
    sort is not), or a callable ``f(flat maps) -> (B, K) keys``.  Defaults as Quantus' ``Consistency``: maps
    normalised (per image here; no built-in key depends on the scale) and made absolute first.  Differences: an
    image that shares its key with no other image gets NaN (the conditional probability is undefined; Quantus
    returns 0), all images of the call are compared (Quantus compares within each of its batches of
    ``batch_size`` = 64), and higher is better (Quantus labels the score lower-is-better, but a higher share means
    more faithful).  Cost: one forward of the batch.
    """
    check_model_and_maps(model, images, maps)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    keys = _discretise(prepare_maps(maps.to(images.device), normalise, absolute), discretise, n)
    _, labels = torch.unique(keys, dim=0, return_inverse=True)
    predicted = _forward(model, images, batch_size).argmax(dim=1)
    others = ~torch.eye(images.shape[0], dtype=torch.bool, device=images.device)
    same_key = (labels[:, None] == labels[None, :]) & others
    agree = (same_key & (predicted[:, None] == predicted[None, :])).sum(dim=1).to(torch.float64)
    count = same_key.sum(dim=1).to(torch.float64)
    share = torch.where(count > 0, agree / count.clamp(min=1), torch.full_like(count, float("nan")))
    return share.to(_result_dtype(images))
