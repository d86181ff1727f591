"""CF-CAM: the authors' procedure (their cfcam.py) written out one image at a time, DBSCAN against scikit-learn,
the bilateral filter against OpenCV, defaults, batch independence, create_graph and bad options."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.cam.cf_cam import (CFCAM, authors_gradient_filter, bilateral_filter, cluster_channels, dbscan,
                                    pair_quantile, pairwise_distances)
from conftest import cam_cnn, check_parameter_derivative, tiny_cnn

# the by-hand filter keeps the authors' conv2d(padding='same'), which warns for even kernel sizes
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


# ------------------------------------------------------------------------------- the authors' procedure, by hand
def dbscan_by_hand(distance: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """scikit-learn's DBSCAN loop: neighbours within eps (<=, self included), depth-first from each unlabelled
    core point in index order; clusters numbered as found, -1 for noise."""
    count = len(distance)
    neighbours = [np.nonzero(distance[i] <= eps)[0] for i in range(count)]
    core = [len(n) >= min_samples for n in neighbours]
    labels = np.full(count, -1)
    found = 0
    for start in range(count):
        if labels[start] != -1 or not core[start]:
            continue
        stack = [start]
        while stack:
            point = stack.pop()
            if labels[point] != -1:
                continue
            labels[point] = found
            if core[point]:
                stack.extend(int(v) for v in neighbours[point] if labels[v] == -1)
        found += 1
    return labels


def filter_by_hand(gradient: torch.Tensor, sigma_spatial: float = 5.0, sigma_range: float = 0.1) -> torch.Tensor:
    """Their _bilateral_filter for one (h, w) map: one kernel for the whole map (a Gaussian around (h/2, w/2) in
    float32 positions times a Gaussian of value minus the map's mean), normalised, then conv2d 'same'."""
    height, width = gradient.shape
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    dist2 = (ii.float() - height / 2) ** 2 + (jj.float() - width / 2) ** 2
    kernel = torch.exp(-dist2 / (2 * sigma_spatial ** 2)) * torch.exp(
        -(gradient - gradient.mean()) ** 2 / (2 * sigma_range ** 2))
    kernel = kernel / (kernel.sum() + 1e-6)
    return F.conv2d(gradient[None, None], kernel[None, None], padding="same")[0, 0]


def authors_map(model, layer, image, category, gradient_filter=filter_by_hand, norm_q=75, eps_q=25, frac=0.05):
    """cfcam.py's CFCAM.__call__ for one image, without the final division by the maximum."""
    store = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: store.__setitem__("a", output))
    logits = model(image[None])
    handle.remove()
    (grads,) = torch.autograd.grad(logits[0, category], store["a"])
    acts, grads = store["a"].detach()[0], grads[0]
    channels = acts.shape[0]
    feats = acts.reshape(channels, -1).numpy()
    norms = np.linalg.norm(feats, ord=2, axis=1)
    important = norms >= np.percentile(norms, norm_q)
    rest = np.nonzero(~important)[0]
    labels = np.full(channels, -2)
    clusters = 0
    if len(rest) > 0:
        sub = feats[rest]
        dist = np.linalg.norm(sub[:, None] - sub[None, :], axis=2)
        eps = max(np.percentile(dist[~np.eye(len(rest), dtype=bool)], eps_q), 1e-5)
        labels[rest] = dbscan_by_hand(dist, eps, max(2, int(len(rest) * frac)))
        clusters = int(labels.max()) + 1 if labels.max() >= 0 else 0
    weights = torch.zeros(channels, dtype=grads.dtype)
    for k in np.nonzero(important)[0]:
        weights[k] = grads[k].mean()
    for cluster in range(clusters):
        members = np.nonzero(labels == cluster)[0]
        smooth = gradient_filter(grads[members].mean(dim=0))
        for k in members:
            weights[k] = smooth.mean()
    valid = torch.as_tensor(labels != -1)
    cam = F.relu((torch.softmax(weights[valid], 0)[:, None, None] * acts[valid]).sum(0))
    up = F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    return up, labels


def resnet18_5():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).double().eval()


def check_against_authors(model, layer_name, x, classes, **options):
    layer = dict(model.named_modules())[layer_name]
    cases = [authors_map(model, layer, x[i], c) if not options else
             authors_map(model, layer, x[i], c, lambda g: bilateral_filter(g[None], 0.1, 5.0)[0])
             for i, c in enumerate(classes)]
    expected = torch.stack([map_ for map_, _ in cases])
    labels = np.stack([lab for _, lab in cases])
    ours = CFCAM(model, target_layer=layer_name, **options)(x, classes)
    assert (labels >= 0).any() and (labels == -1).any(), "the case should have clusters and noise channels"
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)
    return labels


