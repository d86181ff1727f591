"""Layer outputs laid out as (B, C, h, w): CNN maps, channels-last maps, token sequences, and the errors that make a
wrong guess impossible to miss; the seed's get_reshape_transform; channel positions for ablation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution.core.capture import LayerCapture, channel_positions
from attribution.core.spatial import SpatialLayout, spatial_layout, token_layout
from attribution.utils import get_reshape_transform


class PatchModel(nn.Module):
    """Declares a patch size and prefix tokens the way timm models do, and nothing else."""

    def __init__(self, patch: int = 4, prefix: int = 1) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.patch_size = (patch, patch)
        self.num_prefix_tokens = prefix


def test_cnn_maps_stay_as_they_are():
    conv = nn.Conv2d(3, 64, 3)
    layout = spatial_layout(nn.Sequential(conv), (64, 96), (2, 64, 16, 24), "0", conv)
    assert layout == SpatialLayout("nchw", 16, 24)
    # odd sizes: ceil(225 / 32) = 8, floor(321 / 32) = 10; and a 4-D map neither reading explains stays NCHW
    assert spatial_layout(nn.Sequential(conv), (225, 321), (1, 512, 8, 10), "0").kind == "nchw"
    assert spatial_layout(nn.Sequential(conv), (64, 64), (1, 7, 3, 5), "0").kind == "nchw"


def test_channels_last_maps_are_permuted():
    model = nn.Sequential(nn.LayerNorm(96))
    layout = spatial_layout(model, (224, 320), (2, 7, 10, 96), "0")
    assert layout == SpatialLayout("nhwc", 7, 10)
    t = torch.randn(2, 7, 10, 96)
    assert torch.equal(layout(t), t.permute(0, 3, 1, 2))


def test_ties_are_broken_by_the_layer_then_the_model():
    """(B, 8, 8, 8) on a 32x32 input reads both ways: convolutions are channels-first, LayerNorm channels-last,
    other layers follow the model's declared format."""
    conv, norm, block = nn.Conv2d(3, 8, 4, 4), nn.LayerNorm(8), nn.Sequential(nn.GELU())
    model = nn.Sequential(conv, norm, block)
    shape = (1, 8, 8, 8)
    assert spatial_layout(model, (32, 32), shape, "0", conv).kind == "nchw"
    assert spatial_layout(model, (32, 32), shape, "1", norm).kind == "nhwc"
    assert spatial_layout(model, (32, 32), shape, "2", block).kind == "nchw"
    model.output_fmt = "NHWC"  # as timm's Swin declares
    assert spatial_layout(model, (32, 32), shape, "2", block).kind == "nhwc"


@pytest.mark.parametrize("prefix", [1, 2, 5])
def test_token_sequences_drop_the_prefix_and_use_the_non_square_patch_grid(prefix):
    model = PatchModel(patch=8, prefix=prefix)
    layout = spatial_layout(model, (24, 40), (2, prefix + 15, 6), "blocks.0")
    assert layout == SpatialLayout("tokens", 3, 5, prefix)
    tokens = torch.randn(2, prefix + 15, 6)
    grid = layout(tokens)
    assert grid.shape == (2, 6, 3, 5)
    assert torch.equal(grid[1, 4, 2, 3], tokens[1, prefix + 2 * 5 + 3, 4])  # row-major patches, prefix dropped
    # the patch embedding's output comes before the prefix tokens are prepended
    assert spatial_layout(model, (24, 40), (2, 15, 6), "patch_embed") == SpatialLayout("tokens", 3, 5, 0)


def test_tokens_of_models_that_declare_nothing_use_the_one_stride_that_fits():
    model = nn.Sequential(nn.Linear(4, 4))  # no patch size, no prefix: a token stage of a hybrid or hierarchical net
    assert token_layout(model, (32, 64), 8).tokens == 8
    assert spatial_layout(model, (32, 64), (1, 8, 4), "0") == SpatialLayout("tokens", 2, 4, 0)  # stride 16


def test_shapes_that_cannot_be_laid_out_name_the_layer_and_the_shape():
    model = PatchModel(patch=8, prefix=1)
    with pytest.raises(ValueError, match=r"cannot lay out the 17 tokens of layer 'blocks.3' \(output shape "
                                         r"\(2, 17, 6\)\).*input \(24, 40\), 1 prefix tokens"):
        spatial_layout(model, (24, 40), (2, 17, 6), "blocks.3")
    with pytest.raises(ValueError, match=r"the output of layer 'head' has shape \(2, 10\); CAMs need"):
        spatial_layout(model, (24, 40), (2, 10), "head")


class TokenNet(nn.Module):
    """A 4x4-patch embedding, a class token, and a linear mixer over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 6, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.num_prefix_tokens = 1

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
        t = self.mix(t)
        return self.head(t[:, 0] + t[:, 1:].mean(1))


def test_capture_lays_out_activations_and_gradients_alike():
    torch.manual_seed(0)
    model = TokenNet().eval()
    x = torch.randn(2, 3, 12, 20)
    with LayerCapture([model.mix], model=model, image_size=x.shape[-2:]) as capture:
        out = model(x)
    raw = capture.outputs[0]
    (raw_grad,) = torch.autograd.grad(out[:, 1].sum(), raw, retain_graph=True)
    (act,) = capture.activations()
    (grad,) = capture.gradients(out[:, 1].sum())
    assert act.shape == grad.shape == (2, 6, 3, 5)
    assert torch.equal(act[0, :, 1, 2], raw[0, 1 + 1 * 5 + 2])
    assert torch.equal(grad[1, :, 2, 4], raw_grad[1, 1 + 2 * 5 + 4])


def test_get_reshape_transform_keeps_the_seeds_semantics():
    tokens = torch.randn(2, 1 + 16, 8)
    vit = get_reshape_transform(has_cls_token=True)(tokens)
    assert torch.equal(vit, tokens[:, 1:].reshape(2, 4, 4, 8).permute(0, 3, 1, 2))
    swin = torch.randn(2, 7, 7, 8)
    assert torch.equal(get_reshape_transform()(swin), swin.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"15 patch tokens .* do not fill a square grid; pass grid"):
        get_reshape_transform(has_cls_token=True)(torch.randn(2, 16, 8))


def test_get_reshape_transform_with_prefix_tokens_and_a_non_square_grid():
    tokens = torch.randn(2, 2 + 15, 8)
    out = get_reshape_transform(prefix_tokens=2, grid=(3, 5))(tokens)
    assert torch.equal(out[0, :, 1, 4], tokens[0, 2 + 1 * 5 + 4])
    assert get_reshape_transform()(torch.randn(1, 16, 8)).shape == (1, 8, 4, 4)  # tokens with no prefix


def test_channel_positions_find_each_channels_elements():
    layout = SpatialLayout("tokens", 2, 3, 1)
    positions = channel_positions(layout, (1, 7, 4), "blocks.0")  # 1 + 6 tokens, 4 channels
    assert positions.shape == (4, 6)
    assert positions[2].tolist() == [(1 + t) * 4 + 2 for t in range(6)]  # channel 2 of every patch token
    nhwc = channel_positions(SpatialLayout("nhwc", 2, 2), (1, 2, 2, 3), "0")
    assert nhwc[1].tolist() == [1, 4, 7, 10]
    with pytest.raises(ValueError, match="does not just select and rearrange"):
        channel_positions(lambda t: layout(t) * 2, (1, 7, 4), "blocks.0")
