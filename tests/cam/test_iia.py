"""IIA against the authors' code (github.com/iia-iccv23/iia) written out one image at a time, for CNNs (activations)
and ViTs (the last block's attention), and for its three-integral variant (``integrals=3``, the code's
``'iia-triple'``), its closed form on a net that is linear above the layer, its defaults and passes, the choice of
representation, batch independence, its parameter derivative and its argument checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.iia import DEFAULT_STEPS, IIA, INTEGRALS
from conftest import RowCounter, cam_cnn, check_parameter_derivative, tiny_cnn, tiny_vit

pytest.importorskip("timm")


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture
def small():
    torch.manual_seed(3)
    return torch.randn(3, 3, 16, 16)


def vit(fused=True):
    """The tiny ViT with its head scaled up, so that attention x gradient weighs against the identity the rollout
    adds (with the random head it is about 1e-4 of it)."""
    model = tiny_vit(fused=fused)
    with torch.no_grad():
        model.head.weight.mul_(1000)
    return model


def interpolated(baseline, target, steps):
    """The authors' ``get_interpolated_values``: ``steps + 1`` points from ``baseline`` to ``target``, both ends
    included."""
    return torch.stack([baseline + (j / steps) * (target - baseline) for j in range(steps + 1)])


# ------------------------------------------------------------------------------------------------------- CNN
def layer_gradient(model, activation, cls):
    """The gradient of the class's logit w.r.t. block "2"'s output, the rest of the net run on ``activation``."""
    activation = activation.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(model[3:](activation[None])[0, cls], activation)
    return grad


def iia_cnn_written_out(model, image, cls, steps, base):
    """The authors' ``heatmap_of_layer`` for one image: the image path, the activations of every point, their
    reference (``torch.min`` over the axis of length 1 they add: the activations themselves), the inner path from it,
    the gradient at every inner point, the first inner point subtracted from the others, ``grad * relu(act)`` summed
    over both paths and the channels."""
    images = interpolated(base, image, steps)
    with torch.no_grad():
        activations = model[:3](images).unsqueeze(1)  # (points, 1, C, h, w)
    reference, _ = torch.min(activations, dim=1)
    baseline = torch.ones_like(activations) * reference.unsqueeze(1)
    inner = interpolated(baseline, activations, steps)  # (inner, points, 1, C, h, w)
    grads = torch.stack([torch.stack([layer_gradient(model, act[0], cls) for act in points]) for points in inner])
    inner[1:] = inner[1:] - inner[0]
    gradsum = torch.sum(grads * F.relu(inner.squeeze(2)), dim=0)  # over the inner path
    return torch.sum(gradsum, dim=0).sum(dim=0, keepdim=True)  # over the image path, then the channels


@pytest.mark.parametrize("baseline", ["zero", 0.3])
def test_cnn_equals_the_authors_procedure(x, baseline):
    model = cam_cnn()
    start = torch.zeros_like(x[0]) if baseline == "zero" else torch.full_like(x[0], baseline)
    maps = torch.stack([iia_cnn_written_out(model, image, cls, 3, start) for image, cls in zip(x, [1, 4, 7])])
    expected = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    ours = IIA(model, "2")(x, [1, 4, 7], steps=3, baseline=baseline, batch_size=3)  # 4 rows per image: straddling
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert ours.amin() < 0 < ours.amax()  # signed, as the authors' (they min-max normalise it)


def head_linear_net(seed=0):
    """Bias-free convolutions and ReLUs (positively homogeneous: A(a x) = a A(x) for a >= 0), then global average
    pooling and a linear layer: above its last ReLU ("3") the gradient is the constant W_c / (h w)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5)).eval()