def test_equals_the_authors_code_on_a_tiny_cnn():
    model = tiny_cnn().double()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_against_authors(model, "4", x, [0, 3, 2])


@pytest.mark.parametrize("options", [{}, {"gradient_filter": "bilateral"}])
def test_equals_the_authors_code_on_cam_cnn(options):
    model = cam_cnn().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_against_authors(model, "2", x, [1, 7], **options)


@pytest.mark.parametrize("layer", ["layer2", "layer3", "layer4"])  # 4x4, 2x2 (the default layer), 1x1 maps
def test_equals_the_authors_code_on_resnet18(layer):
    model = resnet18_5()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_against_authors(model, layer, x, [4, 0])


@pytest.mark.parametrize("channels", [1, 2])
def test_one_or_two_channels(channels):
    """One channel is kept (its norm is its own quantile): ReLU(A).  Of two, the larger norm is kept and the other,
    alone for DBSCAN, is noise (the authors' percentile of no distances raises there): ReLU(A_larger)."""
    torch.manual_seed(14)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, stride=2, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(channels, 3)).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    acts = model[0](x).detach()
    keep = acts.flatten(2).norm(dim=2).argmax(dim=1)
    expected = F.interpolate(F.relu(acts[torch.arange(2), keep][:, None]), size=(12, 12), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(CFCAM(model, target_layer="0")(x, [0, 2]), expected)


def test_cluster_labels_are_the_authors():
    model = cam_cnn().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    layer = model[2]
    expected = [authors_map(model, layer, x[i], 0)[1] for i in range(2)]
    store = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: store.__setitem__("a", output.detach()))
    model(x)
    handle.remove()
    labels = cluster_channels(store["a"], 0.75, 0.25, 0.05)
    for ours, theirs in zip(labels.tolist(), expected):   # first core channel -> scikit-learn's running number
        roots = sorted({v for v in ours if v >= 0})
        assert [roots.index(v) if v >= 0 else v for v in ours] == theirs.tolist()


