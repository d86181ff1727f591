"""SRD against the authors' algorithm written out one image at a time with plain loops (their ``cal_simmap_*``: every
contribution of one PFV to one pre-activation PFV along one path, its share of the branch's bias in proportion to
the contributions' norms, its sharing ratio, the relevances summed), on a small CNN with batch norm, max and average
pooling (pooling inside the blocks, not layers) and on torchvision's ResNet-18 with its residual and downsampling
branches; the start (gradient x activation at the target layer, centred); conservation layer by layer; closed forms;
the default layers, a shared activation module, batch independence, create_graph against central differences, and
errors for blocks SRD cannot decompose."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.gradients.srd import SRD, srd_default_layer
from conftest import check_parameter_derivative, lrp_resnet18

torchvision = pytest.importorskip("torchvision")


# ------------------------------------------------------------------------------------ the written-out reference
def inside(shape, y, x):
    return 0 <= y < shape[-2] and 0 <= x < shape[-1]


def conv_paths(name, v, weight, stride, padding):
    """A convolution's paths into pre-activation position (y, x): one per kernel offset, from the layer ``name``'s
    PFV ``v[:, iy, ix]`` (``weight`` with the batch norm's scale merged in)."""
    def paths(y, x):
        for ky in range(weight.shape[2]):
            for kx in range(weight.shape[3]):
                iy, ix = y * stride - padding + ky, x * stride - padding + kx
                if inside(v.shape, iy, ix):
                    yield name, (iy, ix), weight[:, :, ky, kx] @ v[:, iy, ix]
    return paths


def window(shape, py, px, kernel, stride, padding):
    cells = [(py * stride - padding + ky, px * stride - padding + kx) for ky in range(kernel) for kx in range(kernel)]
    return [(iy, ix) for iy, ix in cells if inside(shape, iy, ix)]


def max_pool_paths(name, v, kernel, stride, padding, then=None):
    """Max pooling of the layer ``name`` (then, optionally, a convolution ``then = (weight, stride, padding)``): one
    path per (convolution offset, window cell); the cell passes the channels where it is its window's maximum."""
    def taken(py, px):
        cells = window(v.shape, py, px, kernel, stride, padding)
        winner = torch.stack([v[:, iy, ix] for iy, ix in cells]).argmax(dim=0)
        return [((iy, ix), torch.where(winner == n, v[:, iy, ix], 0)) for n, (iy, ix) in enumerate(cells)]

    pooled = (v.shape[1] + 2 * padding - kernel) // stride + 1

    def paths(y, x):
        if then is None:
            for cell, c in taken(y, x):
                yield name, cell, c
            return
        weight, cstride, cpad = then
        for ky in range(weight.shape[2]):
            for kx in range(weight.shape[3]):
                py, px = y * cstride - cpad + ky, x * cstride - cpad + kx
                if 0 <= py < pooled and 0 <= px < pooled:
                    for cell, c in taken(py, px):
                        yield name, cell, weight[:, :, ky, kx] @ c
    return paths


def avg_pool_conv_paths(name, v, kernel, weight, padding):
    """Average pooling (kernel = stride) of the layer ``name``, then a stride-1 convolution."""
    def paths(y, x):
        for ky in range(weight.shape[2]):
            for kx in range(weight.shape[3]):
                py, px = y - padding + ky, x - padding + kx
                if 0 <= py < v.shape[1] // kernel and 0 <= px < v.shape[2] // kernel:
                    for iy, ix in window(v.shape, py, px, kernel, kernel, 0):
                        yield name, (iy, ix), weight[:, :, ky, kx] @ (v[:, iy, ix] / kernel ** 2)
    return paths


def identity_paths(name, v):
    def paths(y, x):
        yield name, (y, x), v[:, y, x]
    return paths


def decompose(z, relevance, branches, layers):
    """SRD through one block: ``z`` (C, H, W) the pre-activation whose PFVs have ``relevance`` (H, W); ``branches``
    a list of (paths, bias (C,) or None).  A contribution ``c`` gets ``bias * |c| / sum |c'|`` of its branch's bias
    and the sharing ratio ``<c + that, z_j> / |z_j|^2``; the relevances go to ``layers`` (name -> map), added."""
    for y in range(z.shape[1]):
        for x in range(z.shape[2]):
            zj = z[:, y, x]
            norm = zj.dot(zj)
            if norm == 0:
                continue
            for paths, bias in branches:
                found = list(paths(y, x))
                total = sum(c.norm() for _, _, c in found)
                for name, (iy, ix), c in found:
                    share = c if bias is None or total == 0 else c + bias * c.norm() / total
                    layers[name][iy, ix] += share.dot(zj) / norm * relevance[y, x]


def folded(conv: nn.Conv2d, norm: nn.BatchNorm2d = None):
    """The convolution's weight and bias with the batch norm after it merged in (``None`` bias when there is none)."""
    weight, bias = conv.weight, conv.bias
    if norm is None:
        return weight, bias
    scale = norm.weight / (norm.running_var + norm.eps).sqrt()
    shift = norm.bias - norm.running_mean * scale + (0 if bias is None else bias * scale)
    return weight * scale[:, None, None, None], shift


def start_relevance(activation: torch.Tensor, score: torch.Tensor, contrastive: bool) -> torch.Tensor:
    """``R_j = <A_j, dy/dA_j>`` at the target layer (the head differentiated plainly), centred when contrastive."""
    (grad,) = torch.autograd.grad(score, activation)
    relevance = (activation * grad).sum(0).detach()
    return relevance - relevance.mean() if contrastive else relevance


def zeros_like_maps(**maps):
    return {name: torch.zeros(t.shape[-2:], dtype=t.dtype) for name, t in maps.items()}


# ------------------------------------------------------------------------------------------------- small CNN
def small_cnn(bias: bool = True, seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU, max pooling, conv-ReLU, average pooling, conv-ReLU (the default target, '8', 2x2 on 8x8 images),
    global average pooling and a linear head; float64, batch norm with random statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, bias=bias), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(5, 6, 3, padding=1, bias=bias), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5, bias=bias),
    ).double().eval()
    with torch.no_grad():
        norm = model[1]
        norm.running_var.uniform_(0.5, 1.5)
        norm.weight.uniform_(0.5, 1.5)
        if bias:
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.bias.uniform_(-0.2, 0.2)
        else:  # no shift either: the batch norm only scales
            norm.bias.zero_()
    return model


