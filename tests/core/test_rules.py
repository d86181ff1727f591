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
