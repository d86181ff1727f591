"""TIS: transformer input sampling."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.explainer import Explainer, fraction_list
from ..core.registry import register
from ..core.targets import Target
from .attcat import attention_blocks
from .base import batch_dim, batch_first_tokens, scores_to_image
from .tokens import token_layout

#: k-means stops when the squared shift of an image's centroids falls to this (fast_pytorch_kmeans' default)
KMEANS_TOLERANCE = 1e-4


def kmeans(points: Tensor, clusters: int, iterations: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Lloyd's k-means of each image's points (B, M, P): centroids (B, clusters, P), in float32 or float64.

    Initial centroids are ``clusters`` distinct points, at indices drawn once for the whole batch (so an image's
    result does not depend on the others); an empty cluster keeps its centroid; an image stops once the summed
    squared shift of its centroids is at most 1e-4 (fast_pytorch_kmeans' rule), after ``iterations`` at most.
    """
    batch, count, _ = points.shape
    device = points.device
    gen_device = generator.device if generator is not None else torch.device("cpu")
    start = torch.randperm(count, generator=generator, device=gen_device)[:clusters].to(device)
    centroids = points[:, start]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(dim=2)  # (B, M)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand_as(points), points)
        counts = torch.zeros(batch, clusters, dtype=points.dtype, device=device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=points.dtype))
        moved = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], centroids)
        moved = torch.where(done[:, None, None], centroids, moved)
        done = done | ((moved - centroids) ** 2).sum(dim=(1, 2)).le(KMEANS_TOLERANCE)
        centroids = moved
        if bool(done.all()):
            break
    return centroids


