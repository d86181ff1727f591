"""CAM parity with pytorch-grad-cam (every method both ship) and Captum's LayerGradCam.

pytorch-grad-cam returns maps min-max normalised per image at the input's resolution; ours are raw, so both are
min-max normalised per image and compared by Pearson correlation (>= 0.99 for every image).  Where a formula
differs on purpose, the comparison is against the reference's formula with our documented choice applied.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attribution as A
from attribution.cam.base import upsample
from attribution.cam.eigen_cam import orient
from conftest import cam_cnn, tiny_cnn

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel  # noqa: E402

LAYER = 2  # cam_cnn's third block: 32 channels at 16x16, followed by more convolutions


def pearson_per_image(ours: torch.Tensor, theirs) -> np.ndarray:
    """Pearson correlation of each image's min-max normalised maps; (B, H, W) or (B, 1, H, W) inputs."""
    a = ours.detach().reshape(ours.shape[0], -1).double().numpy()
    b = np.asarray(theirs, dtype=np.float64).reshape(a.shape[0], -1)
    corr = []
    for u, v in zip(a, b):
        u = (u - u.min()) / max(u.max() - u.min(), 1e-12)
        v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
        assert u.std() > 0 and v.std() > 0, "a constant map cannot be compared"
        corr.append(np.corrcoef(u, v)[0, 1])
    return np.array(corr)


@pytest.fixture
def case():
    model = cam_cnn()
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    classes = model(x).argmax(1).tolist()
    return model, x, classes


def reference(cls, model, x, classes, **kwargs):
    with cls(model=model, **kwargs) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])


SHARED = [
    ("GradCAM", "GradCAM", {}),
    ("HiResCAM", "HiResCAM", {}),
    ("GradCAMElementWise", "GradCAMElementWise", {}),
    ("GradCAMPlusPlus", "GradCAMPlusPlus", {}),
    ("XGradCAM", "XGradCAM", {}),
    ("LayerCAM", "LayerCAM", {}),
    # pytorch-grad-cam's Score-CAM: softmax over channels of the masked copies' logits (see ScoreCAM's docstring)
    ("ScoreCAM", "ScoreCAM", {"score": "logit", "channel_softmax": True}),
    # the layer is post-ReLU, so pytorch-grad-cam ablates with 0 as the paper (and we) do
    ("AblationCAM", "AblationCAM", {}),
    ("FEM", "FEM", {}),
    ("ShapleyCAM", "ShapleyCAM", {}),
    # the same sign correction (the dominant side positive), so no sign rule of ours to apply first
    ("SegEigenCAM", "SegEigenCAM", {}),
]


@pytest.mark.parametrize("ours, theirs, options", SHARED, ids=[s[0] for s in SHARED])
def test_matches_pytorch_grad_cam(ours, theirs, options, case):
    model, x, classes = case
    layer = model[LAYER]
    mine = getattr(A, ours)(model, layer, **options)(x, classes)
    ref = reference(getattr(pgc, theirs), model, x, classes, target_layers=[layer])
    assert mine.shape == (3, 1, 32, 32)
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr


def test_shapley_cam_with_rest_matches_pytorch_grad_cam(case):
    """The paper's ReST utility (``score='rest'``): the Hessian term is non-zero through the softmax."""
    model, x, classes = case
    layer = model[LAYER]
    mine = A.ShapleyCAM(model, layer, score="rest")(x, classes)
    with pgc.ShapleyCAM(model=model, target_layers=[layer]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputReST(c) for c in classes])
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr


def test_finer_cam_matches_pytorch_grad_cam(case):
    """pytorch-grad-cam compares with the nearest classes only for ``targets=None`` (the arg-max)."""
    model, x, _ = case
    layer = model[LAYER]
    mine = A.FinerCAM(model, layer)(x)
    cam = pgc.FinerCAM(model=model, target_layers=[layer])
    with cam:
        ref = cam(x, targets=None)
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr
    assert pearson_per_image(A.GradCAM(model, layer)(x), ref).min() < 0.99  # the comparison changes the map


def test_refine_cam_matches_pytorch_grad_cam(case):
    model, x, classes = case
    layers = [model[1], model[2], model[3]]
    mine = A.RefineCAM(model, layers)(x, classes)
    ref = pgc.RefineCAM(model=model, target_layers=layers)(x, [ClassifierOutputTarget(c) for c in classes])
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr


def test_sess_matches_pytorch_grad_cam(case):
    model, x, classes = case
    layer = model[LAYER]
    mine = A.SESS(model, layer, num_scales=3)(x, classes)
    with pgc.SESS(model=model, target_layers=[layer], num_scales=3) as cam:
        ref = cam(x, [ClassifierOutputTarget(c) for c in classes])
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr


