"""Finer-CAM, RefineCAM and SESS: meta-methods around a base CAM, against plain re-computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attribution as A
from attribution.cam.base import min_max_scale, upsample
from attribution.cam.sess import Scale, gaussian_blur, window_starts
from conftest import cam_cnn


@pytest.fixture
def x():
    torch.manual_seed(8)
    return torch.randn(3, 3, 32, 32)


def count_forwards(model: nn.Module):
    """A list that grows by the batch size of every forward of ``model`` (and a handle to remove the hook)."""
    rows = []
    return rows, model.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))


# ---------------------------------------------------------------------------------------------------- Finer-CAM
def finer_by_hand(model, cut, x, classes, alpha=1.0, ranks=(1, 2, 3)):
    """Grad-CAM of s = sum_j p_j (y_c - alpha y_j) / sum_j p_j, j = the classes ranked ``ranks`` by |y - y_c|."""
    head, tail = model[:cut + 1], model[cut + 1:]
    acts = head(x).detach().requires_grad_(True)
    logits = tail(acts)
    rows = torch.arange(x.shape[0])
    target = logits[rows, classes]
    nearest = (logits - target[:, None]).abs().detach().argsort(1)[:, list(ranks)]
    p = logits.softmax(1).gather(1, nearest)
    s = (p * (target[:, None] - alpha * logits.gather(1, nearest))).sum(1) / p.sum(1)
    (grads,) = torch.autograd.grad(s.sum(), acts)
    weights = grads.mean((2, 3), keepdim=True)
    return upsample(F.relu((weights * acts.detach()).sum(1, keepdim=True)), x.shape[-2:]), nearest


def test_finer_cam_is_grad_cam_of_the_comparison_score(x):
    model = cam_cnn()
    classes = torch.tensor([2, 5, 7])
    expected, nearest = finer_by_hand(model, 2, x, classes)
    assert (nearest != classes[:, None]).all()
    torch.testing.assert_close(A.FinerCAM(model, "2")(x, classes), expected, rtol=1e-4, atol=1e-7)
    expected, _ = finer_by_hand(model, 2, x, classes, alpha=0.6, ranks=(1, 4))
    torch.testing.assert_close(A.FinerCAM(model, "2", alpha=0.6, comparisons=(1, 4))(x, classes), expected,
                               rtol=1e-4, atol=1e-7)


def test_finer_cam_with_alpha_zero_is_its_base(x):
    model = cam_cnn()
    for base in (A.GradCAM, A.LayerCAM):
        torch.testing.assert_close(A.FinerCAM(model, "2", base_method=base, alpha=0.0)(x, [1, 2, 3]),
                                   base(model, "2")(x, [1, 2, 3]))


def test_finer_cam_targets(x):
    """None and the arg-max classes agree; a callable's value plays the target score (max: the arg-max's)."""
    model = cam_cnn()
    classes = model(x).argmax(1)
    finer = A.FinerCAM(model, "2")
    by_none = finer(x)
    torch.testing.assert_close(finer(x, classes), by_none)
    torch.testing.assert_close(finer(x, lambda s: s.max(1).values), by_none)
    with pytest.raises(ValueError, match="comparisons must be a non-empty sequence of positive ints"):
        finer(x, 0, comparisons=(0, 1))
    single = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="has 1 output"):
        A.FinerCAM(single, "1")(x, 0)


def test_finer_cam_fixes_the_comparison_on_the_clean_image_for_masking_bases(x):
    """With Score-CAM as the base, the masked copies are scored against the classes nearest on the clean image."""
    model = cam_cnn()
    classes = torch.tensor([2, 5, 7])
    with torch.no_grad():
        logits = model(x)
    target = logits.gather(1, classes[:, None])
    nearest = (logits - target).abs().argsort(1)[:, 1:4]

    def finer_score(logits, owners):
        p = logits.softmax(1).gather(1, nearest[owners])
        chosen = logits.gather(1, classes[owners, None])
        return (p * (chosen - logits.gather(1, nearest[owners]))).sum(1) / p.sum(1)

    expected = A.ScoreCAM(model, "2", score="logit")(x, finer_score)
    mine = A.FinerCAM(model, "2", base_method="score_cam", score="logit")(x, classes)
    torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- RefineCAM
def test_refine_cam_is_the_product_of_scaled_layer_maps(x):
    model = cam_cnn()
    layers = ["1", "2", "3"]
    expected = torch.stack([min_max_scale(A.GradCAMPlusPlus(model, layer)(x, [0, 1, 2])) for layer in layers]).prod(0)
    rows, handle = count_forwards(model)
    try:
        mine = A.RefineCAM(model, layers)(x, [0, 1, 2])
    finally:
        handle.remove()
    torch.testing.assert_close(mine, expected)
    assert rows == [3]  # one forward for every layer together
    assert mine.amax() <= 1 and mine.amin() >= 0
    torch.testing.assert_close(A.RefineCAM(model, "2", base_method="layer_cam")(x, 0),
                               min_max_scale(A.LayerCAM(model, "2")(x, 0)))


def test_refine_cam_needs_a_base_with_layers():
    with pytest.raises(TypeError, match="no target layers to fuse"):
        A.RefineCAM(cam_cnn(), base_method=A.FullGrad)
    with pytest.raises(TypeError, match="unknown option 'layer_fusion'"):
        A.RefineCAM(cam_cnn(), layer_fusion="mean")


# --------------------------------------------------------------------------------------------------------- SESS
def test_window_starts_cover_the_length_with_equal_windows():
    assert window_starts(224, 224, 224) == [0]
    assert window_starts(288, 224, 224) == [0, 64]
    assert window_starts(480, 224, 224) == [0, 224, 256]
    assert window_starts(10, 4, 3) == [0, 3, 6]
    scales = [224 + 64 * i for i in range(12)]
    # 1 window at 224, 2 x 2 at 288-416, 3 x 3 at 480-672, 4 x 4 at 736-864, 5 x 5 at 928
    assert sum(len(Scale(224, 224, s, 224, 224)) for s in scales) == 1 + 3 * 4 + 4 * 9 + 3 * 16 + 25 == 122
    assert Scale(100, 200, 150, 100, 100).size == (150, 300)


def crops(x, scale):
    """(B, n, C, w, w): the windows of ``x`` resized to ``scale`` as torchvision's resize does, cropped."""
    scaled = F.interpolate(x, size=scale.size, mode="bilinear", align_corners=False, antialias=True)
    w = scale.window
    return torch.stack([scaled[:, :, y:y + w, xx:xx + w] for y, xx in scale.corners], 1)


