"""Bad CAM options raise an error that names the option, before any map is made (no truthy strings, NaN or
negative values taken silently); good values of other numeric types still work."""
from __future__ import annotations

import pytest
import torch

import attribution as A
from conftest import cam_cnn

NAN, INF = float("nan"), float("inf")

BAD = [
    ("fullgrad", {"per_channel": "no"}, TypeError, "per_channel must be a bool, got 'no'"),
    ("fullgrad", {"per_channel": 1}, TypeError, "per_channel must be a bool"),
    ("score_cam", {"baseline": "yes"}, TypeError, "baseline must be a bool, got 'yes'"),
    ("score_cam", {"channel_softmax": 1}, TypeError, "channel_softmax must be a bool, got 1"),
    ("is_cam", {"baseline": None}, TypeError, "baseline must be a bool"),
    ("ss_cam", {"std": -1.0}, ValueError, "std must be a non-negative number, got -1.0"),
    ("ss_cam", {"std": "2"}, ValueError, "std must be a non-negative number, got '2'"),
    ("ss_cam", {"std": NAN}, ValueError, "std must be a non-negative number, got nan"),
    ("ss_cam", {"generator": 3}, TypeError, "generator must be a torch.Generator or None, got int"),
    ("ss_cam", {"samples": 0}, ValueError, "samples must be a positive int, got 0"),
    ("smooth_grad_cam_plusplus", {"generator": 3}, TypeError, "generator must be a torch.Generator or None"),
    ("smooth_grad_cam_plusplus", {"samples": 2.0}, ValueError, "samples must be a positive int, got 2.0"),
    ("fem", {"k": NAN}, ValueError, "k must be a finite number, got nan"),
    ("fem", {"k": "2"}, ValueError, "k must be a finite number, got '2'"),
    ("kpca_cam", {"degree": 2.5}, ValueError, "degree must be a positive int, got 2.5"),
    ("kpca_cam", {"gamma": "auto"}, ValueError, "gamma must be a positive number, got 'auto'"),
    ("kpca_cam", {"gamma": 0.0}, ValueError, "gamma must be a positive number, got 0.0"),
    ("kpca_cam", {"coef0": INF}, ValueError, "coef0 must be a finite number, got inf"),
    ("ablation_cam", {"ablation_value": "min"}, ValueError, "ablation_value must be a finite number, got 'min'"),
    ("ablation_cam", {"ablation_value": NAN}, ValueError, "ablation_value must be a finite number, got nan"),
    ("finer_cam", {"alpha": "one"}, ValueError, "alpha must be a finite number, got 'one'"),
    ("finer_cam", {"alpha": INF}, ValueError, "alpha must be a finite number, got inf"),
]


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(1, 3, 16, 16)


@pytest.mark.parametrize("name, options, error, message", BAD, ids=[f"{b[0]}-{next(iter(b[1]))}" for b in BAD])
def test_bad_options_name_the_option(name, options, error, message, x):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        A.create(name, cam_cnn(), target_layer="2", **options)(x, 1)


@pytest.mark.parametrize("name, good, same", [
    ("ablation_cam", {"ablation_value": 0}, {"ablation_value": 0.0}),
    ("finer_cam", {"alpha": 1}, {"alpha": 1.0}),
    ("fem", {"k": 2}, {"k": 2.0}),
    ("kpca_cam", {"coef0": 1, "gamma": 1}, {"coef0": 1.0, "gamma": 1.0}),
    ("ss_cam", {"std": 0, "samples": 2}, {"std": 0.0, "samples": 2}),
])
def test_integer_values_of_numeric_options_still_work(name, good, same, x):
    model = cam_cnn()
    torch.testing.assert_close(A.create(name, model, target_layer="2", **good)(x, 1),
                               A.create(name, model, target_layer="2", **same)(x, 1))


@pytest.mark.parametrize("name", ["grad_cam", "fullgrad", "ablation_cam"])
def test_a_target_layer_of_another_type_is_named(name, x):
    with pytest.raises(TypeError, match="target_layer must be a dotted name, a module or a list of them, got int"):
        A.create(name, cam_cnn(), target_layer=3)(x, 1)
