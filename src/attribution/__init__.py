"""pytorch-attribution: attribution methods for image classifiers, batched, on the GPU, in torch tensors.

Every method follows one contract (see :mod:`attribution.core.explainer`)::

    saliency = Method(model, **options)(x, target, **options)
"""
from .cam import (
    CAM,
    AblationCAM,
    BagCAM,
    EigenCAM,
    EigenGradCAM,
    FEM,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GroupCAM,
    HiResCAM,
    ISCAM,
    KPCACAM,
    LayerCAM,
    OptiCAM,
    RandomCAM,
    RefineCAM,
    ScoreCAM,
    SESS,
    SSCAM,
    ShapleyCAM,
    ViTCX,
    XGradCAM,
)
from .combine import CombinedWrapper, GuidedGradCAM
from .core import Explainer, create, get_method, list_methods, register
from .gradients import (
    BlurIG,
    Deconvnet,
    GradientExplainer,
    GuidedBackProp,
    GuidedIG,
    IDGI,
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
    VanillaGradient,
)
from .perturbation import RISE, Occlusion
from .transformers import AttentionRollout, GenericAttention
from . import metrics, utils  # sub-packages, reachable as attribution.metrics and attribution.utils

__version__ = "0.1.0"

__all__ = [
    "AblationCAM",
    "AttentionRollout",
    "BagCAM",
    "BlurIG",
    "CAM",
    "CombinedWrapper",
    "Deconvnet",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "FEM",
    "FinerCAM",
    "FullGrad",
    "GenericAttention",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GroupCAM",
    "GradientExplainer",
    "GuidedBackProp",
    "GuidedGradCAM",
    "GuidedIG",
    "IDGI",
    "HiResCAM",
    "ISCAM",
    "InputXGradient",
    "IntegratedGradients",
    "KPCACAM",
    "LayerCAM",
    "Occlusion",
    "OptiCAM",
    "RandomCAM",
    "RefineCAM",
    "RISE",
    "SESS",
    "SSCAM",
    "ScoreCAM",
    "ShapleyCAM",
    "SmoothGrad",
    "VanillaGradient",
    "ViTCX",
    "XGradCAM",
    "create",
    "get_method",
    "list_methods",
    "metrics",
    "register",
    "utils",
]
