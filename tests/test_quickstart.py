"""The seed's quick start, with only its model and label loading changed (random weights, no download)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402


def test_seed_quick_start_gradient_lines():
    timm = pytest.importorskip("timm")
    import matplotlib.pyplot as plt

    from attribution import BlurIG
    from attribution.utils import normalize_saliency, visualize_single_saliency

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False, num_classes=10).to(device).eval()
    img = torch.randn(1, 3, 32, 32)

    img = torch.cat([img, img])  # batch input
    img = img.to(device)
    output = model(img)
    target_index = torch.argmax(output, dim=1).cpu()
    blur_ig_kwargs = {"steps": 100, "batch_size": 4, "max_sigma": 50, "grad_step": 0.01, "sqrt": False}
    blur_ig_net = BlurIG(model)
    blur_ig = normalize_saliency(blur_ig_net.get_mask(img, target_index, **blur_ig_kwargs))
    plt.subplot(1, 4, 2)
    visualize_single_saliency(blur_ig[0].unsqueeze(0))

    assert blur_ig.shape == (2, 1, 32, 32) and blur_ig.device == img.device
    assert float(blur_ig.amin()) == 0.0 and float(blur_ig.amax()) == 1.0
    torch.testing.assert_close(blur_ig[0], blur_ig[1])  # the same image twice: the same map
    plt.close("all")
