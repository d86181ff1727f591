"""A detection-style synthetic task that a tiny ViT learns in seconds, for checks that a wrong token reshape or
a transposed grid would fail: class 1 has a small pattern in one random patch of a non-square patch grid, class 0
has none.  Explaining class 1 on held-out class-1 images, a correct map peaks in the pattern's patch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PATCH = 4
GRID = (3, 5)  # patch rows, patch columns: non-square on purpose
PATTERN = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0], [1.0, -1.0, 1.0, -1.0],
                        [-1.0, 1.0, -1.0, 1.0]]) * 1.5


@dataclass
class Task:
    model: nn.Module
    images: torch.Tensor  # held-out class-1 images (N, 3, 12, 20)
    patches: torch.Tensor  # (N,) index of the patch holding the pattern, row-major


def make_images(count: int, generator: torch.Generator, with_pattern: bool):
    images = 0.5 * torch.randn(count, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=generator)
    patches = torch.randint(0, GRID[0] * GRID[1], (count,), generator=generator)
    if with_pattern:
        for i, p in enumerate(patches.tolist()):
            r, c = divmod(p, GRID[1])
            images[i, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] += PATTERN
    return images, patches


def train_task(seed: int = 0, steps: int = 400, depth: int = 3, **vit_options) -> Task:
    """Train the tiny ViT (``depth`` blocks; ``vit_options`` go to timm's ``VisionTransformer``, e.g.
    ``global_pool='avg'``) and return it with 200 held-out class-1 images."""
    from timm.models.vision_transformer import VisionTransformer

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    options = dict(embed_dim=32, num_heads=2, mlp_ratio=2.0, **vit_options)
    model = VisionTransformer(img_size=(GRID[0] * PATCH, GRID[1] * PATCH), patch_size=PATCH, depth=depth,
                              num_classes=2, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        positive, _ = make_images(32, generator, True)
        negative, _ = make_images(32, generator, False)
        x = torch.cat([positive, negative])
        y = torch.cat([torch.ones(32), torch.zeros(32)]).long()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    images, patches = make_images(200, generator, True)
    with torch.no_grad():
        negatives, _ = make_images(200, generator, False)
        accuracy = ((model(images).argmax(1) == 1).float().mean() + (model(negatives).argmax(1) == 0).float().mean()) / 2
    assert accuracy > 0.95, f"the tiny ViT did not learn the task (accuracy {accuracy:.2f})"
    return Task(model, images, patches)


def pointing_rate(maps: torch.Tensor, patches: torch.Tensor) -> float:
    """Share of images whose map, pooled per patch, peaks in the pattern's patch (a constant map, e.g. all zero,
    points nowhere and counts as a miss)."""
    pooled = nn.functional.avg_pool2d(maps.sum(1, keepdim=True), PATCH).flatten(1)
    informative = pooled.amax(1) > pooled.amin(1)
    return float(((pooled.argmax(1) == patches) & informative).float().mean())


def transposed(maps: torch.Tensor) -> torch.Tensor:
    """The maps as a wrong reshape would give them: patch scores laid out column-major on the same grid."""
    pooled = nn.functional.avg_pool2d(maps.sum(1, keepdim=True), PATCH)  # (N, 1, 3, 5)
    wrong = pooled.flatten(1).view(-1, 1, GRID[1], GRID[0]).transpose(-1, -2)
    return nn.functional.interpolate(wrong, scale_factor=PATCH, mode="nearest")
