"""One entry point: run an explainer on a batch, then a list of metrics, and get a table back.

::

    table = evaluate(explainer, model, images, targets, metrics=["deletion", "insertion", "road", "gini"])
    table["deletion"]        # (B,) per-image deletion AUC
    table.means              # {"deletion": tensor(0.12), ...}
    table.plot()             # the curves (mean over images, and each image faintly)
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.targets import TargetSpec
from .common import resolve_scorer
from .axioms import completeness, non_sensitivity
from .complexity import effective_complexity, entropy, gini
from .confidence import average_drop, increase_in_confidence
from .faithfulness import faithfulness_correlation, sensitivity_n
from .invariance import input_invariance
from .local_sufficiency import sufficiency
from .ground_truth import localisation_auc, relevance_rank_accuracy, top_k_intersection
from .infidelity_sensitivity import avg_sensitivity, infidelity, max_sensitivity
from .insertion_deletion import deletion, insertion
from .keep_remove import keep_absolute_mask, keep_negative_mask, keep_positive_mask, remove_absolute_mask
from .localisation import attribution_localisation, energy_pointing_game, pointing_game
from .perturbation_faithfulness import (faithfulness_estimate, irof, monotonicity, monotonicity_correlation,
                                        region_perturbation, selectivity)
from .randomisation import random_logit
from .regions import Regions
from .remove_and_debias import road
from .robustness import (consistency, continuity, local_lipschitz_estimate, relative_input_stability,
                         relative_output_stability, relative_representation_stability)
from .salience_guided import saco
from .sanity_revisited import efficient_mprt, smooth_mprt
from .sanity import model_randomisation
from .wsol import max_box_acc, max_box_acc_v2, pxap

_CURVES: Dict[str, Callable[..., Any]] = {
    "deletion": deletion, "insertion": insertion, "kpm": keep_positive_mask, "knm": keep_negative_mask,
    "kam": keep_absolute_mask, "ram": remove_absolute_mask, "sensitivity_n": sensitivity_n,
    "selectivity": selectivity, "region_perturbation": region_perturbation, "monotonicity": monotonicity,
}
#: how a curve metric's result gives the table's per-image value (default: its ``auc``)
_CURVE_VALUE: Dict[str, Callable[[Any], Tensor]] = {
    "region_perturbation": lambda r: r.aopc, "monotonicity": lambda r: r.monotonic.to(torch.float32),
}
#: metrics with one value per image from perturbed forwards
_SCORES: Dict[str, Callable[..., Any]] = {
    "average_drop": average_drop, "increase_in_confidence": increase_in_confidence, "infidelity": infidelity,
    "faithfulness_correlation": faithfulness_correlation, "saco": saco,
    "faithfulness_estimate": faithfulness_estimate, "monotonicity_correlation": monotonicity_correlation,
    # the area on [0, 1] (Quantus' ``aoc`` grows with each image's segment count)
    "irof": lambda *a, **o: irof(*a, **o).aoc_unit, "non_sensitivity": non_sensitivity,
    "completeness": lambda *a, **o: completeness(*a, **o).gap.abs(),
}
#: metrics that re-run the explainer on changed inputs (or for other classes)
_EXPLAINED: Dict[str, Callable[..., Any]] = {
    "max_sensitivity": max_sensitivity, "avg_sensitivity": avg_sensitivity,
    "local_lipschitz_estimate": local_lipschitz_estimate, "relative_input_stability": relative_input_stability,
    "relative_output_stability": relative_output_stability,
    "relative_representation_stability": relative_representation_stability, "continuity": continuity,
    "random_logit": random_logit, "efficient_mprt": efficient_mprt,
    "smooth_mprt": lambda *a, **o: smooth_mprt(*a, **o).last,
    "input_invariance": lambda *a, **o: input_invariance(*a, **o).invariant.to(torch.float32),
}
#: metrics of the maps alone
_MAPS: Dict[str, Callable[..., Tensor]] = {
    "gini": gini, "entropy": entropy,
    "effective_complexity": lambda m, **o: effective_complexity(m, **o).to(torch.float32),
}
_REGION: Dict[str, Callable[..., Any]] = {
    "pointing_game": lambda m, r, **o: pointing_game(m, r, **o).hit.to(torch.float32),
    "energy_pointing_game": energy_pointing_game,
    "attribution_localisation": attribution_localisation,
    "max_box_acc": lambda m, r, **o: max_box_acc(m, r, **o).value,
    "max_box_acc_v2": lambda m, r, **o: max_box_acc_v2(m, r, **o).value,
    "pxap": lambda m, r, **o: pxap(m, r, **o).value,
    "relevance_rank_accuracy": relevance_rank_accuracy, "top_k_intersection": top_k_intersection,
    "localisation_auc": localisation_auc,
}
#: every metric name :func:`evaluate` accepts
METRICS = tuple(sorted([*_CURVES, *_SCORES, *_REGION, *_EXPLAINED, *_MAPS, "road", "model_randomisation",
                        "consistency", "sufficiency"]))
#: metrics where a lower value is better (the others: higher is better)
LOWER_IS_BETTER = frozenset({"deletion", "knm", "ram", "road_morf", "model_randomisation", "average_drop",
                             "infidelity", "entropy", "selectivity", "non_sensitivity", "completeness",
                             "effective_complexity",
                             *(n for n in _EXPLAINED if n not in ("efficient_mprt", "input_invariance"))})


class EvaluationTable(dict):
    """Metric name -> (B,) per-image values (or a 0-d value for dataset-level metrics such as MaxBoxAcc).

    ``curves`` maps a curve metric's name to ``(x (S,), y (B, S))``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.curves: Dict[str, Tuple[Tensor, Tensor]] = {}

    @property
    def means(self) -> Dict[str, Tensor]:
        """Each metric's mean over images (NaN entries left out)."""
        return {k: v.to(torch.float64).nanmean() for k, v in self.items()}

    def summary(self) -> str:
        """One line per metric: its mean and which direction is better."""
        width = max((len(k) for k in self), default=0)
        return "\n".join(f"{k:<{width}}  {float(v):.4f}  ({'lower' if k in LOWER_IS_BETTER else 'higher'} is better)"
                         for k, v in self.means.items())

    def __repr__(self) -> str:
        return f"EvaluationTable(\n{self.summary()}\n)"

    def plot(self, names: Optional[Iterable[str]] = None, axes=None):
        """Plot the curves (each image faintly, the mean boldly), one panel per curve; returns the figure."""
        import matplotlib.pyplot as plt

        names = [n for n in (names or self.curves) if n in self.curves]
        if not names:
            raise ValueError("the table holds no curves; evaluate a curve metric such as 'deletion' first")
        if axes is None:
            fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
            axes = axes[0]
        else:
            fig = axes[0].figure
        for ax, name in zip(axes, names):
            x, y = (t.detach().to(torch.float64).cpu() for t in self.curves[name])
            for row in y:
                ax.plot(x.numpy(), row.numpy(), color="0.75", linewidth=0.8)
            ax.plot(x.numpy(), y.mean(dim=0).numpy(), color="C0", linewidth=2)
            mean = float(self[name].to(torch.float64).nanmean()) if name in self else float("nan")
            ax.set_title(f"{name}  (mean {mean:.3f})", fontsize=9)
            ax.set_xlabel("fraction of pixels", fontsize=8)
        fig.tight_layout()
        return fig


