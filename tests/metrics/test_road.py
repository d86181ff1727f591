"""ROAD: the imputation against the authors' SciPy solve (as shipped by pytorch-grad-cam), noise, MoRF/LeRF."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attribution.metrics import noisy_linear_impute, road
from attribution.metrics.imputation import NEIGHBOUR_WEIGHTS, _Grid
from toy_models import RegionMean, block

NoisyLinearImputer = pytest.importorskip("pytorch_grad_cam.metrics.road").NoisyLinearImputer


def masks(height: int, width: int) -> torch.Tensor:
    """Removed-pixel masks of different kinds: sparse and dense random pixels, a smooth blob, border strips."""
    generator = torch.Generator().manual_seed(0)
    sparse = torch.rand(height, width, generator=generator) < 0.3
    dense = torch.rand(height, width, generator=generator) < 0.8
    smooth = F.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(height, width), mode="bicubic",
                           align_corners=False)[0, 0]
    blob = smooth > smooth.flatten().quantile(0.15)  # 85 % removed in large connected regions
    border = torch.zeros(height, width, dtype=torch.bool)
    border[:3] = True
    border[:, -2:] = True
    border[height // 2, width // 2] = True
    return torch.stack([sparse, dense, blob, border])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy 2 on the reference's torch-to-NumPy calls
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_imputation_equals_the_reference_in_one_batched_call(dtype, tolerance):
    torch.manual_seed(0)
    images = torch.randn(4, 3, 20, 24)
    removed = masks(20, 24)
    ours = noisy_linear_impute(images.to(dtype), removed, noise=0.0)  # the whole batch, one call
    for i in range(4):
        reference = NoisyLinearImputer(noise=0.0)(images[i], (~removed[i]).float())  # keep-mask: 1 = kept
        torch.testing.assert_close(ours[i].double(), reference.double(), rtol=0, atol=tolerance)
    assert torch.equal(ours.float()[~removed.unsqueeze(1).expand_as(ours)], images[~removed.unsqueeze(1).expand_as(images)])


def test_stencil_has_the_papers_weights():
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    torch.testing.assert_close(_Grid.neighbours(delta)[0, 0, 1:4, 1:4], torch.tensor(NEIGHBOUR_WEIGHTS).float())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_multigrid_solver_converges_in_few_iterations_on_large_holes():
    """96 x 96, 95 % removed in one smooth region: 30 iterations reach the exact solve to 1e-4 in float32 (the
    Jacobi-preconditioned CG this replaces needed several hundred)."""
    torch.manual_seed(2)
    images = torch.randn(2, 3, 96, 96)
    generator = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(2, 1, 5, 5, generator=generator), size=(96, 96), mode="bilinear",
                           align_corners=False)
    removed = smooth >= smooth.flatten(1).quantile(0.05, dim=1).view(2, 1, 1, 1)
    ours = noisy_linear_impute(images, removed, noise=0.0, max_iter=30)
    for i in range(2):
        reference = NoisyLinearImputer(noise=0.0)(images[i], (~removed[i, 0]).float())
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=1e-4)


def test_everything_removed_stays_finite():
    out = noisy_linear_impute(torch.randn(1, 3, 12, 12), torch.ones(1, 1, 12, 12, dtype=torch.bool), noise=0.0)
    assert torch.isfinite(out).all()


def test_noise_has_the_stated_deviation_on_imputed_pixels_only():
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    removed = torch.rand(2, 1, 32, 32) < 0.5
    clean = noisy_linear_impute(images, removed, noise=0.0)
    noisy = noisy_linear_impute(images, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    delta = (noisy - clean)[removed.expand_as(images)]
    assert delta.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(delta.mean().item()) < 1e-3
    assert torch.equal(noisy[~removed.expand_as(images)], images[~removed.expand_as(images)])


def test_morf_and_lerf_on_a_region_model():
    """f = mean over a region of value 1 in a zero image (a quarter of it).  The region's map removes it first:
    MoRF drops to 0 once the region is gone (imputed from zeros), LeRF stays 1 while the region is untouched
    (fractions up to 0.75).  The reversed map swaps the two, so the combined score changes sign."""
    region = block(16, 16, slice(4, 12), slice(4, 12))  # 64 of 256 pixels
    model = RegionMean(region)
    images = region.float().expand(1, 3, 16, 16).clone()
    ideal = region.float()[None, None]
    good = road(model, images, ideal, 0, score="logit", noise=0.0)
    bad = road(model, images, -ideal, 0, score="logit", noise=0.0)
    torch.testing.assert_close(good.lerf[0, :7], torch.ones(7))
    torch.testing.assert_close(good.morf[0, 3:], torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(bad.morf[0, :7], torch.ones(7))
    assert good.combined.item() > 0.3 and bad.combined.item() < -0.3
    torch.testing.assert_close(good.combined, ((good.lerf - good.morf) / 2).mean(dim=1))


def test_road_defaults():
    """Fractions 10 %, ..., 90 % (pytorch-grad-cam's percentiles), noise 0.01 drawn from ``seed``."""
    region = block(12, 12, slice(2, 8), slice(2, 8))
    model = RegionMean(region)
    torch.manual_seed(2)
    images, maps = torch.randn(2, 3, 12, 12), torch.randn(2, 1, 12, 12)
    a, b = road(model, images, maps, 0), road(model, images, maps, 0)
    torch.testing.assert_close(a.fractions, torch.arange(1, 10, dtype=torch.float32) / 10)
    torch.testing.assert_close(a.morf, b.morf)
    assert a.morf.shape == a.lerf.shape == (2, 9)
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(road).parameters.items()}
    assert (defaults["noise"], defaults["seed"], defaults["score"]) == (0.01, 0, "softmax")
    clean = road(model, images, maps, 0, noise=0.0)
    assert not torch.allclose(a.morf, clean.morf, rtol=0, atol=1e-9)  # the default does add noise
    torch.testing.assert_close(a.morf, clean.morf, rtol=0, atol=0.05)  # of the stated small size



