"""SISE against the authors' algorithm written out one image, one layer and one channel at a time."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution import create
from attribution.cam.sise import SISE, fuse_visualization_maps, otsu_level, otsu_threshold
from conftest import RowCounter, cam_cnn, central_difference

torchvision = pytest.importorskip("torchvision")
filters = pytest.importorskip("skimage.filters")

CLASSES = [2, 5, 9]


@pytest.fixture(scope="module")
def model():
    return cam_cnn().double()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return torch.cat([images, images[:1]])  # the third image is the first again, explained for another class


# ------------------------------------------------------------------------------------------- written out
def authors_otsu(image: np.ndarray, nbins: int = 256, tau: float = 1.5) -> float:
    """The authors' ``otsu``: histogram of round(I * nbins), the level of largest between-class variance (a loop
    over the levels), raised by tau when less than 10% of the pixels lie from round(t * tau) up."""
    levels = np.round(image * nbins)
    hist, _ = np.histogram(levels.ravel(), nbins, [0, nbins])
    values = np.arange(nbins)
    variances = np.zeros(nbins)
    for split in range(1, nbins):
        below, above = hist[:split].sum(), hist[split:].sum()
        mean_below = (hist[:split] * values[:split]).sum() / below
        mean_above = (hist[split:] * values[split:]).sum() / above
        variances[split] = below * above * (mean_below - mean_above) * (mean_below - mean_above)
    level = np.argmax(variances)
    if hist[int(round(level * tau)):nbins].sum() < 0.1 * hist.sum():
        return level * tau / nbins
    return level / nbins


def sise_written_out(model, x, classes, layers, threshold=0.0, fusion="otsu", temperature=100.0, score="softmax"):
    """The authors' ``SISE``: ``create_attribution_masks``, ``visualize_layers`` per layer (a loop over the kept
    channels), ``fuse_visualization_maps``.  Returns the maps and the number of channels kept per image."""
    modules = dict(model.named_modules())
    f = (lambda out: out.softmax(1)) if score == "softmax" else (lambda out: out)
    maps, kept = [], []
    for image, cls in zip(x, classes):
        image = image[None]
        store = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in layers]
        with torch.enable_grad():
            target_score = f(model(image))[0, cls]
        for hook in hooks:
            hook.remove()
        grads = torch.autograd.grad(target_score, [store[n] for n in layers])
        visualizations = []
        count = 0
        for name, grad in zip(layers, grads):
            acts = store[name].detach()
            significance = grad[0].mean(dim=(1, 2))
            chosen = torch.nonzero(significance > threshold * significance.max()).flatten().tolist()
            count += len(chosen)
            total = torch.zeros(image.shape[-2:], dtype=x.dtype)
            for k in chosen:
                mask = F.interpolate(acts[:, k:k + 1], image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
                mask = mask - mask.min()
                mask = mask / (mask.max() + 10e-7)
                with torch.no_grad():
                    masked_score = f(model(image * mask))[0, cls]
                total += masked_score * mask / (mask.sum() + 10e-7)
            total = total - total.min()
            visualizations.append(total / total.max())
        fused = visualizations[0]
        for current in visualizations[1:]:
            if fusion == "simple":
                gate = current
            else:
                gate = 1 / (1 + torch.exp(-(current - authors_otsu(current.numpy())) * temperature))
            fused = (fused + current) * gate
        maps.append(fused[None])
        kept.append(count)
    return torch.stack(maps), kept


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("threshold, fusion, score", [(0.0, "otsu", "softmax"), (0.4, "simple", "softmax"),
                                                      (0.0, "otsu", "logit")])
def test_equals_the_authors_algorithm_written_out(model, x, threshold, fusion, score):
    explainer = SISE(model, grad_threshold=threshold, fusion=fusion, score=score)
    layers = [explainer._name(layer) for layer in explainer.target_layers(x)]
    assert layers == ["0", "2", "3"]  # grids 32, 16 and 8: the ends of the three resolution stages
    counter = RowCounter(model)
    try:
        ours = explainer(x, CLASSES, batch_size=7)  # chunks that straddle two layers
    finally:
        counter.close()
    expected, kept = sise_written_out(model, x, CLASSES, layers, threshold, fusion, score=score)
    assert ours.dtype == torch.float64 and ours.shape == (3, 1, 32, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)
    # one capture per image, then one masked forward per kept channel, fewer than all 16 + 32 + 48
    assert sum(counter.rows) == 3 + sum(kept) and all(0 < k < 96 for k in kept)
    # maps with structure, not constants; with logits the deepest map of image 2 (class 5) is high almost
    # everywhere: its Otsu level passes 256 / 1.5, the authors' raised threshold (1.13) exceeds every pixel and
    # gates the whole map off (to 2e-6)
    assert (expected.flatten(1).std(1) > 0.01).sum() == (2 if score == "logit" else 3)


def test_one_layer_is_its_visualization_map_and_a_list_follows_forward_order(model, x):
    alone = SISE(model, "2")(x, CLASSES)
    torch.testing.assert_close(alone, sise_written_out(model, x, CLASSES, ["2"])[0], rtol=1e-7, atol=1e-9)
    assert alone.flatten(1).amin(1).eq(0).all() and alone.flatten(1).amax(1).eq(1).all()  # min-max scaled
    two = SISE(model, ["1", "3"])(x[:2], CLASSES[:2])
    torch.testing.assert_close(two, sise_written_out(model, x[:2], CLASSES[:2], ["1", "3"])[0],
                               rtol=1e-7, atol=1e-9)


def random_maps(count: int = 12, side: int = 40) -> torch.Tensor:
    """Min-max scaled maps, as SISE's visualisation maps: smooth blobs, noise, and a small bright peak."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count, 1, 5, 5, generator=generator, dtype=torch.float64)
    maps = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    maps = maps + 0.1 * torch.rand(count, side, side, generator=generator, dtype=torch.float64)
    maps[-3:] = 0.3 * torch.rand(3, side, side, generator=generator, dtype=torch.float64)
    maps[-3:, 10:14, 10:14] += 1.0  # 1% of the pixels far above the rest: the threshold gets raised
    low = maps.flatten(1).amin(1).view(-1, 1, 1)
    high = maps.flatten(1).amax(1).view(-1, 1, 1)
    return (maps - low) / (high - low)


