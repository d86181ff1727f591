"""The random-logit test: does the map change when another class is explained?

Sixt, Granz & Landgraf, "When Explanations Lie: Why Many Modified BP Attributions Fail", ICML 2020,
arXiv:1912.09818.  A map that explains the model's decision for class ``t`` should differ from the map for some
other class ``o`` of the same image; methods whose maps ignore the class (modified back-propagation rules that
converge to an image reconstruction) give the same map for both.  The score is the similarity of the two maps,

    RL(x) = SSIM(Phi_t(x), Phi_o(x)),   o drawn uniformly from the classes other than t,

so lower is better.  Protocol and defaults as Quantus 0.6.0's ``RandomLogit``; differences are named in
:func:`random_logit`.  (The model- and data-randomisation sanity checks of Adebayo et al. live in
:mod:`attribution.metrics.sanity`.)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.targets import TargetSpec, resolve_target
from .common import check_images
from .robustness import _forward, _result_dtype, prepare_maps

Similarity = Callable[[Tensor, Tensor], Tensor]
K1, K2 = 0.01, 0.03


def pair_ssim(a: Tensor, b: Tensor, win_size: int = 7, flatten: bool = False) -> Tensor:
    """Mean SSIM of each pair of maps ``a[i]``, ``b[i]`` (B, C, H, W), (B,), as Quantus' ``ssim`` similarity calls
    scikit-image's ``structural_similarity``: uniform ``win_size`` windows lying inside the map, sample
    covariances, ``K1 = 0.01``, ``K2 = 0.03``, and ``data_range`` the spread (max - min) of the pair's values.

    ``flatten=False``: each channel is a 2-D image and the channels' SSIMs are averaged (scikit-image's
    ``channel_axis``); ``flatten=True``: each map is one 1-D signal of C*H*W values in memory order (what Quantus
    hands scikit-image).  A pair of equal constant maps (zero range, SSIM 0/0) scores 1.
    """
    x, y = a.to(torch.float64), b.to(torch.float64)
    batch = x.shape[0]
    if flatten:
        x, y = x.reshape(batch, 1, -1), y.reshape(batch, 1, -1)
        pool, points = (lambda t: F.avg_pool1d(t, win_size, stride=1)), win_size
    else:
        pool, points = (lambda t: F.avg_pool2d(t, win_size, stride=1)), win_size ** 2
    if min(x.shape[2:]) < win_size:
        raise ValueError(f"maps of size {tuple(x.shape[2:])} are smaller than the SSIM window {win_size}")
    both = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
    spread = (both.amax(dim=1) - both.amin(dim=1)).view(-1, *([1] * (x.dim() - 1)))
    c1, c2 = (K1 * spread) ** 2, (K2 * spread) ** 2
    correction = points / (points - 1)
    mx, my = pool(x), pool(y)
    vx = correction * (pool(x * x) - mx * mx)
    vy = correction * (pool(y * y) - my * my)
    cxy = correction * (pool(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    value = s.flatten(1).mean(dim=1)
    return torch.where(spread.flatten() > 0, value, torch.ones_like(value))


def _as_images(maps: Tensor, batch: int) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() not in (3, 4) or maps.shape[0] != batch:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"the explainer must return (B, C, H, W) or (B, H, W) maps for B = {batch}, got {shape}")
    return maps.detach().unsqueeze(1) if maps.dim() == 3 else maps.detach()


def random_logit(explainer: Callable[..., Tensor], images: Tensor, target: TargetSpec = None, *,
                 normalise: bool = True, absolute: bool = False, flatten: bool = False,
                 similarity: Optional[Similarity] = None, other: Optional[Tensor] = None,
                 num_classes: Optional[int] = None, model: Optional[nn.Module] = None,
                 generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None) -> Tensor:
    """Random-logit similarity of ``explainer`` at each image (B,); lower is better.  See the module docstring.

    ``target``: class indices (``None``: the model's arg-max).  The other class is ``other`` (B,) if given, else
    the target shifted by one draw from ``1 .. num_classes - 1`` (``generator``) shared by the images, so uniform over
    the other classes for each image and independent of the rest of the batch (Quantus draws per image;
    ``num_classes`` defaults to the width of the model's output; Quantus' default is 1000, and it reseeds NumPy's
    global generator with 42 on every call).  Maps are normalised by their largest magnitude (``normalise``, per image here: Quantus
    divides the whole batch by one maximum) and optionally made absolute, then compared by ``similarity(a, b) ->
    (B,)`` on (B, C, H, W) maps, by default :func:`pair_ssim`.

    Deliberate difference: Quantus flattens each map to one 1-D signal before SSIM (7-value windows running across
    rows and channels); the default here is the paper's image SSIM (7 x 7 windows per channel, averaged over
    channels).  ``flatten=True`` reproduces Quantus.  Cost: two explanations of the batch, plus one forward when
    the target or the number of classes has to be read from the model.
    """
    check_images(images)
    batch, device = images.shape[0], images.device
    resolved = resolve_target(target, batch, device)
    if resolved.objective is not None:
        raise ValueError("random_logit needs class indices as the target, not a callable objective")
    if similarity is not None and not callable(similarity):
        raise TypeError("similarity must be a callable f(maps_a, maps_b) -> (B,) or None")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ValueError(f"num_classes must be an int of at least 2, got {num_classes!r}")
    classes = resolved.classes
    if classes is None or (num_classes is None and other is None):
        model = model if model is not None else getattr(explainer, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError("give model= (an nn.Module), or an explainer with a .model, to pick the target class "
                            "or count the classes")
        outputs = _forward(model, images, batch_size)
        classes = outputs.argmax(dim=1) if classes is None else classes
        num_classes = outputs.shape[1] if num_classes is None else num_classes
    if other is None:
        if num_classes < 2:
            raise ValueError("the model has a single output: there is no other class to explain")
        if int(classes.max()) >= num_classes or int(classes.min()) < 0:
            raise ValueError(f"target classes must lie in [0, {num_classes}), got {classes.tolist()}")
        # one draw shared by the images (an image's class does not depend on the batch): a shift of 1 .. K - 1
        shift = torch.randint(1, num_classes, (1,), generator=generator).to(device)
        other = (classes + shift) % num_classes  # uniform over the other classes
    else:
        other = torch.as_tensor(other, device=device).reshape(-1)
        if other.shape != (batch,) or other.is_floating_point() or bool((other == classes).any()):
            raise ValueError("other must hold one class index per image, each different from the target")
        other = other.long()
    first, second = (_as_images(explainer(images, c), batch) for c in (classes, other))
    first = prepare_maps(first, normalise, absolute).view(first.shape)
    second = prepare_maps(second, normalise, absolute).view(second.shape)
    value = pair_ssim(first, second, flatten=flatten) if similarity is None else similarity(first, second)
    return value.to(_result_dtype(images))
