"""Sobol attribution: total-order Sobol indices of the target's score over a grid of real-valued mask cells."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.quasirandom import SobolEngine

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, optional_generator
from ..core.filters import box_blur
from ..core.registry import register
from ..core.targets import Target
from ..core.resize import bicubic_resize

#: the perturbations of the reference: x * M, x * M + (1 - M) * blur(x), x * (M - 0.5) * sigma
PERTURBATIONS = ("inpainting", "blurring", "amplitude")
#: side of the box filter of the 'blurring' perturbation (the reference's ``cv2.blur(x, (10, 10))``)
BLUR_SIZE = 10
#: sigma of the 'amplitude' perturbation (the reference's default)
AMPLITUDE_SIGMA = 1.0
#: floor of the variance of f(A) in the Jansen estimator (the reference's), so a constant score gives 0, not NaN
VARIANCE_FLOOR = 1e-12


def sobol_design(dimension: int, n_designs: int,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """The two independent QMC matrices A and B, (n_designs, dimension) float64 on the CPU.

    Both are halves of the first ``n_designs`` points of one scrambled Sobol sequence of ``2 * dimension``
    dimensions (``torch.quasirandom.SobolEngine``), A the first ``dimension`` coordinates, B the rest, as the
    reference splits its sequence; the scrambling seed is drawn from ``generator`` (the global generator when
    ``None``), so the same generator state gives the same design.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device).item())
    points = SobolEngine(2 * dimension, scramble=True, seed=seed).draw(n_designs, dtype=torch.float64)
    return points[:, :dimension], points[:, dimension:]


