"""Layer-wise relevance propagation: the target's relevance, passed down layer by layer with composite rules.

The rules are zennit's (Anders et al., the reference implementation), applied without touching the model: the
machinery of :mod:`attribution.core.rules` reroutes the forward's convolutions, linear layers, average pooling,
batch norms, residual sums and elementwise activations through autograd functions whose backward maps relevance at
an operation's output to relevance at its input; the "input gradient" of that pass is the relevance at the input.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.explainer import bound_option
from ..core.registry import register
from ..core.rules import LinearCall, LinearRule, Norm, RuleMode, differentiable, stabilize
from ..core.targets import Target
from .base import GradientExplainer

Bound = Union[None, float, Tensor]


def _positive(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(min=0)


def _negative(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(max=0)


def _relevance(outputs: List[Tensor], inputs: List[Tensor], grads: List[Tensor],
               create_graph: bool) -> Tuple[Tensor, ...]:
    """The vector-Jacobian products of ``outputs`` with ``grads``, summed into each of ``inputs``."""
    return torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for o, g in zip(outputs, grads)],
                               create_graph=create_graph)


def _signed_parts(x: Tensor, create_graph: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``x+`` and ``x-`` as tensors to differentiate against; ``x-`` is None when ``x >= 0`` (after a ReLU): its
    terms are exactly zero then."""
    positive = differentiable(x.clamp(min=0), create_graph)
    if not bool((x < 0).any()):
        return positive, None
    return positive, differentiable(x.clamp(max=0), create_graph)


