"""Utilities: normalisation and visualisation (seed-compatible names)."""
from .normalize import magnitude, minmax, normalize_saliency
from .visualize import colorize, overlay, plot_grid, to_heatmap, to_image, visualize_single_saliency

__all__ = [
    "colorize",
    "magnitude",
    "minmax",
    "normalize_saliency",
    "overlay",
    "plot_grid",
    "to_heatmap",
    "to_image",
    "visualize_single_saliency",
]
