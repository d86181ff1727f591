"""Expected Grad-CAM against its formula written out one image and one draw at a time, its closed forms (Grad-CAM
when the image is its own reference or the score is linear in the layer), the draws it shares with
ExpectedGradients, its defaults, batch independence, create_graph and its argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.expected_grad_cam import ExpectedGradCAM
from conftest import RowCounter, cam_cnn, central_difference


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 32, 32)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def draws(samples, count, shape, seed, dtype=torch.float32):
    """The draws in the order the method documents: reference indices, points (float64), unit noise."""
    generator = seeded(seed)
    chosen = torch.randint(0, count, (samples,), generator=generator)
    alphas = torch.rand(samples, generator=generator, dtype=torch.float64)
    noise = torch.randn((samples,) + tuple(shape), generator=generator, dtype=dtype)
    return chosen, alphas, noise


def expected_grad_cam_written_out(model, x, classes, refs, samples, std, seed):
    """Per image and per draw: the point r + a (x + sigma n - r), the gradient of the class's logit at block "2"
    there, averaged over positions and over the draws (the channel weights), times the image's own activations,
    summed over channels, ReLU, upsampled."""
    chosen, alphas, noise = draws(samples, refs.shape[0], x.shape[1:], seed)
    maps = []
    for image, cls in zip(x, classes):
        sigma = std * (image.max() - image.min())
        weights = 0
        for s in range(samples):
            ref = refs[chosen[s]]
            point = ref + float(alphas[s]) * (image + sigma * noise[s] - ref)
            features = model[:3](point[None]).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model[3:](features)[0, cls], features)
            weights = weights + grad.mean(dim=(2, 3), keepdim=True) / samples
        with torch.no_grad():
            acts = model[:3](image[None])
        maps.append(F.relu((weights * acts).sum(dim=1)))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


def head_linear_net(seed=0):
    """Convolutions and ReLUs, then global average pooling and a linear layer: above its last ReLU ("3") the score is
    linear, so the gradient there is the constant W_c / (h w) at every point."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()


# --------------------------------------------------------------------------------------------- the written-out form
@pytest.mark.parametrize("std", [0.0, 0.2])
def test_equals_its_formula_written_out_one_draw_at_a_time(x, std):
    model = cam_cnn()
    refs = torch.randn(4, 3, 32, 32, generator=seeded(7))
    expected = expected_grad_cam_written_out(model, x, [1, 4, 7], refs, 5, std, seed=3)
    ours = ExpectedGradCAM(model, "2")(x, [1, 4, 7], references=refs, samples=5, std=std, generator=seeded(3),
                                       batch_size=4)  # 15 rows in passes of 4: an image's draws straddle passes
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    assert ours.amax() > 0


