"""Perturbation methods: maps from forwards of perturbed copies, (B, 1, H, W)."""
from .occlusion import Occlusion
from .rise import RISE

__all__ = ["Occlusion", "RISE"]