def small_cnn_reference(model: nn.Sequential, image: torch.Tensor, target: int, contrastive: bool = True):
    """SRD of one image (C, H, W) from the last ReLU: three blocks (conv-BN; max pooling-conv; average pooling-conv)
    between the layers x, v1, v2, v3."""
    x = image.detach()
    with torch.no_grad():
        z1 = model[1](model[0](x[None]))[0]
        v1 = z1.relu()
        z2 = model[4](model[3](v1[None]))[0]
        v2 = z2.relu()
        z3 = model[7](model[6](v2[None]))[0]
    v3 = z3.relu().requires_grad_(True)
    relevance = start_relevance(v3, model[11](v3.mean((1, 2)))[target], contrastive)
    layers = zeros_like_maps(x=x[None], v1=v1[None], v2=v2[None])
    with torch.no_grad():
        decompose(z3, relevance, [(avg_pool_conv_paths("v2", v2, 2, model[7].weight, 1), model[7].bias)], layers)
        decompose(z2, layers["v2"], [(max_pool_paths("v1", v1, 2, 2, 0, (model[4].weight, 1, 1)), model[4].bias)],
                  layers)
        weight, shift = folded(model[0], model[1])
        decompose(z1, layers["v1"], [(conv_paths("x", x, weight, 1, 1), shift)], layers)
    return layers["x"][None]


def start_total(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets) -> torch.Tensor:
    """Each image's total of SRD's non-contrastive start relevance, ``sum <A, dy_t/dA>`` at ``layer``: what the map
    sums to when relevance is conserved."""
    grabbed = {}
    hook = layer.register_forward_hook(lambda m, i, o: grabbed.setdefault("A", o))
    try:
        scores = model(x.detach().requires_grad_(True))[torch.arange(x.shape[0]), torch.as_tensor(targets)]
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(scores.sum(), grabbed["A"])
    return (grabbed["A"] * grad).sum((1, 2, 3)).detach()

