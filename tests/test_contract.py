"""The call contract, checked for every registered method (a table, so each new method is covered for free)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attribution
from attribution import create, list_methods
from conftest import tiny_cnn, tiny_vit

#: options that keep each method cheap here; every registered method must appear (see test_every_method_is_listed)
FAST = {
    "vanilla_gradient": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 8},
    "blur_ig": {"steps": 6, "max_sigma": 4.0},
    "guided_ig": {"steps": 6},
    "geodesic_ig": {"steps": 4, "iterations": 2, "generator": torch.Generator().manual_seed(0)},
    "idgi": {"steps": 6},
    "idg": {"steps": 6},
    "forgrad": {"sigma": 4},
    "expected_gradients": {"samples": 6, "generator": torch.Generator().manual_seed(0)},  # reference sets: its tests
    "deeplift": {},
    "lrp": {},
    "crp": {},
    "attn_lrp": {},
    "mfaba": {"steps": 4},
    "isa": {"group_size": 256, "ascent_steps": 2, "descent_steps": 2, "generator": torch.Generator().manual_seed(0)},
    "agi": {"topk": 2, "max_iter": 3},
    "local_attribution": {"select_num": 3, "max_iter": 2, "generator": torch.Generator().manual_seed(0)},
    "big": {"attack_steps": 3, "steps": 4},
    "attexplore": {"steps": 3, "samples": 2, "generator": torch.Generator().manual_seed(0)},
    "ig2": {"steps": 4},
    "deeplift_shap": {},
    "xrai": {"steps": 4},
    "guided_backprop": {},
    "deconvnet": {},
    "rect_grad": {},
    "smoothgrad": {"samples": 3},
    "guided_absolute_grad": {"samples": 3},
    "adapt_grad": {"samples": 3},
    "smooth_taylor": {"samples": 3, "generator": torch.Generator().manual_seed(0)},
    "noise_grad": {"noisy_models": 2},
    "occlusion": {"window": 4, "stride": 4},
    "hipe": {},
    # the gain map (differentiable); the default rank map's order flips between near-ties of the flat toy net in bf16
    "moxi": {"grid": 3, "heatmap": "gain"},
    "rise": {"n_masks": 24, "grid": 4, "generator": torch.Generator().manual_seed(0)},
    # three whole levels of the tree: no best-first choices that float32 rounding could flip
    "partition_shap": {"max_evals": 44, "evals_per_step": 64},
    "kernel_shap": {"grid": 3, "samples": 30, "generator": torch.Generator().manual_seed(0)},
    "lime": {"grid": 3, "samples": 30, "generator": torch.Generator().manual_seed(0)},
    "shapley_sampling": {"grid": 3, "samples": 3, "generator": torch.Generator().manual_seed(0)},
    "hsic": {"grid": 4, "n_designs": 32, "generator": torch.Generator().manual_seed(0)},
    # the indices are squared differences of nearly equal scores: coarser designs magnify float32/bf16 noise past
    # the shared tolerances (grid 3 with 8 designs: batch_size check 2.9x over, bf16 correlation 0.84)
    "sobol": {"grid": 2, "n_designs": 64, "generator": torch.Generator().manual_seed(0)},
    "extremal_perturbation": {"iterations": 3},
    # the circle start picks a disk by a 1 % threshold on probabilities that the random toy net barely moves (0.2189
    # against 0.2195): float32 and float64 pick different disks, so the shared invariants start from the whole image
    "meaningful_perturbation": {"iterations": 3, "mask_scale": 4, "init": "ones",
                                "generator": torch.Generator().manual_seed(0)},
    # the toy net's softmax is nearly flat (0.17-0.22): with the authors' regulariser weights the masks never move
    "igos": {"iterations": 2, "steps": 3, "mask_size": 8, "l1_coeff": 3e-4, "tv_coeff": 3e-3,
             "generator": torch.Generator().manual_seed(0)},
    "igos_pp": {"iterations": 2, "steps": 3, "mask_size": 8, "l1_coeff": 3e-4, "tv_coeff": 3e-3,
                "generator": torch.Generator().manual_seed(0)},
    "attention_rollout": {},
    "attention_flow": {},
    "generic_attention": {},
    "grad_sam": {},
    "ag_cam": {},
    "raw_attention": {},
    "beyond_intuition": {"steps": 3, "start_block": 0},
    "attcat": {},
    "legrad": {},
    "transformer_attribution": {},
    "tis": {"n_masks": 8, "generator": torch.Generator().manual_seed(0)},
    "atman": {},
    "value_zeroing": {},
    "alti": {},
    "attention_norm": {},
    "globenc": {},
    "decompx": {},
    "token_tm": {},
    "tam": {"steps": 3, "start_block": 0},
    # CAMs: the default layer of tiny_cnn is its last ReLU ("5", 16 channels at 8x8)
    "grad_cam": {},
    "hires_cam": {},
    "grad_cam_elementwise": {},
    "grad_cam_plusplus": {},
    "xgrad_cam": {},
    "layer_cam": {},
    "bag_cam": {},
    "eigen_cam": {},
    "eigen_grad_cam": {},
    "seg_eigen_cam": {},
    "kpca_cam": {},
    "decom_cam": {"components": 3},
    "fusion_cam": {},
    "score_cam": {},
    "ss_cam": {"samples": 1},
    "is_cam": {"steps": 2},
    "integrated_grad_cam": {"steps": 3},
    "rsi_grad_cam": {"steps": 3},
    "expected_grad_cam": {"samples": 2, "generator": torch.Generator().manual_seed(0)},
    "ablation_cam": {},
    "shap_cam": {"samples": 2, "generator": torch.Generator().manual_seed(0)},
    "fd_cam": {},
    "cf_cam": {},
    "recipro_cam": {},
    "lift_cam": {},
    "excitation_backprop": {},
    "relevance_cam": {},
    "norm_grad": {},
    "poly_cam": {},
    "sise": {},
    "sidu": {"threshold": 0.0},  # the toy net's activations stay below the authors' 0.5
    "cameras": {},
    "smooth_grad_cam_plusplus": {"samples": 2, "generator": torch.Generator().manual_seed(0)},
    "opti_cam": {"iterations": 5},
    # statistics from fixed references: the default (the batch itself) makes a map depend on the other images
    "iba": {"iterations": 3, "samples": 2, "generator": torch.Generator().manual_seed(0),
            "references": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))},
    # samples from fixed references (the default, the batch itself, makes a map depend on the other images); wide
    # windows and references: the evidence (bits) then stands above the model's float32 noise (channels_last);
    # padding 1: the conditional sampler's 10 x 10 patches (100 values) from 3 x 49 patches of the references
    "prediction_difference": {"window": 8, "stride": 4, "padding": 1, "generator": torch.Generator().manual_seed(0),
                              "references": 4 * torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))},
    "group_cam": {"groups": 4},
    "fullgrad": {},
    "fem": {},
    "shapley_cam": {},
    "finer_cam": {},
    "refine_cam": {},
    "sess": {"num_scales": 2},
    "random_cam": {},
    "vit_cx": {"generator": torch.Generator().manual_seed(0)},
    "guided_grad_cam": {},
    "combined": {},
    "libragrad": {},
    "srd": {},
    "grad_rollout": {},
    "iia": {"steps": 2},
    "mda": {"subsearch": 2, "blur": 31, "step": 64, "base_options": {"steps": 3, "start_block": 0}},
}
#: gradient methods whose rules change only transformer parts (on a ReLU CNN they are their wrapped method): checked
#: on the tiny ViT, as the attention methods
ON_VIT = {"libragrad"}
#: methods that need class indices (``needs_class_indices``: their paths leave the target class, or step towards
#: other classes): a callable target gets a clear error
NEEDS_CLASSES = {name for name in list_methods() if attribution.get_method(name).needs_class_indices}
#: options replacing FAST's where those are sized for the 16x16 toy images (the 32x32 ResNet check)
RESNET_SIZED = {"iba": {"references": None}, "prediction_difference": {"references": None}}
#: methods with random draws: their batch/batch_size checks run with the noise turned off
#: (Guided AbsoluteGrad without noise has zero variance, so its guide zeroes the map: the guide is turned off too)
RANDOM = {"smoothgrad": {"std": 0.0}, "isa": {"sigma": 0.0}, "igos": {"noise": 0.0}, "igos_pp": {"noise": 0.0}, "adapt_grad": {"confidence": 1.0}, "guided_absolute_grad": {"std": 0.0, "percentile": None}, "attexplore": {"sigma": 0.0, "rho": 0.0, "diversity_prob": 0.0}, "noise_grad": {"weight_std": 0.0}, "smooth_grad_cam_plusplus": {"std": 0.0}, "ss_cam": {"std": 0.0}, "random_cam": {"seed": 2}, "vit_cx": {"noise": 0.0}}
#: bf16 agreement floors below the default 0.9: Score-CAM-family weights are differences of the target's softmax
#: probability between masked copies, about 1e-3 apart on this random net, which bf16's 8-bit mantissa blurs
#: (the same holds with the bf16-rounded weights run in float32, so it is the model's precision, not ours)
#: Group-CAM's group scores are such differences too, about 1e-4 here (unveiled copies against a blurred image
#: that is nearly constant at 16x16): bf16 keeps 0.44 of the correlation, the bf16-rounded weights run in float32
#: 0.9999
#: AttCAT sums gradient x token over the channels, terms that mostly cancel (1e-5 left of them on the tiny ViT):
#: bf16 tokens and gradients keep 0.73 of the correlation, bf16-rounded weights run in float32 0.99999
#: AtMan's relevances are differences of the target's log-probability between forwards, about 3e-4 on the tiny ViT,
#: below bf16's resolution of the logits: bf16 keeps 0.2-0.33 of the correlation, bf16-rounded weights run in float32
#: 0.99999 (computing the manipulated softmax in float32 does not help: the noise is the model's)
#: Value Zeroing's distances are cosine distances between a block's outputs with and without one token's values,
#: a median of 5e-7 on the tiny ViT (its residual stream dominates the outputs): relative changes of about 1e-3,
#: below bf16's resolution (4e-3): bf16 keeps 0.63 of the correlation
BF16_CORR = {"score_cam": 0.7, "ss_cam": 0.7, "is_cam": 0.7, "group_cam": 0.3, "attcat": 0.6, "atman": 0.1,
             "value_zeroing": 0.5}
METHODS = list_methods()


def toy_model(name: str, inplace: bool = False) -> nn.Module:
    """The toy model each method is checked on: a tiny ViT for attention methods, a tiny CNN for the rest."""
    if attribution.get_method(name).kind == "attention" or name in ON_VIT:
        return tiny_vit()
    return tiny_cnn(inplace=inplace)


@pytest.fixture
def cnn(request) -> nn.Module:
    """Overrides conftest's: the toy model that suits the test's method."""
    callspec = getattr(request.node, "callspec", None)
    return toy_model(callspec.params["name"]) if callspec and "name" in callspec.params else tiny_cnn()


def explain(name: str, model: nn.Module, x: torch.Tensor, target=None, **options) -> torch.Tensor:
    """The method's map with the table's options; a generator in the table gives the same draws on every call."""
    fast = {key: torch.Generator().manual_seed(value.initial_seed()) if isinstance(value, torch.Generator) else value
            for key, value in FAST[name].items()}
    return create(name, model, **fast)(x, target, **options)


def test_every_method_is_listed():
    assert set(METHODS) == set(FAST), "add new methods to FAST so the shared invariants cover them"


@pytest.mark.parametrize("name", METHODS)
def test_shape_dtype_and_finiteness(name, cnn, images):
    out = explain(name, cnn, images, [0, 1, 2])
    kind = attribution.get_method(name).kind
    expected = images.shape if kind == "gradient" else (images.shape[0], 1) + images.shape[2:]
    assert out.shape == expected and out.dtype == torch.float32 and out.device == images.device
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("name", METHODS)
def test_batch_independence(name, cnn, images):
    """Image i's attribution in a batch equals its attribution alone."""
    options = RANDOM.get(name, {})
    batch = explain(name, cnn, images, [3, 1, 4], **options)
    for i, t in enumerate([3, 1, 4]):
        alone = explain(name, cnn, images[i:i + 1], t, **options)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_batch_size_independence(name, cnn, images):
    options = RANDOM.get(name, {})
    reference = explain(name, cnn, images, [0, 1, 2], batch_size=1, **options)
    for batch_size in (2, 7, None):
        out = explain(name, cnn, images, [0, 1, 2], batch_size=batch_size, **options)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_target_forms_agree(name, cnn, images):
    """None (arg-max), a list, a LongTensor and a callable picking the same classes give the same maps."""
    options = RANDOM.get(name, {})
    classes = cnn(images).argmax(1)
    by_none = explain(name, cnn, images, None, **options)
    by_list = explain(name, cnn, images, classes.tolist(), **options)
    by_tensor = explain(name, cnn, images, classes, **options)
    if name in NEEDS_CLASSES:
        for objective in (lambda s: s.max(dim=1).values, lambda s, owner: s[:, 0]):
            with pytest.raises(ValueError, match="class indices"):
                explain(name, cnn, images, objective, **options)
        for other in (by_list, by_tensor):
            torch.testing.assert_close(other, by_none)
        return
    by_callable = explain(name, cnn, images, lambda s: s.max(dim=1).values, **options)
    by_owners = explain(name, cnn, images, lambda s, owner: s.gather(1, classes[owner, None])[:, 0], **options)
    for other in (by_list, by_tensor, by_owners):
        torch.testing.assert_close(other, by_none)
    if attribution.get_method(name).kind == "gradient" and name not in ("integrated_gradients", "blur_ig", "guided_ig",
                                                                                  "geodesic_ig"):
        torch.testing.assert_close(by_callable, by_none)  # at the image itself, max score = arg-max class score


