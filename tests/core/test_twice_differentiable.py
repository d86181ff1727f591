"""Second derivatives through activations torch cannot differentiate twice (MobileNetV3's hard sigmoid gates)."""
from __future__ import annotations

import torch
from torch import nn

import attribution as A
from attribution.core.explainer import twice_differentiable


class Gated(nn.Module):
    """A squeeze-and-excitation gate with ``nn.Hardsigmoid``, as torchvision's MobileNetV3 builds it."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.squeeze = nn.Linear(4, 4)
        self.gate = nn.Hardsigmoid()
        self.head = nn.Linear(4, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=generator, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.conv(x))
        gate = self.gate(self.squeeze(a.mean((2, 3))))
        return self.head((a * gate[:, :, None, None]).mean((2, 3)))


def test_create_graph_maps_of_a_hard_sigmoid_model_can_be_trained_on():
    """torch has no derivative of hardsigmoid's backward: the map's own backward failed in the user's training
    step. Under create_graph the hard sigmoid is computed as relu6(x + 3) / 6: the same map, now differentiable."""
    model = Gated().eval()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = A.VanillaGradient(model)(x, [0, 2])
    maps = A.VanillaGradient(model)(x, [0, 2], create_graph=True)
    # torch's own hardsigmoid backward multiplies by 1/6 rounded to float32: the written-out slope is the exact one
    torch.testing.assert_close(maps.detach(), plain, rtol=1e-7, atol=1e-7 * float(plain.abs().max()))
    weight = model.squeeze.weight
    (derivative,) = torch.autograd.grad(maps.pow(2).sum(), weight)
    step = 1e-6
    index = (1, 2)
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            weight[index] += sign * step
        values.append(float(A.VanillaGradient(model)(x, [0, 2]).pow(2).sum()))
        with torch.no_grad():
            weight[index] -= sign * step
    assert abs(float(derivative[index]) - (values[0] - values[1]) / (2 * step)) < 1e-5 * max(1.0, abs(values[0]))


def test_the_rewrite_is_scoped_to_models_with_hard_sigmoids():
    """The mode that rewrites the hard sigmoid sees every call: it is entered only for models that have one."""
    with twice_differentiable(nn.Sequential(nn.Linear(2, 2))):
        assert not any(type(mode).__name__ == "_TwiceDifferentiableActivations"
                       for mode in torch.overrides._get_current_function_mode_stack())
    with twice_differentiable(Gated()):
        assert any(type(mode).__name__ == "_TwiceDifferentiableActivations"
                   for mode in torch.overrides._get_current_function_mode_stack())
