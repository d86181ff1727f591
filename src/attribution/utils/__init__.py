"""Utilities: normalisation, visualisation and the transformer reshape (seed-compatible names)."""
from .normalize import magnitude, minmax, normalize_saliency
from .reshape import get_reshape_transform
from .visualize import colorize, overlay, plot_grid, to_heatmap, to_image, visualize_single_saliency

__all__ = [
    "colorize",
    "get_reshape_transform",
    "magnitude",
    "minmax",
    "normalize_saliency",
    "overlay",
    "plot_grid",
    "to_heatmap",
    "to_image",
    "visualize_single_saliency",
]