def snapshot(model: nn.Module):
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "modules": [(n, m) for n, m in model.named_modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for (g0, v0), (g1, _) in zip(before["grad"], after["grad"]):
        assert g1 is g0 and (g0 is None or torch.equal(g1, v0))
    assert all(a[0] == b[0] and a[1] is b[1] for a, b in zip(after["modules"], before["modules"]))
    assert len(after["modules"]) == len(before["modules"])
    assert after["hooks"] == before["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def odd_state_model(name: str) -> nn.Module:
    """A model in train mode, with dropout (and batch norm), one frozen layer, a stale .grad and a user's hook."""
    if attribution.get_method(name).kind == "attention":
        model = tiny_vit()
        model.pos_drop.p = 0.5
        first, last, hooked = model.patch_embed.proj, model.head, model.blocks[0]
    else:
        model = tiny_cnn(inplace=True)
        model.insert(1, nn.BatchNorm2d(8))
        model.insert(-1, nn.Dropout(0.5))
        first, last, hooked = model[0], model[-1], model[2]
    model.train()
    first.weight.requires_grad_(False)
    last.weight.grad = torch.ones_like(last.weight)
    hooked.register_forward_hook(lambda *a: None)
    return model


@pytest.mark.parametrize("name", METHODS)
def test_model_left_as_found(name, images):
    model = odd_state_model(name)
    before = snapshot(model)
    explain(name, model, images, [0, 1, 2])
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", METHODS)
def test_model_left_as_found_when_target_raises(name, images):
    model = odd_state_model(name)
    before = snapshot(model)

    def broken(scores):
        raise RuntimeError("objective failed")

    with pytest.raises(ValueError if name in NEEDS_CLASSES else RuntimeError,
                       match="class indices" if name in NEEDS_CLASSES else "objective failed"):
        explain(name, model, images, broken)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", METHODS)
def test_runs_in_eval_mode_whatever_the_model_flag(name, cnn, images):
    """Dropout and batch norm behave as in eval mode during the call, so results do not depend on the flag."""
    model = odd_state_model(name)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    options = RANDOM.get(name, {})
    in_eval = explain(name, model, images, [0, 1, 2], **options)
    model.train()
    in_train = explain(name, model, images, [0, 1, 2], **options)
    torch.testing.assert_close(in_eval, in_train)


@pytest.mark.parametrize("name", METHODS)
def test_outer_no_grad_and_inference_mode(name, cnn, images):
    options = RANDOM.get(name, {})
    reference = explain(name, cnn, images, [0, 1, 2], **options)
    with torch.no_grad():
        torch.testing.assert_close(explain(name, cnn, images, [0, 1, 2], **options), reference)
    with torch.inference_mode():
        frozen = images.clone()
        torch.testing.assert_close(explain(name, cnn, frozen, [0, 1, 2], **options), reference)


@pytest.mark.parametrize("name", METHODS)
def test_float64_in_float64_out(name, images):
    model = toy_model(name).double()
    out = explain(name, model, images.double(), [0, 1, 2], **RANDOM.get(name, {}))
    assert out.dtype == torch.float64
    reference = explain(name, toy_model(name), images, [0, 1, 2], **RANDOM.get(name, {}))
    torch.testing.assert_close(out.float(), reference, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_bfloat16_model_accumulates_in_float32(name, images):
    model = toy_model(name).to(torch.bfloat16)
    out = explain(name, model, images, [0, 1, 2], **RANDOM.get(name, {}))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    reference = explain(name, toy_model(name), images, [0, 1, 2], **RANDOM.get(name, {}))
    corr = torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1]
    assert corr > BF16_CORR.get(name, 0.9)


@pytest.mark.parametrize("name", METHODS)
def test_amp_runs_the_model_in_bfloat16_and_sums_in_float32(name, cnn, images):
    """amp=True: autocast around the model's passes only; the float32 model and input stay as they are."""
    seen = []
    hook = cnn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        out = explain(name, cnn, images, [0, 1, 2], amp=True, **RANDOM.get(name, {}))
    finally:
        hook.remove()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    reference = explain(name, cnn, images, [0, 1, 2], **RANDOM.get(name, {}))
    corr = torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1]
    assert corr > BF16_CORR.get(name, 0.9)
    with pytest.raises(ValueError, match="amp must be"):
        explain(name, cnn, images, 0, amp="fp8")


@pytest.mark.parametrize("name", METHODS)
def test_channels_last_feeds_the_model_channels_last_and_changes_no_map(name, cnn, images):
    """channels_last=True: the model sees channels-last inputs; the map is the default's, contiguous."""
    formats = []
    hook = cnn.register_forward_pre_hook(
        lambda m, args: formats.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        out = explain(name, cnn, images, [0, 1, 2], channels_last=True, **RANDOM.get(name, {}))
    finally:
        hook.remove()
    assert formats and all(formats)
    assert out.is_contiguous()
    reference = explain(name, cnn, images, [0, 1, 2], **RANDOM.get(name, {}))
    if name == "guided_ig":  # its path ranks pixels by |gradient|: a rounding difference can swap near-ties
        assert torch.corrcoef(torch.stack([out.flatten(), reference.flatten()]))[0, 1] > 0.99
    else:
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()) + 1e-7)
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        explain(name, cnn, images, 0, channels_last="yes")