def test_otsu_level_is_scikit_images_on_the_authors_histogram():
    """scikit-image's ``threshold_otsu`` on the integer image round(V * 256) (the last level folded into bin 255)
    returns the top of the lower class; the authors' level is the first level of the upper class, one more."""
    maps = random_maps()
    levels = otsu_level(maps)[0]
    for level, image in zip(levels.tolist(), maps):
        integer = np.minimum(np.round(image.numpy() * 256), 255).astype(np.int64)
        assert level == filters.threshold_otsu(integer) + 1
    assert len(set(levels.tolist())) > 5  # not one level for every map


def test_otsu_threshold_is_the_authors_with_its_bottleneck():
    maps = random_maps()
    ours = otsu_threshold(maps)
    expected = torch.tensor([authors_otsu(image.numpy()) for image in maps], dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    raised = ours != otsu_level(maps)[0] / 256
    assert raised[-3:].all() and not raised.all()
    # one bright pixel: every split has the same variance, the first (level 1) wins and is raised to 1.5 / 256
    spike = torch.zeros(1, 8, 8, dtype=torch.float64)
    spike[0, 3, 3] = 1.0
    assert otsu_threshold(spike).item() == authors_otsu(spike[0].numpy()) == 1.5 / 256
    # a constant map (a layer that kept no channel): no split, threshold 0; float32 maps get float32 thresholds
    assert otsu_threshold(torch.zeros(2, 4, 4)).tolist() == [0.0, 0.0]
    assert otsu_threshold(maps.float()).dtype == torch.float32


def test_fusion_of_written_maps():
    maps = list(random_maps(6)[:, None].unbind(0))  # three layers of two maps each, as (2, 40, 40) below
    layers = [torch.cat(maps[i:i + 2]) for i in (0, 2, 4)]
    expected = layers[0]
    for current in layers[1:]:
        threshold = torch.tensor([authors_otsu(m.numpy()) for m in current], dtype=torch.float64).view(-1, 1, 1)
        expected = (expected + current) / (1 + torch.exp(-(current - threshold) * 100.0))
    torch.testing.assert_close(fuse_visualization_maps(layers), expected, rtol=1e-12, atol=1e-12)
    simple = (((layers[0] + layers[1]) * layers[1]) + layers[2]) * layers[2]
    torch.testing.assert_close(fuse_visualization_maps(layers, "simple"), simple)


def test_defaults():
    assert SISE.defaults == {"target_layer": None, "reshape_transform": None, "grad_threshold": 0.0,
                             "fusion": "otsu", "temperature": 100.0, "score": "softmax", "progress": False}
    assert create("sise", cam_cnn()).__class__ is SISE


def test_default_layers_are_the_block_ends():
    """torchvision ResNet: the stem's ReLU and layer1..layer4 (the authors' layer_finder on a Keras ResNet-50);
    a VGG-style net: the ReLU before each max-pooling and the last before the global pooling."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    explainer = SISE(resnet)
    names = [explainer._name(layer) for layer in explainer.target_layers(torch.randn(1, 3, 64, 64))]
    assert names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    vgg = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    explainer = SISE(vgg)
    x = torch.randn(2, 3, 16, 16)
    assert [explainer._name(layer) for layer in explainer.target_layers(x)] == ["1", "6", "9"]
    torch.testing.assert_close(explainer(x, [0, 2]), SISE(vgg, ["1", "6", "9"])(x, [0, 2]))


def test_batch_independence_and_the_argmax_target(model, x):
    together = SISE(model)(x[:2], [4, 7], batch_size=5)
    for i, cls in enumerate([4, 7]):
        torch.testing.assert_close(together[i:i + 1], SISE(model)(x[i:i + 1], cls), rtol=1e-10, atol=1e-12)
    classes = model(x[:2]).argmax(1)
    torch.testing.assert_close(SISE(model)(x[:2]), SISE(model)(x[:2], classes))


def test_create_graph_is_differentiable_wrt_the_parameters():
    net = cam_cnn().double()
    torch.manual_seed(5)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    explainer = SISE(net, ["1", "3"])
    out = explainer(images, [1, 2], create_graph=True)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), explainer(images, [1, 2]))
    weigh = torch.linspace(0, 1, 16 * 16, dtype=torch.float64).view(1, 1, 16, 16)
    for weight in (net[0][0].weight, net[-1].weight):  # below every layer; the classifier (scores, gradients)
        (grad,) = torch.autograd.grad((explainer(images, [1, 2], create_graph=True) * weigh).sum(), weight)
        direction = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        difference = central_difference(lambda: (explainer(images, [1, 2]) * weigh).sum(), weight, direction)
        assert grad.abs().sum() > 0
        torch.testing.assert_close((grad * direction).sum(), difference, rtol=1e-5, atol=1e-8)


def test_option_errors(model, x):
    explainer = SISE(model)
    for bad in (-0.1, 1.0, True, "0.5", math.nan):
        with pytest.raises(ValueError, match=r"grad_threshold must be a number in \[0, 1\)"):
            explainer(x, 0, grad_threshold=bad)
    with pytest.raises(ValueError, match=r"fusion must be one of \('otsu', 'simple'\), got 'max'"):
        explainer(x, 0, fusion="max")
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        explainer(x, 0, temperature=0)
    with pytest.raises(ValueError, match=r"shallow to deep .*\['3', '0'\]"):
        explainer(x, 0, target_layer=["3", "0"])
    with pytest.raises(ValueError, match="name the layers to combine"):
        explainer(x, 0, reshape_transform=lambda t: t)
    with pytest.raises(TypeError, match="unknown option 'grad_thr'"):
        SISE(model, grad_thr=0.5)


def test_on_the_pretrained_model(efficientnet):
    """The cat/coffee composite (96 x 192), three stage ends below the head, maps whose mean gradient is at least
    0.3 of the largest (116 forwards for the pair): 0.947 of the cat map's mass on the cat half, 0.056 of the
    coffee map's when written."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO, cat_coffee_composite

    pair = cat_coffee_composite(side=96).repeat(2, 1, 1, 1)
    maps = SISE(efficientnet, ["_blocks.4", "_blocks.10", "_blocks.14"], grad_threshold=0.3)(
        pair, [EGYPTIAN_CAT, ESPRESSO])
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    mass = maps.sum(dim=(1, 2))
    share = mass[:, :mass.shape[1] // 2].sum(1) / mass.sum(1)
    print(f"sise: {share[0]:.3f} - {share[1]:.3f} = {share[0] - share[1]:.3f}")
    assert share[0] - share[1] >= 0.3
