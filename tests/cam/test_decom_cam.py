"""DecomCAM against the authors' procedure written out one image at a time (NumPy SVD with scikit-learn's sign rule
of the versions before 1.5, SciPy's blur), a closed form on rank-one activations, defaults, batch independence,
create_graph, bad input and the pretrained EfficientNet-Lite0."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attribution.cam.base import CAM
from attribution.cam.decom_cam import DecomCAM, principal_scores
from attribution.core.filters import reflect_blur_matrix
from conftest import cam_cnn, central_difference, tiny_cnn

ndimage = pytest.importorskip("scipy.ndimage")


# ------------------------------------------------------------------------------------ the authors' procedure, looped
def svd_flip_on_u(u: np.ndarray, vt: np.ndarray):
    """scikit-learn's ``svd_flip(u, v)`` with ``u_based_decision=True`` (what ``PCA`` used before 1.5): each column of
    ``u`` made to have its entry of largest magnitude positive."""
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), range(u.shape[1])])
    return u * signs, vt * signs[:, None]


def authors_pca(matrix: np.ndarray, components: int) -> np.ndarray:
    """``PCA(n_components).fit_transform(matrix)`` of scikit-learn < 1.5 (full SVD solver): (samples, components)."""
    centred = matrix - matrix.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    u, vt = svd_flip_on_u(u, vt)
    return u[:, :components] * s[:components]


def decom_cam_written_out(model, layer, image, cls, components=10, p=500, sigma=10.0, threshold=0.001,
                          baseline=False):
    """The authors' ``DecomCAM.get_cam_image`` (pytorch_grad_cam/decom_cam.py) for one image of a classifier,
    followed by their base class's ``np.maximum(cam, 0)`` (its final min-max scaling left out)."""
    store = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: store.update(act=output))
    output = model(image[None])
    handle.remove()
    grads = torch.autograd.grad(output[0, cls], store["act"])[0].numpy()
    act = store["act"].detach().numpy()
    alpha = grads.mean(axis=(2, 3)).flatten()
    indices = np.argsort(-alpha, kind="stable")[:p]
    x = act[:, indices] * alpha[None, indices, None, None]
    height, width = x.shape[2], x.shape[3]
    x = x.reshape(len(indices), height * width).T  # (positions, channels)
    pca_result = authors_pca(x, components)
    attn_maps = []
    for i in range(components):
        tmp = torch.from_numpy(pca_result[:, i].reshape(height, width))[None, None].clamp(min=0)
        tmp = F.interpolate(tmp, image.shape[1:], mode="bicubic", align_corners=False)
        attn_maps.append(tmp.squeeze().numpy())
    image_np = image.permute(1, 2, 0).numpy()
    blur = np.stack([ndimage.gaussian_filter(image_np[:, :, c], sigma, truncate=4) for c in range(3)], axis=2)
    masked = []
    for attn in attn_maps:
        mask = attn - attn.min()
        if mask.max() > 0:
            mask = mask / mask.max()
        masked.append(np.maximum(image_np * mask[:, :, None], blur * (1 - mask[:, :, None])))
    with torch.no_grad():
        scores = model(torch.from_numpy(np.stack(masked)).permute(0, 3, 1, 2))[:, cls].numpy()
        if baseline:
            scores = scores - model(torch.from_numpy(blur).permute(2, 0, 1)[None])[0, cls].numpy()
    largest = max(scores)
    cam = 0
    for attn, score in zip(attn_maps, scores):
        cam = cam + attn * (0.0 if score < threshold else score / largest)
    return np.maximum(cam, 0), scores


@pytest.mark.parametrize("layer, size, options", [
    ("2", (32, 32), {}),
    ("1", (30, 26), {"components": 4, "channels": 8, "baseline": True, "blur_sigma": 3.0, "threshold": -0.02}),
])
def test_equals_the_authors_procedure(layer, size, options):
    model = cam_cnn().double()
    torch.manual_seed(3)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    classes = [2, 0]
    ours = DecomCAM(model, layer, **options)(x, classes, batch_size=7)
    reference_options = {"components": options.get("components", 10), "p": options.get("channels", 500),
                         "sigma": options.get("blur_sigma", 10.0), "baseline": options.get("baseline", False),
                         "threshold": options.get("threshold", 0.001)}
    for i, cls in enumerate(classes):
        expected, scores = decom_cam_written_out(model, model[int(layer)], x[i], cls, **reference_options)
        assert (scores >= reference_options["threshold"]).sum() >= 2  # several components weigh in
        torch.testing.assert_close(ours[i, 0], torch.from_numpy(expected), rtol=1e-9, atol=1e-12)
        assert ours[i].amax() > 0


