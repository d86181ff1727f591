"""The ``generator`` option of the perturbation methods that draw at random: checked (a TypeError naming it), and
drawn from on the generator's own device whatever the model's."""
from __future__ import annotations

import pytest
import torch

import attribution
from conftest import tiny_cnn

#: cheap options of each method that draws its masks, coalitions or orderings from ``generator``
DRAWING = {"RISE": {"n_masks": 6, "grid": 2}, "LIME": {"grid": 3, "samples": 6},
           "KernelSHAP": {"grid": 5, "samples": 6}, "ShapleyValueSampling": {"grid": 3, "samples": 2}}


@pytest.mark.parametrize("name", sorted(DRAWING))
@pytest.mark.parametrize("generator", [3, "cpu", torch.Generator().manual_seed(0).get_state()])
def test_a_generator_that_is_not_one_is_named(name, generator):
    model, x = tiny_cnn(), torch.randn(2, 3, 10, 10)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got"):
        getattr(attribution, name)(model, **DRAWING[name])(x, 0, generator=generator)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device for the generator")
@pytest.mark.parametrize("name", sorted(DRAWING))
def test_a_cuda_generator_draws_on_cuda_for_a_cpu_model(name):
    """The draws happen on the generator's device and move to the model's: the same seed, the same map."""
    model, x = tiny_cnn(), torch.randn(2, 3, 10, 10)
    explain = getattr(attribution, name)(model, **DRAWING[name])
    first = explain(x, [0, 1], generator=torch.Generator(device="cuda").manual_seed(1))
    again = explain(x, [0, 1], generator=torch.Generator(device="cuda").manual_seed(1))
    assert first.device.type == "cpu"
    torch.testing.assert_close(first, again, rtol=0, atol=0)
