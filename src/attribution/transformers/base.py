"""Base of transformer-native methods: maps computed from the attention probabilities of every block."""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import Explainer
from ..core.rules import batch_dimension
from ..core.targets import Target
from ..gradients.paths import BaselineSpec, make_baseline
from .attention import AttentionCapture, block_attention
from .tokens import TokenLayout, token_layout


class AttentionExplainer(Explainer):
    """Runs the model with :class:`AttentionCapture`, checks the captured maps, and turns token relevance into a
    (B, 1, H, W) map: the class token's row over the patch tokens (a distilled DeiT's: the mean of its class and
    distillation tokens' rows; for models without a class token, which pool their patch tokens, also by attention
    as timm's ``global_pool='map'``, the mean of the patch tokens' rows), on the model's patch grid, upsampled
    bilinearly to the input size."""

    kind = "attention"
    #: the first pass's rows are the images themselves, so ``target=None`` takes each row's arg-max from it (methods
    #: whose rows are path points or per-block predictions set it back to False)
    argmax_on_rows = True
    #: True when the method needs the gradient of the target score w.r.t. each attention map
    needs_gradients = False
    #: True when :meth:`_relevance` takes ``scores``, the attention scores before the softmax of every block
    needs_scores = False
    #: True when :meth:`_relevance` takes ``layout``, the model's :class:`TokenLayout` (which rows the map reads)
    needs_layout = False

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool,
                 **options) -> Tensor:
        self._check_options(**options)
        owners = torch.arange(x.shape[0], device=x.device)
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            rows = self._model_input(x[start:stop])
            track = self.needs_gradients or create_graph
            with torch.set_grad_enabled(track), self._capturing(stop - start) as capture:
                outputs = self._forward(rows.requires_grad_(True) if track else rows)
            attention = self._checked(capture.maps, stop - start)
            layout = token_layout(self.model, tuple(x.shape[-2:]), attention[0].shape[-1], "the attention maps")
            gradients = None
            scores = target(outputs, owners[start:stop])  # validated even where unused (class-agnostic maps)
            if self.needs_gradients:
                gradients = self._attention_gradients(scores, attention, create_graph)
                gradients = tuple(_at_least_float32(g) for g in gradients)
            attention = [_at_least_float32(a) for a in attention]
            extra: Dict[str, Any] = {}
            if self.needs_scores:  # the blocks' (an attention-pooling head's come after them, see _checked)
                extra["scores"] = self._scores(capture.scores[:len(attention)], create_graph)
            if self.needs_layout:
                extra["layout"] = layout
            with torch.set_grad_enabled(create_graph):
                relevance = self._relevance(attention, gradients, **options, **extra)
            maps.append(self._to_image(relevance, layout, tuple(x.shape[-2:])))
        return torch.cat(maps)

    def _check_options(self, **options: Any) -> None:
        """Raise for bad values of the method's own options, before any forward (what needs the model, such as a
        block index's range, is checked once its attention is known)."""

    def _capturing(self, rows: int) -> ContextManager[AttentionCapture]:
        """The context the model's forward of ``rows`` images runs in: it records the attention maps."""
        return AttentionCapture(self.model)

    def _attention_gradients(self, scores: Tensor, attention: List[Tensor],
                             create_graph: bool) -> Tuple[Tensor, ...]:
        """The gradient of the target's scores w.r.t. each attention map (``needs_gradients``)."""
        return torch.autograd.grad(scores.sum(), attention, create_graph=create_graph)

    def _block_names(self, x: Tensor) -> List[str]:
        """The model's blocks for inputs shaped like ``x`` (found once per input shape, see
        :func:`attribution.transformers.attcat.attention_blocks`)."""
        from .attcat import attention_blocks  # attcat's explainer builds on this module

        cache: Dict[Tuple[int, ...], List[str]] = self.__dict__.setdefault("_block_cache", {})
        key = tuple(x.shape[1:])
        if key not in cache:
            cache[key] = attention_blocks(self.model, x[:1], self._forward, type(self).__name__)
        return cache[key]

    def _blocks(self, x: Tensor) -> Tuple[List[str], List[nn.Module]]:
        """The model's blocks for inputs shaped like ``x``: their names (:meth:`_block_names`) and the modules."""
        names = self._block_names(x)
        modules = dict(self.model.named_modules())
        return names, [modules[name] for name in names]

    def _forward_capturing(self, rows: Tensor, handles: List[Any]) -> Tuple[Tensor, AttentionCapture]:
        """The model's outputs for ``rows`` (differentiable w.r.t. them) and the attention it computed; the hook
        ``handles`` the caller registered for this forward are removed afterwards, whatever happens."""
        try:
            with torch.enable_grad(), AttentionCapture(self.model) as capture:
                outputs = self._forward(self._model_input(rows).requires_grad_(True))
        finally:
            for handle in handles:
                handle.remove()
        return outputs, capture

    def _integrated_last_attention(self, x: Tensor, target: Target, steps: int, baseline: BaselineSpec,
                                   batch_size: Optional[int], create_graph: bool, every_block: bool,
                                   at_image: Callable[[List[Tensor], List[Tensor]], Tensor],
                                   check_blocks: Callable[[int], None]) -> Tuple[Tensor, Tensor]:
        """The integrated-gradient weighting of Beyond Intuition and TAM, and what they read at the image itself.

        Over ``steps`` points ``x' + a_k (x - x')`` of the straight path from ``baseline`` (``a_k = linspace(0, 1,
        steps)``, the last point ``x`` exactly): returns ``W = mean_heads ReLU(1/steps sum_k dA_last(point_k))``
        (B, N, N), the target's gradient w.r.t. the last block's attention averaged over the path, and
        ``at_image(attention, gradients)`` of the images themselves, with every block's attention and gradient
        there (``every_block``; otherwise only the last block's gradient).  The images (the path's last point) run
        first, in chunks of ``batch_size``, their backward reaching every block only when ``every_block``;
        ``check_blocks`` gets the number of attention blocks after the first chunk's forward, before any backward
        (a block option out of range fails early).  Then the ``steps - 1`` interior points of each path, rows
        image-major in chunks of ``batch_size``, each backward stopping at the last block's attention.
        """
        reference = make_baseline(x, baseline)
        alphas = torch.linspace(0, 1, steps, dtype=x.dtype, device=x.device)
        batch = x.shape[0]
        summed: Optional[Tensor] = None
        kept: Optional[Tensor] = None
        for start, stop in RowPlanner(batch, batch_size, x.device):
            image = torch.arange(start, stop, device=x.device)
            outputs, capture = self._forward_capturing(x[start:stop], [])
            attention = self._checked(capture.maps, stop - start)
            if start == 0:
                check_blocks(len(attention))
            wrt = attention if every_block else attention[-1:]
            gradients = list(torch.autograd.grad(target(outputs, image).sum(), wrt, create_graph=create_graph))
            if not create_graph:
                attention = [a.detach() for a in attention]
            attention = [_at_least_float32(a) for a in attention]
            gradients = [_at_least_float32(g) for g in gradients]
            last = gradients[-1]
            summed = last.new_zeros((batch,) + tuple(last.shape[1:])) if summed is None else summed
            summed = summed.index_add(0, image, last)
            value = at_image(attention, gradients)
            kept = value.new_zeros((batch,) + tuple(value.shape[1:])) if kept is None else kept
            kept = kept.index_copy(0, image, value)
        interior = steps - 1
        for start, stop in RowPlanner(batch * interior, batch_size, x.device):
            index = torch.arange(start, stop, device=x.device)
            image, point = index // interior, index % interior  # image-major rows: an image's path is contiguous
            rows = reference[image] + alphas[point].view(-1, 1, 1, 1) * (x[image] - reference[image])
            outputs, capture = self._forward_capturing(rows, [])
            attention = self._checked(capture.maps, rows.shape[0])
            (last,) = torch.autograd.grad(target(outputs, image).sum(), attention[-1], create_graph=create_graph)
            summed = summed.index_add(0, image, _at_least_float32(last))  # type: ignore[union-attr]
        return (summed / steps).clamp(min=0).mean(dim=1), kept  # type: ignore[operator,return-value]

    def _relevance(self, attention: List[Tensor], gradients: Optional[Tuple[Tensor, ...]], **options) -> Tensor:
        """(B, N, N) token-to-token relevance from per-block (B, heads, N, N) attention (and its gradients)."""
        raise NotImplementedError

    def _scores(self, scores: List[Optional[Tensor]], create_graph: bool) -> List[Tensor]:
        if any(s is None for s in scores):
            raise ValueError(f"{type(self).__name__} could not read the attention scores before the softmax in "
                             f"{type(self.model).__name__}'s forward pass")
        return [_at_least_float32(s if create_graph else s.detach()) for s in scores]  # type: ignore[union-attr]

    def _checked(self, maps: List[Tensor], batch: int) -> List[Tensor]:
        """The blocks' attention maps (an attention-pooling head's calls left out, see :func:`block_attention`),
        checked to be square self-attention over one token sequence for ``batch`` images."""
        maps = block_attention(maps)
        if not maps:
            raise ValueError(
                f"{type(self).__name__} found no attention in {type(self.model).__name__}'s forward pass; it needs "
                "a transformer whose attention runs through F.scaled_dot_product_attention, nn.MultiheadAttention "
                "or timm's Attention"
            )
        shapes = {tuple(m.shape[-2:]) for m in maps}
        if any(m.shape[0] != batch for m in maps) or len(shapes) != 1 or maps[0].shape[-1] != maps[0].shape[-2]:
            raise ValueError(
                f"{type(self).__name__} needs global self-attention over one token sequence in every block; "
                f"{type(self.model).__name__} has attention of shapes {sorted({tuple(m.shape) for m in maps})} "
                f"for a batch of {batch} (windowed attention such as Swin's cannot be rolled out)"
            )
        return maps

    @staticmethod
    def _to_image(relevance: Tensor, layout: TokenLayout, size: Tuple[int, int]) -> Tensor:
        """(B, N, N) token relevance to a (B, 1, H, W) map: the rows the head reads (the class token's, or the mean
        of the class and distillation tokens' rows for a distilled DeiT; the mean of the patch tokens' rows for
        models that pool them) over the patch tokens."""
        rows = relevance[:, :layout.readout].mean(dim=1) if layout.class_token \
            else relevance[:, layout.prefix:].mean(dim=1)
        return scores_to_image(rows, layout, size)


