"""Ablation-CAM."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import CPU_ROWS, MAX_ROWS, RowPlanner
from ..core.capture import LayerCapture, ReshapeTransform, channel_positions, layer_transform
from ..core.layers import LayerSpec
from ..core.progress import progress_bar
from ..core.registry import register
from ..core.targets import Target
from ..gradients.base import accumulation_dtype
from .base import CAM, FUSIONS, channel_sum, safe_divide
from .tail import SplitModel, Unsplittable, ablation_rows

#: on a CPU with ``batch_size=None``, tail passes take as many rows as fit in this many bytes of layer output
TAIL_CHUNK_BYTES = 1 << 26


@register("ablation_cam")
class AblationCAM(CAM):
    """Ablation-CAM: each channel weighted by the relative drop of the target score when it is zeroed.

    Desai & Ramaswamy, "Ablation-CAM: Visual Explanations for Deep Convolutional Network via Gradient-free
    Localization", WACV 2020 (no arXiv version).

    ``w_k = (y - y_k) / y`` with ``y`` the target score and ``y_k`` the score with channel ``k`` of the layer's
    output set to ``ablation_value`` (0, as the paper), ``map = ReLU(sum_k w_k A_k)`` (weights 0 if ``y = 0``).

    Cost: one forward per image, then C *tail* passes per image (C = the layer's channels): the layer's output is
    computed once and only the modules after the layer run on the ablated copies.  The tail comes from tracing the
    model with ``torch.fx`` (see :mod:`attribution.cam.tail`); when fx cannot trace the model or cut it after the
    layer, AblationCAM falls back to C full forwards per image with a forward hook that replaces the layer's
    output by the ablated copies (``self.last_mode`` says ``'tail'`` or ``'full'``; ``use_tail=False`` forces full
    forwards).  Ablated copies run
    ``batch_size`` rows at a time (``None``: on a CPU, as many rows as fit in 64 MiB of layer output, at least 16;
    on CUDA, sized by the memory probe), without autograd unless ``create_graph=True``; ``progress=True`` shows a
    bar.

    Layers whose output is not (B, C, h, w) are read through the same layout as every CAM's (token sequences,
    channels-last maps; see :mod:`attribution.core.spatial`) or through ``reshape_transform``: channel ``k`` is
    ablated where the layout takes map ``A_k`` from, i.e. feature ``k`` of every *patch* token of a vision
    transformer (class, distillation and register tokens are left as they are, as they are not part of the map),
    and the model runs on with the output kept in its own shape.  A ``reshape_transform`` must only select and
    rearrange elements (a view, permute or slice), so that the ablated elements can be found.

    Differences from pytorch-grad-cam: it ablates with 0 only when the layer's minimum activation is exactly 0
    and otherwise with ``min - 1e7`` (here: always ``ablation_value``), always runs full forwards, and offers
    ``ratio_channels_to_ablate`` (here all channels are ablated).
    """

    uses_gradients = False
    defaults = {**CAM.defaults, "ablation_value": 0.0, "use_tail": True, "progress": False}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(model, target_layer, **options)
        self._splits: Dict[int, Tuple[nn.Module, SplitModel]] = {}
        self.last_mode: Optional[str] = None

    def _split(self, layer: nn.Module) -> Optional[SplitModel]:
        """The model traced and cut after ``layer`` (cached while the model's modules stay the same), or None."""
        cached = self._splits.get(id(layer))
        if cached is not None and cached[0] is layer and cached[1].still_valid():
            return cached[1]
        try:
            split = SplitModel(self.model, layer)
        except Unsplittable:
            return None  # not cached: the reason (a hook, say) may be gone next time
        self._splits[id(layer)] = (layer, split)
        return split

    def _explain(self, x: Tensor, target: Target, *, target_layer: LayerSpec, reshape_transform: ReshapeTransform,
                 layer_fusion: str, ablation_value: float, use_tail: bool, progress: bool,
                 batch_size: Optional[int], create_graph: bool) -> Tensor:
        if layer_fusion not in FUSIONS:
            raise ValueError(f"layer_fusion must be one of {FUSIONS}, got {layer_fusion!r}")
        layers = self.target_layers(x, target_layer, reshape_transform)
        if not isinstance(use_tail, bool):
            raise TypeError(f"use_tail must be a bool, got {use_tail!r}")
        maps = [self._layer_ablation(x, target, layer, reshape_transform, float(ablation_value), use_tail, progress,
                                     batch_size, create_graph) for layer in layers]
        return self._fuse(maps, x.shape[-2:], layer_fusion)

    # ---------------------------------------------------------------------------------------------- one layer
    def _layer_ablation(self, x: Tensor, target: Target, layer: nn.Module, reshape_transform: ReshapeTransform,
                        value: float, use_tail: bool, progress: bool, batch_size: Optional[int],
                        create_graph: bool) -> Tensor:
        split = self._split(layer) if use_tail else None
        with torch.set_grad_enabled(create_graph), self._autocast():
            run = None
            if split is not None:
                try:
                    run = self._tail_runner(split, x, batch_size)
                    self.last_mode = "tail"
                except Unsplittable:
                    run = None
            if run is None:
                run = self._full_runner(layer, x, batch_size)
                self.last_mode = "full"
            acts, clean_outputs = run.activations, run.clean_outputs
            transform = layer_transform(self.model, layer, acts.shape, x.shape[-2:], reshape_transform)
            maps = transform(acts)
            if maps.dim() != 4:
                raise ValueError(f"the output of layer {self._name(layer)!r} has shape {tuple(maps.shape)} after "
                                 "reshape_transform; CAMs need (B, C, h, w)")
            positions = None if maps is acts else channel_positions(transform, acts.shape, self._name(layer),
                                                                     acts.device)
            batch = x.shape[0]
            owners = torch.arange(batch, device=x.device)
            clean = target(clean_outputs, owners)
            if target.pending:
                target.classes = clean_outputs.argmax(dim=1)
            channels = maps.shape[1]
            rows = batch_size
            if rows is None and x.device.type == "cpu":
                rows = int(max(CPU_ROWS, min(MAX_ROWS * 16, TAIL_CHUNK_BYTES // max(1, acts[0].numel()
                                                                                 * acts.element_size()))))
            bar = progress_bar(progress, batch * channels, f"{type(self).__name__} ablations")
            parts: List[Tensor] = []
            try:
                for start, stop in RowPlanner(batch * channels, rows, x.device):
                    index = torch.arange(start, stop, device=x.device)
                    image, channel = index // channels, index % channels
                    outputs = run(ablation_rows(acts, image, channel, value, positions), image)
                    parts.append(target(outputs, image))
                    bar.update(stop - start)
            finally:
                bar.close()
            ablated = torch.cat(parts).view(batch, channels)
        dtype = accumulation_dtype(x)
        clean = clean.to(dtype).unsqueeze(1)
        weights = safe_divide(clean - ablated.to(dtype), clean)
        return channel_sum(weights[:, :, None, None], maps.to(dtype))

    def _tail_runner(self, split: SplitModel, x: Tensor, batch_size: Optional[int]) -> "_Runner":
        plan = None
        kept: List[Dict[Any, Any]] = []
        for a, b in RowPlanner(x.shape[0], batch_size, x.device):
            values = split.head(self._model_input(x[a:b]))
            plan = plan or split.plan(values)
            kept.append({node: values[node] for node in plan[1]})  # drop the rest of the head's values
        merged = {node: torch.cat([k[node] for k in kept])
                  if len(kept) > 1 and node in split.on_images and isinstance(kept[0][node], Tensor)
                  and kept[0][node].dim() > 0 else kept[0][node] for node in plan[1]}
        tail = split.tail(merged, x.shape[0], plan)
        acts = merged[split.cut]
        return _Runner(acts, tail(acts, torch.arange(x.shape[0], device=x.device)), tail)

    def _full_runner(self, layer: nn.Module, x: Tensor, batch_size: Optional[int]) -> "_Runner":
        acts, outputs = [], []
        calls = 0
        for a, b in RowPlanner(x.shape[0], batch_size, x.device):
            with LayerCapture([layer], model=self.model) as capture:
                outputs.append(self._forward(x[a:b]))
            capture._check_ran()
            acts.append(capture.outputs[0])
            calls = capture.calls[0]
        forward = self._forward

        def forward_with(layer_rows: Tensor, owners: Tensor) -> Tensor:
            state = {"calls": 0}

            def replace(module: nn.Module, inputs: Any, output: Any) -> Any:
                state["calls"] += 1
                return layer_rows if state["calls"] == calls else output

            handle = layer.register_forward_hook(replace)
            try:
                return forward(x[owners])
            finally:
                handle.remove()

        return _Runner(torch.cat(acts), torch.cat(outputs), forward_with)


class _Runner:
    """Layer activations and clean outputs of the images, and a callable giving outputs for modified layer rows."""

    def __init__(self, activations: Tensor, clean_outputs: Tensor, run: Any) -> None:
        self.activations = activations
        self.clean_outputs = clean_outputs
        self._run = run

    def __call__(self, layer_rows: Tensor, owners: Tensor) -> Tensor:
        return self._run(layer_rows, owners)