def test_small_cnn_matches_the_written_out_decomposition():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = [3, 1]
    maps = SRD(model)(x, targets)
    assert maps.shape == (2, 1, 8, 8) and maps.dtype == torch.float64
    for i, t in enumerate(targets):
        torch.testing.assert_close(maps[i], small_cnn_reference(model, x[i], t), rtol=1e-9, atol=1e-12)
    plain = SRD(model, contrastive=False)(x, targets)
    torch.testing.assert_close(plain[1], small_cnn_reference(model, x[1], 1, contrastive=False), rtol=1e-9,
                               atol=1e-12)
    # the default layer is the last ReLU; naming it, or the convolution before it (a layer of its own, z = A), gives
    # the same map
    for layer in ("8", "7", model[8]):
        torch.testing.assert_close(SRD(model, layer)(x, targets), maps, rtol=1e-9, atol=1e-12)


def test_relevance_is_conserved_with_biases():
    """Each bias is shared out completely, so the sharing ratios of every pre-activation PFV sum to 1: the map sums
    to the start's total, on a global-average-pooling + linear head the logit less the head's bias (0 when
    contrastive); the same on the ResNet with its residual and downsampling branches."""
    model = small_cnn(bias=True)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets = [0, 2, 4]
    logits = model(x)[torch.arange(3), targets].detach() - model[11].bias[targets].detach()
    torch.testing.assert_close(SRD(model, contrastive=False)(x, targets).sum((1, 2, 3)), logits, rtol=1e-10,
                               atol=1e-12)
    assert SRD(model)(x, targets).sum((1, 2, 3)).abs().max() < 1e-12
    resnet = lrp_resnet18(5)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    start = start_total(resnet, resnet.layer3, images, [2, 3])
    torch.testing.assert_close(SRD(resnet, contrastive=False)(images.detach(), [2, 3]).sum((1, 2, 3)), start,
                               rtol=1e-9, atol=1e-12)


