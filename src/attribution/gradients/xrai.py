"""XRAI: region attributions, grown greedily from Integrated Gradients over an over-segmentation of the image."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.registry import register
from ..core.targets import Target
from .base import GradientExplainer, accumulation_dtype
from .paths import BaselineSpec, make_baseline, quadrature

#: the authors' segmentation: Felzenszwalb & Huttenlocher at these scales, on the image rescaled to [-1, 1] and
#: resized to 224 x 224, segments dilated by a disk
FELZENSZWALB_SCALES = (50, 100, 150, 250, 500, 1200)
FELZENSZWALB_SIGMA = 0.8
FELZENSZWALB_MIN_SIZE = 150
SEGMENTATION_SIZE = (224, 224)
DILATION_RADIUS = 5
ALGORITHMS = ("full", "fast")
#: pixels per chunk of the growth's first sums
CHUNK = 4096


def disk_offsets(radius: int) -> Tensor:
    """(K, 2) row and column offsets of the pixels of a disk of ``radius`` (``dy^2 + dx^2 <= radius^2``, the
    footprint of scikit-image's ``disk``)."""
    span = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    keep = dy.square() + dx.square() <= radius * radius
    return torch.stack([dy[keep], dx[keep]], dim=1)


def label_masks(labels: Tensor, radius: int) -> Tensor:
    """(M, H, W) boolean masks of the labels ``0..M-1`` of one (H, W) label map, each dilated by a disk of
    ``radius`` (0: none): a pixel is in label l's mask when some pixel of its disk has label l.  One scatter over
    the disk's offsets, not a convolution per mask."""
    height, width = labels.shape
    count, size = int(labels.max()) + 1, height * width
    pixels = torch.arange(size, device=labels.device, dtype=torch.int32).view(height, width)
    if radius <= 0:
        masks = torch.zeros(count * size, dtype=torch.bool, device=labels.device)
        masks[labels.flatten() * size + pixels.flatten()] = True
        return masks.view(count, height, width)
    masks = torch.zeros((count + 1) * size, dtype=torch.bool, device=labels.device)  # row `count`: outside
    offsets = disk_offsets(radius).to(labels.device)
    padded = F.pad(labels.to(torch.int32), (radius,) * 4, value=count)
    rows = torch.arange(height, device=labels.device)[None, :, None] + (offsets[:, 0] + radius)[:, None, None]
    cols = torch.arange(width, device=labels.device)[None, None, :] + (offsets[:, 1] + radius)[:, None, None]
    near = padded[rows, cols]  # (K, H, W): the label at each disk offset of each pixel
    masks[(near.long() * size + pixels).flatten()] = True
    masks = masks[:count * size]
    return masks.view(count, height, width)


#: label maps of recently segmented images, by content: explaining the same images again (another class, another
#: base attribution) skips the segmentation; at most this many images, six int32 label maps each
LABEL_CACHE_SIZE = 32
_label_cache: "OrderedDict[Tuple[str, Tuple[int, ...]], Tensor]" = OrderedDict()
_label_cache_lock = threading.Lock()


def felzenszwalb_labels(image: Tensor) -> Tensor:
    """(6, H, W) label maps (0..) of the authors' six Felzenszwalb segmentations of one (C, H, W) image (see
    :func:`felzenszwalb_segments`), on the CPU; remembered for the last :data:`LABEL_CACHE_SIZE` images."""
    im = image.detach().cpu()
    im = (im if im.dtype in (torch.float32, torch.float64) else im.float()).permute(1, 2, 0).numpy()
    key = (hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).hexdigest(), tuple(im.shape))
    with _label_cache_lock:
        if key in _label_cache:
            _label_cache.move_to_end(key)
            return _label_cache[key]
    try:
        from skimage import segmentation
        from skimage.transform import resize
    except ImportError:  # pragma: no cover - scikit-image is in the test extra
        raise ImportError("XRAI's default segmentation needs scikit-image (pip install scikit-image); or pass "
                          "segments=... (boolean masks) to XRAI") from None
    low, high = im.min(), im.max()  # in the image's dtype, as the authors' code
    scaled = (im - low) / (high - low) * 2 - 1 if high > low else np.zeros_like(im)
    scaled = resize(scaled, SEGMENTATION_SIZE, order=3, mode="constant", preserve_range=True, anti_aliasing=True)
    maps = []
    for scale in FELZENSZWALB_SCALES:
        seg = segmentation.felzenszwalb(scaled, scale=scale, sigma=FELZENSZWALB_SIGMA,
                                        min_size=FELZENSZWALB_MIN_SIZE)
        seg = resize(seg, im.shape[:2], order=0, preserve_range=True, mode="constant", anti_aliasing=False)
        maps.append(torch.from_numpy((seg - seg.min()).astype(np.int32)))
    labels = torch.stack(maps)
    with _label_cache_lock:
        _label_cache[key] = labels
        while len(_label_cache) > LABEL_CACHE_SIZE:
            _label_cache.popitem(last=False)
    return labels


