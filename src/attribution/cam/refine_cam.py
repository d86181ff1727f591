"""RefineCAM: a base CAM at several layers, each scaled to [0, 1] and multiplied."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.layers import LayerSpec
from ..core.registry import MethodSpec, register
from ..core.targets import Target
from .grad_cam_plusplus import GradCAMPlusPlus
from .meta import MetaCAM


@register("refine_cam")
class RefineCAM(MetaCAM):
    """RefineCAM: the product of a base CAM's maps at several layers, each min-max scaled per image.

    Domeniconi, Stramiglio, Lombardi & Salti, "How to Evaluate and Refine your CAM", arXiv:2605.14641, 2026.

    ``map = prod_l N(U(CAM_l))`` over the layers ``target_layer`` (a list; e.g. the last block of every stage,
    ``['layer1', 'layer2', 'layer3', 'layer4']`` for a ResNet), with ``CAM_l`` the ``base_method``'s map at layer
    ``l`` (Grad-CAM++ by default, as pytorch-grad-cam; any CAM class or registry name, whose options RefineCAM
    takes), ``U`` bilinear upsampling to the input and ``N`` min-max scaling to [0, 1] per image: the coarse deep
    maps say where, the shallow ones sharpen the boundaries and their noise is cancelled by the product.  It is the
    base method with ``layer_fusion='product'``.  Output in [0, 1]: the per-layer scaling is part of the method
    (the product of raw maps would be dominated by whichever layer has the largest values).  With a single layer it
    is that layer's map scaled to [0, 1].
    Cost: the base method's for all the layers at once: for a gradient CAM one forward and one gradient to the
    shallowest layer (pytorch-grad-cam runs one forward and a full backward per layer).

    Same map as pytorch-grad-cam's ``RefineCAM`` up to where the scaling happens (it scales each layer's map at the
    layer's resolution before upsampling, here after) and its final min-max scaling of the product (here the
    product stays as it is).
    """

    base_default = GradCAMPlusPlus
    fixed = ("layer_fusion",)

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, base_method: MethodSpec = None,
                 **options: Any) -> None:
        super().__init__(model, target_layer, base_method, **options)
        if "layer_fusion" not in self.base.option_names():
            raise TypeError(f"RefineCAM fuses a base CAM's maps at several layers; {type(self.base).__name__} has "
                            "no target layers to fuse")

    def _explain(self, x: Tensor, target: Target, **options: Any) -> Tensor:
        return self.base._explain(x, target, layer_fusion="product", **options)