# ------------------------------------------------------------------------------------------- DBSCAN and quantile
def blobs(images: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(images, 4, 3, dtype=torch.float64, generator=g) * 3
    which = torch.randint(0, 4, (images, count), generator=g)
    points = centres.gather(1, which[..., None].expand(-1, -1, 3)) + torch.randn(images, count, 3,
                                                                                  dtype=torch.float64, generator=g)
    return points


def test_dbscan_matches_scikit_learn():
    cluster = pytest.importorskip("sklearn.cluster")
    points = blobs(6, 40, 29)
    distance = pairwise_distances(points)
    torch.testing.assert_close(distance, torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist"),
                               rtol=0, atol=1e-12)
    eps = torch.tensor([0.8, 1.0, 1.2, 1.5, 2.0, 1.0], dtype=torch.float64)
    min_samples = torch.tensor([2, 3, 4, 5, 8, 3])
    take = torch.rand(6, 40, generator=torch.Generator().manual_seed(6)) > 0.2
    take[0] = True
    labels = dbscan(distance, eps, min_samples, take)
    for b in range(6):
        idx = torch.nonzero(take[b]).flatten()
        sub = distance[b][idx][:, idx].numpy()
        theirs = cluster.DBSCAN(eps=float(eps[b]), min_samples=int(min_samples[b]), metric="precomputed").fit(sub)
        ours = labels[b, idx].tolist()
        roots = sorted({v for v in ours if v >= 0})
        assert [roots.index(v) if v >= 0 else -1 for v in ours] == theirs.labels_.tolist()
        assert dbscan_by_hand(sub, float(eps[b]), int(min_samples[b])).tolist() == theirs.labels_.tolist()
        assert (labels[b, ~take[b]] == -1).all()
    # the case holds several clusters, noise, and border points within eps of two clusters' core points
    near = (distance <= eps[:, None, None]) & take[:, :, None] & take[:, None, :]
    core = (near.sum(2) >= min_samples[:, None]) & take
    reach = [{int(labels[b, j]) for j in torch.nonzero(near[b, i] & core[b]).flatten()}
             for b in range(6) for i in range(40) if take[b, i] and not core[b, i]]
    assert sum(len(r) > 1 for r in reach) >= 1
    assert max(len(set(row) - {-1}) for row in labels.tolist()) >= 3 and (labels == -1).any()


def test_dbscan_neighbourhood_includes_eps_and_single_points_are_noise():
    points = torch.tensor([[[0.0], [1.0], [5.0]]], dtype=torch.float64)
    distance = pairwise_distances(points)
    assert dbscan(distance, 1.0, 2).tolist() == [[0, 0, -1]]
    assert dbscan(distance, 0.999, 2).tolist() == [[-1, -1, -1]]
    assert dbscan(distance, 1.0, 2, torch.tensor([[True, False, False]])).tolist() == [[-1, -1, -1]]
    with pytest.raises(ValueError, match="distance must be"):
        dbscan(torch.zeros(2, 3), 1.0, 2)


def test_pair_quantile_is_numpys_percentile_of_the_off_diagonal_distances():
    points = blobs(5, 13, 7)
    distance = pairwise_distances(points)
    take = torch.rand(5, 13, generator=torch.Generator().manual_seed(8)) > 0.3
    take[0] = True
    take[1, 2:] = False  # two points: one pair
    take[2, 1:] = False  # one point: no pair
    for q in (0.0, 0.25, 0.6, 1.0):
        ours = pair_quantile(distance, take, q)
        for b in range(5):
            idx = torch.nonzero(take[b]).flatten()
            sub = distance[b][idx][:, idx].numpy()
            off = sub[~np.eye(len(idx), dtype=bool)]
            if off.size == 0:
                assert torch.isnan(ours[b])
            else:
                assert float(ours[b]) == pytest.approx(np.percentile(off, 100 * q), rel=1e-13)


# ------------------------------------------------------------------------------------------------------ filters
@pytest.mark.parametrize("size", [(7, 7), (4, 6), (5, 4), (1, 1)])
def test_authors_filter_is_their_code_batched(size):
    maps = torch.randn(3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 0.2
    expected = torch.stack([filter_by_hand(m).reshape(size) for m in maps])
    ours = authors_gradient_filter(maps, 5.0, 0.1)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-8)  # their positions are float32
    assert size == (1, 1) or not torch.allclose(ours, maps, atol=1e-3)
    assert authors_gradient_filter(maps[:0], 5.0, 0.1).shape == (0, *size)


@pytest.mark.parametrize("sigmas", [(0.1, 5.0), (0.3, 1.0), (1.0, 2.0), (0.05, 0.6)])
def test_bilateral_filter_matches_opencv(sigmas):
    cv2 = pytest.importorskip("cv2")
    sigma_color, sigma_space = sigmas
    g = torch.Generator().manual_seed(10)
    for size in [(7, 7), (12, 9), (1, 5), (2, 3)]:
        maps = torch.rand(2, *size, dtype=torch.float64, generator=g)
        ours = bilateral_filter(maps, sigma_color, sigma_space)
        for m, o in zip(maps, ours):
            theirs = cv2.bilateralFilter(m.numpy().astype(np.float32), 0, sigma_color, sigma_space)
            np.testing.assert_allclose(o.numpy(), theirs, atol=2e-6)
        assert not torch.allclose(ours, maps)


# ------------------------------------------------------------------------------------------- contract and options
def test_defaults_are_the_authors():
    assert {k: CFCAM.defaults[k] for k in ("norm_quantile", "eps_quantile", "min_samples_fraction",
                                           "gradient_filter", "sigma_spatial", "sigma_range")} == {
        "norm_quantile": 0.75, "eps_quantile": 0.25, "min_samples_fraction": 0.05, "gradient_filter": "authors",
        "sigma_spatial": 5.0, "sigma_range": 0.1}


def test_registered():
    import attribution

    assert attribution.create("cf_cam", tiny_cnn()).__class__ is CFCAM


def test_batch_independence_and_internal_batches():
    model = cam_cnn()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    explainer = CFCAM(model, target_layer="2")
    together = explainer(x, [1, 2, 3])
    alone = torch.cat([explainer(x[i:i + 1], [c]) for i, c in enumerate([1, 2, 3])])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explainer(x, [1, 2, 3], batch_size=2), together, rtol=1e-5, atol=1e-6)
    assert together.shape == (3, 1, 32, 32) and float(together.amin()) >= 0


def test_float32_agrees_with_float64():
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    single = CFCAM(model, target_layer="2")(x, [0, 5])
    double = CFCAM(model.double(), target_layer="2")(x.double(), [0, 5])
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gradient_filter", ["authors", "bilateral"])
def test_create_graph_derivative_matches_finite_differences(gradient_filter):
    model = cam_cnn().double()
    with torch.no_grad():  # channel weights spread over ~1, not ~0.01: the softmax is far from uniform
        model[6].weight.mul_(100)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    explainer = CFCAM(model, target_layer="2", gradient_filter=gradient_filter)
    check_parameter_derivative(lambda graph: explainer(x, [2, 6], create_graph=graph), model,
                               ["0.0.weight", "6.weight"], rtol=1e-5)


@pytest.mark.parametrize("option, value", [
    ("norm_quantile", 1.5), ("norm_quantile", True), ("eps_quantile", -0.1), ("min_samples_fraction", "x"),
    ("sigma_spatial", 0), ("sigma_range", -1.0), ("gradient_filter", "guided"), ("layer_fusion", "sum")])
def test_bad_options_name_themselves(option, value):
    with pytest.raises(ValueError, match=option):
        CFCAM(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, **{option: value})
