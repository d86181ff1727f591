"""Extremal perturbations against the authors' TorchRay code, and where the mask goes on a known model."""
from __future__ import annotations

import copy

import pytest
import torch

import attribution as A
from attribution.perturbation.extremal import SmoothMasks, perturb, perturbation_pyramid
from conftest import cam_cnn

extremal = pytest.importorskip("torchray.attribution.extremal_perturbation")


class RegionMean(torch.nn.Module):
    """Two scores ``[f, -f]``, ``f`` the mean of the image over a fixed region."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x[:, :, self.region].mean(dim=(1, 2))
        return torch.stack([f, -f], dim=1)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
@pytest.mark.parametrize("size, step, sigma", [((224, 224), 7, 21.0), ((32, 40), 4, 8.0), ((17, 23), 3, 3.0)])
def test_the_smooth_masks_are_torchrays(size, step, sigma):
    theirs = extremal.MaskGenerator(size, step, sigma)
    ours = SmoothMasks(size, step, sigma, torch.device("cpu"))
    assert list(ours.grid) == list(theirs.shape_in) and list(ours.full) == list(theirs.shape_out)
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=0, atol=0)
    params = torch.rand(3, 1, *ours.grid, generator=torch.Generator().manual_seed(0))
    for mine, reference in zip(ours(params), theirs.generate(params)):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["blur", "fade"])
def test_the_perturbation_pyramid_and_its_interpolation_are_torchrays(kind):
    torch.manual_seed(0)
    x, masks = torch.randn(1, 3, 24, 30), torch.rand(4, 1, 24, 30)
    theirs = extremal.Perturbation(x, num_levels=8, type=kind)
    pyramid = perturbation_pyramid(x, 8, kind, 20.0)
    torch.testing.assert_close(pyramid[0], theirs.pyramid, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(perturb(pyramid.expand(4, -1, -1, -1, -1), masks), theirs.apply(masks),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
@pytest.mark.parametrize("variant", ["preserve", "delete", "dual"])
@pytest.mark.parametrize("kind", ["blur", "fade"])
def test_extremal_perturbation_equals_torchray(variant, kind):
    """Two images, two areas each, 30 iterations with jitter: TorchRay runs one image at a time, its masks of the
    two areas averaged as ours are."""
    model = cam_cnn()
    torch.manual_seed(0)
    x, classes = torch.randn(2, 3, 32, 32), [2, 5]
    options = {"areas": [0.1, 0.3], "step": 4, "sigma": 8.0, "variant": variant, "perturbation": kind}
    expected = torch.cat([
        extremal.extremal_perturbation(copy.deepcopy(model), x[i:i + 1], c, max_iter=30, **options)[0]
        .mean(0, keepdim=True) for i, c in enumerate(classes)])
    ours = A.ExtremalPerturbation(model)(x, classes, iterations=30, batch_size=3, **options)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_the_preserving_mask_covers_the_region_the_score_reads():
    """f = mean of the image over a 10x10 square (0.098 of the image); with fading (a pixel's value scales with its
    mask) the best mask of area 0.1 is the square: after 200 iterations the mask is 0.87 inside, 0.15 outside."""
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[4:14, 18:28] = True
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) + 0.5
    maps = A.ExtremalPerturbation(RegionMean(region))(x, 0, iterations=200, areas=0.1, step=4, sigma=8.0,
                                                       jitter=False, perturbation="fade")[:, 0]
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert (maps[:, region].mean(1) > 0.8).all() and (maps[:, ~region].mean(1) < 0.2).all()


def test_bad_options_name_what_is_wrong():
    explainer, x = A.ExtremalPerturbation(cam_cnn()), torch.randn(1, 3, 32, 32)
    for options, match in (({"areas": 0.0}, "areas"), ({"areas": []}, "areas"), ({"variant": "keep"}, "variant"),
                           ({"perturbation": "noise"}, "perturbation"), ({"iterations": 0}, "iterations"),
                           ({"step": 4, "sigma": 6.0}, "sigma")):
        with pytest.raises(ValueError, match=match):
            explainer(x, 1, **options)
