"""Occlusion: Captum's Occlusion on non-square images and windows, a closed form on a linear model, the fill per
image, defaults and bad options."""
from __future__ import annotations

import pytest
import torch

import attribution
from conftest import CountingModel, LinearModel, tiny_cnn

TARGETS = [1, 3]


@pytest.fixture
def setup():
    model = tiny_cnn().double()
    x = torch.randn(2, 3, 11, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("window, stride", [((4, 6), (3, 5)), ((11, 17), (1, 1)), ((2, 5), (1, 3)), (3, (2, 3))])
@pytest.mark.parametrize("fill", [0.3, "per image"])
def test_equals_captum_on_non_square_images_and_windows(setup, window, stride, fill):
    """Captum's Occlusion with the same window (all channels), stride and baselines: a number, or one fill image
    per example."""
    captum = pytest.importorskip("captum.attr")
    model, x = setup
    if fill == "per image":
        fill = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = stride
    theirs = captum.Occlusion(model).attribute(x, sliding_window_shapes=(3, wh, ww), strides=(3, sh, sw),
                                               baselines=fill, target=TARGETS)
    ours = attribution.Occlusion(model)(x, TARGETS, window=window, stride=stride, fill=fill, batch_size=7)
    assert theirs.isfinite().all()  # every pixel is covered by a window
    # Captum accumulates occlusion in float32
    torch.testing.assert_close(ours.expand_as(theirs), theirs.double(), rtol=1e-5,
                               atol=1e-5 * float(theirs.abs().max()))


def occlusion_written_out(model, image, cls, window, stride, fill):
    """Every window place (Captum's: starts every stride pixels, the last one cut at the edge), one forward each;
    each pixel's mean drop over the windows covering it."""
    (wh, ww), (sh, sw), (_, height, width) = window, stride, image.shape
    total = torch.zeros(height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    with torch.no_grad():
        clean = model(image[None])[0, cls]
        for top in range(0, height, sh):
            for left in range(0, width, sw):
                occluded = image.clone()
                occluded[:, top:top + wh, left:left + ww] = fill[:, top:top + wh, left:left + ww]
                total[top:top + wh, left:left + ww] += clean - model(occluded[None])[0, cls]
                count[top:top + wh, left:left + ww] += 1
                if left + ww >= width:
                    break
            if top + wh >= height:
                break
    return (total / count)[None]


def test_on_a_linear_model_a_window_drops_its_pixels_contribution():
    """f = <w, x> + c: the drop of a window is sum over the window of w (x - fill), so the map is each pixel's mean
    of that over the windows covering it (the loop above), with a fill per image and a (C, 1, 1) fill."""
    model = LinearModel(shape=(3, 9, 10)).double()
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for fill in (torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3)),
                 torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)[:, None, None]):
        ours = attribution.Occlusion(model)(x, [0, 2], window=(3, 4), stride=(2, 3), fill=fill)
        fills = fill.expand_as(x)
        for i, cls in enumerate([0, 2]):
            torch.testing.assert_close(ours[i], occlusion_written_out(model, x[i], cls, (3, 4), (2, 3), fills[i]))
            contribution = (model.linear.weight[cls].detach().view(3, 9, 10) * (x[i] - fills[i])).sum(0)
            corner = contribution[:3, :4].sum()  # only the first window covers pixel (0, 0)
            torch.testing.assert_close(ours[i, 0, 0, 0], corner)


def test_a_fill_per_image_is_that_images_own_whatever_the_batch_size(setup):
    """A (B, C, H, W) fill: image i's windows take fill[i], as when image i is explained alone with fill[i:i+1];
    passes of any size mix rows of different images."""
    model, x = setup
    x = torch.cat([x, x.flip(-1)[:1]])
    fill = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    occlusion = attribution.Occlusion(model, window=4, stride=3)
    alone = torch.cat([occlusion(x[i:i + 1], [1, 3, 0][i], fill=fill[i:i + 1]) for i in range(3)])
    for batch_size in (3, 5, None):
        together = occlusion(x, [1, 3, 0], fill=fill, batch_size=batch_size)
        torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_default_window_and_stride_scale_with_the_image():
    """window round(min(H, W) / 7) and half of it as stride: 32 and 16 at 224x224, 13 x 13 window places."""
    model = CountingModel()
    attribution.Occlusion(model)(torch.randn(1, 3, 224, 224), 0, batch_size=1000)
    assert attribution.Occlusion.defaults == {"window": None, "stride": None, "fill": 0.0}
    assert sum(model.calls) == 1 + 13 * 13


@pytest.mark.parametrize("bad, error, message", [
    ({"fill": "x"}, ValueError, "fill must be"),
    ({"fill": float("nan")}, ValueError, "fill must be a finite number, got nan"),
    ({"fill": float("inf")}, ValueError, "fill must be a finite number, got inf"),
    ({"fill": True}, ValueError, "fill must be"),
    ({"fill": torch.zeros(5, 3, 11, 17)}, ValueError, r"fill .*\(5, 3, 11, 17\)"),
    ({"window": 2.5}, ValueError, "window must be a positive int or a pair of them, got 2.5"),
    ({"stride": 1.5}, ValueError, "stride must be a positive int or a pair of them, got 1.5"),
    ({"window": True}, ValueError, "window must be a positive int or a pair of them, got True"),
    ({"window": (2, 2, 2)}, ValueError, "window must be a positive int or a pair of them"),
    ({"stride": 0}, ValueError, "stride must be a positive int or a pair of them, got 0"),
    ({"window": 12}, ValueError, r"the window \(12, 12\) is larger than the image \(11, 17\)"),
])
def test_bad_options_are_named(setup, bad, error, message):
    model, x = setup
    with pytest.raises(error, match=message):
        attribution.Occlusion(model)(x, 0, **bad)
