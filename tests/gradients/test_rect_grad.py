"""RectGrad: the authors' rule written out with NumPy's nearest-rank percentile in a copy of the model whose ReLU
modules carry it, its limits, and its options."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import attribution
from conftest import tiny_cnn


class _AuthorsRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        ctx.q = q
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        share = (out * grad).numpy()
        tau = np.percentile(share.reshape(share.shape[0], -1), ctx.q, axis=1, method="nearest")
        keep = share > tau.reshape((-1,) + (1,) * (share.ndim - 1))
        return grad * torch.from_numpy(keep), None


class AuthorsReLU(nn.Module):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        return _AuthorsRule.apply(x, self.q)


def written_out(model, x, targets, q):
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_children()):
        if isinstance(module, nn.ReLU):
            setattr(twin, name, AuthorsReLU(q))
    x = x.clone().requires_grad_(True)
    scores = twin(x)[torch.arange(len(targets)), torch.tensor(targets)]
    (grad,) = torch.autograd.grad(scores.sum(), x)
    return x.detach() * grad


@pytest.mark.parametrize("q", [98.0, 80.0, 50.0])
@pytest.mark.parametrize("inplace", [False, True])
def test_equals_the_authors_rule_written_out(q, inplace):
    model = tiny_cnn(inplace=inplace)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = written_out(model, x, [0, 3, 1], q)
    ours = attribution.RectGrad(model)(x, [0, 3, 1], percentile=q)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(ours, expected)
    plain = attribution.InputXGradient(model)(x, [0, 3, 1])
    assert not torch.allclose(ours, plain)


def test_the_threshold_is_per_image():
    """An image's map does not depend on the other images of the batch (each layer's percentile is per image)."""
    model = tiny_cnn()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    together = attribution.RectGrad(model)(x, [0, 1, 2, 3])
    alone = torch.cat([attribution.RectGrad(model)(x[i:i + 1], [i]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_bad_percentile():
    model, x = tiny_cnn(), torch.randn(1, 3, 16, 16)
    for bad in (-1, 100.5, "98", True):
        with pytest.raises(ValueError, match="percentile must be a number from 0 to 100"):
            attribution.RectGrad(model)(x, 0, percentile=bad)


def test_sequence_first_layers_keep_images_apart():
    """nn.TransformerEncoder (batch_first=False) runs its ReLUs on (L, B, E) tokens: the percentile is taken per
    image along the second dimension, so an image's map is the same alone and in a batch."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(12, 16)
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="relu")
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            tokens = self.embed(x.unfold(2, 2, 2).unfold(3, 2, 2).permute(2, 3, 0, 1, 4, 5).flatten(3).flatten(0, 1))
            return self.head(self.encoder(tokens).mean(dim=0))

    model = Tokens().eval()
    # 3 images of 16 tokens; then 4 images of 4 tokens, as many as the rows (the tie goes to the second dimension:
    # the model's nn.MultiheadAttention is sequence-first)
    for x in (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
              torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))):
        labels = [i % 3 for i in range(x.shape[0])]
        together = attribution.RectGrad(model)(x, labels, percentile=80.0)
        alone = torch.cat([attribution.RectGrad(model)(x[i:i + 1], [labels[i]], percentile=80.0)
                           for i in range(x.shape[0])])
        assert together.abs().sum() > 0
        torch.testing.assert_close(together, alone)


def test_batch_first_layers_before_a_sequence_first_block_keep_their_batch_dimension():
    """A batch-first token MLP (B, L, E) before nn.TransformerEncoder's sequence-first (L, B, E) blocks: with as
    many tokens as images, each layer's tie is settled by where it runs (outside the blocks: the first)."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16))
            layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="relu")
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            patches = x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
            tokens = self.embed(patches)  # (B, L, 16), batch-first
            return self.head(self.encoder(tokens.transpose(0, 1)).mean(dim=0))

    model = Tokens().eval()
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))  # 4 images of 4 tokens
    together = attribution.RectGrad(model)(x, [0, 1, 2, 0], percentile=80.0)
    alone = torch.cat([attribution.RectGrad(model)(x[i:i + 1], [label], percentile=80.0)
                       for i, label in enumerate([0, 1, 2, 0])])
    assert together.abs().sum() > 0
    torch.testing.assert_close(together, alone)


class Rectified(nn.Module):
    """Convolutions with rectifiers called in place as statements (``h.relu_()``, ``F.relu_(h)``), through modules
    whose in-place flag is positional (``nn.ReLU6``, ``nn.LeakyReLU``), or, with ``inplace=False``, out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.convs = nn.ModuleList(nn.Conv2d(c, 8, 3, padding=1) for c in (3, 8, 8, 8))
        self.relu6, self.leaky = nn.ReLU6(inplace=inplace), nn.LeakyReLU(0.1, inplace=inplace)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.convs[0](x)
        if self.inplace:
            h.relu_()
        else:
            h = h.relu()
        h = self.convs[1](h)
        if self.inplace:
            torch.nn.functional.relu_(h)
        else:
            h = torch.nn.functional.relu(h)
        h = self.leaky(self.relu6(self.convs[3](self.convs[2](h) * 4)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("name", ["guided_backprop", "deconvnet", "rect_grad"])
def test_in_place_statements_are_the_model_they_stand_for(name):
    """A rectifier called in place whose result is not used (``h.relu_()``) still rectifies ``h`` for the rest of
    the forward (it was computed out of place and dropped), so the map equals the out-of-place model's."""
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)
    explain = attribution.create(name, Rectified(inplace=True))
    torch.testing.assert_close(explain(x, [0, 3]), attribution.create(name, Rectified(inplace=False))(x, [0, 3]))
