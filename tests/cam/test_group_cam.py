"""Group-CAM against the authors' algorithm written out one image and one group at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.core.filters import gaussian_blur
from conftest import cam_cnn

tvf = pytest.importorskip("torchvision.transforms.functional")


@pytest.fixture
def x():
    torch.manual_seed(11)
    return torch.randn(3, 3, 32, 32)


def test_the_blur_is_torchvisions_and_kornias_reflected_gaussian(x):
    torch.testing.assert_close(gaussian_blur(x, 51, 50.0, padding="reflect"),
                               tvf.gaussian_blur(x, [51, 51], [50.0, 50.0]), rtol=1e-5, atol=1e-6)


def group_cam_written_out(model, x, classes, groups, percentile):
    """Per image: Grad-CAM weights, torch.chunk groups, NumPy percentile threshold, one unveiled copy per group."""
    blurred = tvf.gaussian_blur(x, [51, 51], [50.0, 50.0])
    maps = []
    for image, soft, cls in zip(x, blurred, classes):
        acts = model[:3](image[None]).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model[3:](acts)[0, cls], acts)
        weighted = grad.mean((2, 3), keepdim=True) * acts.detach()
        with torch.no_grad():
            base = model(soft[None]).softmax(1)[0, cls]
            total = torch.zeros(1, 1, 32, 32)
            for chunk in weighted.chunk(groups, 1):
                group = chunk.sum(1, keepdim=True).relu()
                group = torch.where(group > float(np.percentile(group.numpy(), percentile)), group, 0.0)
                up = F.interpolate(group, size=(32, 32), mode="bilinear", align_corners=False)
                if up.max() == up.min():
                    continue
                mask = (up - up.min()) / (up.max() - up.min())
                score = model(image[None] * mask + soft[None] * (1 - mask)).softmax(1)[0, cls] - base
                total += score * mask
        maps.append(total.relu()[0])
    return torch.stack(maps)


@pytest.mark.parametrize("groups, percentile", [(8, 70.0), (5, 70.0), (32, 50.0)])
def test_group_cam_equals_the_algorithm_written_out(x, groups, percentile):
    model = cam_cnn()
    ours = A.GroupCAM(model, "2", groups=groups, percentile=percentile)(x, [2, 5, 9], batch_size=4)
    expected = group_cam_written_out(model, x, [2, 5, 9], groups, percentile)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_group_cam_counts_its_forwards(x):
    calls = []
    model = cam_cnn()
    handle = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        A.GroupCAM(model, "2", groups=5)(x, 0, batch_size=100)
    finally:
        handle.remove()
    assert calls == [3, 3, 15]  # the images (with the layer gradient), the blurred images, 5 unveiled copies each


@pytest.mark.parametrize("bad, message", [({"groups": 0}, "groups must be a positive int"),
                                          ({"percentile": 101}, r"percentile must lie in \[0, 100\]"),
                                          ({"blur_size": 2.5}, "blur_size must be a positive int"),
                                          ({"blur_sigma": 0.0}, "blur_sigma must be a positive number")])
def test_bad_options_are_named(x, bad, message):
    with pytest.raises(ValueError, match=message):
        A.GroupCAM(cam_cnn(), "2")(x, 0, **bad)
