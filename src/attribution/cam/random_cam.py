"""RandomCAM: a baseline for the metrics, not an explanation."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..core.registry import register
from .base import CAM


@register("random_cam")
class RandomCAM(CAM):
    """A **baseline**, not an explanation: the layer's activations weighted by random channel weights.

    ``w_k ~ U(-1, 1)``, ``map = ReLU(sum_k w_k A_k)``, as pytorch-grad-cam's ``RandomCAM``.  The target does not
    enter the map.  What it is for: the chance level of a metric (:mod:`attribution.metrics`) for maps that
    share a CAM's resolution and its activations' structure, so that a method's score can be read against it.
    Registered with ``kind = 'baseline'``, so ``list_methods('cam')`` leaves it out.

    ``seed`` (default ``None``): ``None`` draws fresh weights for every image from torch's global generator (as
    pytorch-grad-cam); an int draws one set of C weights per call from a generator seeded with it, shared by every
    image, so that the maps are reproducible and an image's map does not depend on its batch.
    Cost: one forward (no gradient).
    """

    kind = "baseline"
    uses_gradients = False
    defaults = {**CAM.defaults, "seed": None}

    def _weights(self, activations: Tensor, gradients: Optional[Tensor], *, seed: Optional[int],
                 **options: Any) -> Tensor:
        batch, channels = activations.shape[:2]
        if seed is None:
            draws = torch.rand(batch, channels, device=activations.device)
        else:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int or None, got {seed!r}")
            generator = torch.Generator().manual_seed(seed)
            draws = torch.rand(1, channels, generator=generator).to(activations.device).expand(batch, -1)
        return (2 * draws - 1).to(activations.dtype)[:, :, None, None]
