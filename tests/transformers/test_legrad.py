"""LeGrad: the authors' algorithm written out (each chosen block's output through the model's own norm and head,
the gradient w.r.t. that block's attention) on timm's and torchvision's ViTs, and its options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from conftest import tiny_vit

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("timm")


def written_out(model: nn.Module, blocks, x: torch.Tensor, classes, head, prefix: int, grid) -> torch.Tensor:
    """Per chosen block: its output tokens, head(tokens)[class], the gradient w.r.t. its attention probabilities
    (captured by the block's own explicit attention), ReLU, mean over heads and queries, summed over blocks."""
    outputs, maps = [], []
    hooks = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in blocks]
    with attribution.transformers.AttentionCapture(model) as capture:
        model(x.clone().requires_grad_(True))
    for h in hooks:
        h.remove()
    maps = capture.maps[-len(blocks):]
    total = 0
    for tokens, a in zip(outputs, maps):
        score = head(tokens)[torch.arange(len(classes)), classes].sum()
        (grad,) = torch.autograd.grad(score, a, retain_graph=True)
        total = total + grad.clamp(min=0).mean(dim=(1, 2))
    patches = total[:, prefix:].reshape(-1, 1, *grid)
    return F.interpolate(patches, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("start_block", [-1, 0])
def test_equals_the_algorithm_on_timms_vit(fused, start_block):
    model = tiny_vit(fused=fused)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blocks = list(model.blocks)[start_block:]
    expected = written_out(model, blocks, x, [1, 3, 0], lambda t: model.forward_head(model.norm(t)), 1, (4, 4))
    ours = attribution.LeGrad(model, start_block=start_block)(x, [1, 3, 0])
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected)


def test_equals_the_algorithm_on_torchvisions_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=6).eval()
    nn.init.normal_(model.heads.head.weight, std=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blocks = list(model.encoder.layers)[-2:]
    expected = written_out(model, blocks, x, [2, 5], lambda t: model.heads(model.encoder.ln(t)[:, 0]), 1, (4, 4))
    torch.testing.assert_close(attribution.LeGrad(model)(x, [2, 5]), expected)


def test_bad_start_block():
    model, x = tiny_vit(), torch.randn(1, 3, 16, 16)
    for bad in (2, -3, 1.0):
        with pytest.raises(ValueError, match="start_block must be an int from -2 to 1"):
            attribution.LeGrad(model)(x, 0, start_block=bad)


def test_hierarchical_transformers_are_refused_by_name():
    """LeGrad feeds every chosen block's output to the model's last layers: Swin's stages return tokens of
    different shapes, which gave torch's bare "Sizes of tensors must match" before."""
    import timm

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, embed_dim=16,
                              depths=(1, 1), num_heads=(1, 1), img_size=32, window_size=2).eval()
    with pytest.raises(ValueError, match=r"blocks must return tokens of one shape.*Swin are not supported"):
        attribution.LeGrad(model)(torch.randn(1, 3, 32, 32), 0)
