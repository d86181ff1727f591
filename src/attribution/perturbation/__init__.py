"""Perturbation methods: maps from forwards of perturbed copies, (B, 1, H, W)."""
from .extremal import ExtremalPerturbation
from .kernel_shap import KernelSHAP
from .lime import LIME
from .occlusion import Occlusion
from .rise import RISE

__all__ = ["ExtremalPerturbation", "KernelSHAP", "LIME", "Occlusion", "RISE"]
