"""Every CAM and gradient method on random-weight timm and torchvision vision transformers, with no reshape written
by the user: the layer output is laid out on the model's own patch grid (class, distillation and register tokens
dropped; channels-last Swin maps permuted), which is checked against the known grid, not just the output shape.

Models are the registry's architectures at small input sizes with fewer blocks (constructor arguments).  Methods
that run one forward per channel (Score-CAM and its variants, Ablation-CAM) run on the same classes built narrower
(fewer channels), so the whole file stays within about a minute on two CPU cores.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import pytest
import torch
from torch import nn

import attribution as A
from attribution.core.layers import default_layer
from attribution.core.spatial import SpatialLayout, spatial_layout
from attribution.utils import get_reshape_transform

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

#: one forward per channel: run on the narrow build of each architecture
PER_CHANNEL = ("score_cam", "ss_cam", "is_cam", "ablation_cam", "vit_cx", "sidu", "poly_cam", "fd_cam", "sise",
               "fusion_cam", "shap_cam")
CHEAP = {"integrated_gradients": {"steps": 4}, "blur_ig": {"steps": 4, "max_sigma": 4.0}, "guided_ig": {"steps": 4},
         "smoothgrad": {"samples": 2}, "adapt_grad": {"samples": 2}, "smooth_taylor": {"samples": 2}, "guided_absolute_grad": {"samples": 2},
         "occlusion": {"window": 16, "stride": 16}, "ss_cam": {"samples": 1},
         # conditional sampler: 16 x 16 patches (256 values) from the two 32 x 32 images' 2 x 17 x 17
         "prediction_difference": {"window": 12, "stride": 10, "num_samples": 2},
         "is_cam": {"steps": 2}, "rise": {"n_masks": 8, "grid": 4}, "xrai": {"steps": 2},
         "opti_cam": {"iterations": 2}, "group_cam": {"groups": 4}, "iba": {"iterations": 2, "samples": 2},
         "expected_gradients": {"samples": 2}, "kernel_shap": {"grid": 2}, "partition_shap": {"max_evals": 20},
         "shapley_sampling": {"grid": 2, "samples": 2}, "moxi": {"grid": 2}, "shap_cam": {"samples": 1},
         "isa": {"group_size": 10 ** 6, "ascent_steps": 2, "descent_steps": 2},
         "geodesic_ig": {"steps": 2, "iterations": 1},
         "lime": {"grid": 2, "samples": 8}, "idg": {"steps": 4}, "idgi": {"steps": 4},
         "sess": {"num_scales": 2}, "agi": {"topk": 2, "max_iter": 2},
         "local_attribution": {"select_num": 2, "max_iter": 2}, "mfaba": {"steps": 4},
         "big": {"attack_steps": 2, "steps": 3}, "ig2": {"steps": 3},
         "attexplore": {"steps": 2, "samples": 2},
         "noise_grad": {"noisy_models": 2},
         "extremal_perturbation": {"iterations": 2}, "meaningful_perturbation": {"iterations": 2},
         "igos": {"iterations": 1, "steps": 2}, "igos_pp": {"iterations": 1, "steps": 2},
         "hsic": {"grid": 4, "n_designs": 8},
         "sobol": {"grid": 2, "n_designs": 4},
         "integrated_grad_cam": {"steps": 2}, "rsi_grad_cam": {"steps": 2}, "iia": {"steps": 2},
         "cameras": {"resolutions": [224]}, "smooth_grad_cam_plusplus": {"samples": 2},
         # random weights: every masked copy's logit may be negative (BEiT's are), or its probability (1000 classes)
         # below the authors' threshold of 0.001: probabilities, none dropped
         "decom_cam": {"components": 3, "score": "softmax", "threshold": 0.0}}  # fixed-size position embeddings: the image's own resolution only
#: methods for CNNs alone (SRD decomposes affine blocks between elementwise activations: layer norms and attention
#: below its layer are refused by name, see test_cnn_only_methods_refuse_token_models)
CNN_ONLY = ("srd",)
METHODS = sorted(n for n in A.list_methods() if A.get_method(n).kind in ("cam", "gradient", "perturbation", "region",
                                                                                 "magnitude") and n not in CNN_ONLY)


def _timm(name: str, **options) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=6, **options).eval()


def _torchvision_vit(narrow: bool) -> nn.Module:
    torch.manual_seed(0)
    if narrow:
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=6)
    else:
        model = torchvision.models.vit_b_16(image_size=32, num_classes=6)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts the head at zero: no gradients at all
    return model.eval()


def _torchvision_swin(narrow: bool) -> nn.Module:
    torch.manual_seed(0)
    if narrow:
        return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1],
                                                  num_heads=[1, 1, 1, 1], window_size=[7, 7], num_classes=6).eval()
    return torchvision.models.swin_t(num_classes=6).eval()


@dataclass(frozen=True)
class Spec:
    build: Callable[[bool], nn.Module]  # narrow -> model
    size: Tuple[int, int]
    layer: str  # the default layer
    layout: SpatialLayout  # how its output is laid out
    narrow_layer: Optional[str] = None  # the narrow build's default layer, when it differs


def vit(name: str, size, depth: int, **options) -> Callable[[bool], nn.Module]:
    def build(narrow: bool) -> nn.Module:
        width = {"embed_dim": 32, "num_heads": 2} if narrow else {}
        return _timm(name, img_size=size, depth=depth, **width, **options)

    return build


def swin(narrow: bool) -> nn.Module:
    width = {"embed_dim": 16, "num_heads": (1, 1, 1, 1)} if narrow else {}
    return _timm("swin_tiny_patch4_window7_224", img_size=64, depths=(1, 1, 1, 1), **width)


SPECS = {
    "vit_small_patch16_224": Spec(vit("vit_small_patch16_224", 64, 4), (64, 64), "blocks.2.norm1",
                                  SpatialLayout("tokens", 4, 4, 1)),
    # dynamic_img_size: SESS hands the model square windows of the non-square image
    "vit_small_patch16_224@48x80": Spec(vit("vit_small_patch16_224", (48, 80), 4, dynamic_img_size=True), (48, 80),
                                        "blocks.2.norm1", SpatialLayout("tokens", 3, 5, 1)),
    "deit_small_distilled_patch16_224": Spec(vit("deit_small_distilled_patch16_224", 64, 4), (64, 64),
                                             "blocks.2.norm1", SpatialLayout("tokens", 4, 4, 2)),
    "vit_small_patch14_reg4_dinov2@42x70": Spec(vit("vit_small_patch14_reg4_dinov2", (42, 70), 4,
                                                    dynamic_img_size=True), (42, 70), "blocks.2.norm1",
                                                SpatialLayout("tokens", 3, 5, 5)),
    "beit_base_patch16_224": Spec(vit("beit_base_patch16_224", 64, 2), (64, 64), "blocks.1",
                                  SpatialLayout("tokens", 4, 4, 1)),
    "eva02_tiny_patch14_224": Spec(vit("eva02_tiny_patch14_224", 56, 2), (56, 56), "blocks.1",
                                   SpatialLayout("tokens", 4, 4, 1)),
    "swin_tiny_patch4_window7_224": Spec(swin, (64, 64), "norm", SpatialLayout("nhwc", 2, 2)),
    "torchvision.vit_b_16": Spec(_torchvision_vit, (32, 32), "encoder.layers.encoder_layer_6.ln_1",
                                 SpatialLayout("tokens", 2, 2, 1), "encoder.layers.encoder_layer_1.ln_1"),
    "torchvision.swin_t": Spec(_torchvision_swin, (64, 64), "permute", SpatialLayout("nchw", 2, 2)),
}


@functools.lru_cache(maxsize=None)
def model_for(spec: str, narrow: bool) -> nn.Module:
    return SPECS[spec].build(narrow)


def images(spec: str, count: int = 2) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(count, 3, *SPECS[spec].size)


def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured[-1]


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_default_layer_and_the_grid_it_is_laid_out_on(spec, narrow):
    model, x = model_for(spec, narrow), images(spec, 1)
    expected = (SPECS[spec].narrow_layer if narrow else None) or SPECS[spec].layer
    assert default_layer(model, x) == expected
    output = layer_output(model, expected, x)
    layer = dict(model.named_modules())[expected]
    assert spatial_layout(model, x.shape[-2:], output.shape, expected, layer) == SPECS[spec].layout


@pytest.mark.parametrize("pool, expected", [("avg", "blocks"), ("token", "blocks.2.norm1")])
def test_default_layer_of_a_zero_head_follows_the_pooling(pool, expected):
    """A head initialised to zeros (torchvision's ViT is built that way) makes every gradient of the outputs zero:
    whether the patch tokens reach the output is then read at the head's input, so a ViT that averages its patch
    tokens keeps the general rule (it got the class-token models' middle block)."""
    model = _timm("vit_small_patch16_224", img_size=64, depth=4, embed_dim=32, num_heads=2, global_pool=pool)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert default_layer(model, x) == expected
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    assert default_layer(model, x) == expected


def hand_written(layout: SpatialLayout):
    """The reshape a user would write knowing the model: the seed's helper with the prefix and grid spelled out."""
    if layout.kind == "nhwc":
        return get_reshape_transform(has_cls_token=False)
    if layout.kind == "nchw":
        return lambda t: t
    return get_reshape_transform(prefix_tokens=layout.prefix, grid=(layout.height, layout.width))


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_automatic_layout_equals_the_hand_written_reshape(spec):
    model, x = model_for(spec, False), images(spec)
    layer, layout = SPECS[spec].layer, SPECS[spec].layout
    auto = A.HiResCAM(model)(x, [1, 2])
    by_hand = A.HiResCAM(model, layer, reshape_transform=hand_written(layout))(x, [1, 2])
    torch.testing.assert_close(auto, by_hand)
    assert auto.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:GuidedBackProp found no ReLU-family activation")
@pytest.mark.filterwarnings("ignore:Deconvnet found no ReLU-family activation")
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("spec", sorted(SPECS))
def test_every_method_runs_without_a_user_reshape(spec, name):
    narrow = name in PER_CHANNEL
    model, x = model_for(spec, narrow), images(spec)
    out = A.create(name, model, **CHEAP.get(name, {}))(x, [1, 2])
    kind = A.get_method(name).kind
    expected = x.shape if kind == "gradient" else (2, 1) + x.shape[2:]
    assert out.shape == expected and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # one image's rectified map may be 0 on random weights; FEM's k-sigma threshold cannot be passed on a 2x2 grid
    # (the largest z-score of 4 values is sqrt(3) < 2), the Swins' last stage here
    assert out.abs().sum() > 0 or (name == "fem" and SPECS[spec].layout.height * SPECS[spec].layout.width <= 4)


@pytest.mark.parametrize("name", CNN_ONLY)
@pytest.mark.parametrize("spec", ["vit_small_patch16_224", "torchvision.vit_b_16"])
def test_cnn_only_methods_refuse_token_models(spec, name):
    with pytest.raises(ValueError, match="norm|attention"):
        A.create(name, model_for(spec, False))(images(spec), [1, 2])


def test_ablation_cam_ablates_one_channel_of_every_patch_token():
    """Reference: a forward hook zeroes feature k of the patch tokens (the class token is not part of the map and
    keeps its value); w_k = (y - y_k) / y; map = ReLU(sum_k w_k A_k) on the 4x4 patch grid."""
    import torch.nn.functional as F

    from conftest import tiny_vit

    model = tiny_vit()
    torch.manual_seed(5)
    x, classes = torch.randn(2, 3, 16, 16), [1, 3]
    rows = torch.arange(2)
    with torch.no_grad():
        clean = model(x)[rows, classes]
        drops = []
        for k in range(24):
            def ablate(module, inputs, output, k=k):
                output = output.clone()
                output[:, 1:, k] = 0
                return output

            handle = model.blocks[0].register_forward_hook(ablate)
            drops.append(model(x)[rows, classes])
            handle.remove()
        weights = (clean[:, None] - torch.stack(drops, 1)) / clean[:, None]
        acts = layer_output(model, "blocks.0", x)[:, 1:].transpose(1, 2).reshape(2, 24, 4, 4)
        expected = F.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
        expected = F.interpolate(expected, size=(16, 16), mode="bilinear", align_corners=False)
    for use_tail, mode in ((True, "tail"), (False, "full")):
        explainer = A.AblationCAM(model, "blocks.0", use_tail=use_tail)
        torch.testing.assert_close(explainer(x, classes), expected, rtol=1e-4, atol=1e-5)
        assert explainer.last_mode == mode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted((set(A.list_methods("cam")) | {"guided_grad_cam"}) - set(CNN_ONLY)))
def test_cams_on_token_models_on_cuda_match_cpu(name):
    from conftest import tiny_vit

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    options = {"ss_cam": {"samples": 2, "std": 0.0}, "is_cam": {"steps": 2}, "vit_cx": {"noise": 0.0}}.get(name, {})
    cpu = A.create(name, tiny_vit(), **options)(x, [0, 1])
    gpu = A.create(name, tiny_vit().cuda(), **options)(x.cuda(), [0, 1])
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4)
