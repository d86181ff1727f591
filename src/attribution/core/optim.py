"""Optimisers written out, so that ``create_graph`` can differentiate a map through every step of its optimisation."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _root(values: Tensor) -> Tensor:
    """``sqrt(values)`` of non-negative values, with a finite derivative at 0 (where ``sqrt``'s is infinite)."""
    positive = values > 0
    return torch.where(positive, torch.where(positive, values, torch.ones_like(values)).sqrt(),
                       torch.zeros_like(values))


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) as ``torch.optim.Adam`` computes it, without weight decay or amsgrad:
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) +
    eps)``.  :meth:`step` returns the new parameters out of place, so the update stays in the autograd graph when
    the gradient was taken with ``create_graph=True``."""

    def __init__(self, lr: float, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.steps = 0
        self.first: Optional[Tensor] = None
        self.second: Optional[Tensor] = None

    def step(self, params: Tensor, grad: Tensor) -> Tensor:
        """The parameters after one step along ``-grad`` (minimising)."""
        self.steps += 1
        first = torch.zeros_like(grad) if self.first is None else self.first
        second = torch.zeros_like(grad) if self.second is None else self.second
        self.first = self.beta1 * first + (1 - self.beta1) * grad
        self.second = self.beta2 * second + (1 - self.beta2) * grad ** 2
        update = (self.first / (1 - self.beta1 ** self.steps)) / (
            _root(self.second / (1 - self.beta2 ** self.steps)) + self.eps)
        return params - self.lr * update

    def detach_(self) -> None:
        """Drop the moments' graph (between steps of an optimisation that is not differentiated)."""
        self.first, self.second = self.first.detach(), self.second.detach()
