"""Fusion-CAM against the authors' code (codeforpaper64/Fusion-CAM) written out one image at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.cam.base import min_max_scale
from attribution.cam.fusion_cam import AUTHORS_SCORE_CAM, FusionCAM, denoise, similarity_fusion
from conftest import RowCounter, cam_cnn, central_difference, tiny_cnn

SPLIT = 3  # cam_cnn()[:3] ends at block "2": 32 channels at 16 x 16 for 32 x 32 inputs


@pytest.fixture
def x():
    torch.manual_seed(5)
    return torch.randn(3, 3, 32, 32, dtype=torch.float64)


@pytest.fixture
def model():
    return cam_cnn().double()


def normalize_heatmap(heatmap):
    """The authors' BaseCAM.normalize_heatmap: subtract the minimum, divide by the maximum when it is positive."""
    heatmap = heatmap - heatmap.min()
    return heatmap / heatmap.max() if heatmap.max() > 0 else heatmap


def upsample(maps, size):
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def authors_grad_cam(model, image, cls, theta):
    """gradcam.py + BaseCAM.generate_cam (logit gradient, ReLU, upsample, normalise), then the denoising of
    fusioncam.py: np.percentile threshold, pixels below it set to 0, normalised again."""
    acts = model[:SPLIT](image).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model[SPLIT:](acts)[0, cls], acts)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True)).detach()
    heatmap = normalize_heatmap(upsample(cam, image.shape[-2:])[0, 0]).numpy().copy()
    threshold = np.percentile(heatmap, theta)
    heatmap[heatmap < threshold] = 0
    return torch.from_numpy(normalize_heatmap(heatmap))


def authors_score_cam(model, image, cls):
    """scorecam.py: one masked copy per channel, softmax over channels of the raw logits, ReLU, normalise."""
    with torch.no_grad():
        acts = model[:SPLIT](image)[0]
        ups = [upsample(a[None, None], image.shape[-2:])[0, 0] for a in acts]
        logits = torch.stack([model(image * normalize_heatmap(u))[0, cls] for u in ups])
        weights = F.softmax(logits - logits.max(), dim=0)
        return normalize_heatmap(F.relu(sum(w * u for w, u in zip(weights, ups))))


def authors_fusion(model, image, cls, L_denoising, L_region):
    """fusioncam.py's generate_cam after the two component maps (raw: before its final normalize_heatmap)."""
    with torch.no_grad():
        def prob(mask):
            return model(image * mask).softmax(1)[0, cls]

        black = model(torch.zeros_like(image)).softmax(1)[0, cls]
        b_denoising, b_region = float(prob(L_denoising) - black), float(prob(L_region) - black)
        total = b_denoising + b_region + 1e-8
        b_denoising, b_region = b_denoising / total, b_region / total
        L_de_region = normalize_heatmap(b_denoising * L_denoising + b_region * L_region)
        b_de_region = float(prob(L_de_region) - black)
        total = b_de_region + b_region + 1e-8
        b_de_region, b_region = b_de_region / total, b_region / total
        L1, L2 = L_de_region * b_de_region, L_region * b_region
        sim = np.clip(1 - np.abs(L1.numpy() - L2.numpy()), 0, 1)
        fused = sim * np.maximum(L1.numpy(), L2.numpy()) + (1 - sim) * 0.5 * (L1.numpy() + L2.numpy())
        return torch.from_numpy(fused)


def fusion_cam_written_out(model, x, classes, theta, region=None):
    maps = []
    for i, cls in enumerate(classes):
        image = x[i:i + 1]
        L_denoising = authors_grad_cam(model, image, cls, theta)
        L_region = authors_score_cam(model, image, cls) if region is None else region[i, 0]
        maps.append(authors_fusion(model, image, cls, L_denoising, L_region))
    return torch.stack(maps).unsqueeze(1)


@pytest.mark.parametrize("theta, classes", [(10.0, [2, 2, 0]), (0, [2, 0, 0]), (50, [0, 2, 2]), (10, [2, 9, 5])])
def test_equals_the_authors_code_written_out(model, x, theta, classes):
    ours = FusionCAM(model, "2", theta=theta)(x, classes, batch_size=5)
    expected = fusion_cam_written_out(model, x, classes, theta)
    assert expected.amax() > 0
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)
    # the authors' output is the same map min-max scaled
    torch.testing.assert_close(min_max_scale(ours), torch.stack([normalize_heatmap(m) for m in expected]))