@pytest.mark.parametrize("name", METHODS)
def test_inplace_relu_resnet(name):
    """torchvision ResNets use ReLU(inplace=True); every method must run on them and agree with out-of-place ReLUs."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    if attribution.get_method(name).kind == "attention":  # torchvision's ViT: nn.MultiheadAttention, in-place-free
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=7).eval()
    else:
        model = torchvision.models.resnet18(num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    options = {**RANDOM.get(name, {}), **RESNET_SIZED.get(name, {})}
    inplace = explain(name, model, x, [1, 2], **options)
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    torch.testing.assert_close(explain(name, model, x, [1, 2], **options), inplace, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_create_graph_differentiable_wrt_parameters(name, cnn, images):
    out = explain(name, cnn, images, [0, 1, 2], create_graph=True, **RANDOM.get(name, {}))
    assert out.requires_grad
    grads = torch.autograd.grad(out.square().sum(), [p for p in cnn.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = explain(name, cnn, images, [0, 1, 2], **RANDOM.get(name, {}))
    assert not plain.requires_grad
    torch.testing.assert_close(out.detach(), plain)


# ------------------------------------------------------------------------------------------------------ CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("name", METHODS)
def test_cuda_matches_cpu(name, cnn, images):
    """On CUDA with the memory-aware default batch size (the probe path) the maps equal the CPU's."""
    options = RANDOM.get(name, {})
    cpu = explain(name, cnn, images, [0, 1, 2], **options)
    gpu = explain(name, cnn.cuda(), images.cuda(), torch.tensor([0, 1, 2]), **options)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-4 * float(cpu.abs().max()) + 1e-7)


