"""RISE: randomised input sampling."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator
from ..core.registry import register
from ..core.resize import linear_reflect_matrix
from ..core.targets import Target


class MaskDraws:
    """The random part of ``n`` RISE masks: binary ``grid`` x ``grid`` cells kept with probability ``p`` and one
    shift per mask, drawn once per call; masks are made from them a few at a time (all ``n`` at full size would
    hold ``n * H * W`` values: 1.2 GB at the defaults and 224x224)."""

    def __init__(self, n: int, grid: int, p: float, size: Tuple[int, int], device: torch.device,
                 generator: Optional[torch.Generator] = None) -> None:
        height, width = size
        self.n, self.grid, self.p, self.size = n, grid, p, size
        self.cell = (-(-height // grid), -(-width // grid))  # ceil(H / s), ceil(W / s)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        self.cells = torch.rand((n, 1, grid, grid), generator=generator, device=gen_device) < p
        self.shifts = torch.stack([torch.randint(0, c, (n,), generator=generator, device=gen_device)
                                   for c in self.cell], dim=1)
        self.cells, self.shifts = self.cells.to(device), self.shifts.to(device)
        # scikit-image's linear resize with reflected edges along each axis, (grid + 1) * cell by grid, float64
        self.upsample = tuple(linear_reflect_matrix((grid + 1) * c, grid) for c in self.cell)

    def masks(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """Masks ``start:stop`` as (n, H, W) values in [0, 1]: the cells upsampled to ``(grid + 1) * cell`` pixels
        a side (scikit-image's ``resize(order=1, mode='reflect', anti_aliasing=False)``, as the authors' code) and
        cropped to the image at the mask's shift; only the rows and columns of the crop are computed, as
        ``R[rows] @ cells @ C[cols].T`` with ``R``, ``C`` the resize's matrices."""
        (height, width), device = self.size, self.cells.device
        rows_up, cols_up = (m.to(device=device, dtype=dtype) for m in self.upsample)
        shifts = self.shifts[start:stop]
        rows = rows_up[shifts[:, :1] + torch.arange(height, device=device)]  # (n, H, grid)
        cols = cols_up[shifts[:, 1:] + torch.arange(width, device=device)]  # (n, W, grid)
        return rows @ self.cells[start:stop, 0].to(dtype) @ cols.transpose(1, 2)


@register("rise")
class RISE(Explainer):
    """RISE: the average of random smooth masks, each weighted by the target's score on the image it reveals.

    Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018,
    arXiv:1806.07421.

    ``A(p) = 1 / (N * p1) * sum_i f_t(x * M_i) * M_i(p)``: the Monte-Carlo estimate of ``E[f_t(x * M) | M(p) = 1]``
    (up to the smooth masks' non-binary values).  Each mask is a ``grid`` x ``grid`` binary grid whose cells are
    kept with probability ``p1``, upsampled bilinearly to ``(grid + 1) * ceil(H / grid)`` pixels with reflected
    edges and cropped at a random shift of less than one cell, as the authors' code (``generate_masks``:
    scikit-image ``resize(order=1, mode='reflect', anti_aliasing=False)``).  Defaults from the authors' code:
    ``n_masks=6000``, ``grid=8``, ``p1=0.1``, scores the target's softmax probability (pass ``score='logit'`` for
    logits).  The same masks serve every image of a call; ``generator`` makes them
    reproducible.  Masked copies run ``batch_size`` at a time, without autograd unless ``create_graph=True``.
    Returns (B, 1, H, W).  Cost: ``n_masks`` forwards per image, no backward.
    """

    kind = "perturbation"
    defaults = {"score": "softmax", "n_masks": 6000, "grid": 8, "p1": 0.1, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, n_masks: int, grid: int, p1: float,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        for name, value in (("n_masks", n_masks), ("grid", grid)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(p1, bool) or not isinstance(p1, (int, float)) or not 0 < p1 <= 1:
            raise ValueError(f"p1 must be a probability in (0, 1], got {p1!r}")
        generator = optional_generator(generator)
        batch, _, height, width = x.shape
        draws = MaskDraws(n_masks, grid, float(p1), (height, width), x.device, generator)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        total = torch.zeros(batch, height * width, dtype=dtype, device=x.device)
        with torch.set_grad_enabled(create_graph):
            # rows are mask-major (row r: mask r // B on image r % B), so a pass builds each of its masks once
            for start, stop in RowPlanner(batch * n_masks, batch_size, x.device):
                first, last = start // batch, (stop - 1) // batch + 1
                masks = draws.masks(first, last, x.dtype)
                index = torch.arange(start, stop, device=x.device)
                image, chosen = index % batch, masks[index // batch - first]
                scores = target(self._forward(x[image] * chosen.unsqueeze(1)), image).to(dtype)
                weighted = scores[:, None] * chosen.flatten(1).to(dtype)
                total = total.index_add(0, image, weighted) if create_graph else total.index_add_(0, image, weighted)
        return (total / (n_masks * p1)).view(batch, 1, height, width)
