"""Recipro-CAM against its algorithm written out one image and one location at a time, and closed forms."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.cam.recipro_cam import location_kernel
from conftest import cam_cnn, tiny_cnn, tiny_vit

BINOMIAL = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(3, 3, 32, 32)


def copies_written_out(feature: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """(h*w, C, h, w) copies of one image's (C, h, w) feature: location (i, j)'s vector alone, or that vector times
    the 3x3 binomial kernel on the neighbourhood of (i, j) that lies inside the map."""
    channels, height, width = feature.shape
    copies = torch.zeros(height * width, channels, height, width)
    for i in range(height):
        for j in range(width):
            k = i * width + j
            if not gaussian:
                copies[k, :, i, j] = feature[:, i, j]
                continue
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < height and 0 <= j + dj < width:
                        copies[k, :, i + di, j + dj] = feature[:, i, j] * BINOMIAL[di + 1, dj + 1]
    return copies


def recipro_cam_written_out(model, split: int, x, classes, gaussian: bool, score: str = "softmax"):
    maps = []
    with torch.no_grad():
        for image, cls in zip(x, classes):
            feature = model[:split](image[None])[0]
            outputs = model[split:](copies_written_out(feature, gaussian))
            scores = outputs.softmax(1) if score == "softmax" else outputs
            maps.append(scores[:, cls].view(1, *feature.shape[1:]))
        stacked = torch.stack(maps)
    return F.interpolate(stacked, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("use_tail", [True, False])
def test_recipro_cam_equals_the_algorithm_written_out(x, gaussian, use_tail):
    """A head with convolutions after the layer (block "2", 16x16 locations), softmax score as the authors."""
    model = cam_cnn()
    explainer = A.ReciproCAM(model, "2", gaussian=gaussian, use_tail=use_tail)
    ours = explainer(x, [2, 5, 9], batch_size=100)
    torch.testing.assert_close(ours, recipro_cam_written_out(model, 3, x, [2, 5, 9], gaussian), rtol=1e-4, atol=1e-7)
    assert explainer.last_mode == ("tail" if use_tail else "full")


def test_the_kernel_is_the_binomial_cut_at_the_border():
    for height, width in ((1, 1), (2, 5), (4, 3)):
        expected = torch.stack([copies_written_out(torch.ones(1, height, width), True)[k, 0].flatten()
                                for k in range(height * width)])
        torch.testing.assert_close(location_kernel(height, width, True, torch.device("cpu"), torch.float32), expected)
        assert torch.equal(location_kernel(height, width, False, torch.device("cpu"), torch.float32),
                           torch.eye(height * width))


@pytest.mark.parametrize("gaussian", [False, True])
def test_on_a_linear_head_with_logits_it_is_cam_over_the_locations_plus_the_bias(gaussian):
    """GAP + linear after the layer: g(F M_s)_c = (1 / hw) sum_s' k(s' - s) w_c . F(s) + b_c = mass(s) CAM(s) / hw
    + b_c, with mass(s) the kernel's weight inside the map (1 without the Gaussian)."""
    model = tiny_cnn()
    torch.manual_seed(0)
    x, classes = torch.randn(2, 3, 16, 16), torch.tensor([1, 4])
    with torch.no_grad():
        feature = model[:6](x)  # (2, 16, 8, 8)
    weight, bias = model[8].weight, model[8].bias
    cam = (weight[classes][:, :, None, None] * feature).sum(1, keepdim=True)
    mass = location_kernel(8, 8, gaussian, torch.device("cpu"), torch.float32).sum(1).view(1, 1, 8, 8)
    expected = F.interpolate(mass * cam / 64 + bias[classes].view(2, 1, 1, 1), size=(16, 16), mode="bilinear",
                             align_corners=False)
    ours = A.ReciproCAM(model, "5")(x, classes, score="logit", gaussian=gaussian)
    torch.testing.assert_close(ours, expected.detach(), rtol=1e-5, atol=1e-6)


def test_token_outputs_are_edited_on_the_patch_tokens_only():
    """Reference: a forward hook replaces block 0's patch tokens by the copy's (one location's token, the others 0)
    and keeps the class token; the map is the softmax of the class on the 4x4 patch grid."""
    model = tiny_vit()
    torch.manual_seed(5)
    x, classes = torch.randn(2, 3, 16, 16), [1, 3]
    with torch.no_grad():
        maps = torch.zeros(2, 16)
        for location in range(16):
            def keep_one(module, inputs, output, location=location):
                edited = output.clone()
                edited[:, 1:] = 0
                edited[:, 1 + location] = output[:, 1 + location]
                return edited

            handle = model.blocks[0].register_forward_hook(keep_one)
            maps[:, location] = model(x).softmax(1)[torch.arange(2), classes]
            handle.remove()
    expected = F.interpolate(maps.view(2, 1, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    for use_tail in (True, False):
        torch.testing.assert_close(A.ReciproCAM(model, "blocks.0", use_tail=use_tail)(x, classes), expected,
                                   rtol=1e-4, atol=1e-6)


def test_it_runs_one_forward_and_the_tail_once_per_location(x):
    model = cam_cnn()
    explainer = A.ReciproCAM(model, "3")  # 8x8 locations
    calls = []
    # hooks on leaf modules: a hook on a container the tracer goes through would force full forwards
    handles = [model[0][0].register_forward_hook(lambda m, i, o: calls.append(("head", o.shape[0]))),
               model[6].register_forward_hook(lambda m, i, o: calls.append(("tail", o.shape[0])))]
    try:
        explainer(x, batch_size=64)
        assert explainer.last_mode == "tail"
    finally:
        for handle in handles:
            handle.remove()
    assert [c for c in calls if c[0] == "head"] == [("head", 3)]
    assert sum(n for kind, n in calls if kind == "tail") == 3 + 3 * 64


def test_bad_options_name_what_is_wrong(x):
    with pytest.raises(TypeError, match="gaussian"):
        A.ReciproCAM(cam_cnn(), "3")(x, gaussian="yes")
    with pytest.raises(TypeError, match="use_tail"):
        A.ReciproCAM(cam_cnn(), "3")(x, use_tail=1)
