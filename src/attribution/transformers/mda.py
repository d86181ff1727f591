"""MDA: metric-driven attributions, an order of the image's patches searched with insertion and deletion steps, then
magnitudes fitted to the insertion and deletion curves of that order, for every image of a call at once (each step
of a search is one chunked stream of masked forwards)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, finite_number, positive_int
from ..core.filters import gaussian_blur
from ..core.registry import MethodSpec, register, resolve_method
from ..core.targets import Target
from ..gradients.paths import BaselineSpec, make_baseline
from .beyond_intuition import BeyondIntuition
from .tokens import patch_size

#: the authors' blur kernels (``gkern(klen, klen)``): 31 first, 4 larger while the blurred image keeps the class
AUTHORS_BLUR_SIZES = tuple(range(31, 104, 4))
#: the authors' cap on the candidates of a search step (``subsearch_len``): ``min(2 * isqrt(n), 28)``
SUBSEARCH_CAP = 28
#: the patch grid of models without one (ViT-B/16 at 224 x 224, the paper's main model)
FALLBACK_GRID = 14
UPSAMPLES = ("antialias", "bilinear", "nearest")
#: options MDA hands to its base method itself
BASE_SHARED = ("batch_size", "create_graph", "amp", "channels_last")


@register("mda")
class MDA(Explainer):
    """MDA (Metric-Driven Attribution): the patches ordered by greedy insertion and deletion searches that start
    from a base attribution's order, then given magnitudes, in that order, fitted to the order's insertion and
    deletion curves.

    Walker, Jha & Ewetz, "Metric-Driven Attributions for Vision Transformers", ICLR 2025 (OpenReview rGP2jbWt0l);
    code github.com/chasewalker26/MDA-Metric-Driven-Attributions-for-ViT (``util/attribution_methods/MDAFunctions.py``,
    ``util/test_methods/MASTestFunctions.py`` and the ``MDA`` branch of the scripts in ``MDA_results/evaluations``).

    The image is cut into the ``n`` patches of a grid; ``f`` is the target's score (the softmax probability).
    Substrates: the image blurred with the kernel ``gkern(k, k)`` (zero padding; ``blur='adaptive'``: the first of
    ``k = 31, 35, ..., 103`` whose blurred image scores at most ``blur_threshold``, as the authors' callers) and the
    ``baseline`` image (zeros).  Patch order: (1) insertion search: from the blurred image, step ``k`` inserts the one
    of the first ``min(m, n - k)`` patches not yet inserted, in decreasing base saliency, that scores highest, until
    ``(f - f_blur) / |f(x) - f_blur| >= cutoff``: ``L`` patches ``P``.  (2) deletion search (worst insertion): from the
    baseline, step ``k`` inserts the one of the first ``min(m, n - L - k)`` patches outside ``P`` not yet inserted, in
    increasing base saliency, that scores lowest.  The order is ``P``, then the deletion search's picks last to first.
    ``m = subsearch`` (the authors' ``min(2 * isqrt(n), 28)``); ties go to the first candidate, ties in the saliency by
    patch index (a stable sort).  Base saliency of a patch: ``|resize(sum_c base)|``, the base map downsampled to the
    grid (bilinear, antialiased, as torchvision's ``Resize``).  Magnitudes: the order's insertion curve ``I_t`` (onto
    the blurred image) and deletion curve ``D_t`` (onto the baseline), ``step`` pixels a step, normalised as the code's
    MAS metric (``clip((f_t - f_start) / |f(x) - f_start|, 0, 1)``, running max for insertion, running min for
    deletion), resampled linearly to ``n + 1`` points, give ``c = 1 - (I + 1 - D) / 2``; ``y`` is the least-squares
    convex sequence with ``c``'s endpoints (the code's quadratic program); with the drops ``d_i = y_{i-1} - y_i``, the
    patch at place ``i = 1..n`` gets ``a_i = d_i / |patch_i| + d_i (n - i) / n`` (``|patch|`` its pixels).  ``y`` is
    convex so the ``d_i`` shrink along the order and so do the ``a_i``: the magnitudes keep the searched order.
    ``density`` ``lambda`` blends in the dense map (``(n - i) / n`` where ``a_i >= kappa``, else ``a_i``, scaled to the
    sparse map's maximum): ``(1 - lambda) a + lambda dense``.  The patch map is resized as the code's output
    (``upsample='antialias'``: downsampled to the grid with antialiasing, which mixes each patch with its neighbours by
    1/8 per side, then bilinearly up to the image; ``'bilinear'``: the patch values bilinearly up; ``'nearest'``: each
    pixel its patch's value).  Maps are raw, non-negative.

    Defaults from the authors' code: ``base_method`` Bi-Attn (``Baselines.bidirectional``, 20 steps, from the fourth
    block: :class:`~attribution.transformers.beyond_intuition.BeyondIntuition`'s defaults; another explainer class or
    registry name at construction, its options in ``base_options``), ``grid=None`` (the ViT's patch grid; the code's
    SLIC with ``n_segments`` the patch count and compactness 10000 draws that grid; 14 x 14 for a model without a
    patch size), ``subsearch=None`` (``min(2 * isqrt(n), 28)``), ``cutoff=0.9``, ``blur='adaptive'`` with
    ``blur_threshold=0.01`` (the callers' 1 %), ``baseline='zero'``, ``step=None`` (the image's width: the code's
    224 pixels at 224 x 224), ``kappa=0.005``, ``density=0.0`` (the callers' "MDA", the sparse map), ``upsample=
    'antialias'`` (torchvision 0.19's ``Resize``, the authors' pin), ``score='softmax'``.  The method is
    model-agnostic given a patch grid (the code segments the image, not the tokens): CNNs are accepted with any
    ``base_method`` that suits them (the default Bi-Attn reads a transformer's attention).

    Cost (forwards per image): the base method's (Bi-Attn: 20 forwards and backwards), 2 (the image, the baseline), 1 to
    19 (the adaptive blur), the insertion search ``sum_{k<L} min(m, n - k)``, the deletion search
    ``sum_{k<n-L} min(m, n - L - k)`` (the two together at most ``n m``: 5,488 at ``n = 196``, ``m = 28``), and
    ``2 ceil(H W / step)`` for the two curves (448 at 224 x 224); ``target=None`` and ``create_graph`` add 1 each.
    Cheap: ``subsearch=1`` (the base order refined only by the cutoff), a larger ``step``, a fixed ``blur`` size,
    ``base_options={'steps': 2}``.
    ``batch_size`` rows per forward.  ``create_graph=True``: the searches' order and the convex fit's knots are found
    without autograd; the curves are recomputed with it and the fit solved on its knots, so the map is differentiable in
    the model's parameters (the base map only orders candidates and is not differentiated).

    Deliberate differences from the code: the patches are the exact grid (SLIC at compactness 10000 only
    approximates it); the target is the call's (the code explains the arg-max); the code fits a convex curve to the
    deletion search's own responses and builds a first map from it whose only use is to order the pixels of the
    curves' evaluation, which is the searched order itself (its magnitudes shrink along that order), so that first
    fit is skipped and the curves follow the order, ties within a patch to the higher pixel index (the code's
    ``np.flip(np.argsort(...))`` leaves ties to the sort); the curves reuse ``f(x)``, ``f_blur`` and the baseline's
    score instead of forwarding those images again; the convex fit is solved exactly (a non-negative least-squares
    on the second differences, Lawson-Hanson) where the code calls cvxopt's interior-point solver (its bounds
    ``0 <= y <= 1`` hold at the optimum since ``c`` falls from ``c_0 <= 1`` to ``c_n >= 0``); the insertion prefix
    is the patches inserted up to the step that reached the cutoff (the code finds that step again by looking for a
    raw probability ``>= 0.9``, which can stop early, and past ``n - m`` steps writes the cutoff at a wrong place);
    a search that never reaches the cutoff keeps all ``n`` patches (the code fails); 0 / 0 in a normalisation
    counts as no change (the code's ``min``/``max`` of a NaN), and a dense map of zeros stays zero (the code's
    0 / 0); the map is not tripled (the code sums three equal channels).
    """

    kind = "attention"
    defaults = {"grid": None, "subsearch": None, "cutoff": 0.9, "blur": "adaptive", "blur_threshold": 0.01,
                "baseline": "zero", "step": None, "kappa": 0.005, "density": 0.0, "upsample": "antialias",
                "base_options": None, "score": "softmax"}

    def __init__(self, model: nn.Module, base_method: MethodSpec = BeyondIntuition, **options: Any) -> None:
        self.base = resolve_method(base_method, Explainer, "base_method")(model)
        super().__init__(model, **options)

    def resolved_options(self, **options: Any) -> Dict[str, Any]:
        merged = super().resolved_options(**options)
        built, called = self.options.get("base_options"), options.get("base_options")
        for given in (built, called):
            if given is not None and not isinstance(given, Mapping):
                raise TypeError(f"base_options must be a dict of {type(self.base).__name__}'s options or None, "
                                f"got {given!r}")
        merged["base_options"] = {**(built or {}), **(called or {})}  # a call's add to the construction's
        return merged

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", base_method={type(self.base).__name__})"

    def _explain(self, x: Tensor, target: Target, *, grid: Any, subsearch: Optional[int], cutoff: float,
                 blur: Any, blur_threshold: float, baseline: BaselineSpec, step: Optional[int], kappa: float,
                 density: float, upsample: str, base_options: Mapping[str, Any], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        batch, _, height, width = x.shape
        shape = patch_grid(self.model, (height, width), grid)
        labels = grid_labels(height, width, shape, x.device)
        n = shape[0] * shape[1]
        subsearch = min(2 * math.isqrt(n), SUBSEARCH_CAP) if subsearch is None else positive_int(subsearch, "subsearch")
        cutoff, kappa, density, blur_threshold, blur_sizes, step, upsample = check_options(
            cutoff, kappa, density, blur_threshold, blur, step, upsample, height * width, width)
        fill = make_baseline(x, baseline)
        saliency = self._base_saliency(x, target, base_options, batch_size, shape)
        rows = Rows(self, x, labels, n, target, batch_size)
        with torch.set_grad_enabled(create_graph):
            own, black = rows.images(x), rows.images(fill)
        with torch.no_grad():
            blurred, blur_score = adaptive_blur(rows, blur_sizes, blur_threshold)
            prefix, length = insertion_search(rows, saliency, blurred, own.detach(), blur_score, subsearch, cutoff)
            worst = deletion_search(rows, saliency, fill, prefix, length, subsearch)
            order = patch_order(prefix, length, worst)
        with torch.set_grad_enabled(create_graph):
            if create_graph:  # the blur's score again, now with the graph
                blur_score = rows.images(blurred)
            ranks = pixel_ranks(order, labels)
            inserted = rows.curve(ranks, step, blurred, x, own, blur_score, insert=True)
            deleted = rows.curve(ranks, step, x, fill, own, black, insert=False)
            curve = 1 - (resample(inserted, n) + 1 - resample(deleted, n)) / 2
            fitted = convex_fit(curve)
            sizes = torch.bincount(labels.flatten(), minlength=n).to(fitted.dtype)
            values = magnitudes(fitted, sizes[order], kappa, density)
            patch_map = torch.zeros_like(values).scatter(1, order, values)
            return to_image(patch_map, labels, shape, upsample)

    def _base_saliency(self, x: Tensor, target: Target, given: Mapping[str, Any], batch_size: Optional[int],
                       shape: Tuple[int, int]) -> Tensor:
        """(B, n) base saliency of each patch: ``|sum_c base|`` downsampled to the grid (the code's ``Resize``)."""
        clash = sorted(set(given) & set(BASE_SHARED))
        if clash:
            raise ValueError(f"base_options may not set {clash}: give them to MDA, which runs the base method")
        try:
            merged = self.base.resolved_options(**given, batch_size=batch_size, create_graph=False)
            base_target = target.with_score(merged.pop("score"))
        except (TypeError, ValueError) as error:
            raise type(error)(f"base_options: {error}") from error
        merged.pop("amp")  # the outer call's autocast and memory format cover the base's passes
        merged.pop("channels_last")
        base = self.base._explain(x, base_target, **merged).detach()
        total = base.sum(dim=1, keepdim=True).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        small = F.interpolate(total, size=shape, mode="bilinear", align_corners=False, antialias=True)
        return small.abs().flatten(1)


# ------------------------------------------------------------------------------------------------- options
def patch_grid(model: nn.Module, size: Tuple[int, int], grid: Any) -> Tuple[int, int]:
    """The (rows, columns) of the patch grid: the model's patches (``grid=None``; 14 x 14 without a patch size),
    ``grid`` x ``grid``, or a pair."""
    if grid is None:
        patch = patch_size(model)
        shape = (size[0] // patch[0], size[1] // patch[1]) if patch is not None else (FALLBACK_GRID, FALLBACK_GRID)
    elif isinstance(grid, (tuple, list)) and len(grid) == 2:
        shape = (positive_int(grid[0], "grid"), positive_int(grid[1], "grid"))
    else:
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be None, a positive int or a pair of them, got {grid!r}")
        shape = (grid, grid)
    if not (1 <= shape[0] <= size[0] and 1 <= shape[1] <= size[1]):
        raise ValueError(f"grid {shape} must fit the image's {size} pixels (at least one pixel per patch)")
    return shape


def check_options(cutoff: Any, kappa: Any, density: Any, blur_threshold: Any, blur: Any, step: Any, upsample: Any,
                  pixels: int, width: int) -> Tuple[float, float, float, float, Tuple[int, ...], int, str]:
    """Validate the options (errors name the option and its value)."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0 < cutoff <= 1:
        raise ValueError(f"cutoff must be a number in (0, 1], got {cutoff!r}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 <= density <= 1:
        raise ValueError(f"density must be a number in [0, 1], got {density!r}")
    kappa = finite_number(kappa, "kappa")
    blur_threshold = finite_number(blur_threshold, "blur_threshold")
    if isinstance(blur, str) and blur == "adaptive":
        sizes = AUTHORS_BLUR_SIZES
    elif isinstance(blur, int) and not isinstance(blur, bool) and blur >= 1 and blur % 2 == 1:
        sizes = (blur,)
    else:
        raise ValueError(f"blur must be 'adaptive' or an odd positive kernel size, got {blur!r}")
    step = width if step is None else positive_int(step, "step")
    if not isinstance(upsample, str) or upsample not in UPSAMPLES:
        raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
    return float(cutoff), kappa, float(density), blur_threshold, sizes, min(step, pixels), upsample


def grid_labels(height: int, width: int, shape: Tuple[int, int], device: torch.device) -> Tensor:
    """(H, W) patch index of every pixel: a ``shape`` grid of near-equal rectangles, row-major (exact patches when
    the grid divides the image)."""
    rows = torch.arange(height, device=device) * shape[0] // height
    cols = torch.arange(width, device=device) * shape[1] // width
    return rows[:, None] * shape[1] + cols[None, :]


# ---------------------------------------------------------------------------------------------------- rows
class Rows:
    """The target's scores of images built from ``x``: ``scores(owners, build)`` for rows ``build(index, owners)``,
    ``batch_size`` rows per forward, in float64 (float32 on MPS)."""

    def __init__(self, explainer: Explainer, x: Tensor, labels: Tensor, n: int, target: Target,
                 batch_size: Optional[int]) -> None:
        self.explainer, self.x, self.labels, self.n, self.target = explainer, x, labels, n, target
        self.dtype = torch.float32 if x.device.type == "mps" else torch.float64
        self.rows_per_pass = batch_size

    def scores(self, owners: Tensor, build: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        planner = RowPlanner(owners.shape[0], self.rows_per_pass, self.x.device)
        parts = []
        for start, stop in planner:
            index = torch.arange(start, stop, device=self.x.device)
            outputs = self.explainer._forward(build(index, owners[index]))
            parts.append(self.target(outputs, owners[index]).to(self.dtype))
        self.rows_per_pass = self.rows_per_pass or planner.size  # the size a CUDA probe found, for later steps
        return torch.cat(parts) if parts else self.x.new_zeros(0, dtype=self.dtype)

    def images(self, images: Tensor, owners: Optional[Tensor] = None) -> Tensor:
        """(R,) scores of the images ``owners`` (R,) of ``images`` (B, C, H, W), all by default."""
        owners = torch.arange(images.shape[0], device=images.device) if owners is None else owners
        return self.scores(owners, lambda index, image: images[image])

    def patches(self, owners: Tensor, present: Tensor, start: Tensor) -> Tensor:
        """(R,) scores of ``start`` with the patches ``present`` (R, n) of ``x`` inserted."""
        def build(index: Tensor, image: Tensor) -> Tensor:
            mask = present[index][:, self.labels].unsqueeze(1)
            return torch.where(mask, self.x[image], start[image])
        return self.scores(owners, build)

    def curve(self, ranks: Tensor, step: int, start: Tensor, finish: Tensor, own: Tensor, reference: Tensor,
              insert: bool) -> Tensor:
        """(B, S + 1) MAS-normalised curve: ``start``'s pixels replaced by ``finish``'s ``step`` at a time in the
        order ``ranks`` (B, H, W); ``clip((f_t - f_ref) / |f(x) - f_ref|, 0, 1)`` with a running max (insertion,
        ``f_ref`` the start's score) or min (deletion, ``f_ref`` the finish's), 0 / 0 counting as no change."""
        batch, pixels = ranks.shape[0], ranks[0].numel()
        steps = -(-pixels // step)
        owners = torch.arange(batch, device=ranks.device).repeat_interleave(steps)
        counts = (torch.arange(1, steps + 1, device=ranks.device) * step).clamp(max=pixels).repeat(batch)

        def build(index: Tensor, image: Tensor) -> Tensor:
            changed = (ranks[image] < counts[index].view(-1, 1, 1)).unsqueeze(1)
            return torch.where(changed, finish[image], start[image])

        scores = self.scores(owners, build).view(batch, steps)
        first = reference if insert else own
        scores = torch.cat([first.to(self.dtype)[:, None], scores], dim=1)
        spread = (own - reference).abs().to(self.dtype)[:, None]
        normalised = ((scores - reference.to(self.dtype)[:, None]) / spread).clamp(0, 1)
        if insert:
            return normalised.nan_to_num(nan=0.0).cummax(dim=1).values
        return normalised.nan_to_num(nan=1.0).cummin(dim=1).values


# ------------------------------------------------------------------------------------------------ searches
def adaptive_blur(rows: Rows, sizes: Tuple[int, ...], threshold: float) -> Tuple[Tensor, Tensor]:
    """The blurred images (B, C, H, W) and their scores: ``gkern(k, k)`` for the first ``k`` of ``sizes`` whose
    image scores at most ``threshold`` (the last size otherwise)."""
    x = rows.x
    blurred = gaussian_blur(x, sizes[0], float(sizes[0]), padding="zeros", reflect_kernel=True)
    score = rows.images(blurred)
    for size in sizes[1:]:
        active = (score > threshold).nonzero()[:, 0]
        if active.numel() == 0:
            break
        blurred[active] = gaussian_blur(x[active], size, float(size), padding="zeros", reflect_kernel=True)
        score[active] = rows.images(blurred, active)
    return blurred, score


def candidates(order: Tensor, taken: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """The first ``count`` (A,) patches of each row's ``order`` (A, n) not ``taken`` (A, n, by patch): (A, c) patch
    indices (c the largest count; padding -1) and their validity."""
    free = ~taken.gather(1, order)
    rank = free.cumsum(dim=1) - 1
    chosen = free & (rank < count[:, None])
    width = int(count.max())
    row, place = chosen.nonzero(as_tuple=True)
    patches = torch.full((order.shape[0], width), -1, dtype=torch.long, device=order.device)
    patches[row, rank[row, place]] = order[row, place]
    return patches, torch.arange(width, device=order.device) < count[:, None]


def best_candidates(rows: Rows, active: Tensor, present: Tensor, patches: Tensor, valid: Tensor, start: Tensor,
                    highest: bool) -> Tuple[Tensor, Tensor]:
    """Each active image's candidate (A,) whose insertion into ``start`` with its ``present`` (B, n) patches scores
    highest (or lowest), the first of ties, and that score."""
    row, slot = valid.nonzero(as_tuple=True)
    trial = present[active[row]].clone()
    trial[torch.arange(row.shape[0], device=row.device), patches[row, slot]] = True
    scores = rows.patches(active[row], trial, start)
    worst = float("-inf") if highest else float("inf")
    table = torch.full(valid.shape, worst, dtype=scores.dtype, device=scores.device)
    table[row, slot] = scores
    pick = table.argmax(dim=1) if highest else table.argmin(dim=1)
    return patches.gather(1, pick[:, None])[:, 0], table.gather(1, pick[:, None])[:, 0]


def insertion_search(rows: Rows, saliency: Tensor, blurred: Tensor, own: Tensor, blur_score: Tensor,
                     subsearch: int, cutoff: float) -> Tuple[Tensor, Tensor]:
    """(B, n) patches in the order inserted (the first ``length`` valid) and (B,) ``length``: the search stops at
    the step whose normalised score reaches ``cutoff`` (all ``n`` patches if none does)."""
    batch, n = saliency.shape
    device = saliency.device
    order = saliency.argsort(dim=1, stable=True).flip(1)  # decreasing saliency (the code's flip of an argsort)
    present = torch.zeros(batch, n, dtype=torch.bool, device=device)
    prefix = torch.full((batch, n), -1, dtype=torch.long, device=device)
    length = torch.full((batch,), n, dtype=torch.long, device=device)
    searching = torch.ones(batch, dtype=torch.bool, device=device)
    spread = (own - blur_score).abs()
    for k in range(n):
        active = searching.nonzero()[:, 0]
        if active.numel() == 0:
            break
        count = torch.full((active.shape[0],), min(subsearch, n - k), device=device)
        patches, valid = candidates(order[active], present[active], count)
        pick, score = best_candidates(rows, active, present, patches, valid, blurred, highest=True)
        present[active, pick] = True
        prefix[active, k] = pick
        done = (score - blur_score[active]) / spread[active] >= cutoff
        length[active[done]] = k + 1
        searching[active[done]] = False
    return prefix, length


def deletion_search(rows: Rows, saliency: Tensor, fill: Tensor, prefix: Tensor, length: Tensor,
                    subsearch: int) -> Tensor:
    """(B, n) the worst insertion order onto ``fill`` of the patches outside each image's insertion prefix (the
    first ``n - length`` valid)."""
    batch, n = saliency.shape
    device = saliency.device
    order = saliency.argsort(dim=1, stable=True)  # increasing saliency
    in_prefix = torch.arange(n, device=device)[None, :] < length[:, None]
    reserved = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)  # column n takes the unused places
    reserved = reserved.scatter_(1, torch.where(in_prefix, prefix, n), True)[:, :n]
    present = torch.zeros_like(reserved)
    worst = torch.full((batch, n), -1, dtype=torch.long, device=device)
    for k in range(n):
        left = n - length - k
        active = (left > 0).nonzero()[:, 0]
        if active.numel() == 0:
            break
        count = left[active].clamp(max=subsearch)
        patches, valid = candidates(order[active], (reserved | present)[active], count)
        pick, _ = best_candidates(rows, active, present, patches, valid, fill, highest=False)
        present[active, pick] = True
        worst[active, k] = pick
    return worst


def patch_order(prefix: Tensor, length: Tensor, worst: Tensor) -> Tensor:
    """(B, n) the final order, most important first: the insertion prefix, then the worst insertion order
    reversed."""
    n = prefix.shape[1]
    places = torch.arange(n, device=prefix.device).expand_as(prefix)
    backwards = worst.gather(1, (n - 1 - places).clamp(min=0))
    return torch.where(places < length[:, None], prefix, backwards)


def pixel_ranks(order: Tensor, labels: Tensor) -> Tensor:
    """(B, H, W) rank of every pixel: by its patch's place in ``order``, within a patch the higher pixel index
    first."""
    batch, n = order.shape
    pixels = labels.numel()
    place = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    flat = torch.arange(pixels, device=order.device)
    key = place[:, labels.flatten()] * pixels + (pixels - 1 - flat)
    ranks = torch.empty_like(key).scatter_(1, key.argsort(dim=1), flat.expand_as(key).contiguous())
    return ranks.view(batch, *labels.shape)


# ---------------------------------------------------------------------------------------------- magnitudes
def resample(curve: Tensor, n: int) -> Tensor:
    """(B, S + 1) curve on ``0..S`` linearly resampled to ``n + 1`` evenly spaced points (``np.interp``)."""
    steps = curve.shape[1] - 1
    if steps == 0:
        return curve.expand(-1, n + 1)
    where = torch.arange(n + 1, dtype=torch.float64, device=curve.device) * steps / n
    left = where.floor().long().clamp(max=steps - 1)
    frac = (where - left).to(curve.dtype)
    return curve[:, left] + frac * (curve[:, left + 1] - curve[:, left])


def hinges(points: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(points, points - 2): column ``j`` the sequence that is 0 at both ends, linear but for a second difference
    of 1 at interior point ``j + 1``."""
    n = points - 1
    i = torch.arange(points, dtype=dtype, device=device)[:, None]
    j = torch.arange(1, n, dtype=dtype, device=device)[None, :]
    return -torch.minimum(i, j) * (n - torch.maximum(i, j)) / n


def restricted_solve(gram: Tensor, rhs: Tensor, passive: Tensor) -> Tensor:
    """Least-squares coefficients (R, K) on the ``passive`` (R, K) columns only (zero elsewhere), from the normal
    equations ``gram`` (K, K) and ``rhs`` (R, K)."""
    both = passive[:, :, None] & passive[:, None, :]
    system = torch.where(both, gram, torch.zeros_like(gram)) + torch.diag_embed((~passive).to(gram.dtype))
    return torch.linalg.solve(system, torch.where(passive, rhs, torch.zeros_like(rhs)))


def nnls_passive_set(design: Tensor, target: Tensor) -> Tensor:
    """The passive (positive) set (B, K) of ``min_{u >= 0} ||design u - target_b||`` for each row of ``target``
    (B, m): Lawson-Hanson, batched (each row stops on its own)."""
    batch, columns = target.shape[0], design.shape[1]
    gram, rhs = design.T @ design, target @ design
    scale = design.abs().sum(dim=0).max() * target.abs().amax(dim=1, keepdim=True).clamp(min=1e-300)
    tol = 10 * max(design.shape) * torch.finfo(design.dtype).eps * scale
    u = torch.zeros(batch, columns, dtype=design.dtype, device=design.device)
    passive = torch.zeros(batch, columns, dtype=torch.bool, device=design.device)
    for _ in range(3 * columns):
        gradient = rhs - u @ gram
        entering = ~passive & (gradient > tol)
        rows = entering.any(dim=1).nonzero()[:, 0]
        if rows.numel() == 0:
            break
        best = torch.where(entering[rows], gradient[rows], torch.full_like(gradient[rows], float("-inf")))
        passive[rows, best.argmax(dim=1)] = True
        for _ in range(columns):  # drop the coefficients that the unconstrained solution makes non-positive
            solution = restricted_solve(gram, rhs[rows], passive[rows])
            bad = passive[rows] & (solution <= tol[rows])
            stuck = bad.any(dim=1)
            u[rows[~stuck]] = solution[~stuck]
            if not bool(stuck.any()):
                break
            rows, solution, bad = rows[stuck], solution[stuck], bad[stuck]
            current = u[rows]
            step = (current / (current - solution)).nan_to_num(0.0).clamp(0, 1)
            ratio = torch.where(bad, step, torch.full_like(current, float("inf")))
            alpha = ratio.amin(dim=1, keepdim=True)
            current = current + alpha * (solution - current)
            keep = passive[rows] & (current > tol[rows])
            passive[rows] = keep
            u[rows] = torch.where(keep, current, torch.zeros_like(current))
    return passive


def convex_fit(curve: Tensor) -> Tensor:
    """(B, n + 1) the least-squares convex sequences with ``curve``'s two endpoints: the line between the
    endpoints plus non-negative second differences (hinges), found exactly (Lawson-Hanson; the knots without
    autograd, the values differentiable)."""
    points = curve.shape[1]
    if points < 3:
        return curve
    design = hinges(points, curve.dtype, curve.device)
    n = points - 1
    line = curve[:, :1] + (curve[:, -1:] - curve[:, :1]) * torch.arange(points, dtype=curve.dtype,
                                                                         device=curve.device) / n
    residual = curve - line
    passive = nnls_passive_set(design, residual.detach())
    coefficients = restricted_solve(design.T @ design, residual @ design, passive)
    return line + coefficients @ design.T


def magnitudes(fitted: Tensor, sizes: Tensor, kappa: float, density: float) -> Tensor:
    """(B, n) magnitude of the patch at each place of the order: ``a_i = d_i / |patch_i| + d_i (n - i) / n`` from
    the drops ``d_i`` of ``fitted`` (B, n + 1), blended with the dense map by ``density``."""
    n = fitted.shape[1] - 1
    drops = (fitted[:, :-1] - fitted[:, 1:]).clamp(min=0)  # >= 0 exactly for a convex fit of a falling curve
    rest = (n - torch.arange(1, n + 1, dtype=fitted.dtype, device=fitted.device)) / n
    sparse = drops / sizes + drops * rest
    if density == 0:
        return sparse
    dense = torch.where(sparse >= kappa, rest.expand_as(sparse), sparse)
    top = dense.amax(dim=1, keepdim=True)
    dense = torch.where(top > 0, dense / torch.where(top > 0, top, torch.ones_like(top)), dense)
    dense = dense * sparse.amax(dim=1, keepdim=True)
    return (1 - density) * sparse + density * dense


def to_image(patch_map: Tensor, labels: Tensor, shape: Tuple[int, int], upsample: str) -> Tensor:
    """(B, n) patch values to a (B, 1, H, W) map."""
    size = tuple(labels.shape)
    if upsample == "nearest":
        return patch_map[:, labels].unsqueeze(1)
    if upsample == "bilinear":
        return F.interpolate(patch_map.view(-1, 1, *shape), size=size, mode="bilinear", align_corners=False)
    pixels = patch_map[:, labels].unsqueeze(1)  # the code's map, then Resize(grid) and Resize(image)
    small = F.interpolate(pixels, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)

