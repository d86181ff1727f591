"""Layer lookup errors and the state guard on its own."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attribution.core.guard import preserve_model
from attribution.core.layers import layer_name, resolve_layer, resolve_layers
from conftest import tiny_cnn


def test_layer_names_modules_and_lists():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    assert resolve_layer(model, "layer3.1.conv2") is model.layer3[1].conv2
    assert resolve_layer(model, model.layer4) is model.layer4
    assert resolve_layers(model, ["layer3", model.layer4]) == [model.layer3, model.layer4]
    assert layer_name(model, model.layer3[1].conv2) == "layer3.1.conv2"


def test_unknown_layer_lists_the_closest_names():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"no layer named 'layer5'; closest names: layer4, layer3, layer2, layer1"):
        resolve_layer(model, "layer5")
    with pytest.raises(ValueError, match=r"'layer3.1.con2'.*layer3\.1\.conv2"):
        resolve_layer(model, "layer3.1.con2")
    with pytest.raises(ValueError, match="not part of the model"):
        resolve_layer(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="dotted name or an nn.Module"):
        resolve_layer(model, 3)


def test_guard_restores_everything_it_promises():
    model = tiny_cnn().train()
    first = model[0].weight
    model[2].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_model(model):
            assert not model.training
            model[0].register_forward_hook(lambda *a: None)
            model[0].register_forward_pre_hook(lambda *a: None)
            model[4].register_full_backward_hook(lambda *a: None)
            model[0].weight.grad = torch.ones_like(first)
            model[2].bias.requires_grad_(True)
            model[1] = nn.Identity()
            model.add_module("extra", nn.ReLU())
            raise RuntimeError("boom")
    assert model.training and all(m.training for m in model.modules())
    assert first.grad is None and not model[2].bias.requires_grad
    assert isinstance(model[1], nn.ReLU) and not hasattr(model, "extra")
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks and not model[4]._backward_hooks


def test_guard_turns_timms_gradient_checkpointing_off_and_back_on():
    """timm models checkpoint their blocks whenever ``grad_checkpointing`` is set, eval mode or not."""
    model = tiny_cnn()
    model.grad_checkpointing = True
    model[0].grad_checkpointing = 1  # what ``set_grad_checkpointing(1)`` leaves
    model[2].grad_checkpointing = False
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_model(model):
            assert [m.grad_checkpointing for m in (model, model[0], model[2])] == [False, False, False]
            raise RuntimeError("boom")
    assert model.grad_checkpointing is True and model[2].grad_checkpointing is False
    assert model[0].grad_checkpointing == 1 and type(model[0].grad_checkpointing) is int


class _AlwaysTrainingNorm(nn.BatchNorm2d):
    """Batch norm whose ``train()`` keeps it training (test-time adaptation does this): eval() cannot stop its
    forwards from updating the running statistics."""

    def train(self, mode: bool = True) -> "_AlwaysTrainingNorm":
        return super().train(True)


def test_guard_restores_running_statistics_of_modules_that_stay_training():
    import attribution

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _AlwaysTrainingNorm(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    norm = model[1]
    original = norm.running_mean
    state = {name: value.clone() for name, value in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    attribution.IntegratedGradients(model)(x, 0, steps=3)
    with preserve_model(model):
        norm.running_mean = torch.full((4,), 7.0)  # a buffer replaced, not written in place
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0, msg=name)
    assert norm.training and norm.running_mean is original


def test_threads_sharing_a_model_take_turns():
    """Two threads explaining with one model (one explainer shared, and two explainers that install hooks) give
    the sequential maps, and no hook is left on the model: the guard holds a per-model lock."""
    from concurrent.futures import ThreadPoolExecutor

    import attribution
    from conftest import tiny_vit

    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    shared = attribution.AttnLRP(model)
    legrad, raw = attribution.LeGrad(model), attribution.RawAttention(model)
    expected = {"shared": shared(x, [1, 2]), "legrad": legrad(x, [1, 2]), "raw": raw(x, [1, 2])}
    jobs = [("shared", shared), ("shared", shared), ("legrad", legrad), ("raw", raw)] * 6
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: (job[0], job[1](x, [1, 2])), jobs))
    for name, maps in results:
        torch.testing.assert_close(maps, expected[name])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model(x).shape == (2, 5)