def test_sharing_ratios_closed_form():
    """One 1x2 convolution of two PFVs a = (1, 0) and b = (1, 3) into one PFV, then a ReLU and a linear head (1, 5):
    c_a = (1, 0), c_b = (1, -3) and the bias (1, 1) make z = (3, -2) (its negative, inactive channel counts),
    v = (3, 0), R = <v, (1, 5)> = 3.  The bias goes to c_a and c_b in proportion 1 : sqrt(10)."""
    conv = nn.Conv2d(2, 2, (1, 2)).double()
    head = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[-1.0, -1.0]]]]))
        conv.bias.copy_(torch.tensor([1.0, 1.0]))
        head.weight.copy_(torch.tensor([[1.0, 5.0]]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head).eval()
    x = torch.tensor([[[[1.0, 1.0]], [[0.0, 3.0]]]], dtype=torch.float64)
    got = SRD(model, "1")(x, 0)  # one position: nothing to centre
    z, bias = torch.tensor([3.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    share_a, share_b = 1 / (1 + math.sqrt(10)), math.sqrt(10) / (1 + math.sqrt(10))
    mu_a = (torch.tensor([1.0, 0.0], dtype=torch.float64) + share_a * bias).dot(z) / 13
    mu_b = (torch.tensor([1.0, -3.0], dtype=torch.float64) + share_b * bias).dot(z) / 13
    torch.testing.assert_close(mu_a + mu_b, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(got, torch.stack([3 * mu_a, 3 * mu_b]).view(1, 1, 1, 2))
    # without the bias: the shares of the pre-activation z = (2, -3), 2/13 and 11/13 of R = 2
    with torch.no_grad():
        conv.bias.zero_()
    torch.testing.assert_close(SRD(model, "1")(x, 0),
                               torch.tensor([[[[2 * 2 / 13, 2 * 11 / 13]]]], dtype=torch.float64))


def test_equivalent_forms_give_the_same_map():
    """Zero padding as a module before the convolution or inside it: the padded positions contribute nothing."""
    torch.manual_seed(5)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double().eval()
    first = nn.Conv2d(3, 4, 3).double()
    first.load_state_dict(inner[0].state_dict())
    outer = nn.Sequential(nn.ZeroPad2d(1), first, *inner[1:]).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(SRD(outer, "4")(x, [0, 2]), SRD(inner, "3")(x, [0, 2]), rtol=1e-10, atol=1e-13)


def masked_decomposition(x, z, relevance, branches):
    """SRD of one block read off by masking: the contribution of input PFV ``x[:, iy, ix]`` to ``z_j`` in a branch
    is ``linear(x kept at (iy, ix) only)[:, j]`` (one path per pair in these blocks); ``branches`` holds
    (linear part, bias map)."""
    out = torch.zeros(x.shape[1:], dtype=x.dtype)
    norm = z.square().sum(0)
    for linear, bias in branches:
        parts = {}
        for iy in range(x.shape[1]):
            for ix in range(x.shape[2]):
                alone = torch.zeros_like(x)
                alone[:, iy, ix] = x[:, iy, ix]
                parts[iy, ix] = linear(alone)
        total = sum(c.norm(dim=0) for c in parts.values())
        for (iy, ix), c in parts.items():
            share = c + bias * torch.where(total > 0, c.norm(dim=0) / total, 0)
            out[iy, ix] += ((share * z).sum(0) / norm * relevance).sum()
    return out


class Concatenated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.a, self.b = nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3)))


def test_convolution_options_and_concatenation_match_a_masked_decomposition():
    """Asymmetric zero padding, a grouped convolution with stride and dilation and a batch norm; and two
    convolutions concatenated along the channels (two branches, each sharing its own bias)."""
    torch.manual_seed(10)
    grouped = nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2),
                            nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        grouped[2].running_mean.uniform_(-0.5, 0.5)
        grouped[2].bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    maps = SRD(grouped, "3")(x, [2, 0])
    conv, norm = grouped[1], grouped[2]
    scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).detach()[:, None, None]
    for i, t in enumerate([2, 0]):
        with torch.no_grad():
            z = grouped[:3](x[i:i + 1])[0]

            def linear(s):
                return scale * F.conv2d(grouped[0](s[None]), conv.weight, None, 2, 0, 2, 2)[0]

        v = z.relu().requires_grad_(True)
        relevance = start_relevance(v, grouped[6](v.mean((1, 2)))[t], contrastive=True)
        with torch.no_grad():
            expected = masked_decomposition(x[i], z, relevance, [(linear, z - linear(x[i]))])
        torch.testing.assert_close(maps[i, 0], expected, rtol=1e-9, atol=1e-13)

    model = Concatenated().double().eval()
    images = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    # from the first branch's output (a layer of its own, z = A): the other branch, a path around it, adds nothing
    maps = SRD(model, model.a)(images, [1, 3])
    with torch.no_grad():
        model.b.weight.mul_(3)
        model.b.bias.add_(1)
    torch.testing.assert_close(SRD(model, model.a)(images, [1, 3]), maps, rtol=1e-12, atol=1e-15)
    # the start at the concatenation's ReLU: a functional call, so the target is the model's last module before the
    # head, reached through a hook on the linear layer's input instead
    grabbed = {}
    hook = model.head.register_forward_pre_hook(lambda m, args: grabbed.setdefault("rows", args[0]))
    try:
        model(images)
    finally:
        hook.remove()
    with torch.no_grad():
        za, zb = model.a(images), model.b(images)
        z = torch.cat([za, zb], 1)

    def branch(conv, first):
        def linear(s):
            part = F.conv2d(s[None], conv.weight, None, 1, conv.padding)[0]
            zeros = torch.zeros(5 - part.shape[0], *part.shape[1:], dtype=part.dtype)
            return torch.cat([part, zeros] if first else [zeros, part])
        bias = conv.bias.detach()[:, None, None].expand(-1, 5, 5)
        zeros = torch.zeros(5 - bias.shape[0], 5, 5, dtype=bias.dtype)
        return linear, torch.cat([bias, zeros] if first else [zeros, bias])

    class Start(nn.Module):  # the ReLU as a module of its own, to name it as the target
        def __init__(self, net: Concatenated) -> None:
            super().__init__()
            self.net, self.act = net, nn.ReLU()

        def forward(self, x):
            return self.net.head(self.act(torch.cat([self.net.a(x), self.net.b(x)], dim=1)).mean((2, 3)))

    wrapped = Start(model).eval()
    maps = SRD(wrapped, "act")(images, [1, 3])
    for i, t in enumerate([1, 3]):
        v = z[i].relu().requires_grad_(True)
        relevance = start_relevance(v, model.head(v.mean((1, 2)))[t], contrastive=True)
        with torch.no_grad():
            expected = masked_decomposition(images[i], z[i], relevance, [branch(model.a, True),
                                                                           branch(model.b, False)])
        torch.testing.assert_close(maps[i, 0], expected, rtol=1e-9, atol=1e-13)


