"""Benchmark: every registered method against the bare cost of the model passes it needs, and against its peers.

For each model and method this measures, in one process and on one device:

* the *floor*: the bare model passes the method cannot avoid (forwards, or forwards plus the gradient w.r.t. the
  input), with the same number of rows and the same rows per pass as the method actually used;
* the method's own time, its ratio to the floor, and its peak memory next to the floor's (CUDA: max allocated
  above the start; CPU: the process's peak RSS, which includes the model and the Python runtime);
* where installed, Captum's time for the same work (and pytorch-grad-cam's for CAMs).

Times are medians over repeats after a warm-up, with ``torch.cuda.synchronize()`` around timed regions.
Not a test: nothing here asserts a timing.  Usage::

    python benchmarks/bench.py --quick                  # < 2 minutes on a 2-core CPU
    python benchmarks/bench.py --device cuda --batch 32 --json results.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import attribution
from attribution.core import batching
from attribution.utils import get_reshape_transform

# ------------------------------------------------------------------------------------------------ measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one run of ``fn`` in MiB: CUDA max allocated above the start, or the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux)
            f.write("5")
    fn()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RowsSeen:
    """Records the largest number of rows a method put through one pass (its internal batch size)."""

    def __enter__(self) -> "RowsSeen":
        self.rows = 0
        self.original = batching.RowPlanner.__iter__
        seen = self

        def spy(planner):
            for start, stop in seen.original(planner):
                seen.rows = max(seen.rows, stop - start)
                yield start, stop

        batching.RowPlanner.__iter__ = spy
        return self

    def __exit__(self, *exc) -> None:
        batching.RowPlanner.__iter__ = self.original


# ------------------------------------------------------------------------------------------------------ floors


def input_gradient_passes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, rows: int, chunk: int,
                          gradients: int = 1) -> None:
    """``rows`` rows (copies of x) through forward + gradient w.r.t. the input (``gradients`` of them, of
    different scores, from the one forward), ``chunk`` rows per pass."""
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        index = torch.arange(done, done + n, device=x.device) % x.shape[0]
        batch = x[index].detach().requires_grad_(True)
        out = model(batch)
        for _ in range(gradients - 1):  # other scores' gradients first, keeping the graph
            torch.autograd.grad(out.square().sum(), batch, retain_graph=True)
        torch.autograd.grad(out.gather(1, target[index, None]).sum(), batch)
        done += n


def forward_passes(model: nn.Module, x: torch.Tensor, rows: int, chunk: int) -> None:
    """``rows`` rows through forwards without autograd, ``chunk`` rows per pass."""
    with torch.inference_mode():
        done = 0
        while done < rows:
            n = min(chunk, rows - done)
            model(x[torch.arange(done, done + n, device=x.device) % x.shape[0]])
            done += n


@dataclass
class Work:
    """What one benchmark row runs: our options, the floor's passes, and (optionally) a peer."""

    options: Union[Dict[str, object], Callable[[nn.Module], Dict[str, object]]]  # or built from the model
    floor: Callable[..., None]  # (model, x, target, rows per pass, explainer) -> None
    peers: Dict[str, Optional[Callable[..., object]]] = field(default_factory=dict)  # name -> same signature
    models: str = "all"  # "all", "cnn" (needs spatial feature maps) or "vit" (needs attention)


#: rows counted by :func:`replayed_floor`, per (explainer, model, input shape)
REPLAYED: Dict[tuple, List[int]] = {}


def replayed_floor(m: nn.Module, x: torch.Tensor, t: torch.Tensor, chunk: int, e) -> None:
    """For a method whose passes depend on the data (a line search's trials, the channels a threshold keeps): the
    first call, timed()'s warm-up, runs the method once and counts the rows of its forwards with and without
    gradient recording; every call then puts as many rows through forwards and through forward + input gradient
    (a backward to the input: above a CAM's, which stops at its shallowest layer)."""
    key = (id(e), id(m), tuple(x.shape))
    if key not in REPLAYED:
        rows = [0, 0]

        def count(module, inputs, output):
            rows[int(torch.is_grad_enabled())] += inputs[0].shape[0]

        handle = m.register_forward_hook(count)
        try:
            e(x, t)
        finally:
            handle.remove()
        REPLAYED[key] = rows
    plain, recorded = REPLAYED[key]
    forward_passes(m, x, plain, chunk)
    input_gradient_passes(m, x, t, recorded, chunk)