@pytest.mark.parametrize("steps", [1, 4])
def test_cnn_closed_form_on_a_homogeneous_net(x, steps):
    """sum_j (j/n) sum_k W_ck A_k(x) / (h w) = (n + 1)/2 times the class activation map; with one step, at any layer,
    the image's term alone (the zero image's activations are 0): HiResCAM's map before its ReLU (compared at the
    first layer, at the input's resolution, where the ReLU and the upsampling commute)."""
    model = head_linear_net()
    classes = torch.tensor([0, 2, 4])
    with torch.no_grad():
        acts = model[:4](x)
    weights = model[-1].weight[classes][:, :, None, None] / (acts.shape[-2] * acts.shape[-1])
    cam = F.interpolate((weights * acts).sum(dim=1, keepdim=True), size=x.shape[-2:], mode="bilinear",
                        align_corners=False)
    ours = IIA(model, "3")(x, classes, steps=steps)
    torch.testing.assert_close(ours, (steps + 1) / 2 * cam, rtol=1e-5, atol=1e-6)
    if steps == 1:
        first = IIA(model, "1")(x, classes, steps=1)
        torch.testing.assert_close(first.clamp(min=0), A.HiResCAM(model, "1")(x, classes), rtol=1e-5, atol=1e-7)


def test_cnn_with_both_ends_at_the_image_is_twice_the_gradient_times_activation(x):
    """Block "0" is at the input's resolution: the ReLU of HiResCAM and the upsampling commute there."""
    model = cam_cnn()
    ours = IIA(model, "0")(x, [1, 4, 7], steps=1, baseline=x)
    torch.testing.assert_close((ours / 2).clamp(min=0), A.HiResCAM(model, "0")(x, [1, 4, 7]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- three integrals
def iia_triple_written_out(model, layer, image, cls, steps, base):
    """The authors' ``heatmap_of_triple_layers`` for one image, ``model[layer]`` in the place of their ``layer4``
    (their ``post_features``) and ``model[:layer]`` of their ``features`` up to ``layer3``: the image path; its
    activations and their reference, the minimum over the path's points (``torch.min`` over axis 0); the middle path
    from it; for each of its steps the layer's outputs of all the points, their minimum over the points, the inner
    path from it, the gradient at every inner point from the rest of the net (their ``is_middle`` head) times the
    point's ReLU; all stacked, rectified (``F.relu(igrads.squeeze())``) and summed over the three paths and the
    channels."""
    images = interpolated(base, image, steps)
    with torch.no_grad():
        activations = model[:layer](images).unsqueeze(1)  # (points, 1, C, h, w)
    reference, _ = torch.min(activations, dim=0)
    middle = interpolated(torch.ones_like(activations) * reference.unsqueeze(0), activations, steps)
    grads = []
    for act in middle:  # (points, 1, C, h, w): one step of the middle path, every point of the image path
        with torch.no_grad():
            following = model[layer](act.squeeze(1)).unsqueeze(1)
        reference2, _ = torch.min(following, dim=0)
        inner = interpolated(torch.ones_like(following) * reference2.unsqueeze(0), following, steps)
        inside = []
        for act2 in inner:
            rows = act2.squeeze(1).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(model[layer + 1:](rows)[:, cls].sum(), rows)
            inside.append(grad.unsqueeze(1) * F.relu(act2))
        grads.append(torch.stack(inside))
    products = F.relu(torch.stack(grads).squeeze())  # (middle, inner, points, C, h, w)
    return products.sum(dim=(0, 1, 2)).sum(dim=0, keepdim=True)


def unsplittable(model):
    """A no-op forward hook on the model itself: torch.fx cannot cut it (IIA runs full forwards), while it computes
    the same."""
    return model.register_forward_hook(lambda module, inputs, output: None)


@pytest.mark.parametrize("layer,baseline,full", [(3, "zero", False), (3, "zero", True), (2, 0.3, False),
                                                 (2, 0.3, True)])
def test_three_integrals_equal_the_authors_triple_procedure(x, layer, baseline, full):
    """Layer 3 is the code's setting (the last block, then pooling and the classifier: their ``layer4``); layer 2
    has a block after it, so the gradient varies along the inner path."""
    model = cam_cnn()
    start = torch.zeros_like(x[0]) if baseline == "zero" else torch.full_like(x[0], baseline)
    maps = torch.stack([iia_triple_written_out(model, layer, image, cls, 2, start)
                        for image, cls in zip(x, [1, 4, 7])])
    expected = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
    handle = unsplittable(model) if full else None
    try:
        ours = IIA(model, str(layer), integrals=3, steps=2, baseline=baseline)(x, [1, 4, 7], batch_size=5)
    finally:
        if handle is not None:
            handle.remove()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert ours.amin() >= 0 and expected.std() > 1e-2 * expected.abs().max()  # rectified, and not flat
    two = IIA(model, str(layer), steps=2, baseline=baseline)(x, [1, 4, 7])
    assert not torch.allclose(ours, two, rtol=1e-2)


@pytest.mark.parametrize("full", [False, True])
def test_three_integrals_run_the_passes_of_the_docstring(x, full):
    """Per image, steps + 1 points up to the layer, (steps + 1)^2 runs of the layer alone and (steps + 1)^3 of the
    modules after it: where the model is cut (tail) the first convolution sees only the points; full forwards run
    it, and the layer, on every inner point too."""
    model, steps, images = cam_cnn(), 2, x[:2]
    points = 2 * (steps + 1)
    counters = {name: RowCounter(module) for name, module in (("conv", model[0][0]), ("layer", model[3]),
                                                               ("head", model[6]))}
    handle = unsplittable(model) if full else None
    try:
        IIA(model, "3", integrals=3, steps=steps)(images, [1, 2])
    finally:
        for counter in counters.values():
            counter.close()
        if handle is not None:
            handle.remove()
    rows = {name: sum(counter.rows) for name, counter in counters.items()}
    inner = points * (steps + 1) ** 2
    if full:
        assert rows == {"conv": points + inner, "layer": points + points * (steps + 1) + inner, "head": points + inner}
    else:
        assert rows == {"conv": points, "layer": points + points * (steps + 1), "head": inner}


def test_three_integrals_on_a_transformer_block(small):
    """Not in the authors' code (their ViT IIA is over attention): a block's tokens, as the two-integral variant
    takes them; the cut model and full forwards agree."""
    model = vit()
    explainer = IIA(model, "blocks.0", integrals=3, steps=2)
    maps = explainer(small, [3, 1, 4])
    assert maps.abs().amax(dim=(1, 2, 3)).min() > 0
    handle = unsplittable(model)
    try:
        torch.testing.assert_close(IIA(model, "blocks.0", integrals=3, steps=2)(small, [3, 1, 4]), maps,
                                   rtol=1e-5, atol=1e-7 * float(maps.abs().max()))
    finally:
        handle.remove()


def test_three_integrals_batch_independence_and_target_none(x):
    model = cam_cnn()
    explainer = IIA(model, integrals=3, steps=2)
    together = explainer(x, [3, 1, 4], batch_size=7)
    for i, cls in enumerate([3, 1, 4]):
        torch.testing.assert_close(together[i:i + 1], explainer(x[i:i + 1], cls), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        classes = model(x).argmax(dim=1)
    torch.testing.assert_close(explainer(x), explainer(x, classes))


@pytest.mark.parametrize("full", [False, True])
def test_create_graph_gives_the_three_integral_maps_true_parameter_derivative(x, full):
    """Through the layer's input and the minimum over the path (blocks 0 and 2), the layer (3) and the gradient
    (the classifier); at the code's layer, where the gradient is smooth along the inner path."""
    model = cam_cnn().double()
    images = x[1:].double()
    explainer = IIA(model, "3", integrals=3, steps=2, batch_size=4)

    def value(create_graph):
        return explainer(images, [4, 7], create_graph=create_graph)

    handle = unsplittable(model) if full else None
    try:
        torch.testing.assert_close(value(True).detach(), value(False))
        names = ["0.0.weight", "2.0.weight", "3.0.weight", "6.weight"] if not full else ["2.0.weight", "6.weight"]
        check_parameter_derivative(value, model, names, rtol=1e-5, atol=1e-9)
    finally:
        if handle is not None:
            handle.remove()


class Mixed(nn.Module):
    """Its forward takes two tensors."""

    def forward(self, features, image):
        return features + image.mean(dim=1, keepdim=True)


class TwoInputNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.mix, self.fc = nn.Conv2d(3, 4, 3, padding=1), Mixed(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.mix(self.conv(x), x).mean(dim=(2, 3)))


def test_three_integrals_bad_options_name_what_is_wrong(x, small):
    explainer = IIA(cam_cnn(), "2", steps=1)
    for integrals in (1, 4, 2.5, 3.0, True, "3", None):
        with pytest.raises(ValueError, match=r"integrals must be 2 or 3, got "):
            explainer(x, 1, integrals=integrals)
    with pytest.raises(ValueError, match="integrals=3 .* no such variant over attention"):
        IIA(vit(), integrals=3)(small, 1)
    with pytest.raises(ValueError, match="integrals=3 .* no such variant over attention"):
        IIA(vit(), integrals=3, representation="attention")(small, 1)
    model = TwoInputNet()
    for full in (False, True):
        handle = unsplittable(model) if full else None
        try:
            with pytest.raises(ValueError, match="target_layer 'mix' .* must take one tensor"):
                IIA(model, "mix", integrals=3, steps=1)(x, 0)
        finally:
            if handle is not None:
                handle.remove()
    IIA(model, "mix", steps=1)(x, 0)  # two integrals capture its output only


# ------------------------------------------------------------------------------------------------------- ViT
def attention_with_held_last(model, point, held):
    """One forward of ``point`` (1, 3, H, W) on timm's unfused attention with the last block's attention replaced by
    ``held`` (the authors' ``attn_prob``, a given), and every block's attention as used."""
    maps = []

    def keep(module, inputs, output):
        maps.append(output)

    def replace(module, inputs, output):
        maps.append(held.clone().requires_grad_(True))
        return maps[-1]

    handles = [blk.attn.attn_drop.register_forward_hook(keep) for blk in model.blocks[:-1]]
    handles.append(model.blocks[-1].attn.attn_drop.register_forward_hook(replace))
    try:
        out = model(point[None])
    finally:
        for handle in handles:
            handle.remove()
    return out, maps


def iia_vit_written_out(model, image, cls, steps, base):
    """The authors' ``get_iia_vit`` for one image: for each point of the image path its last block's attention,
    scaled from the zero map in ``steps`` steps; each scaled map fed to the model in place of the computed one; every
    block's ``relu(attention * gradient)`` per head (``avg_heads_iia``), averaged over both paths; their ``rollout``:
    mean over heads, ``A + I`` with rows renormalised, multiplied from the first block; the class token's row."""
    per_pair = []
    for point in interpolated(base, image, steps):
        last = model_attention(model, point)[-1]  # their first pass of the point: its attention
        for held in interpolated(torch.zeros_like(last), last, steps):
            out, maps = attention_with_held_last(model, point, held)
            grads = torch.autograd.grad(out[0, cls], maps)
            per_pair.append(torch.stack([(a * g).clamp(min=0)[0] for a, g in zip(maps, grads)]).detach())
    final = torch.stack(per_pair).mean(dim=0)  # (blocks, heads, N, N)
    tokens = final.shape[-1]
    result = None
    for block in final:
        fused = block.sum(dim=0) / block.shape[0]
        augmented = fused + torch.eye(tokens)
        augmented = augmented / augmented.sum(dim=-1, keepdim=True)
        result = augmented if result is None else augmented @ result
    mask = result[0, 1:]
    width = int(mask.shape[-1] ** 0.5)
    return mask.reshape(1, width, width)


def model_attention(model, point):
    """Every block's attention of one forward of ``point`` (timm's unfused path)."""
    maps = []
    handles = [blk.attn.attn_drop.register_forward_hook(lambda m, i, o: maps.append(o.detach()))
               for blk in model.blocks]
    try:
        with torch.no_grad():
            model(point[None])
    finally:
        for handle in handles:
            handle.remove()
    return maps


@pytest.mark.parametrize("fused", [True, False])
def test_vit_equals_the_authors_procedure(small, fused):
    reference = vit(fused=False)
    maps = torch.stack([iia_vit_written_out(reference, image, cls, 2, torch.zeros_like(image))
                        for image, cls in zip(small, [3, 1, 4])])
    expected = F.interpolate(maps, size=small.shape[-2:], mode="bilinear", align_corners=False)
    explainer = IIA(vit(fused=fused), steps=2)
    torch.testing.assert_close(explainer(small, [3, 1, 4]), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(explainer(small, [3, 1, 4], batch_size=4), expected, rtol=1e-5, atol=1e-7)
    assert expected.std() > 1e-2 * expected.abs().max()


def test_vit_holding_the_last_attention_is_not_the_plain_gradient(small):
    """The other blocks' gradients treat the held map as a given (no path through the last block's softmax): with
    the full gradient the maps differ, by about 1e-4 of their maximum on this net, a thousand times float32's noise
    here (the authors' procedure above is matched to 2e-7 of it)."""
    model = vit(fused=False)
    image, cls, steps = small[0], 2, 2
    ours = IIA(vit(), steps=steps)(small[:1], cls)
    per_pair = []
    for point in interpolated(torch.zeros_like(image), image, steps):
        for scale in torch.linspace(0, 1, steps + 1):
            maps = []

            def scaled(module, inputs, output):
                maps.append(output * scale if len(maps) == len(model.blocks) - 1 else output)
                return maps[-1]

            handles = [blk.attn.attn_drop.register_forward_hook(scaled) for blk in model.blocks]
            try:
                out = model(point[None].requires_grad_(True))
            finally:
                for handle in handles:
                    handle.remove()
            grads = torch.autograd.grad(out[0, cls], maps)
            per_pair.append(torch.stack([(a * g).clamp(min=0)[0].mean(0) for a, g in zip(maps, grads)]).detach())
    from attribution.transformers.rollout import residual_rollout
    full = residual_rollout(list(torch.stack(per_pair).mean(0)[:, None]))[0, 0, 1:].reshape(1, 1, 4, 4)
    full = F.interpolate(full, size=(16, 16), mode="bilinear", align_corners=False)
    assert (full - ours).abs().max() > 3e-5 * ours.abs().max()


def test_vit_runs_on_torchvisions_multihead_attention():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    nn.init.normal_(model.heads.head.weight, std=10.0)  # torchvision initialises the head to zero: no gradient
    images = torch.randn(2, 3, 32, 32)
    explainer = IIA(model, steps=1)
    maps = explainer(images, [0, 3])
    assert maps.shape == (2, 1, 32, 32) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert not torch.allclose(maps, explainer(images, [1, 1]))
    torch.testing.assert_close(maps[1:], explainer(images[1:], 3), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- shared
def test_defaults_are_the_authors_and_set_the_number_of_passes(x, small):
    assert IIA.defaults["steps"] is None and IIA.defaults["baseline"] == "zero"
    assert IIA.defaults["representation"] is None and "score" not in IIA.defaults  # the logit, as the code
    assert DEFAULT_STEPS == {"activations": 10, "attention": 5}
    assert IIA.defaults["integrals"] == 2 and INTEGRALS == (2, 3)  # the code's 'iia' and 'iia-triple'
    assert A.create("iia", tiny_cnn()).__class__ is IIA
    # rows per image; once per input shape: the probe for attention and, for the CNN, the default layer's search
    for model, images, rows, once in ((cam_cnn(), x[:2], 11, 2), (vit(), small[:2], 36, 1)):
        explainer = IIA(model)
        counter = RowCounter(model)
        explainer(images, [1, 2])
        first = sum(counter.rows)
        explainer(images, [1, 2])
        counter.close()
        assert (first, sum(counter.rows) - first) == (once + 2 * rows, 2 * rows)
        steps = 10 if rows == 11 else 5
        torch.testing.assert_close(explainer(images, [1, 2]), explainer(images, [1, 2], steps=steps, integrals=2))


def test_representation_is_attention_for_transformers_and_activations_otherwise(small):
    model = vit()
    auto, attention = IIA(model, steps=1)(small, 1), IIA(model, steps=1, representation="attention")(small, 1)
    torch.testing.assert_close(auto, attention)
    layer = IIA(model, "blocks.1", steps=1)(small, 1)  # a layer: its activations
    torch.testing.assert_close(layer, IIA(model, "blocks.1", steps=1, representation="activations")(small, 1))
    assert not torch.allclose(layer, auto)
    cnn = tiny_cnn()
    torch.testing.assert_close(IIA(cnn, steps=1)(small, 1), IIA(cnn, steps=1, representation="activations")(small, 1))


@pytest.mark.parametrize("build", [cam_cnn, vit])
def test_batch_independence_and_target_none(x, small, build):
    model = build()
    images = x if build is cam_cnn else small
    explainer = IIA(model, steps=2)
    together = explainer(images, [3, 1, 4])
    for i, cls in enumerate([3, 1, 4]):
        torch.testing.assert_close(together[i:i + 1], explainer(images[i:i + 1], cls), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        classes = model(images).argmax(dim=1)
    torch.testing.assert_close(explainer(images), explainer(images, classes))
    assert not torch.allclose(explainer(images, [0, 0, 0]), explainer(images, [2, 2, 2]))


def test_create_graph_gives_the_maps_true_parameter_derivative_on_a_cnn(x):
    model = cam_cnn().double()
    images = x[1:].double()  # the first image has a ReLU within 1e-6 of its kink along the direction of "1.0"
    explainer = IIA(model, "2", steps=2, batch_size=4)

    def value(create_graph):
        return explainer(images, [4, 7], create_graph=create_graph)

    torch.testing.assert_close(value(True).detach(), value(False))
    check_parameter_derivative(value, model, ["1.0.weight", "3.0.weight", "6.weight"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("fused", [True, False])
def test_create_graph_gives_the_maps_true_parameter_derivative_on_a_vit(small, fused):
    """Also through the held attention's value: the last block's query and key weights change it."""
    model = vit(fused=fused).double()
    images = small[:2].double()
    explainer = IIA(model, steps=1, batch_size=3)

    def value(create_graph):
        return explainer(images, [3, 1], create_graph=create_graph)

    torch.testing.assert_close(value(True).detach(), value(False))
    check_parameter_derivative(value, model, ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight"],
                               rtol=1e-5, atol=1e-10)


def test_bad_options_name_what_is_wrong(x, small):
    explainer = IIA(cam_cnn(), "2", steps=2)
    cases = (({"steps": 0}, ValueError, "steps"), ({"steps": 2.5}, ValueError, "steps"),
             ({"steps": True}, ValueError, "steps"), ({"baseline": "grey"}, ValueError, "baseline"),
             ({"baseline": [0.0]}, TypeError, "baseline"), ({"layer_fusion": "sum"}, ValueError, "layer_fusion"),
             ({"representation": "tokens"}, ValueError, "representation must be None, 'activations' or 'attention'"))
    for options, error, match in cases:
        with pytest.raises(error, match=match):
            explainer(x, 1, **options)
    with pytest.raises(ValueError, match="found no attention"):
        IIA(tiny_cnn(), representation="attention")(small, 1)
    with pytest.raises(ValueError, match="target_layer and reshape_transform choose the layer"):
        IIA(vit(), "blocks.1", representation="attention")(small, 1)
    swin = pytest.importorskip("timm").create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
        window_size=7, num_classes=5).eval()
    with pytest.raises(ValueError, match="windowed attention"):
        IIA(swin, representation="attention")(torch.randn(1, 3, 56, 56), 0)
