"""SIDU against the authors' algorithm written out with NumPy, SciPy and scikit-image, one image at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attribution as A
from conftest import cam_cnn, tiny_cnn

skimage_transform = pytest.importorskip("skimage.transform")
spatial = pytest.importorskip("scipy.spatial.distance")


def sidu_written_out(model, split, image, cls, threshold=0.5, width=0.25, p1=0.5):
    """The authors' SIDU_XAI.py for one image: binary feature maps resized by scikit-image, the masked images'
    softmax outputs, the kernel of their differences from the image's, the min-max scaled sums of SciPy's cdist."""
    with torch.no_grad():
        feature = model[:split](image[None])[0].numpy()  # (C, h, w)
        size = tuple(image.shape[-2:])
        masks = np.stack([skimage_transform.resize((f > threshold).astype("float32"), size, order=1,
                                                   mode="reflect", anti_aliasing=False) for f in feature])
        masked = image[None].numpy() * masks[:, None]
        preds = model(torch.from_numpy(masked).float()).softmax(1).double().numpy()
        original = model(image[None]).softmax(1).double().numpy()
    weights = np.sqrt(np.exp(-np.abs(original - preds) ** 2 / width ** 2))
    sums = spatial.cdist(preds, preds).sum(axis=1)
    uniqueness = (sums - sums.min()) / (sums.max() - sums.min() + 1e-13)
    saliency = (weights * uniqueness[:, None]).T.dot(masks.reshape(len(masks), -1)).reshape(-1, *size)
    return saliency[cls] / len(masks) / p1


@pytest.mark.parametrize("split, layer", [(3, "2"), (4, "3")])
def test_equals_the_authors_algorithm(split, layer):
    model = cam_cnn()
    torch.manual_seed(4)
    x = torch.randn(2, 3, 30, 26)  # a size the feature maps do not divide
    classes = [2, 7]
    ours = A.SIDU(model, layer)(x, classes, batch_size=20)
    for i, cls in enumerate(classes):
        expected = torch.from_numpy(sidu_written_out(model, split, x[i], cls)).float()
        torch.testing.assert_close(ours[i, 0], expected, rtol=1e-4, atol=1e-6)
    assert (ours > 0).any()


def test_bad_options_name_what_is_wrong():
    x = torch.randn(1, 3, 16, 16)
    for option, value in (("kernel_width", 0.0), ("p1", -1.0), ("threshold", "high")):
        with pytest.raises(ValueError, match=option):
            A.SIDU(tiny_cnn())(x, 0, **{option: value})
    with pytest.raises(ValueError, match="threshold=100.0 keeps no element of the layer's output for image 0"):
        A.SIDU(tiny_cnn())(x, 0, threshold=100.0)


def test_on_the_pretrained_model_with_logits(efficientnet):
    """Cat left, coffee right (96-pixel squares, block 14's 192 channels): with logits and a kernel width to match
    them, the cat's map puts more of its mass on the cat half than the espresso's (0.54 against 0.41 when written).
    At the authors' defaults (softmax, width 0.25) SIDU is not class-discriminative here: the espresso's probability
    is 8e-5, so every mask's similarity difference is 1 and its map is the class-agnostic uniqueness alone, and the
    cat's (p = 0.37) puts 0.40 of its mass on the cat half against the espresso's 0.53."""
    from attribution.data import EGYPTIAN_CAT, ESPRESSO, cat_coffee_composite

    x = cat_coffee_composite(side=96).repeat(2, 1, 1, 1)
    maps = A.SIDU(efficientnet, "_blocks.14", score="logit", kernel_width=2.0)(x, [EGYPTIAN_CAT, ESPRESSO])
    mass = maps.abs().sum(1)
    share = mass[..., :mass.shape[-1] // 2].flatten(1).sum(1) / mass.flatten(1).sum(1)
    assert share[0] - share[1] > 0.08, f"cat share {share[0]:.3f} for the cat, {share[1]:.3f} for the espresso"
