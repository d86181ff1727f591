"""The model-randomisation sanity check.

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency Maps", NeurIPS 2018,
arXiv:1810.03292.

A map that explains the model must change when the model's weights are destroyed.  The cascading test
re-initialises the layers of a *copy* of the model from the output towards the input (the user's model is never
touched), one more layer at each step, and compares each step's map with the original map by

* Spearman rank correlation of the absolute maps and of the signed maps, and
* SSIM of the absolute maps,

with the maps first put through PAIR saliency's visualisations, as the paper's code did: absolute maps summed over
channels, clipped at their 99th percentile and scaled to [0, 1]; signed maps summed over channels, shifted and
scaled by the magnitude of their (signed) 99th percentile and clipped to [-1, 1] (:func:`visualise_signed`).  A
map whose absolute rank correlation with the original is still at least ``threshold`` (0.5) after every listed
layer is re-initialised is *flagged*: it does not depend on the model (an edge detector gives 1.0).  The 0.5
cut-off is this library's choice; the paper reports the curves.

Re-initialisation calls each module's own ``reset_parameters()`` (PyTorch's default initialiser for that layer,
as the paper re-drew weights from their initialisers; batch norm returns to identity and its running statistics
are reset); a parameter of a module without one is redrawn from a normal of its own standard deviation, and the
parameters the model holds itself (a ViT's class token and position embedding) are the cascade's last step
(:data:`OWN_PARAMETERS`), so that it ends at the fully random model.  Each
layer's draw comes from ``seed`` and the layer's name (the same in the cascading and the independent test), in a
forked RNG, so the caller's random state is left alone.  The target is fixed to the
original model's choice (``None``: its arg-max), so every step explains the same class.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import zlib
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.explainer import Explainer
from ..core.targets import TargetSpec
from .common import resolve_scorer, run_order
from .similarity import spearman, ssim

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
FLAG_THRESHOLD = 0.5
PERCENTILE = 0.99


class RandomisationResult(NamedTuple):
    """Per step ``l`` (layers ``layers[:l + 1]`` re-initialised, cascading) and image: ``spearman_abs``,
    ``spearman`` and ``ssim`` (L, B); ``flagged`` (B,): the last step's ``spearman_abs >= threshold``."""

    layers: List[str]
    spearman_abs: Tensor
    spearman: Tensor
    ssim: Tensor
    flagged: Tensor


def visualise_abs(maps: Tensor) -> Tensor:
    """PAIR's ``VisualizeImageGrayscale``: channel sum of ``|maps|``, min to 99th percentile scaled to [0, 1]."""
    m = maps.abs().sum(dim=1).flatten(1).to(torch.float64) if maps.dim() == 4 else maps.abs().flatten(1).double()
    low = m.amin(dim=1, keepdim=True)
    high = torch.quantile(m, PERCENTILE, dim=1, keepdim=True)
    return ((m - low) / (high - low).clamp(min=1e-12)).clamp(0, 1)


def visualise_signed(maps: Tensor) -> Tensor:
    """PAIR's ``VisualizeImageDiverging``: the channel sum ``m``, ``span = |99th percentile of m|`` (of the signed
    map, as PAIR: for a mostly negative map that is a small number), ``clip((m + span) / (2 span), -1, 1)``; a zero
    span is taken as 1e-12 (PAIR divides by zero)."""
    m = maps.sum(dim=1).flatten(1).to(torch.float64) if maps.dim() == 4 else maps.flatten(1).double()
    span = torch.quantile(m, PERCENTILE, dim=1, keepdim=True).abs().clamp(min=1e-12)
    return ((m + span) / (2 * span)).clamp(-1, 1)


#: the name, in the randomisation cascade, of the parameters the model owns itself (a ViT's class token and position
#: embedding): the last step of the top-down cascade, so that its end is the fully random model
OWN_PARAMETERS = "(own parameters)"


def randomisation_layers(model: nn.Module, images: Tensor) -> List[str]:
    """Default layers, top-down: the model's children that hold parameters, containers (Sequential, ModuleList,
    ModuleDict) opened one level, ordered by when they first run in a forward of one image, last first; then
    :data:`OWN_PARAMETERS` if the model holds parameters of its own."""
    candidates = []
    for name, child in model.named_children():
        if isinstance(child, CONTAINERS):
            candidates += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            candidates.append((name, child))
    candidates = [(n, m) for n, m in candidates if any(True for _ in m.parameters())]
    order = run_order(model, images, [m for _, m in candidates])
    own = [OWN_PARAMETERS] if any(True for _ in model.parameters(recurse=False)) else []
    return [candidates[i][0] for i in reversed(order)] + own