def test_another_region_cam_enters_the_same_fusion(model, x):
    """region_method='group_cam': the library's Group-CAM map, min-max scaled, in place of the authors' Score-CAM."""
    ours = FusionCAM(model, "2", region_method="group_cam", region_options={"groups": 4})(x, [2, 0, 2])
    region = min_max_scale(A.GroupCAM(model, "2", groups=4)(x, [2, 0, 2]))
    torch.testing.assert_close(ours, fusion_cam_written_out(model, x, [2, 0, 2], 10.0, region), rtol=1e-7,
                               atol=1e-9)


def test_equal_component_maps_have_a_closed_form(model, x):
    """Both components Grad-CAM and theta=0 (nothing denoised): L_d = L_r = L = N(Grad-CAM), so with
    b = f(x L) - f(0): a = b / (2b + eps), L_c = L, c = b / (b + a + eps), r = a / (b + a + eps), and the map is
    s max(c, r) L + (1 - s) (c + r) L / 2 with s = clip(1 - |c - r| L, 0, 1) (L >= 0).  Here b < 0 for the first
    image (masking by its Grad-CAM lowers class 2 below the all-zero image's), so |c - r| > 1 and s = 0 at L = 1."""
    classes = [2, 0, 2]
    ours = FusionCAM(model, "2", gradient_method="grad_cam", region_method=A.GradCAM, theta=0)(x, classes)
    L = min_max_scale(A.GradCAM(model, "2")(x, classes))
    with torch.no_grad():
        index = torch.tensor(classes)
        b = (model(x * L).softmax(1) - model(torch.zeros_like(x[:1])).softmax(1))[torch.arange(3), index]
    a = b / (2 * b + 1e-8)
    c, r = (v.view(-1, 1, 1, 1) for v in (b / (b + a + 1e-8), a / (b + a + 1e-8)))
    s = (1 - (c - r).abs() * L).clamp(0, 1)
    assert b[0] < 0 and b[1:].gt(0).all()
    torch.testing.assert_close(ours, s * torch.maximum(c, r) * L + (1 - s) * (c + r) * L / 2)


def test_similarity_fusion_keeps_agreement_and_averages_conflict():
    torch.manual_seed(0)
    L = torch.rand(2, 1, 5, 5)
    torch.testing.assert_close(similarity_fusion(L, L), L)  # agreement: the shared value
    torch.testing.assert_close(similarity_fusion(L, L + 1.5), L + 0.75)  # |diff| >= 1: the mean
    other = torch.rand(2, 1, 5, 5)
    fused = similarity_fusion(L, other)
    torch.testing.assert_close(fused, similarity_fusion(other, L))
    assert (fused <= torch.maximum(L, other) + 1e-7).all() and (fused >= (L + other) / 2 - 1e-7).all()


def test_denoise_is_numpys_percentile_threshold():
    torch.manual_seed(1)
    maps = torch.rand(3, 1, 7, 9, dtype=torch.float64)
    for theta in (0.0, 10.0, 37.5, 100.0):
        expected = maps.clone()
        for m in expected:
            m[m < np.percentile(m.numpy(), theta)] = 0
        torch.testing.assert_close(denoise(maps, theta), expected)
    torch.testing.assert_close(denoise(maps, 0.0), maps)  # nothing below the minimum
    assert (denoise(maps, 100.0) > 0).flatten(1).sum(1).tolist() == [1, 1, 1]  # only the maximum survives


def test_defaults_are_the_authors():
    explainer = FusionCAM(cam_cnn())
    assert FusionCAM.defaults["theta"] == 10.0  # fusioncam.py: theta=10
    assert FusionCAM.defaults["score"] == "softmax"  # the contributions are softmax probabilities
    assert type(explainer.gradient) is A.GradCAM and type(explainer.region) is A.ScoreCAM
    assert AUTHORS_SCORE_CAM == {"score": "logit", "channel_softmax": True, "baseline": False}
    assert A.get_method("fusion_cam") is FusionCAM and FusionCAM.kind == "cam"


