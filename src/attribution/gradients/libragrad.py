"""LibraGrad: gradient methods run with the backward of transformer blocks pruned and rescaled.

While :class:`LibraGradRules` is active around a forward, the forward's values are unchanged and its backward is
LibraGrad's (Mehri et al.), which makes ``input x gradient`` FullGrad-complete on transformers: every operation
``y = h(u_1, ..., u_n)`` of the network satisfies ``y = sum_i u_i * dy/du_i + (bias terms)`` under the modified
derivatives, so that ``f_t(x) = sum x * g + sum_b b * g_b`` over the input and the additive parameters ``b``
(biases, class token, position embedding), ``g`` the modified gradients.  The rules, as the authors' timm fork
writes them (``timm/night/decomposition.py``, gradient brand ``LX1`` with ``DU``), expressed in AttnLRP's machinery
(:class:`~attribution.gradients.attn_lrp.TransformerLRPRules`, variant ``'cp'``):

* layer norm: the standard deviation is held constant (their ``var.detach()``);
* attention: the queries and keys are detached, so the attention probabilities are constants and the gradient
  reaches the tokens through the values only (their ``fair_qkv`` and ``FairMultiheadAttention``); in the fused
  kernel, ``nn.MultiheadAttention`` and explicit ``softmax(q k^T) v`` alike;
* gated activations: the gate is detached, ``d GELU(x) / dx := Phi(x) = GELU(x) / x`` and ``d SiLU(x) / dx :=
  sigmoid(x)`` (their ``GELUDecomposed`` and ``FairSiLU``); here AttnLRP's identity rule ``f(x) / (x + 1e-10)`` on
  every elementwise activation through the origin, the same ratio;
* gated products (SwiGLU and GLU MLPs: two computed tensors of the same shape, neither computed from the other's
  entries, the two halves of one linear layer's output included): the gradient is halved (their ``fair_gated_mlp``
  in mode ``DU``), i.e. each factor gets half, as AttnLRP's uniform rule.

Linear layers, convolutions, residual sums, layer scales and pooling keep their plain gradient.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.registry import register
from ..core.targets import Target
from .attn_lrp import _IDENTITY_RULE, _MULS, _SOFTMAX, TransformerLRPRules, _computed, _gated, _ScaleGradient
from .base import GradientExplainer, WrappingExplainer
from .input_x_gradient import InputXGradient

#: AttnLRP's identity rule's epsilon (LXT's), the only difference from the authors' exact gate ``Phi(x)``
EPS = 1e-10
#: rectifiers, whose detached gate ``[x > 0]`` is their derivative: they keep their plain gradient
_RECTIFIERS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_, F.leaky_relu, F.leaky_relu_}
_ATTENTION = (F.scaled_dot_product_attention, F.multi_head_attention_forward)
class LibraGradRules(TransformerLRPRules):
    """While active, a forward records LibraGrad's backward (see the module docstring): CP-LRP's rules (layer norms
    with constant standard deviation, constant attention probabilities, the identity rule on activations) and
    gated products with their gradient halved; rectifiers (ReLU, LeakyReLU) keep their gradient, which is their
    detached gate.  ``explicit``: fused attention computed as ``softmax(q k^T) v`` (twice differentiable, for
    create_graph).  ``calls`` counts the operations whose backward changed (layer norms,
    attention, gated products, activations other than rectifiers)."""

    def __init__(self, explicit: bool = False) -> None:
        super().__init__("cp", EPS, explicit)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _RECTIFIERS:  # the gate of x * [x > 0] is its derivative: plain (not x * relu(x) / (x + eps))
            return func(*args, **kwargs)
        if func in _MULS and len(args) == 2 and all(_computed(t) for t in args) and _gated(*args):
            self.calls += 1
            return _ScaleGradient.apply(func(*args, **kwargs), 0.5, self.state)
        if self._changes(func, args):
            self.calls += 1
        return super().__torch_function__(func, types, args, kwargs)

    @staticmethod
    def _changes(func: Any, args: tuple) -> bool:
        """Whether the call is one the rules give another backward (as :class:`TransformerLRPRules` decides)."""
        if func is F.layer_norm or func in _ATTENTION:
            return True
        first = args[0] if args else None
        if func in _SOFTMAX:
            return isinstance(first, Tensor) and first.dim() == 4
        return func in _IDENTITY_RULE and _computed(first)

    def after_relevance(self, grad: Tensor) -> None:
        """Tensor hook on the forward's input: once a backward with ``create_graph`` has computed the input's
        gradient, the recorded operations differentiate plainly, so that the map's own derivative (w.r.t. the
        parameters, or the input) is the true one.  Backwards without ``create_graph`` leave the rules on (a method
        may take several gradients of one forward)."""
        if torch.is_grad_enabled():
            self.state.plain = True


class Balanced(nn.Module):
    """``model`` run under :class:`LibraGradRules` (a fresh instance per forward); the model itself is not changed.
    ``explicit`` is passed on to the rules; ``calls`` adds up the rules' counts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.explicit = False
        self.calls = 0

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        rules = LibraGradRules(self.explicit)
        if isinstance(x, Tensor) and x.requires_grad:
            x = x.view_as(x)  # an alias of our own to carry the hook (the caller's tensor stays untouched)
            x.register_hook(rules.after_relevance)
        with rules:
            out = self.model(x, *args, **kwargs)
        self.calls += rules.calls
        return out


