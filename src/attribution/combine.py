"""Maps that combine a gradient-family map with a CAM: Guided Grad-CAM and the seed's ``CombinedWrapper``."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import Tensor, nn

from .cam.base import CAM
from .cam.grad_cam import GradCAM
from .core.explainer import COMMON_OPTIONS, Explainer
from .core.layers import LayerSpec
from .core.registry import MethodSpec, register, resolve_method
from .core.targets import Target
from .gradients.base import GradientExplainer
from .gradients.guided_backprop import GuidedBackProp
from .gradients.vanilla import VanillaGradient
from .utils.normalize import normalize_saliency


@register("guided_grad_cam")
class GuidedGradCAM(Explainer):
    """Guided Grad-CAM: guided backpropagation times the (upsampled) Grad-CAM map.

    Selvaraju, Cogswell, Das, Vedantam, Parikh & Batra, "Grad-CAM: Visual Explanations from Deep Networks via
    Gradient-based Localization", ICCV 2017, arXiv:1610.02391 (Section 3.1).

    ``A = GuidedBackProp(x) * GradCAM(x)`` element-wise, the CAM broadcast over colour channels: a signed
    (B, C, H, W) map like the gradient family's, raw (pytorch-grad-cam's example normalises both first).
    Options: the CAM's (``target_layer``, ``reshape_transform``, ``layer_fusion``).  Cost: the two methods', one
    forward and one backward each.
    """

    kind = "gradient"
    argmax_on_rows = True
    defaults = dict(CAM.defaults)

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        if target_layer is not None:
            options["target_layer"] = target_layer
        super().__init__(model, **options)
        self.guided = GuidedBackProp(model)
        self.cam = GradCAM(model)

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool,
                 **cam_options: Any) -> Tensor:
        guided = self.guided._explain(x, target, batch_size=batch_size, create_graph=create_graph)
        cam = self.cam._explain(x, target, batch_size=batch_size, create_graph=create_graph, **cam_options)
        return guided * cam.to(guided.dtype)


@register("combined")
class CombinedWrapper(Explainer):
    """Any gradient-family map times any CAM, with the seed library's semantics.

    ``map = N(ReLU(N(G(x)) * N(CAM(x))))`` where ``N`` is :func:`attribution.utils.normalize_saliency` (channel
    max, ReLU, per-image min-max to [0, 1]): (B, 1, H, W) in [0, 1].  ``CombinedWrapper(model, BlurIG, GradCAM)``;
    the methods may also be registry names.  Options of either method can be given at construction or per call
    and go to the method that owns them (``combined.get_mask(x, t, target_layer='layer3', steps=100)``: the layer
    to the CAM, the steps to BlurIG); ``batch_size`` and ``create_graph`` go to both, and so does ``score`` when
    given (otherwise each method uses its own default, e.g. Score-CAM's softmax).  An option both methods own
    under the same name is refused as ambiguous.  Cost: the two methods' added.
    """

    kind = "cam"
    argmax_on_rows = False

    def __init__(self, model: nn.Module, gradient_method: MethodSpec = VanillaGradient,
                 cam_method: MethodSpec = GradCAM, **options: Any) -> None:
        self.gradient = resolve_method(gradient_method, GradientExplainer, "gradient_method")(model)
        self.cam = resolve_method(cam_method, CAM, "cam_method")(model)
        own = (self.gradient.option_names() & self.cam.option_names()) - set(COMMON_OPTIONS)
        self._ambiguous = own
        self._explicit: set = set()
        super().__init__(model, **options)

    def option_names(self) -> set:
        return set(COMMON_OPTIONS) | self.gradient.option_names() | self.cam.option_names()

    def resolved_options(self, **options: Any) -> Dict[str, Any]:
        clash = self._ambiguous & (set(self.options) | set(options))
        if clash:
            raise TypeError(f"option(s) {sorted(clash)} belong to both {type(self.gradient).__name__} and "
                            f"{type(self.cam).__name__}; set them on the methods' own explainers instead")
        self._explicit = set(self.options) | set(options)
        return super().resolved_options(**options)

    def _route(self, inner: Explainer, options: Dict[str, Any], target: Target) -> tuple:
        routed = {k: v for k, v in options.items()
                  if k in inner.option_names() and (k in self._explicit or k in ("batch_size", "create_graph"))}
        merged = inner.resolved_options(**routed)
        merged.pop("amp")  # the outer call's autocast and memory format cover the inner methods' passes
        merged.pop("channels_last")
        return target.with_score(merged.pop("score")), merged

    def _explain(self, x: Tensor, target: Target, **options: Any) -> Tensor:
        options["score"] = target.score
        g_target, g_options = self._route(self.gradient, options, target)
        c_target, c_options = self._route(self.cam, options, target)
        gradient = self.gradient._explain(x, g_target, **g_options)
        cam = self.cam._explain(x, c_target, **c_options)
        return normalize_saliency(normalize_saliency(gradient) * normalize_saliency(cam).to(gradient.dtype))