# --------------------------------------------------------------------------------------------------- ResNet-18
def block_decompose(block, name, x, paths_x, layers, relevance):
    """A BasicBlock ``relu(bn2(conv2(h)) + identity)`` with ``h = relu(bn1(conv1(x)))``: its output's relevance to
    ``h`` and to the layer below (``paths_x(weight, stride, padding)``: the paths from that layer through ``x`` and a
    convolution; ``weight None``: the identity), branch by branch."""
    with torch.no_grad():
        za = block.bn1(block.conv1(x[None]))[0]
        h = za.relu()
        identity = x if block.downsample is None else block.downsample(x[None])[0]
        zb = block.bn2(block.conv2(h[None]))[0] + identity
        layers["h"] = torch.zeros(h.shape[1:], dtype=h.dtype)
        weight, shift = folded(block.conv2, block.bn2)
        branches = [(conv_paths("h", h, weight, 1, 1), shift)]
        if block.downsample is None:
            branches.append((paths_x(None, 1, 0), None))
        else:
            dweight, dshift = folded(*block.downsample)
            branches.append((paths_x(dweight, block.downsample[0].stride[0], 0), dshift))
        decompose(zb, relevance, branches, layers)
        weight, shift = folded(block.conv1, block.bn1)
        decompose(za, layers.pop("h"), [(paths_x(weight, block.conv1.stride[0], 1), shift)], layers)


def resnet_reference(model, image: torch.Tensor, target: int) -> torch.Tensor:
    """SRD of one image from ``layer3``'s output (ResNet-18 at 32x32: layer4 is 1x1), written out block by block; the
    max pooling after the stem belongs to layer1.0's blocks (the authors' ``simprop2_layer1``)."""
    x = image.detach()
    with torch.no_grad():
        z0 = model.bn1(model.conv1(x[None]))[0]
        v0 = z0.relu()
        inputs, h = [], v0
        for block in list(model.layer1) + list(model.layer2) + list(model.layer3):
            inputs.append(h)
            h = block(model.maxpool(h[None])[0][None] if block is model.layer1[0] else h[None])[0]
    activation = h.requires_grad_(True)
    score = model.fc(torch.flatten(model.avgpool(model.layer4(activation[None])), 1))[0, target]
    relevance = start_relevance(activation, score, contrastive=True)
    blocks = list(model.layer1) + list(model.layer2) + list(model.layer3)
    for n, (block, below) in enumerate(zip(reversed(blocks), reversed(inputs))):
        layers = {"below": torch.zeros(below.shape[1:], dtype=below.dtype)}
        if block is model.layer1[0]:  # below is the stem's ReLU: its paths run through the max pooling
            def paths_x(weight, stride, padding, v=below):
                then = None if weight is None else (weight, stride, padding)
                return max_pool_paths("below", v, 3, 2, 1, then)
            block_input = model.maxpool(below[None])[0]
        else:
            def paths_x(weight, stride, padding, v=below):
                return identity_paths("below", v) if weight is None else conv_paths("below", v, weight, stride,
                                                                                     padding)
            block_input = below
        block_decompose(block, "below", block_input, paths_x, layers, relevance)
        relevance = layers["below"]
    layers = {"x": torch.zeros(x.shape[1:], dtype=x.dtype)}
    weight, shift = folded(model.conv1, model.bn1)
    with torch.no_grad():
        decompose(z0, relevance, [(conv_paths("x", x, weight, 2, 3), shift)], layers)
    return layers["x"][None]


