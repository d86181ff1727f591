"""LeGrad: the gradient of each block's own prediction w.r.t. its attention map."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .base import AttentionExplainer, _at_least_float32, batch_dim, scores_to_image
from .tokens import token_layout


@register("legrad")
class LeGrad(AttentionExplainer):
    """LeGrad: how sensitive each block's prediction is to its attention, summed over the last blocks.

    Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, "LeGrad: An Explainability Method for Vision Transformers
    via Feature Formation Sensitivity", ICCV 2025, arXiv:2404.03214.

    Each block ``l`` from ``start_block`` on makes its own prediction: its output tokens go through the rest of the
    model (final norm, pooling, head) as if they were the last block's, and ``s_l`` is the target's score there.
    ``E_l = mean_{heads, queries} ReLU(d s_l / d A_l)`` (B, N) over the keys of block ``l``'s attention ``A_l``; the
    map is ``sum_l E_l`` over the patch tokens, upsampled bilinearly.  ``start_block=-2`` (the last two blocks) is
    the authors' default.  All blocks' predictions come from one forward: the last block's output is stacked with
    the earlier chosen blocks' outputs along the batch, so the model's own tail computes every ``s_l`` (it must
    treat the rows of a batch independently, as eval-mode heads do); then one backward per chosen block.  The
    authors' code explains image-text similarities of CLIP models; here the classifier's score, as their paper's
    ImageNet evaluation.  Raw sums (the authors min-max scale them for display: ``normalize_saliency``).  Cost: one
    forward (the tail on ``k`` times the rows) and ``k`` backwards for ``k`` chosen blocks.
    """

    needs_gradients = True
    argmax_on_rows = False  # the rows are every chosen block's prediction: None is resolved to the image's arg-max
    defaults = {"start_block": -2}

    def _explain(self, x: Tensor, target: Target, *, start_block: int, batch_size: Optional[int],
                 create_graph: bool) -> Tensor:
        names = self._block_names(x)
        if isinstance(start_block, bool) or not isinstance(start_block, int) \
                or not -len(names) <= start_block < len(names):
            default = " (the default: the last two blocks)" if start_block == self.defaults["start_block"] else ""
            raise ValueError(f"start_block must be an int from {-len(names)} to {len(names) - 1}: LeGrad found "
                             f"{len(names)} attention block(s) in {type(self.model).__name__} ({names}); got "
                             f"{start_block!r}{default}")
        first = start_block % len(names)
        modules = dict(self.model.named_modules())
        chosen = [modules[name] for name in names[first:]]
        owners = torch.arange(x.shape[0], device=x.device)
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            rows = stop - start
            earlier: List[Tensor] = []

            def keep(module: nn.Module, args, output: Tensor) -> None:
                earlier.append(output)

            def stack(module: nn.Module, args, output: Tensor) -> Tensor:
                # along the batch (the second dimension of sequence-first blocks' (N, B, D) tokens): the tail then
                # predicts from every chosen block
                shapes = [tuple(t.shape) for t in [output] + earlier]
                if len(set(shapes)) != 1:
                    raise ValueError(f"LeGrad feeds each chosen block's output to the model's last layers, so the "
                                     f"blocks must return tokens of one shape; {type(self.model).__name__}'s blocks "
                                     f"{names[first:]} return {shapes} (hierarchical transformers such as Swin are "
                                     f"not supported)")
                return torch.cat([output] + earlier, dim=batch_dim(output, rows, module))

            handles = [block.register_forward_hook(keep) for block in chosen[:-1]]
            handles.append(chosen[-1].register_forward_hook(stack))
            outputs, capture = self._forward_capturing(x[start:stop], handles)
            attention = self._checked(capture.maps[:len(names)], rows)[first:]
            if outputs.shape[0] != rows * len(chosen):
                raise ValueError(f"LeGrad needs a model whose layers after its last block treat the rows of a batch "
                                 f"independently; {type(self.model).__name__} returned {outputs.shape[0]} rows for "
                                 f"{rows * len(chosen)}")
            # the stacked rows: the last block's first, then the earlier chosen blocks' in order
            per_block = outputs.view(len(chosen), rows, -1)
            ordered = [per_block[i + 1] for i in range(len(chosen) - 1)] + [per_block[0]]
            total = None
            for index, (a, out) in enumerate(zip(attention, ordered)):
                score = target(out, owners[start:stop]).sum()
                (grad,) = torch.autograd.grad(score, a, retain_graph=index < len(chosen) - 1 or create_graph,
                                              create_graph=create_graph)
                with torch.set_grad_enabled(create_graph):
                    term = _at_least_float32(grad).clamp(min=0).mean(dim=(1, 2))  # (B, N) over the keys
                    total = term if total is None else total + term
            layout = token_layout(self.model, tuple(x.shape[-2:]), total.shape[-1], "the attention maps")
            maps.append(scores_to_image(total, layout, tuple(x.shape[-2:])))
        return torch.cat(maps)
