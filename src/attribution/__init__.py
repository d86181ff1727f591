"""pytorch-attribution: attribution methods for image classifiers, batched, on the GPU, in torch tensors.

Every method follows one contract (see :mod:`attribution.core.explainer`)::

    saliency = Method(model, **options)(x, target, **options)
"""
from .core import Explainer, create, get_method, list_methods, register
from .gradients import (
    BlurIG,
    Deconvnet,
    GradientExplainer,
    GuidedBackProp,
    GuidedIG,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    VanillaGradient,
)
from .perturbation import Occlusion
from .transformers import AttentionRollout, GenericAttention

__version__ = "0.1.0"

__all__ = [
    "AttentionRollout",
    "BlurIG",
    "Deconvnet",
    "Explainer",
    "GenericAttention",
    "GradientExplainer",
    "GuidedBackProp",
    "GuidedIG",
    "InputXGradient",
    "IntegratedGradients",
    "Occlusion",
    "SmoothGrad",
    "VanillaGradient",
    "create",
    "get_method",
    "list_methods",
    "register",
]
