"""Every CAM on CUDA agrees with the CPU (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from attribution import create, list_methods
from conftest import cam_cnn

OPTIONS = {"ss_cam": {"samples": 2, "std": 0.0}, "is_cam": {"steps": 2}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(set(list_methods("cam")) | {"guided_grad_cam"}))
def test_cam_on_cuda_matches_cpu(name):
    model = cam_cnn()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    cpu = create(name, model, target_layer="2", **OPTIONS.get(name, {}))(x, [0, 1, 2])
    gpu = create(name, model.cuda(), target_layer="2", **OPTIONS.get(name, {}))(x.cuda(), [0, 1, 2])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
