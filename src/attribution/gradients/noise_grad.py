"""NoiseGrad: a gradient method's maps averaged over copies of the model with noisy weights."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..core.explainer import non_negative_number, positive_int
from ..core.registry import register
from ..core.rules import PARAMETER_VALUE
from ..core.targets import Target
from .base import WrappingExplainer, accumulation_dtype
from .vanilla import VanillaGradient

NOISES = ("multiplicative", "additive")


class Reparametrized(nn.Module):
    """``model`` run with other values for its parameters (``values``, by name; :func:`torch.func.functional_call`),
    the model's own when ``values`` is None.  Hooks and buffers are the model's; the model itself is not changed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.values: Optional[Dict[str, Tensor]] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.values is None:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(self.model, self.values, args, kwargs)


@register("noise_grad")
class NoiseGrad(WrappingExplainer):
    """NoiseGrad: average a gradient method's maps over copies of the model whose weights carry random noise.

    Bykov, Hedström, Nakajima & Höhne, "NoiseGrad — Enhancing Explanations by Introducing Stochasticity to Model
    Weights", AAAI 2022, arXiv:2106.10185.

    ``mean_s M(x; theta * eta_s)`` over ``s = 1 .. noisy_models``, ``eta_s ~ N(1, weight_std^2)`` drawn for every
    parameter entry (``noise='multiplicative'``, the paper's; ``'additive'``: ``theta + eps_s``, ``eps_s ~ N(0,
    weight_std^2)``); ``M`` the wrapped gradient method (``method``, a class or registry name, default vanilla
    gradient; its options pass through, and ``generator`` is shared with it).  FusionGrad, the paper's combination
    with input noise, is ``method='smoothgrad'`` (SmoothGrad's ``samples`` and ``std`` set the input noise).
    Defaults noisy_models=10, weight_std=0.2 as the authors' code; the level the model tolerates depends on the
    model: 0.2 destroys EfficientNet-Lite0's predictions (none of 10 noisy models keeps the
    photos' classes; 0.05 keeps half of them, 0.02 all), so choose ``weight_std`` for the model.  Parameters only
    are perturbed (buffers, such as batch-norm statistics, are not); the model runs through
    :func:`torch.func.functional_call`, which sets the noisy values on the modules for the duration of each forward
    and restores the parameters after it (other threads that run the model outside an explainer during the call
    see the noisy weights; explainer calls on one model are serialised); the relevance rules (LRP, AttnLRP, ...)
    treat the noisy values as the parameters they stand for.  Under ``create_graph`` the maps are differentiable
    w.r.t. the clean parameters.  The noise is drawn model by model, parameter by
    parameter in ``named_parameters()`` order, from ``generator`` if given; one noisy model serves the whole batch.
    Deliberate difference: the authors' code multiplies the weights in place sample after sample, so that the noise
    compounds (model ``s`` carries ``s`` draws); here each noisy model perturbs the clean weights, as the paper's
    formula.  ``target=None`` explains each image's class under the clean model.  Cost: ``noisy_models`` times the
    wrapped method's.
    """

    defaults = {"method": VanillaGradient, "noisy_models": 10, "weight_std": 0.2, "noise": "multiplicative",
                "generator": None}

    def _inner_model(self, model: nn.Module) -> nn.Module:
        return Reparametrized(model)

    def _explain(self, x: Tensor, target: Target, *, noisy_models: int, weight_std: float, noise: str,
                 generator: Optional[torch.Generator], method: Any = None, **inner: Any) -> Tensor:
        positive_int(noisy_models, "noisy_models")
        non_negative_number(weight_std, "weight_std")
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        inner_options = self._inner_options(inner, generator)  # a wrapped method's own ``method`` keeps its default
        model: Reparametrized = self.inner.model
        parameters = dict(self.model.named_parameters())
        total: Any = 0.0  # shaped by the maps: (B, C, H, W), or (B, 1, H, W) for a 'magnitude' method
        try:
            for _ in range(noisy_models):
                model.values = {name: _noisy(p, weight_std, noise, generator) for name, p in parameters.items()}
                total = total + self.inner._explain(x, target, **inner_options).to(accumulation_dtype(x))
        finally:
            model.values = None
        return total / noisy_models


def _noisy(parameter: Tensor, std: float, noise: str, generator: Optional[torch.Generator]) -> Tensor:
    """``parameter * eta`` or ``parameter + eps`` with standard-normal draws scaled by ``std``, in the parameter's
    graph (so that maps made with create_graph reach the clean parameter)."""
    device = generator.device if generator is not None else parameter.device
    draw = torch.randn(parameter.shape, generator=generator, device=device).to(parameter)
    value = parameter * (1 + std * draw) if noise == "multiplicative" else parameter + std * draw
    setattr(value, PARAMETER_VALUE, True)  # relevance rules treat it as the parameter it stands for
    return value