def _check_options(options: Optional[Mapping[str, Mapping[str, Any]]]) -> Dict[str, Dict[str, Any]]:
    """``options`` as a dict of dicts; a key that names no metric (a typo would silently drop its options) or a
    value that is not a mapping gets an error naming it."""
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise TypeError(f"options must be a dict of per-metric keyword arguments, got {type(options).__name__}")
    for key, value in options.items():
        if key not in METRICS:
            close = difflib.get_close_matches(str(key), METRICS, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; metrics are {list(METRICS)}"
            raise ValueError(f"options names an unknown metric {key!r}{hint}")
        if not isinstance(value, Mapping):
            raise TypeError(f"options[{key!r}] must be a dict of keyword arguments, got {type(value).__name__}")
    return {k: dict(v) for k, v in options.items()}


def evaluate(explainer, model: Optional[nn.Module], images: Tensor, targets: TargetSpec = None,
             metrics: Iterable[str] = ("deletion", "insertion"), *, regions: Optional[Regions] = None,
             maps: Optional[Tensor] = None, options: Optional[Mapping[str, Mapping[str, Any]]] = None,
             batch_size: Optional[int] = None) -> EvaluationTable:
    """Explain ``images`` with ``explainer`` and score the maps with ``metrics`` (names in :data:`METRICS`).

    ``explainer``: an :class:`attribution.Explainer` or any callable ``f(images, targets) -> maps``; ``model``: the
    model the perturbation metrics query (default: the explainer's).  ``targets`` is fixed once (``None``: the
    model's arg-max) and used by the explainer and by every metric.  ``regions``: ground-truth boxes or masks, for
    the localisation and WSOL metrics.  ``maps``: precomputed maps (then the explainer is only needed by
    ``'model_randomisation'``).  ``options``: per-metric keyword arguments, e.g. ``{"deletion": {"step": 56}}``
    (keys must be names of :data:`METRICS`; those of metrics not in ``metrics`` are not used).
    """
    model = model if model is not None else getattr(explainer, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError("give the model (an nn.Module) the metrics should query")
    names = list(metrics)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    options = _check_options(options)
    resolved = resolve_scorer(model, images, targets, "logit", batch_size).target
    fixed = resolved.classes if resolved.classes is not None else targets
    if maps is None:
        maps = explainer(images, fixed).detach()
    table = EvaluationTable()
    for name in names:
        extra = options.get(name, {})
        if name == "region_perturbation" and extra.get("order", "morf") != "morf":
            raise ValueError("evaluate() reports region perturbation's MoRF AOPC (higher is better); call "
                             "region_perturbation(order=...) itself for the LeRF or random orders")
        if name in _CURVES:
            curve = _CURVES[name](model, images, maps, fixed, batch_size=batch_size, **extra)
            table[name] = _CURVE_VALUE[name](curve) if name in _CURVE_VALUE else curve.auc
            table.curves[name] = (curve.x, curve.y)
        elif name in _SCORES:
            table[name] = _SCORES[name](model, images, maps, fixed, batch_size=batch_size, **extra)
        elif name == "road":
            result = road(model, images, maps, fixed, batch_size=batch_size, **extra)
            table["road"] = result.combined
            table["road_morf"], table["road_lerf"] = result.morf.mean(dim=1), result.lerf.mean(dim=1)
            table.curves["road_morf"] = (result.fractions, result.morf)
            table.curves["road_lerf"] = (result.fractions, result.lerf)
        elif name in _MAPS:
            table[name] = _MAPS[name](maps, **extra)
        elif name in ("consistency", "sufficiency"):
            metric = consistency if name == "consistency" else sufficiency
            table[name] = metric(model, images, maps, batch_size=batch_size, **extra)
        elif name in _REGION:
            if regions is None:
                raise ValueError(f"metric {name!r} needs regions= (ground-truth boxes or masks)")
            table[name] = _REGION[name](maps, regions, **extra)
        elif name in _EXPLAINED:
            if explainer is None:
                raise ValueError(f"{name!r} needs the explainer, not only its maps")
            sized = {} if name in ("max_sensitivity", "avg_sensitivity") else {"batch_size": batch_size}
            table[name] = _EXPLAINED[name](explainer, images, fixed, model=model, **sized, **extra)
        else:  # model_randomisation
            if explainer is None:
                raise ValueError("'model_randomisation' needs the explainer, not only its maps")
            result = model_randomisation(explainer, images, fixed, model=model, **extra)
            table[name] = result.spearman_abs[-1]
            table.curves[name] = (torch.arange(1, len(result.layers) + 1) / len(result.layers),
                                  result.spearman_abs.t())
    return table