def test_scores_are_scikit_learns_up_to_the_stated_sign():
    """|scores| equal scikit-learn's PCA (whatever its version's sign rule: 1.5 and later make each component's
    largest *loading* positive); each score map's largest-magnitude entry is positive; the maps are orthogonal."""
    decomposition = pytest.importorskip("sklearn.decomposition")
    torch.manual_seed(0)
    features, alpha = torch.randn(3, 12, 5, 7, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    scores = principal_scores(features, alpha, channels=9, components=4)
    assert scores.shape == (3, 4, 5, 7)
    for i in range(3):
        top = alpha[i].argsort(descending=True)[:9]
        matrix = (features[i, top] * alpha[i, top, None, None]).flatten(1).T.numpy()
        sk = decomposition.PCA(n_components=4, svd_solver="full").fit_transform(matrix)
        torch.testing.assert_close(scores[i].flatten(1).T.abs(), torch.from_numpy(np.abs(sk)))
        flat = scores[i].flatten(1)
        assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()
        gram = flat @ flat.T  # orthogonal components
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()))


def test_scores_have_finite_gradients_when_channels_are_dead():
    """Two all-zero channels give two zero singular values, where torch's SVD backward (2.x) returns NaN; the scores'
    own backward (through the kept components only) matches finite differences."""
    torch.manual_seed(0)
    features = torch.randn(2, 5, 7, 1, dtype=torch.float64)
    features[:, [1, 3]] = 0
    alpha = torch.randn(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: principal_scores(f, alpha, 5, 2), (features.requires_grad_(),))


def test_blur_is_scipys_gaussian_filter_with_reflected_edges():
    torch.manual_seed(0)
    image = torch.randn(9, 7, dtype=torch.float64)
    for sigma in (0.0, 1.5, 10.0):  # radius 40 for sigma 10: the reflections wrap several times
        ours = reflect_blur_matrix(9, sigma) @ image @ reflect_blur_matrix(7, sigma).T
        expected = ndimage.gaussian_filter(image.numpy(), sigma, truncate=4, mode="reflect")
        torch.testing.assert_close(ours, torch.from_numpy(expected))


# --------------------------------------------------------------------------------------------- rank-one closed form
class RankOne(nn.Module):
    """Channel ``c`` of the output is ``a_c * m`` with ``m`` the 2x2 average of the input's first channel."""

    def __init__(self, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x[:, :1], 2) * self.scale.view(1, -1, 1, 1)


def rank_one_model(channels: int = 6, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    head = nn.Linear(channels, classes)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.fill_(5.0)  # every masked image's logit is about 5: one component gets weight 1
    return nn.Sequential(RankOne(torch.randn(channels)), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head).double().eval()


@pytest.mark.parametrize("channels", [500, 3])
def test_closed_form_on_rank_one_activations(channels):
    """With ``A_c = a_c m`` and a pooled linear head, ``alpha_c = W_tc / (h w)``: the centred weighted matrix is
    ``(m - mean m) (alpha a)^T``, one component with score ``s ||alpha a||_P (m - mean m)`` (norm over the kept
    channels, ``s`` the sign that makes its largest-magnitude entry positive, so a dark spot peaks too)."""
    model = rank_one_model()
    torch.manual_seed(1)
    x = 0.1 * torch.randn(2, 3, 12, 16, dtype=torch.float64)
    x[0, 0, 4:6, 6:8] += 5.0   # a bright spot
    x[1, 0, 8:10, 2:4] -= 5.0  # a dark spot
    classes = torch.tensor([1, 2])
    explainer = DecomCAM(model, "0", channels=channels)
    parts = explainer.decompose(x, classes, components=3)
    m = F.avg_pool2d(x[:, :1], 2)
    alpha = model[3].weight[classes].detach() / m[0, 0].numel()
    weighted = alpha * model[0].scale
    top = alpha.topk(min(channels, 6), dim=1).indices
    norm = weighted.gather(1, top).norm(dim=1)
    centred = m - m.mean(dim=(2, 3), keepdim=True)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).view(2, 1, 1, 1)
    expected = F.interpolate((sign * norm.view(2, 1, 1, 1) * centred).relu(), size=(12, 16), mode="bicubic",
                             align_corners=False)
    torch.testing.assert_close(parts.sub_maps[:, :1], expected)
    assert parts.sub_maps[:, 1:].abs().max() < 1e-12  # rank one: nothing left for the other components
    single = explainer(x, classes, components=1)
    torch.testing.assert_close(single, expected.relu())
    for image, rows, cols in ((0, range(3, 7), range(5, 9)), (1, range(7, 11), range(1, 5))):  # both spots peak
        row, col = divmod(int(single[image].flatten().argmax()), 16)
        assert row in rows and col in cols

