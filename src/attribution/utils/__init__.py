"""Utilities: normalisation and visualisation (seed-compatible names)."""
from .normalize import minmax, normalize_saliency
from .visualize import colorize, overlay, plot_grid, to_heatmap, to_image, visualize_single_saliency

__all__ = [
    "colorize",
    "minmax",
    "normalize_saliency",
    "overlay",
    "plot_grid",
    "to_heatmap",
    "to_image",
    "visualize_single_saliency",
]
