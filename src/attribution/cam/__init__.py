"""Class activation maps: (B, 1, H, W) maps from a layer's activations (see :mod:`attribution.cam.base`)."""
from .ablation_cam import AblationCAM
from .bag_cam import BagCAM
from .base import CAM
from .eigen_cam import EigenCAM, EigenGradCAM
from .full_grad import FullGrad
from .grad_cam import GradCAM
from .grad_cam_elementwise import GradCAMElementWise
from .grad_cam_plusplus import GradCAMPlusPlus
from .hires_cam import HiResCAM
from .kpca_cam import KPCACAM
from .layer_cam import LayerCAM
from .score_cam import ISCAM, SSCAM, ScoreCAM
from .xgrad_cam import XGradCAM

__all__ = [
    "AblationCAM",
    "BagCAM",
    "CAM",
    "EigenCAM",
    "EigenGradCAM",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "ISCAM",
    "KPCACAM",
    "LayerCAM",
    "SSCAM",
    "ScoreCAM",
    "XGradCAM",
]
