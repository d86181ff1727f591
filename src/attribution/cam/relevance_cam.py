"""Relevance-CAM: channel weights from layer-wise relevance propagation instead of gradients."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..core.targets import Target
from ..core.registry import register
from ..gradients.lrp import LRPRules, composite_rules
from .base import CAM


def contrastive_target(target: Target) -> Target:
    """CLRP's contrast as a target: the explained score minus the mean of the other classes' scores,
    ``s_t - sum_{c != t} s_c / K`` (target ``None``: each row's own arg-max, the images' for a CAM's rows)."""
    if target.objective is not None:
        raise ValueError("Relevance-CAM's contrast (CLRP: the target against every other class) needs class indices "
                         "as the target, not a callable; pass contrastive=False to explain a callable's score")
    own_score = Target(target.batch, "logit", classes=target.classes)  # on scores already made: checks the range

    def contrast(scores: Tensor, owners: Tensor) -> Tensor:
        own = own_score(scores, owners)
        return own - (scores.sum(dim=1) - own) / scores.shape[1]

    return Target(target.batch, target.score, objective=contrast)


@register("relevance_cam")
class RelevanceCAM(CAM):
    """Relevance-CAM: each channel weighted by the LRP relevance it receives from the target.

    Lee, Kim, Park, Eo & Hwang, "Relevance-CAM: Your Model Already Knows Where to Look", CVPR 2021.

    ``L = ReLU(sum_k a_k A_k)`` with ``a_k = sum_ij R_k(i, j)``, the relevance of the layer's channel ``k``
    propagated from the output by LRP (:class:`attribution.gradients.lrp.LRP`'s rules, whose backward carries the
    relevance itself; it stops at the layer).  The start relevance is the authors' CLRP contrast
    (``contrastive=True``, Gu, Yang & Tresp, ACCV 2018): the one-hot of the target minus ``1/K`` on every other class,
    i.e. the relevance of ``s_t - sum_{c != t} s_c / K`` (``K`` classes), so that what all classes share cancels
    out; ``contrastive=False`` starts from the explained score alone.  ``composite`` as LRP's; the default
    ``'zplus'`` is the authors' rule (alpha1-beta0 on every convolution and dense layer; batch norms after a
    convolution folded into it).  Because relevance is not shattered the way gradients are, the weights stay
    meaningful at intermediate layers, the paper's point: pass an early ``target_layer`` to see them.

    Deliberate differences from the authors' code: their rules put the whole bias (not its positive part) in the
    z+ denominators of convolutions and none in dense layers' and divide batch norm weights by
    ``sqrt(var^2 + eps)``; here zennit's rules (see :class:`~attribution.gradients.lrp.LRP`) apply to any model
    without rewriting it.  The map is rectified as Grad-CAM's (the authors' script draws it before the ReLU).
    Cost: one forward and one relevance backward down to the layer.
    """

    needs_class_indices = True  # the contrast (the default) reads the other classes' scores
    defaults = {**CAM.defaults, "composite": "zplus", "contrastive": True, "eps": 1e-6, "stabilizer": 1e-6,
                "gamma": 0.25, "alpha": 2.0, "beta": 1.0}

    def _explain(self, x: Tensor, target: Target, *, composite: Any, contrastive: bool, eps: float,
                 stabilizer: float, gamma: float, alpha: float, beta: float, batch_size: Optional[int],
                 create_graph: bool, **options: Any) -> Tensor:
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be a bool, got {contrastive!r}")

        def extremes(inputs: Tensor):  # z^B's default box, should the composite's first layer come after the layer
            dims = tuple(range(1, inputs.dim()))
            return inputs.detach().amin(dim=dims, keepdim=True), inputs.detach().amax(dim=dims, keepdim=True)

        self._rules_args = composite_rules(composite, eps=eps, stabilizer=stabilizer, gamma=gamma, alpha=alpha,
                                           beta=beta, bounds=extremes)
        try:
            return super()._explain(x, contrastive_target(target) if contrastive else target, batch_size=batch_size,
                                    create_graph=create_graph, **options)
        finally:
            for name in ("_rules_args", "_mode"):
                self.__dict__.pop(name, None)

    def _forward(self, rows: Tensor) -> Tensor:
        """During a call, every forward records LRP's rules (a fresh mode per forward)."""
        args = self.__dict__.get("_rules_args")
        if args is None:
            return super()._forward(rows)
        self._mode = LRPRules(*args)
        with self._mode:
            return super()._forward(rows)

    def _layer_gradients(self, capture: Any, score: Tensor, create_graph: bool):
        """The relevance at each layer; afterwards the forward's operations differentiate plainly (create_graph)."""
        try:
            return capture.gradients(score, create_graph)
        finally:
            self._mode.state.plain = True

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], **options: Any) -> Tensor:
        return gradients.sum(dim=(2, 3), keepdim=True)  # the rules' backward carries relevance, not gradients