class Epsilon:
    """LRP-epsilon: ``R_j = x_j sum_k w_jk R_k / (z_k + eps sign(z_k))``, ``z = W x + b``."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        local = differentiable(x, create_graph)
        out = call(local, weight, bias)
        (spread,) = _relevance([out], [local], [grad / stabilize(out, self.eps)], create_graph)
        return local * spread


class AlphaBeta:
    """LRP-alpha-beta (``alpha=1, beta=0``: z+): positive and negative contributions normalised separately,
    ``R_j = sum_k (alpha (x_j w_jk)+ / z+_k - beta (x_j w_jk)- / z-_k) R_k``, the positive bias in ``z+``, the
    negative one in ``z-`` (``bias=False``: the bias is left out of both, as in Chefer et al.'s implementation)."""

    def __init__(self, alpha: float, beta: float, stabilizer: float, bias: bool = True) -> None:
        self.alpha, self.beta, self.stabilizer, self.bias = alpha, beta, stabilizer, bias

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        bias = bias if self.bias else None
        up, down = weight.clamp(min=0), weight.clamp(max=0)
        xp, xn = _signed_parts(x, create_graph)
        outputs, inputs, grads = [], [xp], []
        # (x+ W+ + b+) + (x- W-): the positive contributions; (x+ W- + b-) + (x- W+): the negative ones
        for (w_pos, w_neg, b), coefficient in (((up, down, _positive(bias)), self.alpha),
                                                     ((down, up, _negative(bias)), -self.beta)):
            if coefficient == 0:
                continue
            terms = [call(xp, w_pos, b)] + ([] if xn is None else [call(xn, w_neg, None)])
            share = coefficient * grad / stabilize(sum(terms), self.stabilizer)
            outputs += terms
            grads += [share] * len(terms)
        if xn is not None:
            inputs.append(xn)
        spread = _relevance(outputs, inputs, grads, create_graph)
        return sum(t * s for t, s in zip(inputs, spread))


class Gamma:
    """LRP-gamma (generalised to signed inputs, as zennit): positive weights boosted by ``gamma``, ``R_j = sum_k
    x_j (w_jk + gamma w_jk+) R_k / sum_j x_j (w_jk + gamma w_jk+)`` where ``z_k > 0`` (with ``W + gamma W-`` for the
    negative inputs), the mirrored rule where ``z_k < 0``."""

    def __init__(self, gamma: float, stabilizer: float) -> None:
        self.gamma, self.stabilizer = gamma, stabilizer

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        g = self.gamma
        boost_up, boost_down = weight + g * weight.clamp(min=0), weight + g * weight.clamp(max=0)
        bias_up = None if bias is None else bias + g * bias.clamp(min=0)
        bias_down = None if bias is None else bias + g * bias.clamp(max=0)
        with torch.no_grad():
            plain = call(x, weight, bias)
        xp, xn = _signed_parts(x, create_graph)
        outputs, grads = [], []
        for (w_pos, w_neg, b), mask in (((boost_up, boost_down, bias_up), plain > 0),
                                        ((boost_down, boost_up, bias_down), plain < 0)):
            terms = [call(xp, w_pos, b)] + ([] if xn is None else [call(xn, w_neg, None)])
            share = mask * grad / stabilize(sum(terms), self.stabilizer)
            outputs += terms
            grads += [share] * len(terms)
        inputs = [xp] + ([] if xn is None else [xn])
        spread = _relevance(outputs, inputs, grads, create_graph)
        return sum(t * s for t, s in zip(inputs, spread))


class ZBox:
    """z^B (DTD for inputs in a box ``low <= x <= high``): ``R_j = sum_k (x_j w_jk - l_j w_jk+ - h_j w_jk-) R_k /
    sum_j (...)``.  ``bounds(x)`` gives ``(low, high)`` broadcastable to ``x``."""

    def __init__(self, bounds: Callable[[Tensor], Tuple[Tensor, Tensor]], stabilizer: float) -> None:
        self.bounds, self.stabilizer = bounds, stabilizer

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        low, high = self.bounds(x)
        local = differentiable(x, create_graph)
        low = low.to(x).expand_as(x).clone().requires_grad_(True)
        high = high.to(x).expand_as(x).clone().requires_grad_(True)
        outputs = [call(local, weight, bias), call(low, weight.clamp(min=0), _positive(bias)),
                   call(high, weight.clamp(max=0), _negative(bias))]
        share = grad / stabilize(outputs[0] - (outputs[1] + outputs[2]), self.stabilizer)
        spread = _relevance(outputs, [local, low, high], [share] * 3, create_graph)
        return local * spread[0] - low * spread[1] - high * spread[2]


class Flat:
    """Flat: ``R_j = sum_k R_k / n_k``, every input of an output's window gets an equal share (weights and inputs
    set to one, no bias)."""

    def __init__(self, stabilizer: float, square: bool = False) -> None:
        self.stabilizer, self.square = stabilizer, square

    def __call__(self, call: LinearCall, x: Tensor, weight: Tensor, bias: Optional[Tensor], grad: Tensor,
                 create_graph: bool) -> Tensor:
        ones = torch.ones_like(x).requires_grad_(True)
        if self.square:
            weight, bias = weight.square(), None if bias is None else bias.square()
        else:
            weight, bias = torch.ones_like(weight), None
        out = call(ones, weight, bias)
        (spread,) = _relevance([out], [ones], [grad / stabilize(out, self.stabilizer)], create_graph)
        return spread


class WSquare(Flat):
    """w^2: ``R_j = sum_k w_jk^2 R_k / (sum_j w_jk^2 + b_k^2)``, independent of the input."""

    def __init__(self, stabilizer: float) -> None:
        super().__init__(stabilizer, square=True)


#: the rules a custom composite may name
RULES = ("epsilon", "zplus", "gamma", "alpha_beta", "flat", "wsquare", "zbox")
#: named composites: (first-layer rule, which calls count as the first layer, convolution rule, dense rule)
COMPOSITES: Dict[str, Tuple[Optional[str], str, str, str]] = {
    "epsilon_plus_flat": ("flat", "linear", "zplus", "epsilon"),
    "epsilon_gamma_box": ("zbox", "conv", "gamma", "epsilon"),
    "epsilon_plus": (None, "linear", "zplus", "epsilon"),
    "epsilon_alpha2_beta1": (None, "linear", "alpha_beta", "epsilon"),
    "epsilon_alpha2_beta1_flat": ("flat", "linear", "alpha_beta", "epsilon"),
    "epsilon": (None, "linear", "epsilon", "epsilon"),
    "zplus": (None, "linear", "zplus", "zplus"),
}
_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)