# ----------------------------------------------------------------------------------------------- options and contract
def test_defaults_are_the_authors():
    assert DecomCAM.defaults == {**CAM.defaults, "components": 10, "channels": 500, "blur_sigma": 10.0,
                                 "threshold": 0.001, "baseline": False}
    assert "score" not in DecomCAM.defaults  # the library's default score, the logit, as the authors' target
    parts = DecomCAM(cam_cnn(), "2").decompose(torch.randn(1, 3, 32, 32), 2)
    assert parts.sub_maps.shape == (1, 10, 32, 32) and parts.weights.shape == (1, 10)


def test_decompose_integrates_to_the_map_and_concatenates_layers():
    model = cam_cnn()
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32, 32)
    parts = DecomCAM(model, "2").decompose(x, [2, 0])
    integrated = (parts.weights[:, :, None, None] * parts.sub_maps).sum(1, keepdim=True).relu()
    torch.testing.assert_close(parts.map, integrated)
    assert ((parts.weights == 0) | ((parts.weights > 0) & (parts.weights <= 1))).all()
    assert (parts.weights.amax(1) == 1).all()
    both = DecomCAM(model, ["1", "2"], components=3).decompose(x, [2, 0])
    assert both.sub_maps.shape == (2, 6, 32, 32) and both.weights.shape == (2, 6)


def test_batch_independence_and_chunking():
    model = cam_cnn().double()
    torch.manual_seed(5)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    classes = [2, 0, 9]
    explainer = DecomCAM(model, "2", components=5)
    together = explainer(x, classes)
    chunked = explainer(x, classes, batch_size=2)
    alone = torch.cat([explainer(x[i:i + 1], classes[i]) for i in range(3)])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together, chunked)
    torch.testing.assert_close(explainer(x), explainer(x, model(x).argmax(1)))


def test_float32_matches_float64():
    model = cam_cnn()
    torch.manual_seed(6)
    x = torch.randn(2, 3, 32, 32)
    single = DecomCAM(model, "2", components=4)(x, [2, 0])
    double = DecomCAM(model.double(), "2", components=4)(x.double(), [2, 0])
    assert single.dtype == torch.float32 and double.dtype == torch.float64
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-5)


def test_create_graph_matches_finite_differences():
    model = cam_cnn(classes=4).double()
    torch.manual_seed(7)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    probe = torch.randn(1, 1, 16, 16, dtype=torch.float64)
    explainer = DecomCAM(model, "2", components=3)
    weight = model[-1].weight
    direction = torch.randn_like(weight)
    cls = int(model(x).argmax())  # a positive logit: the masked images' scores pass the threshold

    def value():
        return (explainer(x, cls) * probe).sum()

    maps = explainer(x, cls, create_graph=True)
    (grad,) = torch.autograd.grad((maps * probe).sum(), weight)
    assert maps.amax() > 0
    torch.testing.assert_close((grad * direction).sum(), central_difference(value, weight, direction),
                               rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("option, value, error", [
    ("components", 0, ValueError), ("components", 2.5, ValueError), ("channels", -1, ValueError),
    ("blur_sigma", -1.0, ValueError), ("threshold", float("nan"), ValueError), ("threshold", "low", ValueError),
    ("baseline", "yes", TypeError), ("layer_fusion", "sum", ValueError),
])
def test_bad_options_name_what_is_wrong(option, value, error):
    with pytest.raises(error, match=option):
        DecomCAM(tiny_cnn())(torch.randn(1, 3, 16, 16), 0, **{option: value})


# --------------------------------------------------------------------------------------------- the pretrained model
def test_on_the_pretrained_model(efficientnet, composite):
    """Cat left, coffee right (160-pixel squares), the default layer (the head's 1280 channels at 5 x 10, P = 500):
    0.85 of the cat's map on the cat half against 0.17 of the espresso's when written (margin 0.68; 20 masked
    forwards for the pair, about 1.5 s on 2 CPU cores)."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO

    parts = DecomCAM(efficientnet).decompose(torch.cat([composite, composite]), [EGYPTIAN_CAT, ESPRESSO])
    mass = parts.map.abs().sum(1)
    share = mass[..., :mass.shape[-1] // 2].flatten(1).sum(1) / mass.flatten(1).sum(1)
    assert share[0] - share[1] >= 0.3, f"cat share {share[0]:.3f} for the cat, {share[1]:.3f} for the espresso"
    assert ((parts.weights > 0).sum(1) >= 5).all()  # several sub-maps contribute


def test_no_positive_score_gives_zero_weights_not_nan():
    """The reference divides by the largest kept score: 0/0 at a threshold <= 0 with zero scores, and negative scores
    weighed in inverted order; here such an image gets no weights."""
    from attribution.cam.decom_cam import integration_weights

    scores = torch.tensor([[0.0, 0.0], [-0.01, -0.02], [0.2, 0.1]])
    weights = integration_weights(scores, -0.05)
    torch.testing.assert_close(weights, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.5]]))
