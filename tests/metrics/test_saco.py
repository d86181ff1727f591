"""SaCo: closed forms on a pixel-linear model, Algorithm 1 written out, and a CAM against a random map on the
pretrained model."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.metrics import evaluate, saco
from toy_models import PixelLinear


@pytest.fixture
def setup():
    model = PixelLinear().double()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    return model, x


def test_exact_contributions_score_one_and_their_reverse_minus_one(setup):
    """f = sum(w x) with the zero substrate: perturbing G_i takes away exactly the map's sum over G_i, so the
    effects are ordered as the salience (1); the negated map orders them in reverse (-1)."""
    model, x = setup
    exact = model.contributions(x)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(saco(model, x, exact, 0, substrate="zeros", score="logit"), ones)
    torch.testing.assert_close(saco(model, x, -exact, 0, substrate="zeros", score="logit"), -ones)
    torch.testing.assert_close(saco(model, x, 3.0 * exact + 0.0, 0, substrate="zeros", score="logit",
                                    groups=5), ones)  # scale-free, any group count
    # a constant map: nothing to weigh, also when the groups differ by a pixel (64 pixels in 10 groups)
    for groups in (8, 10):
        assert torch.isnan(saco(model, x, torch.ones_like(x), 0, groups=groups)).all()


def test_equals_algorithm_one_written_out(setup):
    """Per image: rank, cut into K groups, perturb each alone with the per-channel mean, weigh every pair."""
    model, x = setup
    maps = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k = 4
    expected = []
    with torch.no_grad():
        for image, m in zip(x, maps):
            order = m.flatten().argsort(descending=True)  # no ties in a continuous random map
            groups = [order[i * 16:(i + 1) * 16] for i in range(k)]
            base = model(image[None]).softmax(1)[0, 1]
            mean = image.mean(dim=(1, 2))
            effects, sums = [], []
            for group in groups:
                perturbed = image.clone().view(3, 64)
                perturbed[:, group] = mean[:, None]
                effects.append(base - model(perturbed.view(1, 3, 8, 8)).softmax(1)[0, 1])
                sums.append(m.flatten()[group].sum())
            total, weight = 0.0, 0.0
            for i in range(k):
                for j in range(i + 1, k):
                    w = sums[i] - sums[j]
                    total += w if effects[i] >= effects[j] else -w
                    weight += abs(w)
            expected.append(total / weight)
    ours = saco(model, x, maps, 1, groups=k, batch_size=4)
    torch.testing.assert_close(ours, torch.stack(expected))


def test_evaluate_runs_it(setup):
    model, x = setup
    table = evaluate(lambda images, target: model.contributions(images), model, x, 0, metrics=["saco"],
                     options={"saco": {"substrate": "zeros", "score": "logit"}})
    torch.testing.assert_close(table["saco"], torch.ones(3, dtype=torch.float64))


def test_a_cam_beats_random_maps_on_the_pretrained_model(efficientnet):
    """On the two photos (160 px, still classified right), Grad-CAM's groups change the prediction mostly in the
    order of its salience (0.20 and 0.60 when written); random maps score about 0 on average (0.02 here, over
    four maps per photo)."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO, normalize, photos

    x, classes = normalize(photos(160)), [EGYPTIAN_CAT, ESPRESSO]
    cam = saco(efficientnet, x, attribution.GradCAM(efficientnet)(x, classes), classes)
    generator = torch.Generator().manual_seed(0)
    noise = torch.stack([saco(efficientnet, x, torch.rand(2, 1, 160, 160, generator=generator), classes)
                         for _ in range(4)])
    assert cam.mean() > 0.3 and noise.mean().abs() < 0.15, (cam, noise)


def test_bad_options(setup):
    model, x = setup
    for groups in (1, 65, 2.5, True):
        with pytest.raises(ValueError, match="groups must be"):
            saco(model, x, x, 0, groups=groups)
