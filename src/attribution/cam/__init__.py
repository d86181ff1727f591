"""Class activation maps: (B, 1, H, W) maps from a layer's activations (see :mod:`attribution.cam.base`)."""
from .ablation_cam import AblationCAM
from .bag_cam import BagCAM
from .base import CAM
from .cameras import CAMERAS
from .decom_cam import DecomCAM, DecomCAMParts
from .cf_cam import CFCAM
from .eigen_cam import EigenCAM, EigenGradCAM, SegEigenCAM
from .excitation_backprop import ExcitationBackprop
from .expected_grad_cam import ExpectedGradCAM
from .fd_cam import FDCAM
from .fem import FEM
from .finer_cam import FinerCAM
from .full_grad import FullGrad
from .fusion_cam import FusionCAM
from .grad_cam import GradCAM
from .grad_cam_elementwise import GradCAMElementWise
from .grad_cam_plusplus import GradCAMPlusPlus
from .group_cam import GroupCAM
from .hires_cam import HiResCAM
from .iba import IBA
from .iia import IIA
from .integrated_grad_cam import IntegratedGradCAM
from .kpca_cam import KPCACAM
from .layer_cam import LayerCAM
from .lift_cam import LIFTCAM
from .meta import MetaCAM
from .norm_grad import NormGrad
from .opti_cam import OptiCAM
from .poly_cam import PolyCAM
from .random_cam import RandomCAM
from .recipro_cam import ReciproCAM
from .relevance_cam import RelevanceCAM
from .rsi_grad_cam import RSIGradCAM
from .refine_cam import RefineCAM
from .score_cam import ISCAM, SSCAM, ScoreCAM
from .shap_cam import ShapCAM
from .sess import SESS
from .shapley_cam import ShapleyCAM
from .sidu import SIDU
from .sise import SISE
from .smooth_grad_cam_plusplus import SmoothGradCAMPlusPlus
from .vit_cx import ViTCX
from .xgrad_cam import XGradCAM

__all__ = [
    "AblationCAM",
    "BagCAM",
    "CAM",
    "CAMERAS",
    "DecomCAM",
    "DecomCAMParts",
    "EigenCAM",
    "EigenGradCAM",
    "ExcitationBackprop",
    "ExpectedGradCAM",
    "CFCAM",
    "FDCAM",
    "FEM",
    "FinerCAM",
    "FullGrad",
    "FusionCAM",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GroupCAM",
    "HiResCAM",
    "IBA",
    "IIA",
    "ISCAM",
    "IntegratedGradCAM",
    "KPCACAM",
    "LIFTCAM",
    "LayerCAM",
    "MetaCAM",
    "NormGrad",
    "OptiCAM",
    "PolyCAM",
    "RandomCAM",
    "ReciproCAM",
    "RelevanceCAM",
    "RSIGradCAM",
    "RefineCAM",
    "SESS",
    "ShapCAM",
    "SegEigenCAM",
    "SSCAM",
    "ScoreCAM",
    "SIDU",
    "SISE",
    "ShapleyCAM",
    "SmoothGradCAMPlusPlus",
    "ViTCX",
    "XGradCAM",
]
