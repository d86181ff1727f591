"""The state guard: every explainer call leaves the user's model exactly as it found it.

Inside the guard the model runs in eval mode (dropout off, batch-norm on running statistics, so that each image's
attribution is independent of the batch it came in) and without timm's gradient checkpointing (the modules'
``grad_checkpointing`` flags, set by ``set_grad_checkpointing``, which timm honours in eval mode too: the backward
would recompute the blocks outside the explainer's hooks and attention capture, and torch's checkpoint then refuses
tensors that differ from the forward's).  On exit, normal or not, every module's training flag and checkpointing
flag, every parameter's ``requires_grad`` and ``.grad``, every module's children and hook dictionaries are put back.

Calls on one model are serialised by a per-model reentrant lock held for the whole guarded body: explainers
install hooks, modes and per-call state while they run, so two threads explaining with the same model (through
one explainer or several) take turns instead of seeing each other's hooks; different models run concurrently.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The reentrant lock that serialises explainer calls on ``model``."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _hook_snapshot(module: nn.Module) -> Dict[str, dict]:
    return {name: dict(getattr(module, name)) for name in _HOOK_DICTS if hasattr(module, name)}


@contextmanager
def preserve_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode and restore all of its observable state afterwards (holding the
    model's lock throughout)."""
    with model_lock(model):
        yield from _preserved(model)


def _preserved(model: nn.Module) -> Iterator[nn.Module]:
    modules: List[nn.Module] = list(model.modules())
    training = [m.training for m in modules]
    children = [dict(m._modules) for m in modules]
    hooks = [_hook_snapshot(m) for m in modules]
    params: List[Tuple[nn.Parameter, bool, object]] = [
        (p, p.requires_grad, p.grad) for p in model.parameters()
    ]
    kept: List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
    checkpointed = [(m, m.grad_checkpointing) for m in modules if _checkpointing(m)]
    try:
        model.eval()
        for module, _ in checkpointed:
            module.grad_checkpointing = False
        kept = _training_buffers(model)
        yield model
    finally:
        for module, flag in checkpointed:
            module.grad_checkpointing = flag
        with torch.no_grad():
            for module, name, buffer, saved in kept:
                module._buffers[name] = buffer
                buffer.copy_(saved)
        for module, kids in zip(modules, children):
            if module._modules != kids:
                module._modules.clear()
                module._modules.update(kids)
        for module, flag, saved in zip(modules, training, hooks):
            module.training = flag
            for name, before in saved.items():
                now = getattr(module, name)
                if now != before:
                    now.clear()
                    now.update(before)
        with torch.no_grad():
            for p, requires_grad, grad in params:
                if p.requires_grad != requires_grad:
                    p.requires_grad_(requires_grad)
                if p.grad is not grad:
                    p.grad = grad


def _checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` has timm's gradient checkpointing on (its ``grad_checkpointing`` flag, a bool or an int,
    set: timm's models and stages run ``checkpoint_seq`` then, whatever their training flag)."""
    flag = module.__dict__.get("grad_checkpointing", False)
    return isinstance(flag, (bool, int)) and bool(flag)


def _training_buffers(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor, torch.Tensor]]:
    """Copies of the buffers of modules that stay in training mode under ``model.eval()`` (a ``train()`` override
    that keeps batch norm training, as test-time adaptation does): their forwards update running statistics, which
    the guard puts back.  Modules that go to eval mode leave their buffers alone, so nothing else is copied."""
    return [(module, name, buffer, buffer.detach().clone())
            for module in model.modules() if module.training
            for name, buffer in module._buffers.items() if buffer is not None]
