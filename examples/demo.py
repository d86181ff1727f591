"""The main job on the embedded default: explain the pretrained EfficientNet-Lite0 on scikit-image's photos.

Writes examples/figures/demo.png: for the cat photo, the coffee photo, and a cat-left / coffee-right composite
(explained for both classes), the maps of several methods.  Runs offline on a CPU in well under a minute.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

import attribution  # noqa: E402
from attribution.data import (  # noqa: E402
    EGYPTIAN_CAT,
    ESPRESSO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    cat_coffee_composite,
    load_efficientnet_lite0,
    normalize,
    photos,
)
from attribution.utils import plot_grid  # noqa: E402

METHODS = {
    "Gradient": ("vanilla_gradient", {}),
    "SmoothGrad": ("smoothgrad", {"samples": 16}),
    "Integrated Gradients": ("integrated_gradients", {"steps": 32}),
    "Blur IG": ("blur_ig", {"steps": 32}),
    "Guided IG": ("guided_ig", {"steps": 32}),
    "XRAI": ("xrai", {"steps": 16}),
    "Guided Backprop": ("guided_backprop", {}),
    "Occlusion": ("occlusion", {}),
    "Grad-CAM": ("grad_cam", {}),
    "Grad-CAM++": ("grad_cam_plusplus", {}),
    "Ablation-CAM": ("ablation_cam", {}),
    "Finer-CAM": ("finer_cam", {}),
    "Relevance-CAM": ("relevance_cam", {}),
    "Guided Grad-CAM": ("guided_grad_cam", {}),
}


def main(out: Path = Path(__file__).parent / "figures" / "demo.png") -> Path:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_efficientnet_lite0().to(device)
    side = 160
    singles = normalize(photos(side))  # (2, 3, 160, 160): the cat, the coffee
    composite = cat_coffee_composite(side).repeat(2, 1, 1, 1)  # cat left, coffee right; explained for both
    with torch.no_grad():
        labels = model(singles.to(device)).argmax(1).tolist()
    print(f"predicted classes: {labels} (expected {[EGYPTIAN_CAT, ESPRESSO]})")
    maps_square = {}
    maps_wide = {}
    for title, (name, options) in METHODS.items():
        explainer = attribution.create(name, model, **options)
        start = time.perf_counter()
        maps_square[title] = explainer(singles.to(device), [EGYPTIAN_CAT, ESPRESSO]).cpu()
        maps_wide[title] = explainer(composite.to(device), [EGYPTIAN_CAT, ESPRESSO]).cpu()
        print(f"{title:22s} {time.perf_counter() - start:6.2f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_grid(singles, maps_square, mean=IMAGENET_MEAN, std=IMAGENET_STD, cell=1.6,
                    titles=["cat photo, class 'Egyptian cat'", "coffee photo, class 'espresso'"])
    fig.savefig(out, dpi=110, bbox_inches="tight")
    wide = out.with_name(out.stem + "_composite.png")
    fig = plot_grid(composite, maps_wide, mean=IMAGENET_MEAN, std=IMAGENET_STD, rows="methods", cell=1.6,
                    titles=["composite, class 'Egyptian cat'", "composite, class 'espresso'"])
    fig.savefig(wide, dpi=110, bbox_inches="tight")
    print(f"wrote {out} and {wide}")
    return out


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:2]))