def test_default_region_options_are_the_authors_score_cam(model, x):
    explainer = FusionCAM(model, "2")
    default = explainer(x, [2, 0, 2])
    torch.testing.assert_close(explainer(x, [2, 0, 2], region_options=AUTHORS_SCORE_CAM), default)
    # options given are laid over the authors' settings, not in place of them
    torch.testing.assert_close(explainer(x, [2, 0, 2], region_options={"progress": False}), default)
    library = explainer(x, [2, 0, 2], region_options={"score": "softmax", "channel_softmax": False, "baseline": True})
    assert (library - default).abs().max() > 1e-3  # the library's Score-CAM (probabilities, baseline)


def test_batch_independence_and_batch_size(model, x):
    explainer = FusionCAM(model, "2")
    together = explainer(x, [2, 0, 2])
    for i, cls in enumerate([2, 0, 2]):
        torch.testing.assert_close(explainer(x[i:i + 1], cls), together[i:i + 1])
    torch.testing.assert_close(explainer(x, [2, 0, 2], batch_size=1), together)
    torch.testing.assert_close(explainer(x, None), explainer(x, model(x).argmax(1)))


def test_counts_its_forwards(x):
    model = cam_cnn().double()
    counter = RowCounter(model)
    try:
        FusionCAM(model, "2")(x, [2, 0, 2], batch_size=1000)
        assert counter.rows == [3, 3, 96, 1, 6, 3]  # Grad-CAM, Score-CAM (capture, 32 channels), zero image, L_d
        counter.rows.clear()                         # and L_r, then L_c
        FusionCAM(model, "2")(x, None, batch_size=1000)
        assert counter.rows == [3, 3, 3, 96, 1, 6, 3]  # plus the arg-max
    finally:
        counter.close()


def test_create_graph_matches_finite_differences(model, x):
    probe = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    explainer = FusionCAM(model, "2")
    weight = model[-1].weight
    direction = torch.randn_like(weight)

    def value():
        return (explainer(x[:2], [2, 0]) * probe).sum()

    maps = explainer(x[:2], [2, 0], create_graph=True)
    (grad,) = torch.autograd.grad((maps * probe).sum(), weight)
    torch.testing.assert_close((grad * direction).sum(), central_difference(value, weight, direction),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("option, value, error, match", [
    ("theta", -1, ValueError, "theta"), ("theta", 100.5, ValueError, "theta"), ("theta", "10", ValueError, "theta"),
    ("theta", True, ValueError, "theta"), ("theta", float("nan"), ValueError, "theta"),
    ("gradient_options", "fast", TypeError, "gradient_options"),
    ("region_options", {"target_layer": "1"}, ValueError, "region_options"),
    ("region_options", {"batch_size": 4}, ValueError, "region_options"),
    ("region_options", {"bogus": 1}, TypeError, r"region_options: ScoreCAM has no option\(s\) \['bogus'\]"),
    ("region_options", {"score": "prob"}, ValueError, "region_options: score must be one of"),
    ("layer_fusion", "sum", ValueError, "layer_fusion"),
])
def test_bad_options_name_what_is_wrong(option, value, error, match):
    with pytest.raises(error, match=match):
        FusionCAM(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, **{option: value})


def test_bad_component_methods_are_refused():
    with pytest.raises(TypeError, match="gradient_method"):
        FusionCAM(tiny_cnn(), gradient_method="integrated_gradients")
    with pytest.raises(TypeError, match="region_method"):
        FusionCAM(tiny_cnn(), region_method=torch.nn.ReLU)
    with pytest.raises(KeyError, match="score_cma"):
        FusionCAM(tiny_cnn(), region_method="score_cma")


def test_on_the_pretrained_model(efficientnet):
    """The cat/coffee composite (128-px squares, block 14: 192 channels at 4 x 8, so 192 masked forwards for the
    pair): most of the cat's map on the cat half, little of the coffee's; 0.77 and 0.03 when written (0.90 and
    0.10 on the 160-px composite of tests/real)."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO, cat_coffee_composite

    pair = cat_coffee_composite(side=128).repeat(2, 1, 1, 1)
    maps = FusionCAM(efficientnet, "_blocks.14")(pair, [EGYPTIAN_CAT, ESPRESSO])
    assert torch.isfinite(maps).all() and (maps.flatten(1).amax(1) > 0).all()
    mass = maps.abs().sum((1, 2))
    share = mass[..., :128].sum(-1) / mass.sum(-1)
    print(f"fusion_cam cat share: {share[0]:.3f} (cat) vs {share[1]:.3f} (coffee)")
    assert share[0] - share[1] >= 0.3 and share[0] > 0.6
