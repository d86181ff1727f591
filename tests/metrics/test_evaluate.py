"""evaluate(): one call, a table of per-image values and means, curves that plot."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import attribution  # noqa: E402
from attribution.metrics import METRICS, deletion, evaluate, gini  # noqa: E402
from conftest import tiny_cnn  # noqa: E402


def setup():
    model = tiny_cnn()
    torch.manual_seed(6)
    return model, attribution.VanillaGradient(model), torch.randn(3, 3, 16, 16)


def test_table_holds_per_image_values_and_means():
    model, explainer, x = setup()
    boxes = torch.tensor([[0, 0, 7, 7], [4, 4, 11, 11], [8, 8, 15, 15]])
    names = ["deletion", "insertion", "kpm", "knm", "kam", "ram", "road", "gini", "pointing_game",
             "energy_pointing_game", "attribution_localisation", "max_box_acc", "max_box_acc_v2", "pxap"]
    table = evaluate(explainer, model, x, [0, 1, 2], names, regions=boxes, options={"deletion": {"step": 16}})
    assert set(table) == set(names) | {"road_morf", "road_lerf"}
    for name in names:
        value = table[name]
        assert value.shape in ((3,), ()), name
        assert torch.isfinite(table.means[name]), name
    maps = explainer(x, [0, 1, 2])
    torch.testing.assert_close(table["deletion"], deletion(model, x, maps, [0, 1, 2], step=16).auc)
    torch.testing.assert_close(table["gini"], gini(maps))
    assert "deletion" in table.summary() and "lower is better" in table.summary()
    assert set(table.curves) == {"deletion", "insertion", "kpm", "knm", "kam", "ram", "road_morf", "road_lerf"}


def test_targets_default_to_the_models_choice_and_maps_can_be_given():
    model, explainer, x = setup()
    top = model(x).argmax(dim=1)
    maps = explainer(x, top)
    a = evaluate(explainer, model, x, None, ["deletion"], options={"deletion": {"step": 32}})
    b = evaluate(None, model, x, top, ["deletion"], maps=maps, options={"deletion": {"step": 32}})
    torch.testing.assert_close(a["deletion"], b["deletion"])


def test_plot_and_errors():
    model, explainer, x = setup()
    table = evaluate(explainer, None, x, [0, 1, 2], ["deletion", "insertion", "model_randomisation"],
                     options={"deletion": {"step": 32}, "insertion": {"step": 32}})
    figure = table.plot()
    assert len(figure.axes) == 3
    with pytest.raises(ValueError, match="needs regions"):
        evaluate(explainer, model, x, None, ["pointing_game"])
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(explainer, model, x, None, ["delition"])
    with pytest.raises(ValueError, match="needs the explainer"):
        evaluate(None, model, x, None, ["model_randomisation"], maps=explainer(x))
    assert "deletion" in METRICS and "road" in METRICS


def test_metrics_do_not_depend_on_the_cam_family():
    """attribution.metrics imports nothing from attribution.cam (it must work in a build without it)."""
    import ast
    from pathlib import Path

    import attribution.metrics as module

    for path in Path(module.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert "cam" not in target.split("."), (path.name, target)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("attribution.cam") for alias in node.names), path.name
    assert all(hasattr(module, name) for name in module.__all__)


#: options that keep each metric cheap on 16 x 16 images; every name of METRICS must appear (so a new metric is run
#: through evaluate() here)
CHEAP = {
    "deletion": {"step": 32}, "insertion": {"step": 32}, "kpm": {}, "knm": {}, "kam": {}, "ram": {}, "road": {},
    "sensitivity_n": {"runs": 3}, "selectivity": {"patch_size": 4},
    "region_perturbation": {"patch_size": 4, "regions": 5}, "monotonicity": {"features_in_step": 32},
    "average_drop": {}, "increase_in_confidence": {}, "infidelity": {"samples": 4},
    "faithfulness_correlation": {"subset_size": 16, "runs": 5}, "saco": {}, "faithfulness_estimate":
    {"features_in_step": 32}, "monotonicity_correlation": {"samples": 2, "features_in_step": 32},
    "irof": {"segments": torch.arange(16).repeat_interleave(16).view(16, 16) // 64},
    "non_sensitivity": {"features_in_step": 32}, "completeness": {},
    "max_sensitivity": {"samples": 2}, "avg_sensitivity": {"samples": 2}, "local_lipschitz_estimate": {"samples": 2},
    "relative_input_stability": {"samples": 2}, "relative_output_stability": {"samples": 2},
    "relative_representation_stability": {"samples": 2}, "continuity": {"steps": 4}, "random_logit": {},
    "gini": {}, "entropy": {}, "effective_complexity": {}, "consistency": {},
    "pointing_game": {}, "energy_pointing_game": {}, "attribution_localisation": {}, "max_box_acc": {},
    "max_box_acc_v2": {}, "pxap": {}, "relevance_rank_accuracy": {}, "top_k_intersection": {"k": 20},
    "localisation_auc": {}, "model_randomisation": {}, "efficient_mprt": {}, "smooth_mprt": {"samples": 2},
    "input_invariance": {}, "sufficiency": {},
}


def test_every_metric_runs_through_evaluate():
    assert set(CHEAP) == set(METRICS)
    model, explainer, x = setup()
    boxes = torch.tensor([[0, 0, 7, 7], [4, 4, 11, 11], [8, 8, 15, 15]])
    table = evaluate(explainer, model, x, [0, 1, 2], METRICS, regions=boxes, options=CHEAP)
    for name in METRICS:
        assert table[name].shape in ((3,), ()), name
        assert not torch.isinf(table[name].to(torch.float64)).any(), name
    # numbers, not shapes: the table holds what each metric's own function returns for the same maps and options
    import attribution.metrics as M

    maps, t = explainer(x, [0, 1, 2]), [0, 1, 2]
    direct = {
        "kpm": M.keep_positive_mask(model, x, maps, t).auc,
        "road": M.road(model, x, maps, t).combined,
        "region_perturbation": M.region_perturbation(model, x, maps, t, **CHEAP["region_perturbation"]).aopc,
        "monotonicity": M.monotonicity(model, x, maps, t, **CHEAP["monotonicity"]).monotonic.float(),
        "irof": M.irof(model, x, maps, t, **CHEAP["irof"]).aoc_unit,
        "completeness": M.completeness(model, x, maps, t).gap.abs(),
        "average_drop": M.average_drop(model, x, maps, t),
        "consistency": M.consistency(model, x, maps),
        "entropy": M.entropy(maps),
        "pointing_game": M.pointing_game(maps, boxes).hit.float(),
        "localisation_auc": M.localisation_auc(maps, boxes),
        "top_k_intersection": M.top_k_intersection(maps, boxes, k=20),
        "pxap": M.pxap(maps, boxes).value,
    }
    for name, value in direct.items():
        torch.testing.assert_close(table[name], value.to(table[name].dtype), msg=name)
    assert table["entropy"].min() > 1 and table["road_morf"].ne(table["road_lerf"]).all()
    lines = dict(line.split(None, 1) for line in table.summary().splitlines())
    assert "lower is better" in lines["selectivity"] and "higher is better" in lines["irof"]
    assert "lower is better" in lines["local_lipschitz_estimate"] and "higher is better" in lines["consistency"]
    assert "higher is better" in lines["efficient_mprt"] and "lower is better" in lines["smooth_mprt"]


#: the WSOL metrics follow their reference, which sets a non-finite map to zero (wsol.normalize_scoremap)
ZEROES_NON_FINITE = {"max_box_acc", "max_box_acc_v2", "pxap"}
#: metrics that run the explainer themselves (no maps to check)
RUN_THE_EXPLAINER = {"max_sensitivity", "avg_sensitivity", "local_lipschitz_estimate", "relative_input_stability",
                     "relative_output_stability", "relative_representation_stability", "continuity", "random_logit",
                     "efficient_mprt", "smooth_mprt", "input_invariance", "model_randomisation"}


@pytest.mark.parametrize("name", sorted(set(METRICS) - ZEROES_NON_FINITE - RUN_THE_EXPLAINER))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_maps_are_refused(name, bad):
    """A NaN or infinite map gets an error naming the problem, not a plausible score (a NaN map scored as a zero
    map before: deletion 0.21, a pointing-game hit, a localisation AUC of 0.81)."""
    model, explainer, x = setup()
    maps = explainer(x, [0, 1, 2])
    maps[1, :, 3, 4] = bad
    boxes = torch.tensor([[0, 0, 7, 7], [4, 4, 11, 11], [8, 8, 15, 15]])
    with pytest.raises(ValueError, match="finite"):
        evaluate(None, model, x, [0, 1, 2], [name], maps=maps, regions=boxes, options={name: CHEAP[name]})


def test_options_for_unknown_metrics_are_refused():
    """A misspelt key of ``options`` names no metric: an error that names it, not options silently dropped.
    (Options of a known metric that is not requested stay allowed, so one options dict serves several calls.)"""
    model, explainer, x = setup()
    with pytest.raises(ValueError, match="'delet'.*did you mean 'deletion'"):
        evaluate(explainer, model, x, [0, 1, 2], ["deletion"], options={"delet": {"step": 32}})
    with pytest.raises(TypeError, match="options\\['deletion'\\]"):
        evaluate(explainer, model, x, [0, 1, 2], ["deletion"], options={"deletion": 32})
    table = evaluate(explainer, model, x, [0, 1, 2], ["gini"], options={"deletion": {"step": 32}})
    assert set(table) == {"gini"}
