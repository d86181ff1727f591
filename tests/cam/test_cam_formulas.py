"""CAM formulas against closed forms and plain re-computations written independently of the library's code."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.base import upsample
from attribution.cam.eigen_cam import first_component
from conftest import cam_cnn, tiny_cnn


def split_forward(model: nn.Sequential, cut: int, x: torch.Tensor, classes):
    """Activations after ``model[:cut + 1]`` and the target logits' gradients w.r.t. them."""
    acts = model[:cut + 1](x).detach().requires_grad_(True)
    scores = model[cut + 1:](acts)[torch.arange(x.shape[0]), torch.as_tensor(classes)]
    (grads,) = torch.autograd.grad(scores.sum(), acts)
    return acts.detach(), grads


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.randn(3, 3, 16, 16)


# -------------------------------------------------------------------------------------------------- closed form
def test_grad_cam_is_the_original_cam_over_hw_on_a_gap_linear_net(x):
    """tiny_cnn ends in ReLU -> global average pooling -> linear: dy_c/dA_k(i,j) = W[c,k] / (h*w)."""
    model = tiny_cnn()
    classes = [0, 3, 4]
    acts = model[:6](x)  # (3, 16, 8, 8), the last ReLU's output
    h, w = acts.shape[-2:]
    weights = model[-1].weight[classes]  # (3, 16)
    original_cam = (weights[:, :, None, None] * acts).sum(1, keepdim=True)  # Zhou et al.'s CAM
    expected = upsample(F.relu(original_cam) / (h * w), x.shape[-2:])
    for method in (A.GradCAM, A.HiResCAM, A.XGradCAM):  # all three coincide when gradients are spatially constant
        torch.testing.assert_close(method(model, "5")(x, classes), expected.detach(), rtol=1e-5, atol=1e-7)


def test_grad_cam_default_layer_is_the_last_spatial_block(x):
    model = tiny_cnn()
    torch.testing.assert_close(A.GradCAM(model)(x, 1), A.GradCAM(model, "5")(x, 1))


# --------------------------------------------------------------------------------------------- gradient CAMs
def test_bag_cam_is_the_seed_formula(x):
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32)
    acts, grads = split_forward(model, 2, x, [1, 4])
    product = grads * acts
    expected = F.relu((product + 1).mean(dim=(2, 3), keepdim=True) * product).sum(1, keepdim=True)
    torch.testing.assert_close(A.BagCAM(model, "2")(x, [1, 4]), upsample(expected, x.shape[-2:]))


