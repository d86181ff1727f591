"""The seed's hand-written reshape for transformer layers, for users who want to pass one explicitly.

Every CAM lays out token sequences and channels-last maps by itself (see :mod:`attribution.core.spatial`), reading
the prefix tokens and the patch grid from the model, so this is only needed for layers that rule cannot read.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

from torch import Tensor


def get_reshape_transform(has_cls_token: bool = False, prefix_tokens: Optional[int] = None,
                          grid: Optional[Tuple[int, int]] = None) -> Callable[[Tensor], Tensor]:
    """A ``reshape_transform`` bringing a transformer layer's output to (B, C, h, w), as the seed library's.

    - ``has_cls_token=False`` (the seed's Swin case): a channels-last (B, h, w, C) map is permuted to (B, C, h, w).
    - ``has_cls_token=True`` (the seed's ViT case): a token sequence (B, N, C) loses its first token and the rest
      is laid out row-major on a square grid.

    Beyond the seed: ``prefix_tokens`` drops that many leading tokens instead (2 for DeiT's class and distillation
    tokens, 5 for a class token and 4 registers); ``grid=(h, w)`` gives the patch grid of a non-square input
    (otherwise the grid must be square, and a token count that is not raises an error naming it); a token
    sequence with ``has_cls_token=False`` and no ``prefix_tokens`` keeps all its tokens.
    """
    drop = prefix_tokens if prefix_tokens is not None else int(bool(has_cls_token))
    if drop < 0:
        raise ValueError(f"prefix_tokens must be >= 0, got {prefix_tokens!r}")

    def reshape_transform(x: Tensor) -> Tensor:
        if x.dim() == 4 and prefix_tokens is None and not has_cls_token:
            return x.permute(0, 3, 1, 2)
        if x.dim() != 3:
            raise ValueError(f"expected a token sequence (B, N, C){'' if drop else ' or a (B, h, w, C) map'}, got "
                             f"shape {tuple(x.shape)}")
        patches = x[:, drop:]
        count = patches.shape[1]
        if grid is not None:
            height, width = int(grid[0]), int(grid[1])
        else:
            height = width = math.isqrt(count)
        if height * width != count:
            raise ValueError(f"{count} patch tokens (shape {tuple(x.shape)} less {drop} prefix tokens) do not fill "
                             f"a {'square grid' if grid is None else f'{height}x{width} grid'}; pass grid=(h, w)")
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)

    return reshape_transform
