"""Visualisation with matplotlib colormaps (no OpenCV): single maps, overlays, and a grid of methods."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .normalize import magnitude, normalize_saliency


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def to_heatmap(saliency_map: Tensor, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One map (1, C, H, W), (C, H, W) or (H, W) to an (H, W) float array in [0, 1] (``normalize_saliency``:
    channel max, ReLU, min-max), resized bilinearly."""
    m = saliency_map.detach()
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[0] != 1:
        raise ValueError(f"expected a single map, got a batch of {m.shape[0]}; index one, e.g. maps[0:1]")
    m = normalize_saliency(m.float())  # raw maps (CAMs are not normalised) span the colormap; idempotent on [0, 1]
    if size is not None and tuple(size) != tuple(m.shape[-2:]):
        m = F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)
    return m[0, 0].cpu().numpy()


def colorize(saliency_map: Tensor, size: Optional[Tuple[int, int]] = None, cmap: str = "jet") -> np.ndarray:
    """A map as an (H, W, 3) RGB float array through a matplotlib colormap."""
    return _colormap(cmap)(to_heatmap(saliency_map, size))[..., :3]


def to_image(image: Tensor | np.ndarray, mean: Optional[Sequence[float]] = None,
             std: Optional[Sequence[float]] = None) -> np.ndarray:
    """An image tensor (C, H, W) or (1, C, H, W), optionally un-normalised with ``mean``/``std``, as (H, W, 3)."""
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        return arr / 255.0 if arr.max() > 1.0 else arr
    img = image.detach().float().cpu()
    if img.dim() == 4:
        img = img[0]
    if mean is not None and std is not None:
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def overlay(image: Tensor | np.ndarray, saliency_map: Tensor, alpha: float = 0.5, cmap: str = "jet",
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> np.ndarray:
    """Blend a colorised map over an image: ``(1 - alpha) * image + alpha * heatmap``, (H, W, 3) in [0, 1]."""
    rgb = to_image(image, mean, std)
    heat = colorize(saliency_map, rgb.shape[:2], cmap)
    return (1 - alpha) * rgb + alpha * heat


def visualize_single_saliency(saliency_map: Tensor, img_size: Optional[Tuple[int, int]] = None,
                              cmap: str = "jet", ax=None):
    """Seed-compatible: show one map (1, C, H, W) as a heatmap on the current (or given) matplotlib axes."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    ax.imshow(colorize(saliency_map, img_size, cmap))
    ax.axis("off")
    return ax


def plot_grid(images: Tensor, maps: Mapping[str, Tensor], mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None, alpha: float = 0.5, cmap: str = "jet",
              titles: Optional[Sequence[str]] = None, cell: float = 2.4, rows: str = "images"):
    """A figure of every method's map for every image.

    ``maps`` maps a method name to its maps for the B ``images``: (B, 1, H, W) maps (CAMs, perturbation) are
    overlaid on the image with ``cmap``; (B, C, H, W) gradient maps are shown on their own as magnitudes
    (:func:`attribution.utils.normalize.magnitude`: |A| summed over channels, clipped at the 99th percentile).
    ``rows='images'``: one row per image, the image first, then a column per method; ``rows='methods'``: the
    images in the first row, then a row per method (better for wide images or many methods).
    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if rows not in ("images", "methods"):
        raise ValueError(f"rows must be 'images' or 'methods', got {rows!r}")
    batch = images.shape[0]
    panels = 1 + len(maps)
    aspect = images.shape[-1] / images.shape[-2]
    shape = (batch, panels) if rows == "images" else (panels, batch)
    fig, axes = plt.subplots(*shape, figsize=(cell * shape[1] * aspect, cell * shape[0]), squeeze=False)
    grid = axes if rows == "images" else axes.T  # grid[image, panel]
    for i in range(batch):
        grid[i, 0].imshow(to_image(images[i], mean, std))
        grid[i, 0].set_title(titles[i] if titles else "input", fontsize=9)
        for j, (name, m) in enumerate(maps.items(), start=1):
            single = m[i:i + 1]
            if single.shape[1] > 1:
                grid[i, j].imshow(magnitude(single)[0, 0].cpu().numpy(), cmap="inferno", vmin=0, vmax=1)
            else:
                grid[i, j].imshow(overlay(images[i], single, alpha, cmap, mean, std))
            grid[i, j].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