def scores_to_image(scores: Tensor, layout: TokenLayout, size: Tuple[int, int]) -> Tensor:
    """(B, N) token scores to a (B, 1, H, W) map: the patch tokens on their grid, upsampled bilinearly (to the
    padded extent, then cropped to the input, for models that pad the image to whole patches)."""
    grid = scores[:, layout.prefix:].reshape(-1, 1, layout.height, layout.width)
    if layout.extent is None:
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    padded = F.interpolate(grid, size=layout.extent, mode="bilinear", align_corners=False)
    return padded[..., :size[0], :size[1]]


def sequence_first(block: nn.Module) -> bool:
    """Whether ``block`` holds an ``nn.MultiheadAttention`` built with ``batch_first=False`` as a direct child
    (``nn.TransformerEncoderLayer``'s default), so that its tokens are (N, B, D), as the rules of
    :class:`attribution.core.rules.SequenceFirstScope` decide."""
    return any(isinstance(c, nn.MultiheadAttention) and not c.batch_first for c in block.children())


def batch_dim(tokens: Tensor, rows: int, block: nn.Module) -> int:
    """The dimension of a block's token tensor (entering or leaving it) that holds the pass's ``rows`` images: 0
    for (B, N, D), 1 for a sequence-first block's (N, B, D); read from the shape, and from the block
    (:func:`sequence_first`) when both dimensions have that size."""
    return batch_dimension(tokens, rows, sequence_first(block))


def batch_first_tokens(tokens: Tensor, rows: int, block: nn.Module) -> Tensor:
    """A block's token tensor as (B, N, D) (:func:`batch_dim`)."""
    return tokens.transpose(0, 1) if batch_dim(tokens, rows, block) == 1 else tokens


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


#: the ``head_fusion`` options of :func:`fuse_heads`
HEAD_FUSIONS = ("mean", "max", "min")


def check_head_fusion(how: Any) -> None:
    if not isinstance(how, str) or how not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {how!r}")


def fuse_heads(attention: Tensor, how: str) -> Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    check_head_fusion(how)
    if how == "mean":
        return attention.mean(dim=1)
    return attention.amax(dim=1) if how == "max" else attention.amin(dim=1)
