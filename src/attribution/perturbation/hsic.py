"""HSIC attribution: the dependence between each cell of random binary masks and the target's score."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator
from ..core.registry import register
from ..core.targets import Target
from ..core.resize import bicubic_resize

#: the estimator builds (images, n, n) output Gram matrices a block of images at a time, this many entries a block
MAX_GRAM_ENTRIES = 1 << 22


def latin_hypercube(n: int, dimensions: int, generator: Optional[torch.Generator] = None,
                    device: Optional[torch.device] = None) -> Tensor:
    """``n`` points of a random Latin hypercube in ``[0, 1)^dimensions``, (n, dimensions) float64.

    In every dimension the points fall one in each of the ``n`` strata ``[k / n, (k + 1) / n)``: a random
    permutation of the strata plus a uniform jitter inside each (as ``scipy.stats.qmc.LatinHypercube``, drawn with
    torch's generator).  Dimensions are independent of each other.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    strata = torch.rand((dimensions, n), generator=generator, device=gen_device, dtype=torch.float64).argsort(dim=1)
    jitter = torch.rand((dimensions, n), generator=generator, device=gen_device, dtype=torch.float64)
    points = ((strata + jitter) / n).T
    return points if device is None else points.to(device)


def binary_hsic(designs: Tensor, scores: Tensor) -> Tensor:
    """HSIC estimates between every design variable and the scores, for several score vectors at once.

    ``designs`` (n, d) holds n samples of d variables (the binary mask cells), ``scores`` (B, n) n samples of B
    outputs; returns (B, d): ``tr(K H L H) / n`` per variable and output, as Xplique's ``BinaryEstimator`` with
    ``H = I - 1 1^T / n``, the input kernel ``K_ij = 1 + (1/2 - (x_i - x_j)^2)`` (the paper's kernel for binary
    variables, 1.5 for equal values and 0.5 for different ones) and the output kernel
    ``L_ij = exp(-(y_i - y_j)^2 / (2 w^2))`` with ``w`` the median of the scores (linear interpolation).

    Since ``(x_i - x_j)^2 = x_i^2 + x_j^2 - 2 x_i x_j``, ``H K H = 2 x~ x~^T`` with ``x~ = x - mean(x)``, so the trace
    is ``2 x~^T L x~``: one (n, n) x (n, d) product per output instead of d (n, n) kernel matrices (this holds for
    any real design values).  A zero median (where the reference divides by zero) takes the smallest positive
    normal width, the kernel's limit: 1 between equal scores, 0 between different ones.
    """
    if designs.dim() != 2 or scores.dim() != 2 or designs.shape[0] != scores.shape[1]:
        raise ValueError(f"designs must be (n, d) and scores (B, n); got {tuple(designs.shape)} and "
                         f"{tuple(scores.shape)}")
    n = scores.shape[1]
    width = torch.quantile(scores, 0.5, dim=1, keepdim=True)  # (B, 1)
    width2 = (width * width).clamp_min(torch.finfo(scores.dtype).tiny)
    gram = torch.exp(-(scores[:, :, None] - scores[:, None, :]).square() / (2 * width2[:, :, None]))  # (B, n, n)
    centred = (designs - designs.mean(dim=0)).to(scores.dtype)  # (n, d)
    return 2 * ((gram @ centred) * centred).sum(dim=1) / n


@register("hsic")
class HSICAttribution(Explainer):
    """HSIC attribution: how strongly the target's score depends on each cell of random binary masks.

    Novello, Fel & Vigouroux, "Making Sense of Dependence: Efficient Black-box Explanations Using Dependence
    Measure", NeurIPS 2022, arXiv:2206.06219.

    ``n`` = ``n_designs`` binary masks ``X`` on a ``grid`` x ``grid`` grid are drawn once per call (a Latin
    hypercube in ``[0, 1)^(grid^2)`` rounded to {0, 1}: every cell is kept in half of the masks, exactly n / 2 for
    even n), upsampled by nearest neighbour and applied as ``x * M`` (Xplique's 'inpainting' perturbation, a zero
    baseline); ``y_i`` is the target's score on the i-th masked image.  Each cell ``c`` gets
    ``HSIC(X_c, y) = tr(K_c H L H) / n`` with ``H = I - 1 1^T / n``, ``K_c[i, j] = 1 + (1/2 - (X_ic - X_jc)^2)`` and
    ``L[i, j] = exp(-(y_i - y_j)^2 / (2 w^2))``, ``w`` the median of the ``y`` (Xplique's ``BinaryEstimator``, whose
    code divides by ``n`` where its documentation writes ``(n - 1)^2``, a constant factor), computed as
    ``2 x~^T L x~ / n`` with ``x~`` the centred cell (see :func:`binary_hsic`).  The grid of estimates (all >= 0) is
    resized bicubically to the image (TensorFlow's Keys kernel, as Xplique; it may undershoot 0 slightly next to
    strong cells).

    Defaults from Xplique's ``HsicAttributionMethod``: ``grid=8`` (its ``grid_size``), ``n_designs=500`` (its
    ``nb_design``; the paper reports 7 x 7 grids with 1500 forwards, and 750 as a cheaper setting), nearest mask
    upsampling, bicubic map upsampling; the score is the raw logit (``score='logit'``: Xplique explains the model's
    output, the authors' example strips the softmax).  The same masks serve every image of a call; ``generator``
    makes them reproducible.  Masked copies run ``batch_size`` at a time, without autograd unless
    ``create_graph=True`` (the map is then differentiable, the median bandwidth included).  Returns (B, 1, H, W).
    Cost: ``n_designs`` forwards per image, no backward; the estimator builds the (n, n) output kernel of a few
    images at a time (:data:`MAX_GRAM_ENTRIES` entries).

    Deliberate differences: the masks come from a Latin hypercube, as in the paper and Xplique's recommended
    setting, not from Xplique's default unscrambled Sobol sequence (chosen there only because its Latin
    hypercube needs scipy >= 1.7), and are drawn with torch rather than scipy; the estimator runs in float64
    (Xplique: float32); a zero median bandwidth falls back to the kernel's limit instead of dividing by zero; the
    bicubic weights are exact rather than read from TensorFlow's 1024-entry table (differences of order 1e-3 of
    the map's range).
    """

    kind = "perturbation"
    defaults = {"grid": 8, "n_designs": 500, "generator": None}

    def _explain(self, x: Tensor, target: Target, *, grid: int, n_designs: int,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        batch, _, height, width = x.shape
        self._check_options(grid, n_designs, generator, (height, width))
        dtype = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        designs = latin_hypercube(n_designs, grid * grid, generator).round().to(x.device, dtype)  # (n, d) 0/1
        cells = designs.to(x.dtype).view(n_designs, 1, grid, grid)
        scores = []
        with torch.set_grad_enabled(create_graph):
            # rows are design-major (row r: design r // B on image r % B), so a pass builds each of its masks once
            for start, stop in RowPlanner(batch * n_designs, batch_size, x.device):
                first, last = start // batch, (stop - 1) // batch + 1
                masks = F.interpolate(cells[first:last], size=(height, width), mode="nearest-exact")  # (k, 1, H, W)
                index = torch.arange(start, stop, device=x.device)
                image = index % batch
                scores.append(target(self._forward(x[image] * masks[index // batch - first]), image))
            outputs = torch.cat(scores).to(dtype).view(n_designs, batch).T  # (B, n)
            block = max(1, MAX_GRAM_ENTRIES // (n_designs * n_designs))
            hsic = torch.cat([binary_hsic(designs, outputs[a:a + block])
                              for a in range(0, batch, block)])  # (B, d)
            return bicubic_resize(hsic.view(batch, 1, grid, grid), (height, width))

    @staticmethod
    def _check_options(grid: int, n_designs: int, generator: Optional[torch.Generator],
                       size: Tuple[int, int]) -> None:
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        if grid > min(size):
            raise ValueError(f"grid must not exceed the image's height and width {size}, got {grid}")
        if isinstance(n_designs, bool) or not isinstance(n_designs, int) or n_designs < 2:
            raise ValueError(f"n_designs must be an int >= 2, got {n_designs!r}")
        optional_generator(generator)
