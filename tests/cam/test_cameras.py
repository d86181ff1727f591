"""CAMERAS against the authors' procedure written out one image and one resolution at a time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from conftest import cam_cnn


def cameras_written_out(model, layer, x, classes, resolutions):
    """Per image: the image, then bicubic resizes; at each, a forward with a hook keeping the layer's output and a
    backward of the one-hot logit keeping its gradient; the resolutions whose top class is the image's or the
    target's are upsampled bilinearly to the image's size and averaged; ReLU of the channel sum of the product."""
    module = dict(model.named_modules())[layer]
    maps = []
    for image, cls in zip(x, classes):
        size = image.shape[-2:]
        feats, grads, base = [], [], None
        for index, r in enumerate(resolutions):
            rows = image[None] if index == 0 else F.interpolate(
                image[None], size=(size[0] * r // resolutions[0], size[1] * r // resolutions[0]), mode="bicubic",
                align_corners=False)
            saved = {}

            def keep(m, i, out):
                out.retain_grad()
                saved["out"] = out

            handle = module.register_forward_hook(keep)
            logits = model(rows)
            handle.remove()
            logits[0, cls].backward()
            top = int(logits.argmax())
            base = top if base is None else base
            if top in (base, cls):
                feats.append(F.interpolate(saved["out"].detach(), size=size, mode="bilinear", align_corners=False))
                grads.append(F.interpolate(saved["out"].grad, size=size, mode="bilinear", align_corners=False))
        mean_a, mean_g = torch.stack(feats).mean(0), torch.stack(grads).mean(0)
        maps.append(F.relu((mean_a * mean_g).sum(1)))
    return torch.stack(maps)


@pytest.mark.parametrize("layer", ["2", "3"])
def test_cameras_equals_the_authors_procedure_written_out(layer):
    model = cam_cnn()
    torch.manual_seed(4)
    x, classes = torch.randn(3, 3, 32, 32), [2, 5, 9]
    expected = cameras_written_out(model, layer, x, classes, [32, 48, 64])
    ours = A.CAMERAS(model, layer)(x, classes, resolutions=[32, 48, 64], batch_size=2)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


class SizeBiased(nn.Module):
    """cam_cnn, with class 3 made the top class of 48-pixel inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.net = cam_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if x.shape[-1] == 48:
            logits = logits + 1000 * F.one_hot(torch.tensor(3), logits.shape[1]).to(logits)
        return logits


def test_resolutions_whose_top_class_changes_are_left_out_unless_it_is_the_target():
    model = SizeBiased()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    classes = model(x).argmax(1)
    assert (classes != 3).all()
    explainer = A.CAMERAS(model, "net.2")
    with_48 = explainer(x, classes, resolutions=[32, 48, 64])
    without_48 = explainer(x, classes, resolutions=[32, 64])
    torch.testing.assert_close(with_48, without_48)
    # explaining class 3, the 48-pixel resolution counts again
    assert not torch.allclose(explainer(x, 3, resolutions=[32, 48, 64]), explainer(x, 3, resolutions=[32, 64]))
    torch.testing.assert_close(explainer(x, 3, resolutions=[32, 48, 64]),
                               cameras_written_out(model, "net.2", x, [3, 3], [32, 48, 64]), rtol=1e-4, atol=1e-6)


def test_bad_resolutions_name_what_is_wrong():
    explainer, x = A.CAMERAS(cam_cnn(), "2"), torch.randn(1, 3, 32, 32)
    for resolutions in ([], [32, 0], 32, [32.5]):
        with pytest.raises(ValueError, match="resolutions"):
            explainer(x, 1, resolutions=resolutions)


@pytest.mark.parametrize("layer", ["1", "3"])
def test_the_gram_route_equals_the_direct_route(monkeypatch, layer):
    """Small layer maps skip upsampling each channel (their Gram matrices mixed per pixel); the map is the same."""
    import attribution.cam.cameras as cameras

    model = cam_cnn()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(cameras, "GRAM_FACTOR", 0)
    direct = A.CAMERAS(model, layer)(x, [3, 6], resolutions=[32, 40, 56])
    monkeypatch.setattr(cameras, "GRAM_FACTOR", 10 ** 12)
    gram = A.CAMERAS(model, layer)(x, [3, 6], resolutions=[32, 40, 56])
    torch.testing.assert_close(gram, direct, rtol=1e-4, atol=1e-6 * float(direct.abs().max()))


def test_a_fixed_size_model_is_named_with_the_way_out():
    """CAMERAS runs the model at larger resolutions: a timm ViT built for one size refuses them with a bare
    AssertionError; the error names the resolutions and what to do."""
    from conftest import tiny_vit

    with pytest.raises(ValueError, match=r"refused a 23 x 23 input.*dynamic_img_size=True"):
        A.CAMERAS(tiny_vit())(torch.randn(1, 3, 16, 16), 0)