def test_grad_cam_plus_plus_is_the_papers_closed_form(x):
    """Eq. 19 of the paper with the ReLU of Eq. 7 on the gradients, zero where the gradient is zero."""
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32)
    acts, grads = split_forward(model, 2, x, [0, 1])
    g2, g3 = grads ** 2, grads ** 3
    alpha = g2 / (2 * g2 + acts.sum((2, 3), keepdim=True) * g3)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * F.relu(grads)).sum((2, 3), keepdim=True)
    expected = upsample(F.relu((weights * acts).sum(1, keepdim=True)), x.shape[-2:])
    torch.testing.assert_close(A.GradCAMPlusPlus(model, "2")(x, [0, 1]), expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------- Eigen-CAM
@pytest.mark.parametrize("channels, side", [(16, 8), (64, 4)])  # h*w > C and h*w <= C: both Gram matrices
def test_first_component_is_the_svd_projection(channels, side):
    torch.manual_seed(0)
    features = torch.randn(3, channels, side, side).relu()
    rows = features.flatten(2).transpose(1, 2)
    centred = rows - rows.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    svd = (centred.double() @ vh[:, 0, :].unsqueeze(-1)).squeeze(-1)
    mine = first_component(features).flatten(1).double()
    torch.testing.assert_close(mine.abs(), svd.abs(), rtol=1e-3, atol=1e-4)
    # the sign rule: positive correlation with each position's channel sum
    assert ((mine * rows.sum(2).double()).sum(1) >= 0).all()


def test_eigen_cam_ignores_the_target(x):
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(A.EigenCAM(model, "2")(x, 0), A.EigenCAM(model, "2")(x, 7))
    torch.testing.assert_close(A.KPCACAM(model, "2")(x, 0), A.KPCACAM(model, "2")(x, 7))


def test_eigen_maps_differentiable_with_repeated_eigenvalues():
    """Dead channels make several eigenvalues 0; torch's eigh backward would divide by their zero gaps."""
    model = cam_cnn()
    with torch.no_grad():
        model[2][1].weight[:8] = 0  # eight dead channels after the ReLU
        model[2][1].bias[:8] = -1
    x = torch.randn(2, 3, 32, 32)
    for method in (A.EigenCAM(model, "2"), A.KPCACAM(model, "2"), A.EigenGradCAM(model, "2")):
        out = method(x, [0, 1], create_graph=True)
        grads = torch.autograd.grad(out.sum(), [p for p in model.parameters()], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------------- Score-CAM family
def score_cam_by_hand(model, layer, x, classes, weight_of):
    """Score-CAM's map with a loop over images and channels; ``weight_of(image, mask)`` gives a channel weight."""
    acts = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.update(a=o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    maps = []
    for b in range(x.shape[0]):
        weights = []
        for k in range(acts["a"].shape[1]):
            up = F.interpolate(acts["a"][b, k][None, None], x.shape[-2:], mode="bilinear", align_corners=False)
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            weights.append(weight_of(b, mask))
        w = torch.stack(weights)
        maps.append(F.relu((w[:, None, None] * acts["a"][b]).sum(0)))
    return upsample(torch.stack(maps).unsqueeze(1), x.shape[-2:])


def prob(model, image, cls):
    with torch.no_grad():
        return model(image).softmax(1)[0, cls]


def test_score_cam_is_the_channel_wise_increase_of_confidence(x):
    model = tiny_cnn()
    classes = [2, 0, 1]
    baseline = [prob(model, torch.zeros_like(x[:1]), c) for c in classes]
    expected = score_cam_by_hand(model, "5", x, classes,
                                 lambda b, mask: prob(model, x[b:b + 1] * mask, classes[b]) - baseline[b])
    torch.testing.assert_close(A.ScoreCAM(model, "5")(x, classes), expected, rtol=1e-4, atol=1e-7)


def test_score_cam_channel_softmax_without_baseline_is_pytorch_grad_cams_weighting(x):
    model = tiny_cnn()
    classes = [2, 0, 1]

    def logit(b, mask):
        with torch.no_grad():
            return model(x[b:b + 1] * mask)[0, classes[b]]

    acts = model[:6](x).detach()
    # softmax over channels of the logits: build the per-image weights first, then the map
    expected_maps = []
    for b in range(3):
        raw = []
        score_cam_by_hand(model, "5", x[b:b + 1], classes[b:b + 1], lambda _, m: raw.append(logit(b, m)) or
                          torch.tensor(0.0))
        w = torch.stack(raw).softmax(0)
        expected_maps.append(F.relu((w[:, None, None] * acts[b]).sum(0)))
    expected = upsample(torch.stack(expected_maps).unsqueeze(1), x.shape[-2:])
    mine = A.ScoreCAM(model, "5", score="logit", channel_softmax=True, baseline=False)(x, classes)
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-7)
    # the baseline cancels in a softmax over channels
    torch.testing.assert_close(A.ScoreCAM(model, "5", score="logit", channel_softmax=True)(x, classes), mine)


def test_is_cam_integrates_scaled_masks(x):
    model = tiny_cnn()
    classes = [1, 1, 3]
    steps = 3
    baseline = [prob(model, torch.zeros_like(x[:1]), c) for c in classes]
    expected = score_cam_by_hand(
        model, "5", x, classes,
        lambda b, mask: sum(prob(model, x[b:b + 1] * mask * i / steps, classes[b]) for i in range(1, steps + 1))
        / steps - baseline[b])
    torch.testing.assert_close(A.ISCAM(model, "5", steps=steps)(x, classes), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(A.ISCAM(model, "5", steps=1)(x, classes), A.ScoreCAM(model, "5")(x, classes))


def test_ss_cam_smooths_score_cam(x):
    model = tiny_cnn()
    classes = [1, 1, 3]
    plain = A.ScoreCAM(model, "5")(x, classes)
    torch.testing.assert_close(A.SSCAM(model, "5", samples=3, std=0.0)(x, classes), plain)
    first = A.SSCAM(model, "5", samples=4, std=0.3, generator=torch.Generator().manual_seed(0))(x, classes)
    again = A.SSCAM(model, "5", samples=4, std=0.3, generator=torch.Generator().manual_seed(0))(x, classes)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, plain)


def test_ss_cam_draws_its_noise_from_the_generator(x):
    """SS-CAM written out with the noise drawn from a CPU generator as the method draws it (one standard-normal
    tensor per pass, rows image-major then channel then sample); the global seed plays no part."""
    model = tiny_cnn()
    image, cls, samples, std = x[:1], 3, 2, 0.5
    with torch.no_grad():
        acts = model[:6](image)[0]  # (16, 8, 8)
        masks = upsample(acts[:, None], image.shape[-2:])  # (16, 1, 16, 16)
        low, high = masks.flatten(1).amin(1), masks.flatten(1).amax(1)
        spread = (high - low)[:, None, None, None]
        masks = torch.where(spread > 0, (masks - low[:, None, None, None]) / spread, torch.zeros_like(masks))
        noise = torch.randn((16 * samples, 1, 16, 16), generator=torch.Generator().manual_seed(5))
        baseline = model(torch.zeros_like(image)).softmax(1)[0, cls]
        weights = torch.zeros(16)
        for row in range(16 * samples):
            channel = row // samples
            masked = image * (masks[channel] + std * noise[row])
            weights[channel] += model(masked).softmax(1)[0, cls] / samples
        weights = weights - baseline
    expected = upsample(F.relu((weights[:, None, None] * acts).sum(0, keepdim=True))[None], image.shape[-2:])
    torch.manual_seed(123)
    ours = A.SSCAM(model, "5")(image, cls, samples=samples, std=std, batch_size=64,
                               generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-7)
    torch.manual_seed(321)
    torch.testing.assert_close(A.SSCAM(model, "5")(image, cls, samples=samples, std=std, batch_size=64,
                                                   generator=torch.Generator().manual_seed(5)), ours)


def test_score_cam_family_defaults():
    assert A.ScoreCAM.defaults["score"] == "softmax" and A.ScoreCAM.defaults["baseline"] is True
    assert A.SSCAM.defaults["samples"] == 35 and A.SSCAM.defaults["std"] == 2.0
    assert A.ISCAM.defaults["steps"] == 10


def test_progress_bar(x, capsys):
    model = tiny_cnn()
    A.ScoreCAM(model, "5", progress=True)(x[:1], 0)
    A.AblationCAM(model, "5", progress=True)(x[:1], 0)
    err = capsys.readouterr().err
    assert "ScoreCAM" in err and "AblationCAM" in err
    with pytest.raises(TypeError, match="progress must be a bool"):
        A.ScoreCAM(model, "5")(x[:1], 0, progress="yes")


# ------------------------------------------------------------------------------------------------ Ablation-CAM
def test_ablation_cam_is_the_relative_score_drop(x):
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32)
    classes = [3, 5]
    acts = model[:3](x).detach()
    with torch.no_grad():
        clean = model[3:](acts)[torch.arange(2), classes]
        weights = torch.empty(2, acts.shape[1])
        for k in range(acts.shape[1]):
            ablated = acts.clone()
            ablated[:, k] = 0
            weights[:, k] = (clean - model[3:](ablated)[torch.arange(2), classes]) / clean
    expected = upsample(F.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True)), x.shape[-2:])
    explainer = A.AblationCAM(model, "2")
    torch.testing.assert_close(explainer(x, classes), expected, rtol=1e-4, atol=1e-6)
    assert explainer.last_mode == "tail"


