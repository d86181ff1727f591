"""The model-randomisation sanity check: it must separate maps that depend on the model from maps that do not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attribution
from attribution.metrics import model_randomisation, randomisation_layers
from conftest import tiny_cnn


def edge_detector(x: torch.Tensor, target=None) -> torch.Tensor:
    """An 'explainer' that ignores the model: the image's gradient magnitude."""
    gray = x.mean(dim=1, keepdim=True)
    dx = F.pad((gray[..., :, 1:] - gray[..., :, :-1]).abs(), (0, 1))
    dy = F.pad((gray[..., 1:, :] - gray[..., :-1, :]).abs(), (0, 0, 0, 1))
    return dx + dy


def images(batch: int = 2, size: int = 24) -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(batch, 3, size, size)


def test_default_layers_are_the_parametrised_children_last_first():
    assert randomisation_layers(tiny_cnn(), images()) == ["8", "4", "2", "0"]


def test_gradient_map_decorrelates_and_the_user_model_is_untouched():
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images()
    rng = torch.get_rng_state()
    result = model_randomisation(attribution.VanillaGradient(model), x, [0, 1])
    assert result.layers == ["8", "4", "2", "0"]
    assert result.spearman_abs.shape == result.spearman.shape == result.ssim.shape == (4, 2)
    assert (result.spearman_abs[-1] < 0.5).all() and not result.flagged.any()
    assert (result.spearman_abs[-1] < result.spearman_abs[0]).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_map_that_ignores_the_model_is_flagged():
    result = model_randomisation(edge_detector, images(), [0, 1], model=tiny_cnn())
    torch.testing.assert_close(result.spearman_abs, torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(result.ssim, torch.ones(4, 2, dtype=torch.float64))
    assert result.flagged.all()


def test_a_callable_that_takes_the_model_follows_the_copies():
    def gradient(x, target, model):
        return attribution.VanillaGradient(model)(x, target)

    model = tiny_cnn()
    result = model_randomisation(gradient, images(), [0, 1], model=model, layers=["8", "4"])
    reference = model_randomisation(attribution.VanillaGradient(model), images(), [0, 1], layers=["8", "4"])
    torch.testing.assert_close(result.spearman_abs, reference.spearman_abs)


def test_independent_randomisation_resets_one_layer_at_a_time():
    """A layer's draw depends on the seed and its name only: the independent test's step for layer 0 equals
    randomising layer 0 alone, and its first step equals the cascade's."""
    explainer = attribution.VanillaGradient(tiny_cnn())
    x = images()
    single = model_randomisation(explainer, x, [0, 1], layers=["0"])
    independent = model_randomisation(explainer, x, [0, 1], layers=["8", "0"], cascading=False)
    cascade = model_randomisation(explainer, x, [0, 1], layers=["8", "0"])
    torch.testing.assert_close(independent.spearman_abs[1], single.spearman_abs[0])
    torch.testing.assert_close(independent.spearman_abs[0], cascade.spearman_abs[0])
    assert not torch.allclose(independent.spearman_abs[1], cascade.spearman_abs[1])


# ----------------------------------------------------------------------------------------- the pretrained model
LAYERS = ["_fc", "_blocks.15", "_blocks.8", "_conv_stem"]


def _check_falls(result):
    """From 1 (the original map against itself), the rank correlation falls below 0.9 at the first step and below
    0.5 in magnitude once every listed layer is random; nothing is flagged."""
    assert (result.spearman_abs < 0.9).all(), result.spearman_abs
    assert (result.spearman_abs[-1].abs() < 0.5).all(), result.spearman_abs
    assert not result.flagged.any()


def test_sanity_on_efficientnet(efficientnet):
    """Cascading randomisation at 112 px: IG's rank correlation falls (to about 0 once the last block is random);
    the edge detector's stays 1 and is flagged."""
    from attribution.data import normalize, photos

    x = normalize(photos(112))
    _check_falls(model_randomisation(attribution.IntegratedGradients(efficientnet, steps=4), x, layers=LAYERS))
    edges = model_randomisation(edge_detector, x, model=efficientnet, layers=LAYERS)
    assert edges.flagged.all() and (edges.spearman_abs == 1).all()


def test_sanity_of_gradcam_on_efficientnet(efficientnet):
    if not hasattr(attribution, "GradCAM"):
        pytest.skip("attribution.GradCAM is not in this build (the CAM family lands separately)")
    from attribution.data import normalize, photos

    _check_falls(model_randomisation(attribution.GradCAM(efficientnet), normalize(photos(112)), layers=LAYERS))


# ------------------------------------------------------------------------------------------- data randomisation
def trained_linear(labels: torch.Tensor, x: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    """A linear classifier on 3x8x8 images, trained by full-batch gradient descent on ``labels``."""
    from conftest import LinearModel

    model = LinearModel(classes=2, seed=seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):
        optimiser.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimiser.step()
    return model.eval()


def test_data_randomisation_separates_a_learned_gradient_from_an_edge_detector():
    """Class 1 = a bright top-left corner.  The true-label model's gradient sits on the corner, the model trained on
    permuted labels has none to find: their maps disagree.  An edge detector gives the same map for both."""
    from attribution.metrics import data_randomisation

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, 8, 8, generator=generator)
    labels = (x[:, :, :3, :3].mean((1, 2, 3)) > 0).long()
    model = trained_linear(labels, x)
    shuffled = trained_linear(labels[torch.randperm(400, generator=generator)], x, seed=1)
    assert (model(x).argmax(1) == labels).float().mean() > 0.9
    probe = x[:4]
    learned = data_randomisation(attribution.VanillaGradient(model), probe, 1, random_model=shuffled)
    assert learned.spearman_abs.max() < 0.5 and not learned.flagged.any()
    same = data_randomisation(attribution.VanillaGradient(model), probe, 1, random_model=model)
    torch.testing.assert_close(same.spearman_abs, torch.ones(4, dtype=same.spearman_abs.dtype))
    edges = data_randomisation(edge_detector, probe, 1, random_model=shuffled, model=model)
    assert edges.flagged.all()
    with pytest.raises(TypeError, match="random_model="):
        data_randomisation(edge_detector, probe, 1, random_model=None, model=model)


def test_the_cascade_ends_at_the_fully_random_model():
    """A ViT holds its class token and position embedding itself: they are the cascade's last step (they stayed
    trained before), the model itself untouched."""
    from attribution.metrics.sanity import OWN_PARAMETERS, randomised_copies
    from conftest import tiny_vit

    model = tiny_vit()
    names = randomisation_layers(model, torch.randn(1, 3, 16, 16))
    assert names[-1] == OWN_PARAMETERS and names[0] == "head"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    *_, (_, last) = randomised_copies(model, names)
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"):
        assert not torch.equal(last.state_dict()[name], before[name]), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- rebinding keeps constructor choices
def _float64_cnn():
    return tiny_cnn().double()


REBIND_CASES = {
    "smoothgrad_input_x_gradient": lambda m: attribution.SmoothGrad(m, method=attribution.InputXGradient, samples=2,
                                                                    std=0.0),
    "idgi_blur_ig": lambda m: attribution.IDGI(m, method=attribution.BlurIG, steps=4),
    "gradcam_layer": lambda m: attribution.GradCAM(m, target_layer=m[2]),
    "combined": lambda m: attribution.CombinedWrapper(m, gradient_method=attribution.InputXGradient,
                                                      cam_method=attribution.GradCAMPlusPlus, target_layer=m[2]),
}


@pytest.mark.parametrize("case", sorted(REBIND_CASES))
def test_rebind_keeps_every_constructor_choice(case):
    """The rebound explainer equals the same construction on the other model: wrapped method, layer module and
    options all follow, and the original explainer still explains its own model."""
    from attribution.metrics.sanity import rebind

    model = _float64_cnn()
    other = _float64_cnn()
    with torch.no_grad():  # a different model of the same architecture
        for p in other.parameters():
            p.mul_(1.5).add_(0.05)
    x = images().double()
    explainer = REBIND_CASES[case](model)
    rebound = rebind(explainer, other)
    assert rebound.model is other and explainer.model is model
    torch.testing.assert_close(rebound(x, [0, 1]), REBIND_CASES[case](other)(x, [0, 1]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(explainer(x, [0, 1]), REBIND_CASES[case](model)(x, [0, 1]), rtol=1e-10, atol=1e-12)


def test_randomising_nothing_keeps_a_wrapped_method():
    """Re-drawing only a ReLU (no parameters) leaves the copy equal to the model: the maps of SmoothGrad around
    Input x Gradient (std 0) must then equal the original's (rank correlation 1, eMPRT 0)."""
    from attribution.metrics import efficient_mprt

    explainer = attribution.SmoothGrad(_float64_cnn(), method=attribution.InputXGradient, samples=2, std=0.0)
    x = images().double()
    result = model_randomisation(explainer, x, [0, 1], layers=["1"])
    torch.testing.assert_close(result.spearman_abs, torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(efficient_mprt(explainer, x, [0, 1], layers=["1"]),
                               torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_input_invariance_keeps_a_wrapped_method():
    """Guided Backprop is input invariant; SmoothGrad around it with std 0 is the same map, so it must be too."""
    from attribution.metrics import input_invariance

    explainer = attribution.SmoothGrad(_float64_cnn(), method=attribution.GuidedBackProp, samples=1, std=0.0)
    assert input_invariance(explainer, images().double(), [0, 1]).invariant.all()


# ------------------------------------------------------------------------------------ PAIR's visualisations
@pytest.mark.parametrize("shift", [0.0, -0.8, -5.0])  # a random map, a mostly negative one, an all-negative one
def test_visualisations_equal_pairs(shift):
    """visualise_abs / visualise_signed are PAIR saliency's VisualizeImageGrayscale / VisualizeImageDiverging
    (99th percentile; the diverging span is the magnitude of the signed map's 99th percentile), image by image."""
    visualization = pytest.importorskip("saliency.core.visualization")
    from attribution.metrics.sanity import visualise_abs, visualise_signed

    maps = torch.randn(3, 3, 16, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + shift
    for ours, theirs in ((visualise_abs, visualization.VisualizeImageGrayscale),
                         (visualise_signed, visualization.VisualizeImageDiverging)):
        expected = torch.stack([torch.from_numpy(theirs(m.permute(1, 2, 0).numpy())).flatten() for m in maps])
        torch.testing.assert_close(ours(maps), expected, rtol=0, atol=1e-12)