class ReplicatedDesign:
    """The rows of the Sobol design whose scores the Jansen estimator reads: the ``N`` rows of A, then for each cell
    ``i`` the ``N`` rows of C_i (A with its column ``i`` taken from B).  Rows are made on demand, a pass's worth at
    a time, and upsampled to full-size masks only then: all ``N * (d + 1)`` masks at once would hold
    ``N * (d + 1) * H * W`` values (104 M, 417 MB in float32, at the defaults and 224 x 224)."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.a, self.b = a, b
        self.n_designs, self.dimension = a.shape
        self.rows = self.n_designs * (self.dimension + 1)

    def cells(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the design, (stop - start, d) values in [0, 1]."""
        n = self.n_designs
        k = torch.arange(start, stop, device=self.a.device)
        in_a = k < n
        point = torch.where(in_a, k, (k - n) % n)  # the row of A (and B) the design row comes from
        swapped = torch.where(in_a, torch.full_like(k, -1), (k - n) // n)  # the column taken from B, -1 for A
        take_b = torch.arange(self.dimension, device=k.device) == swapped[:, None]
        return torch.where(take_b, self.b[point], self.a[point])


def jansen_total_indices(f_a: Tensor, f_c: Tensor) -> Tensor:
    """Jansen's estimator of total-order Sobol indices.

    ``f_a`` (..., N): the scores of the N rows of A; ``f_c`` (..., d, N): the scores of the rows of C_i (A with
    column ``i`` from B).  ``S_Ti = sum_j (f(A_j) - f(C_ij))^2 / (2 N Var(f(A)))``, the variance unbiased (ddof 1)
    and floored at :data:`VARIANCE_FLOOR`, as the reference computes it.  Returns (..., d).
    """
    n = f_a.shape[-1]
    variance = f_a.var(dim=-1, unbiased=True).clamp(min=VARIANCE_FLOOR)
    return (f_a.unsqueeze(-2) - f_c).square().sum(-1) / (2 * n * variance.unsqueeze(-1))


def perturb(rows: Tensor, mask: Tensor, blurred: Optional[Tensor], perturbation: str) -> Tensor:
    """Images ``rows`` (n, C, H, W) perturbed by full-size masks ``mask`` (n, 1, H, W); ``blurred``: the rows'
    :func:`~attribution.core.filters.box_blur` (only for ``'blurring'``)."""
    if perturbation == "inpainting":
        return rows * mask
    if perturbation == "blurring":
        return rows * mask + (1 - mask) * blurred
    return rows * (mask - 0.5) * AMPLITUDE_SIGMA  # the reference's code (its docstring writes x + (M - 0.5) sigma)


@register("sobol")
class SobolAttribution(Explainer):
    """Sobol attribution: how much of the variance of the target's score each image region accounts for, with all
    its interactions, when the regions are dimmed at random.

    Fel, Cadène, Chalvidal, Cord, Vigouroux & Serre, "Look at the Variance! Efficient Black-box Explanations with
    Sobol-based Sensitivity Analysis", NeurIPS 2021, arXiv:2111.04138.

    The image is cut into ``grid`` x ``grid`` cells; a mask gives each cell a value ``M_i`` in [0, 1], upsampled to
    the image by nearest neighbour (half-pixel centres), and the perturbed image is ``x * M``
    (``perturbation='inpainting'``), ``x * M + (1 - M) * blur(x)`` (``'blurring'``, a 10 x 10 box blur as
    ``cv2.blur``) or ``x * (M - 0.5)`` (``'amplitude'``, as the reference's code; its docstring writes
    ``x + (M - 0.5)``).  With ``f(M)`` the target's score on it and the ``M_i`` independent uniform, a cell's value
    is its total-order Sobol index ``S_Ti = E[Var(f | M_~i)] / Var(f)``, estimated with Jansen's estimator on a
    quasi-Monte Carlo design: ``S_Ti = sum_j (f(A_j) - f(C_ij))^2 / (2 N Var(f(A)))`` where A and B are
    ``N = n_designs`` points of a Sobol sequence and C_i is A with its column ``i`` taken from B.  The (grid, grid)
    indices (>= 0, exactly 0 for a cell the score ignores) are resized to (H, W) as Xplique does, with
    TensorFlow's bicubic resize (:func:`attribution.core.resize.bicubic_resize`).

    Defaults from the reference, Xplique's ``SobolAttributionMethod``: ``grid=8`` (its
    ``grid_size``), ``n_designs=32`` (its ``nb_design``: a power of two, as it requires, Sobol points being balanced
    in blocks of 2^k; the authors' own PyTorch code defaults to 64), ``perturbation='inpainting'``, Jansen's
    estimator, A and B from one Sobol sequence of 2 d dimensions; the score is the target's logit (the library's
    default: Xplique explains the model's output and its examples strip the final softmax).

    Deliberate differences from the reference: (1) the Sobol sequence is scrambled (``torch.quasirandom.
    SobolEngine``: linear matrix scrambling and a digital shift, seeded from ``generator``, or from the global
    generator when it is ``None``), where Xplique draws the unscrambled sequence (``tf.math.sobol_sample``; scipy's
    ``Sobol(scramble=False)`` in the authors' PyTorch code), in which many coordinates of the first points
    coincide; the design differs point by point, not in kind (both are (t, m, s)-nets).  (2) The N forwards of B
    are not run: the Jansen estimator never reads them (Xplique runs ``N * (grid^2 + 2)`` forwards, this
    ``N * (grid^2 + 1)``).  (3) The bicubic weights are exact where TensorFlow reads them from a 1024-entry table
    (differences of order 1e-3 of the map's range); older Xplique releases and the authors' code resize with
    OpenCV's ``INTER_CUBIC`` (a = -0.75, edges repeated) instead.  (4) ``n_designs`` must be at least 2 (with 1,
    Var(f(A)) is undefined).

    The same design and masks serve every image of a call.  Perturbed copies run ``batch_size`` at a time, their
    masks made per pass; without autograd unless ``create_graph=True`` (then the map is differentiable w.r.t. the
    model's parameters).  Returns (B, 1, H, W).  Cost: ``n_designs * (grid^2 + 1)`` forwards per image (2080 at
    the defaults), no backward.
    """

    kind = "perturbation"
    defaults = {"grid": 8, "n_designs": 32, "perturbation": "inpainting", "generator": None}

    def _explain(self, x: Tensor, target: Target, *, grid: int, n_designs: int, perturbation: str,
                 generator: Optional[torch.Generator], batch_size: Optional[int], create_graph: bool) -> Tensor:
        batch, _, height, width = x.shape
        self._check(grid, n_designs, perturbation, generator, height, width)
        dimension = grid * grid
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # of the design and the estimator
        design = ReplicatedDesign(*(m.to(device=x.device, dtype=dtype)
                                    for m in sobol_design(dimension, n_designs, generator)))
        blurred = box_blur(x, BLUR_SIZE, BLUR_SIZE) if perturbation == "blurring" else None
        chunks = []
        with torch.set_grad_enabled(create_graph):
            # rows are design-major (row r: design row r // B on image r % B), so a pass builds each mask once
            for start, stop in RowPlanner(batch * design.rows, batch_size, x.device):
                first, last = start // batch, (stop - 1) // batch + 1
                cells = design.cells(first, last).to(x.dtype).view(-1, 1, grid, grid)
                masks = F.interpolate(cells, size=(height, width), mode="nearest-exact")
                index = torch.arange(start, stop, device=x.device)
                image, mask = index % batch, masks[index // batch - first]
                rows = perturb(x[image], mask, None if blurred is None else blurred[image], perturbation)
                chunks.append(target(self._forward(rows), image).to(dtype))
            scores = torch.cat(chunks).view(design.rows, batch).T  # (B, N * (d + 1)): A's rows, then C_1 ... C_d
            f_a = scores[:, :n_designs]
            f_c = scores[:, n_designs:].reshape(batch, dimension, n_designs)
            indices = jansen_total_indices(f_a, f_c).view(batch, 1, grid, grid)
            return bicubic_resize(indices, (height, width))

    @staticmethod
    def _check(grid: int, n_designs: int, perturbation: str, generator: Optional[torch.Generator], height: int,
               width: int) -> None:
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        if grid > min(height, width):
            raise ValueError(f"grid must be at most the image's height and width ({height}, {width}), got {grid}")
        if 2 * grid * grid > SobolEngine.MAXDIM:
            raise ValueError(f"grid must be at most {int((SobolEngine.MAXDIM // 2) ** 0.5)} (torch's Sobol sequences "
                             f"have at most {SobolEngine.MAXDIM} dimensions, 2 per cell), got {grid}")
        if (isinstance(n_designs, bool) or not isinstance(n_designs, int) or n_designs < 2
                or n_designs & (n_designs - 1)):
            raise ValueError(f"n_designs must be a power of two, at least 2, got {n_designs!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        optional_generator(generator)
