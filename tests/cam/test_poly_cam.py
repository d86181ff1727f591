"""Poly-CAM against the authors' algorithm written out one image, one layer and one channel at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.cam.poly_cam import PolyCAM, local_normalization, percentile, percentile_scale, stage_ends
from conftest import cam_cnn, tiny_cnn

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def model():
    return cam_cnn().double()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return torch.cat([images, images[:1]])  # the third image is the first again, explained for another class


CLASSES = [2, 5, 9]


# ------------------------------------------------------------------------------------------- written out
def numpy_normalize(maps):
    """The authors' ``normalize``: NumPy percentiles 0.1 and 99.9 per map, minus the first, over the second."""
    flat = maps.detach().flatten(-2).numpy()
    low = torch.from_numpy(np.percentile(flat, 0.1, axis=-1))[..., None, None]
    high = torch.from_numpy(np.percentile(flat, 99.9, axis=-1))[..., None, None]
    scaled = (maps - low) / torch.maximum(high, torch.tensor(1e-12, dtype=maps.dtype))
    return torch.maximum(torch.minimum(scaled, torch.ones(1, dtype=maps.dtype)), torch.zeros(1, dtype=maps.dtype))


def official_layer_list(model, shape):
    """The authors' ``find_layer_list``: the module before each change of output size, stop at flatten or 1x1."""
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.append((n, o.shape)))
             for n, m in model.named_modules()]
    with torch.no_grad():
        model(torch.rand(1, *shape, dtype=next(model.parameters()).dtype))
    for hook in hooks:
        hook.remove()
    found = []
    last_name, last_shape = shapes[0]
    for name, out_shape in shapes[1:]:
        if out_shape[2:] != last_shape[2:]:
            if len(out_shape) != len(last_shape):
                break
            found.append(last_name)
            if out_shape[-1] == 1 and out_shape[-2] == 1:
                break
        last_name, last_shape = name, out_shape
    return found


def polycam_written_out(model, x, classes, layers, variant="pm", lnorm=True, score="softmax"):
    """The authors' ``compute_cams`` with their three ``get_weights`` (``score='logit'``: logits for softmax)."""
    modules = dict(model.named_modules())
    f = (lambda out: out.softmax(1)) if score == "softmax" else (lambda out: out)
    out = []
    for image, cls in zip(x, classes):
        image = image[None]
        store = {}
        hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: store.__setitem__(n, o)) for n in layers]
        with torch.no_grad():
            base = f(model(image))[0, cls]
        for hook in hooks:
            hook.remove()
        prev = None
        for name in reversed(layers):
            acts = store[name]
            normalized = numpy_normalize(acts)
            masks = F.interpolate(normalized, image.shape[-2:], mode="bilinear", align_corners=False)
            reverse = (F.interpolate(1 - normalized, image.shape[-2:], mode="bilinear", align_corners=False)
                       if variant == "m" else 1 - masks)
            weights = torch.zeros(acts.shape[1], dtype=acts.dtype)
            with torch.no_grad():
                for k in range(acts.shape[1]):
                    plus = f(model(image * masks[:, k:k + 1]))[0, cls]
                    minus = f(model(image * reverse[:, k:k + 1]))[0, cls]
                    options = {"p": plus, "m": torch.relu(base - minus), "pm": torch.relu(plus + base - minus)}
                    weights[k] = options[variant]
            cam = torch.relu((acts * weights.view(1, -1, 1, 1)).sum(1, keepdim=True))
            if prev is None:
                prev = cam
            else:
                if lnorm:
                    factor = F.interpolate(F.interpolate(cam, prev.shape[-2:], mode="bilinear"), cam.shape[-2:],
                                           mode="bilinear")
                    cam = cam / torch.maximum(factor, torch.tensor(1e-12, dtype=cam.dtype))
                prev = cam * F.interpolate(prev, cam.shape[-2:], mode="bilinear")
            prev = torch.relu(prev)
        out.append(F.interpolate(numpy_normalize(prev), image.shape[-2:], mode="bilinear")[0])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant, lnorm, score", [("pm", True, "softmax"), ("p", True, "softmax"),
                                                   ("m", True, "softmax"), ("pm", False, "softmax"),
                                                   ("pm", True, "logit")])  # logits: some pm weights < 0
def test_equals_the_authors_algorithm_written_out(model, x, variant, lnorm, score):
    layers = official_layer_list(model, (3, 32, 32))
    assert layers == ["0", "2", "3"]  # grids 32, 16 and 8: two refinements, both with a resize
    ours = PolyCAM(model, variant=variant, local_norm=lnorm, score=score)(x, CLASSES, batch_size=37)
    expected = polycam_written_out(model, x, CLASSES, layers, variant, lnorm, score)
    assert ours.dtype == torch.float64 and ours.shape == (3, 1, 32, 32)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-9)
    # maps with structure, not constants (with logits, every weight of image 2 for class 5 is clipped to 0)
    assert (expected.flatten(1).std(1) > 0.05).sum() >= (2 if score == "logit" else 3)


def test_user_layers_in_forward_order(model, x):
    ours = PolyCAM(model, ["1", "3"])(x[:2], CLASSES[:2])
    torch.testing.assert_close(ours, polycam_written_out(model, x[:2], CLASSES[:2], ["1", "3"]),
                               rtol=1e-7, atol=1e-9)


