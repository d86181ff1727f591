"""The rule machinery's plain vector-Jacobian products written out against autograd's of the recomputed forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attribution.core.rules import LinearCall


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_linear_vector_jacobian_equals_autograd_of_the_forward(bias, dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(True)
    weight = torch.randn(4, 6, generator=generator, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(4, generator=generator, dtype=torch.float64).requires_grad_(True) if bias else None
    grad = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64).to(dtype)
    call = LinearCall(F.linear, (), {}, rule=None)  # type: ignore[arg-type]
    tensors = [x, weight, b]
    needs = [True, True, bias]
    direct = call.vector_jacobian(tensors, needs, grad)
    wanted = [t for t in tensors if t is not None]
    expected = torch.autograd.grad(call.compute(*tensors), wanted, grad)
    assert direct is not None and (direct[2] is None) == (not bias)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-12
    for ours, reference in zip([d for d in direct if d is not None], expected):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours, reference, rtol=tolerance, atol=tolerance)
    skipped = call.vector_jacobian(tensors, [True, False, False], grad)
    assert skipped is not None and skipped[1] is None and skipped[2] is None


def test_convolutions_and_linear_calls_with_extra_arguments_recompute():
    assert LinearCall(F.conv2d, (None, 1), {}, rule=None).vector_jacobian(  # type: ignore[arg-type]
        [torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1), None], [True, True, False], torch.ones(1, 1, 3, 3)) is None


class _Pooled(torch.nn.Module):
    """Conv-ReLU-conv-ReLU, then global average pooling written as ``pool`` (``x.mean((2, 3))`` as torchvision's
    ShuffleNetV2 and MNASNet write it, or ``adaptive_avg_pool2d``), then a linear head."""

    def __init__(self, by_mean: bool) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5
        self.by_mean = by_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        pooled = x.mean((2, 3)) if self.by_mean else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(pooled)


@pytest.mark.parametrize("name", ["excitation_backprop", "lrp", "crp", "relevance_cam"])
def test_global_pooling_written_as_a_mean_is_pooling(name):
    """The relevance rules treat ``x.mean(dims)`` over feature dimensions as the average pooling it is: before,
    it kept its plain gradient, and excitation backprop's map was constant over the image (the same for every
    class) on ShuffleNetV2, MNASNet and timm's NHWC heads."""
    import attribution as A

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    by_mean, by_pool = _Pooled(True), _Pooled(False)
    by_pool.load_state_dict(by_mean.state_dict())
    layer = {"target_layer": "conv2"} if name in ("crp", "relevance_cam") else {}
    if name == "crp":
        layer = {"layer": "conv2"}
    ours = A.create(name, by_mean, **layer)(x, [0, 3])
    reference = A.create(name, by_pool, **layer)(x, [0, 3])
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    assert float(ours.flatten(1).std(dim=1).min()) > 0