def felzenszwalb_segments(image: Tensor, dilation_radius: int = DILATION_RADIUS) -> Tensor:
    """The authors' segments of one (C, H, W) image: (M, H, W) boolean masks, one per segment of each of the six
    Felzenszwalb segmentations, dilated by a disk of ``dilation_radius`` pixels.

    As the authors' code does: the image is rescaled to [-1, 1] by its own minimum and maximum, resized to 224 x 224
    (bicubic with anti-aliasing), segmented by scikit-image's ``felzenszwalb`` at each scale of
    ``FELZENSZWALB_SCALES`` (``sigma=0.8``, ``min_size=150``), and each label map is resized back to the image's size
    by the nearest label.  The segmentation runs on the CPU (scikit-image); the masks are on ``image``'s device.
    """
    masks = [label_masks(labels.long(), dilation_radius) for labels in felzenszwalb_labels(image)]
    return torch.cat(masks).to(image.device)


def _checked_segments(segments: Tensor, x: Tensor) -> Tensor:
    """User segments as (B, M, H, W) booleans: one (M, H, W) set shared by the batch or one per image."""
    size = tuple(x.shape[-2:])
    ok = isinstance(segments, Tensor) and segments.dtype == torch.bool and segments.dim() in (3, 4) \
        and tuple(segments.shape[-2:]) == size and segments.shape[-3] > 0 \
        and (segments.dim() == 3 or segments.shape[0] == x.shape[0])
    if not ok:
        shape = tuple(segments.shape) if isinstance(segments, Tensor) else type(segments).__name__
        raise ValueError(f"segments must be boolean masks, (M, {size[0]}, {size[1]}) shared by the batch or "
                         f"({x.shape[0]}, M, {size[0]}, {size[1]}) one set per image (pad with all-False masks), "
                         f"got {shape}" + (f" of dtype {segments.dtype}" if isinstance(segments, Tensor) else ""))
    return segments.expand(x.shape[0], *segments.shape[-3:]) if segments.dim() == 3 else segments


def _check_base(x: Tensor, given: Optional[Tensor], steps: int, baselines: Sequence[BaselineSpec]) -> None:
    """The base attribution's options: a given attribution's shape, or Integrated Gradients' steps and baselines."""
    if given is not None:
        ok = isinstance(given, Tensor) and given.dim() in (3, 4) and given.shape[0] == x.shape[0] \
            and tuple(given.shape[-2:]) == tuple(x.shape[-2:])
        if not ok:
            shape = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
            raise ValueError(f"base_attribution must be ({x.shape[0]}, C, H, W) or ({x.shape[0]}, H, W) with "
                             f"x's height and width {tuple(x.shape[-2:])}, got {shape}")
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(baselines, (str, Tensor)) or not isinstance(baselines, Sequence) or len(baselines) == 0:
        raise ValueError(f"baselines must be a non-empty sequence of baselines (names, numbers or tensors), "
                         f"got {baselines!r}")
    for baseline in baselines:
        make_baseline(x, baseline)  # names, numbers and shapes


def _best(gains: Tensor, alive: Tensor) -> int:
    """The first alive mask whose gain is the largest, up to float64 rounding of the running sums (so that masks
    covering the same new pixels tie as they do in exact arithmetic, and the first one wins)."""
    values = torch.where(alive, gains, torch.full_like(gains, -torch.inf))
    top = values.max()
    slack = 1e-9 * values[alive].abs().max()
    return int(torch.nonzero(values >= top - slack)[0])