def count_calls(module: nn.Module):
    calls = []
    return calls, module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))


@pytest.mark.parametrize("layer", ["layer3", "layer3.1.conv2", "layer3.1.relu", "layer3.1.bn1"])
def test_ablation_cam_tail_equals_full_forwards_on_a_resnet(layer):
    """The tail (after the layer, with the cached skip connection where the cut is inside a block) gives the same
    map as full forwards with the layer's output replaced, while the layers before the cut run only once.
    ``layer3.1.bn1`` is followed by ReLU(inplace=True): the tail's clean run must not rectify the activations."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    explainer = A.AblationCAM(model, layer)
    calls, handle = count_calls(model.conv1)
    tail = explainer(x, [1, 3])
    handle.remove()
    assert explainer.last_mode == "tail"
    assert calls == [2]  # the stem ran once, on the two images
    full = explainer(x, [1, 3], use_tail=False)
    assert explainer.last_mode == "full"
    torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-6)
    # heads run in chunks of one image, tails on three ablated rows at a time (the weights divide a difference of
    # two scores by the score, so kernels that round differently per batch size move the map by ~1e-4 relative)
    torch.testing.assert_close(explainer(x, [1, 3], batch_size=1), tail, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(explainer(x, [1, 3], batch_size=3), tail, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("method, options", [(A.AblationCAM, {}), (A.FDCAM, {}), (A.LIFTCAM, {}),
                                             (A.ShapCAM, {"samples": 2, "generator": None}),
                                             (A.ReciproCAM, {"gaussian": True})])
def test_edited_layer_cams_tail_equals_full_with_an_in_place_op_after_the_layer(method, options):
    """VGG's pattern, a convolution followed by ReLU(inplace=True): the tail's clean run gets a copy of the layer's
    output, so the maps (which read the activations) equal those of full forwards."""
    model = tiny_cnn(inplace=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    if "generator" in options:
        options = {**options, "generator": torch.Generator().manual_seed(0)}
    explainer = method(model, "4", score="logit", **options)
    tail = explainer(x, [0, 1])
    assert explainer.last_mode == "tail"
    if "generator" in options:
        options["generator"].manual_seed(0)
    full = explainer(x, [0, 1], use_tail=False)
    assert explainer.last_mode == "full"
    assert float(full.abs().max()) > 0
    torch.testing.assert_close(tail, full, rtol=1e-4, atol=1e-7)


def test_ablation_cam_weights_the_layers_own_output_when_an_in_place_relu_follows():
    """The Ablation-CAM formula written out on a conv -> ReLU(inplace=True) net at the convolution: the channel
    sum uses the convolution's (signed) output, the ablated copies start from it too."""
    model = tiny_cnn(inplace=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    classes = torch.tensor([0, 1])
    with torch.no_grad():
        acts = model[:5](x).clone()
        assert float(acts.min()) < 0
        clean = model[5:](acts.clone())[torch.arange(2), classes]
        weights = torch.empty(2, acts.shape[1])
        for k in range(acts.shape[1]):
            ablated = acts.clone()
            ablated[:, k] = 0
            weights[:, k] = (clean - model[5:](ablated)[torch.arange(2), classes]) / clean
    expected = upsample(F.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True)), x.shape[-2:])
    explainer = A.AblationCAM(model, "4", score="logit")
    torch.testing.assert_close(explainer(x, classes), expected, rtol=1e-4, atol=1e-7)
    assert explainer.last_mode == "tail"


