"""Numerical parity with Captum (test-only dependency) on the same model, inputs and targets."""
from __future__ import annotations

import pytest
import torch

import attribution
from conftest import tiny_cnn

captum_attr = pytest.importorskip("captum.attr")

TARGETS = [1, 3]


@pytest.fixture
def model():
    return tiny_cnn().double()


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(2, 3, 12, 12, dtype=torch.float64)


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    theirs = theirs.detach()  # Captum's InputXGradient returns a tensor still in the graph
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


def test_saliency(model, x):
    theirs = captum_attr.Saliency(model).attribute(x, target=TARGETS, abs=False)
    close(attribution.VanillaGradient(model)(x, TARGETS), theirs)


def test_input_x_gradient(model, x):
    theirs = captum_attr.InputXGradient(model).attribute(x, target=TARGETS)
    close(attribution.InputXGradient(model)(x, TARGETS), theirs)


@pytest.mark.parametrize(
    "ours,captums",
    [("left", "riemann_left"), ("right", "riemann_right"), ("middle", "riemann_middle"),
     ("trapezoid", "riemann_trapezoid"), ("gausslegendre", "gausslegendre")],
)
@pytest.mark.parametrize("baseline", ["zero", 0.3])
def test_integrated_gradients(model, x, ours, captums, baseline):
    b = 0.0 if baseline == "zero" else baseline
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x, baselines=b, target=TARGETS, n_steps=20, method=captums
    )
    ig = attribution.IntegratedGradients(model)(x, TARGETS, steps=20, method=ours, baseline=baseline)
    if ours == "trapezoid":
        # Captum's "trapezoid" weighs its n points by 1/n (ends halved), which sums to (n-1)/n, not 1: it is the
        # composite trapezoid rule (weights 1/(n-1)) scaled by (n-1)/n.  Ours is the rule itself (completeness holds).
        ig = ig * 19 / 20
    close(ig, theirs)


def test_guided_backprop(model, x):
    theirs = captum_attr.GuidedBackprop(model).attribute(x, target=TARGETS)
    close(attribution.GuidedBackProp(model)(x, TARGETS), theirs)


def test_deconvolution(model, x):
    theirs = captum_attr.Deconvolution(model).attribute(x, target=TARGETS)
    close(attribution.Deconvnet(model)(x, TARGETS), theirs)


@pytest.mark.parametrize("window,stride,fill", [(4, 2, 0.0), ((3, 5), (2, 3), -0.5)])
def test_occlusion(model, x, window, stride, fill):
    wh, ww = (window, window) if isinstance(window, int) else window
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    theirs = captum_attr.Occlusion(model).attribute(
        x, sliding_window_shapes=(3, wh, ww), strides=(3, sh, sw), baselines=fill, target=TARGETS
    )
    ours = attribution.Occlusion(model)(x, TARGETS, window=window, stride=stride, fill=fill)
    close(ours.expand_as(theirs), theirs.double())  # Captum accumulates occlusion in float32


@pytest.mark.parametrize("variant", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_with_the_same_noise(model, x, variant):
    # both images get the value range [-3, 3], so a relative std of 0.1 is Captum's absolute 0.6 for each
    x = x.clamp(-3, 3)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = -3.0, 3.0
    samples = 6
    torch.manual_seed(11)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type=variant, nt_samples=samples, stdevs=0.6, target=TARGETS, abs=False
    )
    torch.manual_seed(11)  # Captum draws (B * samples) image-major normals at once; so does SmoothGrad
    ours = attribution.SmoothGrad(model, samples=samples, std=0.1, variant=variant)(x, TARGETS)
    close(ours, theirs)


def test_noise_tunnel_with_the_same_noise_when_the_copies_come_in_groups(model, x, monkeypatch):
    """Noisy copies made in several groups (a large batch) still get Captum's noise for the same seed."""
    from attribution.gradients import smoothgrad

    x = x.clamp(-3, 3)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = -3.0, 3.0
    monkeypatch.setattr(smoothgrad, "NOISY_COPY_BYTES", x[0].numel() * x.element_size() * 2 * 2)  # 2 per group
    torch.manual_seed(11)
    theirs = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(
        x, nt_type="smoothgrad", nt_samples=5, stdevs=0.6, target=TARGETS, abs=False
    )
    torch.manual_seed(11)
    close(attribution.SmoothGrad(model, samples=5, std=0.1)(x, TARGETS), theirs)
