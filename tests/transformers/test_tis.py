"""TIS against its algorithm written out the authors' way (one image, one mask at a time, tokens removed after the
position embedding by a hook on timm's ``pos_drop``), and its k-means against scikit-learn's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.transformers.tis import kmeans
from conftest import tiny_vit

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def test_kmeans_equals_scikit_learns_lloyd_from_the_same_start():
    """Four well-separated blobs per image; scikit-learn's Lloyd from the same initial points (the first k of the
    shared permutation) ends at the same centroids."""
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 6, generator=generator, dtype=torch.float64) * 10
    points = torch.stack([centres.repeat(25, 1) + torch.randn(100, 6, generator=generator, dtype=torch.float64)
                          for _ in range(2)])  # (2, 100, 6)
    ours = kmeans(points, 5, 100, torch.Generator().manual_seed(0))
    start = torch.randperm(100, generator=torch.Generator().manual_seed(0))[:5]
    for image in range(2):
        reference = sklearn_cluster.KMeans(5, init=points[image, start].numpy(), n_init=1, algorithm="lloyd",
                                           tol=0.0, max_iter=100).fit(points[image].numpy())
        theirs = torch.from_numpy(reference.cluster_centers_)
        torch.testing.assert_close(ours[image], theirs, rtol=1e-9, atol=1e-9)


def tis_written_out(model, x, classes, centroids, ratios):
    """Per image, ratio and centroid: binary mask of the top int(ratio P) tokens of the centroid, a forward whose
    pos_drop output keeps the class token and those tokens, the class's softmax; scores spread over their masks and
    divided by the coverage (all ratios together); the patch grid upsampled bilinearly."""
    maps = []
    for image, cls, cents in zip(x, classes, centroids):
        patches = cents.shape[1]
        scores, masks = [], []
        for ratio in ratios:
            for centroid in cents:
                kept = centroid.topk(int(ratio * patches)).indices
                handle = model.pos_drop.register_forward_hook(
                    lambda m, i, out, kept=kept: torch.cat([out[:, :1], out[:, 1:][:, kept]], dim=1))
                with torch.no_grad():
                    scores.append(model(image[None]).softmax(1)[0, cls])
                handle.remove()
                mask = torch.zeros(patches)
                mask[kept] = 1
                masks.append(mask)
        masks = torch.stack(masks)
        coverage = masks.sum(0)
        saliency = (torch.stack(scores)[:, None] * masks).sum(0) / coverage.clamp(min=1)
        maps.append(saliency.view(1, 4, 4))
    return F.interpolate(torch.stack(maps), size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("n_masks, ratios", [(12, [0.5]), (48, [0.25]), (8, [0.25, 0.5])])
def test_tis_equals_the_algorithm_written_out(n_masks, ratios):
    model = tiny_vit()
    torch.manual_seed(0)
    x, classes = torch.randn(3, 3, 16, 16), [0, 2, 4]
    features = []
    handles = [block.register_forward_hook(lambda m, i, out: features.append(out)) for block in model.blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    points = torch.cat(features, dim=2)[:, 1:].transpose(1, 2)  # (3, 2 * 24, 16)
    centroids = kmeans(points, n_masks, 100, torch.Generator().manual_seed(7))
    expected = tis_written_out(model, x, classes, centroids, ratios)
    ours = A.TIS(model)(x, classes, n_masks=n_masks, tokens_ratio=ratios, generator=torch.Generator().manual_seed(7),
                        batch_size=10)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_models_that_cannot_drop_tokens_get_a_clear_error():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=4, depth=2, embed_dim=64,
                              num_heads=2, img_size=32, patch_size=8).eval()
    with pytest.raises(ValueError, match="removes patch tokens"):
        A.TIS(model)(torch.randn(1, 3, 32, 32), 0, n_masks=4)


def test_bad_options_name_what_is_wrong():
    explainer, x = A.TIS(tiny_vit()), torch.randn(1, 3, 16, 16)
    for options, match in (({"n_masks": 0}, "n_masks"), ({"tokens_ratio": 0.0}, "tokens_ratio"),
                           ({"tokens_ratio": []}, "tokens_ratio"), ({"kmeans_iterations": 0}, "kmeans_iterations")):
        with pytest.raises(ValueError, match=match):
            explainer(x, 1, **options)