@pytest.mark.parametrize("use_tail", [True, False])
def test_edited_copies_on_a_cpu_run_in_passes_sized_for_their_mode(use_tail):
    """batch_size=None on a CPU: tail passes take as many copies as fit in 64 MiB of layer output (here all 32 at
    once), full forwards RowPlanner's 16 rows (each row is a whole image's forward, not a layer output's)."""
    model = tiny_cnn()
    x = torch.randn(2, 3, 16, 16)
    stem, handle_stem = count_calls(model[0])
    head, handle_head = count_calls(model[6])  # the pooling after the layer: runs in tails and full forwards
    explainer = A.AblationCAM(model, "5")
    try:
        explainer(x, [0, 1], use_tail=use_tail)
    finally:
        handle_stem.remove()
        handle_head.remove()
    assert explainer.last_mode == ("tail" if use_tail else "full")
    if use_tail:
        assert stem == [2] and head == [2, 32]  # one head pass, the clean tail, then all 2 x 16 copies in one pass
    else:
        assert stem == head == [2, 16, 16]  # the clean forward, then full forwards 16 rows at a time


class Untraceable(nn.Module):
    """A model with data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_cnn()

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.body(x)


def test_ablation_cam_falls_back_to_full_forwards(x):
    model = Untraceable().eval()
    explainer = A.AblationCAM(model, "body.5")
    out = explainer(x, [0, 1, 2])
    assert explainer.last_mode == "full"
    torch.testing.assert_close(out, A.AblationCAM(model.body, "5")(x, [0, 1, 2]))


def test_ablation_cam_does_not_trace_through_hooked_containers(x):
    """fx would call a hook of a module it traces through with proxies: such models take full forwards."""
    model = tiny_cnn()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(type(o)))
    explainer = A.AblationCAM(model, "5")
    out = explainer(x, [0, 1, 2])
    assert explainer.last_mode == "full" and set(seen) == {torch.Tensor}
    seen.clear()
    model._forward_hooks.clear()
    torch.testing.assert_close(out, explainer(x, [0, 1, 2]))
    assert explainer.last_mode == "tail" and not seen


# ---------------------------------------------------------------------------------------------------- FullGrad
def fullgrad_by_hand(model, x, classes, within=None):
    """The authors' FullGrad: input-gradient * input plus each bias layer's bias * output-gradient, each term
    |.| and min-max scaled per image over all its channels, upsampled and summed over channels.  Output gradients
    come from zero tensors added to each layer's output (a route independent of the library's capture)."""
    layers = [m for m in (within or model).modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    deltas, handles = [], []

    def add_delta(module, inputs, output):
        delta = torch.zeros_like(output, requires_grad=True)
        deltas.append((module, delta))
        return output + delta

    for m in layers:
        handles.append(m.register_forward_hook(add_delta))
    xg = x.clone().requires_grad_(True)
    scores = model(xg)[torch.arange(x.shape[0]), classes]
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(scores.sum(), [xg] + [d for _, d in deltas])

    def psi(t):
        t = t.abs()
        flat = t.flatten(1)
        flat = (flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values
                                                              - flat.min(1, keepdim=True).values)
        return F.interpolate(flat.view_as(t), x.shape[-2:], mode="bilinear", align_corners=False)

    total = psi(grads[0] * x).sum(1, keepdim=True)
    for (module, _), g in zip(deltas, grads[1:]):
        if isinstance(module, nn.BatchNorm2d):
            bias = module.bias - module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)
        elif module.bias is not None:
            bias = module.bias
        else:
            continue
        total = total + psi(bias.view(1, -1, 1, 1) * g).sum(1, keepdim=True)
    return total.detach()


def test_fullgrad_is_the_authors_formula():
    model = cam_cnn()
    with torch.no_grad():
        model[0][0].bias = nn.Parameter(torch.randn(16) * 0.1)  # a convolution with a bias too
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(A.FullGrad(model)(x, [2, 7]), fullgrad_by_hand(model, x, [2, 7]),
                               rtol=1e-4, atol=1e-5)


def test_fullgrad_target_layer_restricts_the_bias_layers():
    model = cam_cnn()
    x = torch.randn(2, 3, 32, 32)
    last_block = A.FullGrad(model, "3")(x, [2, 7])
    torch.testing.assert_close(last_block, fullgrad_by_hand(model, x, [2, 7], within=model[3]), rtol=1e-4,
                               atol=1e-5)
    assert not torch.allclose(A.FullGrad(model)(x, [2, 7]), last_block)


class SharedConv(nn.Module):
    """A convolution called twice in one forward (shared weights), or, with ``split``, a copy for the second call:
    both networks compute the same function."""

    def __init__(self, split: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.again = copy.deepcopy(self.conv) if split else self.conv
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(h)))
        h = torch.relu(self.again(h))
        return self.fc(h.mean((2, 3)))


def test_fullgrad_counts_every_call_of_a_shared_module():
    """One bias term per call: a shared convolution gives the map of the network with the module duplicated, which
    is the authors' formula written out (fullgrad_by_hand's hooks see every call)."""
    shared, split = SharedConv(), SharedConv(split=True)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(shared(x), split(x))
    expected = A.FullGrad(split)(x, [0, 3])
    torch.testing.assert_close(A.FullGrad(shared)(x, [0, 3]), expected)
    torch.testing.assert_close(expected, fullgrad_by_hand(split, x, [0, 3]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(A.FullGrad(shared)(x, [0, 3], per_channel=True),
                               A.FullGrad(split)(x, [0, 3], per_channel=True))


def test_score_cam_shares_masked_forwards_between_copies_of_an_image(x):
    """Explaining one image for two classes costs C masked forwards, not 2C, and changes no map."""
    model = tiny_cnn()
    rows = []
    handle = model[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    both = A.ScoreCAM(model, "5")(torch.cat([x[:1], x[:1], x[1:2]]), [0, 3, 3])
    handle.remove()
    assert sum(rows) == 3 + 1 + 2 * 16  # capture pass, baseline, 16 channels for each of 2 distinct images
    torch.testing.assert_close(both[0:1], A.ScoreCAM(model, "5")(x[:1], 0))
    torch.testing.assert_close(both[1:2], A.ScoreCAM(model, "5")(x[:1], 3))
    torch.testing.assert_close(both[2:3], A.ScoreCAM(model, "5")(x[1:2], 3))


def test_seg_eigen_cam_makes_the_dominant_side_positive():
    """Seg-Eigen-CAM's sign rule: a projection whose most negative value outweighs its most positive one is
    flipped, whatever sign the eigendecomposition returned; and the features are |gradient| x activation."""
    from attribution.cam.eigen_cam import first_component, larger_side_positive

    projection = torch.tensor([[1.0, -3.0, 0.5], [2.0, -1.0, 0.0]])
    torch.testing.assert_close(larger_side_positive(projection), torch.tensor([[-1.0, 3.0, -0.5], [2.0, -1.0, 0.0]]))
    features = torch.randn(2, 6, 4, 5, generator=torch.Generator().manual_seed(0))
    for flipped in (features, -features):  # the component of -F is minus that of F: the rule undoes it
        component = first_component(flipped, sign="extreme").flatten(1)
        assert (component.amax(1) >= component.amin(1).abs()).all()
    torch.testing.assert_close(first_component(features, sign="extreme"), first_component(-features, sign="extreme"))


@pytest.mark.parametrize("size, out_size", [((7, 7), (224, 224)), ((5, 6), (16, 23)), ((4, 4), (4, 4)),
                                            ((3, 8), (13, 20)), ((9, 9), (5, 7))])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaling_by_the_range_of_the_upsampled_map_without_upsampling(size, out_size, dtype):
    """``scale_as_upsampled`` (ViT-CX's masks) equals min-max scaling the bilinear upsampling, without upsampling;
    a constant map scales to 0 (upsampled by F.interpolate, 2.0 on a 5x6 grid comes out 2 +- 2e-16, a false range
    that min-max scaling blew up to a [0, 1] mask of rounding noise)."""
    from attribution.cam.base import min_max_scale, scale_as_upsampled

    torch.manual_seed(1)
    maps = torch.randn(3, 4, *size, dtype=dtype)
    maps[0, 0] = 2.0
    scaled = scale_as_upsampled(maps, out_size)
    full = F.interpolate(maps, out_size, mode="bilinear", align_corners=False)
    expected = min_max_scale(full.flatten(0, 1).unsqueeze(1)).view_as(full)
    expected[0, 0] = 0
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(F.interpolate(scaled, out_size, mode="bilinear", align_corners=False), expected,
                               rtol=tolerance, atol=tolerance)
    assert scaled[0, 0].abs().max() == 0


def test_score_cams_mask_of_a_constant_channel_is_zero():
    """Score-CAM's masks are min-max scaled upsamplings: a constant channel (a saturated ReLU6) gives no mask, at
    any size (before, 2.3 on a 5x6 grid upsampled to 16x23 gave a [0, 1] mask of float rounding noise)."""
    from attribution.cam.score_cam import normalized_masks

    acts = torch.full((2, 5, 6), 2.3)
    acts[1] = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    masks = normalized_masks(acts, (16, 23))
    assert masks[0].abs().max() == 0
    assert 0 <= float(masks[1].min()) < 1e-6 and 1 - 1e-6 < float(masks[1].max()) <= 1
