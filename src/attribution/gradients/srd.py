"""SRD, sharing ratio decomposition: the target's relevance at a layer, decomposed pointwise feature vector by pointwise
feature vector down to the pixels.

Start.  At ``target_layer`` each PFV gets ``R_j = <A_j, dy_t/dA_j>``, the head's plain gradient times the activation
(on a global-average-pooling + linear head, the PFV's contribution to the target's logit, as the authors' ResNet code
takes it; their VGG code takes Grad-CAM's map), and with ``contrastive`` the mean over the layer's positions is
subtracted (the authors' default ``contrastive_rule = x - x.mean()``).  The map is the relevance of the input's PFVs,
the pixels, (B, 1, H, W).

The method in four modules: :mod:`~attribution.gradients.srd_graph` (the affine blocks between layers and their
replay path by path: how a pre-activation decomposes into contributions), :mod:`~attribution.gradients.srd_point`
(the sharing ratios, applied as the backward of each layer), :mod:`~attribution.gradients.srd_rules` (the function
mode that records a forward) and this one (the default target layer and the explainer :class:`SRD`).
"""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..core.layers import LayerSpec, default_layer, is_feature_layer, resolve_layers
from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer
from .srd_rules import SRDRules


def srd_default_layer(model: nn.Module, x: Tensor) -> str:
    """The library's default CAM layer (:func:`~attribution.core.layers.default_layer`), stepping back over the
    pooling and dropout a ``Sequential`` ends with: torchvision's VGG gets ``features.29`` (conv5_3's ReLU, the
    paper's VGG16 layer) instead of ``features`` (pool5), its ResNets ``layer4`` (the avgpool's input, the paper's
    ResNet-50 layer)."""
    name = default_layer(model, x)
    module = dict(model.named_modules())[name]
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        kept = len(children)
        while kept > 0 and not is_feature_layer(children[kept - 1][1]):
            kept -= 1
        if 0 < kept < len(children):
            name = f"{name}.{children[kept - 1][0]}"
    return name


