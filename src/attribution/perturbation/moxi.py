"""MoXI: a greedy order of image patches by their Shapley values and their interactions with the patches already
chosen, found for every image of a call at once (each greedy step is one chunked stream of masked forwards)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cam.base import upsample as bilinear
from ..core.batching import RowPlanner
from ..core.explainer import Explainer, positive_int
from ..core.registry import register
from ..core.targets import Target, apply_score
from ..gradients.base import accumulation_dtype
from ..gradients.paths import BaselineSpec, make_baseline
from .segments import grid_segments

CURVES = ("insertion", "deletion")
HEATMAPS = ("group", "rank", "gain")
UPSAMPLES = ("bilinear", "nearest")


@register("moxi")
class MoXI(Explainer):
    """MoXI (Model eXplanation by Interactions): patches chosen one at a time, each the one that adds the most to
    the target's confidence together with the patches already chosen.

    Sumiyasu, Kawamoto & Kera, "Identifying Important Group of Pixels using Interactions", CVPR 2024,
    arXiv:2401.03785; code github.com/KosukeSumiyasu/MoXI (``src/util/calc_contribution.py``, ``calc_reward.py``,
    ``util_visualize.py``).

    The image is cut into a ``grid`` x ``grid`` partition ``N`` of patches; ``v(S)`` is the target's log-odds
    ``log p / (1 - p) = s_t - logsumexp_{k != t} s_k`` on the image with only the patches ``S`` kept (the others
    set to ``baseline``).  ``curve='insertion'`` (self-context): ``S_0 = {}``, ``S_{k+1} = S_k + argmax_{i not in
    S_k} [phi(i) + I(i, S_k)] = S_k + argmax_i v(S_k + i)``, with the self-context Shapley value ``phi(i) = v({i})
    - v({})`` (the first step) and interaction ``I(i, S) = v(S + i) - v(S) - v({i}) + v({})``.
    ``curve='deletion'`` (full-context): patches are removed, ``S_{k+1} = S_k + argmin_i v(N - S_k - i)`` (the
    full-context Shapley value ``v(N) - v(N - i)`` plus the interaction with the removed ``S_k``).  Ties go to the
    lowest patch index, as the code's ``torch.argmax`` / ``argmin``.  ``interactions=False`` is the paper's
    Shapley-value baseline (the code's ``'self-shapley'``): the patches sorted once by the first step's values.

    The map (``heatmap``): ``'group'`` (the code's ``make_heatmap``): the order is cut where the target becomes the
    model's arg-max (insertion: the first prefix that is classified as the target; deletion: the first removal
    after which it is not), and the ``c`` patches up to there get ``c, c - 1, ..., 1``, the rest 0 (all ``N``
    patches when it never happens); ``'rank'``: every patch its place from the end, ``N, ..., 1``; ``'gain'``: each
    patch the change of ``v`` when it was added (insertion) or removed (deletion, the drop), i.e. ``phi(i) +
    I(i, S_k)`` at its step: the gains sum to ``v(N) - v({})``.  The patch map is resized to the image bilinearly
    (``upsample='bilinear'``, the code's ``cv2.resize``; ``'nearest'`` gives every pixel its patch's value).  Maps
    are raw (the code divides by the maximum for display).  Output (B, 1, H, W).

    Defaults from the authors' code (``load_parser``): ``grid=14`` (``grid_num``), ``curve='insertion'``
    (``curve_method``), ``interactions=True`` (the paper's method, the code's ``identify_method='MoXI'``; the
    parser's default is ``'self-shapley'``, its ``online_identify.sh`` runs both), ``log_odds=True``
    (``softmax_type='modified'``, from the logits: ``score`` must be ``'logit'`` or ``'log_softmax'``; with
    ``log_odds=False`` the ``score`` itself is ``v``: ``'logit'`` is the code's ``'yi'``, ``'log_softmax'`` its
    ``'normal'``), ``baseline='zero'`` (the model-agnostic ``'pixel_zero_values'`` masking: absent pixels are 0 in
    the model's input space), ``heatmap='group'``, ``upsample='bilinear'``.  The log-odds and the ``'group'`` map
    read every class's score, so they need class indices as the target.  The log-odds are computed in float64
    (float32 on MPS): the gains are differences of nearly equal values, about ``-log K`` on a flat prediction.

    Cost (forwards per image, ``n = grid**2``): greedy search ``n (n + 1) / 2 - 1`` (19,305 at ``grid=14``): step
    ``k`` evaluates the ``n - k`` patches left, the last is forced and the chosen prefixes' scores are reused for the
    ``'group'`` cut; ``interactions=False``: ``n``, plus ``n - 1`` prefixes for ``'group'``; ``'gain'`` adds 2 (the
    empty and the full image), or ``n + 1`` with ``interactions=False`` or ``create_graph=True``; ``target=None``
    adds 1.  No backward.  ``batch_size`` rows per forward.  ``create_graph=True`` needs ``heatmap='gain'`` (ranks
    are piecewise constant): the order is found without autograd and the gains along it are recomputed with it.

    Deliberate differences from the code: a greedy step evaluates only the patches not yet chosen, and the last
    step none (the code evaluates all ``n`` each step, ``n**2`` forwards, and discards the chosen ones); the
    ``'group'`` cut reads the prefixes' predictions from the search's own forwards instead of forwarding each
    prefix again; the ViT-aware variant that drops patch tokens (the code's default ``'vit_embedding'``) is not
    offered, absent patches are always masked in pixels; the ``'gain'`` map is this library's addition.
    """

    kind = "perturbation"
    needs_class_indices = True  # unless log_odds=False and heatmap != 'group'
    defaults = {"grid": 14, "curve": "insertion", "interactions": True, "log_odds": True, "baseline": "zero",
                "heatmap": "group", "upsample": "bilinear"}

    def _explain(self, x: Tensor, target: Target, *, grid: int, curve: str, interactions: bool, log_odds: bool,
                 baseline: BaselineSpec, heatmap: str, upsample: str, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        grid = check_options(x, target, grid, curve, interactions, log_odds, heatmap, upsample, create_graph)
        batch, _, height, width = x.shape
        labels = grid_segments(height, width, grid, x.device)
        fill = make_baseline(x, baseline)
        game = Game(self, x, fill, labels, grid * grid, target, log_odds, curve == "insertion", batch_size)
        with torch.no_grad():
            if interactions:
                order, prefix_values, prefix_hits = greedy_order(game)
            else:
                order = shapley_order(game)
                prefix_values = prefix_hits = None
            if heatmap == "group" and prefix_hits is None:
                _, prefix_hits = game.prefixes(order, torch.arange(1, game.n, device=x.device))
        if heatmap == "gain":
            chain = gain_chain(game, order, prefix_values, create_graph)
            values = chain.diff(dim=1) if game.insertion else -chain.diff(dim=1)
        elif heatmap == "rank":
            values = (game.n - torch.arange(game.n, device=x.device)).to(game.dtype).expand(batch, -1)
        else:
            values = group_ranks(prefix_hits, game.insertion).to(game.dtype)
        patch_map = torch.zeros(batch, game.n, dtype=values.dtype, device=x.device).scatter(1, order, values)
        if upsample == "nearest":
            return patch_map[:, labels].unsqueeze(1)
        return bilinear(patch_map.view(batch, 1, grid, grid), (height, width))  # the code's cv2.resize


def check_options(x: Tensor, target: Target, grid: int, curve: str, interactions: bool, log_odds: bool,
                  heatmap: str, upsample: str, create_graph: bool) -> int:
    """Validate the options (errors name the option and its value); returns ``grid``."""
    grid = positive_int(grid, "grid")
    if grid > min(x.shape[-2:]):
        raise ValueError(f"grid must be at most the image's shorter side ({min(x.shape[-2:])}), got {grid}")
    for name, value, allowed in (("curve", curve, CURVES), ("heatmap", heatmap, HEATMAPS),
                                 ("upsample", upsample, UPSAMPLES)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    for name, value in (("interactions", interactions), ("log_odds", log_odds)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if target.classes is None and (log_odds or heatmap == "group"):
        what = "log_odds=True reads every class's score" if log_odds else \
            "heatmap='group' cuts the order where the target becomes the model's arg-max class"
        raise ValueError(f"MoXI's {what}, so it needs class indices as the target, not a callable (pass "
                         "log_odds=False and heatmap='rank' or 'gain' for a callable)")
    if log_odds and target.score not in ("logit", "log_softmax"):
        raise ValueError(f"log_odds=True computes log p / (1 - p) from the model's logits, so it needs score='logit' "
                         f"or 'log_softmax', got score={target.score!r} (pass log_odds=False to explain that score "
                         "itself)")
    if create_graph and heatmap != "gain":
        raise ValueError(f"create_graph=True needs heatmap='gain': heatmap={heatmap!r} is a rank, piecewise "
                         "constant in the model's parameters")
    return grid


class Game:
    """The coalition game of a call: ``values(images, keep)`` is ``v`` of the coalitions ``keep`` (R, n) (the
    patches present, of the ``n`` patches ``labels`` (H, W) marks) on the images ``images`` (R,), ``batch_size`` rows
    per forward, with whether the model's arg-max is the target on each row."""

    def __init__(self, explainer: Explainer, x: Tensor, fill: Tensor, labels: Tensor, n: int, target: Target,
                 log_odds: bool, insertion: bool, batch_size: Optional[int]) -> None:
        self.explainer, self.x, self.fill, self.labels, self.n = explainer, x, fill, labels, n
        self.target, self.log_odds, self.insertion = target, log_odds, insertion
        self.dtype = accumulation_dtype(x)
        # the gains are differences of nearly equal log-odds (about -log K on a flat prediction): float64 keeps the
        # log-sum-exp's rounding below the model's own (MPS has no float64)
        self.log_odds_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        self.rows_per_pass: Optional[int] = batch_size

    def values(self, images: Tensor, keep: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(R,) values of the rows, and (R,) bool "the model's arg-max is the target" (None for a callable)."""
        planner = RowPlanner(images.shape[0], self.rows_per_pass, self.x.device)
        values, hits = [], []
        for start, stop in planner:
            image = images[start:stop]
            present = keep[start:stop][:, self.labels].unsqueeze(1)  # (r, 1, H, W)
            outputs = self.explainer._forward(torch.where(present, self.x[image], self.fill[image]))
            values.append(self.value(outputs, image))
            if self.target.classes is not None:
                hits.append(outputs.argmax(dim=1) == self.target.classes[image])
        self.rows_per_pass = self.rows_per_pass or planner.size  # the size a CUDA probe found, for later steps
        return torch.cat(values), torch.cat(hits) if hits else None

    def value(self, outputs: Tensor, image: Tensor) -> Tensor:
        """``v`` of rows from their raw outputs: the target's score, less the log-sum-exp of the other classes'
        scores with ``log_odds`` (``log p / (1 - p)`` for logits or log-probabilities)."""
        if not self.log_odds:
            return self.target(outputs, image).to(self.dtype)
        outputs = outputs.to(self.log_odds_dtype)
        score = self.target(outputs, image)  # checks the classes' range
        scores = apply_score(outputs, self.target.score)
        own = torch.nn.functional.one_hot(self.target.classes[image], scores.shape[1]).bool()
        return score - scores.masked_fill(own, float("-inf")).logsumexp(dim=1)

    def coalitions(self, removed: Tensor) -> Tensor:
        """The patches present when ``removed`` (R, n) are the chosen ones: chosen = kept (insertion) or
        chosen = deleted (deletion)."""
        return removed if self.insertion else ~removed

    def prefixes(self, order: Tensor, lengths: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """(B, L) values and hits of the first ``lengths`` (L,) patches of each image's ``order`` (B, n) inserted
        (or deleted)."""
        batch = order.shape[0]
        place = torch.empty_like(order).scatter_(1, order, torch.arange(self.n, device=order.device).expand_as(order))
        chosen = place[:, None, :] < lengths[None, :, None]  # (B, L, n)
        images = torch.arange(batch, device=order.device).repeat_interleave(lengths.shape[0])
        values, hits = self.values(images, self.coalitions(chosen.reshape(-1, self.n)))
        return values.view(batch, -1), None if hits is None else hits.view(batch, -1)


def greedy_order(game: Game) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """MoXI's greedy search for every image at once: (B, n) order, and the (B, n - 1) values and hits of the
    prefixes ``S_1 .. S_{n-1}`` (the chosen candidates' rows).  Step ``k`` forwards the ``n - k`` patches not yet
    chosen of every image in one stream; the last patch is forced."""
    batch, n, device = game.x.shape[0], game.n, game.x.device
    rows = torch.arange(batch, device=device)
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=device)
    order = torch.empty(batch, n, dtype=torch.long, device=device)
    # the log-odds' precision (float64) for the prefixes too: the gains are their differences
    prefix_values = torch.empty(batch, n - 1, dtype=game.log_odds_dtype if game.log_odds else game.dtype,
                                device=device)
    prefix_hits = torch.empty(batch, n - 1, dtype=torch.bool, device=device) if game.target.classes is not None \
        else None
    for step in range(n - 1):
        left = n - step
        candidates = (~chosen).nonzero()[:, 1].view(batch, left)  # ascending patch index per image
        trial = chosen.repeat_interleave(left, dim=0)
        trial[torch.arange(batch * left, device=device), candidates.flatten()] = True
        values, hits = game.values(rows.repeat_interleave(left), game.coalitions(trial))
        values = values.view(batch, left)
        best = (values if game.insertion else -values).argmax(dim=1)  # first of ties: the lowest patch index
        pick = candidates.gather(1, best[:, None])[:, 0]
        order[:, step] = pick
        chosen[rows, pick] = True
        prefix_values[:, step] = values.gather(1, best[:, None])[:, 0]
        if prefix_hits is not None:
            prefix_hits[:, step] = hits.view(batch, left).gather(1, best[:, None])[:, 0]
    order[:, n - 1] = (~chosen).nonzero()[:, 1]
    return order, prefix_values, prefix_hits


def shapley_order(game: Game) -> Tensor:
    """The Shapley-value order (``interactions=False``): the first step's values sorted once, stably (insertion:
    highest ``v({i})`` first; deletion: lowest ``v(N - i)`` first)."""
    batch, n, device = game.x.shape[0], game.n, game.x.device
    single = torch.eye(n, dtype=torch.bool, device=device).repeat(batch, 1)
    values, _ = game.values(torch.arange(batch, device=device).repeat_interleave(n), game.coalitions(single))
    return values.view(batch, n).sort(dim=1, descending=game.insertion, stable=True).indices


def gain_chain(game: Game, order: Tensor, prefix_values: Optional[Tensor], create_graph: bool) -> Tensor:
    """(B, n + 1) values of the prefixes ``S_0 .. S_n`` of ``order``: the search's own values with the two ends
    forwarded, or all of them forwarded again (with autograd under ``create_graph``)."""
    device = order.device
    with torch.set_grad_enabled(create_graph):
        if prefix_values is None or create_graph:
            return game.prefixes(order, torch.arange(game.n + 1, device=device))[0]
        ends, _ = game.prefixes(order, torch.tensor([0, game.n], device=device))
    return torch.cat([ends[:, :1], prefix_values, ends[:, 1:]], dim=1)


def group_ranks(prefix_hits: Tensor, insertion: bool) -> Tensor:
    """(B, n) the code's ``make_heatmap`` values along the order: ``c, c - 1, ..., 1, 0, ...`` where ``c`` is the
    first prefix length at which the prediction is the target (insertion) or no longer is (deletion), else ``n``."""
    batch, n = prefix_hits.shape[0], prefix_hits.shape[1] + 1
    flipped = prefix_hits if insertion else ~prefix_hits
    flipped = torch.cat([flipped, torch.ones(batch, 1, dtype=torch.bool, device=flipped.device)], dim=1)
    count = flipped.int().argmax(dim=1) + 1  # the first True (argmax returns the first maximum)
    return (count[:, None] - torch.arange(n, device=flipped.device)).clamp(min=0)

