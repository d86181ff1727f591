"""FD-CAM: the authors' code written out (their VGG16 route: the layer's output through the pooled classifier),
one image at a time, and its options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution
from conftest import tiny_cnn


class VggLike(nn.Module):
    """features -> avgpool -> flatten -> classifier, as torchvision's VGG (the authors' model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 40, 3, padding=1),
                                      nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(160, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def authors_map(model: VggLike, image: torch.Tensor, category: int, threshold: float) -> torch.Tensor:
    """Their get_cam_weights for one image, then pytorch-grad-cam's ReLU(sum_k w_k A_k), upsampled."""
    kept = {}
    handle = model.features.register_forward_hook(lambda m, a, out: kept.update(a=out))
    out = model(image[None])
    handle.remove()
    acts = kept["a"]
    (grads,) = torch.autograd.grad(out[0, category], acts)
    acts, grads = acts.detach().double(), grads.double().mean(dim=(2, 3))  # (1, C, h, w), (1, C)
    flat = acts.reshape(acts.shape[1], -1)
    cosine = (flat @ flat.T) / (flat.norm(dim=1)[:, None] * flat.norm(dim=1)[None, :])
    cosine[torch.isnan(cosine)] = 0
    on = torch.stack([cosine[i] > torch.quantile(cosine[i], threshold) for i in range(cosine.shape[0])]).double()
    off = 1 - on
    orig = out[0, category].double().detach()
    with torch.no_grad():
        tail = lambda batch: model.classifier(torch.flatten(model.avgpool(batch.float()), 1))[:, category].double()  # noqa: E731
        scores = tail(acts * on[:, :, None, None]) + orig - tail(acts * off[:, :, None, None])

    def min_max(t):
        return (t - t.min()) / (t.max() - t.min())

    weights = torch.exp(min_max(scores)) * min_max(grads[0]) - 0.5
    cam = F.relu((weights[:, None, None] * acts[0]).sum(0))
    return F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("threshold", [0.95, 0.8])
def test_equals_the_authors_code(threshold):
    model = VggLike().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    classes = [1, 4]
    ours = attribution.FDCAM(model, target_layer="features", threshold=threshold)(x, classes)
    expected = torch.stack([authors_map(model, x[i], c, threshold) for i, c in enumerate(classes)])
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected.float(), rtol=1e-4, atol=1e-5)


def test_groups_are_the_most_similar_channels():
    from attribution.cam.fd_cam import similar_channels

    base = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    maps = torch.cat([base, 2 * base, -base, torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(3))], 1)
    groups = similar_channels(maps, 0.5)[0]
    assert groups[0].tolist() == [True, True, False, False]  # itself and its scaled copy, not its negation
    assert groups[2, 2] and not groups[2, 0]


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold must be a quantile"):
        attribution.FDCAM(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, threshold=1.0)