def test_fullgrad_per_channel_matches_pytorch_grad_cam(case):
    model, x, classes = case
    mine = A.FullGrad(model, per_channel=True)(x, classes)
    ref = reference(pgc.FullGrad, model, x, classes, target_layers=[])
    corr = pearson_per_image(mine, ref)
    assert corr.min() >= 0.99, corr


def layer_activations_and_gradients(model, x, classes):
    """Activations of cam_cnn's block LAYER and the target logits' gradients, from the model split by hand."""
    head, tail = model[:LAYER + 1], model[LAYER + 1:]
    acts = head(x).detach().requires_grad_(True)
    scores = tail(acts)[torch.arange(x.shape[0]), classes]
    (grads,) = torch.autograd.grad(scores.sum(), acts)
    return acts.detach(), grads


def oriented_map(projection: np.ndarray, reference: torch.Tensor, size) -> torch.Tensor:
    """A (B, h, w) reference projection with our sign rule (positive correlation with ``reference``'s channel
    sum), rectified and upsampled as our CAMs are."""
    proj = torch.from_numpy(np.asarray(projection, dtype=np.float32)).flatten(1)
    proj = orient(proj, reference.flatten(2).sum(1)).view(reference.shape[0], 1, *reference.shape[-2:])
    return upsample(F.relu(proj), size)


def test_eigen_cam_is_pytorch_grad_cam_projection_with_our_sign(case):
    model, x, classes = case
    acts, _ = layer_activations_and_gradients(model, x, classes)
    expected = oriented_map(get_2d_projection(acts.numpy()), acts, x.shape[-2:])
    mine = A.EigenCAM(model, model[LAYER])(x, classes)
    assert pearson_per_image(mine, expected.numpy()).min() >= 0.99
    # where NumPy's sign happens to agree with ours, pytorch-grad-cam's own EigenCAM map is ours
    ref = reference(pgc.EigenCAM, model, x, classes, target_layers=[model[LAYER]])
    raw = torch.from_numpy(get_2d_projection(acts.numpy())).flatten(1)
    agree = (raw * acts.flatten(2).sum(1)).sum(1) >= 0
    assert agree.any(), "pick another seed: no image where the signs agree"
    assert pearson_per_image(mine[agree], ref[agree.numpy()]).min() >= 0.99


def test_eigen_grad_cam_is_pytorch_grad_cam_projection_with_our_sign(case):
    model, x, classes = case
    acts, grads = layer_activations_and_gradients(model, x, classes)
    product = grads * acts
    expected = oriented_map(get_2d_projection(product.numpy()), product, x.shape[-2:])
    mine = A.EigenGradCAM(model, model[LAYER])(x, classes)
    assert pearson_per_image(mine, expected.numpy()).min() >= 0.99


def test_kpca_cam_is_scikit_learn_kernel_pca_with_our_sign(case):
    model, x, classes = case
    acts, _ = layer_activations_and_gradients(model, x, classes)
    expected = oriented_map(get_2d_projection_kernel(acts.numpy()), acts, x.shape[-2:])
    mine = A.KPCACAM(model, model[LAYER])(x, classes)
    assert pearson_per_image(mine, expected.numpy()).min() >= 0.99


@pytest.mark.parametrize("kernel", ["rbf", "poly", "cosine"])
def test_kpca_cam_other_kernels(kernel, case):
    model, x, classes = case
    acts, _ = layer_activations_and_gradients(model, x, classes)
    expected = oriented_map(get_2d_projection_kernel(acts.numpy(), kernel=kernel, gamma=0.05), acts, x.shape[-2:])
    mine = A.KPCACAM(model, model[LAYER], kernel=kernel, gamma=0.05)(x, classes)
    assert pearson_per_image(mine, expected.numpy()).min() >= 0.99


# ------------------------------------------------------------------------------------------------------- Captum
@pytest.mark.parametrize("build, layer", [(tiny_cnn, "4"), (cam_cnn, "2"), (cam_cnn, "3.0")])
def test_grad_cam_equals_captum_layer_grad_cam(build, layer):
    captum_attr = pytest.importorskip("captum.attr")
    model = build()
    torch.manual_seed(5)
    x = torch.randn(4, 3, 32, 32)
    classes = torch.tensor([0, 3, 1, 2])
    module = dict(model.named_modules())[layer]
    theirs = captum_attr.LayerGradCam(model, module).attribute(x, target=classes, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(theirs, x.shape[-2:], interpolate_mode="bilinear")
    mine = A.GradCAM(model, layer)(x, classes)
    assert theirs.abs().max() > 0
    torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-5)
