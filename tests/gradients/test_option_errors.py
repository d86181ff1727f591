"""Bad options of the path and sampling methods get errors that name the option; NumPy integers count as ints."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from attribution import create
from attribution.core.explainer import positive_int
from conftest import tiny_cnn


@pytest.fixture(scope="module")
def model():
    return tiny_cnn()


@pytest.fixture(scope="module")
def x():
    return torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, options, error, message", [
    ("blur_ig", {"max_sigma": "3"}, ValueError, "max_sigma must be a finite number, got '3'"),
    ("blur_ig", {"max_sigma": float("nan")}, ValueError, "max_sigma must be a finite number, got nan"),
    ("blur_ig", {"max_sigma": float("inf")}, ValueError, "max_sigma must be a finite number, got inf"),
    ("blur_ig", {"max_sigma": -1.0}, ValueError, "max_sigma must be a positive number, got -1.0"),
    ("blur_ig", {"grad_step": float("inf")}, ValueError, "grad_step must be a finite number, got inf"),
    ("blur_ig", {"grad_step": 0}, ValueError, "grad_step must be a positive number, got 0"),
    ("blur_ig", {"sqrt": "yes"}, TypeError, "sqrt must be a bool, got 'yes'"),
    ("blur_ig", {"steps": 2.0}, ValueError, "steps must be a positive int, got 2.0"),
    ("guided_ig", {"fraction": "0.2"}, ValueError, r"fraction must be a number in \(0, 1\], got '0.2'"),
    ("guided_ig", {"fraction": 0}, ValueError, r"fraction must be a number in \(0, 1\], got 0"),
    ("guided_ig", {"max_dist": None}, ValueError, r"max_dist must be a number in \[0, 1\], got None"),
    ("guided_ig", {"max_dist": 1.5}, ValueError, r"max_dist must be a number in \[0, 1\], got 1.5"),
    ("expected_gradients", {"references": "blak"}, ValueError, "references must be 'black', .* got 'blak'"),
    ("expected_gradients", {"references": float("nan")}, ValueError, "references must be a finite number"),
    ("integrated_gradients", {"baseline": float("nan")}, ValueError, "baseline must be a finite number, got nan"),
    ("integrated_gradients", {"baseline": torch.zeros(2, 3, 5, 5)}, ValueError,
     r"baseline of shape \(2, 3, 5, 5\) does not broadcast to x's shape \(2, 3, 12, 12\)"),
    ("deeplift_shap", {"references": float("inf")}, ValueError, "references must be a finite number, got inf"),
])
def test_bad_options_are_named(model, x, name, options, error, message):
    small = {"blur_ig": {"steps": 2}, "guided_ig": {"steps": 2}, "expected_gradients": {"samples": 2},
             "integrated_gradients": {"steps": 2}}.get(name, {})
    with pytest.raises(error, match=message):
        create(name, model, **{**small, **options})(x, [0, 1])


@pytest.mark.parametrize("name, option", [("integrated_gradients", "steps"), ("blur_ig", "steps"),
                                          ("guided_ig", "steps"), ("idg", "steps"), ("idgi", "steps"),
                                          ("expected_gradients", "samples"), ("smoothgrad", "samples")])
def test_numpy_integers_are_ints(model, x, name, option):
    """An integer option may be a NumPy integer (e.g. from a config array), as class indices may."""
    extra = {"generator": torch.Generator().manual_seed(1)} if name in ("expected_gradients", "smoothgrad") else {}
    ours = create(name, model, **{option: np.int64(3)}, **extra)(x, [0, 1])
    extra = {"generator": torch.Generator().manual_seed(1)} if extra else {}
    torch.testing.assert_close(ours, create(name, model, **{option: 3}, **extra)(x, [0, 1]))


def test_positive_int():
    assert positive_int(np.int32(4), "n") == 4 and type(positive_int(np.int32(4), "n")) is int
    for bad in (True, 0, -2, 2.0, "3", np.float64(2.0)):
        with pytest.raises(ValueError, match=re.escape(f"n must be a positive int, got {bad!r}")):
            positive_int(bad, "n")