@register("tis")
class TIS(Explainer):
    """TIS (transformer input sampling): the target's score with only some patch tokens left in the sequence,
    averaged per token over masks made from the model's own activations.

    Englebert et al., "Explaining through Transformer Input Sampling", ICCV 2023 Workshops (code:
    aenglebert/Transformer_Input_Sampling).

    The outputs of every block (B, N, D) are concatenated over blocks into (B, N, L*D); each of the L*D features is a
    point over the P patch tokens, and k-means groups them into ``n_masks`` centroids (fewer when there are fewer
    features).  Each centroid, for each ratio r of ``tokens_ratio``, gives a binary mask keeping its ``int(r P)``
    largest tokens.  A mask is scored by a forward in which the sequence entering the first block holds the prefix
    (class, distillation, register) tokens and the kept patch tokens only (the others are removed, not replaced):
    ``s_m = softmax(f(x | tokens of m))_t``.  The map is ``sum_m s_m m / sum_m m`` per token (0 where no mask
    keeps a token), on the patch grid, upsampled bilinearly.

    Defaults from the authors' evaluation configuration: ``n_masks=2048``, ``tokens_ratio=0.25`` (their class
    defaults to 1024 and 0.5), the softmax probability (``score``); k-means as fast_pytorch_kmeans (random
    distinct points as initial centroids, at most ``kmeans_iterations=100`` Lloyd steps, tolerance 1e-4), its
    draws shared by the images of a call (``generator`` fixes them), except that an empty cluster keeps its
    centroid (fast_pytorch_kmeans sets it to the origin, whose top-k mask is then arbitrary).  Maps are raw
    (the authors min-max scale them: ``attribution.utils.normalize_saliency``).  Sequence-first blocks
    (``nn.TransformerEncoderLayer``'s default, (N, B, D) tokens) are supported.  The model must accept a shorter
    token sequence in its blocks: vision transformers whose position embedding is added before the blocks (ViT,
    DeiT; not windowed or relative-position models such as Swin or BEiT, which raise an error).
    Cost: one forward, k-means, and ``n_masks * len(tokens_ratio)`` forwards with a fraction r of the patch tokens
    per image (each also embeds the full image, a small part of a forward).
    """

    kind = "attention"
    defaults = {"n_masks": 2048, "tokens_ratio": (0.25,), "score": "softmax", "kmeans_iterations": 100,
                "generator": None}

    def __init__(self, model: nn.Module, **options) -> None:
        super().__init__(model, **options)
        self._blocks: Dict[Tuple[int, ...], List[str]] = {}

    def _explain(self, x: Tensor, target: Target, *, n_masks: int, tokens_ratio: Union[float, Sequence[float]],
                 kmeans_iterations: int, generator: Optional[torch.Generator], batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        for name, value in (("n_masks", n_masks), ("kmeans_iterations", kmeans_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ratios = fraction_list(tokens_ratio, "tokens_ratio")
        key = tuple(x.shape[1:])
        if key not in self._blocks:
            self._blocks[key] = attention_blocks(self.model, x[:1], self._forward, type(self).__name__)
        modules = dict(self.model.named_modules())
        blocks = [modules[name] for name in self._blocks[key]]
        features = self._block_outputs(x, blocks, batch_size)  # (B, N, L*D)
        size = tuple(x.shape[-2:])
        layout = token_layout(self.model, size, features.shape[1], "the block outputs")
        points = features[:, layout.prefix:].transpose(1, 2)  # (B, L*D, P)
        points = points.double() if points.dtype == torch.float64 else points.float()
        centroids = kmeans(points, min(n_masks, points.shape[1]), kmeans_iterations, generator)
        patches = points.shape[2]
        kept = [centroids.topk(max(1, int(r * patches)), dim=2).indices.sort(dim=2).values for r in ratios]
        dtype = points.dtype
        scores = [self._mask_scores(x, target, blocks[0], index, layout.prefix, batch_size, create_graph).to(dtype)
                  for index in kept]  # each (B, K)
        total = torch.zeros(x.shape[0], patches, dtype=dtype, device=x.device)
        coverage = torch.zeros_like(total)
        for index, score in zip(kept, scores):
            ones = torch.ones(index.shape, dtype=dtype, device=x.device)
            masks = torch.zeros(*index.shape[:2], patches, dtype=dtype, device=x.device).scatter_(2, index, ones)
            total = total + (score[..., None] * masks).sum(dim=1)
            coverage = coverage + masks.sum(dim=1)
        relevance = torch.where(coverage > 0, total / coverage.clamp(min=1), torch.zeros_like(total))
        padded = torch.cat([relevance.new_zeros(x.shape[0], layout.prefix), relevance], dim=1)
        return scores_to_image(padded, layout, size)

    def _block_outputs(self, x: Tensor, blocks: List[nn.Module], batch_size: Optional[int]) -> Tensor:
        """Every block's output for every image, concatenated over blocks: (B, N, L*D)."""
        chunks = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            outputs: List[Tensor] = []
            handles = [b.register_forward_hook(lambda m, args, out: outputs.append(out)) for b in blocks]
            try:
                with torch.no_grad():
                    self._forward(x[start:stop])
            finally:
                for handle in handles:
                    handle.remove()
            rows = stop - start
            if len(outputs) != len(blocks) or any(not isinstance(o, Tensor) or o.dim() != 3 for o in outputs):
                raise ValueError(f"TIS needs every block of {type(self.model).__name__} to return one (B, N, D) "
                                 "token tensor")
            outputs = [batch_first_tokens(o, rows, b) for o, b in zip(outputs, blocks)]  # sequence-first blocks
            if any(o.shape[:2] != outputs[0].shape[:2] or o.shape[0] != rows for o in outputs):
                raise ValueError(f"TIS needs every block of {type(self.model).__name__} to return one (B, N, D) or "
                                 f"sequence-first (N, B, D) token tensor; they return "
                                 f"{sorted({tuple(o.shape) for o in outputs})} for {rows} images")
            chunks.append(torch.cat(outputs, dim=2))
        return torch.cat(chunks)

    def _mask_scores(self, x: Tensor, target: Target, first: nn.Module, kept: Tensor, prefix: int,
                     batch_size: Optional[int], create_graph: bool) -> Tensor:
        """(B, K) target scores of the images with only the patch tokens ``kept`` (B, K, k) entering the blocks."""
        batch, count, _ = kept.shape
        device = x.device
        keep = torch.cat([torch.arange(prefix, device=device).expand(batch, count, prefix), kept + prefix], dim=2)
        parts = []
        for start, stop in RowPlanner(batch * count, batch_size, device):
            rows = torch.arange(start, stop, device=device)
            owners = rows // count
            index = keep.view(batch * count, -1)[rows]

            def sample(module: nn.Module, args: tuple) -> tuple:
                tokens = args[0]
                if batch_dim(tokens, index.shape[0], module) == 1:  # a sequence-first block's (N, B, D) tokens
                    chosen = tokens.gather(0, index.t()[..., None].expand(-1, -1, tokens.shape[-1]))
                else:
                    chosen = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
                return (chosen,) + tuple(args[1:])

            handle = first.register_forward_pre_hook(sample)
            try:
                with torch.set_grad_enabled(create_graph):
                    outputs = self._forward(x[owners])
            except RuntimeError as error:
                raise ValueError(f"TIS removes patch tokens before the first block, which "
                                 f"{type(self.model).__name__} does not accept ({error}); it needs position "
                                 "embeddings added before the blocks and global attention (ViT, DeiT)") from error
            finally:
                handle.remove()
            parts.append(target(outputs, owners))
        return torch.cat(parts).view(batch, count)
