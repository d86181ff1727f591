"""Every metric runs on CUDA, batched, and agrees with the CPU (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

import attribution
from attribution.metrics import evaluate, model_randomisation, noisy_linear_impute
from conftest import tiny_cnn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

NAMES = ["deletion", "insertion", "kpm", "knm", "kam", "ram", "road", "gini", "pointing_game",
         "energy_pointing_game", "attribution_localisation", "max_box_acc", "max_box_acc_v2", "pxap"]


def test_metrics_agree_between_cpu_and_cuda():
    torch.manual_seed(7)
    x = torch.randn(3, 3, 24, 24)
    boxes = torch.tensor([[0, 0, 11, 11], [4, 4, 15, 15], [12, 12, 23, 23]])
    maps = attribution.VanillaGradient(tiny_cnn())(x, [0, 1, 2])  # the same maps on both devices (same rankings)
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_cnn().to(device)
        table = evaluate(None, model, x.to(device), [0, 1, 2], NAMES, maps=maps.to(device),
                         regions=boxes.to(device), options={"road": {"noise": 0.0}})
        results[device] = table
        assert all(v.device.type == device for v in table.values())
    for name in results["cpu"]:
        torch.testing.assert_close(results["cuda"][name].cpu(), results["cpu"][name], rtol=1e-3, atol=1e-4,
                                   msg=name)


def test_imputation_and_sanity_on_cuda():
    torch.manual_seed(8)
    x = torch.randn(4, 3, 40, 40)
    removed = torch.rand(4, 1, 40, 40) < 0.6
    cpu = noisy_linear_impute(x, removed, noise=0.0)
    gpu = noisy_linear_impute(x.cuda(), removed.cuda(), noise=0.0)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-4)
    model = tiny_cnn().cuda()
    result = model_randomisation(attribution.VanillaGradient(model), x.cuda(), [0, 1, 2, 3])
    assert result.spearman_abs.device.type == "cuda"


def test_randomised_copies_leave_the_random_state_of_the_models_device_alone():
    """The model on the GPU, the images on the CPU: the cascade's draws fork the model's device's RNG too."""
    from attribution.metrics.sanity import randomised_copies

    model = tiny_cnn().cuda()
    cpu_state, cuda_state = torch.get_rng_state(), torch.cuda.get_rng_state()
    for _ in randomised_copies(model, ["0", "2"], devices=[]):
        torch.randn(3, device="cuda")  # the consumer draws too, inside the fork
    assert torch.equal(torch.get_rng_state(), cpu_state) and torch.equal(torch.cuda.get_rng_state(), cuda_state)


def test_a_cpu_models_cascade_leaves_the_gpus_random_state_alone():
    """Nothing forked on the GPU (model and images on the CPU): the draws seed the CPU's generator only."""
    from attribution.metrics.sanity import randomised_copies

    cuda_state = torch.cuda.get_rng_state()
    for _ in randomised_copies(tiny_cnn(), ["0", "2"], devices=[]):
        pass
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
