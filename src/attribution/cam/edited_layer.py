"""The base of CAMs that run the model on from one layer with edited copies of that layer's output.

Ablation-CAM zeroes one channel per copy, Recipro-CAM keeps one location per copy; both need the layer's output
once per image and then the model's outputs for many edited copies of it.  :class:`EditedLayerCAM` provides that:
the copies run only the modules after the layer (the *tail*, from :class:`attribution.cam.tail.SplitModel`) or,
where fx cannot cut the model there, full forwards whose layer output a forward hook replaces.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import CPU_ROWS, MAX_ROWS, RowPlanner
from ..core.capture import LayerCapture, ReshapeTransform, channel_positions, layer_transform
from ..core.layers import LayerSpec
from ..core.progress import progress_bar
from ..core.targets import Target
from .base import CAM
from .tail import SplitModel, Unsplittable, cached_split

#: on a CPU with ``batch_size=None``, tail passes run as many edited copies as fit in this many bytes of layer
#: output (full forwards run RowPlanner's ``CPU_ROWS``: each of their rows is a whole image's forward)
TAIL_CHUNK_BYTES = 1 << 26


class LayerRunner:
    """The layer's output for every image (``activations``), the model's outputs (``clean_outputs``), and a
    callable giving the outputs for edited layer rows: ``runner(layer_rows, owners)``."""

    def __init__(self, activations: Tensor, clean_outputs: Tensor, run: Callable[[Tensor, Tensor], Any],
                 mode: str) -> None:
        self.activations = activations
        self.clean_outputs = clean_outputs
        self.mode = mode
        self._run = run

    def __call__(self, layer_rows: Tensor, owners: Tensor) -> Tensor:
        return self._run(layer_rows, owners)


class EditedLayerCAM(CAM):
    """A CAM whose map comes from the model's outputs on edited copies of one layer's output (no gradients).

    Options shared by the subclasses: ``use_tail`` (default True; False forces full forwards), ``progress`` (a bar
    over the copies), ``batch_size`` (copies per pass; ``None``: on a CPU, as many as fit in 64 MiB of layer
    output, at least 16, for tail passes, and RowPlanner's 16 rows for full forwards; on CUDA, sized by the memory
    probe).  ``self.last_mode`` says ``'tail'`` or ``'full'``.
    Copies run without autograd unless ``create_graph=True``.
    """

    uses_gradients = False
    defaults = {**CAM.defaults, "use_tail": True, "progress": False}

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, **options: Any) -> None:
        super().__init__(model, target_layer, **options)
        self._splits: Dict[int, Tuple[nn.Module, SplitModel]] = {}
        self.last_mode: Optional[str] = None

    # -------------------------------------------------------------------------------------------- the runner
    def _split(self, layer: nn.Module) -> Optional[SplitModel]:
        """The model traced and cut after ``layer`` (cached while the model's modules stay the same), or None."""
        return cached_split(self._splits, self.model, layer)

    def _layer_runner(self, layer: nn.Module, x: Tensor, batch_size: Optional[int], use_tail: bool) -> LayerRunner:
        """The runner of ``layer`` for the images ``x``: tail passes where the model can be cut, else full ones."""
        if not isinstance(use_tail, bool):
            raise TypeError(f"use_tail must be a bool, got {use_tail!r}")
        split = self._split(layer) if use_tail else None
        run = None
        if split is not None:
            try:
                run = self._tail_runner(split, x, batch_size)
            except Unsplittable:
                run = None
        if run is None:
            run = self._full_runner(layer, x, batch_size)
        self.last_mode = run.mode
        return run

    def _tail_runner(self, split: SplitModel, x: Tensor, batch_size: Optional[int]) -> LayerRunner:
        plan = None
        kept: List[Dict[Any, Any]] = []
        for a, b in RowPlanner(x.shape[0], batch_size, x.device):
            values = split.head(self._model_input(x[a:b]))
            plan = plan or split.plan(values)
            kept.append({node: values[node] for node in plan[1]})  # drop the rest of the head's values
        merged = split.merged(kept, plan)
        tail = split.tail(merged, x.shape[0], plan)
        acts = merged[split.cut]
        # the tail may change its layer input in place (a ReLU(inplace=True) after a convolution or batch norm):
        # the clean run gets a copy, so the activations stay the layer's output (edited rows are new tensors)
        clean = tail(acts.clone(), torch.arange(x.shape[0], device=x.device))
        return LayerRunner(acts, clean, tail, "tail")

    def _full_runner(self, layer: nn.Module, x: Tensor, batch_size: Optional[int]) -> LayerRunner:
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

        return LayerRunner(torch.cat(acts), torch.cat(outputs), forward_with, "full")

    # ------------------------------------------------------------------------------------------------ helpers
    def _layer_maps(self, run: LayerRunner, layer: nn.Module, x: Tensor, reshape_transform: ReshapeTransform
                    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The layer's output as (B, C, h, w) maps, and where those maps' elements lie in one image's flattened
        output when the output has another layout (None when it is the maps themselves)."""
        acts = run.activations
        transform = layer_transform(self.model, layer, acts.shape, x.shape[-2:], reshape_transform)
        maps = transform(acts)
        if maps.dim() != 4:
            raise ValueError(f"the output of layer {self._name(layer)!r} has shape {tuple(maps.shape)} after "
                             "reshape_transform; CAMs need (B, C, h, w)")
        positions = None if maps is acts else channel_positions(transform, acts.shape, self._name(layer),
                                                                 acts.device)
        return maps, positions

    def _edited_scores(self, run: LayerRunner, target: Target, copies: int,
                       edit: Callable[[Tensor, Tensor], Tensor], batch_size: Optional[int], progress: bool) -> Tensor:
        """(B, copies) target scores of the edited copies: copy ``k`` of image ``i`` runs with the layer rows
        ``edit(images, ks)`` returns (one row per entry of the two index vectors)."""
        acts = run.activations
        batch = acts.shape[0]
        if target.pending:
            target.classes = run.clean_outputs.argmax(dim=1)
        rows = batch_size
        if rows is None and acts.device.type == "cpu" and run.mode == "tail":  # full forwards: RowPlanner's rows
            rows = int(max(CPU_ROWS, min(MAX_ROWS * 16, TAIL_CHUNK_BYTES // max(1, acts[0].numel()
                                                                             * acts.element_size()))))
        bar = progress_bar(progress, batch * copies, f"{type(self).__name__} copies")
        parts: List[Tensor] = []
        try:
            for start, stop in RowPlanner(batch * copies, rows, acts.device):
                index = torch.arange(start, stop, device=acts.device)
                image, k = index // copies, index % copies
                parts.append(target(run(edit(image, k), image), image))
                bar.update(stop - start)
        finally:
            bar.close()
        return torch.cat(parts).view(batch, copies)
