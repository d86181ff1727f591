"""AttCAT: attentive class activation tokens."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..core.batching import RowPlanner
from ..core.registry import register
from ..core.targets import Target
from .attention import AttentionCapture, block_attention
from .base import AttentionExplainer, _at_least_float32, batch_first_tokens, scores_to_image
from .tokens import token_layout


class _CallStacks(AttentionCapture):
    """An attention capture that also notes which modules were running at each attention call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.running: List[str] = []
        self.stacks: List[Tuple[str, ...]] = []
        self._module_handles: list = []

    def __enter__(self) -> "_CallStacks":
        def enter(name: str):
            return lambda module, args: self.running.append(name)  # returns None: the inputs stay as they are

        def leave(module: nn.Module, args, output) -> None:
            self.running.pop()

        for name, module in self.model.named_modules():
            if name:
                self._module_handles.append(module.register_forward_pre_hook(enter(name)))
                self._module_handles.append(module.register_forward_hook(leave))
        return super().__enter__()  # type: ignore[return-value]

    def __exit__(self, *exc) -> None:
        for handle in self._module_handles:
            handle.remove()
        self._module_handles = []
        return super().__exit__(*exc)

    def _sdpa(self, *args, **kwargs):
        self.stacks.append(tuple(self.running))
        return super()._sdpa(*args, **kwargs)

    def _multi_head(self, *args, **kwargs):
        self.stacks.append(tuple(self.running))
        return super()._multi_head(*args, **kwargs)

    def _record_output(self, module, inputs, output):
        self.stacks.append(tuple(self.running))
        return super()._record_output(module, inputs, output)


def attention_blocks(model: nn.Module, x: Tensor, forward: Optional[Callable[[Tensor], Tensor]] = None,
                     owner: str = "") -> List[str]:
    """The blocks of a transformer, one per attention call, in order: the children of one ``Sequential`` or
    ``ModuleList`` among which the attention calls of a forward of ``x[:1]`` fall one per child.  ``forward`` runs
    the model (default: the model itself; an explainer passes its own, which applies the call's precision).  The
    calls of an attention-pooling head after the blocks (timm's ``global_pool='map'``) are left out."""
    containers = {name for name, module in model.named_modules() if isinstance(module, (nn.Sequential, nn.ModuleList))}
    with torch.no_grad(), _CallStacks(model) as capture:
        (forward or model)(x[:1])
    if not capture.stacks:
        who = f"{owner} " if owner else ""
        raise ValueError(f"{who}found no attention in {type(model).__name__}'s forward pass; it needs a transformer "
                         "whose attention runs through F.scaled_dot_product_attention, nn.MultiheadAttention or "
                         "timm's Attention")
    stacks = capture.stacks[:len(block_attention(capture.maps))]  # an attention-pooling head's calls are no block's
    for depth_name in stacks[0]:
        parent = depth_name.rpartition(".")[0]
        if parent not in containers:
            continue
        blocks = [next((n for n in stack if n.rpartition(".")[0] == parent), None) for stack in stacks]
        if None not in blocks and len(set(blocks)) == len(blocks):
            return blocks  # type: ignore[return-value]
    raise ValueError(
        f"cannot find the blocks of {type(model).__name__}: its {len(stacks)} attention calls do not fall "
        "one per child of one Sequential or ModuleList"
    )


@register("attcat")
class AttCAT(AttentionExplainer):
    """AttCAT: each block's tokens times their gradient (class activation tokens), weighted by the attention they
    receive, summed over blocks.

    Qiang, Pan, Li, Li, Jang & Zhu, "AttCAT: Explaining Transformers via Attentive Class Activation Tokens",
    NeurIPS 2022.

    With ``h_l`` the tokens entering block ``l`` (B, N, D) and ``A_l`` its attention (B, heads, N, N):
    ``R_i = sum_l mean_{heads, queries}(A_l)[:, i] * sum_d (grad_{h_l} f_t * h_l)_{i, d}``; the map is ``R`` over
    the patch tokens on the model's patch grid, upsampled bilinearly.  Signed and class-discriminative.  As the
    reference code shared by the AttCAT and Contrast-CAT evaluations: the hidden states entering each block and
    the attention averaged over heads and query tokens.  The blocks are found once per input size: the children
    of one ``Sequential``/``ModuleList`` that hold one attention call each; sequence-first blocks
    (``nn.TransformerEncoderLayer``'s default) have their (N, B, D) tokens read as (B, N, D).  Cost: one forward
    and one backward (to the block inputs) per image.
    """

    needs_gradients = True

    def _explain(self, x: Tensor, target: Target, *, batch_size: Optional[int], create_graph: bool) -> Tensor:
        modules = dict(self.model.named_modules())
        blocks = [modules[name] for name in self._block_names(x)]
        owners = torch.arange(x.shape[0], device=x.device)
        maps = []
        for start, stop in RowPlanner(x.shape[0], batch_size, x.device):
            tokens: List[Tensor] = []
            handles = [block.register_forward_pre_hook(lambda m, args: tokens.append(args[0])) for block in blocks]
            outputs, capture = self._forward_capturing(x[start:stop], handles)
            rows = stop - start
            attention = self._checked(capture.maps, rows)
            if len(tokens) != len(attention):
                raise ValueError(f"AttCAT found {len(attention)} attention maps but {len(tokens)} block inputs")
            scores = target(outputs, owners[start:stop])
            grads = torch.autograd.grad(scores.sum(), tokens, create_graph=create_graph)
            # sequence-first blocks (nn.TransformerEncoderLayer's default) take (N, B, D) tokens
            tokens = [batch_first_tokens(t, rows, b) for t, b in zip(tokens, blocks)]
            grads = tuple(batch_first_tokens(g, rows, b) for g, b in zip(grads, blocks))
            shape = (rows, attention[0].shape[-1])
            if any(t.dim() != 3 or tuple(t.shape[:2]) != shape for t in tokens):
                raise ValueError(f"AttCAT needs each block of {type(self.model).__name__} to take one (B, N, D) or "
                                 f"sequence-first (N, B, D) token tensor of the attention's {shape[1]} tokens; they "
                                 f"take {sorted({tuple(t.shape) for t in tokens})} for {rows} images")
            with torch.set_grad_enabled(create_graph):
                relevance = attentive_class_activation_tokens(attention, grads, tokens)
            layout = token_layout(self.model, tuple(x.shape[-2:]), relevance.shape[-1], "the block inputs")
            maps.append(scores_to_image(relevance, layout, tuple(x.shape[-2:])))
        return torch.cat(maps)


def attentive_class_activation_tokens(attention: List[Tensor], grads: Sequence[Tensor],
                                      tokens: List[Tensor]) -> Tensor:
    """(B, N): ``sum_l mean_{heads, queries}(A_l) * sum_d(grad_l * h_l)``, in at least float32."""
    total = None
    for a, g, h in zip(attention, grads, tokens):
        received = _at_least_float32(a).mean(dim=(1, 2))
        term = received * (_at_least_float32(g) * _at_least_float32(h)).sum(dim=-1)
        total = term if total is None else total + term
    return total
