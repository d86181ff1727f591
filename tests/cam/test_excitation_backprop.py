"""Excitation backprop against TorchRay's implementation (plain and contrastive, a VGG-like net and a ResNet with
TorchRay's residual rule), conservation of the excitation, and the pretrained model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A

torchray = pytest.importorskip("torchray.attribution.excitation_backprop")
torchvision = pytest.importorskip("torchvision")


def vgg_like(seed: int = 0) -> nn.Sequential:
    """Convolutions, batch norm, ReLU, average and adaptive average pooling and a linear classifier: every rule."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1),
                          nn.BatchNorm2d(12), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6))
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.2, 0.2)
        model[3].running_var.uniform_(0.5, 1.5)
    return model.eval()


def torchray_maps(fn, model, x, classes, size, **layers):
    """TorchRay's map of each image (one call per image, as its examples), upsampled as ours."""
    maps = torch.cat([fn(model, image[None], int(cls), **layers) for image, cls in zip(x, classes)])
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_equals_torchrays_excitation_backprop(x):
    model = vgg_like()
    classes = [1, 4, 0]
    ours = A.ExcitationBackprop(model, "4")(x, classes)
    theirs = torchray_maps(torchray.excitation_backprop, copy.deepcopy(model), x, classes, (16, 16),
                           saliency_layer="4")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
    ours = A.ExcitationBackprop(model, "4", contrastive=True, contrast_layer="7")(x, classes)
    theirs = torchray_maps(torchray.contrastive_excitation_backprop, copy.deepcopy(model), x, classes, (16, 16),
                           saliency_layer="4", contrast_layer="7")
    # a difference of two maps: where it nearly cancels, float32 rounding (which differs between CPUs) is relative
    # to the maps' scale, not to the difference
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert (ours > 0).any() and (ours == 0).any()  # rectified, and not trivially


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_residual_sums_share_the_excitation_as_torchrays_resnet_rule():
    """TorchRay needs ``update_resnet`` (its skip connections as a patched sum); here ``out += identity`` is
    recognised as it runs."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    patched = torchray.update_resnet(copy.deepcopy(model))
    ours = A.ExcitationBackprop(model, "layer3")(x, [3, 5])
    theirs = torchray_maps(torchray.excitation_backprop, patched, x, [3, 5], (64, 64), saliency_layer="layer3")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)
    ours = A.ExcitationBackprop(model, "layer3", contrastive=True, contrast_layer="layer4")(x, [3, 5])
    theirs = torchray_maps(torchray.contrastive_excitation_backprop, patched, x, [3, 5], (64, 64),
                           saliency_layer="layer3", contrast_layer="layer4")
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def test_the_excitation_is_conserved_down_to_the_layer(x):
    """Every rule shares its outputs' excitation among its non-negative inputs: the one-hot target's unit mass
    reaches the layer whole (the layer is as large as the image, so the map is not resampled)."""
    maps = A.ExcitationBackprop(vgg_like(), "4")(x, [1, 4, 0])
    torch.testing.assert_close(maps.sum(dim=(1, 2, 3)), torch.ones(3), rtol=1e-5, atol=1e-6)
    assert (maps >= 0).all()


def test_the_contrast_layer_must_follow_the_target_layer(x):
    with pytest.raises(ValueError, match="contrast_layer '1' must come after the target layer"):
        A.ExcitationBackprop(vgg_like(), "4", contrastive=True, contrast_layer="1")(x, 0)
    with pytest.raises(TypeError, match="contrastive must be a bool"):
        A.ExcitationBackprop(vgg_like(), "4")(x, 0, contrastive="yes")


def test_the_contrastive_map_is_class_discriminative_on_the_pretrained_model(efficientnet, composite):
    """Cat left, coffee right: the contrastive map of the cat puts 0.98 of its mass on the cat half, the espresso's
    0.02 (when written); the plain map 0.62 against 0.24 (held to the CAMs' 0.3 in tests/real/)."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO

    maps = A.ExcitationBackprop(efficientnet, contrastive=True)(composite.repeat(2, 1, 1, 1), [EGYPTIAN_CAT, ESPRESSO])
    mass = maps.abs().sum(1)
    share = mass[..., :mass.shape[-1] // 2].flatten(1).sum(1) / mass.flatten(1).sum(1)
    assert share[0] - share[1] > 0.8


def test_arg_max_targets_resolve_per_image_whatever_the_pass_size(x):
    model = vgg_like()
    classes = model(x).argmax(1)
    explainer = A.ExcitationBackprop(model, "4")
    torch.testing.assert_close(explainer(x, None, batch_size=1), explainer(x, classes))


class LearnedOffset(nn.Module):
    """conv + a learned (1, C, h, w) offset: the offset has an activation's shape only when one image runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.offset = nn.Parameter(0.1 * torch.randn(1, 8, 16, 16))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.conv(x) + self.offset)


@pytest.mark.parametrize("name", ["excitation_backprop", "lrp"])
def test_a_learned_offset_is_not_a_residual_sum(name, x):
    """Only sums of computed tensors get the proportional rule, so a map does not depend on the pass size."""
    model = LearnedOffset().eval()
    explainer = A.create(name, model)
    torch.testing.assert_close(explainer(x, [1, 2, 3], batch_size=1), explainer(x, [1, 2, 3]), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("contrastive", [False, True])
def test_create_graph_gives_the_true_derivative(contrastive):
    """d map / d classifier weight along a direction: autograd against a central finite difference (float64)."""
    model = vgg_like().double()
    torch.manual_seed(5)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    options = {"contrastive": contrastive, "contrast_layer": "7"} if contrastive else {}
    explainer = A.ExcitationBackprop(model, "4", **options)
    weight = model[10].weight
    direction = torch.randn_like(weight)
    maps = explainer(x, [1, 4], create_graph=True)
    (grad,) = torch.autograd.grad(maps.sum(), weight)
    step = 1e-6
    with torch.no_grad():
        weight += step * direction
        up = explainer(x, [1, 4]).sum()
        weight -= 2 * step * direction
        down = explainer(x, [1, 4]).sum()
        weight += step * direction
    torch.testing.assert_close((grad * direction).sum(), (up - down) / (2 * step), rtol=1e-5, atol=1e-9)


def test_half_precision_models_give_finite_maps():
    """A zero convolution output (a black border) divides by 0 + 1e-20, which float16 rounds to 0: the rules
    run in float32 for half inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1,
                          bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.rand(2, 3, 16, 16)
    x[..., :8] = 0
    maps = A.ExcitationBackprop(model.half(), "1")(x.half(), [0, 1])
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