def _number(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


def _composite(composite: Any) -> Tuple[Optional[str], str, str, str]:
    """(first rule, first kinds, convolution rule, dense rule) of a composite name or mapping."""
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise ValueError(f"unknown composite {composite!r}; choose one of {sorted(COMPOSITES)} or a mapping "
                             f"{{'first': rule or None, 'conv': rule, 'linear': rule}} with rules from {RULES}")
        return COMPOSITES[composite]
    if isinstance(composite, Mapping):
        unknown = set(composite) - {"first", "conv", "linear"}
        if unknown:
            raise ValueError(f"a composite mapping takes the keys 'first', 'conv' and 'linear', got {sorted(unknown)}")
        first = composite.get("first")
        conv, linear = composite.get("conv", "epsilon"), composite.get("linear", "epsilon")
        for key, rule in (("first", first), ("conv", conv), ("linear", linear)):
            if (rule is not None or key != "first") and rule not in RULES:
                raise ValueError(f"unknown rule {rule!r} for {key!r} in the composite; choose one of {RULES}")
        return first, "linear", conv, linear
    raise ValueError(f"composite must be a name from {sorted(COMPOSITES)} or a mapping of rules, got {composite!r}")


def composite_rules(composite: Any, *, eps: float, stabilizer: float, gamma: float, alpha: float, beta: float,
                    bounds: Callable[[Tensor], Tuple[Tensor, Tensor]]) -> Tuple[Dict[str, LinearRule], str, float]:
    """The checked rules of a composite (see :class:`LRP`): ({'conv': rule, 'linear': rule[, 'first': rule]}, which
    calls count as the first layer, the stabiliser).  ``bounds(inputs)`` gives z^B's box for the first layer's
    input."""
    first, first_kinds, conv, linear = _composite(composite)
    eps, stabilizer = _number(eps, "eps", positive=True), _number(stabilizer, "stabilizer", positive=True)
    gamma, alpha, beta = _number(gamma, "gamma"), _number(alpha, "alpha"), _number(beta, "beta")
    if abs(alpha - beta - 1.0) > 1e-9:
        raise ValueError(f"alpha - beta must equal 1 (relevance is conserved), got alpha={alpha}, beta={beta}")
    made = {"epsilon": lambda: Epsilon(eps), "zplus": lambda: AlphaBeta(1.0, 0.0, stabilizer),
            "alpha_beta": lambda: AlphaBeta(alpha, beta, stabilizer), "gamma": lambda: Gamma(gamma, stabilizer),
            "flat": lambda: Flat(stabilizer), "wsquare": lambda: WSquare(stabilizer),
            "zbox": lambda: ZBox(bounds, stabilizer)}
    rules = {"conv": made[conv](), "linear": made[linear]()}
    if first is not None:
        rules["first"] = made[first]()
    return rules, first_kinds, stabilizer


class LRPRules(RuleMode):
    """The forward of one chunk of rows under a composite (see :class:`LRP`)."""

    def __init__(self, rules: Dict[str, LinearRule], first_kinds: str, stabilizer: float) -> None:
        self.rules, self.first_kinds, self.first_done = rules, first_kinds, rules.get("first") is None
        super().__init__(self._rule_of, Norm(lambda out: stabilize(out, stabilizer)),
                         lambda out: stabilize(out, stabilizer), fold_batch_norm=True, pass_activations=True,
                         pass_norms=True)

    def _rule_of(self, func: Callable[..., Tensor]) -> LinearRule:
        kind = "conv" if func in _CONVOLUTIONS else "linear"
        if not self.first_done and (self.first_kinds == "linear" or kind == "conv"):
            self.first_done = True
            return self.rules["first"]
        return self.rules[kind]


@register("lrp")
class LRP(GradientExplainer):
    """Layer-wise relevance propagation with composite rules, (B, C, H, W) relevance at the input.

    Bach, Binder, Montavon, Klauschen, Mueller & Samek, "On Pixel-Wise Explanations for Non-Linear Classifier
    Decisions by Layer-Wise Relevance Propagation", PLoS ONE 2015; Montavon, Binder, Lapuschkin, Samek & Mueller,
    "Layer-Wise Relevance Propagation: An Overview", in Explainable AI (LNCS 11700), Springer 2019 (the rules and
    composites); Kohlbrenner, Bauer, Nakajima, Binder, Samek & Lapuschkin, "Towards Best Practice in Explaining
    Neural Network Decisions with LRP", IJCNN 2020, arXiv:1910.09840 (composites); rules and composites as in zennit
    (Anders, Neumann, Samek, Mueller & Lapuschkin, arXiv:2106.13200).

    The target's relevance is passed from the output down to the input; each convolution or linear layer
    ``z_k = sum_j x_j w_jk + b_k`` redistributes the relevance ``R_k`` of its outputs by its rule (``s(z) = z +
    eps sign(z)``, ``sign(0) = 1``, zennit's stabiliser):

    * epsilon: ``R_j = x_j sum_k w_jk R_k / s(z_k)`` (``eps``);
    * z+ (alpha=1, beta=0): positive contributions only, ``(x_j w_jk)+ / sum_j (x_j w_jk)+`` (with ``b+``);
    * alpha-beta: ``alpha`` times the positive share minus ``beta`` times the negative share (``alpha - beta = 1``);
    * gamma: weights ``w + gamma w+`` where ``z_k > 0`` (``w + gamma w-`` where ``z_k < 0``, signed inputs as zennit);
    * flat: equal shares over each output's window; w^2: shares ``w_jk^2 / sum_j w_jk^2``;
    * z^B: ``(x_j w_jk - l_j w_jk+ - h_j w_jk-)`` normalised, for inputs in the box ``[low, high]``.

    Average pooling (``avg_pool``, ``adaptive_avg_pool`` and global means ``x.mean(dims)`` over feature dimensions)
    and residual sums ``a + b`` share the relevance in proportion to their inputs (``a R / s(a +
    b)``, zennit's ``Norm`` rule with its ``ResNetCanonizer``), elementwise activations (ReLU, ReLU6, GELU, ...)
    pass it unchanged (zennit's ``Pass``), max pooling passes it to the arg-max (its gradient), and a batch norm
    (eval mode) whose input is the output of the forward's previous convolution or linear call is folded into that
    layer, the pair's rule applied to ``W s, (b - mean) s + beta`` with ``s = gamma / sqrt(var + eps)`` (zennit's
    ``SequentialMergeBatchNorm``); a batch norm after anything else passes the relevance unchanged (zennit's rule for
    batch norms it does not merge), and so do layer and group norms (ConvNeXt's).  Other operations (transposed
    convolutions, products of activations, attention: AttnLRP has rules for transformers) keep their plain
    gradient.

    ``composite`` (which rule where, zennit's composites; the "first layer" is the forward's first convolution or
    linear call, its first convolution for ``epsilon_gamma_box``):

    * ``'epsilon_plus_flat'`` (default): flat on the first layer, z+ on other convolutions, epsilon on dense layers:
      the layer-type composite Kohlbrenner et al. found to localise best and be most class-discriminative
      (epsilon on dense layers, alpha1-beta0 = z+ on convolutions, flat on the input layer), and the one of the two
      recommended CNN composites that needs no bounds of the input domain;
    * ``'epsilon_gamma_box'``: z^B on the first convolution, gamma on the others, epsilon on dense layers (Montavon
      et al. 2019's layer-wise recipe: gamma on lower layers, z^B at the pixels);
    * ``'epsilon_plus'``, ``'epsilon_alpha2_beta1'``, ``'epsilon_alpha2_beta1_flat'``: z+ or alpha-beta on
      convolutions, epsilon on dense layers (and flat on the first layer);
    * ``'zplus'``: z+ (alpha1-beta0) on every convolution and dense layer (Relevance-CAM's rule);
    * ``'epsilon'``: epsilon everywhere (LRP-epsilon of Bach et al.; with a small ``eps`` on a bias-free ReLU network
      it is gradient x input divided by the target's score);
    * a mapping ``{'first': rule or None, 'conv': rule, 'linear': rule}`` of the rules ``'epsilon'``, ``'zplus'``,
      ``'gamma'``, ``'alpha_beta'``, ``'flat'``, ``'wsquare'``, ``'zbox'``.

    Options and defaults (zennit's): ``eps=1e-6`` (the epsilon rule's), ``stabilizer=1e-6`` (the other rules',
    pooling's and sums'), ``gamma=0.25``, ``alpha=2, beta=1`` (the alpha-beta rule's), ``low``/``high`` (z^B's box:
    a number or a tensor broadcastable to the first layer's input, e.g. (1, C, 1, 1) per channel, or (B, C, H, W)
    per image; zennit requires them, here ``None``, the default, takes each image's minimum and maximum over
    the first layer's input).

    Start relevance: the gradient of the explained score w.r.t. the model's outputs, i.e. the one-hot of the target
    class for ``score='logit'`` (zennit's ``Gradient`` attributor with a one-hot ``attr_output``): a conserving
    composite on a bias-free network gives maps that sum to 1, not to the logit.  Captum's ``LRP`` starts from the
    logit's value instead: its maps are these times ``f_t(x)``.

    Deliberate differences from zennit: no canonizer or hook changes the model (zennit merges batch norms into the
    weights and swaps ResNet blocks' forward while it runs); batch norms are folded, and any sum of two same-shaped
    tensors the forward computed (``x + y``, ``x += y``; never a parameter or buffer such as a position embedding)
    is shared, wherever the forward's calls show them (zennit needs the module order,
    or its ResNet canonizer, and gives the plain gradient at other sums); functional activations count as well as
    activation modules; the forward is the model's own (zennit leaves a merged batch norm computing ``x / sqrt(1 +
    eps)``, which shifts its maps by about ``eps / 2`` per merged layer).  With ``create_graph`` the map's
    derivative w.r.t. the parameters is the true one (zennit's hooks must be made inactive for that, and its rules
    use detached parameters).  Cost: one forward and one backward, in which every convolution or linear layer runs
    its rule's one to five modified forwards and their vector-Jacobian products.
    """

    argmax_on_rows = True
    plain_after_rules = True
    defaults = {"composite": "epsilon_plus_flat", "eps": 1e-6, "stabilizer": 1e-6, "gamma": 0.25, "alpha": 2.0,
                "beta": 1.0, "low": None, "high": None}

    def _explain(self, x: Tensor, target: Target, *, composite: Any, eps: float, stabilizer: float, gamma: float,
                 alpha: float, beta: float, low: Bound, high: Bound, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        low, high = bound_option(low, "low"), bound_option(high, "high")
        if isinstance(low, float) and isinstance(high, float) and low > high:
            raise ValueError(f"low must not exceed high, got low={low}, high={high}")
        self._owners: Optional[Tensor] = None
        self._mode: Optional[LRPRules] = None

        def bounds(inputs: Tensor) -> Tuple[Tensor, Tensor]:
            return self._box(inputs, low, x.shape[0], torch.amin), self._box(inputs, high, x.shape[0], torch.amax)

        rules, first_kinds, stabilizer = composite_rules(composite, eps=eps, stabilizer=stabilizer, gamma=gamma,
                                                         alpha=alpha, beta=beta, bounds=bounds)
        self._mode_args = (rules, first_kinds, stabilizer)

        def points(owners: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:
            self._owners = owners  # the rows' images, for per-image bounds, read during the chunk's backward
            return x[owners], torch.ones((), dtype=x.dtype, device=x.device)

        try:
            return self._integrate(x, target, 1, points, batch_size, create_graph)
        finally:
            for name in ("_mode_args", "_owners", "_mode"):
                self.__dict__.pop(name, None)

    def _backward_rules(self) -> LRPRules:
        self._mode = LRPRules(*self._mode_args)
        return self._mode

    def _box(self, inputs: Tensor, value: Bound, batch: int, reduce: Callable[..., Tensor]) -> Tensor:
        """A bound of z^B for the first layer's ``inputs`` (the rows of the current chunk)."""
        if value is None:  # each row's extreme over the layer's input
            return reduce(inputs.detach(), dim=tuple(range(1, inputs.dim())), keepdim=True)
        if isinstance(value, float):
            return torch.tensor(value, dtype=inputs.dtype, device=inputs.device)
        bound = value.to(device=inputs.device, dtype=inputs.dtype)
        if bound.dim() == inputs.dim() and bound.shape[0] == batch and batch > 1 and self._owners is not None:
            bound = bound[self._owners.to(bound.device)]
        try:
            torch.broadcast_shapes(bound.shape, inputs.shape)
        except RuntimeError:
            raise ValueError(f"a z^B bound of shape {tuple(value.shape)} does not broadcast to the first layer's "
                             f"input of shape {tuple(inputs.shape)}") from None
        return bound