@register("libragrad")
class LibraGrad(WrappingExplainer):
    """LibraGrad: a gradient method (default input x gradient) run with LibraGrad's backward through transformers.

    Mehri, Soleymani Baghshah & Pilehvar, "LibraGrad: Balancing Gradient Flow for Universally Better Vision
    Transformer Attributions", CVPR 2025, arXiv:2411.16760.

    ``A = M(x)`` where every input gradient of the wrapped method ``M`` (``method``, a gradient explainer class or
    registry name, default :class:`InputXGradient`: ``A = x * g``) is the gradient ``g`` under the rules of
    :class:`LibraGradRules`: layer norms with constant standard deviation, constant attention probabilities
    (gradient through the values only), gates of GELU / SiLU detached, gated products' gradient halved; the
    forward is unchanged.  With ``score='logit'`` the map is FullGrad-complete: ``f_t(x) = sum A + sum_b b * g_b``
    over the additive parameters ``b`` (biases, class token, position embedding), so a bias-free model's map sums
    to the logit.  Options of the wrapped method pass through (``LibraGrad(model, method='integrated_gradients',
    steps=32)``: LibraGrad + IG).  Methods that change the backward themselves (guided backprop, LRP, DeepLIFT,
    AttnLRP, ...) are refused.  On a model without layer norms, attention, gated units or smooth activations (a
    ReLU CNN) there is nothing to change: the map is the wrapped method's, with a warning.

    Defaults as the authors' ``LibraGrad`` preset (``decompv/x/gbrand.py``): the explained score is the target's
    softmax probability (``score='softmax'``, their ``S1``: the head's softmax keeps its plain gradient; pass
    ``score='logit'`` for the completeness above).  On a ViT without gated MLPs the rules equal CP-LRP's as
    :class:`~attribution.gradients.attn_lrp.AttnLRP` (``variant='cp'``) computes it, so LibraGrad's input x
    gradient is that map for the same score.  Cost: the wrapped method's (the rules add elementwise work only).

    Deliberate differences from the authors' code: the activations' gate is ``f(x) / (x + 1e-10)`` (AttnLRP's
    identity rule) rather than ``Phi(x)`` itself (equal but at exact zeros, where it is 0), and it also covers the
    other activations through the origin (tanh, ELU, ReLU6, Hardswish, ...) that their modules do not; their
    evaluation presets also apply "dissent suppression" to the patch embedding (``DS100``, for every method,
    baselines included), not done here; a GELU written out as a product (QuickGELU, ``x * sigmoid(1.702 x)``)
    keeps its plain gradient (the authors' code refuses it).  Under ``create_graph`` the map's derivative is the
    true one, except for methods that take a ``create_graph`` gradient and then another gradient of the same
    forward (IG2).
    """

    defaults = {"method": InputXGradient, "score": "softmax"}

    def __init__(self, model: nn.Module, method: Any = None, **options: Any) -> None:
        super().__init__(model, method=method, **options)
        inner = self.inner_class
        if issubclass(inner, LibraGrad):
            raise TypeError("LibraGrad's method must be another gradient method, got LibraGrad itself")
        if inner._backward_rules is not GradientExplainer._backward_rules:
            raise TypeError(f"LibraGrad's method {inner.__name__} changes the backward itself (its own rules); "
                            "LibraGrad runs methods built on the model's gradient (input_x_gradient, "
                            "integrated_gradients, smoothgrad, ...)")

    def _inner_model(self, model: nn.Module) -> nn.Module:
        return Balanced(model)

    def _explain(self, x: Tensor, target: Target, *, method: Any = None, **inner: Any) -> Tensor:
        balanced: Balanced = self.inner.model
        options = self._inner_options(inner, inner.get("generator"))
        balanced.explicit = bool(options.get("create_graph")) or self.inner._differentiates_twice()
        balanced.calls = 0
        try:
            maps = self.inner._explain(x, target, **options)
        finally:
            balanced.explicit = False
        if balanced.calls == 0:
            warnings.warn(f"LibraGrad found no layer norm, attention, gated unit or smooth activation in the "
                          f"model's forward pass; its map equals {type(self.inner).__name__}'s", stacklevel=3)
        return maps