@register("srd")
class SRD(GradientExplainer):
    """SRD (sharing ratio decomposition): the target's relevance at a layer, decomposed PFV by PFV to the pixels.

    Han, Kim & Kwak, "Respect the model: Fine-grained and Robust Explanation with Sharing Ratio Decomposition",
    ICLR 2024, arXiv:2402.03348; checked against the authors' code (github.com/Sangyu-Han/SharingRatioDecomposition,
    ``util.py``'s ``cal_simmap_*`` and ``modules/``).

    A pointwise feature vector (PFV) is a feature map's channel vector at one position; the layers are the outputs of
    elementwise activations and the input.  A PFV ``z_j`` of the pre-activation of a layer is the sum of contributions
    ``c`` of PFVs ``v_i`` of the layers below, one per path through the affine block between (convolution offsets,
    max- or average-pooling offsets, residual branches), plus biases; the *sharing ratio* of a contribution is
    ``mu = <c + b_j |c| / sum_c' |c'|, z_j> / |z_j|^2`` (the bias of its branch shared in proportion to the
    contributions' norms, so the ratios of ``z_j`` sum to 1), and ``R_i = sum mu R_j`` over ``v_i``'s contributions.
    Inactive neurons count: ``z_j`` is the pre-activation.  Pooling is part of the block it feeds, not a layer.  At
    ``target_layer`` each PFV starts with ``R_j = <A_j, dy/dA_j>`` (the head's plain gradient; the PFV's contribution to
    the logit on a global-average-pooling + linear head), minus its mean over the layer's positions with ``contrastive``
    (the authors' default ``contrastive_rule``).  The map is the relevance of the input's PFVs, the pixels,
    (B, 1, H, W); it sums to the start's total (0 when contrastive; the logit less the head's bias on such a head
    otherwise) wherever some contribution of each pre-activation PFV is non-zero (relevance is lost only at a ``z_j``
    all of whose contributions are 0, as where a block reads only zero PFVs).  A branch whose contributions are all 0 at
    a position while its bias is not (a residual branch whose last batch norm has a zero weight, as timm's
    ``zero_init_last`` gives, or pruned channels) has its bias shared by every contribution of ``z_j`` instead, in
    proportion to their norms.  Tensors computed from parameters alone in the forward (weight standardisation in
    NF-ResNets and NFNets, ``gain * scale``) are constants of their block, not layers.

    ``target_layer`` (a dotted name or module; ``None``: the library's default CAM layer, stepping back over a
    trailing pooling, see :func:`srd_default_layer`): the paper's experiments use conv5_3 for VGG16 and the average
    pooling's input for ResNet-50, which this default picks on torchvision's models.  A module called several times
    starts at its last call.  Only the target layer's relevance is decomposed: paths around it (a branch beside it)
    add nothing.  ``contrastive`` (default True, the authors' code): the map is signed and sums to 0, positive on
    what speaks for the target more than the layer's average position, negative elsewhere (another object's region);
    measures of ``|map|`` count both, use ``contrastive=False`` for them.  Operations SRD cannot decompose in a block
    below ``target_layer`` (layer or group norms, attention, softmax, products of feature maps such as
    squeeze-and-excitation gates, reshapes) raise a ValueError naming the module; token models are refused so.

    Cost: one forward and one backward in which every block below ``target_layer`` is replayed on its contributions,
    one entry per path (9 per 3x3 convolution, 49 for ResNet's 7x7 stem, 36 for a 2x2 max pooling and a 3x3
    convolution, 81 for ResNet-18/34's stem pooling and a 3x3 convolution): about (paths per block) x (the block's
    replay).  Measured against a forward and input gradient (CPU, one thread): ResNet-50 and VGG16 about 5-7 times
    (128x128, batch 2; ResNet-50 at 224 about 8 times), DenseNet-121 about 72 times (224x224; a concatenation pads
    each input's contributions with zeros to all its channels, which the dense blocks' replays then carry) and
    Xception-41 about 45 times (64x64; each depthwise + pointwise block is 9 paths at the pointwise width).  Memory:
    that many times a block's activations while it is replayed, about 1 GB per image on ResNet-50 at 224x224 (the
    stem's 49 paths at 112x112), about 10 times a plain gradient; mind ``batch_size`` on a CPU.

    Deliberate differences from the authors' code: any architecture made of the operations above, batched (theirs: VGG16
    and ResNet-50, one image at a time); max pooling takes the forward's arg-max (theirs compares values, counting ties
    twice); the batch-norm shift is the exact ``beta - gamma mean / sqrt(var + eps)`` (theirs drops ``eps`` there);
    guarded divisions give 0 where a norm is 0 (theirs add 1e-12, or divide 0 by 0); the bias of a branch with no
    non-zero contribution at a position goes to every contribution of ``z_j`` (theirs: 0 / 0, NaN; their pretrained
    models do not meet the case); the start is ``<A_j, dy/dA_j>`` on every head (theirs on ResNet-50: the same plus the
    head's bias ``b_y`` shared equally over the positions, ``(W_y A_j + b_y) / HW``, which the centring removes, so the
    two starts are equal only with ``contrastive=True``; on VGG16 the clamped Grad-CAM map at conv5_3); a block's own
    bias after a sum of branches is shared by all of them and a concatenation keeps its inputs' branches (the authors'
    models have neither).  The paper's method section could not be read offline: the formulas follow the authors'
    released code.
    """

    kind = "cam"
    argmax_on_rows = True
    plain_after_rules = True
    defaults = {"target_layer": None, "contrastive": True}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        if target_layer is not None:
            options["target_layer"] = target_layer
        super().__init__(model, **options)

    def _target_layer(self, x: Tensor, target_layer: LayerSpec) -> nn.Module:
        if target_layer is not None:
            layers = resolve_layers(self.model, target_layer)
            if len(layers) != 1:
                raise ValueError(f"SRD decomposes from one target_layer, got {len(layers)} layers")
            return layers[0]
        return self._default_module(x, srd_default_layer)

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, contrastive: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if not isinstance(contrastive, bool):
            raise TypeError(f"contrastive must be a bool, got {contrastive!r}")
        self._layer, self._contrastive = self._target_layer(x, target_layer), contrastive
        try:
            total = self._integrate(x, target, 1, lambda owners, _: (x[owners], x[owners]), batch_size, create_graph)
            return total.sum(dim=1, keepdim=True)  # R_i = <x_i, g_i>: the relevance of each pixel's PFV
        finally:
            for name in ("_layer", "_contrastive", "_mode"):
                self.__dict__.pop(name, None)

    def _backward_rules(self) -> SRDRules:
        self._mode = SRDRules(self.model, self._layer, self._contrastive)
        return self._mode