def grow_regions(masks: Tensor, attr: Tensor, *, algorithm: str = "full", area_threshold: float = 1.0,
                 min_pixel_diff: int = 50) -> Tensor:
    """XRAI's regions for one image: (N,) region numbers 1, 2, ... in the order the regions were added, 0 for the
    pixels no region covers.

    ``masks`` (M, N) booleans and ``attr`` (N,) float64, on the CPU.  ``'full'``: repeatedly add the mask whose
    not-yet-covered pixels have the highest mean attribution (masks adding fewer than ``min_pixel_diff`` pixels
    are dropped) until the covered fraction exceeds ``area_threshold`` or no mask is left.  ``'fast'``: add the
    masks in the order of their whole mean attribution, each region being what a mask adds (if at least
    ``min_pixel_diff`` pixels).  The per-mask counts and sums of uncovered pixels are updated only over each
    region's new pixels, so the whole growth reads every (mask, pixel) pair once.
    """
    by_pixel = masks.t().contiguous()  # (N, M): a region's new pixels are rows, read contiguously
    weights = torch.stack([torch.ones_like(attr), attr])  # (2, N): count and attribution sum in one product
    totals = torch.zeros(2, masks.shape[0], dtype=attr.dtype)
    for start in range(0, masks.shape[1], CHUNK):  # float64 copies of a chunk of pixels at a time
        totals += weights[:, start:start + CHUNK] @ by_pixel[start:start + CHUNK].to(attr.dtype)
    counts, sums = totals.unbind(0)  # float64 counts: exact below 2^53
    covered = torch.zeros(masks.shape[1], dtype=torch.bool)
    regions = torch.zeros(masks.shape[1], dtype=torch.long)
    if algorithm == "fast":
        order = torch.sort(sums / counts.clamp(min=1), descending=True, stable=True).indices
        order = order[counts[order] > 0].tolist()  # empty masks have no gain (-inf in the authors' code)
        number = 0
        for index in order:
            new = masks[index] & ~covered
            if int(new.sum()) < min_pixel_diff:
                continue
            number += 1
            regions[new] = number
            covered |= new
        return regions
    alive = torch.ones(masks.shape[0], dtype=torch.bool)
    number, area = 0, 0
    while area / masks.shape[1] <= area_threshold:
        alive &= counts >= min_pixel_diff
        if not bool(alive.any()):
            break
        best = _best(sums / counts.clamp(min=1), alive)
        new = torch.nonzero(masks[best] & ~covered).squeeze(1)
        lost = weights[:, new] @ by_pixel[new].to(attr.dtype)
        counts, sums = counts - lost[0], sums - lost[1]
        number += 1
        area += new.numel()
        regions[new] = number
        covered[new] = True
        alive[best] = False
    return regions


def region_means(values: Tensor, regions: Tensor) -> Tensor:
    """Each pixel's region mean of ``values`` (B, N), for ``regions`` (B, N) numbers; differentiable in
    ``values``."""
    count = int(regions.max()) + 1
    sums = torch.zeros(values.shape[0], count, dtype=values.dtype, device=values.device)
    sums = sums.scatter_add(1, regions, values)
    sizes = torch.zeros_like(sums).scatter_add_(1, regions, torch.ones_like(values))
    return (sums / sizes.clamp(min=1)).gather(1, regions)


