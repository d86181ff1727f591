"""The seed's quick start, in full (CombinedWrapper included), with only its model and label loading changed:
random-weight torchvision and timm ResNet-50s, no download, a batch of two 32x32 copies of one image."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pytest  # noqa: E402
import torch  # noqa: E402


def resnet50(library: str):
    torch.manual_seed(0)
    if library == "timm":
        timm = pytest.importorskip("timm")
        return timm.create_model("resnet50", pretrained=False, num_classes=10)
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet50(num_classes=10)


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_seed_quick_start(library):
    import matplotlib.pyplot as plt

    from attribution import BlurIG, CombinedWrapper, GradCAM
    from attribution.utils import normalize_saliency, visualize_single_saliency

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = resnet50(library).to(device).eval()
    torch.manual_seed(1)
    img = torch.rand(1, 3, 32, 32)  # (for some inputs a random net's Grad-CAM is empty: every location negative)

    # ---- the seed's lines from here on
    blur_ig_kwargs = {"steps": 100, "batch_size": 4, "max_sigma": 50, "grad_step": 0.01, "sqrt": False}
    img = torch.cat([img, img]).to(device)  # batch input
    target_index = torch.argmax(model(img), dim=1).cpu()
    blur_ig = normalize_saliency(BlurIG(model).get_mask(img, target_index, **blur_ig_kwargs))
    gradcam = normalize_saliency(GradCAM(model).get_mask(img, target_index, target_layer="layer3"))
    combined = CombinedWrapper(model, BlurIG, GradCAM)
    combined_saliency = normalize_saliency(combined.get_mask(img, target_index, target_layer="layer3",
                                                             **blur_ig_kwargs))
    plt.subplot(1, 4, 2)
    visualize_single_saliency(blur_ig[0].unsqueeze(0))
    # ---- end of the seed's lines

    for saliency in (blur_ig, gradcam, combined_saliency):
        assert saliency.shape == (2, 1, 32, 32) and saliency.device == img.device
        assert float(saliency.amin()) == 0.0 and float(saliency.amax()) == 1.0
        torch.testing.assert_close(saliency[0], saliency[1])  # the same image twice: the same map
    plt.close("all")