def reinitialise(module: nn.Module) -> None:
    """Re-draw every parameter under ``module`` (see the module docstring), in place."""
    done = set()
    with torch.no_grad():
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()
                done.update(id(p) for p in sub.parameters(recurse=False))
        for p in module.parameters():
            if id(p) not in done:
                _redraw(p)


def _redraw(p: Tensor) -> None:
    """A parameter without a reset of its own: normal draws at its own scale (its standard deviation)."""
    p.copy_(torch.randn_like(p) * (p.std() if p.numel() > 1 else p.abs()).clamp(min=1e-3))


def layer_seed(seed: int, name: str) -> int:
    """The seed of layer ``name``'s draw: ``seed`` plus the CRC-32 of the name (the same in every test here)."""
    return seed + zlib.crc32(name.encode())


def randomised_copies(model: nn.Module, names: Sequence[str], cascading: bool = True, seed: int = 0,
                      devices: Sequence[torch.device] = ()) -> Iterator[Tuple[str, nn.Module]]:
    """Yield ``(name, copy)`` for each layer of ``names`` in turn: a deep copy of ``model`` with that layer re-drawn
    by :func:`reinitialise` from :func:`layer_seed` (cascading: on top of the earlier layers, in one copy; else each
    layer alone, in a fresh copy).  ``model`` is never touched; the draws run in a forked RNG (the CPU's, the CUDA
    devices the model lives on and ``devices``, e.g. the images'), which stays forked while the consumer works on a
    yielded copy, so the caller's random state is left alone."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    forked = sorted({torch.device(d) for d in devices} | {t.device for t in tensors if t.device.type == "cuda"},
                    key=str)
    with torch.random.fork_rng(devices=forked):
        copy_model = copy.deepcopy(model)
        for name in names:
            if not cascading:
                copy_model = copy.deepcopy(model)
            modules = dict(copy_model.named_modules())
            if name not in modules and name != OWN_PARAMETERS:
                raise ValueError(f"the model has no layer named {name!r}")
            _seed(layer_seed(seed, name), forked)  # a layer's draw depends on (seed, name) only
            if name == OWN_PARAMETERS:
                with torch.no_grad():
                    for p in copy_model.parameters(recurse=False):
                        _redraw(p)
            else:
                reinitialise(modules[name])
            yield name, copy_model


def _seed(seed: int, devices: Sequence[torch.device]) -> None:
    """Seed the CPU's generator and those of the CUDA ``devices`` (the forked ones) only: ``torch.manual_seed``
    would reseed every GPU, including those whose state no fork restores."""
    torch.default_generator.manual_seed(seed)
    for device in devices:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def rebind(explainer, model: nn.Module) -> Callable[[Tensor, TargetSpec], Tensor]:
    """The same explanation method for another model of the same architecture (a copy of the explainer's, or
    ``random_model``): every choice made at construction is kept.

    An :class:`~attribution.Explainer` is deep-copied with the modules, parameters and buffers of its model mapped
    by name to those of ``model`` (so wrapped methods -- SmoothGrad's or IDGI's ``method`` --, layers given as
    modules, inner explainers and their options all follow) and any ``torch.Generator`` it holds shared, not
    copied (its draws go on as with the original); everything else it holds is copied.  The explainer itself is
    left as it is; ``model`` is returned as is when it is the explainer's own.  A callable that accepts a
    ``model`` keyword is called with it; any other callable is returned unchanged (it cannot follow the model:
    exactly what the checks expose).
    """
    if isinstance(explainer, Explainer):
        return explainer if explainer.model is model else copy.deepcopy(explainer, _rebind_memo(explainer, model))
    try:
        takes_model = "model" in inspect.signature(explainer).parameters
    except (TypeError, ValueError):
        takes_model = False
    if takes_model:
        return lambda x, target: explainer(x, target, model=model)
    return explainer


def _rebind_memo(explainer: Explainer, model: nn.Module) -> dict:
    """The deep-copy memo of :func:`rebind`: each module, parameter and buffer of the explainer's model -> the one
    of the same name in ``model``; each generator the explainer holds -> itself."""
    memo: dict = {}
    for listing in ("named_modules", "named_parameters", "named_buffers"):
        new = dict(getattr(model, listing)(remove_duplicate=False))
        for name, old in getattr(explainer.model, listing)(remove_duplicate=False):
            if name not in new:
                kind = listing[len("named_"):-1]
                raise ValueError(f"cannot move the explainer to model: it has no {kind} named {name or '(root)'!r} "
                                 f"(it must have the explainer's model's architecture)")
            memo[id(old)] = new[name]
    for generator in _generators(explainer):
        memo[id(generator)] = generator
    return memo


def _generators(value, seen: Optional[set] = None) -> Iterator[torch.Generator]:
    """The ``torch.Generator`` objects reachable from ``value`` through explainers' attributes, dicts, lists,
    tuples and sets."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Generator):
        yield value
    elif isinstance(value, Explainer):
        yield from _generators(vars(value), seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _generators(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _generators(item, seen)


def model_randomisation(explainer, images: Tensor, target: TargetSpec = None, *, model: Optional[nn.Module] = None,
                        layers: Optional[Sequence[str]] = None, cascading: bool = True, seed: int = 0,
                        threshold: float = FLAG_THRESHOLD) -> RandomisationResult:
    """Run the cascading (or, with ``cascading=False``, independent) model-randomisation test.

    ``explainer``: an :class:`attribution.Explainer` (moved to each randomised copy by :func:`rebind`, every
    construction choice kept), or any callable ``f(x, target)`` with ``model=`` given; such a callable follows the
    copies only if it accepts a ``model`` keyword.  ``layers``: dotted module names, top-down (default
    :func:`randomisation_layers`).
    """
    base = explainer.model if isinstance(explainer, Explainer) else model
    if not isinstance(base, nn.Module):
        raise TypeError("give model= (an nn.Module) when the explainer is not an attribution.Explainer")
    resolved = resolve_scorer(base, images, target, "logit", None).target
    fixed = resolved.classes if resolved.classes is not None else target
    names = list(layers) if layers is not None else randomisation_layers(base, images)
    if not names:
        raise ValueError("no layers to randomise")
    original = rebind(explainer, base)(images, fixed).detach()
    reference_abs, reference_signed = visualise_abs(original), visualise_signed(original)
    size = original.shape[-2:]
    rows = {"spearman_abs": [], "spearman": [], "ssim": []}
    devices = [images.device] if images.device.type == "cuda" else []
    for _, copy_model in randomised_copies(base, names, cascading, seed, devices):
        maps = rebind(explainer, copy_model)(images, fixed).detach()
        for key, value in _similarities(reference_abs, reference_signed, maps, size).items():
            rows[key].append(value)
    table = {k: torch.stack(v) for k, v in rows.items()}
    return RandomisationResult(names, table["spearman_abs"], table["spearman"], table["ssim"],
                               table["spearman_abs"][-1] >= threshold)


def _similarities(reference_abs: Tensor, reference_signed: Tensor, maps: Tensor, size) -> dict:
    """Spearman (absolute and signed) and SSIM (absolute) of ``maps`` against the reference visualisations."""
    absolute = visualise_abs(maps)
    return {"spearman_abs": spearman(reference_abs, absolute),
            "spearman": spearman(reference_signed, visualise_signed(maps)),
            "ssim": ssim(reference_abs.view(-1, *size), absolute.view(-1, *size))}


class DataRandomisationResult(NamedTuple):
    """Per image (B,): the similarities of the two models' maps, and ``flagged``: ``spearman_abs >= threshold``."""

    spearman_abs: Tensor
    spearman: Tensor
    ssim: Tensor
    flagged: Tensor


def data_randomisation(explainer, images: Tensor, target: TargetSpec = None, *, random_model: nn.Module,
                       model: Optional[nn.Module] = None, threshold: float = FLAG_THRESHOLD) -> DataRandomisationResult:
    """The data-randomisation test (Adebayo et al. 2018, Section 4): a map that explains what the model learned must
    differ between the model and ``random_model``, the same architecture trained on randomly permuted labels (the
    training is the caller's: nothing here trains).  Both models explain the same class, the original model's
    choice (``None``: its arg-max); the maps are compared as in :func:`model_randomisation`, and an image is
    flagged when the absolute rank correlation is still at least ``threshold``.
    """
    base = explainer.model if isinstance(explainer, Explainer) else model
    if not isinstance(base, nn.Module) or not isinstance(random_model, nn.Module):
        raise TypeError("give model= (when the explainer is not an attribution.Explainer) and random_model=, "
                        "both nn.Modules")
    resolved = resolve_scorer(base, images, target, "logit", None).target
    fixed = resolved.classes if resolved.classes is not None else target
    original = rebind(explainer, base)(images, fixed).detach()
    maps = rebind(explainer, random_model)(images, fixed).detach()
    values = _similarities(visualise_abs(original), visualise_signed(original), maps, original.shape[-2:])
    return DataRandomisationResult(values["spearman_abs"], values["spearman"], values["ssim"],
                                   values["spearman_abs"] >= threshold)