def gradient_work(steps: int, samples: int, size: int) -> Dict[str, Work]:
    """Work for every method of the gradient family and the perturbation methods (square inputs of ``size``;
    occlusion with windows of size/4 moved by size/8: 7 x 7 positions, and RISE, Kernel SHAP and LIME with as many
    masks and coalitions, so that the benchmark stays short)."""
    window, stride = max(1, size // 4), max(1, size // 8)
    positions = (-(-(size - window) // stride) + 1) ** 2
    try:
        import captum.attr as ca
    except ImportError:  # pragma: no cover - Captum is a test/bench dependency
        ca = None

    def grads(rows_per_image: int):
        return lambda m, x, t, chunk, e: input_gradient_passes(m, x, t, rows_per_image * x.shape[0], chunk)

    def peer(build):
        return None if ca is None else (lambda m, x, t, c, e: build(m, x, t, c))

    def idg_floor(m, x, t, chunk, e):  # the placing pass of forwards, then forward + input gradient per sample
        forward_passes(m, x, x.shape[0] * steps, chunk)
        input_gradient_passes(m, x, t, steps * x.shape[0], chunk)

    def big_floor(m, x, t, chunk, e):  # the attack's steps one after another, a forward of its ends, IG's points
        for _ in range(steps):
            input_gradient_passes(m, x, t, x.shape[0], chunk)
        forward_passes(m, x, x.shape[0], chunk)
        input_gradient_passes(m, x, t, steps * x.shape[0], chunk)

    def ig2_floor(m, x, t, chunk, e):  # the references' forward, then per step a forward and two input gradients
        forward_passes(m, x, x.shape[0], chunk)
        for _ in range(steps):
            input_gradient_passes(m, x, t, x.shape[0], chunk, gradients=2)

    def agi_floor(m, x, t, chunk, e):  # 4 classes' paths, steps/4 points one after another: fwd + 2 input grads
        for _ in range(max(1, steps // 4)):
            input_gradient_passes(m, x, t, 4 * x.shape[0], chunk, gradients=2)

    def isa_floor(m, x, t, chunk, e):  # 2 groups x steps/4 search steps one after another, 2 rows per image each
        for _ in range(2 * max(2, steps // 4)):
            input_gradient_passes(m, x, t, 2 * x.shape[0], chunk)

    def attexplore_floor(m, x, t, chunk, e):  # steps/4 attack steps one after another, 4 copies per image each
        for _ in range(max(1, steps // 4)):
            input_gradient_passes(m, x, t, 4 * x.shape[0], chunk)

    def guided_ig_floor(m, x, t, chunk, e):
        for _ in range(steps):
            input_gradient_passes(m, x, t, x.shape[0], chunk)

    def geodesic_floor(m, x, t, chunk, e):  # per iteration every path point's input gradient and its backward
        for _ in range(GEODESIC_ITERATIONS):
            for start in range(0, steps * x.shape[0], chunk):
                index = torch.arange(start, min(start + chunk, steps * x.shape[0]), device=x.device) % x.shape[0]
                batch = x[index].detach().requires_grad_(True)
                (gradient,) = torch.autograd.grad(m(batch).sum(), batch, create_graph=True)
                torch.autograd.grad(gradient.flatten(1).norm(dim=1).sum(), batch)
        guided_ig_floor(m, x, t, chunk, e)  # then the integral: steps x (forward + input gradient)

    def meaningful_floor(m, x, t, chunk, e):  # the circle start's 36 forwards per image, then steps x (fwd + grad)
        forward_passes(m, x, x.shape[0] * 36, chunk)
        guided_ig_floor(m, x, t, chunk, e)

    def moxi_floor(m, x, t, chunk, e):  # greedy step k: the n - k patches left of every image (the last forced)
        for left in range(MOXI_GRID ** 2, 1, -1):
            forward_passes(m, x, x.shape[0] * left, chunk)

    def occlusion_floor(m, x, t, chunk, e):
        forward_passes(m, x, x.shape[0] * (positions + 1), chunk)

    def prediction_difference_floor(m, x, t, chunk, e):  # the images, then 2 samples per window position
        forward_passes(m, x, x.shape[0] * (2 * positions + 1), chunk)

    def rise_floor(m, x, t, chunk, e):
        forward_passes(m, x, x.shape[0] * positions, chunk)

    def sobol_floor(m, x, t, chunk, e):  # one forward per row of A and of each C_i (4 x 4 cells)
        forward_passes(m, x, x.shape[0] * SOBOL_DESIGNS * 17, chunk)

    def shap_floor(m, x, t, chunk, e):  # the image, the baseline and one forward per coalition
        forward_passes(m, x, x.shape[0] * (positions + 2), chunk)

    def segment_peer(cls_name: str):
        def run(m, x, t, chunk):
            from attribution.perturbation.segments import grid_segments

            mask = grid_segments(size, size, 4, x.device)[None, None].expand(1, 3, size, size)
            return torch.cat([getattr(ca, cls_name)(m).attribute(x[i:i + 1], target=t[i:i + 1], n_samples=positions,
                                                                 feature_mask=mask, perturbations_per_eval=chunk)
                              for i in range(x.shape[0])])

        return run

    captum_shap, captum_lime = segment_peer("KernelShap"), segment_peer("Lime")

    def shapley_floor(m, x, t, chunk, e):  # the empty and the full coalition, then 15 prefixes per ordering
        forward_passes(m, x, x.shape[0] * (max(1, positions // 15) * 15 + 2), chunk)

    def captum_shapley(m, x, t, chunk):
        from attribution.perturbation.segments import grid_segments

        mask = grid_segments(size, size, 4, x.device)[None, None]
        return ca.ShapleyValueSampling(m).attribute(x, target=t, feature_mask=mask, n_samples=max(1, positions // 15),
                                                    perturbations_per_eval=max(1, chunk // x.shape[0]))

    def torchray_extremal(m, x, t, chunk, e):  # one image at a time; it turns off requires_grad of the weights
        from torchray.attribution.extremal_perturbation import extremal_perturbation

        flags = [p.requires_grad for p in m.parameters()]
        try:
            return torch.cat([extremal_perturbation(m, x[i:i + 1], int(t[i]), max_iter=steps)[0]
                              for i in range(x.shape[0])])
        finally:
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


    def zennit_lrp(m, x, t, chunk, e):  # EpsilonPlusFlat with the canonizer that folds a ResNet's batch norms
        import torchvision
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer

        if not isinstance(m, torchvision.models.ResNet):
            raise PeerSkipped("zennit needs a canonizer written for the model (ResNets here)")
        with Gradient(m, EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as attributor:
            return attributor(x, torch.eye(1000, device=x.device)[t])[1]

    def captum_occlusion(m, x, t, chunk):
        return ca.Occlusion(m).attribute(x, sliding_window_shapes=(3, window, window),
                                         strides=(3, stride, stride), target=t,
                                         perturbations_per_eval=max(1, chunk // x.shape[0]))

    return {
        "vanilla_gradient": Work({}, grads(1), {"captum Saliency": peer(
            lambda m, x, t, c: ca.Saliency(m).attribute(x, t, abs=False))}),
        "input_x_gradient": Work({}, grads(1), {"captum InputXGradient": peer(
            lambda m, x, t, c: ca.InputXGradient(m).attribute(x, t))}),
        "integrated_gradients": Work(
            {"steps": steps, "method": "gausslegendre", "baseline": "zero"}, grads(steps),
            {"captum IntegratedGradients": peer(lambda m, x, t, c: ca.IntegratedGradients(m).attribute(
                x, target=t, n_steps=steps, internal_batch_size=c))}),
        "blur_ig": Work({"steps": steps}, grads(steps)),
        "guided_ig": Work({"steps": steps}, guided_ig_floor),
        "geodesic_ig": Work({"steps": steps, "iterations": GEODESIC_ITERATIONS}, geodesic_floor),
        "idgi": Work({"steps": steps}, grads(steps)),
        "idg": Work({"steps": steps}, idg_floor),
        # IG from two baselines (steps/2 each), then the segmentation and region growth on the CPU
        "xrai": Work({"steps": max(1, steps // 2)}, grads(2 * max(1, steps // 2))),
        "attn_lrp": Work({}, grads(1)),
        # input x gradient under LibraGrad's rules: the rules add elementwise work only
        "libragrad": Work({}, grads(1), models="vit"),
        # LRP's passes: the concept (the most relevant channel of the default layer) is read from the same pass
        "crp": Work({}, grads(1), models="cnn"),
        # one forward and one backward with the sharing rule at each activation and pooling
        "srd": Work({}, grads(1), models="cnn"),
        "lrp": Work({}, grads(1), {"zennit Gradient(EpsilonPlusFlat)": zennit_lrp
                                   if importlib.util.find_spec("zennit") else None}),
        # every path taken to the end, so the floor is exact: steps x (forward + input gradient)
        "mfaba": Work({"steps": steps, "early_stop": False}, grads(steps)),
        # two groups of half the features, each steps/4 search steps one after another (the ascent's and the
        # descent's rows of every image in one pass)
        "isa": Work({"group_size": -(-3 * size * size // 2), "ascent_steps": max(2, steps // 4),
                     "descent_steps": max(2, steps // 4)}, isa_floor),
        # 4 classes x steps/4 points, each a forward and two input gradients (the ascent's class and the target)
        "agi": Work({"topk": 4, "max_iter": max(1, steps // 4)}, agi_floor),
        # 3 drawn classes + the untargeted walk x steps/4 points, every step taken: each a forward and two input
        # gradients (the floor counts one: ratio ~1.3+)
        "local_attribution": Work({"select_num": 4, "max_iter": max(1, steps // 4)}, grads(4 * max(1, steps // 4))),
        # the default radii are all beyond the attack's reach: one attack of steps points, then IG of steps points
        "big": Work({"attack_steps": steps, "steps": steps}, big_floor),
        # steps x samples rows per image (steps/4 x 4 here), each a forward and input gradient of a transformed copy
        "attexplore": Work({"steps": max(1, steps // 4), "samples": 4}, attexplore_floor),
        # one reference per image ('black'): its forward, then steps x (forward + the distance's and the target's
        # input gradients) along the path, one after another
        "ig2": Work({"steps": steps}, ig2_floor),
        "expected_gradients": Work({"samples": steps}, grads(steps), {"captum GradientShap": peer(
            lambda m, x, t, c: ca.GradientShap(m).attribute(x, torch.zeros_like(x[:1]).repeat(4, 1, 1, 1),
                                                             n_samples=steps, stdevs=0.0, target=t))}),
        "deeplift": Work({}, grads(2), {"captum DeepLift": peer(  # the images and their baselines in one batch
            lambda m, x, t, c: ca.DeepLift(m).attribute(x, target=t))}),
        "deeplift_shap": Work({"references": torch.zeros(4, 3, size, size)}, grads(8)),  # 4 references: 4 pairs
        "guided_backprop": Work({}, grads(1), {"captum GuidedBackprop": peer(
            lambda m, x, t, c: ca.GuidedBackprop(m).attribute(x, t))}),
        "deconvnet": Work({}, grads(1), {"captum Deconvolution": peer(
            lambda m, x, t, c: ca.Deconvolution(m).attribute(x, t))}),
        "rect_grad": Work({}, grads(1)),  # a k-th value of activation x gradient per rectifier and image
        "adapt_grad": Work({"samples": samples}, grads(samples)),
        "smooth_taylor": Work({"samples": samples}, grads(samples)),
        "guided_absolute_grad": Work({"samples": samples}, grads(samples)),
        "forgrad": Work({}, grads(1)),  # the gradient, then two FFTs of the (B, 1, H, W) map
        "smoothgrad": Work({"samples": samples}, grads(samples), {"captum NoiseTunnel(Saliency)": peer(
            lambda m, x, t, c: ca.NoiseTunnel(ca.Saliency(m)).attribute(
                x, nt_samples=samples, nt_samples_batch_size=max(1, c // x.shape[0]), stdevs=0.15, target=t,
                abs=False))}),
        # one forward and input gradient of the batch per noisy model (models with different weights: no batching)
        "noise_grad": Work({"noisy_models": samples}, lambda m, x, t, chunk, e: [
            input_gradient_passes(m, x, t, x.shape[0], chunk) for _ in range(samples)]),
        "occlusion": Work({"window": window, "stride": stride}, occlusion_floor, {"captum Occlusion": peer(
            captum_occlusion)}),
        "extremal_perturbation": Work({"iterations": steps}, guided_ig_floor,  # steps x (forward + input grad)
                                      {"torchray extremal_perturbation": torchray_extremal
                                       if importlib.util.find_spec("torchray") else None}),
        "meaningful_perturbation": Work({"iterations": steps}, meaningful_floor),
        # noise off, so that every run takes the same line-search trials as the counted one
        # 9 x 9 windows of an 8 x 8 grid, then the 17 x 17 of a 16 x 16 grid that the map selects: counted
        "hipe": Work({"max_depth": 2}, replayed_floor),
        "igos": Work({"iterations": max(1, steps // 8), "steps": 8, "noise": 0.0}, replayed_floor),
        "igos_pp": Work({"iterations": max(1, steps // 8), "steps": 8, "noise": 0.0}, replayed_floor),
        "rise": Work({"n_masks": positions}, rise_floor),  # as many masked forwards as occlusion's windows
        # occlusion's windows, each filled from 2 references (the authors' stride 1 and 10 samples: ~462k forwards);
        # marginal: the conditional sampler's Gaussian over (window + 4)^2 patches (3,600 values at 224) would weigh
        # more than the forwards
        "prediction_difference": Work({"window": window, "stride": stride, "num_samples": 2, "sampler": "marginal",
                                       "references": torch.rand(2, 3, size, size, generator=torch.Generator()
                                                                .manual_seed(0))}, prediction_difference_floor),
        "partition_shap": Work({"max_evals": positions}, lambda m, x, t, chunk, e: forward_passes(
            m, x, x.shape[0] * (positions + positions % 2), chunk)),  # max_evals forwards (+1 when odd)
        "kernel_shap": Work({"grid": 4, "samples": positions}, shap_floor, {"captum KernelShap": peer(captum_shap)}),
        "lime": Work({"grid": 4, "samples": positions}, rise_floor, {"captum Lime": peer(captum_lime)}),
        # 4 x 4 segments: samples x 15 + 2 forwards, about as many as occlusion's windows
        "shapley_sampling": Work({"grid": 4, "samples": max(1, positions // 15)}, shapley_floor,
                                 {"captum ShapleyValueSampling": peer(captum_shapley)}),
        "hsic": Work({"n_designs": positions}, rise_floor),
        "sobol": Work({"grid": 4, "n_designs": SOBOL_DESIGNS}, sobol_floor),
        "moxi": Work({"grid": MOXI_GRID}, moxi_floor),  # 135 forwards per image in 15 dependent steps
    }


def layer_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor, grad: bool) -> tuple:
    """(model outputs, the layer's last output) of one forward.  With ``grad`` autograd records from the layer's
    first call on, as the library's CAMs do: nothing below the layer is kept for a backward that never reaches it
    (a module called twice, as EfficientNet's shared activation, is differentiated at its last call, as there)."""
    store = {}

    def hook(module, inputs, output):
        if grad and not store:
            torch.set_grad_enabled(True)  # undone when the no_grad block below exits
            output = output.detach().requires_grad_(True)
        store["a"] = output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        handle.remove()
    return out, store["a"]


def layer_gradient_passes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, chunk: int, explainer) -> None:
    """Forward plus ``torch.autograd.grad(score, layer output)``: the least a gradient CAM can do."""
    (layer,) = explainer.target_layers(x)
    for start in range(0, x.shape[0], chunk):
        out, act = layer_activation(model, layer, x[start:start + chunk], grad=True)
        torch.autograd.grad(out.gather(1, target[start:start + chunk, None]).sum(), act)


def hessian_vector_passes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, chunk: int, explainer) -> None:
    """Forward, the gradient to the layer with its graph, and its backward against the activation (H A)."""
    (layer,) = explainer.target_layers(x)
    for start in range(0, x.shape[0], chunk):
        out, act = layer_activation(model, layer, x[start:start + chunk], grad=True)
        (grad,) = torch.autograd.grad(out.gather(1, target[start:start + chunk, None]).sum(), act, create_graph=True)
        torch.autograd.grad(grad, act, grad_outputs=act.detach(), allow_unused=True)


def layers_gradient_passes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, chunk: int, explainer) -> None:
    """Forward plus the gradient to every one of the explainer's layers at once (down to the shallowest)."""
    layers = explainer.target_layers(x, explainer.options.get("target_layer"))
    for start in range(0, x.shape[0], chunk):
        store: Dict[int, torch.Tensor] = {}

        def hook(output: torch.Tensor, index: int) -> torch.Tensor:
            if not store:  # autograd records from the first of the layers on, as the CAMs do
                torch.set_grad_enabled(True)  # undone when the no_grad block below exits
                output = output.detach().requires_grad_(True)
            store[index] = output  # each layer's last call
            return output

        handles = [layer.register_forward_hook(lambda m, i, o, index=index: hook(o, index))
                   for index, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                out = model(x[start:start + chunk])
        finally:
            for handle in handles:
                handle.remove()
        torch.autograd.grad(out.gather(1, target[start:start + chunk, None]).sum(), list(store.values()))


def stage_ends(model: nn.Module) -> Dict[str, object]:
    """RefineCAM's layers for the benchmark: the four stages of a ResNet, else the default layer alone."""
    names = [n for n in ("layer1", "layer2", "layer3", "layer4") if n in dict(model.named_modules())]
    return {"target_layer": names} if names else {}


class PeerSkipped(Exception):
    """A peer that has no way to do this row's work (noted in the row, not timed)."""


_TOKEN_LAYERS: Dict[Tuple[int, int, Tuple[int, ...]], bool] = {}


def token_layer(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` outputs a token sequence (B, N, C) on inputs like ``x`` (found once, outside the timings
    that follow: the first call runs inside the warm-up)."""
    key = (id(model), id(layer), tuple(x.shape[1:]))
    if key not in _TOKEN_LAYERS:
        _TOKEN_LAYERS[key] = layer_activation(model, layer, x[:1], grad=False)[1].dim() == 3
    return _TOKEN_LAYERS[key]


def channels_at_layer(model: nn.Module, x: torch.Tensor, explainer) -> int:
    (layer,) = explainer.target_layers(x)
    return layer_activation(model, layer, x[:1], grad=False)[1].shape[1]


#: TIS masks per image in the benchmark (the default 2048 forwards would dominate a CPU run)
TIS_MASKS = 64
#: Smooth Grad-CAM++ noisy copies per image in the benchmark
SMOOTH_CAM_SAMPLES = 8
#: path points per image of Integrated Grad-CAM and RSI-Grad-CAM in the benchmark (their default is 50)
PATH_CAM_STEPS = 16
#: CAMERAS resolutions in the benchmark: three of the authors' eight (their 924 pixels cost 17 forwards at 224)
CAMERAS_RESOLUTIONS = (224, 324, 424)


def cam_work(size: int) -> Dict[str, Work]:
    """Work for the CAM family (default layers) and the transformer-native methods."""
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:  # pragma: no cover - a bench/test dependency
        pgc = None

    def grad_cam_peer(cls_name: str, **attributes):
        if pgc is None:
            return None

        def run(m, x, t, chunk, e):
            (layer,) = e.target_layers(x)
            # a ViT's token layer needs the hand-written reshape pytorch-grad-cam asks for (class token first)
            reshape = get_reshape_transform(has_cls_token=True) if token_layer(m, layer, x) else None
            cam = getattr(pgc, cls_name)(model=m, target_layers=[layer], reshape_transform=reshape)
            for key, value in attributes.items():
                setattr(cam, key, chunk if value == "chunk" else value)
            try:
                return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in t])
            finally:
                cam.activations_and_grads.release()

        return run

    def forward_floor(m, x, t, chunk, e):
        forward_passes(m, x, x.shape[0], chunk)

    def smooth_floor(m, x, t, chunk, e):  # the clean forward, then forward + layer gradient of every noisy copy
        forward_passes(m, x, x.shape[0], chunk)
        layer_gradient_passes(m, x.repeat_interleave(SMOOTH_CAM_SAMPLES, 0), t.repeat_interleave(SMOOTH_CAM_SAMPLES),
                              chunk, e)

    def path_floor(points):  # forward + layer gradient of each path point (points(steps) per image)
        def floor(m, x, t, chunk, e):
            rows = points(PATH_CAM_STEPS)
            layer_gradient_passes(m, x.repeat_interleave(rows, 0), t.repeat_interleave(rows), chunk, e)
        return floor

    def cameras_floor(m, x, t, chunk, e):  # forward + layer gradient of the image resized to each resolution
        for r in CAMERAS_RESOLUTIONS:
            size = [round(s * r / CAMERAS_RESOLUTIONS[0]) for s in x.shape[-2:]]
            rows = x if r == CAMERAS_RESOLUTIONS[0] else F.interpolate(x, size=size, mode="bicubic",
                                                                         align_corners=False)
            layer_gradient_passes(m, rows, t, chunk, e)

    def tis_floor(m, x, t, chunk, e):  # the clean forward, then one forward per mask with a quarter of the patches
        from attribution.transformers.attcat import attention_blocks

        first = dict(m.named_modules())[attention_blocks(m, x[:1])[0]]
        forward_passes(m, x, x.shape[0], chunk)

        def quarter(module, args):
            tokens = args[0]
            return (tokens[:, :1 + (tokens.shape[1] - 1) // 4],) + tuple(args[1:])

        handle = first.register_forward_pre_hook(quarter)
        try:
            forward_passes(m, x, x.shape[0] * TIS_MASKS, chunk)
        finally:
            handle.remove()

    def atman_floor(m, x, t, chunk, e):  # the clean forward and one forward per patch token, on the fused kernel
        from attribution.core.spatial import patch_size

        height, width = patch_size(m)
        patches = (x.shape[-2] // height) * (x.shape[-1] // width)
        forward_passes(m, x, x.shape[0] * (patches + 1), chunk)

    def mda_floor(m, x, t, chunk, e):  # Bi-Attn's path points, then forwards only (subsearch=1, a fixed blur):
        from attribution.core.spatial import patch_size  # image, black, blur, each patch once, the two curves

        height, width = patch_size(m)
        patches = (x.shape[-2] // height) * (x.shape[-1] // width)
        input_gradient_passes(m, x, t, x.shape[0] * BEYOND_STEPS, chunk)
        forward_passes(m, x, x.shape[0] * (3 + patches + 2 * x.shape[-2]), chunk)

    def value_zeroing_floor(m, x, t, chunk, e):  # the clean forward and a forward per token (class token too)
        from attribution.core.spatial import patch_size

        height, width = patch_size(m)
        forward_passes(m, x, x.shape[0] * ((x.shape[-2] // height) * (x.shape[-1] // width) + 2), chunk)

    def score_floor(m, x, t, chunk, e):  # the clean forward and one masked forward per channel
        forward_passes(m, x, x.shape[0] * (1 + channels_at_layer(m, x, e)), chunk)

    def decom_floor(m, x, t, chunk, e):  # forward + layer gradient, then one forward per component (10)
        layer_gradient_passes(m, x, t, chunk, e)
        forward_passes(m, x, x.shape[0] * 10, chunk)

    def fusion_floor(m, x, t, chunk, e):  # Grad-CAM's layer gradient; Score-CAM's forward + one per channel; 3 masked
        layer_gradient_passes(m, x, t, chunk, e)
        forward_passes(m, x, x.shape[0] * (channels_at_layer(m, x, e) + 4), chunk)

    def poly_floor(m, x, t, chunk, e):  # the clean forward, one forward per channel and side of every stage end
        channels = sum(layer_activation(m, layer, x[:1], grad=False)[1].shape[1] for layer in e.target_layers(x))
        forward_passes(m, x, x.shape[0] * (1 + 2 * channels), chunk)

    def group_floor(m, x, t, chunk, e):  # the layer gradient, then the blurred image and one copy per group
        channels = channels_at_layer(m, x, e)
        groups = -(-channels // -(-channels // e.defaults["groups"]))
        layer_gradient_passes(m, x, t, chunk, e)
        forward_passes(m, x, x.shape[0] * (1 + groups), chunk)

    def vit_cx_floor(m, x, t, chunk, e):  # the clean forward and two forwards per cluster mask (as last counted)
        forward_passes(m, x, x.shape[0] + 2 * int(sum(c.sum() for c in e.last_cluster_counts)), chunk)

    def tail_floor(copies):  # one head forward, then the tail on copies(layer output) edited copies per image
        def floor(m, x, t, chunk, e):
            from attribution.cam.tail import SplitModel, ablation_rows

            (layer,) = e.target_layers(x)
            with torch.inference_mode():
                split = SplitModel(m, layer)
                values = split.head(x)
                tail = split.tail(values, x.shape[0], split.plan(values))
                acts = values[split.cut]
                per_image = copies(acts)
                rows = x.shape[0] * per_image
                for start in range(0, rows, chunk):
                    index = torch.arange(start, min(start + chunk, rows), device=x.device)
                    owners, channels = index // per_image, index % acts.shape[1]
                    tail(ablation_rows(acts, owners, channels, 0.0), owners)

        return floor

    def split_at_layer(m, x, e):  # the explainer's layer's outputs (one head forward) and the tail after it
        from attribution.cam.tail import SplitModel

        (layer,) = e.target_layers(x)
        split = SplitModel(m, layer)
        with torch.no_grad():
            values = split.head(x)
        return split.tail(values, x.shape[0], split.plan(values)), values[split.cut]

    def lift_floor(m, x, t, chunk, e):  # one head forward, then the tail's forward and backward on (A, 0) pairs
        tail, acts = split_at_layer(m, x, e)
        for start in range(0, x.shape[0], max(1, chunk // 2)):
            part = acts[start:start + max(1, chunk // 2)]
            owners = torch.arange(start, start + part.shape[0], device=x.device).repeat(2)
            rows = torch.cat([part, torch.zeros_like(part)]).requires_grad_(True)
            scores = tail(rows, owners).gather(1, t[owners][:, None])
            torch.autograd.grad(scores.sum(), rows)

    def iba_floor(m, x, t, chunk, e):  # one head forward, then (iterations - 1) x samples tail forwards and
        tail, acts = split_at_layer(m, x, e)  # backwards to the layer per image, at IBA's defaults
        rows = x.shape[0] * (e.defaults["iterations"] - 1) * e.defaults["samples"]
        for start in range(0, rows, chunk):
            owners = torch.arange(start, min(start + chunk, rows), device=x.device) % x.shape[0]
            edited = acts[owners].detach().requires_grad_(True)
            torch.autograd.grad(tail(edited, owners).log_softmax(1).gather(1, t[owners][:, None]).sum(), edited)

    def window_rows(x, t, e):  # SESS's windows of every image (with its defaults), and their targets
        from attribution.cam.sess import Pyramid, Scale, _scales

        window = min(x.shape[-2:])
        pyramid = Pyramid([Scale(*x.shape[-2:], s, window, window) for s in _scales(None, 12, 2 / 7, window)])
        index = torch.arange(x.shape[0] * len(pyramid), device=x.device)
        images = index // len(pyramid)
        return pyramid.windows(x, images, index % len(pyramid)), t[images]

    def sess_floor(m, x, t, chunk, e):  # a forward of every window, then a forward and layer gradient of each
        rows, targets = window_rows(x, t, e)
        forward_passes(m, rows, rows.shape[0], chunk)
        layer_gradient_passes(m, rows, targets, chunk, e.base)

    def finer_peer(m, x, t, chunk, e):  # pytorch-grad-cam compares with the nearest classes only for targets=None
        (layer,) = e.target_layers(x)
        with pgc.FinerCAM(model=m, target_layers=[layer]) as cam:
            return cam(x, targets=None)

    def sess_peer(m, x, t, chunk, e):
        (layer,) = e.target_layers(x)
        with pgc.SESS(model=m, target_layers=[layer], batch_size=chunk) as cam:
            return cam(x, [ClassifierOutputTarget(int(c)) for c in t])

    def refine_peer(m, x, t, chunk, e):
        layers = e.target_layers(x, e.options.get("target_layer"))
        cam = pgc.RefineCAM(model=m, target_layers=layers)
        try:
            return cam(x, [ClassifierOutputTarget(int(c)) for c in t])
        finally:
            for inner in cam.base_cam_per_layer:
                inner.activations_and_grads.release()

    def two_pass_floor(m, x, t, chunk, e):  # guided backprop's input gradient and Grad-CAM's layer gradient
        input_gradient_passes(m, x, t, x.shape[0], chunk)
        layer_gradient_passes(m, x, t, chunk, e.cam)

    def input_floor(m, x, t, chunk, e):
        input_gradient_passes(m, x, t, x.shape[0], chunk)

    def beyond_floor(m, x, t, chunk, e):  # forward + input gradient of every path point
        input_gradient_passes(m, x, t, x.shape[0] * BEYOND_STEPS, chunk)

    def opti_floor(m, x, t, chunk, e):  # the clean forward, then a forward and input gradient per iteration
        forward_passes(m, x, x.shape[0], chunk)
        input_gradient_passes(m, x, t, x.shape[0] * OPTI_ITERATIONS, chunk)

    def captum_layer_grad_cam(m, x, t, chunk, e):
        import captum.attr as ca

        (layer,) = e.target_layers(x)
        if token_layer(m, layer, x):
            raise PeerSkipped("LayerGradCam needs (B, C, h, w) layer outputs")
        return ca.LayerGradCam(m, layer).attribute(x, target=t, relu_attributions=True)

    def torchray_eb(m, x, t, chunk, e):  # TorchRay's rules need its update_resnet for residual blocks
        from torchray.attribution.excitation_backprop import excitation_backprop

        (layer,) = e.target_layers(x)
        return excitation_backprop(m, x, t, saliency_layer=layer)

    def pgc_work(floor, cls_name: str, models: str = "cnn", **attributes) -> Work:
        return Work({}, floor, {f"pytorch-grad-cam {cls_name}": grad_cam_peer(cls_name, **attributes)}, models)

    return {
        "grad_cam": Work({}, layer_gradient_passes, {"pytorch-grad-cam GradCAM": grad_cam_peer("GradCAM"),
                                                     "captum LayerGradCam": captum_layer_grad_cam}, "all"),
        "hires_cam": pgc_work(layer_gradient_passes, "HiResCAM", "all"),
        "grad_cam_elementwise": pgc_work(layer_gradient_passes, "GradCAMElementWise", "all"),
        "grad_cam_plusplus": pgc_work(layer_gradient_passes, "GradCAMPlusPlus", "all"),
        "xgrad_cam": pgc_work(layer_gradient_passes, "XGradCAM", "all"),
        "layer_cam": pgc_work(layer_gradient_passes, "LayerCAM", "all"),
        "bag_cam": Work({}, layer_gradient_passes, models="all"),
        "eigen_cam": pgc_work(forward_floor, "EigenCAM", "all"),
        "eigen_grad_cam": pgc_work(layer_gradient_passes, "EigenGradCAM", "all"),
        "seg_eigen_cam": pgc_work(layer_gradient_passes, "SegEigenCAM", "all"),
        "kpca_cam": pgc_work(forward_floor, "KPCA_CAM", "all"),
        "score_cam": pgc_work(score_floor, "ScoreCAM", batch_size="chunk"),
        "ablation_cam": pgc_work(tail_floor(lambda acts: acts.shape[1]), "AblationCAM", batch_size="chunk"),
        # 2 C tail passes (the floor leaves out the forward and layer gradient for Grad-CAM's weights)
        "fd_cam": Work({}, tail_floor(lambda acts: 2 * acts.shape[1]), {}, "cnn"),
        # SHAP_CAM_SAMPLES orderings x (C - 1) prefixes + the empty coalition, tail passes per image
        "shap_cam": Work({"samples": SHAP_CAM_SAMPLES},
                         tail_floor(lambda acts: SHAP_CAM_SAMPLES * (acts.shape[1] - 1) + 1), {}, "cnn"),
        # Grad-CAM's passes; the rest is the (C, C) clustering of the channels in float64
        "cf_cam": Work({}, layer_gradient_passes, {}, "all"),
        "smooth_grad_cam_plusplus": Work({"samples": SMOOTH_CAM_SAMPLES}, smooth_floor, {}, "all"),
        # the clean forward, then forward + layer gradient of every drawn path point
        "expected_grad_cam": Work({"samples": SMOOTH_CAM_SAMPLES}, smooth_floor, {}, "all"),
        "integrated_grad_cam": Work({"steps": PATH_CAM_STEPS}, path_floor(lambda steps: steps), {}, "all"),
        "rsi_grad_cam": Work({"steps": PATH_CAM_STEPS}, path_floor(lambda steps: steps + 1), {}, "all"),
        # the activations' integral: steps + 1 path points, each a forward and a gradient to the layer
        "iia": Work({"steps": PATH_CAM_STEPS, "representation": "activations"}, path_floor(lambda steps: steps + 1),
                    {}, "cnn"),
        "cameras": Work({"resolutions": CAMERAS_RESOLUTIONS}, cameras_floor, {}, "cnn"),
        "recipro_cam": Work({}, tail_floor(lambda acts: acts.shape[-2] * acts.shape[-1]), {}, "cnn"),
        "lift_cam": Work({}, lift_floor, {}, "cnn"),
        "iba": Work({}, iba_floor, {}, "cnn"),
        "sidu": Work({}, score_floor, {}, "cnn"),
        "poly_cam": Work({}, poly_floor, {}, "cnn"),
        # the channels kept depend on the gradients: counted; the last two stages of a ResNet (all five: ~2000
        # masked forwards per image) and half the largest mean gradient keep the run short
        "sise": Work(lambda m: {"grad_threshold": 0.5, **({"target_layer": ["layer3", "layer4"]}
                                                          if hasattr(m, "layer4") else {})}, replayed_floor, {}, "cnn"),
        "excitation_backprop": Work({}, layer_gradient_passes, {"torchray excitation_backprop": torchray_eb
                                    if importlib.util.find_spec("torchray") else None}, "cnn"),
        "relevance_cam": Work({}, layer_gradient_passes, {}, "cnn"),
        "norm_grad": Work({}, layer_gradient_passes, {}, "all"),  # one relevance backward to the layer
        "vit_cx": Work({}, vit_cx_floor, {}, "all"),
        "fullgrad": pgc_work(input_floor, "FullGrad"),
        "group_cam": Work({}, group_floor, {}, "cnn"),
        "decom_cam": Work({}, decom_floor, {}, "all"),
        "fusion_cam": Work({}, fusion_floor, {}, "cnn"),
        "opti_cam": Work({"iterations": OPTI_ITERATIONS}, opti_floor, {}, "all"),
        "fem": pgc_work(forward_floor, "FEM"),
        "shapley_cam": pgc_work(hessian_vector_passes, "ShapleyCAM"),
        "finer_cam": Work({}, layer_gradient_passes, {"pytorch-grad-cam FinerCAM": pgc and finer_peer}, "cnn"),
        "refine_cam": Work(stage_ends, layers_gradient_passes, {"pytorch-grad-cam RefineCAM": pgc and refine_peer},
                           "cnn"),
        "sess": Work({}, sess_floor, {"pytorch-grad-cam SESS": pgc and sess_peer}, "cnn"),
        "random_cam": pgc_work(forward_floor, "RandomCAM", "all"),
        "guided_grad_cam": Work({}, two_pass_floor, models="cnn"),
        "attention_rollout": Work({}, forward_floor, models="vit"),
        "grad_rollout": Work({}, input_floor, models="vit"),
        # subsearch=1: both searches together insert each patch once; the curves step one image row at a time
        "mda": Work({"subsearch": 1, "blur": 31, "base_options": {"steps": BEYOND_STEPS}}, mda_floor, models="vit"),
        # one forward; the N maximum flows per image run on the host (scipy's Dinic): most of its time
        "attention_flow": Work({}, forward_floor, models="vit"),
        "generic_attention": Work({}, input_floor, models="vit"),
        "grad_sam": Work({}, input_floor, models="vit"),
        "ag_cam": Work({}, input_floor, models="vit"),
        "raw_attention": Work({}, forward_floor, models="vit"),
        "beyond_intuition": Work({"steps": BEYOND_STEPS}, beyond_floor, models="vit"),
        # steps x (forward + backward), the backward stopping at the last block's attention (below the floor's)
        "tam": Work({"steps": BEYOND_STEPS}, beyond_floor, models="vit"),
        "attcat": Work({}, input_floor, models="vit"),
        # one forward (the tail on twice the rows) and two backwards to the last two blocks' attention: the floor
        # counts one backward, so ~1.3x is its cost, not overhead
        "legrad": Work({}, input_floor, models="vit"),
        "token_tm": Work({}, input_floor, models="vit"),  # one forward, one backward to the attention maps
        # a relevance backward (each linear layer's alpha1-beta0 rule: two more products) and a plain one, against
        # the floor's one backward
        "transformer_attribution": Work({}, input_floor, models="vit"),
        "tis": Work({"n_masks": TIS_MASKS}, tis_floor, models="vit"),
        # P + 1 forwards per image for P patch tokens (197 per image on ViT-B/16 at 224; the forward up to the first
        # block that reads the embeddings is not in the floor); ours runs the attention as the explicit softmax(q k^T)
        # with per-row suppressed keys, the floor the model's own (fused) kernel
        "atman": Work({}, atman_floor, models="vit"),
        # the clean forward, then every block once per token (L x N single-block forwards): about N + 1 forwards
        "value_zeroing": Work({}, value_zeroing_floor, models="vit"),
        # one forward; then per block N^2 x D x H multiply-adds and N^2 x D distances (memory-bound, above the floor)
        "alti": Work({}, forward_floor, models="vit"),
        "attention_norm": Work({}, forward_floor, models="vit"),  # the last block's norms only (rollout=False)
        "globenc": Work({}, forward_floor, models="vit"),
        # one forward, then the decomposed stream: N copies of the residual stream through every linear (about N
        # forwards of multiply-adds), plus N^3 x D per block for the attention
        "decompx": Work({}, value_zeroing_floor, models="vit"),
    }


#: Shap-CAM's orderings in the benchmark (its default, 200, is 409,401 tail passes per image on ResNet-50's layer4)
SHAP_CAM_SAMPLES = 1
#: Geodesic IG's path optimisation steps in the benchmark (its default is 1000 with an early stop)
GEODESIC_ITERATIONS = 2
#: MoXI's patch grid in the benchmark (its default, 14 x 14, is 19,305 forwards per image)
MOXI_GRID = 4
#: Sobol attribution's designs in the benchmark, on a 4 x 4 grid (17 forwards per design; its default is 32 on 8 x 8)
SOBOL_DESIGNS = 8
#: Beyond Intuition's path points in the benchmark (its default is 20)
BEYOND_STEPS = 8
#: Opti-CAM's optimisation steps in the benchmark (its default is 50)
OPTI_ITERATIONS = 10
#: many-pass methods left out of the default CPU run (C forwards, or for AtMan one per patch token, per image): ask
#: for them with --methods
SLOW_ON_CPU = {"score_cam", "ss_cam", "is_cam", "sess", "vit_cx", "sidu", "poly_cam", "atman", "fusion_cam",
               "value_zeroing", "mda", "hipe", "decompx"}
#: peers that take C full forwards per image where ours takes C tail passes: only in --quick runs on a CPU
SLOW_PEERS_ON_CPU = {"pytorch-grad-cam AblationCAM"}
#: not benchmarked: their cost is that of the methods they combine, measured on their own rows
COMPOSITE = {"combined", "ss_cam", "is_cam"}


# ------------------------------------------------------------------------------------------------------ models


def build_model(name: str, device: torch.device) -> nn.Module:
    if name in ("resnet50", "resnet18"):
        import torchvision

        model = getattr(torchvision.models, name)()
    elif name == "vit_b_16":
        import torchvision

        model = torchvision.models.vit_b_16()
    elif name == "efficientnet_lite0":
        from attribution.data import load_efficientnet_lite0

        model = load_efficientnet_lite0()
    else:
        raise SystemExit(f"unknown model {name!r}")
    return model.eval().to(device)


# -------------------------------------------------------------------------------------------------------- main


@dataclass
class Row:
    model: str
    method: str
    batch: int
    rows_per_pass: int
    floor_s: float
    ours_s: float
    ratio: float
    peak_mib: float
    floor_peak_mib: float
    peers: Dict[str, float] = field(default_factory=dict)  # peer -> seconds for the same work
    notes: List[str] = field(default_factory=list)


def run(args: argparse.Namespace) -> List[Row]:
    device = torch.device(args.device)
    work = {**gradient_work(args.steps, args.samples, args.size), **cam_work(args.size)}
    default = [n for n in work if not (device.type == "cpu" and n in SLOW_ON_CPU and not args.quick)]
    methods = args.methods or sorted(default)
    missing = set(attribution.list_methods()) - set(work) - COMPOSITE
    if missing:
        print(f"# no floor defined, not benchmarked: {', '.join(sorted(missing))}")
    formats = {"channels_last": True} if args.channels_last else {}
    if args.amp:
        formats["amp"] = True
    rows: List[Row] = []
    def autocast(fn, *fn_args):  # with --amp, floors and peers run under the same bf16 autocast as ours
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            return fn(*fn_args)

    for model_name in args.models:
        model = build_model(model_name, device)
        torch.manual_seed(0)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        if args.channels_last:  # floors and peers get channels-last inputs too: the same kernels for everyone
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            target = model(x).argmax(1)
        for name in methods:
            if name not in work:
                print(f"# {name}: no floor defined, skipped")
                continue
            spec = work[name]
            family = "vit" if model_name.startswith("vit") else "cnn"
            if spec.models not in ("all", family):
                continue
            options = spec.options(model) if callable(spec.options) else spec.options
            explainer = attribution.create(name, model, **options, **formats)
            with RowsSeen() as seen:
                explainer(x, target)
            chunk = max(seen.rows, 1)
            ours = timed(lambda: explainer(x, target), device, args.repeats)
            floor = timed(lambda: autocast(spec.floor, model, x, target, chunk, explainer), device, args.repeats)
            peak = peak_memory(lambda: explainer(x, target), device)
            floor_peak = peak_memory(lambda: autocast(spec.floor, model, x, target, chunk, explainer), device)
            row = Row(model_name, name, args.batch, chunk, floor, ours, ours / floor, peak, floor_peak)
            for peer_name, peer in spec.peers.items():
                if peer is None or args.no_peers:
                    continue
                if device.type == "cpu" and peer_name in SLOW_PEERS_ON_CPU and not args.quick:
                    row.notes.append(f"{peer_name} skipped on CPU (C full forwards per image)")
                    continue
                try:
                    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                        row.peers[peer_name] = timed(lambda: autocast(peer, model, x, target, chunk, explainer),
                                                     device, args.repeats)
                except PeerSkipped as why:
                    row.notes.append(f"{peer_name} skipped: {why}")
                except Exception as error:  # a peer failing is a result, not a crash
                    row.notes.append(f"{peer_name} failed: {type(error).__name__}: {error}"[:160])
            rows.append(row)
            print_row(row)
            if args.json:  # after every row, so that a run cut short keeps what it measured
                save(args, rows)
    return rows


def save(args: argparse.Namespace, rows: List[Row]) -> None:
    with open(args.json, "w") as f:
        json.dump({"machine": machine(), "torch": torch.__version__, "args": vars(args),
                   "rows": [asdict(r) for r in rows]}, f, indent=1)


def print_header() -> None:
    print(f"{'model':18s} {'method':22s} {'rows/pass':>9s} {'floor s':>9s} {'ours s':>9s} {'ratio':>6s} "
          f"{'peak MiB':>9s} {'floor MiB':>9s}  peers: seconds (how many times slower than ours)")


def print_row(r: Row) -> None:
    peers = "; ".join(f"{name} {sec:.3f} ({sec / r.ours_s:.2f}x)" for name, sec in r.peers.items())
    print(f"{r.model:18s} {r.method:22s} {r.rows_per_pass:9d} {r.floor_s:9.3f} {r.ours_s:9.3f} {r.ratio:6.2f} "
          f"{r.peak_mib:9.0f} {r.floor_peak_mib:9.0f}  {peers}" + (f"  [{'; '.join(r.notes)}]" if r.notes else ""))


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--methods", nargs="*")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="channels_last=True, inputs channels-last")
    parser.add_argument("--amp", action="store_true", help="amp=True; floors and peers under bf16 autocast")
    parser.add_argument("--quick", action="store_true", help="small sizes: finishes in under 2 minutes on 2 cores")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="captum")
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    if args.quick:
        args.batch, args.size, args.steps, args.samples, args.repeats = 2, 64, 8, 4, 1
        args.models = ["resnet18"] if args.models == ["resnet50"] else args.models
    print(f"# {machine()}, torch {torch.__version__}, batch {args.batch}, {args.size}x{args.size}, "
          f"steps {args.steps}, samples {args.samples}, median of {args.repeats}"
          + (", channels-last" if args.channels_last else "") + (", bf16 autocast" if args.amp else ""))
    print_header()
    run(args)


if __name__ == "__main__":
    sys.exit(main())
