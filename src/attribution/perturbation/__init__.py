"""Perturbation methods: maps from forwards of perturbed copies, (B, 1, H, W)."""
from .extremal import ExtremalPerturbation
from .hsic import HSICAttribution
from .igos import IGOS, IGOSPlusPlus
from .kernel_shap import KernelSHAP
from .lime import LIME
from .meaningful_perturbation import MeaningfulPerturbation
from .moxi import MoXI
from .hipe import HiPe
from .occlusion import Occlusion
from .partition_shap import PartitionSHAP
from .prediction_difference import PredictionDifference
from .rise import RISE
from .shapley_sampling import ShapleyValueSampling
from .sobol import SobolAttribution

__all__ = ["ExtremalPerturbation", "HiPe", "HSICAttribution", "IGOS", "IGOSPlusPlus", "KernelSHAP", "LIME", "MeaningfulPerturbation", "MoXI", "Occlusion", "PartitionSHAP",
           "PredictionDifference", "RISE", "ShapleyValueSampling", "SobolAttribution"]