@needs_cuda
@pytest.mark.parametrize("name", METHODS)
def test_cuda_half_model(name, cnn, images):
    """An fp16 model on CUDA with float32 input: float32 maps that agree with the float32 model's."""
    options = RANDOM.get(name, {})
    reference = explain(name, cnn, images, [0, 1, 2], **options)
    out = explain(name, cnn.cuda().half(), images.cuda(), [0, 1, 2], **options)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    corr = torch.corrcoef(torch.stack([out.cpu().flatten(), reference.flatten()]))[0, 1]
    assert corr > BF16_CORR.get(name, 0.9)


@needs_cuda
def test_cuda_input_on_another_device_is_named(images):
    with pytest.raises(ValueError, match="x is on cpu but the model is on cuda"):
        attribution.VanillaGradient(tiny_cnn().cuda())(images, 0)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", METHODS)
def test_bad_input_errors_name_the_problem(name, cnn, images):
    explainer = create(name, cnn, **FAST[name])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explainer(images[0], 0)
    with pytest.raises(ValueError, match="4 channels but the model's first convolution expects 3"):
        explainer(torch.randn(2, 4, 16, 16), 0)
    with pytest.raises(ValueError, match="target class 9 is out of range for a model with 5 outputs"):
        explainer(images, 9)
    with pytest.raises(ValueError, match="out of range"):
        explainer(images, [0, -1, 2])
    with pytest.raises(ValueError, match="2 class indices but the input has 3 images"):
        explainer(images, [0, 1])
    with pytest.raises(TypeError, match="integer class indices"):
        explainer(images, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="unknown option 'batchsize'.*'batch_size'"):
        explainer(images, 0, batchsize=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        explainer(images, 0, batch_size=0)
    with pytest.raises(ValueError, match="score must be one of"):
        explainer(images, 0, score="probability")
    if "target_layer" in explainer.option_names():
        with pytest.raises(ValueError, match=r"no layer named '4x'; closest names: .*\b4\b"):
            explainer(images, 0, target_layer="4x")


def test_wrong_device_is_named(images):
    meta = tiny_cnn().to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the model is on meta"):
        attribution.VanillaGradient(meta)(images, 0)


def test_model_must_return_scores(images):
    with pytest.raises(ValueError, match=r"must return scores of shape \(B, K\)"):
        attribution.VanillaGradient(nn.Conv2d(3, 2, 3))(images, 0)


def test_unknown_option_at_construction(cnn):
    with pytest.raises(TypeError, match="unknown option 'step'.*'steps'"):
        attribution.IntegratedGradients(cnn, step=3)


def test_callable_target_must_return_one_score_per_row(cnn, images):
    with pytest.raises(ValueError, match=r"one score per row, shape \(3,\)"):
        attribution.VanillaGradient(cnn)(images, lambda s: s)


def test_options_per_call_win_over_construction(cnn, images):
    explainer = attribution.IntegratedGradients(cnn, steps=4)
    torch.testing.assert_close(
        explainer(images, 0, steps=9), attribution.IntegratedGradients(cnn)(images, 0, steps=9)
    )
    assert not torch.allclose(explainer(images, 0), explainer(images, 0, steps=9))


def test_registry_create_and_errors(cnn):
    assert isinstance(attribution.create("integrated_gradients", cnn), attribution.IntegratedGradients)
    assert "occlusion" in attribution.list_methods("perturbation")
    assert "occlusion" not in attribution.list_methods("gradient")
    with pytest.raises(KeyError, match="did you mean 'integrated_gradients'"):
        attribution.create("integrated_gradient", cnn)


@pytest.mark.parametrize("name", ["vanilla_gradient", "integrated_gradients", "smoothgrad", "grad_cam",
                                  "score_cam", "rise", "shapley_cam", "geodesic_ig"])
def test_create_graph_on_a_vit_with_fused_attention(name, images):
    """Fused attention kernels have no second derivative: create_graph's passes (and the methods that differentiate
    twice) run attention with its math kernel, so maps of a timm ViT on its fused path can be trained through (the
    maps equal the fused kernel's up to its rounding, which Score-CAM's probability differences magnify to 1e-3)."""
    model = tiny_vit(fused=True)
    out = explain(name, model, images, [0, 1, 2], create_graph=True, **RANDOM.get(name, {}))
    grads = torch.autograd.grad(out.square().sum(), [p for p in model.parameters()], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = explain(name, model, images, [0, 1, 2], **RANDOM.get(name, {}))
    torch.testing.assert_close(out.detach(), plain, rtol=1e-3, atol=1e-3 * float(plain.abs().max()) + 1e-8)


# ------------------------------------------------------------------------------------- core contract (review)
class HeadFirst(nn.Module):
    """Registers its head before its stem: the first registered convolution is not the first one run."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 5, 1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x))).mean(dim=(2, 3))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net(x), None


def test_a_model_that_registers_its_head_first_is_explained():
    x = torch.randn(2, 3, 8, 8)
    assert attribution.VanillaGradient(HeadFirst())(x, 1).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="4 channels but the model's first convolution expects 8"):
        attribution.VanillaGradient(HeadFirst())(torch.randn(2, 4, 8, 8), 1)


@pytest.mark.parametrize("target", [1, None])
def test_a_model_returning_a_tuple_gets_a_type_error_naming_it(target, images):
    with pytest.raises(TypeError, match="tuple"):
        attribution.VanillaGradient(TupleOut())(images, target)


def test_a_module_objective_is_called_with_the_scores_alone(cnn, images):
    class Objective(nn.Module):
        def forward(self, scores):
            return scores[:, 1]

    explainer = attribution.VanillaGradient(cnn)
    torch.testing.assert_close(explainer(images, Objective()), explainer(images, 1))


@pytest.mark.parametrize("name, options", [("smoothgrad", {"method": "geodesic_ig", "samples": 1}),
                                           ("combined", {"cam_method": "shapley_cam"}),
                                           ("sess", {"base_method": "shapley_cam", "num_scales": 1})])
def test_methods_running_a_twice_differentiating_method_on_a_fused_vit(name, options):
    """The inner method's needs_second_derivative reaches the outer call (the fused kernels have no second
    derivative)."""
    model = tiny_vit(fused=True, global_pool="token")
    inner = {"steps": 2, "iterations": 1} if name == "smoothgrad" else {}
    maps = create(name, model, **options)(torch.randn(1, 3, 16, 16), 1, **inner)
    assert torch.isfinite(maps).all()


def test_numpy_class_indices_are_targets(cnn, images):
    """NumPy integers and integer arrays (numpy's argmax) are class indices like ints and LongTensors."""
    import numpy as np

    explainer = attribution.VanillaGradient(cnn)
    expected = explainer(images, [1, 2, 0])
    torch.testing.assert_close(explainer(images, np.array([1, 2, 0])), expected)
    torch.testing.assert_close(explainer(images, [np.int64(1), np.int32(2), 0]), expected)
    torch.testing.assert_close(explainer(images, np.int64(2)), explainer(images, 2))
    with pytest.raises(TypeError, match="bool"):
        explainer(images, np.bool_(True))
    with pytest.raises(TypeError, match="integer class indices"):
        explainer(images, np.array([0.5, 1.0, 2.0]))