def test_resnet18_matches_the_written_out_decomposition():
    model = lrp_resnet18(5)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    maps = SRD(model)(x, [4, 1])  # the default layer at 32x32 is layer3 (layer4 is 1x1)
    torch.testing.assert_close(maps[:1], resnet_reference(model, x[0], 4)[None], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(SRD(model, "layer3")(x, [4, 1]), maps)
    # in-place ReLUs and ``out += identity`` give the same maps as out-of-place ones
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    torch.testing.assert_close(SRD(model)(x, [4, 1]), maps)


# ------------------------------------------------------------------------------------------- defaults, layers
def test_defaults_and_default_layers():
    assert SRD.defaults == {"target_layer": None, "contrastive": True} and SRD.kind == "cam" and SRD.name == "srd"
    # the paper's layers: conv5_3 (features.29, its ReLU) for VGG16, the average pooling's input for ResNets
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    vgg16 = nn.Sequential()
    vgg16.add_module("features", features)
    vgg16.add_module("pool", nn.AdaptiveAvgPool2d(1))
    vgg16.add_module("flatten", nn.Flatten())
    vgg16.add_module("classifier", nn.Linear(512, 5))
    x = torch.randn(1, 3, 64, 64)
    assert srd_default_layer(vgg16.eval(), x) == "features.29"
    assert srd_default_layer(torchvision.models.resnet18(num_classes=5).eval(), x) == "layer4"


def test_a_shared_activation_starts_at_its_last_call():
    """One ReLU module used after every convolution (efficientnet_lite_pytorch's ``_swish``): the relevance starts at
    its last call, as with a separate module there; the head's (functional) ReLU after it keeps its plain
    gradient."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, stride=2, padding=1)
            self.act = nn.ReLU()
            self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 7), nn.Linear(7, 3)

        def forward(self, x, separate=None):
            last = separate or self.act
            h = last(self.conv2(self.act(self.conv1(x))))
            return self.fc2(torch.relu(self.fc1(h.flatten(1))))  # the head's ReLU: not the module

    class Separate(nn.Module):
        def __init__(self, shared: Shared) -> None:
            super().__init__()
            self.shared, self.last = shared, nn.ReLU()

        def forward(self, x):
            return self.shared(x, self.last)

    shared = Shared().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = SRD(Separate(shared), "last")(x, [0, 2])
    assert expected.abs().sum() > 0
    torch.testing.assert_close(SRD(shared, "act")(x, [0, 2]), expected)


def test_batch_independence_and_batch_size():
    model = small_cnn()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    together = SRD(model)(x, [2, 0, 1])
    for i, t in enumerate([2, 0, 1]):
        torch.testing.assert_close(SRD(model)(x[i:i + 1], t), together[i:i + 1])
    torch.testing.assert_close(SRD(model, batch_size=2)(x, [2, 0, 1]), together)
    torch.testing.assert_close(SRD(model)(x, None), SRD(model)(x, model(x).argmax(1)))


def test_create_graph_matches_central_differences():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def value(create_graph: bool) -> torch.Tensor:
        return SRD(model)(x, [1, 3], create_graph=create_graph).square()

    check_parameter_derivative(value, model, ["0.weight", "0.bias", "4.weight", "7.weight", "1.weight", "1.bias",
                                              "11.weight"])


# ---------------------------------------------------------------------------------------------------- errors
class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class Reshaped(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], x.shape[1] * 2, x.shape[2] // 2, x.shape[3])[:, :4]


def headed(*body: nn.Module) -> nn.Sequential:
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *body, nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_blocks_srd_cannot_decompose_are_named():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"normalisation.*layer '1' \(GroupNorm\)"):
        SRD(headed(nn.GroupNorm(2, 4), nn.ReLU()), "4")(x, 0)
    with pytest.raises(ValueError, match=r"product of two feature maps.*layer '2' \(SqueezeExcite\)"):
        SRD(headed(nn.ReLU(), SqueezeExcite(4)), "4")(x, 0)
    with pytest.raises(ValueError, match=r"reshape to \(2, 8, 4, 8\).*layer '2' \(Reshaped\)"):
        SRD(headed(nn.ReLU(), Reshaped()), "4")(x, 0)
    # the same layers above the target layer are the head's business: its plain gradient
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), SqueezeExcite(4), nn.GroupNorm(2, 4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    assert torch.isfinite(SRD(model, "1")(x, 0)).all()


def test_bad_options():
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="one target_layer"):
        SRD(model, ["5", "8"])(x, 0)
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        SRD(model, "conv9")(x, 0)
    with pytest.raises(ValueError, match="did not run"):
        SRD(Unused(), "unused")(x.float(), 0)
    with pytest.raises(TypeError, match="unknown option"):
        SRD(model, layer="8")
    with pytest.raises(TypeError, match="contrastive must be a bool, got 'yes'"):
        SRD(model)(x, 0, contrastive="yes")


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.unused, self.fc = nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


# ------------------------------------------------------------------------ parameters computed in the forward
class StdConv(nn.Conv2d):
    """A weight-standardised convolution computing its kernel from its parameters in the forward, as timm's
    ``ScaledStdConv2d`` does (a batch norm with batch statistics over the weight, ``gain * scale`` its weight)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels) + 0.5)
        self.scale = self.weight[0].numel() ** -0.5

    def standardised(self) -> torch.Tensor:
        return F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                            eps=1e-6).reshape_as(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.standardised(), self.bias, self.stride, self.padding)


