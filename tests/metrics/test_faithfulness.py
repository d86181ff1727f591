"""Faithfulness correlation: closed forms on a pixel-linear model and the subsets written out."""
from __future__ import annotations

import pytest
import torch

from attribution.metrics import evaluate, faithfulness_correlation
from attribution.metrics.similarity import pearson
from toy_models import PixelLinear


@pytest.fixture
def setup():
    model = PixelLinear().double()
    torch.manual_seed(0)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64) + 0.5
    return model, x


def test_exact_contributions_correlate_perfectly(setup):
    """f = sum(w x) and the zero baseline: removing S drops f by sum_S w x, the map's sum over S."""
    model, x = setup
    exact = model.contributions(x)
    options = {"subset_size": 10, "runs": 20, "baseline": 0.0, "generator": torch.Generator().manual_seed(1)}
    perfect = faithfulness_correlation(model, x, exact, 0, **options)
    torch.testing.assert_close(perfect, torch.ones(3, dtype=torch.float64))
    reversed_ = faithfulness_correlation(model, x, -exact, 0, **options)
    torch.testing.assert_close(reversed_, -torch.ones(3, dtype=torch.float64))
    constant = faithfulness_correlation(model, x, torch.ones_like(x), 0, **options)
    torch.testing.assert_close(constant, torch.zeros(3, dtype=torch.float64))  # every subset sums the same


def test_equals_the_metric_written_out(setup):
    """Subsets drawn as the metric draws them; per image and subset a forward with those pixels set to 0.5."""
    model, x = setup
    torch.manual_seed(2)
    maps = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    order = torch.rand(7, 64, generator=torch.Generator().manual_seed(3)).argsort(dim=1)[:, :12]
    expected = []
    with torch.no_grad():
        for image, m in zip(x, maps):
            drops, sums = [], []
            for subset in order:
                perturbed = image.clone().view(3, 64)
                perturbed[:, subset] = 0.5
                drops.append(model(image[None])[0, 1] - model(perturbed.view(1, 3, 8, 8))[0, 1])
                sums.append(m.flatten()[subset].sum())
            expected.append(pearson(torch.stack(drops)[None], torch.stack(sums)[None])[0])
    ours = faithfulness_correlation(model, x, maps, 1, subset_size=12, runs=7, baseline=0.5,
                                    generator=torch.Generator().manual_seed(3), batch_size=5)
    torch.testing.assert_close(ours, torch.stack(expected).to(ours.dtype))


def test_evaluate_runs_it(setup):
    model, x = setup
    table = evaluate(lambda images, target: model.contributions(images), model, x, 0,
                     metrics=["faithfulness_correlation"],
                     options={"faithfulness_correlation": {"subset_size": 10, "runs": 20, "baseline": 0.0}})
    torch.testing.assert_close(table["faithfulness_correlation"], torch.ones(3, dtype=torch.float64))


def test_bad_options_name_what_is_wrong(setup):
    model, x = setup
    for options, match in (({"subset_size": 0}, "subset_size"), ({"runs": 0}, "runs"),
                           ({"subset_size": 65}, "subset_size"), ({"features": "pixel"}, "features"),
                           ({"subset_size": 193, "features": "entries"}, "subset_size")):
        with pytest.raises(ValueError, match=match):
            faithfulness_correlation(model, x, x, 0, **options)


def test_sensitivity_n_is_one_at_every_size_for_exact_contributions(setup):
    """f = sum(w x), zero baseline: every subset's score loss is the map's sum over it, whatever n."""
    from attribution.metrics import sensitivity_n

    model, x = setup
    exact = model.contributions(x)
    curve = sensitivity_n(model, x, exact, 0, fractions=(0.05, 0.25, 0.5), runs=12,
                          generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(curve.y, torch.ones(3, 3, dtype=torch.float64))
    torch.testing.assert_close(curve.auc, torch.full((3,), 0.45, dtype=torch.float64))
    reversed_ = sensitivity_n(model, x, -exact, 0, fractions=(0.1, 0.3), runs=12)
    torch.testing.assert_close(reversed_.y, -torch.ones(3, 2, dtype=torch.float64))


def test_sensitivity_n_is_faithfulness_correlation_per_size(setup):
    from attribution.metrics import sensitivity_n

    model, x = setup
    maps = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    curve = sensitivity_n(model, x, maps, 1, fractions=(0.0, 0.1, 0.4), runs=9, baseline=0.5,
                          generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(6)  # the sizes draw their subsets one after another
    expected = [faithfulness_correlation(model, x, maps, 1, subset_size=n, runs=9, baseline=0.5, generator=generator)
                for n in (1, 6, 26)]  # at least one pixel; round(0.1 * 64) and round(0.4 * 64)
    torch.testing.assert_close(curve.y, torch.stack(expected, dim=1))
    table = evaluate(lambda images, target: maps, model, x, 1, metrics=["sensitivity_n"],
                     options={"sensitivity_n": {"runs": 9, "fractions": (0.1, 0.4), "baseline": 0.5,
                                                "generator": torch.Generator().manual_seed(6)}})
    direct = sensitivity_n(model, x, maps, 1, fractions=(0.1, 0.4), runs=9, baseline=0.5,
                           generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(table["sensitivity_n"], direct.auc)
    torch.testing.assert_close(table.curves["sensitivity_n"][1], direct.y)
    assert direct.y.abs().max() > 0.1  # numbers, not zeros
