"""Meta-methods: CAMs computed by running another CAM (``base_method``) on other targets, layers or inputs."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, Tuple, Type

from torch import nn

from ..core.layers import LayerSpec
from ..core.registry import MethodSpec, resolve_method
from .base import CAM


class MetaCAM(CAM):
    """A CAM that runs the CAM ``base_method`` (a class or a registry name; the class's ``base_default`` if None).

    Options: the meta-method's own (``own_defaults``) and every option of the base method except those the
    meta-method sets itself (``fixed``), all given at construction or per call; the base's options go to it.
    """

    base_default: ClassVar[Type[CAM]]
    own_defaults: ClassVar[Dict[str, Any]] = {}
    #: options of the base method that the meta-method sets itself (not options of the meta-method)
    fixed: ClassVar[Tuple[str, ...]] = ()
    #: True when the base method is run on the images themselves (False: on rows derived from them)
    same_rows: ClassVar[bool] = True

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, base_method: MethodSpec = None,
                 **options: Any) -> None:
        base = resolve_method(self.base_default if base_method is None else base_method, CAM, "base_method")
        self.base = base(model)
        merged = {**self.base.defaults, **self.own_defaults}  # a meta base's defaults include its own base's
        self.defaults = {key: value for key, value in merged.items() if key not in self.fixed}
        super().__init__(model, target_layer, **options)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", base_method={type(self.base).__name__})"


def rows_are_images(cam: CAM) -> bool:
    """True when every pass ``cam`` makes is a forward (and gradient) of the images themselves, one row per image,
    so that what a target reads from a row's outputs is what it would read from the image's (the standard
    :meth:`CAM._explain`); False for methods that evaluate masked, ablated or cropped copies."""
    if isinstance(cam, MetaCAM):
        return cam.same_rows and rows_are_images(cam.base)
    return type(cam)._explain is CAM._explain