def test_road_does_not_depend_on_the_batch():
    """The noise of a step is one draw shared by the images (seeded by ``seed`` and the step alone): an image's
    scores are the same whatever else is in the batch and whatever ``batch_size``."""
    from conftest import tiny_cnn

    model = tiny_cnn().double()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 10, 14, generator=generator, dtype=torch.float64)
    maps = torch.randn(3, 1, 10, 14, generator=generator, dtype=torch.float64)
    target = torch.tensor([1, 3, 0])
    default = road(model, images, maps, target, fractions=(0.2, 0.5))
    for batch_size in (1, 5):
        other = road(model, images, maps, target, fractions=(0.2, 0.5), batch_size=batch_size)
        torch.testing.assert_close(other.morf, default.morf, rtol=0, atol=1e-9)
        torch.testing.assert_close(other.lerf, default.lerf, rtol=0, atol=1e-9)
    alone = road(model, images[2:], maps[2:], target[2:], fractions=(0.2, 0.5))
    torch.testing.assert_close(alone.combined, default.combined[2:], rtol=0, atol=1e-9)


def test_road_noise_is_one_standard_normal_draw_per_step_times_noise():
    """On a linear model the noise moves the logit by ``noise * sum(w * removed * z_k)``, ``z_k`` the step's
    draw: (2 F, C, H, W) standard normals in float64 from a CPU generator seeded with ``seed`` (MoRF steps first)."""
    from toy_models import PixelLinear

    model = PixelLinear(shape=(3, 6, 6)).double()
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64)
    maps = torch.randn(2, 1, 6, 6, generator=generator, dtype=torch.float64)
    fractions = (0.25, 0.5)
    noisy = road(model, images, maps, 0, fractions=fractions, score="logit", seed=7)
    clean = road(model, images, maps, 0, fractions=fractions, score="logit", noise=0.0, seed=7)
    bank = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    order = maps.flatten(1).argsort(dim=1, descending=True)  # distinct values: no ties
    for i in range(2):
        for k, fraction in enumerate(fractions * 2):
            count = round(fraction * 36)
            chosen = order[i, :count] if k < 2 else order[i, 36 - count:]
            removed = torch.zeros(36, dtype=torch.float64)
            removed[chosen] = 1.0
            shift = 0.01 * (model.weight[0] * removed.view(1, 6, 6) * bank[k]).sum()
            got = (noisy.morf if k < 2 else noisy.lerf)[i, k % 2] - (clean.morf if k < 2 else clean.lerf)[i, k % 2]
            torch.testing.assert_close(got, shift.detach(), rtol=1e-7, atol=1e-10)