def test_percentile_is_numpys():
    torch.manual_seed(0)
    values = torch.randn(4, 3, 37, dtype=torch.float64)
    for q in (0.0, 0.1, 50.0, 99.9, 100.0):
        np.testing.assert_allclose(percentile(values, q).numpy(), np.percentile(values.numpy(), q, axis=-1))
    maps = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(percentile_scale(maps), numpy_normalize(maps))


def test_local_normalization_on_one_grid_is_the_support():
    cam = torch.tensor([[[[0.0, 2.0], [5e-13, 3.0]]]], dtype=torch.float64)
    torch.testing.assert_close(local_normalization(cam, (2, 2)),
                               torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]], dtype=torch.float64))
    # a constant map is 1 whatever the coarse grid
    torch.testing.assert_close(local_normalization(torch.full((1, 1, 8, 8), 3.0), (2, 2)), torch.ones(1, 1, 8, 8))


def test_one_layer_is_its_score_weighted_map_and_a_repeated_layer_changes_nothing(model, x):
    """With one layer the map is ``U(scale(ReLU(sum_k w_k A_k)))``; a layer given twice is that layer alone (LNorm
    of a map on its own grid is its support, so the product is the map again), unless LNorm is off (the square)."""
    alone = PolyCAM(model, "2")(x, CLASSES)
    torch.testing.assert_close(alone, polycam_written_out(model, x, CLASSES, ["2"]), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(PolyCAM(model, ["2", "2"])(x, CLASSES), alone, rtol=1e-7, atol=1e-9)
    squared = PolyCAM(model, ["2", "2"], local_norm=False)(x, CLASSES)
    assert (squared - alone).abs().max() > 0.05
    # a single layer's map does not depend on the local normalisation
    torch.testing.assert_close(PolyCAM(model, "2", local_norm=False)(x, CLASSES), alone)


def test_counts_its_forwards_and_shares_them_between_copies_of_an_image(model, x):
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        explainer = PolyCAM(model)
        explainer.target_layers(x)  # the layer discovery's forward, once per input shape
        sizes.clear()
        explainer(x, CLASSES, variant="pm")
        pm = sum(sizes)
        sizes.clear()
        explainer(x, CLASSES, variant="p")
        p = sum(sizes)
    finally:
        hook.remove()
    channels = 16 + 32 + 48
    assert pm == 3 + 2 * 2 * channels  # 3 captures, 2 distinct images, 2 sides per channel
    assert p == 3 + 2 * channels


def test_default_layers_on_a_resnet18():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    explainer = PolyCAM(resnet)
    names = [explainer._name(layer) for layer in explainer.target_layers(x)]
    assert names == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert names == official_layer_list(resnet, (3, 64, 64))
    # at 32x32 layer4 is 1x1 and the global pooling changes no size: its stage is not closed
    assert stage_ends(resnet, torch.randn(1, 3, 32, 32)) == ["relu", "layer1", "layer2", "layer3"]


def test_default_layers_where_the_authors_rule_trips():
    """ResNet-50: their rule names the shared ReLU of layer2.0 (called three times); the stage ends are the
    authors' own published list.  tiny_cnn: the ReLU before the stride and the last before the global pooling."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(num_classes=4).eval()
    assert stage_ends(resnet, torch.randn(1, 3, 64, 64)) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert official_layer_list(resnet, (3, 64, 64))[:2] == ["relu", "layer2.0.relu"]
    cnn = tiny_cnn()
    assert stage_ends(cnn, torch.randn(1, 3, 16, 16)) == ["1", "5"] == official_layer_list(cnn, (3, 16, 16))


class SharedActivation(nn.Module):
    """Like efficientnet_lite_pytorch: one activation module after the stem and after the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 10, 1)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.head(self.block(self.act(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


def test_a_shared_module_counts_at_its_last_call():
    """The capture keeps a module's last call: the shared activation ends the head's stage, not the stem's."""
    net = SharedActivation().double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert stage_ends(net, x) == ["stem", "act"]
    torch.testing.assert_close(PolyCAM(net)(x, [1, 3]), polycam_written_out(net, x, [1, 3], ["stem", "act"]),
                               rtol=1e-7, atol=1e-9)


def test_option_errors(model, x):
    explainer = PolyCAM(model)
    with pytest.raises(ValueError, match=r"variant must be one of \('pm', 'p', 'm'\)"):
        explainer(x, 0, variant="plus")
    with pytest.raises(TypeError, match="local_norm must be a bool"):
        explainer(x, 0, local_norm="yes")
    with pytest.raises(ValueError, match=r"shallow to deep .*\['3', '0'\]"):
        explainer(x, 0, target_layer=["3", "0"])
    with pytest.raises(ValueError, match="name the layers to combine"):
        explainer(x, 0, reshape_transform=lambda t: t)


def test_a_model_without_stages_takes_the_default_cam_layer():
    """No (B, C, h, w) map shrinks (as in a vision transformer): the library's default CAM layer alone."""
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    assert stage_ends(flat, x) == []
    torch.testing.assert_close(PolyCAM(flat)(x, 0), PolyCAM(flat, ["1"])(x, 0))


def test_create_graph_is_differentiable_wrt_the_parameters():
    net = cam_cnn()
    x = torch.randn(2, 3, 16, 16)
    out = PolyCAM(net, ["2", "3"], variant="p")(x, [1, 2], create_graph=True)
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # the first convolution, below every layer
    assert grads[-2] is not None and grads[-2].abs().sum() > 0  # the classifier: only through the masked scores
    torch.testing.assert_close(out.detach(), PolyCAM(net, ["2", "3"], variant="p")(x, [1, 2]))