def test_kernels_computed_from_parameters_are_constants():
    """A kernel computed from parameters alone (weight standardisation) is a constant of its block, not a layer:
    SRD runs (it refused such networks, NF-ResNets and NFNets, as a training-mode batch norm), gives the map of the
    same network with the kernels precomputed, and conserves the relevance."""
    torch.manual_seed(3)
    model = nn.Sequential(StdConv(3, 4, 3, padding=1), nn.ReLU(), StdConv(4, 5, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("gain")})
    with torch.no_grad():
        for i in (0, 2):
            plain[i].weight.copy_(model[i].standardised())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    maps = SRD(model, "3", contrastive=False)(x, [0, 2])
    torch.testing.assert_close(maps, SRD(plain, "3", contrastive=False)(x, [0, 2]), rtol=1e-10, atol=1e-13)
    logits = model(x)[[0, 1], [0, 2]].detach() - model[6].bias[[0, 2]].detach()
    torch.testing.assert_close(maps.sum((1, 2, 3)), logits, rtol=1e-10, atol=1e-12)


def test_nf_resnet_conserves():
    """timm's NF-ResNet (weight-standardised convolutions, ``x * alpha`` and ``beta`` scalings) runs and conserves."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("nf_resnet26", pretrained=False, num_classes=3).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    start = start_total(model, model.final_act, x, [1, 2])
    maps = SRD(model, "final_act", contrastive=False)(x.detach(), [1, 2])
    torch.testing.assert_close(maps.sum((1, 2, 3)), start, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- a branch that contributes nothing
class ZeroGammaBlock(nn.Module):
    """A residual block whose last batch norm has a zero weight (timm's ``zero_init_last``) and a non-zero shift:
    the branch's contributions are all 0, its bias is not."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            self.bn2.weight.zero_()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def test_the_bias_of_a_branch_without_contributions_is_shared():
    """Where a residual branch contributes only its bias, the bias goes to the shortcut's contributions instead of
    being lost: the map still sums to the logit less the head's bias (contrastive: to 0); the same on timm's
    ResNet-18-D with ``zero_init_last``."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), ZeroGammaBlock(16), ZeroGammaBlock(16),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert (model[1](model[0](x)).amax(dim=1) > 0).all()  # every shortcut PFV non-zero: nothing else loses relevance
    logits = model(x)[[0, 1], [1, 0]].detach() - model[6].bias[[1, 0]].detach()
    torch.testing.assert_close(SRD(model, "3", contrastive=False)(x, [1, 0]).sum((1, 2, 3)), logits, rtol=1e-10,
                               atol=1e-12)
    assert SRD(model, "3")(x, [1, 0]).sum((1, 2, 3)).abs().max() < 1e-12
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18d", pretrained=False, num_classes=3, zero_init_last=True).double().eval()
    with torch.no_grad():
        for module in resnet.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.uniform_(-0.2, 0.2)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert SRD(resnet)(images, [0, 2]).sum((1, 2, 3)).abs().max() < 1e-12
