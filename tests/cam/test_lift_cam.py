"""LIFT-CAM against the authors' algorithm (Captum's DeepLift on the model's tail), summation to delta and a closed
form on a linear head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.core.targets import resolve_target
from attribution.gradients.deeplift import RescaleRules
from conftest import cam_cnn, tiny_cnn, tiny_vit


@pytest.fixture
def x():
    torch.manual_seed(3)
    return torch.randn(3, 3, 32, 32)


def vgg_like(seed: int = 0) -> nn.Sequential:
    """The authors' VGG16 set-up in small: the map is the last ReLU's output (``features[-2]``), followed by a max
    pool and a classifier with a ReLU, so DeepLIFT's rules for both matter."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(features, nn.Flatten(), nn.Linear(12 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 6)).eval()


def lift_cam_written_out(head: nn.Module, tail: nn.Module, x: torch.Tensor, classes) -> torch.Tensor:
    """The authors' procedure: Captum's DeepLift of the target's logit through the tail with the zero map as the
    reference, summed over positions, weighs the channels; ReLU of the weighted sum, upsampled bilinearly."""
    from captum.attr import DeepLift

    with torch.no_grad():
        acts = head(x)
    contributions = DeepLift(tail).attribute(acts, torch.zeros_like(acts), target=torch.tensor(classes))
    maps = F.relu((contributions.sum((2, 3))[:, :, None, None] * acts).sum(1, keepdim=True))
    return F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
@pytest.mark.parametrize("use_tail", [True, False])
def test_equals_the_authors_algorithm_with_captum(x, use_tail):
    model = vgg_like()
    explainer = A.LIFTCAM(model, "0.3", use_tail=use_tail)
    ours = explainer(x, [1, 4, 0])
    assert explainer.last_mode == ("tail" if use_tail else "full")
    tail = nn.Sequential(model[0][4], *model[1:])
    torch.testing.assert_close(ours, lift_cam_written_out(model[0][:4], tail, x, [1, 4, 0]), rtol=1e-4, atol=1e-6)
    assert (ours > 0).any()

    model = cam_cnn()  # convolutions, batch norm and ReLU after the layer
    ours = A.LIFTCAM(model, "2", use_tail=use_tail)(x, [2, 5, 9])
    torch.testing.assert_close(ours, lift_cam_written_out(model[:3], model[3:], x, [2, 5, 9]), rtol=1e-4, atol=1e-5)


def channel_weights(explainer: A.LIFTCAM, layer: str, x: torch.Tensor, classes, use_tail: bool = True):
    module = dict(explainer.model.named_modules())[layer]
    run = explainer._layer_runner(module, x, None, use_tail)
    target = resolve_target(classes, x.shape[0], x.device)
    return explainer.channel_weights(run, target, module, x, None, 1e-10, None, False), run


@pytest.mark.parametrize("use_tail", [True, False])
def test_weights_add_up_to_the_score_difference(x, use_tail):
    """Summation to delta: sum_k w_k = g_c(A) - g_c(0) exactly, through the max pool and the classifier's ReLU."""
    model = vgg_like()
    weights, run = channel_weights(A.LIFTCAM(model), "0.3", x, [1, 4, 0], use_tail)
    with torch.no_grad():
        acts = model[0][:4](x)
        tail = nn.Sequential(model[0][4], *model[1:])
        delta = (tail(acts) - tail(torch.zeros_like(acts)))[torch.arange(3), [1, 4, 0]]
    torch.testing.assert_close(weights.sum(1), delta, rtol=1e-5, atol=1e-5)
    assert run.mode == ("tail" if use_tail else "full")


def test_linear_head_closed_form(x):
    """Global average pooling and a linear layer after the layer: w_k = W_ck * mean(A_k), the map
    ReLU(sum_k W_ck mean(A_k) A_k)."""
    model = tiny_cnn()
    with torch.no_grad():
        acts = model[:6](x)
    weight = model[-1].weight[[0, 3, 4]]
    expected = F.relu((weight[:, :, None, None] * acts.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    expected = F.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(A.LIFTCAM(model, "5")(x, [0, 3, 4]), expected, rtol=1e-5, atol=1e-6)


def test_token_outputs_get_the_zero_reference_on_their_patch_tokens_only():
    """Reference: the full model under DeepLIFT's rules on (image, reference) pairs, a hook giving the reference
    half block 0's output with the patch tokens zeroed and the class token kept."""
    model = tiny_vit()
    torch.manual_seed(5)
    x, classes = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    captured = {}

    def pair(module, inputs, output):
        out = output.detach()
        reference = out[2:].clone()
        reference[:, 1:] = 0
        captured["acts"] = out[:2].requires_grad_(True)
        captured["reference"] = reference
        return torch.cat([captured["acts"], reference])

    handle = model.blocks[0].register_forward_hook(pair)
    try:
        with RescaleRules(1e-10, rows=4):
            logits = model(torch.cat([x, x]))
    finally:
        handle.remove()
    scores = logits[torch.arange(4), torch.cat([classes, classes])]
    (grads,) = torch.autograd.grad(scores.sum(), captured["acts"])
    contributions = (captured["acts"] - captured["reference"]) * grads
    weights = contributions[:, 1:].sum(1)  # (B, D): the class token's share is 0
    assert contributions[:, 0].abs().max() == 0
    tokens = captured["acts"][:, 1:].detach().transpose(1, 2).reshape(2, -1, 4, 4)
    expected = F.relu((weights.detach()[:, :, None, None] * tokens).sum(1, keepdim=True))
    expected = F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    for use_tail in (True, False):
        torch.testing.assert_close(A.LIFTCAM(model, "blocks.0", use_tail=use_tail)(x, classes), expected,
                                   rtol=1e-4, atol=1e-6)


def test_create_graph_differentiates_through_the_weights(x):
    """With create_graph=True the map's gradient reaches the parameters before the layer (through the activations)
    and after it (through DeepLIFT's multipliers)."""
    model = vgg_like()
    maps = A.LIFTCAM(model, "0.3")(x, [1, 4, 0], create_graph=True)
    first, last = torch.autograd.grad(maps.square().sum(), [model[0][0].weight, model[4].weight])
    assert first.abs().sum() > 0 and last.abs().sum() > 0
    torch.testing.assert_close(maps.detach(), A.LIFTCAM(model, "0.3")(x, [1, 4, 0]))


def test_batch_size_splits_the_pairs_without_changing_the_map(x):
    model = cam_cnn()
    explainer = A.LIFTCAM(model, "2")
    torch.testing.assert_close(explainer(x, [2, 5, 9], batch_size=2), explainer(x, [2, 5, 9]))


def test_bad_eps_is_named(x):
    with pytest.raises(ValueError, match="eps"):
        A.LIFTCAM(tiny_cnn())(x, 0, eps=-1.0)