@pytest.mark.parametrize("short, window, step", [(40, 32, 32), (24, 20, 9)])  # up- and (antialiased) down-scaling
def test_windows_are_crops_of_the_resized_image(short, window, step):
    torch.manual_seed(0)
    wide = torch.randn(3, 3, 32, 48)
    scale = Scale(32, 48, short, window, step)
    images, which = torch.tensor([2, 0, 1, 2]), torch.tensor([0, len(scale) - 1, 1, 2])
    torch.testing.assert_close(scale.windows(wide, images, which), crops(wide, scale)[images, which],
                               rtol=1e-5, atol=1e-5)


def test_paste_is_resizing_the_zero_padded_window():
    torch.manual_seed(0)
    scale = Scale(20, 30, 27, 12, 7)
    maps = torch.rand(2, len(scale), 12, 12)
    canvases = torch.zeros(2, len(scale), *scale.size)
    for j, (y, xx) in enumerate(scale.corners):
        canvases[:, j, y:y + 12, xx:xx + 12] = maps[:, j]
    expected = F.interpolate(canvases, size=(20, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(scale.paste(maps, (20, 30)), expected, rtol=1e-5, atol=1e-6)


def test_gaussian_blur_is_opencvs():
    cv2 = pytest.importorskip("cv2")
    torch.manual_seed(0)
    image = torch.rand(1, 1, 23, 31)
    expected = torch.from_numpy(cv2.GaussianBlur(image[0, 0].numpy(), (11, 11), 5.0, 0))
    torch.testing.assert_close(gaussian_blur(image)[0, 0], expected, rtol=1e-5, atol=1e-6)


def sess_by_hand(model, x, classes, scales, window, theta=0.0):
    """Every window of every scale: base Grad-CAM scaled to [0, 1], times the window's softmax probability over
    the image's largest, pasted back and resized; mean of the values above theta; Gaussian blur."""
    total = torch.zeros(x.shape[0], *x.shape[-2:])
    count = torch.zeros_like(total)
    pieces = []
    for s in scales:
        scale = Scale(*x.shape[-2:], s, window, window)
        patches = crops(x, scale)
        for j in range(len(scale)):
            probs = model(patches[:, j]).softmax(1)[torch.arange(x.shape[0]), classes].detach().clamp(min=0)
            cam = min_max_scale(A.GradCAM(model, "2")(patches[:, j], classes))[:, 0]
            pieces.append((scale, j, probs, cam))
    best = torch.stack([p for _, _, p, _ in pieces], 1).amax(1)
    for scale, j, probs, cam in pieces:
        maps = torch.zeros(x.shape[0], len(scale), window, window)
        maps[:, j] = cam * (probs / best)[:, None, None]
        pasted = scale.paste(maps, x.shape[-2:])[:, j]
        total += torch.where(pasted > theta, pasted, torch.zeros_like(pasted))
        count += (pasted > theta).float()
    return gaussian_blur(torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))[:, None])


def test_sess_is_the_fused_window_maps(x):
    model = cam_cnn()
    classes = torch.tensor([1, 4, 6])
    expected = sess_by_hand(model, x, classes, [32, 41, 50], 32)
    torch.testing.assert_close(A.SESS(model, "2", num_scales=3)(x, classes), expected, rtol=1e-4, atol=1e-6)


def test_sess_pre_filter_runs_the_base_on_the_best_windows_only(x):
    model = cam_cnn()
    sess = A.SESS(model, "2", scales=[32, 48], pre_filter_ratio=0.5)  # 1 + 4 windows per image
    rows, handle = count_forwards(model)
    try:
        out = sess(x[:2], [1, 4])
    finally:
        handle.remove()
    # weights: 2 images x (1 + 4) windows; then the base method on the 3 best windows of each image
    assert sum(rows) == 2 * 5 + 2 * 3
    assert torch.isfinite(out).all() and out.amax() <= 1
    maxed = A.SESS(model, "2", scales=[32, 48], pool="max", smooth=False)(x[:2], [1, 4])
    assert maxed.amax() == 1.0  # the best window's own maximum
    with pytest.raises(ValueError, match="every scale must be at least the window size 32"):
        A.SESS(model, "2", scales=[24, 48])(x, 0)
    with pytest.raises(ValueError, match="pool must be one of"):
        A.SESS(model, "2", pool="sum")(x, 0)
