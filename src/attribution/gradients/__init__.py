"""The gradient family: maps built from input gradients, (B, C, H, W) signed attributions (XRAI: (B, 1, H, W)
region maps grown from Integrated Gradients)."""
from .adapt_grad import AdaptGrad
from .agi import AGI
from .attexplore import AttEXplore
from .attn_lrp import AttnLRP
from .base import GradientExplainer
from .big import BoundaryIG
from .blur_ig import BlurIG
from .crp import CRP
from .deeplift import DeepLift, DeepLiftShap
from .expected import ExpectedGradients
from .forgrad import FORGrad
from .geodesic_ig import GeodesicIG
from .guided_absolute_grad import GuidedAbsoluteGrad
from .guided_backprop import Deconvnet, GuidedBackProp, RectGrad
from .guided_ig import GuidedIG
from .idg import IntegratedDecisionGradients
from .idgi import IDGI
from .ig2 import IG2
from .input_x_gradient import InputXGradient
from .integrated import IntegratedGradients
from .libragrad import LibraGrad
from .local_attribution import LocalAttribution
from .isa import ISA
from .lrp import LRP
from .mfaba import MFABA
from .noise_grad import NoiseGrad
from .smooth_taylor import SmoothTaylor
from .srd import SRD
from .smoothgrad import SmoothGrad
from .vanilla import VanillaGradient
from .xrai import XRAI

__all__ = [
    "AdaptGrad",
    "AGI",
    "AttEXplore",
    "AttnLRP",
    "BlurIG",
    "BoundaryIG",
    "CRP",
    "Deconvnet",
    "DeepLift",
    "DeepLiftShap",
    "ExpectedGradients",
    "GeodesicIG",
    "FORGrad",
    "GradientExplainer",
    "GuidedAbsoluteGrad",
    "GuidedBackProp",
    "GuidedIG",
    "IDGI",
    "IG2",
    "ISA",
    "InputXGradient",
    "IntegratedDecisionGradients",
    "IntegratedGradients",
    "LibraGrad",
    "LocalAttribution",
    "LRP",
    "MFABA",
    "NoiseGrad",
    "RectGrad",
    "SmoothGrad",
    "SmoothTaylor",
    "SRD",
    "VanillaGradient",
    "XRAI",
]