def test_a_named_reference_is_each_images_own(x):
    """references='black': each image's own minimum, as ExpectedGradients (and Integrated Gradients) read it."""
    model = cam_cnn()
    ours = ExpectedGradCAM(model, "2")(x, [1, 4, 7], samples=4, std=0.1, generator=seeded(5))
    for i, cls in enumerate([1, 4, 7]):
        black = x[i].min().expand(1, 3, 32, 32)
        expected = expected_grad_cam_written_out(model, x[i:i + 1], [cls], black, 4, 0.1, seed=5)
        torch.testing.assert_close(ours[i:i + 1], expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ closed forms
def test_with_the_image_as_its_reference_and_no_noise_it_is_grad_cam(x):
    """Every point r + a (x - r) is the image itself: the expected gradient is Grad-CAM's gradient."""
    model = cam_cnn()
    for i, cls in enumerate([1, 4, 7]):
        image = x[i:i + 1]
        ours = ExpectedGradCAM(model, "2")(image, cls, references=image, samples=3, std=0.0, generator=seeded(i))
        torch.testing.assert_close(ours, A.GradCAM(model, "2")(image, cls), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("std", [0.0, 0.3])
def test_where_the_score_is_linear_in_the_layer_it_is_grad_cam_whatever_is_drawn(x, std):
    model = head_linear_net()
    refs = torch.randn(5, 3, 32, 32, generator=seeded(1))
    ours = ExpectedGradCAM(model, "3")(x, [0, 2, 4], references=refs, samples=4, std=std, generator=seeded(2))
    torch.testing.assert_close(ours, A.GradCAM(model, "3")(x, [0, 2, 4]), rtol=1e-5, atol=1e-6)


def test_it_shares_expected_gradients_draws():
    """At a layer that is the input itself (an Identity in front of the net), with the zero reference and no noise,
    ExpectedGradients gives x * mean_s g_s with the same points a_s (same seed): the channel weights are the spatial
    mean of EG / x, and the map is ReLU(sum_c w_c x_c)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Identity(), cam_cnn()).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eg = A.ExpectedGradients(model)(x, [3, 6], references="zero", samples=6, generator=seeded(9))
    weights = (eg / x).mean(dim=(2, 3), keepdim=True)
    expected = F.relu((weights * x).sum(dim=1, keepdim=True))
    ours = ExpectedGradCAM(model, "0")(x, [3, 6], references="zero", samples=6, std=0.0, generator=seeded(9))
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------- invariants
def test_defaults_and_the_number_of_passes(x):
    assert ExpectedGradCAM.defaults["references"] == "black"
    assert ExpectedGradCAM.defaults["samples"] == 50
    assert ExpectedGradCAM.defaults["std"] == 0.15
    assert ExpectedGradCAM.defaults["generator"] is None
    assert "score" not in ExpectedGradCAM.defaults  # Grad-CAM's: the logit
    assert A.get_method("expected_grad_cam") is ExpectedGradCAM
    model = cam_cnn()
    for target in ([1, 2], None):  # the images' own forward resolves target=None: no extra pass
        counter = RowCounter(model)
        ExpectedGradCAM(model, "2")(x[:2], target)
        counter.close()
        assert sum(counter.rows) == 2 * (1 + 50)
    # the defaults are what the explicit options give
    torch.testing.assert_close(ExpectedGradCAM(model, "2", samples=3)(x, [1, 4, 7], generator=seeded(0)),
                               ExpectedGradCAM(model, "2")(x, [1, 4, 7], samples=3, references="black", std=0.15,
                                                           generator=seeded(0), score="logit"))


def test_target_none_is_the_images_own_class(x):
    model = cam_cnn()
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    explainer = ExpectedGradCAM(model, "2", samples=3)
    torch.testing.assert_close(explainer(x, generator=seeded(1)), explainer(x, classes, generator=seeded(1)))


def test_an_images_map_does_not_depend_on_the_batch_or_the_batch_size(x):
    model = cam_cnn()
    refs = torch.randn(3, 3, 32, 32, generator=seeded(6))
    explainer = ExpectedGradCAM(model, "2", samples=4, references=refs)
    together = explainer(x, [1, 4, 7], generator=seeded(8), batch_size=5)
    alone = torch.cat([explainer(x[i:i + 1], cls, generator=seeded(8)) for i, cls in enumerate([1, 4, 7])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    # the same seed draws the same; another seed draws other references, points and noise
    torch.testing.assert_close(explainer(x, [1, 4, 7], generator=seeded(8)), together, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(explainer(x, [1, 4, 7], generator=seeded(9)), together)


def test_create_graph_gives_the_maps_true_parameter_derivative(x):
    """With create_graph the maps (the images' activations and the weights summed over passes) are differentiable
    w.r.t. the weights below and above the layer, and their derivative is the finite difference (float64, the same
    draws at every evaluation; GELUs for ReLUs, so that no finite-difference step crosses a kink of the net)."""
    model = cam_cnn().double()
    for block in model[:4]:
        block[2] = nn.GELU()
    x = x.double()
    refs = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=seeded(3))
    explainer = ExpectedGradCAM(model, "2", samples=3, std=0.1, references=refs, batch_size=4)
    maps = explainer(x, [1, 4, 7], create_graph=True, generator=seeded(4))
    torch.testing.assert_close(maps.detach(), explainer(x, [1, 4, 7], generator=seeded(4)))
    weights = (model[1][0].weight, model[3][0].weight)
    grads = torch.autograd.grad(maps.sum(), weights)
    for weight, grad in zip(weights, grads):
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=seeded(1))
        difference = central_difference(lambda: explainer(x, [1, 4, 7], generator=seeded(4)).sum(), weight,
                                        direction)
        torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-5, atol=1e-8)


def test_bad_options_name_what_is_wrong(x):
    explainer = ExpectedGradCAM(cam_cnn(), "2", samples=2)
    cases = (({"samples": 0}, ValueError, "samples"), ({"samples": 2.5}, ValueError, "samples"),
             ({"samples": True}, ValueError, "samples"), ({"std": -0.1}, ValueError, "std"),
             ({"std": "high"}, ValueError, "std"), ({"std": True}, ValueError, "std"),
             ({"std": float("nan")}, ValueError, "std"), ({"generator": 3}, TypeError, "generator"),
             ({"references": "grey"}, ValueError, "references"), ({"references": [0.0]}, TypeError, "references"),
             ({"references": torch.zeros(2, 3, 16, 16)}, ValueError, "references"),
             ({"layer_fusion": "sum"}, ValueError, "layer_fusion"))
    for options, error, match in cases:
        with pytest.raises(error, match=match):
            explainer(x, 1, **options)
    with pytest.raises(TypeError, match="noise"):
        ExpectedGradCAM(cam_cnn(), "2", noise=0.1)
