"""ViT-CX against a plain re-computation of the paper's formula (full-resolution masks, scikit-learn's clustering)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.cam.vit_cx import complete_linkage
from conftest import cam_cnn, tiny_vit

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def same_partition(a, b) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return bool(((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all())


def sklearn_labels(distance: torch.Tensor, threshold: float):
    return sklearn_cluster.AgglomerativeClustering(n_clusters=None, distance_threshold=threshold,
                                                   metric="precomputed", linkage="complete"
                                                   ).fit(distance.double().numpy()).labels_


@pytest.mark.parametrize("count", [2, 7, 40])
@pytest.mark.parametrize("threshold", [0.15, 0.4, 0.8])
def test_complete_linkage_matches_scikit_learn(count, threshold):
    torch.manual_seed(count)
    points = torch.rand(3, count, 4, dtype=torch.float64)
    distance = torch.cdist(points, points)
    labels = complete_linkage(distance, threshold)
    for image in range(3):
        assert same_partition(labels[image], sklearn_labels(distance[image], threshold))


def test_complete_linkage_rejects_non_square_input():
    with pytest.raises(ValueError, match="distance must be"):
        complete_linkage(torch.zeros(2, 3, 4), 0.1)


def vit_cx_by_hand(model, layer, x, classes, threshold, noise_draws=None):
    """The paper's recipe at full resolution: masks upsampled then min-max scaled, cosine distances, clustering by
    scikit-learn, cluster masks summed and rescaled, ``s_k = p(x M + (1-M) n) - p(x + (1-M) n) + p(x)`` and
    ``(1/K) sum_k s_k M_k / sum_j M_j``; ``noise_draws`` (sum K, C, H, W) are the noise images in mask order."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        clean = model(x).softmax(1)
    handle.remove()
    maps, used = [], 0
    for b, cls in enumerate(classes):
        up = F.interpolate(store["a"][b:b + 1], x.shape[-2:], mode="bilinear", align_corners=False)[0].flatten(1)
        low, high = up.amin(1, keepdim=True), up.amax(1, keepdim=True)
        masks = torch.where(high > low, (up - low) / (high - low).clamp_min(1e-30), torch.zeros_like(up))
        norms = masks.norm(dim=1)
        cosine = (masks @ masks.T) / (norms[:, None] * norms[None, :])
        cosine[torch.isnan(cosine)] = 0
        labels = sklearn_labels(1 - cosine, threshold)
        labels = torch.as_tensor(labels)
        order = sorted(set(labels.tolist()), key=lambda k: int(torch.nonzero(labels == k)[0]))  # by first member
        clusters = torch.stack([masks[labels == k].sum(0) for k in order])
        low, high = clusters.amin(1, keepdim=True), clusters.amax(1, keepdim=True)
        clusters = torch.where(high > low, (clusters - low) / (high - low).clamp_min(1e-30),
                               torch.zeros_like(clusters)).view(-1, 1, *x.shape[-2:])
        k = clusters.shape[0]
        fill = 0 if noise_draws is None else (1 - clusters) * noise_draws[used:used + k]
        used += k
        with torch.no_grad():
            masked = model(x[b] * clusters + fill).softmax(1)[:, cls]
            noisy = model(x[b] + fill).softmax(1)[:, cls] if noise_draws is not None else clean[b, cls]
        scores = masked - noisy + clean[b, cls]
        maps.append((scores.view(-1, 1, 1, 1) * clusters).sum(0) / clusters.sum(0) / k)
    return torch.stack(maps), used


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_vit_cx_is_the_papers_formula(noise):
    model = cam_cnn()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    classes = [2, 2]  # each image's arg-max, with probabilities near 0.7 (the others are below 1e-3 here)
    explainer = A.ViTCX(model, "2", distance_threshold=0.3, noise=noise,
                        generator=torch.Generator().manual_seed(5), batch_size=10_000)
    mine = explainer(x, classes)
    _, count = vit_cx_by_hand(model, model[2], x, classes, 0.3)
    assert 2 < count < 2 * 32, "the threshold must merge some channels, or the test checks no clustering"
    draws = torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * noise if noise else None
    reference, _ = vit_cx_by_hand(model, model[2], x, classes, 0.3, draws)
    # pixels that almost no mask covers divide two tiny numbers: compare to a fraction of the map's range
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_vit_cx_needs_no_reshape_on_a_vit_and_checks_its_options():
    model = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    out = A.ViTCX(model, "blocks.1.norm1", generator=torch.Generator().manual_seed(0))(x, [0, 1])
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all() and out.abs().sum() > 0
    with pytest.raises(ValueError, match="distance_threshold"):
        A.ViTCX(model, distance_threshold=3.0)(x, 0)
    with pytest.raises(ValueError, match="noise"):
        A.ViTCX(model, noise=-1)(x, 0)