@register("xrai")
class XRAI(GradientExplainer):
    """XRAI: rank image regions, not pixels, by the attribution they hold.

    Kapishnikov, Bolukbasi, Viegas & Terry, "XRAI: Better Attributions Through Regions", ICCV 2019,
    arXiv:1906.02825.

    1. The base attribution ``a``: Integrated Gradients (``steps`` points, the ``'linspace'`` rule) from each of
       ``baselines`` (a black and a white image by default), averaged, then the maximum over the colour channels;
       or ``base_attribution`` ((B, C, H, W) or (B, H, W)) when given.
    2. Candidate regions: the masks of ``segments``, or the authors' over-segmentation
       (:func:`felzenszwalb_segments`: six Felzenszwalb segmentations, each segment dilated by a 5-pixel disk).
    3. Greedy growth (``algorithm='full'``): starting from nothing, add the mask with the highest gain, the mean of
       ``a`` over the pixels it adds, ``gain(S) = sum_{p in S \\ R} a_p / |S \\ R|``; a region is what the chosen
       mask adds; masks adding fewer than ``min_pixel_diff`` pixels are dropped; stop when the covered fraction
       exceeds ``area_threshold`` or no mask is left.  ``'fast'`` ranks the masks once by their own mean instead
       (and, as the authors' code, covers the whole image: ``area_threshold`` does not apply).

    The map gives each pixel its region's gain, i.e. the mean of ``a`` over the region (uncovered pixels: their
    own mean), so thresholding it at a quantile keeps the most attributed regions first.  Equal to the authors'
    code (PAIR ``saliency``'s ``XRAI``) for the same base attribution and segments.  The growth runs on the CPU in
    float64 (a sequence of data-dependent choices; every (mask, pixel) pair is read once), the region means on
    ``x``'s device from ``a``, so with ``create_graph`` the map is differentiable (the regions held fixed).  Cost:
    ``len(baselines) x steps`` forwards and input-gradient backwards per image, and the segmentation (scikit-image,
    on the CPU, about 0.5 s per image; it runs in a worker thread while the gradients are computed, so on a GPU it
    is hidden behind them; the label maps of the last 32 images are remembered, so explaining the same images for
    another class only dilates them again) and the growth (about 0.2 s per image).
    """

    kind = "region"
    defaults = {"steps": 100, "baselines": ("black", "white"), "base_attribution": None, "segments": None,
                "algorithm": "full", "area_threshold": 1.0, "min_pixel_diff": 50}

    def _explain(self, x: Tensor, target: Target, *, steps: int, baselines: Sequence[BaselineSpec],
                 base_attribution: Optional[Tensor], segments: Optional[Tensor], algorithm: str,
                 area_threshold: float, min_pixel_diff: int, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if isinstance(area_threshold, bool) or not isinstance(area_threshold, (int, float)) \
                or not 0 <= area_threshold <= 1:
            raise ValueError(f"area_threshold must be a fraction in [0, 1], got {area_threshold!r}")
        if isinstance(min_pixel_diff, bool) or not isinstance(min_pixel_diff, int) or min_pixel_diff < 1:
            raise ValueError(f"min_pixel_diff must be a positive int, got {min_pixel_diff!r}")
        _check_base(x, base_attribution, steps, baselines)  # every option before the segmentation starts
        given = None if segments is None else _checked_segments(segments, x).cpu()
        images = x.detach().cpu()
        pool = ThreadPoolExecutor(max_workers=1)  # the CPU segmentation runs while the gradients do
        try:
            pending = pool.submit(lambda: [felzenszwalb_segments(image) for image in images]) if given is None \
                else None
            attr = self._base_attribution(x, target, base_attribution, steps, baselines, batch_size, create_graph)
            masks = list(given) if pending is None else pending.result()
        finally:
            pool.shutdown(wait=False)  # an error in the gradients does not wait for the segmentation
        flat = attr.flatten(1)
        host = flat.detach().to("cpu", torch.float64)
        regions = torch.stack([grow_regions(m.flatten(1), a, algorithm=algorithm,
                                            area_threshold=float(area_threshold), min_pixel_diff=min_pixel_diff)
                               for m, a in zip(masks, host)]).to(x.device)
        return region_means(flat, regions).view(x.shape[0], 1, *x.shape[-2:])

    def _base_attribution(self, x: Tensor, target: Target, given: Optional[Tensor], steps: int,
                          baselines: Sequence[BaselineSpec], batch_size: Optional[int], create_graph: bool) -> Tensor:
        """(B, H, W): the given attribution or the mean of Integrated Gradients from each baseline, maximum over the
        channels."""
        if given is not None:
            attr = given.to(device=x.device, dtype=accumulation_dtype(x))
            return attr.amax(dim=1) if attr.dim() == 4 else attr
        dtype = accumulation_dtype(x)
        starts = torch.stack([make_baseline(x, b).to(dtype) for b in baselines])  # (K, B, C, H, W)
        deltas = x.to(dtype) - starts
        alphas, weights = (t.to(device=x.device, dtype=dtype) for t in quadrature("linspace", steps))
        count = len(baselines)

        def points(owners: Tensor, step: Tensor) -> Tuple[Tensor, Tensor]:  # step: baseline-major
            which, k = step // steps, step % steps
            delta = deltas[which, owners]
            return starts[which, owners] + alphas[k].view(-1, 1, 1, 1) * delta, \
                delta * (weights[k] / count).view(-1, 1, 1, 1)

        return self._integrate(x, target, count * steps, points, batch_size, create_graph).amax(dim=1)
