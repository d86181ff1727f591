"""Numerical parity with PAIR ``saliency`` (saliency.core; test-only dependency), one image at a time as PAIR runs.

PAIR works on (H, W, C) NumPy images through a ``call_model_function``; here it wraps the same float64 torch model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attribution
from conftest import tiny_cnn

pair = pytest.importorskip("saliency.core")

TARGETS = [2, 4]


@pytest.fixture
def model():
    return tiny_cnn().double()


@pytest.fixture
def x():
    torch.manual_seed(5)
    return torch.randn(2, 3, 14, 14, dtype=torch.float64)


def call_model(model, target):
    def call(x_batch, call_model_args=None, expected_keys=None):
        rows = torch.tensor(np.asarray(x_batch), dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_(True)
        (grads,) = torch.autograd.grad(model(rows)[:, target].sum(), rows)
        return {pair.base.INPUT_OUTPUT_GRADIENTS: grads.permute(0, 2, 3, 1).numpy()}

    return call


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy().copy()


def pair_maps(model, x, method, **kwargs) -> torch.Tensor:
    maps = [method.GetMask(hwc(x[i]), call_model(model, t), **kwargs) for i, t in enumerate(TARGETS)]
    return torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float64)).permute(2, 0, 1) for m in maps])


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def test_integrated_gradients(model, x):
    theirs = pair_maps(model, x, pair.IntegratedGradients(), x_steps=25, batch_size=7)
    close(attribution.IntegratedGradients(model)(x, TARGETS, steps=25, baseline="zero", method="linspace"), theirs)


@pytest.mark.parametrize("options", [{}, {"steps": 30, "max_sigma": 7.0, "grad_step": 0.05, "sqrt": True}])
def test_blur_ig(model, x, options):
    pair_options = dict(options)
    if "steps" not in pair_options:
        pair_options = {"steps": 100, "max_sigma": 50, "grad_step": 0.01, "sqrt": False}  # PAIR's defaults
    # batch_size=1: PAIR weighs every step of one of its batches by the sigma increment of the batch's last step,
    # which is wrong whenever the increments differ (sqrt=True); one step per batch is PAIR's correct path
    theirs = pair_maps(model, x, pair.BlurIG(), batch_size=1, **pair_options)
    close(attribution.BlurIG(model)(x, TARGETS, **options), theirs)


class _QuantileShim:
    """PAIR's GuidedIG calls np.quantile(..., interpolation=...), which NumPy 2.4 removed; map it to ``method``."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def quantile(a, q, interpolation="linear", **kwargs):
        return np.quantile(a, q, method=interpolation, **kwargs)


@pytest.mark.parametrize("options", [{"steps": 40}, {"steps": 25, "fraction": 0.1, "max_dist": 0.2}])
def test_guided_ig(model, x, options, monkeypatch):
    monkeypatch.setattr(pair.guided_ig, "np", _QuantileShim())
    settings = {"fraction": 0.25, "max_dist": 0.02, **options}
    theirs = pair_maps(model, x, pair.GuidedIG(), x_steps=settings["steps"], fraction=settings["fraction"],
                       max_dist=settings["max_dist"], x_baseline=np.zeros((14, 14, 3)))
    close(attribution.GuidedIG(model)(x, TARGETS, **options), theirs)


def test_guided_ig_defaults_are_pairs():
    import inspect

    signature = inspect.signature(pair.GuidedIG.GetMask).parameters
    ours = attribution.GuidedIG.defaults
    assert ours["steps"] == signature["x_steps"].default
    assert ours["fraction"] == signature["fraction"].default
    assert ours["max_dist"] == signature["max_dist"].default
    blur = inspect.signature(pair.BlurIG.GetMask).parameters
    for name in ("steps", "max_sigma", "grad_step", "sqrt"):
        assert attribution.BlurIG.defaults[name] == blur[name].default


@pytest.mark.parametrize("magnitude", [True, False])
def test_get_smoothed_mask_with_the_same_noise(model, x, magnitude, monkeypatch):
    samples, spread = 5, 0.15
    image = x[:1]
    # SmoothGrad draws standard normals (B, samples, C, H, W) in float32 and scales them by spread * (max - min)
    torch.manual_seed(7)
    normals = iter(torch.randn((1, samples) + tuple(image.shape[1:]))[0].double())
    monkeypatch.setattr(pair.base.np.random, "normal",
                        lambda loc, scale, size: hwc(next(normals)) * scale)
    theirs = pair.GradientSaliency().GetSmoothedMask(
        hwc(image[0]), call_model(model, TARGETS[0]), stdev_spread=spread, nsamples=samples, magnitude=magnitude
    )
    torch.manual_seed(7)
    process = torch.square if magnitude else None
    ours = attribution.VanillaGradient(model).get_smoothed_mask(image, TARGETS[0], samples=samples, std=spread,
                                                                process=process)
    close(ours, torch.from_numpy(theirs).permute(2, 0, 1)[None].double())  # PAIR sums in float32
